"""Shared pieces of the ImageNet-on-FFCV tool: one module per concern.

- ``config``: the fastargs schema of ``train_imagenet.py`` (ffcv-imagenet's sections and keys).
- ``data``: class lists, the shorter-side resize, the .beton writer dataset and the FFCV loaders.
- ``models``: torchvision models by name, BlurPool, weight-decay parameter groups.
- ``schedules``: learning-rate and resolution schedules as pure functions of the epoch.
- ``engine``: one training epoch and one evaluation pass.
- ``metrics``: top-k counts, the results table, parameters/GMACs and the run's plot.
- ``distributed``: torchrun's environment and process-group set-up.
- ``checkpoint``: atomic checkpoints, ``--resume``, SIGTERM/Ctrl-C handling.

Importing any module touches neither the disk nor global state.
"""
