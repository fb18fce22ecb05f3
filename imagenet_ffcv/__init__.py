"""Shared pieces of the ImageNet-on-FFCV tool: one module per concern (README: "Where things are").

Data: ``sources`` (input layouts, samples and labels), ``classes`` (class lists), ``images``
(decoding to RGB, the shorter-side resize), ``writer`` (writing .beton files), ``verify`` (reading
them back), ``loaders`` (the FFCV loaders), ``decoders`` (the fused crop/resize/flip/normalise
decoders), ``crops`` (crops and flips from seed, epoch and sample), ``constants``.
Training: ``config`` (the schema), ``models``, ``schedules``, ``engine`` (training step and epoch,
evaluation, mixed precision), ``metrics``, ``distributed`` (torchrun), ``checkpoint`` (checkpoints,
resume, safe loading), ``run_dir`` (the run folder), ``files`` (atomic writes).

Importing any module touches neither the disk nor global state.
"""
