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
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import torch

from imagenet_ffcv import config, data, distributed, engine, metrics, models, schedules


def main(cfg) -> dict:
    """Run the training described by ``cfg`` (from ``config.load_config``); returns the summary
    (run folder, final top-1/top-5, wall time) on every rank."""
    if cfg.model.pretrained:
        raise config.ConfigError('model.pretrained=1: pretrained weights cannot be fetched here; '
                                 'training starts from random weights (set it to 0)')
    if cfg.training.eval_only:
        raise config.ConfigError('training.eval_only=1 is not supported yet (set it to 0)')
    wall_start = time.perf_counter()
    dist = distributed.from_env()
    distributed.setup(dist)
    try:
        return train(cfg, dist, wall_start)
    finally:
        distributed.cleanup()


def train(cfg, dist, wall_start) -> dict:
    device = dist.device
    amp_dtype = torch.bfloat16 if device.type == 'cuda' else None  # fp32 on CPU
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # fixed shapes within an epoch
    torch.manual_seed(cfg.training.seed)  # same initial weights on every rank

    # Data: the resolution changes per epoch through the decoder, without rebuilding the loader.
    epochs = cfg.training.epochs
    res_at = lambda epoch: schedules.resolution_at(  # noqa: E731
        epoch, min_res=cfg.resolution.min_res, max_res=cfg.resolution.max_res,
        start_ramp=cfg.resolution.start_ramp, end_ramp=cfg.resolution.end_ramp)
    train_loader, decoder = data.train_loader(
        path=cfg.data.train_dataset, batch_size=cfg.training.batch_size,
        num_workers=cfg.data.num_workers, res=res_at(0), in_memory=cfg.data.in_memory,
        device=device, distributed=dist.distributed, seed=cfg.training.seed)
    val_loader = data.val_loader(
        path=cfg.data.val_dataset, batch_size=cfg.validation.batch_size,
        num_workers=cfg.data.num_workers, res=cfg.validation.resolution, device=device,
        rank=dist.rank, world_size=dist.world_size)
    num_classes = data.num_classes(cfg.data.train_dataset, val_path=cfg.data.val_dataset)

    # Model and optimiser.
    model = models.build_model(arch=cfg.model.arch, num_classes=num_classes,
                               use_blurpool=bool(cfg.training.use_blurpool),
                               channels_last=bool(cfg.training.channels_last)).to(device)
    plain_model = model
    if dist.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
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

    # Run folder, written by rank 0 only.
    run_dir = None
    if dist.is_primary:
        run_id = datetime.now().strftime('%Y%m%d-%H%M%S-') + uuid.uuid4().hex[:6]
        run_dir = Path(cfg.logging.folder) / run_id
        run_dir.mkdir(parents=True)
        resolved = config.to_dict(cfg)
        resolved['derived'] = {'world_size': dist.world_size, 'global_batch_size':
                               cfg.training.batch_size * dist.world_size, 'lr_used': lr,
                               'num_classes': num_classes, 'device': str(device)}
        (run_dir / 'params.json').write_text(json.dumps(resolved, indent=2))
        print(f'=> run folder {run_dir}')
        print(f'=> {cfg.model.arch}, {num_classes} classes, {dist.world_size} process(es) on '
              f'{device.type}, global batch {cfg.training.batch_size * dist.world_size}; '
              f'lr {cfg.lr.lr:g} in the config (for a global batch of '
              f'{cfg.lr.ref_batch_size or "any size: no scaling"}) -> {lr:g} used')

    # Epochs. Validation after every epoch (log_level 1, or a top-1 target set) or the last one.
    target = cfg.training.target_top1
    images_total, train_seconds, reached = 0, 0.0, None
    for epoch in range(epochs):
        res = res_at(epoch)
        decoder.output_size = (res, res)
        stats = engine.train_one_epoch(model=model, loader=train_loader, optimizer=optimizer,
                                       loss_fn=loss_fn, lr_at=lr_at, epoch=epoch,
                                       amp_dtype=amp_dtype, show_progress=dist.is_primary)
        images = stats['images'] * dist.world_size
        images_total += images
        train_seconds += stats['seconds']
        distributed.broadcast_buffers(plain_model)  # BN statistics of rank 0 on every rank
        val = {}
        if cfg.logging.log_level > 0 or target > 0 or epoch == epochs - 1:
            val = metrics.with_error_rates(engine.evaluate(
                model=plain_model, loader=val_loader, amp_dtype=amp_dtype,
                flip_tta=bool(cfg.validation.lr_tta)))
            val['val_count'] = val.pop('count')
            final_val = val
        if target > 0 and val['top_1'] >= target:
            reached = {'epoch': epoch, 'time_to_target_s': time.perf_counter() - wall_start}
        if reached or epoch == epochs - 1:
            if cfg.validation.ten_crop:
                val.update(ten_crop_eval(cfg, dist, plain_model, amp_dtype))
        if dist.is_primary:
            record = {'epoch': epoch, 'train_loss': stats['train_loss'], **val, 'lr': stats['lr'],
                      'res': res, 'epoch_time_s': stats['seconds'],
                      'train_img_per_s': images / stats['seconds'],
                      'wall_time_s': time.perf_counter() - wall_start}
            with open(run_dir / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')
            top1 = f'{val["top_1"]:.4f}' if val else '-'
            print(f'epoch {epoch}: res {res}, train loss {stats["train_loss"]:.4f}, top-1 {top1}, '
                  f'{record["train_img_per_s"]:.0f} img/s, {stats["seconds"]:.1f} s', flush=True)
        if reached:
            break

    summary = {'run_dir': str(run_dir) if run_dir else None, 'arch': cfg.model.arch,
               'epochs': epoch + 1, **final_val, 'flip_tta': bool(cfg.validation.lr_tta),
               'target_top1': target or None,
               'target_reached_epoch': reached and reached['epoch'],
               'time_to_target_s': reached and reached['time_to_target_s'],
               'wall_time_s': time.perf_counter() - wall_start,
               'train_img_per_s': images_total / max(train_seconds, 1e-9),
               'weights_sha256': models.state_sha256(plain_model)}
    if dist.is_primary:
        torch.save(models.unwrapped_state_dict(model), run_dir / 'final_weights.pt')
        print(metrics.results_table(summary))
    return summary


def ten_crop_eval(cfg, dist, model, amp_dtype) -> dict:
    """10-crop top-1/top-5 (and error rates) of ``model``, keys suffixed ``_10crop``."""
    loader = data.val_loader(path=cfg.data.val_dataset, batch_size=cfg.validation.batch_size,
                             num_workers=cfg.data.num_workers, res=cfg.validation.resolution,
                             device=dist.device, rank=dist.rank, world_size=dist.world_size,
                             crop_ratio=1.0)
    result = metrics.with_error_rates(engine.evaluate(model=model, loader=loader,
                                                      amp_dtype=amp_dtype, ten_crop=True))
    return {f'{k}_10crop': v for k, v in result.items() if k != 'count'}

if __name__ == '__main__':
    try:
        cfg = config.load_config(sys.argv[1:])
    except (config.ConfigError, FileNotFoundError) as e:
        sys.exit(f'train_imagenet.py: {e}')
    main(cfg)
