"""The configuration of ``train_imagenet.py``: ffcv-imagenet's sections and keys, read with fastargs.

Sources, later ones winning: defaults < ``--config FILE.yaml`` (repeatable) < ``--section.key=value``.
A key that is not in the schema, in a file or on the command line, is an error naming it (fastargs
alone ignores it silently), and so is a value of the wrong type.

Everything is declared on a fresh ``fastargs.Config`` per call: nothing global is touched, so a test
can build several configs in one process.
"""
import argparse
import os
from types import SimpleNamespace

import yaml
from fastargs import Config, Param, Section
from fastargs.validation import And, OneOf

from . import schedules
from .optimizers import OPTIMIZERS


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _schema(config: Config) -> None:
    """Declare every section and key on ``config``."""
    def section(name, desc, **params):
        Section(name, desc, config_descriptor=config).params(**params)

    _data_and_model_sections(section)
    _training_sections(section)


def _data_and_model_sections(section) -> None:
    section('data', 'datasets and loading',
            train_dataset=Param(str, 'training .beton file', required=True),
            val_dataset=Param(str, 'validation .beton file', required=True),
            num_workers=Param(int, 'loader threads per process', default=os.cpu_count()),
            in_memory=Param(int, "ffcv's os_cache (ffcv-imagenet's name): 1: memory-map the "
                                 'file and share the OS page cache (data fits in RAM); 0: '
                                 "ffcv's own process cache with prefetch", default=1),
            min_crop_scale=Param(float, 'random-resized crop: smallest crop area as a fraction '
                                        'of the image (torchvision: 0.08)', default=0.08),
            flip_prob=Param(float, 'probability of the left-right flip of training images',
                            default=0.5),
            decoder=Param(OneOf(['fused', 'fused_aa', 'ffcv']),
                          "image decoder: 'fused' (ours: region decode + bilinear), 'fused_aa' "
                          "(ours, antialiased for every shrink) or 'ffcv' (ffcv's stock decoders, "
                          'INTER_AREA resize, as ffcv-imagenet)', default='fused'),
            gpu=Param(int, 'ignored (kept so ffcv-imagenet configs load): the device is '
                           'cuda:LOCAL_RANK', default=0))
    section('model', 'network',
            arch=Param(str, "torchvision classification model name, or 'timm:<name>' (a timm "
                            'model; needs the optional timm package)', default='resnet50'),
            pretrained=Param(int, 'must be 0: training starts from random weights', default=0),
            weights=Param(str, 'with training.eval_only=1: the checkpoint.pt or final_weights.pt '
                               'to evaluate', default=''))
    section('resolution', 'progressive resizing of training crops (pixels, epochs)',
            min_res=Param(int, 'side of training crops until start_ramp (px)', default=160),
            max_res=Param(int, 'side of training crops from end_ramp on (px)', default=192),
            end_ramp=Param(int, 'epoch at which max_res is reached', default=0),
            start_ramp=Param(int, 'last epoch at min_res', default=0))
    section('lr', 'learning-rate schedule',
            lr=Param(float, 'peak LR (cyclic) or initial LR (step), for ref_batch_size images '
                            'per step when ref_batch_size is set', default=0.5),
            lr_schedule_type=Param(OneOf(list(schedules.LR_SCHEDULES)),
                                   'cyclic (triangular), step, poly or cosine',
                                   default='cyclic'),
            min_lr=Param(float, 'cosine: the LR at the end of training (not scaled with the '
                                'batch)', default=0.0),
            lr_peak_epoch=Param(float, 'cyclic: epoch at which the LR peaks', default=2),
            step_ratio=Param(float, 'step: LR multiplier at each step', default=0.1),
            step_length=Param(int, 'step: epochs between steps', default=30),
            step_fractions=Param(str, "step: steps at these fractions of training instead of "
                                      "every step_length epochs, e.g. '1/3,2/3'", default=''),
            poly_power=Param(float, 'poly: exponent of (1 - t / epochs)', default=1.0),
            warmup_epochs=Param(float, 'linear warm-up from 0 over this many epochs (any '
                                       'schedule); 0: none', default=0.0),
            ref_batch_size=Param(int, 'global batch (images per step) lr was tuned for; the LR '
                                      'used is lr * batch_size * world_size / ref_batch_size. '
                                      '0: use lr as is', default=0))


def _training_sections(section) -> None:
    section('logging', 'outputs',
            folder=Param(str, 'runs are written to FOLDER/<run id>/', required=True),
            log_level=Param(int, 'validate every epoch (ffcv-imagenet\'s name): 1: after every '
                                 'epoch; 0: only after the last one', default=1),
            tensorboard=Param(int, '1: TensorBoard event files in RUN_DIR/tensorboard', default=0),
            wandb_project=Param(str, 'Weights & Biases project to log to (needs the optional '
                                     "wandb package); '': off", default=''),
            every_iters=Param(int, 'TensorBoard/W&B: train loss, LR and img/s every this many '
                                   'iterations', default=50))
    section('validation', 'evaluation',
            batch_size=Param(int, 'validation batch per process', default=512),
            resolution=Param(int, 'side of the centre crop (px)', default=256),
            lr_tta=Param(int, 'left-right flip test-time augmentation (ffcv-imagenet\'s name): '
                              '1: average the logits of the image and of its flip', default=1),
            ten_crop=Param(int, '1: also report 10-crop accuracy (corners + centre of the central '
                                'square, and their flips) after the last epoch', default=0))
    section('training', 'optimisation',
            eval_only=Param(int, '1: only evaluate model.weights on the val set', default=0),
            batch_size=Param(int, 'training batch per process (images)', default=512),
            optimizer=Param(And(str, OneOf(list(OPTIMIZERS))),
                            'sgd (with momentum), adamw, or lamb (needs the optional timm package)',
                            default='sgd'),
            amp=Param(OneOf(['auto', 'bf16', 'fp16', 'off']),
                      'mixed precision on CUDA: auto (bf16 where the GPU has it, else fp16), bf16, '
                      'fp16 (with loss scaling) or off (fp32); CPU: auto means off',
                      default='auto'),
            momentum=Param(float, 'SGD momentum', default=0.9),
            betas=Param(str, "adamw/lamb: the betas 'beta1,beta2'", default='0.9,0.999'),
            clip_grad_norm=Param(float, 'clip the global gradient norm to this value; 0: off',
                                 default=0.0),
            weight_decay=Param(float, 'L2 weight decay', default=5e-5),
            bn_wd=Param(int, '0: no weight decay on normalisation layers nor biases', default=0),
            epochs=Param(int, 'number of epochs', default=16),
            label_smoothing=Param(float, 'label smoothing (Szegedy et al. 2016)', default=0.1),
            use_blurpool=Param(int, '1: BlurPool before strided convs (Zhang 2019)', default=1),
            channels_last=Param(int, '1: NHWC memory format for the model', default=1),
            distributed=Param(int, 'ignored (kept for ffcv-imagenet configs): launch with '
                                   'torchrun for several processes', default=0),
            seed=Param(int, 'seed of weights init and data order', default=0),
            target_top1=Param(float, 'stop at the first epoch whose validation top-1 reaches this '
                                     'fraction (e.g. 0.6); 0: train all epochs', default=0.0),
            ema_decay=Param(float, 'EMA of the weights (and BN buffers): the weight of the old '
                                   'average at each update, e.g. 0.9998; 0: off', default=0.0),
            ema_every=Param(int, 'update the EMA every this many iterations', default=1),
            mixup_alpha=Param(float, 'MixUp Beta(alpha, alpha) (Zhang et al. 2018); 0: off',
                              default=0.0),
            cutmix_alpha=Param(float, 'CutMix Beta(alpha, alpha) (Yun et al. 2019); 0: off; with '
                                      'mixup_alpha too, one of the two per batch', default=0.0),
            compile=Param(int, '1: torch.compile the model (recompiles once per resolution)',
                          default=0))
    section('checkpoint', 'checkpoints (RUN_DIR/checkpoint.pt, rewritten atomically) and resume',
            resume=Param(str, "'auto': continue the latest unfinished run under logging.folder "
                              "(start a new one if there is none); a checkpoint.pt path: "
                              "continue that run; '': a new run", default=''),
            every_iters=Param(int, 'also write a checkpoint every this many iterations within an '
                                   'epoch; 0: only at the end of each epoch', default=0),
            force=Param(int, '1: resume even if the config changes the schedule (epochs, LR, '
                             'resolution, batch, model, seed)', default=0),
            keep_best=Param(int, '1: RUN_DIR/best_weights.pt holds the weights of the epoch with '
                                 'the best validation top-1 so far', default=0))
    section('dist', 'kept so ffcv-imagenet configs load; torchrun sets the real values',
            world_size=Param(int, 'number of GPUs the config was written for', default=1),
            address=Param(str, 'ignored: use torchrun --rdzv-endpoint', default='localhost'),
            port=Param(str, 'ignored: use torchrun --rdzv-endpoint', default='12355'),
            timeout_s=Param(int, 'seconds a collective waits for the other ranks before this '
                                 'rank fails (a dead or hung rank)', default=300))


def flatten(tree: dict, prefix: str = '') -> dict:
    """``{'section': {'key': value}}`` (any depth) -> ``{'section.key': value}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _nest(flat: dict) -> dict:
    tree = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


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


def load_config(argv: list) -> SimpleNamespace:
    """Parse ``argv`` (e.g. ``['--config', 'rn50_configs/rn50_16_epochs.yaml',
    '--training.epochs=2']``) into ``cfg.section.key`` values, checked against the schema.

    Raises ConfigError naming each unknown key, missing required key or badly typed value, and
    FileNotFoundError for a missing config file.
    """
    config = Config()
    _schema(config)
    known = {'.'.join(path): param for path, param in config.entries.items()}

    parser = argparse.ArgumentParser(prog='train_imagenet.py', allow_abbrev=False,
                                     usage='%(prog)s [--config FILE.yaml ...] '
                                           '[--section.key=VALUE ...] [--resume auto|PATH]',
                                     description='Train an ImageNet classifier from .beton files.')
    parser.add_argument('--config', '--config-file', '-C', action='append', default=[],
                        help='YAML or JSON config file (repeatable; later ones win)')
    parser.add_argument('--resume', dest='checkpoint.resume', default=None,
                        help="shorthand for --checkpoint.resume: 'auto' or a checkpoint.pt path")
    _add_key_arguments(parser, config)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ConfigError(f'unknown argument(s) {" ".join(unknown)}; valid keys: {", ".join(known)}')

    for fname in args.config:
        with open(fname) as f:
            content = yaml.safe_load(f) or {}
        if not isinstance(content, dict):
            raise ConfigError(f'{fname}: expected a mapping of sections, got {type(content).__name__}')
        bad = [key for key in flatten(content) if key not in known]
        if bad:
            raise ConfigError(f'{fname}: unknown key(s) {", ".join(bad)}; valid keys: '
                              f'{", ".join(known)}')
        config.collect(content)
    overrides = {k: v for k, v in vars(args).items() if k != 'config' and v is not None}
    config.collect(_nest({tuple(k.split('.')): v for k, v in overrides.items()}))

    errors = config.validate(mode='errordict')
    if errors:
        lines = []
        for path, _ in errors.items():
            name = '.'.join(path)
            got = config.content.get(path)
            lines.append(f'{name}: required, not set' if got is None else
                         f'{name}: got {got!r}, expected {config.entries[path].checker.help()}')
        raise ConfigError('invalid configuration:\n  ' + '\n  '.join(lines))

    values = {path: config[path] for path in config.entries}
    cfg = SimpleNamespace(**{section: SimpleNamespace(**keys)
                             for section, keys in _nest(values).items()})
    _check_consistency(cfg)
    return cfg


def _check_consistency(cfg) -> None:
    """Rules between keys, checked before any work starts; raises ConfigError naming the keys."""
    problems = []
    for key in ('training.epochs', 'training.batch_size', 'validation.batch_size',
                'validation.resolution', 'resolution.min_res', 'lr.step_length'):
        section, name = key.split('.')
        if getattr(getattr(cfg, section), name) < 1:
            problems.append(f'{key} must be >= 1')
    if cfg.resolution.min_res > cfg.resolution.max_res:
        problems.append(f'resolution.min_res={cfg.resolution.min_res} is above '
                        f'resolution.max_res={cfg.resolution.max_res}')
    if cfg.resolution.start_ramp > cfg.resolution.end_ramp:
        problems.append(f'resolution.start_ramp={cfg.resolution.start_ramp} is after '
                        f'resolution.end_ramp={cfg.resolution.end_ramp}')
    if cfg.lr.lr_schedule_type == 'cyclic' and not 0 <= cfg.lr.lr_peak_epoch <= cfg.training.epochs:
        problems.append(f'lr.lr_peak_epoch={cfg.lr.lr_peak_epoch} must lie in '
                        f'[0, training.epochs={cfg.training.epochs}]')
    try:
        schedules.parse_fractions(cfg.lr.step_fractions)
    except ValueError as e:
        problems.append(f'lr.step_fractions={cfg.lr.step_fractions!r}: {e}')
    if cfg.lr.warmup_epochs < 0 or cfg.lr.warmup_epochs > cfg.training.epochs:
        problems.append(f'lr.warmup_epochs={cfg.lr.warmup_epochs} must lie in '
                        f'[0, training.epochs={cfg.training.epochs}]')
    if not 0 <= cfg.training.target_top1 <= 1:
        problems.append(f'training.target_top1={cfg.training.target_top1} must be a fraction in '
                        f'[0, 1] (0: off), e.g. 0.6 for 60 %')
    if not 0 < cfg.data.min_crop_scale <= 1:
        problems.append(f'data.min_crop_scale={cfg.data.min_crop_scale} must lie in (0, 1]')
    if not 0 <= cfg.data.flip_prob <= 1:
        problems.append(f'data.flip_prob={cfg.data.flip_prob} must lie in [0, 1]')
    if cfg.data.num_workers < 1:
        problems.append(f'data.num_workers={cfg.data.num_workers} must be >= 1 (loader threads '
                        'per process)')
    if cfg.checkpoint.every_iters < 0:
        problems.append(f'checkpoint.every_iters={cfg.checkpoint.every_iters} must be >= 0 '
                        '(0: only at the end of each epoch)')
    if cfg.dist.timeout_s < 1:
        problems.append(f'dist.timeout_s={cfg.dist.timeout_s} must be >= 1 (seconds)')
    if cfg.training.eval_only and not cfg.model.weights:
        problems.append('training.eval_only=1 needs model.weights=PATH (a checkpoint.pt or '
                        'final_weights.pt)')
    if cfg.model.weights and not cfg.training.eval_only:
        problems.append(f'model.weights={cfg.model.weights} is only read with '
                        'training.eval_only=1; to continue a run use --resume')
    if cfg.training.eval_only and cfg.checkpoint.resume:
        problems.append('checkpoint.resume and training.eval_only=1 exclude each other')
    problems += _option_problems(cfg)
    if cfg.lr.ref_batch_size < 0:
        problems.append(f'lr.ref_batch_size={cfg.lr.ref_batch_size} must be >= 0 (0: no scaling)')
    if problems:
        raise ConfigError('invalid configuration:\n  ' + '\n  '.join(problems))


def _option_problems(cfg) -> list:
    """The rules of the optional training features (EMA, MixUp/CutMix, cosine, AdamW, clipping)."""
    problems = []
    t = cfg.training
    if not 0 <= t.ema_decay < 1:
        problems.append(f'training.ema_decay={t.ema_decay} must lie in [0, 1) (0: off), e.g. '
                        '0.9998')
    if t.ema_every < 1:
        problems.append(f'training.ema_every={t.ema_every} must be >= 1 (iterations)')
    for key in ('mixup_alpha', 'cutmix_alpha', 'clip_grad_norm'):
        if getattr(t, key) < 0:
            problems.append(f'training.{key}={getattr(t, key)} must be >= 0 (0: off)')
    try:
        parse_betas(t.betas)
    except ValueError as e:
        problems.append(f'training.betas={t.betas!r}: {e}')
    if not 0 <= cfg.lr.min_lr <= cfg.lr.lr:
        problems.append(f'lr.min_lr={cfg.lr.min_lr} must lie in [0, lr.lr={cfg.lr.lr}]')
    if cfg.lr.min_lr and cfg.lr.lr_schedule_type != 'cosine':
        problems.append(f'lr.min_lr={cfg.lr.min_lr} is only used by lr.lr_schedule_type=cosine')
    if cfg.logging.every_iters < 1:
        problems.append(f'logging.every_iters={cfg.logging.every_iters} must be >= 1')
    return problems


def parse_betas(text: str) -> tuple:
    """``'0.9,0.999'`` -> ``(0.9, 0.999)``, each in [0, 1). Raises ValueError saying what is
    expected."""
    try:
        betas = tuple(float(part) for part in text.split(','))
    except ValueError:
        raise ValueError("expected two numbers 'beta1,beta2', e.g. '0.9,0.999'") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError("expected two numbers in [0, 1) 'beta1,beta2', e.g. '0.9,0.999'")
    return betas


def to_dict(cfg: SimpleNamespace) -> dict:
    """``{'section': {'key': value}}``, for params.json."""
    return {section: dict(vars(keys)) for section, keys in vars(cfg).items()}


# Adapters from the config to the components (as timm's ``scheduler_kwargs``): the trainer never
# lists a schedule's arguments, and the schedules never read config keys.

def lr_schedule_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``schedules.lr_at`` but ``lr`` (scaled by the trainer), from the
    ``lr`` and ``training`` sections."""
    return {'schedule': cfg.lr.lr_schedule_type, 'epochs': cfg.training.epochs,
            'peak_epoch': cfg.lr.lr_peak_epoch, 'step_ratio': cfg.lr.step_ratio,
            'step_length': cfg.lr.step_length,
            'step_fractions': schedules.parse_fractions(cfg.lr.step_fractions),
            'poly_power': cfg.lr.poly_power, 'warmup_epochs': cfg.lr.warmup_epochs,
            'min_lr': cfg.lr.min_lr}


def resolution_kwargs(cfg: SimpleNamespace) -> dict:
    """The keyword arguments of ``schedules.resolution_at``, from the ``resolution`` section."""
    return {'min_res': cfg.resolution.min_res, 'max_res': cfg.resolution.max_res,
            'start_ramp': cfg.resolution.start_ramp, 'end_ramp': cfg.resolution.end_ramp}
