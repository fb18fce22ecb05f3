"""Validation as the trainer does it (centre crop, flip TTA, 10-crop; after an epoch: the best
top-1 and the target), and eval-only (``training.eval_only=1``): the top-1/top-5 of saved weights
on a val .beton."""
import json
import time
from functools import partial
from pathlib import Path

import torch

from . import betons, config, distributed, engine, loaders, metrics, models, weights
from .config_schema import ARCH_KEY, BLURPOOL_KEY
from .constants import DEFAULT_CROP_RATIO
from .errors import InputError
from .files import check_writable_file, write_text_atomic
from .holdout import holdout_record
from .precision import resolve_precision
from .run_dir import RunDir


def make_val_loader(cfg, dist, precision, threads: int = None, **overrides):
    """This rank's part of the val set at ``validation.resolution`` (centre crop), read by
    ``threads`` loader threads (None: ``distributed.loader_threads``, a collective for 'auto');
    ``overrides``: other ``loaders.val_loader`` arguments (10-crop: ``crop_ratio=1.0``, whole
    central squares, and their side ``res`` in px)."""
    threads = threads or distributed.loader_threads(cfg.data.num_workers, dist)
    return loaders.val_loader(**{**config.val_loader_kwargs(cfg), **overrides},
                              num_workers=threads,
                              device=dist.device, rank=dist.rank, world_size=dist.world_size,
                              dtype=precision.input_dtype)


def validate(cfg, model, loader, precision, progress: str = '', stop_requested=None) -> dict:
    """Centre-crop top-1/top-5, loss and error rates of ``model`` on the val set (all ranks), with
    flip TTA when ``validation.lr_tta`` (ffcv-imagenet's name) is set; ``progress``: the label of
    a progress bar ('': none); ``{'stopped': True}`` when ``stop_requested`` ended it
    (``engine.evaluate``)."""
    val = engine.evaluate(
        model=model, loader=loader, amp_dtype=precision.amp_dtype,
        flip_tta=bool(cfg.validation.lr_tta), corrupt_record=loader.corrupt_record,
        progress=progress, stop_requested=stop_requested)
    if val.get('stopped'):
        return val
    val = metrics.with_error_rates(val)
    val['val_count'] = val.pop('count')
    return val


def validate_with_ema(cfg, model, ema, loader, precision, show_progress: bool = True,
                      stop_requested=None) -> dict:
    """:func:`validate` of ``model``, and of ``ema`` (an ``AveragedModel``; keys suffixed
    ``_ema``) when it is not None; ``{'stopped': True}`` when ``stop_requested`` ended either."""
    val = validate(cfg, model, loader, precision, progress='val' if show_progress else '',
                   stop_requested=stop_requested)
    if ema is not None and not val.get('stopped'):
        ema_val = validate(cfg, ema.module, loader, precision,
                           progress='val (EMA)' if show_progress else '',
                           stop_requested=stop_requested)
        if ema_val.get('stopped'):
            return ema_val
        val.update({f'{k}_ema': v for k, v in ema_val.items() if k != 'val_count'})
    return val


def ten_crop_eval(cfg, dist, model, precision, stop_requested=None) -> dict:
    """10-crop top-1/top-5 (and error rates) of ``model``, keys suffixed ``_10crop``: views of
    ``validation.resolution`` px (the side of the centre-crop validation's images), cut from whole
    central squares of 256/224 times that side (``engine.evaluate``); ``{'stopped': True}`` when
    ``stop_requested`` ended it."""
    square = round(cfg.validation.resolution / DEFAULT_CROP_RATIO)
    loader = make_val_loader(cfg, dist, precision, crop_ratio=1.0, res=square)
    result = engine.evaluate(
        model=model, loader=loader, amp_dtype=precision.amp_dtype, ten_crop=True,
        corrupt_record=loader.corrupt_record, progress='10-crop' if dist.is_primary else '',
        stop_requested=stop_requested)
    if result.get('stopped'):
        return result
    return {f'{k}_10crop': v for k, v in metrics.with_error_rates(result).items() if k != 'count'}


def _validation_values(evaluated: dict) -> dict:
    """``evaluated`` (``config.saved_eval_kwargs``' form: ``{'res': 32, 'flip_tta': True,
    'decoder': 'fused'}``) as config values: ``{'validation.resolution': 32, 'validation.lr_tta': 1,
    'data.decoder': 'fused'}``."""
    return {config.EVAL_KEYS[name]: int(value) if isinstance(value, bool) else value
            for name, value in evaluated.items()}


def validating_as(cfg, evaluated: dict, keep=frozenset()) -> tuple:
    """``(cfg', taken)``: a copy of ``cfg`` that validates as ``evaluated`` says (a saved run's
    ``config.saved_eval_kwargs``, or ``weights.FOREIGN_WEIGHTS_EVAL``): its resolution, flip TTA
    and decoder (``config.EVAL_KEYS``), but for the keys in ``keep`` (the command line's);
    ``taken``: ``['validation.resolution=64', ...]``, the values that differ from ``cfg``'s."""
    copy, taken = config.from_dict(config.to_dict(cfg)), []
    for key, value in _validation_values(evaluated).items():
        section_name, attribute = key.split('.')
        section = getattr(copy, section_name)
        if key not in keep and getattr(section, attribute) != value:
            setattr(section, attribute, value)
            taken.append(f'{key}={value}')
    return copy, taken


def validated_otherwise(cfg, saved_config: dict) -> str:
    """How the run whose resolved config is ``saved_config`` validated where ``cfg`` validates
    otherwise (``validation.resolution=32 ...``: its resolution, flip TTA and decoder), '' when
    they agree."""
    run, now = (_validation_values(config.saved_eval_kwargs(c))
                for c in (saved_config, config.to_dict(cfg)))
    return ' '.join(f'{key}={value}' for key, value in run.items() if now[key] != value)


def _save_best_weights(run) -> None:
    """Rank 0: the model's weights as the run's best (``checkpoint.keep_best``)."""
    run.run_dir.check_lock()
    weights.save_final_weights(models.unwrapped_state_dict(run.model_without_ddp),
                               run.run_dir.best_weights, config=run.resolved,
                               classes=run.classes)


def _log_pending(run, epoch: int, val: dict) -> None:
    """Rank 0: the validation of ``epoch`` done on resume (:func:`validate_pending`) added to its
    log.jsonl record, the plot, the live logs and the console."""
    run.run_dir.amend_log(epoch, val)
    metrics.plot_log(run.run_dir.log, run.run_dir.plot)
    # W&B holds the stopped process's row at the epoch's last step, and takes no step twice
    run.live_log.epoch_scalars(epoch, val, step=run.global_step(epoch + 1, 0) + 1)
    print(f'epoch {epoch}: top-1 {val["top_1"]:.4f}' + (
        f' (EMA {val["top_1_ema"]:.4f})' if 'top_1_ema' in val else '')
        + ' (its validation, stopped by a signal, done on resume)', flush=True)


def end_of_epoch_eval(run, epoch: int, stop_requested=None) -> dict:
    """Validation of a training run (``train.Run``) after ``epoch``: after every epoch with
    ``logging.log_level`` >= 1 (ffcv-imagenet's name for it) or a top-1 target, else after the
    last one only; 10-crop too (if asked for) at the end. Records the best top-1 (and with
    ``checkpoint.keep_best`` writes its weights) and the epoch that reaches the target. Returns
    the metrics ({} when not validated); ``{'stopped': True}`` when ``stop_requested`` (a signal)
    ended a pass, nothing recorded but what a centre pass before a stopped 10-crop found (the
    resumed run validates the epoch again: :func:`validate_pending`)."""
    cfg, last, progress = run.cfg, epoch == run.cfg.training.epochs - 1, run.progress
    validate_every_epoch, target = bool(cfg.logging.log_level), cfg.training.target_top1
    if not (validate_every_epoch or target > 0 or last):
        return {}
    val = validate_with_ema(cfg, run.model_without_ddp, run.options.ema, run.val_loader,
                            run.precision, show_progress=run.dist.is_primary,
                            stop_requested=stop_requested)
    if val.get('stopped'):
        return val
    run.final_val = val
    if progress.best_top1 is None or val['top_1'] > progress.best_top1:
        progress.best_top1, progress.best_epoch = val['top_1'], epoch
        if cfg.checkpoint.keep_best:  # rank 0 writes; its failure is raised on every rank
            distributed.on_rank_0(partial(_save_best_weights, run))
    if target > 0 and val['top_1'] >= target and not progress.reached:
        progress.reached = dict(epoch=epoch, time_to_target_s=time.perf_counter() - run.wall_start)
    if (progress.reached or last) and cfg.validation.ten_crop:
        val.update(ten_crop_eval(cfg, run.dist, run.model_without_ddp, run.precision,
                                 stop_requested))
        if val.get('stopped'):
            run.final_val = None
            return {'stopped': True}
    return val


def validate_pending(run, stop_requested, save_checkpoint) -> bool:
    """The validation of the epoch before ``run.progress.epoch``, which a signal stopped
    (``progress.val_pending``; :func:`end_of_epoch_eval`, as that epoch's would run under this
    config: best top-1, ``keep_best``, the target, 10-crop; nothing where it validates no such
    epoch), added to that epoch's ``log.jsonl`` record (``RunDir.amend_log``) and the live logs
    by rank 0, then the checkpoint written again without the mark (``save_checkpoint(run,
    epoch, iteration)``: ``train.save_checkpoint``). Returns False when ``stop_requested``
    stopped it again (the checkpoint as it was)."""
    epoch = run.progress.epoch - 1
    val = end_of_epoch_eval(run, epoch, stop_requested)
    if val.get('stopped'):
        return False
    if val:  # rank 0 logs; its failure is raised on every rank
        distributed.on_rank_0(partial(_log_pending, run, epoch, val))
    run.progress.val_pending = False
    save_checkpoint(run, epoch + 1, 0)
    return True


def check_results_file(path) -> None:
    """InputError naming ``validation.results_file`` when eval-only could not write its results
    to ``path``: not a .json name, a folder that is missing or not writable
    (``files.check_writable_file``), or a run folder's own results.json (it would replace that
    run's results)."""
    given = f'validation.results_file={path}'
    check_writable_file(path, '.json', given)
    run = RunDir(Path(path).parent)
    if Path(path).name == run.results.name and run.params.is_file():
        raise InputError(f'{given}: that is the results file of the run {run.path}; give '
                         f'another name, such as {run.path / "eval.json"}')


def evaluate_weights(cfg, dist, command_line=frozenset()) -> dict:
    """``training.eval_only=1``: the validation top-1/top-5 of ``model.weights`` (a run folder, a
    checkpoint or a final_weights.pt), computed as the training run computes it. The model is
    rebuilt as it was trained (``weights.load_model``: arch, BlurPool, channels_last from the
    config saved with the weights, when there is one; else the config's arch, and BlurPool as
    the command line says, else off, as weights from elsewhere are trained) and must have been
    trained on the val .beton's classes (CheckpointError otherwise). It validates as the run did
    (resolution, flip TTA, decoder from the saved config), or, weights without a config, as
    predict evaluates them (``weights.FOREIGN_WEIGHTS_EVAL``: torchvision's 224 px centre crops),
    with :func:`validating_as`, but for the keys in ``command_line`` (the keys given there,
    ``config.command_line_keys``); a line names the settings so taken, a note those that differ
    from the run's, and one a val .beton written with --split train (training images). Rank 0
    prints the results table and, with ``validation.results_file``, writes the returned summary
    there as JSON, less its training figures (:func:`check_results_file`: an InputError before
    any work)."""
    results_file = cfg.validation.results_file
    if results_file:
        distributed.on_rank_0(lambda: check_results_file(results_file))
    blurpool = cfg.training.use_blurpool if BLURPOOL_KEY in command_line else None
    saved = weights.load_model(  # BlurPool as the file says (the config's is for training)
        cfg.model.weights, num_classes=betons.num_classes(cfg.data.val_dataset,
                                                           warn=dist.is_primary),
        beton=cfg.data.val_dataset, **{**config.model_kwargs(cfg), 'use_blurpool': blurpool})
    given = {f'--{ARCH_KEY}': cfg.model.arch if ARCH_KEY in command_line else None,
             f'--{BLURPOOL_KEY}': blurpool}
    for line in (saved.assumed and f'{saved.assumed} (--{ARCH_KEY}, --{BLURPOOL_KEY}; this '
                 f'tool\'s own weights files say how they were built)', saved.note,
                 saved.not_used(cfg.model.weights, given)):
        if line and dist.is_primary:
            print(line)
    cfg, taken = validating_as(cfg, config.saved_eval_kwargs(saved.config) if saved.config
                               else weights.FOREIGN_WEIGHTS_EVAL, keep=command_line)
    if taken and dist.is_primary:
        print(f'=> validating as the run of {cfg.model.weights} did: {" ".join(taken)} (its '
              f'config; set them on the command line to evaluate otherwise)' if saved.config else
              f'=> validating {cfg.model.weights} (no config saved with it) as predict and '
              f'torchvision\'s references evaluate such weights: {" ".join(taken)} (set them on '
              f'the command line to evaluate otherwise)')
    if saved.config and dist.is_primary and (run := validated_otherwise(cfg, saved.config)):
        print(f'=> note: the run of {cfg.model.weights} validated with {run}; this evaluates with '
              f'the command line\'s values')
    record = holdout_record(cfg.data.val_dataset)  # (split, holdout) or None
    if dist.is_primary and record and record[0] == 'train':
        print(f'=> note: {cfg.data.val_dataset} was written with --split train: top-1 is measured '
              f'on training images')
    model = saved.model.to(dist.device)
    precision = resolve_precision(cfg.training.amp, dist.device)
    torch.backends.cudnn.benchmark = dist.device.type == 'cuda'  # fixed shapes
    start = time.perf_counter()
    summary = {'weights': str(cfg.model.weights), 'val_dataset': str(cfg.data.val_dataset),
               'arch': saved.arch, 'epochs': '-',
               **validate(cfg, model, make_val_loader(cfg, dist, precision), precision,
                          progress='val' if dist.is_primary else ''),
               'flip_tta': bool(cfg.validation.lr_tta), 'val_res': cfg.validation.resolution,
               'wall_time_s': time.perf_counter() - start, 'train_img_per_s': None,
               **metrics.model_complexity(model, cfg.validation.resolution)}
    if cfg.validation.ten_crop:
        summary.update(ten_crop_eval(cfg, dist, model, precision))
    if dist.is_primary:
        print(f'=> evaluated {cfg.model.weights} on {cfg.data.val_dataset} '
              f'({summary["val_count"]} images, {precision.name})')
        print(metrics.results_table(summary))
        if results_file:
            write_text_atomic(results_file, json.dumps(
                {k: v for k, v in summary.items() if k not in ('epochs', 'train_img_per_s')},
                indent=2))
            print(f'=> results written to {results_file}')
    return summary
