"""Train a torchvision ResNet (or any classification model) on ImageNet .beton files with FFCV.

One process (CPU or one GPU):
    python train_imagenet.py --config rn50_configs/rn50_16_epochs.yaml \\
        --data.train_dataset=betons/train_256.beton --data.val_dataset=betons/val_256.beton

One node, 8 GPUs:
    torchrun --nproc_per_node=8 train_imagenet.py --config rn50_configs/rn50_16_epochs.yaml ...

Two nodes (run on each, NODE_RANK 0 and 1):
    torchrun --nnodes=2 --node-rank=$NODE_RANK --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=$HOST0:29500 train_imagenet.py --config ...

Any key can be overridden as --section.key=value (see imagenet_ffcv/config.py for the schema).
Writes LOGGING_FOLDER/<run id>/{params.json, log.jsonl, final_weights.pt}.
"""
import json
import shutil
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from imagenet_ffcv import (checkpoint, config, data, distributed, engine, metrics, models,
                           schedules)


def main(cfg) -> dict:
    """Run the training described by ``cfg`` (from ``config.load_config``), or with
    ``training.eval_only=1`` evaluate ``model.weights``; returns the summary (run folder, final
    top-1/top-5, wall time, ...) on every rank. A run stopped by SIGTERM/Ctrl-C returns after writing
    its checkpoint, with ``summary['exit_code']`` = 128 + the signal number."""
    if cfg.model.pretrained:
        raise config.ConfigError('model.pretrained=1: pretrained weights cannot be fetched here; '
                                 'training starts from random weights (set it to 0)')
    wall_start = time.perf_counter()
    dist = distributed.from_env()
    distributed.setup(dist, timeout_s=cfg.dist.timeout_s)
    try:
        if cfg.training.eval_only:
            return evaluate_weights(cfg, dist)
        return train(cfg, dist, wall_start)
    finally:
        distributed.cleanup()


def train(cfg, dist, wall_start) -> dict:
    device = dist.device
    amp_dtype = torch.bfloat16 if device.type == 'cuda' else None  # fp32 on CPU
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # fixed shapes within an epoch
    torch.manual_seed(cfg.training.seed)  # same initial weights on every rank

    # Resume: rank 0 picks the checkpoint, every rank reads it (the run folder must be on a
    # filesystem all nodes share).
    resume_path = distributed.broadcast_object(
        checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.logging.folder)
        if dist.is_primary else None)
    saved = checkpoint.load(resume_path) if resume_path else None

    # Data: the resolution changes per epoch through the decoder, without rebuilding the loader.
    epochs = cfg.training.epochs
    res_at = lambda epoch: schedules.resolution_at(  # noqa: E731
        epoch, min_res=cfg.resolution.min_res, max_res=cfg.resolution.max_res,
        start_ramp=cfg.resolution.start_ramp, end_ramp=cfg.resolution.end_ramp)
    train_loader, decoder = data.train_loader(
        path=cfg.data.train_dataset, batch_size=cfg.training.batch_size,
        num_workers=cfg.data.num_workers, res=res_at(0), in_memory=cfg.data.in_memory,
        device=device, distributed=dist.distributed, seed=cfg.training.seed,
        min_crop_scale=cfg.data.min_crop_scale, flip_prob=cfg.data.flip_prob)
    val_loader = data.val_loader(
        path=cfg.data.val_dataset, batch_size=cfg.validation.batch_size,
        num_workers=cfg.data.num_workers, res=cfg.validation.resolution, device=device,
        rank=dist.rank, world_size=dist.world_size)
    num_classes = data.num_classes(cfg.data.train_dataset, val_path=cfg.data.val_dataset)
    class_list = data.class_list_path(cfg.data.train_dataset)
    classes = data.read_class_names(class_list) if class_list.exists() else None

    # Model and optimiser.
    model = models.build_model(arch=cfg.model.arch, num_classes=num_classes,
                               use_blurpool=bool(cfg.training.use_blurpool),
                               channels_last=bool(cfg.training.channels_last)).to(device)
    plain_model = model
    lr = schedules.scaled_lr(cfg.lr.lr, batch_size=cfg.training.batch_size,
                             world_size=dist.world_size, ref_batch_size=cfg.lr.ref_batch_size)
    optimizer = torch.optim.SGD(
        models.param_groups(plain_model, weight_decay=cfg.training.weight_decay,
                            bn_wd=bool(cfg.training.bn_wd)),
        lr=lr, momentum=cfg.training.momentum)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing)
    step_fractions = schedules.parse_fractions(cfg.lr.step_fractions)
    lr_at = lambda t: schedules.lr_at(  # noqa: E731
        t, schedule=cfg.lr.lr_schedule_type, lr=lr, epochs=epochs, peak_epoch=cfg.lr.lr_peak_epoch,
        step_ratio=cfg.lr.step_ratio, step_length=cfg.lr.step_length, step_fractions=step_fractions,
        poly_power=cfg.lr.poly_power, warmup_epochs=cfg.lr.warmup_epochs)
    resolved = config.to_dict(cfg)
    resolved['derived'] = {'world_size': dist.world_size, 'global_batch_size':
                           cfg.training.batch_size * dist.world_size, 'lr_used': lr,
                           'num_classes': num_classes, 'device': str(device)}

    # Where the run starts: from scratch, or where the checkpoint left it.
    start_epoch, start_iteration, best_top1 = 0, 0, None
    progress = {'images': 0, 'train_seconds': 0.0, 'wall_time_s': 0.0}
    if saved:
        changes = checkpoint.schedule_changes(saved['config'], resolved)
        if changes and not cfg.checkpoint.force:
            raise checkpoint.CheckpointError(
                f'{resume_path}: this config changes the schedule of the run being resumed:\n  '
                + '\n  '.join(changes) + '\nresume with the config of the run, or set '
                'checkpoint.force=1 to continue anyway')
        plain_model.load_state_dict(saved['model'])
        optimizer.load_state_dict(saved['optimizer'])
        checkpoint.set_rng_state(saved['rng'])
        start_epoch, start_iteration = saved['epoch'], saved['iteration']
        best_top1, progress = saved['best_top1'], saved['progress']
        wall_start -= progress['wall_time_s']  # wall time and time to accuracy span the restarts
        train_loader.next_epoch = start_epoch  # ffcv's order of an epoch depends on seed + epoch
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    # Run folder, written by rank 0 only.
    run_dir = None
    if dist.is_primary:
        if saved:
            run_dir = resume_path.parent
            keep_log_until(run_dir / 'log.jsonl', start_epoch)
            for partial in run_dir.glob('.*.partial-*'):  # left by a kill during a save
                partial.unlink()
            print(f'=> resuming {run_dir} at epoch {start_epoch}, iteration {start_iteration}')
        else:
            run_id = datetime.now().strftime('%Y%m%d-%H%M%S-') + uuid.uuid4().hex[:6]
            run_dir = Path(cfg.logging.folder) / run_id
            run_dir.mkdir(parents=True)
            (run_dir / 'params.json').write_text(json.dumps(resolved, indent=2))
            if class_list.exists():
                shutil.copy(class_list, run_dir / 'classes.tsv')  # for predict.py
            print(f'=> run folder {run_dir}')
        print(f'=> {cfg.model.arch}, {num_classes} classes, {dist.world_size} process(es) on '
              f'{device.type}, global batch {cfg.training.batch_size * dist.world_size}; '
              f'lr {cfg.lr.lr:g} in the config (for a global batch of '
              f'{cfg.lr.ref_batch_size or "any size: no scaling"}) -> {lr:g} used')

    def save_checkpoint(epoch, iteration):
        """Rank 0 writes where the run stands: ``iteration`` iterations of ``epoch`` done."""
        if dist.is_primary:
            checkpoint.save({
                'format': checkpoint.FORMAT, 'model': models.unwrapped_state_dict(model),
                'optimizer': optimizer.state_dict(), 'scaler': None, 'epoch': epoch,
                'iteration': iteration, 'rng': checkpoint.rng_state(), 'config': resolved,
                'best_top1': best_top1, 'classes': classes,
                'progress': {**progress, 'wall_time_s': time.perf_counter() - wall_start}},
                run_dir / checkpoint.CHECKPOINT_NAME)
            if iteration:  # within an epoch (the end of an epoch shows in the epoch's line)
                tqdm.write(f'=> checkpoint: epoch {epoch}, iteration {iteration}')

    # Epochs. Validation after every epoch (log_level 1, or a top-1 target set) or the last one.
    # A signal (SIGTERM, Ctrl-C) ends the current step, writes a checkpoint and returns.
    target = cfg.training.target_top1
    final_val, reached, interrupted, epoch = None, None, False, start_epoch - 1
    with checkpoint.StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            res = res_at(epoch)
            decoder.output_size = (res, res)
            stats = engine.train_one_epoch(
                model=model, loader=train_loader, optimizer=optimizer, loss_fn=loss_fn,
                lr_at=lr_at, epoch=epoch, amp_dtype=amp_dtype, show_progress=dist.is_primary,
                start_iteration=start_iteration if epoch == start_epoch else 0,
                stop_requested=lambda: bool(stop), checkpoint_every=cfg.checkpoint.every_iters,
                save_checkpoint=lambda done: save_checkpoint(epoch, done))
            images = stats['images'] * dist.world_size
            progress['images'] += images
            progress['train_seconds'] += stats['seconds']
            if stats['iterations_done'] < len(train_loader):  # stopped within the epoch
                save_checkpoint(epoch, stats['iterations_done'])
                interrupted = True
                break
            distributed.broadcast_buffers(plain_model)  # BN statistics of rank 0 on every rank
            val = {}
            if cfg.logging.log_level > 0 or target > 0 or epoch == epochs - 1:
                val = validate(cfg, dist, plain_model, val_loader, amp_dtype)
                final_val = val
                best_top1 = max(best_top1 or 0.0, val['top_1'])
            if target > 0 and val['top_1'] >= target:
                reached = {'epoch': epoch, 'time_to_target_s': time.perf_counter() - wall_start}
            if (reached or epoch == epochs - 1) and cfg.validation.ten_crop:
                val.update(ten_crop_eval(cfg, dist, plain_model, amp_dtype))
            if dist.is_primary:
                record = {'epoch': epoch, 'train_loss': stats['train_loss'], **val,
                          'lr': stats['lr'], 'res': res, 'epoch_time_s': stats['seconds'],
                          'train_img_per_s': images / stats['seconds'],
                          'wall_time_s': time.perf_counter() - wall_start}
                with open(run_dir / 'log.jsonl', 'a') as f:
                    f.write(json.dumps(record) + '\n')
                top1 = f'{val["top_1"]:.4f}' if val else '-'
                print(f'epoch {epoch}: res {res}, train loss {stats["train_loss"]:.4f}, top-1 '
                      f'{top1}, {record["train_img_per_s"]:.0f} img/s, {stats["seconds"]:.1f} s',
                      flush=True)
            save_checkpoint(epoch + 1, 0)
            interrupted = stats['stopped'] and epoch < epochs - 1
            if reached or interrupted:
                break
    if interrupted:
        if dist.is_primary:
            print(f'=> stopped by {stop.name}: '
                  f'checkpoint {run_dir / checkpoint.CHECKPOINT_NAME} written; continue with '
                  f'--resume auto (or --resume {run_dir / checkpoint.CHECKPOINT_NAME})', flush=True)
        return {'run_dir': str(run_dir) if run_dir else None, 'stopped': True,
                'exit_code': stop.exit_code}
    if final_val is None:  # resumed from the checkpoint written after the last epoch
        final_val = validate(cfg, dist, plain_model, val_loader, amp_dtype)

    summary = {'run_dir': str(run_dir) if run_dir else None, 'arch': cfg.model.arch,
               'epochs': epoch + 1, **final_val, 'flip_tta': bool(cfg.validation.lr_tta),
               'val_res': cfg.validation.resolution, 'target_top1': target or None,
               'target_reached_epoch': reached and reached['epoch'],
               'time_to_target_s': reached and reached['time_to_target_s'],
               'wall_time_s': time.perf_counter() - wall_start,
               'train_img_per_s': progress['images'] / max(progress['train_seconds'], 1e-9),
               'weights_sha256': models.state_sha256(plain_model),
               **metrics.model_complexity(plain_model, cfg.validation.resolution)}
    if dist.is_primary:
        checkpoint.save(models.unwrapped_state_dict(model), run_dir / 'final_weights.pt')
        metrics.plot_log(run_dir / 'log.jsonl', run_dir / 'progress.png')
        print(metrics.results_table(summary))
    return summary


def validate(cfg, dist, model, loader, amp_dtype) -> dict:
    """Centre-crop top-1/top-5, loss and error rates of ``model`` on the val set (all ranks)."""
    val = metrics.with_error_rates(engine.evaluate(model=model, loader=loader, amp_dtype=amp_dtype,
                                                   flip_tta=bool(cfg.validation.lr_tta)))
    val['val_count'] = val.pop('count')
    return val


def ten_crop_eval(cfg, dist, model, amp_dtype) -> dict:
    """10-crop top-1/top-5 (and error rates) of ``model``, keys suffixed ``_10crop``."""
    loader = data.val_loader(path=cfg.data.val_dataset, batch_size=cfg.validation.batch_size,
                             num_workers=cfg.data.num_workers, res=cfg.validation.resolution,
                             device=dist.device, rank=dist.rank, world_size=dist.world_size,
                             crop_ratio=1.0)
    result = metrics.with_error_rates(engine.evaluate(model=model, loader=loader,
                                                      amp_dtype=amp_dtype, ten_crop=True))
    return {f'{k}_10crop': v for k, v in result.items() if k != 'count'}


def evaluate_weights(cfg, dist) -> dict:
    """``training.eval_only=1``: the validation top-1/top-5 of ``model.weights`` (a checkpoint or a
    final_weights.pt), computed as the training run computes it. The model is rebuilt as it was
    trained (arch, BlurPool, channels_last from the config saved with the weights, when there is
    one); validation settings come from ``cfg``."""
    state, trained, _ = checkpoint.load_weights(cfg.model.weights)
    arch, blurpool, channels_last = (cfg.model.arch, cfg.training.use_blurpool,
                                     cfg.training.channels_last)
    if trained:
        arch, blurpool, channels_last = (trained['model']['arch'],
                                         trained['training']['use_blurpool'],
                                         trained['training']['channels_last'])
    num_classes = data.num_classes(cfg.data.val_dataset)
    model = models.build_model(arch=arch, num_classes=num_classes, use_blurpool=bool(blurpool),
                               channels_last=bool(channels_last)).to(dist.device)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(
            f'{cfg.model.weights}: the weights do not fit {arch} with {num_classes} classes (the '
            f'class count of {cfg.data.val_dataset}): {str(e).splitlines()[0]}') from None
    amp_dtype = torch.bfloat16 if dist.device.type == 'cuda' else None
    val_loader = data.val_loader(
        path=cfg.data.val_dataset, batch_size=cfg.validation.batch_size,
        num_workers=cfg.data.num_workers, res=cfg.validation.resolution, device=dist.device,
        rank=dist.rank, world_size=dist.world_size)
    start = time.perf_counter()
    summary = {'weights': str(cfg.model.weights), 'arch': arch, 'epochs': '-',
               **validate(cfg, dist, model, val_loader, amp_dtype),
               'flip_tta': bool(cfg.validation.lr_tta), 'val_res': cfg.validation.resolution,
               'wall_time_s': time.perf_counter() - start, 'train_img_per_s': None,
               **metrics.model_complexity(model, cfg.validation.resolution)}
    if cfg.validation.ten_crop:
        summary.update(ten_crop_eval(cfg, dist, model, amp_dtype))
    if dist.is_primary:
        print(f'=> evaluated {cfg.model.weights} on {cfg.data.val_dataset} '
              f'({summary["val_count"]} images)')
        print(metrics.results_table(summary))
    return summary


def keep_log_until(log_path: Path, epoch: int) -> None:
    """Drop the records of ``log.jsonl`` from ``epoch`` on (written after the checkpoint being
    resumed from), so that every epoch appears once after the resume."""
    if log_path.exists():
        lines = [line for line in log_path.read_text().splitlines()
                 if line.strip() and json.loads(line)['epoch'] < epoch]
        log_path.write_text(''.join(line + '\n' for line in lines))


if __name__ == '__main__':
    try:
        cfg = config.load_config(sys.argv[1:])
        summary = main(cfg)
    except (config.ConfigError, FileNotFoundError, checkpoint.CheckpointError,
            engine.NonFiniteLossError) as e:
        sys.exit(f'train_imagenet.py: {e}')
    sys.exit(summary.get('exit_code', 0))
