"""Train a torchvision ResNet (or any classification model) on ImageNet .beton files with FFCV:
the ``imagenet-ffcv-train`` command (also ``python -m imagenet_ffcv.train``, ``train_imagenet.py``).

    imagenet-ffcv-train --config rn50_configs/rn50_16_epochs.yaml \\
        --data.train_dataset=betons/train_256.beton --data.val_dataset=betons/val_256.beton
    torchrun --nproc_per_node=8 -m imagenet_ffcv.train --config rn50_configs/rn50_16_epochs.yaml ...

Any key can be overridden as --section.key=value (``--help``, docs/configuration.md). A run writes
LOGGING_FOLDER/<run id>/{params.json, log.jsonl, checkpoint.pt, final_weights.pt, ...} (run_dir).

The run, top to bottom: main -> train: build (loaders, model, optimizer, schedules) -> restore (from
a checkpoint) -> open the run folder -> fit (the epochs) -> summarize. Eval-only: ``evaluate``.
"""
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm import tqdm

from . import (betons, checkpoint, config, distributed, engine, finetune, jpeg_region, loaders,
               metrics, models, optimizers, preflight, schedules, weights)
from .checkpoint import Progress
from .classes import class_list_path, read_class_names
from .commands import one_line_errors, one_line_warnings, stops_on_ctrl_c
from .config_warnings import header_warnings
from .ema import make_ema
from .evaluate import end_of_epoch_eval, evaluate_weights, make_val_loader, validate_pending
from .loggers import LiveLog
from .mixup import batch_mixer
from .precision import Precision, resolve_precision
from .run_dir import RunDir, code_version
from .signals import StopRequest


def main(cfg, command_line=frozenset()) -> dict:
    """Train as ``cfg`` (``config.load_config``) says, or evaluate ``model.weights`` (eval_only=1,
    validating as the run did but for the keys in ``command_line``: ``config.command_line_keys``);
    returns the summary (run folder, final top-1/top-5, wall time, ...) on every rank. A run stopped
    by a signal (SIGTERM, Ctrl-C), or finished with one during its last checkpoint or as its
    final weights were written: exit_code 128 + it."""
    wall_start = time.perf_counter()
    dist = distributed.from_env()
    if dist.device.type == 'cuda' and dist.local_world_size > 1 and dist.local_rank == 0:
        preflight.warn_of_little_shared_memory(dist.local_world_size)  # before NCCL starts
    distributed.setup(dist, timeout_s=cfg.dist.timeout_s)
    try:
        if cfg.training.eval_only:
            return evaluate_weights(cfg, dist, command_line)
        return train(cfg, dist, wall_start)
    finally:
        distributed.cleanup()


@dataclass
class Run:
    """Everything a training run is made of, built once by :func:`build`."""
    cfg: object
    dist: distributed.DistInfo
    train_loader: object
    train_decoder: object  # its output_size sets the epoch's resolution
    val_loader: object
    model: torch.nn.Module  # DistributedDataParallel around model_without_ddp when distributed
    model_without_ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 loss scaling, else None
    options: engine.StepOptions  # gradient clipping, MixUp/CutMix, EMA
    loss_fn: torch.nn.Module
    precision: Precision
    lr_at: partial  # fractional epoch -> LR
    res_at: partial  # epoch -> training resolution (px)
    classes: list  # [(wnid, name)] of the training .beton, or None
    resolved: dict  # the resolved config, as params.json and the checkpoint hold it
    wall_start: float
    progress: Progress = field(default_factory=Progress)
    run_dir: RunDir = None  # on rank 0
    live_log: LiveLog = None  # TensorBoard / W&B, on rank 0
    final_val: dict = None  # the last validation's results

    def global_step(self, epoch: int, iterations_done: int) -> int:
        """Iterations trained after ``iterations_done`` of ``epoch``: TensorBoard's, W&B's step."""
        return epoch * len(self.train_loader) + iterations_done


def train(cfg, dist, wall_start) -> dict:
    """Train from scratch, or from the checkpoint ``checkpoint.resume`` names; see :func:`main`."""
    launch = distributed.launch_identity(agree_on=dist.device)  # on every rank: a collective
    # Rank 0 picks the checkpoint, every rank reads it; what fails on rank 0 alone stops every rank
    resume_path = distributed.broadcast_object(distributed.on_rank_0(lambda: (
        checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.logging.folder,
                                  cfg.logging.run_name, launch))))
    if checkpoint.finished_found_by_auto(resume_path, cfg.checkpoint.resume):
        return {'run_dir': str(resume_path.parent), 'finished_before': True}
    loaded_ns = resume_path.stat().st_mtime_ns if resume_path else None  # checked once locked
    saved = checkpoint.load(resume_path) if resume_path else None
    if saved:  # the config's keys now: the loaders' checks (build) would name a changed one first
        config.check_resumable(saved['config'], config.to_dict(cfg),
                               force=bool(cfg.checkpoint.force), path=resume_path)
    run = build(cfg, dist, wall_start, launch, resuming=saved is not None)
    if saved:
        restore(run, saved, resume_path)
    if checkpoint.no_epoch_left(resume_path, run.progress, cfg.training.epochs,
                                say=dist.is_primary):
        return {'run_dir': str(resume_path.parent), 'finished_before': True}
    run.run_dir = distributed.on_rank_0(partial(open_run_dir, run, resume_path, loaded_ns))
    failed = True  # until the run ends without an error: a close that fails then is not told
    try:  # the lock is given back however this ends (W&B failing to start or finish too)
        distributed.check_every_rank_sees(run.run_dir.params if run.run_dir else None)
        run.live_log = distributed.on_rank_0(lambda: LiveLog(
            run.run_dir.path, tensorboard=bool(cfg.logging.tensorboard), config=run.resolved,
            wandb_project=cfg.logging.wandb_project, run_name=run.run_dir.path.name,
            resume_step=run.global_step(run.progress.epoch, run.progress.iteration)))
        with StopRequest() as stop:  # until the final weights: a signal after the last epoch
            finished = fit(run, stop)  # lets the run finish (it killed it at once)
            summary = summarize(run, stop) if finished else stopped_summary(run, stop)
        failed = False
        return {**summary, 'exit_code': stop.exit_code} if stop else summary
    finally:
        if run.run_dir:
            run.run_dir.unlock()
        if run.live_log:  # in place of the error that ends the run, which is the one told
            run.live_log.close(quiet=failed)


def build(cfg, dist, wall_start, launch: dict = None, resuming: bool = False) -> Run:
    """A new run's loaders, model, optimizer, loss, schedules (``launch``: its torchrun job's);
    ``resuming``: the model is not started from ``model.weights`` (the checkpoint's replace
    them)."""
    preflight.check_runnable(cfg, dist.device, dist.local_world_size)  # before any work
    num_classes = betons.num_classes(cfg.data.train_dataset, val_path=cfg.data.val_dataset,
                                      warn=dist.is_primary)  # each rank checks, rank 0 warns
    precision = resolve_precision(cfg.training.amp, dist.device)
    torch.backends.cudnn.benchmark = dist.device.type == 'cuda'  # fixed shapes within an epoch
    torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank
    res_at = partial(schedules.resolution_at, **config.resolution_kwargs(cfg))
    threads = distributed.loader_threads(cfg.data.num_workers, dist)
    train_loader, train_decoder = loaders.train_loader(
        **config.train_loader_kwargs(cfg), num_workers=threads, res=res_at(0), device=dist.device,
        distributed=dist.distributed, dtype=precision.input_dtype)
    config.check_batches(cfg, train_loader, dist.world_size)
    val_loader = make_val_loader(cfg, dist, precision, threads)  # the count worked out once
    class_list = class_list_path(cfg.data.train_dataset)
    model_without_ddp = models.build_model(**config.model_kwargs(cfg), num_classes=num_classes)
    if cfg.model.weights and not resuming:  # fine-tuning (the file may be gone by a resume)
        loaded = finetune.init_from(model_without_ddp, cfg.model.weights, arch=cfg.model.arch,
                                    reset_head=bool(cfg.model.reset_head), class_list=class_list)
        if dist.is_primary:
            print(loaded)
    if dist.rank:  # each other rank its own draws (as timm); rank 0 goes on with the seed's
        torch.manual_seed(cfg.training.seed + dist.rank)
    model_without_ddp.to(dist.device)
    if cfg.training.sync_bn:  # BatchNorm statistics over the batches of all ranks
        model_without_ddp = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model_without_ddp)
    ema = make_ema(model_without_ddp, cfg.training.ema_decay) if cfg.training.ema_decay else None
    model = model_without_ddp
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == 'cuda' else None)
    if cfg.training.compile:
        model = models.compile_model(model)
    lr = config.lr_used(cfg, dist.world_size)
    resolved = {**config.to_dict(cfg), 'derived': {  # (config_files.RUN_RECORD's sections)
        'world_size': dist.world_size, 'lr_used': lr, 'num_classes': num_classes,
        'global_batch_size': config.images_per_step(cfg) * dist.world_size,
        'train_images': int(train_loader.reader.num_samples),  # an epoch's length
        'device': str(dist.device), 'amp': precision.name, 'loader_threads': threads,
        'val_image_side': betons.largest_shorter_side(cfg.data.val_dataset)},  # for predict
        'code': code_version(), 'launch': launch}
    return Run(
        cfg=cfg, dist=dist, train_loader=train_loader, train_decoder=train_decoder,
        val_loader=val_loader, model=model, model_without_ddp=model_without_ddp,
        optimizer=optimizers.make_optimizer(
            **config.optimizer_kwargs(cfg), lr=lr,
            groups=models.param_groups(model_without_ddp, **config.param_group_kwargs(cfg))),
        scaler=torch.amp.GradScaler(dist.device.type) if precision.loss_scaling else None,
        options=engine.StepOptions(
            **config.step_option_kwargs(cfg), ema=ema, mix=batch_mixer(
                num_classes=num_classes, mixup_alpha=cfg.training.mixup_alpha,
                cutmix_alpha=cfg.training.cutmix_alpha)),
        loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing),
        precision=precision, lr_at=partial(schedules.lr_at, lr=lr, **config.lr_schedule_kwargs(cfg)),
        res_at=res_at, classes=read_class_names(class_list) if class_list.exists() else None,
        resolved=resolved, wall_start=wall_start)


def restore(run: Run, saved: dict, resume_path) -> None:
    """Continue where the checkpoint ``saved`` left its run (weights, optimizer, loss scaler, EMA,
    random states, progress); ConfigError when derived values (world size, ...) change it."""
    config.check_resumable(saved['config'], {'derived': run.resolved['derived']},
                           force=bool(run.cfg.checkpoint.force), path=resume_path)
    has_ema = checkpoint.restore_training_state(
        saved, model=run.model_without_ddp, optimizer=run.optimizer, scaler=run.scaler,
        ema=run.options.ema, rank=run.dist.rank)
    if not has_ema and run.dist.is_primary:
        print(f'=> {resume_path} holds no EMA: it starts from the weights at the next update')
    run.progress, moved = checkpoint.saved_progress(
        saved, now=(run.cfg.training.batch_size, run.dist.world_size))
    if moved and run.dist.is_primary:
        print(moved)
    if saved['config']['training'].get('target_top1') != run.cfg.training.target_top1:
        run.progress.reached = None  # another target (it may change on resume): not reached yet
    run.wall_start -= run.progress.wall_time_s  # wall time and time to accuracy span restarts
    run.train_loader.next_epoch = run.progress.epoch  # ffcv's order depends on seed + epoch


def open_run_dir(run: Run, resume_path, loaded_ns: int = None) -> RunDir:
    """Rank 0: the folder of the resumed run (its checkpoint as loaded: ``RunDir.reopen``), or a
    new one; prints the run's header."""
    cfg, progress = run.cfg, run.progress
    if resume_path:
        run_dir = RunDir.reopen(resume_path, epoch=progress.epoch, params=run.resolved,
                                loaded_ns=loaded_ns)
        print(f'=> resuming {run_dir.path} at epoch {progress.epoch}, iteration '
              f'{progress.iteration}')
    else:
        run_dir = RunDir.create(cfg.logging.folder, params=run.resolved,
                                class_list=class_list_path(cfg.data.train_dataset),
                                run_name=cfg.logging.run_name)
        print(f'=> run folder {run_dir.path}')
    derived = run.resolved['derived']
    decoder = cfg.data.decoder + ('' if cfg.data.decoder == 'ffcv' or jpeg_region.region_decoder()
                                  else ' (whole JPEGs: its C part is not built)')
    print(f'=> {cfg.model.arch}, {derived["num_classes"]} classes, {run.dist.world_size} '
          f'process(es) on {run.dist.device.type}, {run.precision.name}, decoder '
          f'{decoder} with {derived["loader_threads"]} loader thread(s) (data.num_workers='
          f'{cfg.data.num_workers}), global batch '
          f'{derived["global_batch_size"]}; lr {cfg.lr.lr:g} in the config (for a global batch of '
          f'{cfg.lr.ref_batch_size or "any size: no scaling"}) -> {derived["lr_used"]:g} used')
    for warning in header_warnings(cfg, run.resolved):
        print(f'=> warning: {warning}')
    return run_dir


def save_checkpoint(run: Run, epoch: int, iteration: int, so_far: dict = None) -> None:
    """Rank 0 writes where the run stands (``iteration``, ``so_far`` of ``epoch``), all RNGs too;
    what it raises is raised on every rank (``distributed.on_rank_0``)."""
    rng = distributed.all_gather_object(checkpoint.rng_state())
    distributed.on_rank_0(partial(_write_checkpoint, run, epoch, iteration, so_far, rng))


def _write_checkpoint(run: Run, epoch: int, iteration: int, so_far: dict, rng: list) -> None:
    """Rank 0's part of :func:`save_checkpoint`."""
    state = checkpoint.training_state(
        model_state=models.unwrapped_state_dict(run.model), optimizer=run.optimizer, epoch=epoch,
        iteration=iteration, config=run.resolved, classes=run.classes,
        best_top1=run.progress.best_top1, scaler=run.scaler, ema=run.options.ema, rng=rng,
        progress=run.progress.saved(so_far, wall_time_s=time.perf_counter() - run.wall_start))
    run.run_dir.check_lock()  # another job took the run's lock over: it writes the run, not this
    checkpoint.save(state, run.run_dir.checkpoint)
    if not iteration and run.cfg.checkpoint.keep_last:  # the end of an epoch
        checkpoint.keep_history(run.run_dir.checkpoint, epochs_done=epoch,
                                keep_last=run.cfg.checkpoint.keep_last)
    if iteration:  # within an epoch (the end of an epoch shows in the epoch's line)
        tqdm.write(f'=> checkpoint: epoch {epoch}, iteration {iteration}')


def fit(run: Run, stop) -> bool:
    """Train the epochs from ``run.progress`` on (first the validation a signal stopped, when
    ``progress.val_pending``), validating as configured, a checkpoint after each; a signal
    (SIGTERM, Ctrl-C: ``stop``, the ``signals.StopRequest`` that catches them) ends the current
    step with a checkpoint; the epoch's validation (or 10-crop) before its next batch, the epoch
    logged without it and its checkpoint marked ``val_pending``; a checkpoint, the run after it.
    Returns whether training ended (last epoch, top-1 target, each validated)."""
    cfg, progress = run.cfg, run.progress
    if progress.val_pending and not validate_pending(run, stop.__bool__, save_checkpoint):
        stop.agree(run.dist.device)
        return False
    first_epoch = progress.epoch  # none after the one that reached the target (resumed):
    end = cfg.training.epochs if progress.epochs_left(cfg.training.epochs) else 0
    for epoch in range(first_epoch, end):
        res = run.res_at(epoch)
        run.train_decoder.output_size = (res, res)
        stats = engine.train_one_epoch(
            model=run.model, loader=run.train_loader, optimizer=run.optimizer,
            loss_fn=run.loss_fn, lr_at=run.lr_at, epoch=epoch,
            amp_dtype=run.precision.amp_dtype, scaler=run.scaler, options=run.options,
            hooks=engine.EpochHooks(
                stop_requested=stop.__bool__, corrupt_record=run.train_loader.corrupt_record,
                save_checkpoint=partial(save_checkpoint, run, epoch),
                checkpoint_every=cfg.checkpoint.every_iters,
                log_train=lambda done, values: run.live_log.train_scalars(  # rank 0's
                    run.global_step(epoch, done), values),
                log_every=cfg.logging.every_iters if run.live_log else 0),
            show_progress=run.dist.is_primary,
            start_iteration=progress.iteration if epoch == first_epoch else 0,
            so_far=progress.epoch_so_far if epoch == first_epoch else None,
            iterations_after=len(run.train_loader) * schedules.remaining_work(
                epoch, epochs=cfg.training.epochs, res_at=run.res_at))
        if stats['iterations_done'] < len(run.train_loader):  # stopped within the epoch
            save_checkpoint(run, epoch, stats['iterations_done'], stats['so_far'])
            stop.agree(run.dist.device)
            return False
        progress.images += stats['images'] * run.dist.world_size
        progress.train_seconds += stats['seconds']
        distributed.broadcast_buffers(run.model_without_ddp)  # rank 0's BN statistics
        if run.options.ema is not None:
            distributed.broadcast_buffers(run.options.ema.module)
        stopped = (lambda: True) if stats['stopped'] else stop.__bool__  # (agreed; this rank)
        val = end_of_epoch_eval(run, epoch, stopped)  # a signal stops it at a batch
        progress.val_pending = bool(val.pop('stopped', False))  # then the resume validates
        distributed.on_rank_0(partial(log_epoch, run, epoch, res, stats,
                                      {} if progress.val_pending else val))
        save_checkpoint(run, epoch + 1, 0)
        if progress.reached and not progress.val_pending:
            stop.agree(run.dist.device)
            return True
        # a signal during validation or the checkpoint ends the run here, on every rank
        if stop.agree(run.dist.device) and (epoch < cfg.training.epochs - 1
                                           or progress.val_pending):
            return False
    if end <= first_epoch:  # a resume that trained nothing: its signal, if one came
        stop.agree(run.dist.device)
    return True


def log_epoch(run: Run, epoch: int, res: int, stats: dict, val: dict) -> None:
    """Rank 0: the epoch's record in log.jsonl, and its line on the console."""
    images = stats['images'] * run.dist.world_size
    record = {'epoch': epoch, 'train_loss': stats['train_loss'], **val, 'lr': stats['lr'],
              'res': res, 'epoch_time_s': stats['seconds'],
              'train_img_per_s': images / stats['seconds'],
              'wall_time_s': time.perf_counter() - run.wall_start}
    run.run_dir.append_log(record)
    metrics.plot_log(run.run_dir.log, run.run_dir.plot)
    run.live_log.epoch_scalars(epoch, record, step=run.global_step(epoch + 1, 0))
    top1 = (f'{val["top_1"]:.4f}' if val else '-') + (
        f' (EMA {val["top_1_ema"]:.4f})' if 'top_1_ema' in val else '')
    print(f'epoch {epoch}: res {res}, train loss {stats["train_loss"]:.4f}, top-1 {top1}, '
          f'{record["train_img_per_s"]:.0f} img/s, {stats["seconds"]:.1f} s', flush=True)


def stopped_summary(run: Run, stop) -> dict:
    """The summary of a run stopped by a signal; its checkpoint, as it stands, is its resume."""
    run_dir = run.run_dir
    if run_dir:
        print(f'=> stopped by {stop.name}: it resumes from {run_dir.checkpoint}; continue with '
              f'--resume auto (or --resume {run_dir.checkpoint})', flush=True)
    return {'run_dir': str(run_dir.path) if run_dir else None, 'stopped': True,
            'exit_code': stop.exit_code}


def summarize(run: Run, stop) -> dict:
    """The end of a finished run: final metrics, speed, size and cost of the model; rank 0 writes
    final_weights_ema.pt (with an EMA), then final_weights.pt (the run is finished), and prints the
    results table; what rank 0 raises is raised on every rank (``distributed.on_rank_0``). A
    signal meanwhile (``stop``) stops the validation of a run resumed after its last epoch, which
    then ends as stopped (:func:`stopped_summary`; the next resume validates again); else it is
    left for the end, the weights written: the ranks then agree on it (``StopRequest.agree``)."""
    cfg, model, progress = run.cfg, run.model_without_ddp, run.progress
    reached = progress.reached or {}
    if run.final_val is None:  # resumed from the checkpoint after its last epoch (10-crop too)
        val = end_of_epoch_eval(run, reached.get('epoch', cfg.training.epochs - 1), stop.__bool__)
        if val.get('stopped'):
            stop.agree(run.dist.device)
            return stopped_summary(run, stop)
    summary = {'run_dir': str(run.run_dir.path) if run.run_dir else None, 'arch': cfg.model.arch,
               'epochs': reached.get('epoch', cfg.training.epochs - 1) + 1, **run.final_val,
               'flip_tta': bool(cfg.validation.lr_tta), 'val_res': cfg.validation.resolution,
               'target_top1': cfg.training.target_top1 or None,
               'target_reached_epoch': reached.get('epoch'),
               'time_to_target_s': reached.get('time_to_target_s'),
               'wall_time_s': time.perf_counter() - run.wall_start,
               'train_img_per_s': progress.images / max(progress.train_seconds, 1e-9),
               'weights_sha256': models.state_sha256(model),
               **metrics.model_complexity(model, cfg.validation.resolution)}
    if cfg.checkpoint.keep_best:
        summary.update(best_top1=progress.best_top1, best_epoch=progress.best_epoch)
    distributed.on_rank_0(partial(write_results, run, summary))
    stop.agree(run.dist.device)
    return summary


def write_results(run: Run, summary: dict) -> None:
    """Rank 0: results.json (checking the lock), final_weights_ema.pt (with an EMA), then
    final_weights.pt, the mark of a finished run, which comes last; the results table."""
    run.run_dir.write_results(summary)
    if run.options.ema is not None:
        weights.save_final_weights(models.unwrapped_state_dict(run.options.ema),
                                   run.run_dir.final_weights_ema, config=run.resolved,
                                   classes=run.classes)
    weights.save_final_weights(models.unwrapped_state_dict(run.model_without_ddp),
                               run.run_dir.final_weights, config=run.resolved, classes=run.classes)
    print(metrics.results_table(summary))


@stops_on_ctrl_c('train', ' (a run keeps its last checkpoint: --resume auto)')
@one_line_warnings('train')
@one_line_errors('train')
def cli(argv=None) -> int:
    """Train or evaluate as ``argv`` says (default ``sys.argv[1:]``); returns the exit status, with
    one line instead of a traceback for expected failures (``commands.one_line_errors``; a run keeps
    its last checkpoint)."""
    argv = sys.argv[1:] if argv is None else argv
    summary = main(config.load_config(argv), config.command_line_keys(argv))
    return summary.get('exit_code', 0)


if __name__ == '__main__':
    sys.exit(cli())
