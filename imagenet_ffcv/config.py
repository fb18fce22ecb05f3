"""The configuration of the trainer (``imagenet-ffcv-train``): ffcv-imagenet's sections and keys
(declared in ``config_schema``), read with fastargs. Sources, later ones winning: defaults <
``--config FILE.yaml`` (repeatable) < ``--section.key=value``. A key that is not in the schema,
in a file or on the command line, is an error naming it (fastargs alone ignores it silently), and
so is a value of the wrong type. Everything is declared on a fresh ``fastargs.Config`` per call:
nothing global is touched, so a test can build several configs in one process.
"""
import argparse
import math
import sys
from types import SimpleNamespace

from fastargs import Config

from . import augment, config_files, optimizers, schedules
from .commands import add_version_option, command_name
from .config_files import config_file
from .config_schema import (ConfigError, declared, defaults, did_you_mean, flatten,
                            markdown)  # markdown: the docs'
from .run_dir import RUN_NAME

# Keys that may change between a run and its resumption: where the data is and how it is read (not
# the crops, flips or decoder), what is logged and how validation is done. Any other difference
# (epochs, LR, resolution schedule, augmentation, batch, model, seed, ...) changes the run half-way
# through and is refused unless forced. The mixed precision, torch.compile and code may change too.
RESUMABLE_CHANGES = ('data.train_dataset', 'data.val_dataset', 'data.num_workers',
                     'data.in_memory', 'data.gpu', 'logging.', 'validation.', 'checkpoint.',
                     'dist.', 'code.', 'training.eval_only', 'training.target_top1', 'training.amp',
                     'training.compile', 'derived.device', 'derived.amp', 'derived.loader_threads',
                     'derived.val_image_side')
# Keys a resume cannot change even with checkpoint.force=1: the optimizer's state, the weights'
# shapes, the optimizer's parameter groups would not carry over (restore_training_state).
NOT_FORCEABLE = ('training.optimizer', 'model.arch', 'training.bn_wd', 'derived.num_classes')


def _add_key_arguments(parser: argparse.ArgumentParser, config: Config) -> None:
    """One ``--section.key`` option per key, grouped by section in ``--help``, each help text
    ending with the key's default. The options default to None: only given ones override."""
    groups = {}
    for path, param in config.entries.items():
        section = param.section
        if section.ns not in groups:
            groups[section.ns] = parser.add_argument_group(
                f'{".".join(section.ns)}: {section.desc}')
        default = ('required' if param.required else
                   f"default: {param.default!r}" if isinstance(param.default, str) else
                   f'default: {param.default}')
        groups[section.ns].add_argument(f'--{".".join(path)}', default=None, metavar='VALUE',
                                        help=f'{param.desc} ({default})'.replace('%', '%%'))


def build_parser(config: Config = None) -> argparse.ArgumentParser:
    """The trainer's command line: ``--config``, ``--resume`` and one ``--section.key`` per key of
    ``config`` (a declared ``fastargs.Config``; None: a new one)."""
    config = declared() if config is None else config
    parser = argparse.ArgumentParser(allow_abbrev=False, prog=command_name('train'),
                                     usage='%(prog)s [--config FILE.yaml ...] '
                                           '[--section.key=VALUE ...] [--resume auto|PATH]',
                                     description='Train an ImageNet classifier from .beton files.')
    parser.add_argument('--config', '--config-file', '-C', action='append', default=[],
                        help='YAML or JSON config file (repeatable; later ones win): a path, '
                             'or the name of a shipped config such as '
                             'rn50_configs/rn50_16_epochs.yaml')
    parser.add_argument('--resume', dest='checkpoint.resume', default=None,
                        help="--checkpoint.resume: 'auto', a checkpoint.pt path or a run folder")
    add_version_option(parser)
    _add_key_arguments(parser, config)
    return parser


def load_config(argv: list) -> SimpleNamespace:
    """Parse ``argv`` (e.g. ``['--config', 'rn50_configs/rn50_16_epochs.yaml',
    '--training.epochs=2']``) into ``cfg.section.key`` values, checked against the schema.

    Raises ConfigError naming each unknown key, missing required key or badly typed value, and
    FileNotFoundError for a missing config file.
    """
    config = declared()
    known = {'.'.join(path): param for path, param in config.entries.items()}
    args, unknown = build_parser(config).parse_known_args(argv)
    if unknown:
        raise ConfigError(f'unknown argument(s) {" ".join(unknown)}{did_you_mean(unknown, known)}'
                          f'; --help lists every key')

    for fname in map(config_file, args.config):
        config.collect(config_files.read(fname, known))  # ConfigError naming what is wrong
    config.collect(_command_line_values(args))  # fastargs splits the dotted keys

    errors = config.validate(mode='errordict')
    if errors:
        lines = []
        for path, _ in errors.items():
            name = '.'.join(path)
            got = config.content.get(path)
            lines.append(f'{name}: required, not set' if got is None else
                         f'{name}: got {got!r}, expected {config.entries[path].checker.help()}')
        raise ConfigError('invalid configuration:\n  ' + '\n  '.join(lines))

    sections = {}
    for section, key in config.entries:  # every key is section.key
        sections.setdefault(section, {})[key] = config[section, key]
    endless = [f'{k}={v}' for k, v in flatten(sections).items()
               if isinstance(v, float) and not math.isfinite(v)]
    if endless:  # fastargs' Float takes 'nan' and 'inf': the run failed as a non-finite loss
        raise ConfigError(f'{", ".join(endless)}: not a finite number; give a number')
    cfg = from_dict(sections)
    _check_consistency(cfg)
    return cfg


def _command_line_values(args: argparse.Namespace) -> dict:
    """``{'section.key': value}`` of the keys the command line gives (not --config's files)."""
    return {k: v for k, v in vars(args).items() if k != 'config' and v is not None}


def command_line_keys(argv: list) -> frozenset:
    """The keys ``argv`` sets as ``--section.key=value`` (``--resume``: checkpoint.resume), not
    through ``--config`` files: eval-only takes the others' validation settings from the run."""
    return frozenset(_command_line_values(build_parser().parse_known_args(argv)[0]))


def _check_consistency(cfg) -> None:
    """Rules between keys, checked before any work starts; raises ConfigError naming the keys."""
    problems, values = [], flatten(to_dict(cfg))
    for key in ('training.epochs', 'training.batch_size', 'training.grad_accum_steps',
                'validation.batch_size', 'validation.resolution', 'resolution.min_res',
                'lr.step_length', 'logging.every_iters', 'dist.timeout_s', 'training.ema_every'):
        if values[key] < 1:
            problems.append(f'{key}={values[key]} must be >= 1')
    if cfg.resolution.min_res > cfg.resolution.max_res:
        problems.append(f'resolution.min_res={cfg.resolution.min_res} is above '
                        f'resolution.max_res={cfg.resolution.max_res}')
    if cfg.resolution.start_ramp > cfg.resolution.end_ramp:
        problems.append(f'resolution.start_ramp={cfg.resolution.start_ramp} is after '
                        f'resolution.end_ramp={cfg.resolution.end_ramp}')
    if cfg.lr.lr_schedule_type == 'cyclic' and not 0 <= cfg.lr.lr_peak_epoch <= cfg.training.epochs:
        problems.append(f'lr.lr_peak_epoch={cfg.lr.lr_peak_epoch} must lie in [0, training.epochs='
                        f'{cfg.training.epochs}] (a shorter run needs its own, e.g. '
                        f'--lr.lr_peak_epoch={cfg.training.epochs / 8:g})')
    try:
        schedules.parse_fractions(cfg.lr.step_fractions)
    except ValueError as e:
        problems.append(f'lr.step_fractions={cfg.lr.step_fractions!r}: {e}')
    if cfg.lr.warmup_epochs < 0 or cfg.lr.warmup_epochs > cfg.training.epochs:
        problems.append(f'lr.warmup_epochs={cfg.lr.warmup_epochs} must lie in '
                        f'[0, training.epochs={cfg.training.epochs}]')
    elif cfg.lr.lr_schedule_type == 'cyclic' and cfg.lr.warmup_epochs > cfg.lr.lr_peak_epoch:
        problems.append(f'lr.warmup_epochs={cfg.lr.warmup_epochs} is after lr.lr_peak_epoch='
                        f'{cfg.lr.lr_peak_epoch}: the cyclic ramp times the warm-up would never '
                        'reach lr.lr; lengthen the ramp with lr.lr_peak_epoch instead')
    elif (cfg.lr.lr_schedule_type in schedules.DECAY_AFTER_WARMUP
          and cfg.lr.warmup_epochs >= cfg.training.epochs):
        problems.append(f'lr.warmup_epochs={cfg.lr.warmup_epochs} takes all training.epochs='
                        f'{cfg.training.epochs}: the {cfg.lr.lr_schedule_type} decay starts after '
                        f'the warm-up, so the LR would rise to lr.lr and never decay; give a '
                        f'shorter warm-up (e.g. --lr.warmup_epochs={cfg.training.epochs / 16:g})')
    if not 0 <= cfg.training.target_top1 <= 1:
        problems.append(f'training.target_top1={cfg.training.target_top1} must be a fraction in '
                        f'[0, 1] (0: off), e.g. 0.6 for 60 %')
    if not 0 < cfg.data.min_crop_scale <= 1:
        problems.append(f'data.min_crop_scale={cfg.data.min_crop_scale} must lie in (0, 1]')
    if not 0 <= cfg.data.flip_prob <= 1:
        problems.append(f'data.flip_prob={cfg.data.flip_prob} must lie in [0, 1]')
    if cfg.data.num_workers != 'auto' and cfg.data.num_workers < 1:
        problems.append(f'data.num_workers={cfg.data.num_workers} must be >= 1 (loader threads '
                        "per process) or 'auto'")
    for key in ('checkpoint.keep_last', 'lr.ref_batch_size', 'logging.log_level'):
        if values[key] < 0:
            problems.append(f'{key}={values[key]} must be >= 0 (0: off)')
    if cfg.checkpoint.every_iters < 0:
        problems.append(f'checkpoint.every_iters={cfg.checkpoint.every_iters} must be >= 0 '
                        '(0: only at the end of each epoch)')
    if not (cfg.data.train_dataset or cfg.training.eval_only):
        problems.append('data.train_dataset: required, not set (the training .beton)')
    if not cfg.data.val_dataset:
        problems.append('data.val_dataset: required, not set (the validation .beton)')
    if not (cfg.logging.folder or cfg.training.eval_only):
        problems.append('logging.folder: required, not set (runs are written to FOLDER/<run id>/)')
    if cfg.training.eval_only and not cfg.model.weights:
        problems.append('training.eval_only=1 needs model.weights=PATH (a run folder, its '
                        'checkpoint.pt or final_weights.pt)')
    if cfg.model.reset_head and not cfg.model.weights:
        problems.append('model.reset_head=1 needs model.weights=PATH (the weights to fine-tune)')
    if cfg.model.pretrained:
        problems.append('model.pretrained=1: weights are never fetched from the network; set it '
                        'to 0 and start from a file with model.weights=PATH')
    if cfg.training.eval_only and cfg.checkpoint.resume:
        problems.append('checkpoint.resume and training.eval_only=1 exclude each other')
    problems += _option_problems(cfg)
    if problems:
        raise ConfigError('invalid configuration:\n  ' + '\n  '.join(problems))


def _option_problems(cfg) -> list:
    """The rules of the optional training features (EMA, MixUp/CutMix, cosine, AdamW, clipping)."""
    problems = []
    t = cfg.training
    if not 0 <= t.ema_decay < 1:
        problems.append(f'training.ema_decay={t.ema_decay} must lie in [0, 1) (0: off), e.g. '
                        '0.9998')
    for key in ('mixup_alpha', 'cutmix_alpha', 'clip_grad_norm', 'weight_decay', 'momentum'):
        if getattr(t, key) < 0:
            problems.append(f'training.{key}={getattr(t, key)} must be >= 0 (0: off)')
    if not 0 <= t.label_smoothing < 1:
        problems.append(f'training.label_smoothing={t.label_smoothing} must lie in [0, 1) '
                        '(0: off), e.g. 0.1')
    try:
        step_option_kwargs(cfg)  # augment.batch_augmenter checks its keys
    except ValueError as e:
        problems.append(f'training.{e}')  # the message starts with the key
    try:
        optimizers.parse_betas(t.betas)
    except ValueError as e:
        problems.append(f'training.betas={t.betas!r}: {e}')
    if cfg.lr.lr <= 0:
        problems.append(f'lr.lr={cfg.lr.lr} must be > 0')
    elif not 0 <= cfg.lr.min_lr <= cfg.lr.lr:
        problems.append(f'lr.min_lr={cfg.lr.min_lr} must lie in [0, lr.lr={cfg.lr.lr}]')
    if cfg.lr.min_lr and cfg.lr.lr_schedule_type != 'cosine':
        problems.append(f'lr.min_lr={cfg.lr.min_lr} is only used by lr.lr_schedule_type=cosine')
    if cfg.logging.run_name and not RUN_NAME.fullmatch(cfg.logging.run_name):
        problems.append(f'logging.run_name={cfg.logging.run_name!r}: use letters, digits, '
                        "'.', '_' and '-' only, starting with a letter or digit (it names a folder)")
    return problems


def to_dict(cfg: SimpleNamespace) -> dict:
    """``{'section': {'key': value}}``, for params.json."""
    return {section: dict(vars(keys)) for section, keys in vars(cfg).items()}


def from_dict(sections: dict) -> SimpleNamespace:
    """``cfg.section.key`` from ``{'section': {'key': value}}`` (:func:`to_dict`'s inverse)."""
    return SimpleNamespace(**{name: SimpleNamespace(**keys) for name, keys in sections.items()})


# Adapters from the config to the components (as timm's ``scheduler_kwargs``): the trainer never
# lists a schedule's arguments, and the schedules never read config keys.

# Each schedule's own arguments (``schedules.LR_SCHEDULES``) and the keys that give them; a schedule
# not listed (linear) has none.
SCHEDULE_ARGUMENTS = {'cyclic': {'peak_epoch': 'lr.lr_peak_epoch'},
                      'step': {'step_ratio': 'lr.step_ratio', 'step_length': 'lr.step_length',
                               'step_fractions': 'lr.step_fractions'},
                      'poly': {'power': 'lr.poly_power'}, 'cosine': {'min_lr': 'lr.min_lr'}}


def lr_schedule_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``schedules.lr_at`` but ``lr`` (scaled by the trainer): the
    schedule's name, ``epochs``, ``warmup_epochs`` and the schedule's own arguments (none for a
    schedule not listed here, such as ``linear``)."""
    values = flatten(to_dict(cfg))
    own = {name: values[key]
           for name, key in SCHEDULE_ARGUMENTS.get(cfg.lr.lr_schedule_type, {}).items()}
    if 'step_fractions' in own:
        own['step_fractions'] = schedules.parse_fractions(own['step_fractions'])
    return {'schedule': cfg.lr.lr_schedule_type, 'epochs': cfg.training.epochs,
            'warmup_epochs': cfg.lr.warmup_epochs, **own}


def schedule_changes(saved: dict, current: dict) -> list:
    """``['key: saved -> current', ...]`` for each differing key of ``current``'s sections (configs
    as ``{'section': {'key': value}}``, ``derived`` too) not in :data:`RESUMABLE_CHANGES`; a key
    ``saved`` lacks (older than the key) counts as its default, what its run did; a derived one,
    as unknown."""
    was, new = flatten(saved), flatten(current)
    old = {**defaults(), **was}
    keys = sorted(k for k in was.keys() | new.keys() if k.split('.')[0] in current
                  and (k in was or not k.startswith('derived.')))
    return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys
            if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def check_resumable(saved: dict, current: dict, *, force: bool, path) -> None:
    """Raise ConfigError listing :func:`schedule_changes` between the resolved config ``saved``
    with the checkpoint ``path`` and the resolved config ``current``, unless there are none or
    ``force`` (``checkpoint.force=1``) and none of them is in :data:`NOT_FORCEABLE`."""
    changes = schedule_changes(saved, current)
    fixed = [c.split(':')[0] for c in changes if c.split(':')[0] in NOT_FORCEABLE]
    if not changes or force and not fixed:  # (forced, those failed later, less clearly)
        return
    advice = ', or set checkpoint.force=1 to continue anyway'
    if fixed:
        advice = (f' ({", ".join(fixed)} cannot change on resume, even forced: start a new run; '
                  f'model.weights={path} starts it from these weights where the arch is the '
                  f'same, with model.reset_head=1 for other classes)')
    elif any(c.startswith('derived.world_size') for c in changes):
        advice += (' (another number of processes always needs it; keep the global batch with '
                   'training.grad_accum_steps or training.batch_size)')
    raise ConfigError(f'{path}: this config changes the schedule of the run being resumed:\n  '
                      + '\n  '.join(changes) + '\nresume with the config of the run' + advice)


def train_loader_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``loaders.train_loader`` that the config sets (the trainer adds
    the threads, resolution, device, dtype and whether it is distributed)."""
    return {'path': cfg.data.train_dataset, 'batch_size': cfg.training.batch_size,
            'os_cache': bool(cfg.data.in_memory), 'seed': cfg.training.seed,
            'min_crop_scale': cfg.data.min_crop_scale, 'flip_prob': cfg.data.flip_prob,
            'decoder_name': cfg.data.decoder}


def val_loader_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``loaders.val_loader`` that the config sets."""
    return {'path': cfg.data.val_dataset, 'batch_size': cfg.validation.batch_size,
            'res': cfg.validation.resolution, 'decoder_name': cfg.data.decoder}


def lr_used(cfg: SimpleNamespace, world_size: int) -> float:
    """The LR the run uses (its peak): ``lr.lr`` scaled to the global batch of ``world_size``
    processes (``schedules.scaled_lr``). Raises ConfigError when lr.min_lr (not scaled) is above."""
    lr = schedules.scaled_lr(cfg.lr.lr, batch_size=images_per_step(cfg), world_size=world_size,
                             ref_batch_size=cfg.lr.ref_batch_size)
    if cfg.lr.min_lr > lr:
        raise ConfigError(f'lr.min_lr={cfg.lr.min_lr} is above the LR used, {lr:.6g} (lr.lr '
                          f'scaled by lr.ref_batch_size to {world_size} process(es)): lower it')
    return lr


def model_kwargs(cfg: SimpleNamespace) -> dict:
    """``models.build_model``'s (and ``weights.load_model``'s) keyword arguments but the classes."""
    return {'arch': cfg.model.arch, 'use_blurpool': bool(cfg.training.use_blurpool),
            'channels_last': bool(cfg.training.channels_last)}


def saved_model_kwargs(saved: dict) -> dict:
    """:func:`model_kwargs` of a saved run's resolved config (``{'section': {'key': value}}``, as
    params.json and checkpoints hold it): the one place a saved run is turned back into a model."""
    return {'arch': saved['model']['arch'], 'use_blurpool': bool(saved['training']['use_blurpool']),
            'channels_last': bool(saved['training']['channels_last'])}


def saved_eval_kwargs(saved: dict) -> dict:
    """How a saved run validated, for predict: ``{'res': px, 'flip_tta': bool, 'decoder': str}``."""
    val = saved['validation']
    return {'res': val['resolution'], 'flip_tta': bool(val['lr_tta']),
            'decoder': saved.get('data', {}).get('decoder', 'fused')}  # 'fused' before the key


EVAL_KEYS = {'res': 'validation.resolution', 'flip_tta': 'validation.lr_tta',
             'decoder': 'data.decoder'}  # the keys of saved_eval_kwargs' values
MODEL_KEYS = ('model.arch', 'training.use_blurpool', 'training.channels_last')  # saved_model_kwargs



def step_option_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``engine.StepOptions`` but the EMA model and the batch mixer."""
    t = cfg.training
    return {'clip_grad_norm': t.clip_grad_norm, 'ema_every': t.ema_every,
            'grad_accum_steps': t.grad_accum_steps, 'augment': augment.batch_augmenter(
                auto_augment=t.auto_augment, ra_magnitude=t.ra_magnitude,
                random_erase=t.random_erase)}


def check_batches(cfg: SimpleNamespace, loader, world_size: int) -> None:
    """Raise ConfigError when the training ``loader`` (an ffcv ``Loader``) has no full batch."""
    if len(loader) == 0:
        raise ConfigError(f'training.batch_size={cfg.training.batch_size} x {world_size} '
                          f'process(es) is more than the {loader.reader.num_samples} images of '
                          f'{cfg.data.train_dataset}: no full batch to train on; lower '
                          'training.batch_size')


def images_per_step(cfg: SimpleNamespace) -> int:
    """The images of one optimizer step on one process: the batch times the batches accumulated."""
    return cfg.training.batch_size * cfg.training.grad_accum_steps


def optimizer_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``optimizers.make_optimizer`` but the groups and the LR."""
    return {'name': cfg.training.optimizer, 'momentum': cfg.training.momentum,
            'betas': optimizers.parse_betas(cfg.training.betas)}


def param_group_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``models.param_groups`` but the model."""
    return {'weight_decay': cfg.training.weight_decay, 'bn_wd': bool(cfg.training.bn_wd)}


def resolution_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``schedules.resolution_at``, from the ``resolution`` section."""
    return {'min_res': cfg.resolution.min_res, 'max_res': cfg.resolution.max_res,
            'start_ramp': cfg.resolution.start_ramp, 'end_ramp': cfg.resolution.end_ramp}


if __name__ == '__main__':
    if sys.argv[1:] != ['--markdown']:
        sys.exit('usage: python -m imagenet_ffcv.config --markdown > docs/configuration.md')
    print(markdown(), end='')
