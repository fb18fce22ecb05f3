"""Fast ImageNet training with FFCV: one module per concern (README: "Where things are").

Commands: ``write`` (``imagenet-ffcv-write``: class folders -> .beton), ``train``
(``imagenet-ffcv-train``: training and eval-only), ``predict`` (``imagenet-ffcv-predict``), and
what they share, ``commands``.
Data: ``sources`` (input layouts, class folders, samples and labels), ``ilsvrc`` (Kaggle's ImageNet
tree, the raw ILSVRC-2012 tars and the devkit), ``holdout`` (a val split held out of train/),
``classes`` (class lists), ``images``
(decoding to RGB, the shorter-side resize), ``records`` (an image's record in a .beton),
``writer`` (writing .beton files; ``beton_out``: the checks of the path written and the
files beside it), ``verify`` (reading them back), ``betons`` (what a .beton holds:
samples, classes, image sides), ``loaders`` (the FFCV loaders), ``epoch_iterator`` (the thread
decoding a loader's epoch), ``memory_readers`` (ffcv's readers of the .beton in memory, compiled
once per process),
``decoders`` (the fused crop/resize/flip/normalise decoders), ``image_decode`` (the decoders' path
from one stored image to its crop's pixels), ``jpeg_region`` (the decoders' C part,
``jpeg_region.c``: the JPEG region decoder, the common case of the resample, and the
converter's reading of source JPEGs), ``resampling``
(their bilinear resample), ``crops`` (crops and flips from seed, epoch and sample), ``constants``,
``ffcv_import`` (ffcv imported without the numba compiling that importing it sets off; imported
first by the modules that use ffcv).
Training: ``config`` and ``config_schema`` (the configuration and its keys), ``config_files``
(``--config`` files: found, read once each key), ``config_warnings``
(what a run's header warns of in a config that loads), ``preflight``
(what a run needs of this machine, checked before it starts), ``models``,
``optimizers``, ``schedules``, ``engine`` (training step and epoch, evaluation), ``precision``
(mixed precision), ``ema``, ``augment`` (RandAugment, TrivialAugmentWide, Random Erasing),
``mixup``, ``evaluate`` (validation and eval-only), ``metrics``, ``distributed`` (torchrun;
``cores``: the cores a process may use; ``cgroups``: the folders of its limits),
``checkpoint`` (the checkpoint format, resume), ``torch_files`` (torch.save files read without
running code), ``safetensors_files`` (.safetensors files read), ``weights`` (final weights,
models rebuilt from them), ``weights_metadata`` (the config and class list saved in them),
``finetune`` (training started from weights),
``state_dicts`` (other tools' state dicts made torchvision's),
``signals`` (pre-emption and Ctrl-C), ``run_dir`` (the run folder), ``run_lock`` (its lock:
which job writes the run), ``loggers`` (TensorBoard, W&B), ``optional`` (optional packages),
``files`` (atomic writes), ``errors`` (the base exception; ``first_few``, how messages list names).

Importing any module touches neither the disk nor global state.
"""
