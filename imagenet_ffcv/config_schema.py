"""The config schema: every section and key of the trainer's configuration, with its type,
default and meaning (ffcv-imagenet's sections and keys, plus ours). Read by ``config`` (parsing,
``--help``) and rendered as docs/configuration.md (``python -m imagenet_ffcv.config --markdown``).
"""
import difflib

from fastargs import Config, Param, Section
from fastargs.validation import And, Int, OneOf, Or

from . import schedules
from .constants import DECODERS, PRECISIONS
from .errors import ImagenetFfcvError, first_few
from .optimizers import OPTIMIZERS


class ConfigError(ImagenetFfcvError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def flatten(tree: dict, prefix: str = '') -> dict:
    """``{'section': {'key': value}}`` (any depth) -> ``{'section.key': value}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


COMMA_KEYS = ('training.betas', 'lr.step_fractions')  # lists written as text: '0.9,0.999'


def file_values(content, params: dict, source) -> dict:
    """The ``{'section.key': value}`` of a config file's ``content`` (as YAML read it), checked
    against ``params`` (``{'section.key': Param}``). A section left empty (its keys commented
    out) holds nothing; a list for a comma key (:data:`COMMA_KEYS`: ``betas: [0.9, 0.95]``) is
    joined with commas, as the command line writes it; true/false is 1/0 for an on/off key
    (ffcv-imagenet's ``lr_tta: true``). Raises ConfigError naming ``source`` for content that is
    not a mapping, unknown keys, and, each taken without a word by fastargs, a number with a
    fraction for a whole-number key (``epochs: 3.7`` as 3), true/false for another key
    (``epochs: true`` as 1), a key with no value (as its default), and a section given a value
    (``training: 5``)."""
    if not isinstance(content, dict):
        raise ConfigError(f'{source}: expected a mapping of sections, got {type(content).__name__}')
    sections = {key.split('.')[0] for key in params}
    scalars = [f'{name}: {keys!r}' for name, keys in content.items()
               if name in sections and keys is not None and not isinstance(keys, dict)]
    if scalars:  # named as an unknown key 'training' (did you mean training.amp?)
        raise ConfigError(f'{source}: {first_few(scalars)}: a section holds keys '
                          '(training:\n  epochs: 16), not a value')
    flat = flatten({name: keys for name, keys in content.items()
                    if keys is not None or name not in sections})  # an unknown one is named
    unknown = [key for key in flat if key not in params]
    if unknown:
        raise ConfigError(f'{source}: unknown key(s) {", ".join(unknown)}'
                          f'{did_you_mean(unknown, params)}; docs/configuration.md (or the '
                          f'trainer\'s --help) lists every key')
    problems = []
    for key, value in flat.items():
        checker = params[key].checker
        kinds = checker.checkers if isinstance(checker, Or) else [checker]
        if isinstance(value, list) and key in COMMA_KEYS:
            flat[key] = ','.join(map(str, value))
        elif value is None:  # 'epochs:' left blank (or ~): fastargs took the default
            problems.append(f'{key}: no value; give one, or remove the line for the default')
        elif isinstance(value, bool) and not any(isinstance(kind, Switch) for kind in kinds):
            problems.append(f'{key}: got {value!r} (YAML reads yes/no, on/off and true/false '
                            f'so; quote a word), expected {checker.help()}')
        elif (isinstance(value, float) and not value.is_integer()
              and any(isinstance(kind, Int) for kind in kinds)):
            problems.append(f'{key}: got {value!r}, expected a whole number')
    if problems:
        raise ConfigError(f'{source}: ' + '; '.join(problems))
    return flat


class Switch(Int):
    """fastargs' checker of an on/off key: 0 or 1, or the words YAML reads as false/true
    (false/true, no/yes, off/on, any case), so ``--training.bn_wd=true`` means what
    ``bn_wd: true`` does in a file; another number, which fastargs took as on, is refused."""
    WORDS = {'false': 0, 'no': 0, 'off': 0, 'true': 1, 'yes': 1, 'on': 1}

    def check(self, value):
        word = str(value).strip().lower()
        if word in self.WORDS:
            return self.WORDS[word]
        if value not in (0, 1) and word not in ('0', '1'):
            raise ValueError(value)  # 2, 0.5 (file_values names a fraction first), 'maybe'
        return int(value)

    def help(self):
        return '0 or 1'


def _type_text(checker) -> str:
    """A checker's type in words, choices sorted (fastargs keeps them in a set)."""
    if isinstance(checker, OneOf):
        return 'one of ' + ', '.join(f'`{v}`' for v in sorted(map(str, checker.possible_values)))
    if isinstance(checker, (And, Or)):
        parts = [_type_text(c) for c in checker.checkers]
        parts = [p for p in parts if p != 'a string'] if isinstance(checker, And) else parts
        return (' and ' if isinstance(checker, And) else ' or ').join(parts)
    return checker.help()


def did_you_mean(unknown: list, known) -> str:
    """' (did you mean training.epochs?)' for the ``known`` keys closest to the ``unknown`` ones
    (``--training.epoch=3``, or a file's key; a name without its section, ``--weights``, or in
    another section, ``--training.warmup_epochs``, gives the keys of that name), '' when none is
    close."""
    names = [name.lstrip('-').split('=')[0] for name in unknown]
    close = [m for name in names for m in [k for k in known if k.split('.', 1)[-1] ==
                                           name.split('.', 1)[-1]]  # in another section
             or difflib.get_close_matches(name, known, n=1, cutoff=0.8)]
    return f' (did you mean {", ".join(close)}?)' if close else ''


def markdown() -> str:
    """docs/configuration.md: every key of the schema by section, with its type, default and
    meaning, as ``--help`` lists them."""
    config = declared()
    lines = ['# Configuration', '',
             'Every key of the trainer (`imagenet-ffcv-train`, `train_imagenet.py`), by section. Set '
             'them in a YAML file given with `--config FILE.yaml` (repeatable; later files win) or '
             'on the command line as `--section.key=value` (wins over files). An unknown key, a '
             'wrongly typed value or keys that contradict each other are errors naming the key; '
             'a key set where the run does not read it (a momentum with AdamW) is named in a '
             'warning in the run\'s header. '
             'ffcv-imagenet\'s configs load unchanged.', '',
             'Generated from `imagenet_ffcv/config_schema.py` by '
             '`python -m imagenet_ffcv.config --markdown > docs/configuration.md`; '
             '`tests/test_docs.py` fails when this file and the schema differ.']
    section = None
    for path, param in config.entries.items():
        if param.section.ns != section:
            section = param.section.ns
            lines += ['', f'## `{".".join(section)}`: {param.section.desc}', '',
                      '| key | type | default | meaning |', '|---|---|---|---|']
        default = ('required' if param.required else "`''`" if param.default == '' else
                   f'`{param.default}`')
        lines.append(f'| `{".".join(path)}` | {_type_text(param.checker)} | {default} | '
                     f'{param.desc.replace("|", "/")} |')
    return '\n'.join(lines) + '\n'


# Keys that modules outside the config readers name in their advice (weights.py, checkpoint.py).
ARCH_KEY, BLURPOOL_KEY, FORCE_KEY = 'model.arch', 'training.use_blurpool', 'checkpoint.force'
TARGET_KEY, RESET_HEAD_KEY = 'training.target_top1', 'model.reset_head'


def nested_ffcv_imagenet_params(params):
    """The resolved config (``{'section': {'key': value}}``, as our runs save it) of a run of
    ffcv-imagenet, whose params.json holds fastargs' flat keys (``{'model.arch': 'resnet50',
    'training.use_blurpool': 1, ...}``, all keys of this schema): its values over this schema's
    defaults, with ``data.decoder`` 'ffcv' (the only decoder it has). Anything else (our own
    params.json, which is nested) is returned as it is."""
    if not (isinstance(params, dict) and params
            and all(isinstance(k, str) and '.' in k for k in params)):
        return params
    nested = {}
    for key, value in {**defaults(), 'data.decoder': 'ffcv', **params}.items():
        section, _, name = key.partition('.')
        nested.setdefault(section, {})[name] = value
    return nested


def defaults() -> dict:
    """``{'section.key': default}`` for every key of the schema (None where a key is required)."""
    return {'.'.join(path): param.default for path, param in declared().entries.items()}


def declared() -> Config:
    """A fresh ``fastargs.Config`` with every section and key declared (:func:`declare`)."""
    config = Config()
    declare(config)
    return config


def declare(config) -> None:
    """Declare every section and key on ``config`` (a fresh ``fastargs.Config``)."""
    def section(name, desc, **params):
        Section(name, desc, config_descriptor=config).params(**params)

    _data_and_model_sections(section)
    _output_sections(section)
    _training_sections(section)
    _checkpoint_sections(section)


def _data_and_model_sections(section) -> None:
    section('data', 'datasets and loading',
            train_dataset=Param(str, 'training .beton file (required, but with '
                                     'training.eval_only=1)', default=''),
            val_dataset=Param(str, 'validation .beton file (required)', default=''),
            num_workers=Param(Or(Int(), OneOf(['auto'])),
                              "loader threads per process; 'auto': the cores this process may "
                              "use (its affinity, SLURM's --cpus-per-task, a container's CPU "
                              'quota), divided by the processes of this node that may use them too '
                              '(all of them unless each is bound to cores of its own), less one '
                              'for the training loop itself (at least 1)', default='auto'),
            in_memory=Param(Switch(), "ffcv's os_cache (ffcv-imagenet's name): 1: memory-map "
                                      'the file and share the OS page cache (one copy for all the '
                                      'processes, given back when memory runs short); 0: '
                                      "ffcv's own process cache with prefetch, which in a random "
                                      'order holds about the whole file in each process (refused '
                                      'when that is more than the memory available)', default=1),
            min_crop_scale=Param(float, 'random-resized crop: smallest crop area as a fraction '
                                        'of the image (torchvision: 0.08)', default=0.08),
            flip_prob=Param(float, 'probability of the left-right flip of training images',
                            default=0.5),
            decoder=Param(OneOf(DECODERS),
                          "image decoder: 'fused' (ours: region decode + bilinear), 'fused_aa' "
                          "(ours, antialiased for every shrink) or 'ffcv' (ffcv's stock decoders, "
                          'INTER_AREA resize, as ffcv-imagenet)', default='fused'),
            gpu=Param(int, 'ignored (kept so ffcv-imagenet configs load): the device is '
                           'cuda:LOCAL_RANK', default=0))
    section('model', 'network',
            arch=Param(str, "torchvision classification model name, or 'timm:<name>' (a timm "
                            'model; needs the optional timm package)', default='resnet50'),
            pretrained=Param(Switch(), 'must be 0: weights are never fetched from the network '
                                       '(start from a file with model.weights)', default=0),
            weights=Param(str, 'training: start from these weights (fine-tuning): a run folder '
                               '(its final weights, else its checkpoint), a checkpoint.pt, '
                               'final_weights.pt/.safetensors or a torchvision state dict file; '
                               "the checkpoint wins on --resume. With training.eval_only=1: the "
                               "weights to evaluate. '': random initialisation", default=''),
            reset_head=Param(Switch(), 'with model.weights: 1: the classifier (last Linear '
                                       'layer) starts newly initialised; 0: loaded, unless the '
                                       'file has none, its class count differs or its saved class '
                                       'list names other wnids (then new, with a message)',
                             default=0))
    section('resolution', 'progressive resizing of training crops (pixels, epochs)',
            min_res=Param(int, 'side of training crops until start_ramp (px)', default=160),
            max_res=Param(int, 'side of training crops from end_ramp on (px)', default=192),
            end_ramp=Param(int, 'epoch at which max_res is reached', default=0),
            start_ramp=Param(int, 'last epoch at min_res', default=0))
    section('lr', 'learning-rate schedule',
            lr=Param(float, 'peak LR (cyclic) or initial LR (step), for ref_batch_size images '
                            'per step when ref_batch_size is set', default=0.5),
            lr_schedule_type=Param(OneOf(list(schedules.LR_SCHEDULES)),
                                   'the LR schedule by name: ' + ', '.join(schedules.LR_SCHEDULES)
                                   + ' (imagenet_ffcv/schedules.py)', default='cyclic'),
            min_lr=Param(float, 'cosine: the LR at the end of training (not scaled with the '
                                'batch; at most the LR used)', default=0.0),
            lr_peak_epoch=Param(float, 'cyclic: epoch at which the LR peaks', default=2),
            step_ratio=Param(float, 'step: LR multiplier at each step', default=0.1),
            step_length=Param(int, 'step: epochs between steps', default=30),
            step_fractions=Param(str, "step: steps at these fractions of training instead of "
                                      "every step_length epochs, e.g. '1/3,2/3'", default=''),
            poly_power=Param(float, 'poly: exponent of (1 - t / epochs)', default=1.0),
            warmup_epochs=Param(float, 'linear warm-up from 0 over this many epochs (any '
                                       'schedule; cyclic: at most lr_peak_epoch, its own ramp '
                                       'being multiplied by it); 0: none', default=0.0),
            ref_batch_size=Param(int, 'global batch (images per step) lr was tuned for; the LR '
                                      'used is lr * batch_size * world_size * grad_accum_steps / '
                                      'ref_batch_size. '
                                      '0: use lr as is', default=0))


def _output_sections(section) -> None:
    section('logging', 'outputs',
            folder=Param(str, 'runs are written to FOLDER/<run id>/ (required, but with '
                              'training.eval_only=1)', default=''),
            run_name=Param(str, "the run's name (letters, digits, '.', '_', '-'): its folder is "
                                'FOLDER/<run_name>-<run id>/ and --resume auto continues only a '
                                "run of this name; give each job sharing FOLDER its own; '': "
                                'unnamed (--resume auto continues unnamed runs only)', default=''),
            log_level=Param(int, 'validate every epoch (ffcv-imagenet\'s name): 1 (or 2, '
                                 'ffcv-imagenet\'s loss in its progress bar, which ours always '
                                 'shows): after every epoch; 0: only after the last one (and '
                                 'after every epoch while training.target_top1 is set)',
                            default=1),
            tensorboard=Param(Switch(), '1: TensorBoard event files in RUN_DIR/tensorboard',
                              default=0),
            wandb_project=Param(str, 'Weights & Biases project to log to (needs the optional '
                                     "wandb package); '': off", default=''),
            every_iters=Param(int, 'TensorBoard/W&B: train loss, LR and img/s every this many '
                                   'iterations', default=50))
    section('validation', 'evaluation',
            batch_size=Param(int, 'validation batch per process', default=512),
            resolution=Param(int, 'side of the centre crop (px)', default=256),
            lr_tta=Param(Switch(), 'left-right flip test-time augmentation (ffcv-imagenet\'s '
                                   'name): 1: average the logits of the image and of its flip',
                         default=1),
            ten_crop=Param(Switch(), '1: also report 10-crop accuracy after the last epoch: views '
                                     'of resolution px (corners + centre of the central square at '
                                     '256/224 of that, and their flips)', default=0),
            results_file=Param(str, 'eval-only: also write the results (the figures of its '
                                    'table, the weights and the .beton) to this .json file, as '
                                    "a training run writes RUN_DIR/results.json; '': print them "
                                    'only', default=''))


def _training_sections(section) -> None:
    section('training', 'optimisation',
            eval_only=Param(Switch(), '1: only evaluate model.weights on the val set', default=0),
            batch_size=Param(int, 'training batch per process (images)', default=512),
            grad_accum_steps=Param(int, 'gradient accumulation: one optimizer step per this many '
                                        'batches (their summed gradients), e.g. an 8-GPU global '
                                        'batch on 2 GPUs with 4; the LR scaling counts '
                                        'batch_size x world_size x grad_accum_steps', default=1),
            optimizer=Param(And(str, OneOf(list(OPTIMIZERS))),
                            'sgd (with momentum), adamw, or lamb (needs the optional timm package)',
                            default='sgd'),
            amp=Param(OneOf(PRECISIONS),
                      'mixed precision on CUDA: auto (bf16 where the GPU has it, else fp16), bf16, '
                      'fp16 (with loss scaling) or off (fp32); CPU: auto means off',
                      default='auto'),
            momentum=Param(float, 'SGD momentum', default=0.9),
            betas=Param(str, "adamw/lamb: the betas 'beta1,beta2'", default='0.9,0.999'),
            clip_grad_norm=Param(float, 'clip the global gradient norm to this value; 0: off',
                                 default=0.0),
            weight_decay=Param(float, 'L2 weight decay', default=5e-5),
            bn_wd=Param(Switch(), '0: no weight decay on normalisation layers nor biases',
                        default=0),
            epochs=Param(int, 'number of epochs', default=16),
            label_smoothing=Param(float, 'label smoothing (Szegedy et al. 2016)', default=0.1),
            use_blurpool=Param(Switch(), '1: BlurPool before strided convs (Zhang 2019)',
                               default=1),
            channels_last=Param(Switch(), '1: NHWC memory format for the model', default=1),
            distributed=Param(Switch(), 'ignored (kept for ffcv-imagenet configs): launch with '
                                   'torchrun for several processes', default=0),
            seed=Param(int, 'seed of weights init, data order, crops and flips; rank r draws its '
                               'MixUp/CutMix and augmentation randomness from seed + r', default=0),
            target_top1=Param(float, 'stop at the first epoch whose validation top-1 reaches this '
                                     'fraction (e.g. 0.6); 0: train all epochs', default=0.0),
            ema_decay=Param(float, 'EMA of the weights (and BN buffers): the weight of the old '
                                   'average at each update, e.g. 0.9998; 0: off', default=0.0),
            ema_every=Param(int, 'update the EMA every this many optimizer steps (iterations '
                                 'divided by grad_accum_steps), counted over the run, across '
                                 'epochs', default=1),
            mixup_alpha=Param(float, 'MixUp Beta(alpha, alpha) (Zhang et al. 2018); 0: off',
                              default=0.0),
            cutmix_alpha=Param(float, 'CutMix Beta(alpha, alpha) (Yun et al. 2019); 0: off; with '
                                      'mixup_alpha too, one of the two per batch', default=0.0),
            auto_augment=Param(str, "per-image auto-augmentation (torchvision v2): 'ra' "
                                    "(RandAugment, Cubuk et al. 2020), 'ta_wide' "
                                    "(TrivialAugmentWide, Muller and Hutter 2021); '': off",
                               default=''),
            ra_magnitude=Param(int, 'magnitude of the RandAugment ops, 0-30', default=9),
            random_erase=Param(float, 'probability of Random Erasing per image (Zhong et al. '
                                      '2020); 0: off', default=0.0),
            sync_bn=Param(Switch(), '1: torch.nn.SyncBatchNorm: BatchNorm statistics over the '
                                    'batches of all processes, for small batches per GPU (CUDA '
                                    'only)',
                          default=0),
            compile=Param(Switch(), '1: torch.compile the model (recompiles once per resolution)',
                          default=0))


def _checkpoint_sections(section) -> None:
    section('checkpoint', 'checkpoints (RUN_DIR/checkpoint.pt, rewritten atomically) and resume',
            resume=Param(str, "'auto': continue the latest run of logging.run_name under "
                              'logging.folder (start a new one if there is none; end at once if '
                              "it has finished); a checkpoint.pt path, or a run folder: continue "
                              "that run; '': a new run", default=''),
            every_iters=Param(int, 'also write a checkpoint every this many iterations within an '
                                   'epoch; 0: only at the end of each epoch', default=0),
            force=Param(Switch(), '1: resume even if the config changes the schedule (epochs, '
                                  'LR, resolution, batch, world size, BlurPool, seed); another '
                                  'optimizer, arch, class count or bn_wd is refused even so',
                        default=0),
            keep_best=Param(Switch(), '1: RUN_DIR/best_weights.pt holds the weights of the epoch '
                                      'with the best validation top-1 so far', default=0),
            keep_last=Param(int, 'also keep the checkpoints of the last N epochs as '
                                 'RUN_DIR/checkpoint_epoch_<epochs done>.pt (older ones deleted '
                                 'once the new one is complete); 0: off', default=0))
    section('dist', 'kept so ffcv-imagenet configs load; torchrun sets the real values',
            world_size=Param(int, 'number of GPUs the config was written for', default=1),
            address=Param(str, 'ignored: use torchrun --rdzv-endpoint', default='localhost'),
            port=Param(str, 'ignored: use torchrun --rdzv-endpoint', default='12355'),
            timeout_s=Param(int, 'seconds a collective waits for the other ranks before this '
                                 'rank fails (a dead or hung rank)', default=300))
