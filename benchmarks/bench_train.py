"""Training-loop throughput: the trainer's step (``engine.train_one_epoch``: SGD, label smoothing,
channels_last, BlurPool, mixed precision as ``training.amp=auto`` picks it: bf16 on a recent GPU,
fp32 on CPU) fed by a loader, against the same step fed with one synthetic batch already in place
(no loading at all: the limit of the loop). Their ratio is the fraction of the limit the data path
lets the loop reach.

    python benchmarks/bench_train.py                  # CPU: ResNet-18, 128 px (make bench)
    python benchmarks/bench_train.py --device cuda    # one GPU: ResNet-50 at 160 and 192 px,
                                                      # batch 256, ours and ffcv's stock loader
    python benchmarks/bench_train.py --compile 0      # eager only (no torch.compile rows)

Feeds (``--feeds``): ``synthetic`` (one random normalised batch on the device, reused),
``ours`` (``loaders.train_loader``), ``ffcv_stock`` (ffcv-imagenet's pipeline with ffcv 1.0.2's
own decoder, ``bench_loader.ffcv_stock``; on CUDA its NormalizeImage needs cupy). A feed that
fails gives a row with its error instead of stopping the others.

Compile (``--compile``, default ``0,1``): every row is measured with the eager model (0), then
with ``models.compile_model`` of it (1: torch.compile with static shapes, so it compiles again at
each res). The first step of each row is timed alone (``first_step_s``: with compile 1 it is
mostly the compile time) and never counted in img/s; the timed steps follow the warm-up.

Data: the main set of bench_loader (../shared/data/imagewoof320, or the embedded sample), stored
as write_beton.py does by default, or ``--beton FILE`` (at least batch x (warm-up + steps + 1)
samples). Prints a Markdown table; writes bench-results/train.csv.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench_loader import ffcv_stock
from common import RESULTS, image_sets, machine_line, markdown_table, pooled_samples, write_csv
from imagenet_ffcv import engine, loaders, models
from imagenet_ffcv.writer import write_beton

FEEDS = {'synthetic': 'synthetic (no loading)', 'ours': 'our loader',
         'ffcv_stock': 'ffcv stock loader'}


class Batches:
    """The first ``n`` batches of ``loader`` (the engine takes ``len`` of what it is given)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        batches = iter(self.loader)  # an iterator passed in goes on where it stopped
        for _ in range(self.n):
            yield next(batches)


def steps_per_s(model, optimizer, batches, amp_dtype, device) -> tuple:
    """Run the trainer's epoch function over ``batches``; returns (img/s, seconds), the device
    synchronised before and after the timed region."""
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                                   loss_fn=loss_fn, lr_at=lambda t: 0.01, epoch=0,
                                   amp_dtype=amp_dtype, show_progress=False)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return stats['images'] / seconds, seconds


def synthetic_batch(*, batch_size, res, device, dtype) -> tuple:
    """A random normalised batch already on ``device``: images ``dtype`` (B, 3, res, res) in
    channels_last, as the loaders deliver them, and int64 (B,) labels in [0, 1000)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, res, res, generator=g).to(device, dtype)
    y = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last), y


def make_loader(feed, beton, *, res, batch_size, workers, device, dtype) -> tuple:
    """``(loader, decoder)`` of a real feed: 'ours' or 'ffcv_stock'."""
    if feed == 'ours':
        return loaders.train_loader(path=beton, batch_size=batch_size, num_workers=workers,
                                    res=res, os_cache=True, device=device, distributed=False,
                                    seed=0, dtype=dtype)
    return ffcv_stock(beton, res=res, workers=workers, batch_size=batch_size, device=device)


def feed_batches(feed, made, beton, *, res, batch_size, workers, device, dtype, n):
    """An iterator over (images, labels) batches of ``feed`` at ``res``: the synthetic batch ``n``
    times, or a real feed's loader (made once per feed and kept in ``made``, which also keeps the
    exception its construction raised: raised again here, for every row of that feed)."""
    if feed == 'synthetic':
        x, y = synthetic_batch(batch_size=batch_size, res=res, device=device, dtype=dtype)
        return iter([(x, y)] * n)
    if feed not in made:
        try:
            made[feed] = make_loader(feed, beton, res=res, batch_size=batch_size, workers=workers,
                                     device=device, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - reported in the row
            made[feed] = e
    if isinstance(made[feed], Exception):
        raise made[feed]
    loader, decoder = made[feed]
    decoder.output_size = (res, res)
    return iter(loader)  # warm-up, then the timed steps, in one pass


def timed_steps(net, optimizer, batches, *, warmup, steps, amp_dtype, device) -> dict:
    """``{'img_per_s', 'first_step_s'}``: the first step timed alone (it compiles: torch.compile at
    a new shape, numba for a loader, cudnn's algorithm search), ``warmup - 1`` more untimed steps,
    then the img/s of ``steps`` timed steps."""
    _, first = steps_per_s(net, optimizer, Batches(batches, 1), amp_dtype, device)
    if warmup > 1:
        steps_per_s(net, optimizer, Batches(batches, warmup - 1), amp_dtype, device)
    rate, _ = steps_per_s(net, optimizer, Batches(batches, steps), amp_dtype, device)
    return {'img_per_s': round(rate, 1), 'first_step_s': round(first, 2)}


def measure(*, beton, feeds, arch, res_list, batch_size, steps, warmup, workers, device,
            amp='auto', compile_modes=(0,)) -> list:
    """One row per (compile, res, feed): img/s of ``steps`` timed steps after ``max(warmup, 1)``
    untimed ones (the first, timed alone as ``first_step_s``, compiles), and for the real feeds
    the percentage of the synthetic feed at the same res and compile setting. ``compile_modes``:
    0 the eager model, 1 ``models.compile_model`` of it (the same weights, trained on)."""
    precision = engine.resolve_precision(amp, device)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    model = models.build_model(arch=arch, num_classes=1000, use_blurpool=True,
                               channels_last=True).to(device)
    optimizer = torch.optim.SGD(models.param_groups(model, weight_decay=5e-5, bn_wd=False),
                                lr=0.01, momentum=0.9)
    made = {}  # feed -> (loader, decoder), or the exception its construction raised
    rows = []
    for compiled in compile_modes:
        net = models.compile_model(model) if compiled else model
        for res in res_list:
            common = {'arch': arch, 'device': str(device), 'res': res, 'batch_size': batch_size,
                      'steps': steps, 'workers': workers, 'precision': precision.name,
                      'compile': int(compiled)}
            limit = None
            for feed in feeds:
                row = {**common, 'feed': FEEDS[feed]}
                try:
                    batches = feed_batches(feed, made, beton, res=res, batch_size=batch_size,
                                           workers=workers, device=device,
                                           dtype=precision.input_dtype,
                                           n=max(warmup, 1) + steps)
                    row.update(timed_steps(net, optimizer, batches, warmup=warmup, steps=steps,
                                           amp_dtype=precision.amp_dtype, device=device))
                except Exception as e:  # noqa: BLE001 - one failing feed must not hide the others
                    rows.append({**row, 'error': f'{type(e).__name__}: {e}'.splitlines()[0][:200]})
                    print(f'  {res} px, {feed}, compile {compiled}: failed: {rows[-1]["error"]}',
                          flush=True)
                    continue
                if feed == 'synthetic':
                    limit = row['img_per_s']
                elif limit:
                    row['pct_of_synthetic'] = round(100 * row['img_per_s'] / limit, 1)
                rows.append(row)
                print(f'  {res} px, {feed}, compile {compiled}: {row["img_per_s"]:.1f} img/s '
                      f'(first step {row["first_step_s"]:.1f} s)', flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--arch', help='default: resnet18 on CPU, resnet50 on CUDA')
    p.add_argument('--res', help='default: 128 on CPU, 160,192 on CUDA')
    p.add_argument('--batch-size', type=int, help='default: 32 on CPU, 256 on CUDA')
    p.add_argument('--steps', type=int, help='timed steps per row; default: 8 on CPU, 100 on CUDA')
    p.add_argument('--warmup', type=int, help='untimed steps first (at least 1: the first step '
                                              'compiles); default: 2 on CPU, 10 on CUDA')
    p.add_argument('--compile', default='0,1',
                   help='comma-separated: 0 the eager model, 1 models.compile_model '
                        '(torch.compile, static shapes: compiles at the first step of each res); '
                        'default: both')
    p.add_argument('--feeds', help=f'comma-separated, from {", ".join(FEEDS)}; default: '
                                   'synthetic,ours on CPU, all three on CUDA')
    p.add_argument('--amp', default='auto', choices=engine.AMP_CHOICES,
                   help='mixed precision as training.amp (auto: bf16 on a recent GPU, fp32 on CPU)')
    p.add_argument('--beton', help='read this .beton instead of writing the pooled main set')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='loader threads')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    arch = args.arch or ('resnet50' if cuda else 'resnet18')
    res_list = [int(r) for r in (args.res or ('160,192' if cuda else '128')).split(',')]
    bs = args.batch_size or (256 if cuda else 32)
    steps = args.steps or (100 if cuda else 8)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    feeds = (args.feeds or ('synthetic,ours,ffcv_stock' if cuda else 'synthetic,ours')).split(',')
    unknown = [f for f in feeds if f not in FEEDS]
    if unknown:
        p.error(f'--feeds: unknown {", ".join(unknown)}; expected some of {", ".join(FEEDS)}')
    compile_modes = [c.strip() for c in args.compile.split(',')]
    if not compile_modes or set(compile_modes) - {'0', '1'}:
        p.error(f'--compile: {args.compile!r}; expected 0, 1 or 0,1')
    compile_modes = [int(c) for c in compile_modes]
    print(machine_line())

    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        if args.beton:
            name, beton = Path(args.beton).stem, Path(args.beton)
        else:
            name, root = next(iter(image_sets(['imagewoof320']).items()))
            beton = Path(tmp) / 'train.beton'
            write_beton(pooled_samples(root, bs * (steps + max(warmup, 1)) + bs), beton,
                        max_res=256, num_workers=os.cpu_count())
        rows = measure(beton=beton, feeds=feeds, arch=arch, res_list=res_list, batch_size=bs,
                       steps=steps, warmup=warmup, workers=args.workers, device=device,
                       amp=args.amp, compile_modes=compile_modes)
    rows = [{'data': name, **r} for r in rows]

    print(f'\n### Training loop: {arch} on {device}, batch {bs}, {steps} timed steps after '
          f'{max(warmup, 1)} warm-up steps (the first one, which compiles, timed alone)\n')
    columns = [('res', 'res', ''), ('feed', 'fed by', ''), ('precision', 'precision', ''),
               ('compile', 'compile', ''), ('img_per_s', 'img/s', ',.1f'),
               ('pct_of_synthetic', '% of synthetic', '.0f'),
               ('first_step_s', 'first step s', '.1f')]
    if any('error' in r for r in rows):
        columns.append(('error', 'error', ''))
    print(markdown_table(rows, columns))
    write_csv(Path(args.out) / 'train.csv', rows)
    print(f'\nwrote {Path(args.out) / "train.csv"}')


if __name__ == '__main__':
    main()
