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
own decoder, ``common.ffcv_stock_loader``; on CUDA its NormalizeImage needs cupy). A feed that
fails gives a row with its error instead of stopping the others.

Method, for each compile setting and side: one common warm-up, then the feeds timed in turn.
- Warm-up: the model and optimizer are built once; each real feed's loader runs one whole epoch
  on its own (numba compiles its pipeline, its batch buffers are allocated, the file is paged
  in); then each feed's first step is timed alone (``first_step_s``: with compile 1 mostly
  torch.compile's time at this side, on CUDA also cuDNN's algorithm search) and never counted,
  and ``--warmup`` - 1 more steps run untimed.
- Timed: ``--windows`` rounds of one window of ``--steps`` steps per feed, the feeds' order
  reversed every other round (synthetic, ours, ours, synthetic, ...), so that a slower spell of
  the machine and the cost of going first fall on every feed alike. A feed's img/s is the median
  of its windows, ``spread`` their max - min. Real loaders go on from epoch to epoch. While a
  window is timed the other feeds' loaders make up to 4 batches ready, which the next window
  takes at the step's speed: a loader slower than the step reads up to about 4 / ``--steps`` fast
  (``common.measure_feeds``) unless ``--settle`` untimed steps come first. On CPU the loader
  outruns the step and keeps that many ready anyway (default 0).

A real feed cannot outrun the synthetic one, the same step with no loading at all: a ratio above
MAX_RATIO (1.05, ``pct_of_synthetic`` above 105) is a measurement error to explain, and the row's
``warning`` says so, as does a WARNING line after the table.

Compile (``--compile``, default ``0,1``): every row is measured with the eager model (0), then
with ``models.compile_model`` of it (1: torch.compile with static shapes, so it compiles again at
each res).

Data: the main set of bench_loader (../shared/data/imagewoof320, or the embedded sample), stored
as imagenet-ffcv-write does by default, or ``--beton FILE`` (at least one batch). Prints a
Markdown table; writes bench-results/train.csv.
"""
import argparse
import itertools
import os
import tempfile
from functools import partial
from pathlib import Path

import torch

from common import (RESULTS, epoch_of, ffcv_stock_loader, image_sets, machine_line,
                    markdown_table, measure_feeds, our_loader, pooled_samples, stored_beton,
                    write_csv)
from imagenet_ffcv import engine, models
from imagenet_ffcv.constants import PRECISIONS
from imagenet_ffcv.precision import resolve_precision

FEEDS = {'synthetic': 'synthetic (no loading)', 'ours': 'our loader',
         'ffcv_stock': 'ffcv stock loader'}
MAX_RATIO = 1.05  # real / synthetic img/s above this is a measurement error


class Batches:
    """The next ``n`` batches of ``batches`` (an iterator; the engine takes ``len`` of what it is
    given)."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, n

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield next(self.batches)


def train_steps(net, optimizer, batches, n, *, amp_dtype) -> int:
    """``n`` steps of the trainer's epoch function on the next batches of ``batches``; returns
    the images trained on."""
    stats = engine.train_one_epoch(model=net, loader=Batches(batches, n), optimizer=optimizer,
                                   loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                                   lr_at=lambda t: 0.01, epoch=0, amp_dtype=amp_dtype,
                                   show_progress=False)
    return stats['images']


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
        return our_loader(beton, res=res, workers=workers, batch_size=batch_size, device=device,
                          dtype=dtype)
    return ffcv_stock_loader(beton, res=res, workers=workers, batch_size=batch_size,
                             device=device)


def endless(loader):
    """The batches of ``loader``, epoch after epoch (each epoch run to its end, so that the next
    one reuses its buffers)."""
    while True:
        yield from loader


def feed_stream(feed, made, beton, *, res, batch_size, workers, device, dtype):
    """An endless iterator over (images, labels) batches of ``feed`` at ``res``: the synthetic
    batch again and again, or a real feed's loader after one whole epoch at ``res`` on its own
    (its warm-up). Loaders are made once per feed and kept in ``made``, which also keeps the
    exception a construction raised: raised again here, for every row of that feed."""
    if feed == 'synthetic':
        return itertools.repeat(synthetic_batch(batch_size=batch_size, res=res, device=device,
                                                dtype=dtype))
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
    epoch_of(loader)()
    return endless(loader)


def measure(*, beton, feeds, arch, res_list, batch_size, steps, warmup, windows, workers,
            device, amp='auto', compile_modes=(0,), settle=0) -> list:
    """One row per (compile, res, feed), as the module's docstring describes, with each real
    feed's ``pct_of_synthetic`` and ``warning`` (:func:`compare_to_synthetic`).
    ``compile_modes``: 0 the eager model, 1 ``models.compile_model`` of it (the same weights,
    trained on). ``settle``: untimed steps of a real feed before each of its windows
    (``common.measure_feeds``)."""
    precision = resolve_precision(amp, device)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    model = models.build_model(arch=arch, num_classes=1000, use_blurpool=True,
                               channels_last=True).to(device)
    optimizer = torch.optim.SGD(models.param_groups(model, weight_decay=5e-5, bn_wd=False),
                                lr=0.01, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    made = {}  # feed -> (loader, decoder), or the exception its construction raised
    rows = []
    for compiled in compile_modes:
        net = models.compile_model(model) if compiled else model
        step = partial(train_steps, net, optimizer, amp_dtype=precision.amp_dtype)
        for res in res_list:
            streams = {}
            for feed in feeds:
                try:
                    streams[feed] = feed_stream(feed, made, beton, res=res, batch_size=batch_size,
                                                workers=workers, device=device,
                                                dtype=precision.input_dtype)
                except Exception as e:  # noqa: BLE001 - reported in the row
                    streams[feed] = e
            results = measure_feeds(step, streams, steps=steps, warmup=max(warmup, 1),
                                    windows=windows, sync=sync,
                                    settle={f: settle for f in streams if f != 'synthetic'})
            for stream in streams.values():
                if hasattr(stream, 'close'):
                    stream.close()  # ends the loader's epoch (and its thread)
            common = {'arch': arch, 'device': str(device), 'res': res, 'batch_size': batch_size,
                      'steps': steps, 'workers': workers, 'precision': precision.name,
                      'compile': int(compiled)}
            rows += [{**common, 'feed': FEEDS[feed], **results[feed]} for feed in feeds]
            for feed in feeds:
                r = results[feed]
                print(f'  {res} px, {feed}, compile {compiled}: ' + (
                    f'failed: {r["error"]}' if 'error' in r else
                    f'{r["img_per_s"]:.1f} img/s (spread {r["spread"]:.1f}, {r["windows"]} '
                    f'windows; first step {r["first_step_s"]:.1f} s)'), flush=True)
    compare_to_synthetic(rows)
    return rows


def compare_to_synthetic(rows) -> None:
    """Set each measured row's ``pct_of_synthetic`` (a real feed's img/s as a percentage of the
    synthetic feed's at the same res and compile setting, when that was measured) and
    ``warning``: empty, or why the row cannot be right (a real feed above MAX_RATIO x the
    synthetic one)."""
    limit = {(r['res'], r['compile']): r['img_per_s'] for r in rows
             if r['feed'] == FEEDS['synthetic'] and r.get('img_per_s')}
    for r in rows:
        if 'img_per_s' not in r:
            continue
        r['warning'] = ''
        synthetic = limit.get((r['res'], r['compile']))
        if r['feed'] == FEEDS['synthetic'] or not synthetic:
            continue
        r['pct_of_synthetic'] = round(100 * r['img_per_s'] / synthetic, 1)
        if r['img_per_s'] > MAX_RATIO * synthetic:
            r['warning'] = (f'{r["feed"]} at {r["pct_of_synthetic"]:.0f} % of synthetic '
                            f'({r["img_per_s"]:.1f} vs {synthetic:.1f} img/s): above '
                            f'{100 * MAX_RATIO:.0f} %, a measurement error')


def print_results(rows, header: str) -> None:
    """The Markdown table of ``rows`` under ``header``, then a WARNING line for each row whose
    ratio to synthetic cannot be right."""
    print(f'\n{header}\n')
    columns = [('res', 'res', ''), ('feed', 'fed by', ''), ('precision', 'precision', ''),
               ('compile', 'compile', ''), ('img_per_s', 'img/s', ',.1f'),
               ('spread', 'spread', ',.1f'), ('pct_of_synthetic', '% of synthetic', '.0f'),
               ('first_step_s', 'first step s', '.1f')]
    if any(r.get('warning') for r in rows):
        columns.append(('warning', 'warning', ''))
    if any('error' in r for r in rows):
        columns.append(('error', 'error', ''))
    print(markdown_table(rows, columns))
    for r in rows:
        if r.get('warning'):
            print(f'\nWARNING: {r["res"]} px, compile {r["compile"]}: {r["warning"]}. A loader '
                  f'cannot feed the step faster than a batch already in place: look for what '
                  f'else ran on the machine, then rerun with more --windows or --steps.')


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--arch', help='default: resnet18 on CPU, resnet50 on CUDA')
    p.add_argument('--res', help='default: 128 on CPU, 160,192 on CUDA')
    p.add_argument('--batch-size', type=int, help='default: 32 on CPU, 256 on CUDA')
    p.add_argument('--steps', type=int,
                   help='timed steps per window; default: 8 on CPU, 100 on CUDA')
    p.add_argument('--windows', type=int, default=3,
                   help='timed windows per feed, the feeds alternating (median and spread)')
    p.add_argument('--warmup', type=int, help='untimed steps per feed first (at least 1: the '
                                              'first step compiles); default: 2 on CPU, 10 on CUDA')
    p.add_argument('--settle', type=int, default=0,
                   help='untimed steps of a real feed before each of its windows (the batches '
                        'its loader made ready meanwhile; common.measure_feeds); default 0')
    p.add_argument('--compile', default='0,1',
                   help='comma-separated: 0 the eager model, 1 models.compile_model '
                        '(torch.compile, static shapes: compiles at the first step of each res); '
                        'default: both')
    p.add_argument('--feeds', help=f'comma-separated, from {", ".join(FEEDS)}; default: '
                                   'synthetic,ours on CPU, all three on CUDA')
    p.add_argument('--amp', default='auto', choices=PRECISIONS,
                   help='mixed precision as training.amp (auto: bf16 on a recent GPU, fp32 on CPU)')
    p.add_argument('--beton', help='read this .beton instead of writing the pooled main set')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='loader threads')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    args.arch = args.arch or ('resnet50' if cuda else 'resnet18')
    args.res_list = [int(r) for r in (args.res or ('160,192' if cuda else '128')).split(',')]
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (100 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.feeds = (args.feeds or ('synthetic,ours,ffcv_stock' if cuda else 'synthetic,ours')
                  ).split(',')
    unknown = [f for f in args.feeds if f not in FEEDS]
    if unknown:
        p.error(f'--feeds: unknown {", ".join(unknown)}; expected some of {", ".join(FEEDS)}')
    if args.windows < 1:
        p.error('--windows: at least 1')
    modes = [c.strip() for c in args.compile.split(',')]
    if not modes or set(modes) - {'0', '1'}:
        p.error(f'--compile: {args.compile!r}; expected 0, 1 or 0,1')
    args.compile_modes = [int(c) for c in modes]
    return args


def main(argv=None):
    args = parse_args(argv)
    device, bs = torch.device(args.device), args.batch_size
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        if args.beton:
            name, beton = Path(args.beton).stem, Path(args.beton)
        else:  # one epoch: the warm-up steps and one window, plus a batch
            name, root = next(iter(image_sets(['imagewoof320']).items()))
            beton = stored_beton(pooled_samples(root, bs * (args.steps + max(args.warmup, 1) + 1)),
                                 tmp)
        rows = measure(beton=beton, feeds=args.feeds, arch=args.arch, res_list=args.res_list,
                       batch_size=bs, steps=args.steps, warmup=args.warmup,
                       windows=args.windows, workers=args.workers, device=device,
                       amp=args.amp, compile_modes=args.compile_modes, settle=args.settle)
    rows = [{'data': name, **r} for r in rows]
    print_results(rows, f'### Training loop: {args.arch} on {device}, batch {bs}; per feed the '
                        f'median of {args.windows} windows of {args.steps} steps, the feeds '
                        f'alternating, after a common warm-up (each loader\'s first epoch, then '
                        f'{max(args.warmup, 1)} steps per feed, the first one timed alone)'
                        + (f'; {args.settle} untimed steps of a real feed before each of its '
                           f'windows' if args.settle else ''))
    write_csv(Path(args.out) / 'train.csv', rows)
    print(f'\nwrote {Path(args.out) / "train.csv"}')


if __name__ == '__main__':
    main()
