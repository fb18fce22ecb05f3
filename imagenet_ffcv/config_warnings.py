"""Warnings in a run's header about a config that loads but may not do what its author meant:
keys the run does not read (:func:`ignored_settings`), an LR tuned for another global batch
(:func:`unscaled_recipe`), a resolution ramp cut short (:func:`unreached_resolution`), images
stored smaller than the run's resolutions (:func:`upscaled`), gradients accumulated past an
epoch's batches (:func:`accumulated_past_the_epoch`). What cannot
run at all is an error of ``config``."""
from types import SimpleNamespace

from . import schedules
from .config import SCHEDULE_ARGUMENTS, resolution_kwargs
from .config_schema import defaults, flatten
from .optimizers import TAKE_BETAS, TAKE_MOMENTUM


def _schedule_is(name: str):
    return f'lr.lr_schedule_type={name}', lambda v: v['lr.lr_schedule_type'] == name


# Keys that do something only in some set-ups: {key: (the set-up in words, whether the resolved
# values ({'section.key': value}) are one)}. Set to another value than its default in another
# set-up, a key is named in a warning (:func:`ignored_settings`). Each schedule's own keys are
# config.SCHEDULE_ARGUMENTS' (lr.min_lr but with cosine is an error: config).
USED_ONLY_WITH = {
    **{key: _schedule_is(name) for name, arguments in SCHEDULE_ARGUMENTS.items()
       for key in arguments.values() if key != 'lr.min_lr'},
    'lr.step_length': ('lr.lr_schedule_type=step without lr.step_fractions (which win)',
                       lambda v: v['lr.lr_schedule_type'] == 'step' and not v['lr.step_fractions']),
    'training.momentum': ('training.optimizer=' + ' or '.join(TAKE_MOMENTUM),
                          lambda v: v['training.optimizer'] in TAKE_MOMENTUM),
    'training.betas': ('training.optimizer=' + ' or '.join(TAKE_BETAS),
                       lambda v: v['training.optimizer'] in TAKE_BETAS),
    'training.ra_magnitude': ('training.auto_augment=ra',
                              lambda v: v['training.auto_augment'] == 'ra'),
    'training.ema_every': ('training.ema_decay > 0', lambda v: v['training.ema_decay'] > 0),
    'resolution.start_ramp': ('resolution.min_res < resolution.max_res',
                              lambda v: v['resolution.min_res'] < v['resolution.max_res']),
    'resolution.end_ramp': ('resolution.min_res < resolution.max_res',
                            lambda v: v['resolution.min_res'] < v['resolution.max_res']),
    'logging.every_iters': ('logging.tensorboard=1 or logging.wandb_project',
                            lambda v: v['logging.tensorboard'] or v['logging.wandb_project']),
    'checkpoint.force': ('checkpoint.resume', lambda v: v['checkpoint.resume']),
    'validation.results_file': ('training.eval_only=1 (a training run writes RUN_DIR/results.json)',
                                lambda v: v['training.eval_only']),
}


def ignored_settings(config: dict) -> list:
    """A warning for each key of :data:`USED_ONLY_WITH` that the resolved ``config``
    (``{'section': {'key': value}}``) sets to another value than its default in a set-up that does
    not use it, e.g. ``training.momentum=0.8 does nothing here: it is used only with
    training.optimizer=sgd``; [] when there is none (a mistyped key is an error already, this is
    its quieter cousin: a value that is read by nothing)."""
    values, default = flatten(config), defaults()
    return [f'{key}={values[key]!r} does nothing here: it is used only with {setup}'
            for key, (setup, used) in USED_ONLY_WITH.items()
            if values[key] != default[key] and not used(values)]


def unscaled_recipe(config: dict):
    """A warning (else None) when the resolved ``config`` (``derived`` included) uses its LR as is
    (``lr.ref_batch_size=0``, as ffcv-imagenet's own configs do) for another global batch than the
    one it was written for: ``dist.world_size`` processes (ffcv-imagenet's launcher started them
    itself, with ``training.distributed=1``) of ``training.batch_size`` images."""
    v = flatten(config)
    written, batch = v['dist.world_size'], v['training.batch_size']
    now = v['derived.global_batch_size']
    if written <= 1 or written * batch == now or v['lr.ref_batch_size']:
        return None
    return (f'the config was written for dist.world_size={written} processes of '
            f'training.batch_size={batch} (a global batch of {written * batch}), and this run\'s '
            f'global batch is {now} ({v["derived.world_size"]} process(es) x {batch} x '
            f'training.grad_accum_steps={v["training.grad_accum_steps"]}), with lr.lr='
            f'{v["lr.lr"]:g} used as is (lr.ref_batch_size=0): set lr.ref_batch_size='
            f'{written * batch} to scale the LR to this batch, or keep the batch (torchrun '
            f'--nproc_per_node={written}, or training.grad_accum_steps; this tool starts no '
            f'processes itself, as ffcv-imagenet\'s training.distributed=1 did)')


def unreached_resolution(cfg: SimpleNamespace):
    """A warning (not an error) when the last epoch trains below ``resolution.max_res``, else
    None."""
    r, epochs = cfg.resolution, cfg.training.epochs
    last = schedules.resolution_at(epochs - 1, **resolution_kwargs(cfg))
    if last >= r.max_res:
        return None
    return (f'the last epoch ({epochs - 1}: training.epochs={epochs}) trains at {last} px, not '
            f'resolution.max_res={r.max_res}: the ramp from resolution.start_ramp={r.start_ramp} '
            f'(the last epoch at min_res) to resolution.end_ramp={r.end_ramp} does not end before '
            f'it; move the ramp with the epochs')


def upscaled(cfg: SimpleNamespace, resolved: dict):
    """A warning when the images stored are smaller than what the run trains or validates at:
    ``resolution.max_res`` or ``validation.resolution`` above their largest shorter side (the val
    .beton's, ``derived.val_image_side``, stands for both), else None. (Validation at 256 px of
    ImageNet stored at 256 upscales its 224 px centre crops, as the recipes mean to: FixRes.)"""
    side = resolved.get('derived', {}).get('val_image_side')
    over = [f'{key}={value}' for key, value in (
        ('resolution.max_res', cfg.resolution.max_res),
        ('validation.resolution', cfg.validation.resolution)) if side and value > side]
    if not over:
        return None
    return (f'{" and ".join(over)} above the shorter sides {cfg.data.val_dataset} stores (up to '
            f'{side} px): every image is upscaled, at the cost of those sides without their '
            f'detail; lower the resolutions, or, where the images are larger, write the .beton '
            f'files at a larger --max-res (256, as for ImageNet)')


def accumulated_past_the_epoch(cfg: SimpleNamespace, resolved: dict):
    """A warning when ``training.grad_accum_steps`` is more than the batches of an epoch (each
    epoch then makes one optimizer step, of fewer batches than asked), else None."""
    derived, accum = resolved.get('derived', {}), cfg.training.grad_accum_steps
    images, world = derived.get('train_images'), derived.get('world_size', 1)
    batches = images // (cfg.training.batch_size * world) if images else None
    if not batches or accum <= batches:
        return None
    return (f'training.grad_accum_steps={accum} is more than the {batches} batches of an epoch '
            f'({images} images, {cfg.training.batch_size} per process x {world} process(es)): '
            f'each epoch makes one optimizer step, of {batches} batches, and the global batch '
            f'and the LR scaled to it count {accum}; lower it to at most {batches}')


def header_warnings(cfg: SimpleNamespace, resolved: dict) -> list:
    """Every warning above for the run of ``cfg`` whose resolved config is ``resolved``."""
    return [w for w in [unreached_resolution(cfg), unscaled_recipe(resolved),
                        upscaled(cfg, resolved), accumulated_past_the_epoch(cfg, resolved),
                        *ignored_settings(resolved)] if w]
