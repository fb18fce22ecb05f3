"""The GPU box at full speed (issue 26), in one command of at most 8 minutes: how the loader scales
with threads, the ResNet-50 step eager and compiled (torch.compile modes, SGD implementations,
batch 256 against 512), real against synthetic feeds, and the ResNet-18 learning run. Writes
``bench-results/gpu_speed.csv`` and ``gpu_speed.md`` (card, date, commit) and
``gpu_speed-logs.txt`` (the last lines of each section's log: a failure's traceback), copied to
``$OUT`` when it is set, and prints the Markdown table.

    bash benchmarks/gpu_speed.sh                  # on the GPU machine (about 7.5 minutes)
    python benchmarks/gpu_speed.py --device cpu   # the same flow on CPU with tiny sizes (dry run)
    bash benchmarks/gpu_speed.sh --sections compile,cudagraphs   # some sections again

Sections, in order of need (``SECTIONS``; seconds: estimated duration on one H100 with 16 cores,
from the first GPU check's timings, not yet measured / the section's limit):
- ``machine`` (10 / 60): card, versions, which JPEG decoder is active, numba's threading layer.
- ``data`` (25 / 90): imagewoof320 + imagenette (train + val) pooled and repeated to 20,480 images
  in one .beton (``.carry/data``, else ../shared/data, else the embedded demo sample); imagenette
  train and val betons for the learning run.
- ``loader`` (95 / 130): our training loader alone at 160 px, batch 256, bf16 on the GPU, at 16, 1,
  8, 4 and 2 threads (the two the target compares first: a section cut short loses the 2-thread
  row, not the 1-thread one that every ratio needs): one warm-up epoch then 2 timed epochs of
  20,480 images each; img/s, img/s per thread, and that per-thread rate over the 1-thread rate
  (the target: >= 0.8 at 16); per batch, the parallel decode's ms and the serial ms of ffcv's
  iterator thread outside it (the copy to the GPU and the normalisation there included).
- ``eager`` (60 / 90): the training step (``engine.train_step``: SGD, label smoothing 0.1, bf16,
  channels_last, BlurPool) of ResNet-50 at 160/224/192 px, then ResNet-18 at 160 px, batch 256,
  fed by a synthetic batch already on the GPU and by our loader (every core): per feed its first
  step alone, 4 more untimed, then 2 alternating windows of 30 steps, the real feed's each after
  40 untimed steps (they use up the batches the loader made ready meanwhile,
  ``common.measure_feeds``); img/s is the median window.
- ``compile`` (165 / 200): ``torch.compile`` (mode default, static shapes, as
  ``training.compile=1``): first a 100-step loss curve of ResNet-50 at 160 px on 8 real batches
  cycled, eager twice (the run-to-run noise) and compiled once from the same weights (its row's
  first step s: the 100 compiled steps, the compile at 160 px included); then the compiled
  model's real and synthetic rows at 160/224/192 px, whose first step at 224 and 192 px is the
  recompile at a new side.
- ``loader_options`` (60 / 100): our training loader alone at every core, 160 px, batch 256,
  with its defaults against other thread schedules (``Sizes.loader_chunks`` for
  ``decoders.PARALLEL_CHUNK``, images a thread takes at a time as it gets free; 0: one equal
  share of each batch per thread) and against ``loaders.COPY_WAIT='slot'`` (the
  loader thread waits for a batch's copy to the GPU only before reusing its host buffer),
  alternating epochs after one warm-up epoch each: whether the defaults chosen on 2 cores
  (benchmarks/loader_scaling.py) hold at 16 threads, and what the per-batch wait costs.
- ``variants`` (20 / 60): ResNet-50 at 160 px, synthetic: SGD ``foreach`` (torch's default on
  CUDA, the trainer's), ``fused`` and the for-loop, at batch 256, and ``foreach`` at batch 512.
- ``cudagraphs`` (70 / 120): ``mode='reduce-overhead'`` (CUDA graphs) at 160 px, real and
  synthetic, and how many compiled graphs ran without CUDA graphs (inductor's
  ``cudagraph_skips``; the CPU dry run counts 1, its CPU graph).
- ``learn`` (50 / 90): ``train.main`` on imagenette, ResNet-18, 16 epochs, the trainer's defaults
  (``common.resnet18_run_args``): top-1 and wall time.
- ``max_autotune`` (not run unless named in ``--sections``: its kernel search takes minutes):
  ``mode='max-autotune'`` at 160 px.

Each section is a child process with its own limit inside ``--budget-s`` (default 450 s): a
later section is skipped when less than its least useful time is left. A child writes its rows as
it goes, so a section killed at its limit keeps the rows it finished. CPU dry run
(``--device cpu``): the same sections with tiny sizes (a 2-conv model for ResNet-50/18, 64 px,
batch 8, 1 and 2 threads; about 4 minutes on 2 busy cores).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (CARRY, REPO, RESULTS, SHARED_DATA, commit, learn_run_samples, markdown_table,
                    write_csv)


@dataclass(frozen=True)
class Sizes:
    """The work of each section. samples: images per loader epoch; loader_*: batch, side (px),
    threads, timed epochs; big/small: the two models; step_*: sides (px), batch, steps per timed
    window, windows, untimed steps after the first, untimed steps of the real feed before each of
    its windows (``common.measure_feeds``); variant_batches: (SGD implementation, batch);
    curve_*: loss-curve steps and real batches cycled; learn_*: the learning run (epochs, batch,
    sides (min, max px), validation side, images taken from imagenette train/val, 0: all)."""
    samples: int
    loader_batch: int
    loader_res: int
    loader_threads: tuple
    loader_epochs: int
    loader_chunks: tuple
    big: str
    small: str
    step_res: tuple
    step_batch: int
    step_steps: int
    step_windows: int
    step_warmup: int
    step_settle: int
    variant_batches: tuple
    curve_steps: int
    curve_batches: int
    learn_epochs: int
    learn_batch: int
    learn_res: tuple
    learn_val_res: int
    learn_train_images: int
    learn_val_images: int


SIZES = {
    'cuda': Sizes(samples=20480, loader_batch=256, loader_res=160, loader_threads=(16, 1, 8, 4, 2),
                  loader_epochs=2, loader_chunks=(0, 4), big='resnet50', small='resnet18',
                  step_res=(160, 224, 192), step_batch=256, step_steps=30, step_windows=2,
                  step_warmup=4, step_settle=40,
                  variant_batches=(('foreach', 256), ('fused', 256), ('for_loop', 256),
                                   ('foreach', 512)),
                  curve_steps=100, curve_batches=8, learn_epochs=16, learn_batch=64,
                  learn_res=(160, 192), learn_val_res=224, learn_train_images=0,
                  learn_val_images=0),
    'cpu': Sizes(samples=512, loader_batch=32, loader_res=64, loader_threads=(2, 1),
                 loader_epochs=1, loader_chunks=(0, 4), big='tiny', small='tiny', step_res=(64,),
                 step_batch=8, step_steps=2, step_windows=2, step_warmup=1, step_settle=1,
                 variant_batches=(('foreach', 8), ('fused', 8), ('for_loop', 8), ('foreach', 16)),
                 curve_steps=6, curve_batches=2, learn_epochs=1, learn_batch=32,
                 learn_res=(64, 64), learn_val_res=64, learn_train_images=320,
                 learn_val_images=100),
}
LOGS, LOG_LINES = 'gpu_speed-logs.txt', 40  # beside the table: the sections' logs' last lines
CURVE_TOLERANCE = 0.02  # compiled vs eager: mean |loss difference| / mean eager loss


@dataclass(frozen=True)
class Section:
    """One section: ``limit_s`` its own time limit, ``min_s`` the least time worth starting it
    with (at least its estimated duration where it writes its rows only at its end). Sections
    run in ``SECTIONS``' order, the order of need: each may use the whole budget left, up to its
    limit, and what the budget cannot give comes off the last ones."""
    name: str
    limit_s: int
    min_s: int


SECTIONS = [Section('machine', 60, 10), Section('data', 90, 20), Section('loader', 130, 40),
            Section('eager', 90, 30), Section('compile', 200, 60),
            Section('loader_options', 100, 60), Section('variants', 60, 25),
            Section('cudagraphs', 120, 70), Section('learn', 90, 50),
            Section('max_autotune', 300, 120)]
DEFAULT_SECTIONS = [s.name for s in SECTIONS if s.name != 'max_autotune']


# ---------------------------------------------------------------------------------------------
# The parent: each section in a child process within the budget; the table.

def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.budget_s
    sections = [s for s in SECTIONS if s.name in args.sections]
    work = Path(args.work or tempfile.mkdtemp(prefix='gpu_speed_'))
    work.mkdir(parents=True, exist_ok=True)
    print(f'gpu_speed: device {args.device}, budget {args.budget_s:.0f} s, sections '
          f'{", ".join(s.name for s in sections)}; work folder {work}', flush=True)
    rows = []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / LOGS).write_text('')  # each section's log's last lines, as they end
    for section in sections:
        limit = min(section.limit_s, deadline - time.time())
        if limit < section.min_s:
            rows.append({'section': section.name, 'status': 'skipped',
                         'result': f'not run: {max(0, deadline - time.time()):.0f} s left'})
            continue
        print(f'[{time.time() - started:5.0f} s] {section.name} (limit {limit:.0f} s) ...',
              flush=True)
        got = run_section(section, args, work, limit)
        rows += got
        print(f'[{time.time() - started:5.0f} s] {section.name}: {len(got)} row(s)', flush=True)
        write_report(rows, args, started)
    print('\n' + write_report(rows, args, started), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r.get('status') in ('failed', 'timeout') for r in rows) else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                   help='cuda: the measurement; cpu: the same flow with tiny sizes (dry run)')
    p.add_argument('--budget-s', type=float, default=450, help='wall-clock budget (s)')
    p.add_argument('--sections', type=lambda s: s.split(','), default=DEFAULT_SECTIONS,
                   help=f'comma-separated, from {",".join(s.name for s in SECTIONS)} (default: '
                        'all but max_autotune); machine and data always run')
    p.add_argument('--data', help='folder holding imagenette/ and imagewoof320/')
    p.add_argument('--work', help='folder for betons, runs and logs (kept; default: temporary)')
    p.add_argument('--reuse-data', action='store_true',
                   help="data: keep the betons an earlier run wrote into --work")
    p.add_argument('--out', default=str(RESULTS), help='where gpu_speed.csv and .md go')
    p.add_argument('--child', help=argparse.SUPPRESS)  # internal: run one section's body
    args = p.parse_args(argv)
    unknown = set(args.sections) - {s.name for s in SECTIONS}
    if unknown:
        p.error(f'unknown section(s) {", ".join(sorted(unknown))}')
    args.sections = set(args.sections) | {'machine', 'data'}
    return args


def run_section(section, args, work, limit) -> list:
    """The section's child process (own process group, output to WORK/NAME.log), killed at
    ``limit`` s: its rows, with a row saying how it ended unless it ended well."""
    log, out = work / f'{section.name}.log', work / f'{section.name}.json'
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, '--child', section.name, '--device', args.device,
           '--work', str(work)] + (['--data', args.data] if args.data else []) + (
               ['--reuse-data'] if args.reuse_data else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p), PYTHONUNBUFFERED='1')
    start = time.time()
    with open(log, 'wb') as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # ffcv's threads do not stop on their own
            proc.wait()
            rc = None
    rows = json.loads(out.read_text()) if out.exists() else []
    lines = [line.split('\r')[-1] for line in log.read_text(errors='replace').splitlines()]
    lines = [line for line in lines if line.strip()]
    with open(Path(args.out) / LOGS, 'a') as f:  # a failure's traceback comes back with the rows
        f.write(f'==> {section.name} (exit {rc}; None: killed at its limit): last '
                f'{min(len(lines), LOG_LINES)} of {len(lines)} lines of {log.name}\n'
                + ''.join(line + '\n' for line in lines[-LOG_LINES:]))
    if rc != 0:
        tail = lines[-1:] or ['']
        rows.append({'section': section.name, 'status': 'timeout' if rc is None else 'failed',
                     'seconds': round(time.time() - start, 1),
                     'result': (f'TIMEOUT after {limit:.0f} s' if rc is None else
                                f'FAILED (exit {rc})') + f': {tail[0][:160]}'})
    return rows


def add_ratios(rows) -> None:
    """``ratio``: a real feed's img/s over the synthetic feed's with the same section, model,
    mode, side and batch; a loader row's img/s per thread over the 1-thread row's."""
    synthetic = {key(r): r['img_per_s'] for r in rows
                 if r.get('feed') == 'synthetic' and r.get('img_per_s')}
    one = next((r['img_per_s'] for r in rows if r.get('section') == 'loader'
                and r.get('threads') == 1 and r.get('img_per_s')), None)
    for r in rows:
        if r.get('feed') == 'real' and r.get('img_per_s') and key(r) in synthetic:
            r['ratio'] = round(r['img_per_s'] / synthetic[key(r)], 3)
        if r.get('section') in ('loader', 'loader_options') and one and r.get('img_per_s'):
            r['ratio'] = round(r['img_per_s'] / r['threads'] / one, 3)


def key(r) -> tuple:
    return r.get('section'), r.get('model'), r.get('mode'), r.get('res'), r.get('batch')


def write_report(rows, args, started) -> str:
    """gpu_speed.md (returned), gpu_speed.csv (each row with the card, date and commit) and the
    sections' logs under ``--out`` (and ``$OUT``)."""
    add_ratios(rows)
    machine = next((r for r in rows if r.get('section') == 'machine' and 'card' in r), {})
    when = time.strftime('%Y-%m-%d %H:%M', time.localtime(started))
    stamp = {'card': machine.get('card', ''), 'date': when, 'commit': commit()}
    lines = [f'## GPU speed: {machine.get("card", "(machine section missing)")}, '
             f'{when}, commit {stamp["commit"]}', '',
             f'- {machine.get("result", "")}', f'- device {args.device}, budget '
             f'{args.budget_s:.0f} s, used {time.time() - started:.0f} s', '',
             markdown_table(rows, [('section', 'section', ''), ('setting', 'setting', ''),
                                   ('img_per_s', 'img/s', ',.0f'), ('spread', 'spread', ',.0f'),
                                   ('ratio', 'ratio', '.2f'), ('first_step_s', 'first step s',
                                                                '.1f'),
                                   ('result', 'result', '')]), '',
             'ratio: real feed / synthetic feed at the same model, mode, side and batch; loader '
             'rows: img/s per thread / the 1-thread img/s (per-core efficiency). first step: '
             'with torch.compile, the (re)compile at that side.']
    text = '\n'.join(lines) + '\n'
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'gpu_speed.md').write_text(text)
    write_csv(out / 'gpu_speed.csv', [{**r, **stamp} for r in rows])
    if os.environ.get('OUT'):
        Path(os.environ['OUT']).mkdir(parents=True, exist_ok=True)
        for name in ('gpu_speed.md', 'gpu_speed.csv', LOGS):
            shutil.copy(out / name, Path(os.environ['OUT']) / name)
    return text


# ---------------------------------------------------------------------------------------------
# The children.

class Rows:
    """A child's rows, written to WORK/NAME.json after each one (a killed child keeps them)."""

    def __init__(self, work, name):
        self.path, self.name, self.rows = Path(work) / f'{name}.json', name, []

    def add(self, **row) -> None:
        self.rows.append({'section': self.name, 'status': 'ok', **row})
        self.path.write_text(json.dumps(self.rows, default=str))
        print(self.rows[-1], flush=True)


def child(args) -> int:
    rows = Rows(args.work, args.child)
    CHILDREN[args.child](args, Path(args.work), SIZES[args.device], rows)
    rows.path.write_text(json.dumps(rows.rows, default=str))
    return 0


def data_root(args):
    """The folder holding imagenette/ and imagewoof320/: --data, .carry/data, ../shared/data;
    None: the embedded demo sample stands in."""
    for root in ([Path(args.data)] if args.data else []) + [CARRY / 'data', SHARED_DATA]:
        if (root / 'imagenette' / 'train').is_dir() and (root / 'imagewoof320' / 'train').is_dir():
            return root
    return None


def machine_info(args, work, sizes, rows) -> None:
    """The card, the versions (``common.machine_line``), the active JPEG decoder, numba's
    threading layer after a parallel loop."""
    import numba
    import numpy as np
    import torch

    from common import machine_line
    from imagenet_ffcv import jpeg_region
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('torch.cuda.is_available() is False: no usable GPU here')
    card = torch.cuda.get_device_name(0) if args.device == 'cuda' else 'no GPU (CPU dry run)'

    @numba.njit(parallel=True)
    def total(a):
        s = 0.0
        for i in numba.prange(len(a)):
            s += a[i]
        return s
    total(np.ones(64))
    decoder = 'region' if jpeg_region.region_decoder() is not None else 'FALLBACK (whole-image)'
    rows.add(setting=card, card=card, result=f'{machine_line()}; CUDA {torch.version.cuda}; '
             f'decoder {decoder}; numba threading layer {numba.threading_layer()}')


def write_data(args, work, sizes, rows) -> None:
    """speed.beton (imagewoof320 + imagenette, train + val, pooled and repeated to
    ``sizes.samples``) and imagenette_train/val.beton with their class lists."""
    from common import DEMO, pooled_samples
    from imagenet_ffcv import sources
    from imagenet_ffcv.classes import class_list_path, write_class_list
    from imagenet_ffcv.writer import write_beton
    root = data_root(args)
    sets = [root / 'imagewoof320', root / 'imagenette'] if root else [DEMO]
    pool = [s for folder in sets for s in pooled_samples(folder, 1)]
    jobs = [('speed.beton', pool * -(-sizes.samples // len(pool)))]
    nette = root / 'imagenette' if root else DEMO
    jobs += learn_run_samples(nette, train_images=sizes.learn_train_images,
                              val_images=sizes.learn_val_images).items()
    classes = sources.find_classes(nette / 'train')
    start, kept = time.perf_counter(), []
    for name, samples in jobs:
        if args.reuse_data and (work / name).exists():
            kept.append(name)  # written by an earlier run into the same --work (a second command)
            continue
        write_beton(samples, work / name, max_res=256, num_workers=os.cpu_count())
        if name.startswith('imagenette'):
            write_class_list(class_list_path(work / name), classes)
    rows.add(setting=f'from {root or "the embedded demo sample"}',
             result=', '.join(f'{n} {len(s):,}' for n, s in jobs)
             + f' images, written in {time.perf_counter() - start:.0f} s'
             + (f' ({", ".join(kept)} kept from an earlier run)' if kept else ''))


def loader_scaling(args, work, sizes, rows) -> None:
    """Our training loader alone on the device at each thread count: one warm-up epoch (numba
    compiles), then ``sizes.loader_epochs`` timed epochs; median img/s and spread, and per batch
    the parallel decode's ms and the serial ms of ffcv's iterator thread outside it (the copy to
    the device and normalisation included; ``common.batch_parts``)."""
    import torch

    from common import epoch_of, median_parts, our_loader, time_runs, with_batch_parts
    device, dtype = device_and_dtype(args)
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    for threads in sizes.loader_threads:
        loader, _ = our_loader(work / 'speed.beton', res=sizes.loader_res, workers=threads,
                               batch_size=sizes.loader_batch, device=device, dtype=dtype)
        parts = []
        t = time_runs(with_batch_parts(epoch_of(loader), loader, parts),
                      repeats=sizes.loader_epochs, sync=sync)
        decode_ms, serial_ms = median_parts(parts)
        rows.add(setting=f'loader, {sizes.loader_res} px, batch {sizes.loader_batch}, '
                         f'{threads} threads, epochs of {t.units[0]:,} images',
                 threads=threads, res=sizes.loader_res, batch=sizes.loader_batch,
                 img_per_s=round(t.rate, 1), spread=round(t.rate_spread, 1),
                 decode_ms=round(decode_ms, 3), serial_ms=round(serial_ms, 3),
                 result=f'{t.rate / threads:,.0f} img/s per thread; median of {len(t.rates)} '
                        f'epochs; per batch: decode {decode_ms:.2f} ms, serial {serial_ms:.3f} ms')
        del loader


def loader_options(args, work, sizes, rows) -> None:
    """Our training loader alone on the device at every core with its defaults, with each of
    ``sizes.loader_chunks`` (``decoders.PARALLEL_CHUNK``) and with ``loaders.COPY_WAIT='slot'``:
    one warm-up epoch each, then ``sizes.loader_epochs + 1`` rounds of alternating timed epochs;
    median img/s, spread."""
    import torch

    from common import alternate, epoch_of, our_loader, schedule_name
    from imagenet_ffcv import decoders, loaders
    device, dtype = device_and_dtype(args)
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    threads, runs = os.cpu_count(), {}
    defaults = (decoders.PARALLEL_CHUNK, loaders.COPY_WAIT)
    options = [defaults] + [(c, defaults[1]) for c in sizes.loader_chunks if c != defaults[0]]
    options += [(defaults[0], wait) for wait in ('batch', 'slot') if wait != defaults[1]]
    for chunk, wait in options:
        loader, _ = our_loader(work / 'speed.beton', res=sizes.loader_res, workers=threads,
                               batch_size=sizes.loader_batch, device=device, dtype=dtype,
                               chunk=chunk, copy_wait=wait)
        runs[chunk, wait] = epoch_of(loader)
    for (chunk, wait), t in alternate(runs, repeats=sizes.loader_epochs + 1, warmup=1,
                                      sync=sync).items():
        rows.add(setting=f'loader, {sizes.loader_res} px, batch {sizes.loader_batch}, {threads} '
                         f'threads, {schedule_name(chunk)}, COPY_WAIT={wait}'
                         + (' (the defaults)' if (chunk, wait) == defaults else ''),
                 threads=threads, chunk=chunk, copy_wait=wait, res=sizes.loader_res,
                 batch=sizes.loader_batch, img_per_s=round(t.rate, 1),
                 spread=round(t.rate_spread, 1),
                 result=f'{t.rate / threads:,.0f} img/s per thread; median of {len(t.rates)} '
                        f'alternating epochs of {t.units[0]:,} images')


def device_and_dtype(args) -> tuple:
    """The device and the images' dtype there (``training.amp=auto``: bf16 on a recent GPU)."""
    import torch

    from imagenet_ffcv.precision import resolve_precision
    device = torch.device(args.device)
    return device, resolve_precision('auto', device).input_dtype


def build(arch, device):
    """``models.build_model`` (BlurPool, channels_last, 1,000 classes) on ``device``; 'tiny': two
    convolutions and a linear layer (the CPU dry run's stand-in)."""
    import torch
    from torch import nn

    from imagenet_ffcv import models
    if arch == 'tiny':
        model = nn.Sequential(nn.Conv2d(3, 16, 3, 2), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, 2), nn.BatchNorm2d(32), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1000))
        model = model.to(memory_format=torch.channels_last)
    else:
        model = models.build_model(arch=arch, num_classes=1000, use_blurpool=True,
                                   channels_last=True)
    return model.to(device)


def sgd(model, impl: str):
    """SGD as the trainer makes it (momentum 0.9, its weight-decay groups) with ``impl``:
    'foreach' (torch's default on CUDA), 'fused' or 'for_loop'."""
    import torch

    from imagenet_ffcv import models
    options = {'foreach': {'foreach': True}, 'fused': {'fused': True},
               'for_loop': {'foreach': False}}[impl]
    return torch.optim.SGD(models.param_groups(model, weight_decay=5e-5, bn_wd=False), lr=0.01,
                           momentum=0.9, **options)


def compiled(model, mode: str):
    """``models.compile_model`` (mode default, static shapes; its recompile limit) or
    ``torch.compile(model, dynamic=False, mode=mode)``."""
    import torch

    from imagenet_ffcv import models
    if mode == 'default':
        return models.compile_model(model)
    return torch.compile(model, dynamic=False, mode=mode)


class Trainer:
    """The trainer's step (``engine.train_step``, label smoothing 0.1, the device's autocast)
    on a model and optimizer; ``steps(batches, n)`` trains on the next ``n`` batches of an
    iterator and returns the images, ``losses`` the float losses (a device sync per step)."""

    def __init__(self, net, optimizer, device):
        import torch

        from imagenet_ffcv import engine
        from imagenet_ffcv.precision import resolve_precision
        self.net, self.optimizer, self.engine, self.device = net, optimizer, engine, device
        precision = resolve_precision('auto', device)
        self.amp, self.dtype = precision.amp_dtype, precision.input_dtype
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(self, x, y):
        return self.engine.train_step(model=self.net, x=x, y=y, optimizer=self.optimizer,
                                      loss_fn=self.loss_fn, amp_dtype=self.amp)

    def steps(self, batches, n) -> int:
        images = 0
        for _ in range(n):
            x, y = next(batches)
            self.step(x, y)
            images += y.shape[0]
        return images

    def losses(self, batches, n) -> list:
        return [float(self.step(*next(batches))) for _ in range(n)]


def synthetic(batch, res, device, dtype):
    """An endless iterator over one random normalised batch on ``device`` (channels_last images,
    int64 labels in [0, 1000))."""
    import itertools

    import torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(device, dtype)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return itertools.repeat((x.contiguous(memory_format=torch.channels_last), y))


def real(loader, decoder, res):
    """An endless iterator over ``loader``'s batches at ``res`` px, after one whole epoch (its
    warm-up: numba compiles, buffers allocated)."""
    decoder.output_size = (res, res)
    for _ in loader:
        pass

    def endless():
        while True:
            yield from loader
    return endless()


def step_rows(rows, trainer, *, model, mode, res_list, sizes, loader, optimizer='foreach',
              batch=None) -> None:
    """Real and synthetic rows of ``trainer`` at each side (``loader``: (loader, decoder) of
    our training loader at the step's batch), by ``common.measure_feeds``: each feed's first step
    alone, ``sizes.step_warmup`` more, then ``sizes.step_windows`` alternating windows of
    ``sizes.step_steps`` steps, the real feed's each after ``sizes.step_settle`` untimed steps
    (the batches its loader made ready meanwhile); a feed that fails gives a failed row."""
    import torch

    from common import measure_feeds
    device, dtype = trainer.device, trainer.dtype
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    batch = batch or sizes.step_batch
    for res in res_list:
        feeds = {'synthetic': synthetic(batch, res, device, dtype),
                 'real': real(*loader, res)}
        results = measure_feeds(trainer.steps, feeds, steps=sizes.step_steps,
                                warmup=sizes.step_warmup + 1, windows=sizes.step_windows,
                                sync=sync, settle={'real': sizes.step_settle})
        for feed, r in results.items():
            row = dict(setting=f'{model}, {mode}, {res} px, batch {batch}, SGD {optimizer}, '
                               f'{feed}', model=model, mode=mode, res=res, batch=batch,
                       feed=feed, optimizer=optimizer)
            if 'error' in r:
                rows.add(**row, status='failed', result=f'FAILED: {r["error"]}')
                continue
            rows.add(**row, img_per_s=r['img_per_s'], spread=r['spread'],
                     first_step_s=r['first_step_s'],
                     result=f'median of {r["windows"]} windows of {sizes.step_steps} steps')
        feeds['real'].close()  # ends the loader's epoch


def our_feed(work, sizes, device, dtype, batch=None) -> tuple:
    """(loader, decoder): our training loader on speed.beton, every core, at the step's batch."""
    from common import our_loader
    return our_loader(work / 'speed.beton', res=sizes.step_res[0], workers=os.cpu_count(),
                      batch_size=batch or sizes.step_batch, device=device, dtype=dtype)


def eager(args, work, sizes, rows) -> None:
    """The big model at every side and the small one at the first, eager, real and synthetic."""
    import torch
    device, dtype = device_and_dtype(args)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    loader = our_feed(work, sizes, device, dtype)
    for model, res_list in ((sizes.big, sizes.step_res), (sizes.small, sizes.step_res[:1])):
        net = build(model, device)
        step_rows(rows, Trainer(net, sgd(net, 'foreach'), device), model=model, mode='eager',
                  res_list=res_list, sizes=sizes, loader=loader)


def variants(args, work, sizes, rows) -> None:
    """The big model at the first side, eager, synthetic: each (SGD implementation, batch) of
    ``sizes.variant_batches``, alternating windows after one warm-up window each."""
    import torch

    from common import alternate
    device, dtype = device_and_dtype(args)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    res, net = sizes.step_res[0], build(sizes.big, device)
    runs = {}
    for impl, batch in sizes.variant_batches:
        trainer, feed = Trainer(net, sgd(net, impl), device), synthetic(batch, res, device, dtype)
        runs[(impl, batch)] = lambda t=trainer, f=feed: t.steps(f, sizes.step_steps)
    for (impl, batch), t in alternate(runs, repeats=sizes.step_windows, warmup=1,
                                      sync=sync).items():
        rows.add(setting=f'{sizes.big}, eager, {res} px, batch {batch}, SGD {impl}, synthetic',
                 model=sizes.big, mode='eager', res=res, batch=batch, feed='synthetic',
                 optimizer=impl, img_per_s=round(t.rate, 1), spread=round(t.rate_spread, 1),
                 result=f'median of {len(t.rates)} windows of {sizes.step_steps} steps')


def loss_curve(rows, net, make_net, batches, sizes, device) -> None:
    """``sizes.curve_steps`` steps on ``batches`` (a list, cycled) from the same weights: eager
    twice, then ``make_net()`` (the compiled model): the mean |loss difference| per step of the
    second eager run and of the compiled one against the first eager run, over its mean loss."""
    import copy
    import itertools
    start = copy.deepcopy(net.state_dict())
    curves, first = [], None
    for run in ('eager', 'eager again', 'compiled'):
        net.load_state_dict(start)
        model = make_net() if run == 'compiled' else net
        begin = time.perf_counter()
        losses = Trainer(model, sgd(net, 'foreach'), device).losses(itertools.cycle(batches),
                                                                    sizes.curve_steps)
        first = time.perf_counter() - begin if run == 'compiled' else first
        curves.append(losses)
    mean = sum(curves[0]) / len(curves[0])
    noise, diff = (sum(abs(a - b) for a, b in zip(curves[0], c)) / len(c) / mean
                   for c in curves[1:])
    rows.add(setting=f'{sizes.big}, loss curve, {sizes.curve_steps} steps on '
                     f'{len(batches)} real batches cycled, compiled vs eager',
             model=sizes.big, mode='default', curve_noise=round(noise, 5),
             curve_diff=round(diff, 5), status='ok' if diff < CURVE_TOLERANCE else 'warning',
             result=f'mean |loss diff| / mean loss: compiled {diff:.4f}, eager again '
                    f'{noise:.4f} (tolerance {CURVE_TOLERANCE}); losses eager {curves[0][0]:.3f}'
                    f' -> {curves[0][-1]:.3f}, compiled {curves[2][0]:.3f} -> '
                    f'{curves[2][-1]:.3f}; {sizes.curve_steps} compiled steps took {first:.0f} s',
             first_step_s=round(first, 2))


def compile_default(args, work, sizes, rows) -> None:
    """The loss curve (eager twice, compiled once), then the compiled model's rows at every
    side: the first step at each side is its (re)compile."""
    import torch
    device, dtype = device_and_dtype(args)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    loader, decoder = our_feed(work, sizes, device, dtype)
    stream = real(loader, decoder, sizes.step_res[0])
    batches = [tuple(t.clone() for t in next(stream)) for _ in range(sizes.curve_batches)]
    stream.close()
    net = build(sizes.big, device)
    loss_curve(rows, net, lambda: compiled(net, 'default'), batches, sizes, device)
    del batches
    step_rows(rows, Trainer(compiled(net, 'default'), sgd(net, 'foreach'), device),
              model=sizes.big, mode='default', res_list=sizes.step_res, sizes=sizes,
              loader=(loader, decoder))


def compile_mode(mode):
    """A section: the big model compiled with ``mode`` at the first side, real and synthetic;
    with 'reduce-overhead', then how many compiled graphs ran without CUDA graphs (torch
    inductor's ``cudagraph_skips`` counter: its rows would otherwise look like mode default's)."""
    def section(args, work, sizes, rows) -> None:
        import torch
        from torch._dynamo.utils import counters
        device, dtype = device_and_dtype(args)
        torch.backends.cudnn.benchmark = device.type == 'cuda'
        net = build(sizes.big, device)
        step_rows(rows, Trainer(compiled(net, mode), sgd(net, 'foreach'), device),
                  model=sizes.big, mode=mode, res_list=sizes.step_res[:1], sizes=sizes,
                  loader=our_feed(work, sizes, device, dtype))
        if mode == 'reduce-overhead':
            skips = counters['inductor']['cudagraph_skips']
            rows.add(setting=f'{sizes.big}, {mode}: compiled graphs run without CUDA graphs',
                     model=sizes.big, mode=mode, cudagraph_skips=skips,
                     result=f'{skips} (torch inductor counter cudagraph_skips; 0: every '
                            'compiled graph was captured)')
    return section


def learn(args, work, sizes, rows) -> None:
    """``train.main``: ResNet-18 on imagenette with the trainer's defaults (RN18 recipe)."""
    from common import resnet18_run_args
    from imagenet_ffcv import config, train
    argv = resnet18_run_args(train=work / 'imagenette_train.beton',
                             val=work / 'imagenette_val.beton', folder=work / 'runs',
                             epochs=sizes.learn_epochs, batch_size=sizes.learn_batch,
                             res=sizes.learn_res, val_res=sizes.learn_val_res, val_batch_size=250)
    print('imagenet-ffcv-train ' + ' '.join(map(str, argv)), flush=True)
    summary = train.main(config.load_config(argv))
    rows.add(setting=f'learning run: ResNet-18, imagenette, {summary["epochs"]} epochs, batch '
                     f'{sizes.learn_batch}, the trainer\'s defaults', model='resnet18',
             img_per_s=round(summary['train_img_per_s'], 1), top_1=summary['top_1'],
             wall_time_s=round(summary['wall_time_s'], 1),
             result=f'top-1 {summary["top_1"]:.3f}, wall {summary["wall_time_s"]:.0f} s')


CHILDREN = {'machine': machine_info, 'data': write_data, 'loader': loader_scaling,
            'eager': eager, 'variants': variants, 'compile': compile_default, 'learn': learn,
            'cudagraphs': compile_mode('reduce-overhead'), 'loader_options': loader_options,
            'max_autotune': compile_mode('max-autotune')}

if __name__ == '__main__':
    arguments = parse_args(sys.argv[1:])
    sys.exit(child(arguments) if arguments.child else main(sys.argv[1:]))
