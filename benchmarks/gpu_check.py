"""The one-shot check of the CUDA path on a lent GPU machine, in one command of at most 8 minutes:
one Markdown report on stdout, ``bench-results/gpu.md``, ``gpu.csv`` and ``gpu-logs.txt`` (copied to
``$OUT`` when it is set).

    bash benchmarks/gpu_check.sh                   # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --device cpu    # the same flow on CPU with tiny sizes (dry run)
    bash benchmarks/gpu_check.sh --only learn,eval_only,predict   # again, some steps only

Steps, in order (``STEPS``): the machine (GPU, versions, which JPEG decoder is active); the data
(.beton files written from ``.carry/data`` or ``../shared/data``); the CUDA tests
(``pytest -m cuda tests/test_cuda.py``); the loader alone on the device; the training step
(``bench_train.py``: ResNet-50, bf16, channels_last, BlurPool) fed by our loader, by a synthetic
batch already on the GPU (the limit) and by ffcv's stock pipeline; a short ResNet-18 learning run
on imagenette (``train.main``), eval-only of its weights and ``predict.predict``.

Each step runs as a child process with its own time limit, inside one overall budget
(``--budget-s``): an exception inside an ffcv pipeline op leaves ffcv's loader waiting forever, so a
step that hangs is killed and reported, and the next one runs. The report is rewritten after every
step, so whatever finished is kept even if the whole command is killed.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import (CARRY, REPO, RESULTS, SHARED_DATA, commit, learn_run_samples, markdown_table,
                    resnet18_run_args, write_csv)

PYTHON = sys.executable


@dataclass(frozen=True)
class Sizes:
    """How much work each step does: the real check on CUDA, a dry run of the same flow on CPU.

    loader_*: images per epoch (the imagewoof320 images pooled and repeated), batch, sides (px),
    timed epochs per side. train_*: arch, sides (px), batch, steps per timed window, timed
    windows per feed (the feeds alternating), warm-up steps per feed.
    learn_*: epochs, batch, training sides (min, max px), validation side (px), LR per 256
    images, images taken from imagenette train/val (0: all). predict_images: val images
    classified by ``predict.predict``."""
    loader_samples: int
    loader_batch: int
    loader_res: tuple
    loader_epochs: int
    train_arch: str
    train_res: tuple
    train_batch: int
    train_steps: int
    train_windows: int
    train_warmup: int
    learn_epochs: int
    learn_batch: int
    learn_res: tuple
    learn_val_res: int
    learn_lr_per_256: float
    learn_train_images: int
    learn_val_images: int
    predict_images: int


SIZES = {
    'cuda': Sizes(loader_samples=4096, loader_batch=256, loader_res=(160, 192, 224),
                  loader_epochs=3, train_arch='resnet50', train_res=(160, 192), train_batch=256,
                  train_steps=20, train_windows=3, train_warmup=10, learn_epochs=16,
                  learn_batch=64, learn_res=(160, 192), learn_val_res=224, learn_lr_per_256=0.2,
                  learn_train_images=0, learn_val_images=0, predict_images=20),
    'cpu': Sizes(loader_samples=256, loader_batch=32, loader_res=(64, 96), loader_epochs=1,
                 train_arch='resnet18', train_res=(64,), train_batch=16, train_steps=2,
                 train_windows=2, train_warmup=1, learn_epochs=1, learn_batch=32,
                 learn_res=(64, 64), learn_val_res=64, learn_lr_per_256=0.2, learn_train_images=320,
                 learn_val_images=100, predict_images=4),
}
# The learning run passes above this top-1 on imagenette's 10 classes (chance: 0.1); its settings
# (SIZES['cuda']) reach about 0.6, so a broken CUDA path (wrong labels, pixels or gradients) fails.
PASS_TOP1 = 0.5


@dataclass(frozen=True)
class Step:
    """One step of the check: ``timeout_s`` its own limit (s), ``min_s`` the least time worth
    starting it with (later steps keep that much of the budget for themselves)."""
    name: str
    title: str
    timeout_s: int
    min_s: int


STEPS = [Step('machine', 'machine', 60, 10), Step('data', 'data', 90, 15),
         Step('tests', 'CUDA tests', 200, 40), Step('loader', 'loader alone', 90, 25),
         Step('train', 'training step', 120, 40), Step('train_stock', 'training step', 90, 30),
         Step('learn', 'learning run', 150, 60), Step('eval_only', 'eval-only', 60, 15),
         Step('predict', 'predict', 60, 15)]


# ---------------------------------------------------------------------------------------------
# The parent: runs each step as a child process within the budget, and writes the report.

def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.budget_s
    steps = [s for s in STEPS if s.name in selected(args.only)]
    timeouts = {s.name: s.timeout_s for s in STEPS}
    timeouts.update(args.timeout)
    work = Path(args.work or tempfile.mkdtemp(prefix='gpu_check_'))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(args, started, work)
    print(f'gpu_check: device {args.device}, budget {args.budget_s} s, steps '
          f'{", ".join(s.name for s in steps)}; work folder {work}', flush=True)
    for i, step in enumerate(steps):
        left = deadline - time.time() - sum(s.min_s for s in steps[i + 1:])
        limit = min(timeouts[step.name], left)
        if limit < min(step.min_s, timeouts[step.name]):
            report.add(step, [{'setting': '', 'status': 'skipped',
                               'result': f'not run: {max(0, deadline - time.time()):.0f} s '
                                         f'left of the {args.budget_s:.0f} s budget'}])
            continue
        print(f'[{time.time() - started:5.0f} s] {step.name} (limit {limit:.0f} s) ...', flush=True)
        rows = run_step(step, args, work, limit)
        report.add(step, rows)
        print(f'[{time.time() - started:5.0f} s] {step.name}: '
              f'{"; ".join(r.get("result") or "" for r in rows)[:200]}', flush=True)
    text = report.write()
    print('\n' + text, flush=True)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r['status'] in ('failed', 'timeout') for r in report.rows) else 0


def selected(only) -> set:
    """The steps to run: all, or those of ``--only`` with the machine step (the report's header)
    and the data step (the .beton files) when a step needs it."""
    if not only:
        return {s.name for s in STEPS}
    return set(only) | {'machine'} | ({'data'} if set(only) - {'machine', 'tests'} else set())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                   help='cuda: the check; cpu: the same flow with tiny sizes (dry run)')
    p.add_argument('--budget-s', type=float, default=440,
                   help='wall-clock budget of all steps (s); later steps are skipped past it')
    p.add_argument('--only', type=lambda s: s.split(','), default=None,
                   help=f'comma-separated steps to run, from {",".join(s.name for s in STEPS)}; '
                        'machine, and data where needed, run too (eval_only and predict use the '
                        'weights of the learn step)')
    p.add_argument('--timeout', action='append', default=[], metavar='STEP=SECONDS',
                   type=lambda s: (s.split('=')[0], float(s.split('=')[1])),
                   help='override one step\'s time limit (repeatable)')
    p.add_argument('--data', help='folder holding imagenette/ and imagewoof320/ (default: '
                                  '.carry/data, else ../shared/data, else the demo sample)')
    p.add_argument('--work', help='folder for betons, runs and step logs (default: a temporary '
                                  'folder, removed at the end)')
    p.add_argument('--keep-work', action='store_true', help='keep the temporary work folder')
    p.add_argument('--out', default=str(RESULTS), help='where gpu.md, gpu.csv, gpu-logs.txt go')
    p.add_argument('--child', help=argparse.SUPPRESS)  # internal: run one step's body
    args = p.parse_args(argv)
    args.timeout = dict(args.timeout)
    known = {s.name for s in STEPS}
    for name in list(args.only or []) + list(args.timeout):
        if name not in known:
            p.error(f'unknown step {name!r}; steps: {", ".join(sorted(known))}')
    return args


def data_root(args) -> Path:
    """The folder holding imagenette/ and imagewoof320/: --data, .carry/data, ../shared/data,
    else the embedded demo sample (standing in for both, with a note in the report)."""
    for root in ([Path(args.data)] if args.data else []) + [CARRY / 'data', SHARED_DATA]:
        if (root / 'imagenette' / 'train').is_dir() and (root / 'imagewoof320' / 'train').is_dir():
            return root
    return None


def child_env() -> dict:
    """The environment of every child: this one's (PYTHONPATH and LD_LIBRARY_PATH from
    .carry/activate.sh included) with the repository on the path, unbuffered output."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED='1')


def run_process(cmd, *, timeout_s, log_path, env=None) -> tuple:
    """Run ``cmd`` (in the repo root, its own process group, output to ``log_path``) for at most
    ``timeout_s`` seconds: ``(exit status or None on timeout, seconds)``. On timeout the whole
    group gets SIGTERM, then SIGKILL 5 s later (ffcv's threads do not stop on their own)."""
    start = time.time()
    with open(log_path, 'ab') as log:
        log.write(f'$ {" ".join(map(str, cmd))}\n'.encode())
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env or child_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            rc = None
    return rc, time.time() - start


def log_tail(path, lines: int = 8) -> str:
    """The last ``lines`` lines of a log, progress bars (carriage-return updates) dropped."""
    try:
        text = Path(path).read_text(errors='replace')
    except OSError:
        return ''
    kept = [line.split('\r')[-1].rstrip() for line in text.splitlines()]
    return '\n'.join([line for line in kept if line.strip()][-lines:])


def run_step(step, args, work, limit) -> list:
    """Run one step as a child process; its rows (dicts with at least 'setting', 'status',
    'result'), or one row saying how it failed."""
    log = work / f'{step.name}.log'
    log.unlink(missing_ok=True)
    if step.name == 'tests':
        return run_tests(args, work, limit, log)
    if step.name in ('train', 'train_stock'):
        return run_bench_train(step, args, work, limit, log)
    out = work / f'{step.name}.json'
    out.unlink(missing_ok=True)
    cmd = [PYTHON, Path(__file__), '--child', step.name, '--device', args.device,
           '--work', work, '--budget-s', limit]
    if args.data:
        cmd += ['--data', args.data]
    rc, seconds = run_process(cmd, timeout_s=limit, log_path=log)
    if rc == 0 and out.exists():
        rows = json.loads(out.read_text())
        for r in rows:
            r.setdefault('seconds', round(seconds, 1))
        return rows
    return [failure_row(rc, seconds, limit, log)]


def failure_row(rc, seconds, limit, log) -> dict:
    """The row of a child that did not finish: timed out, or exited with an error."""
    tail = log_tail(log, 1)
    if rc is None or re.search(r'^Timeout \(\d+:\d\d:\d\d\)!$', log_tail(log, 400), re.M):
        return {'setting': '', 'status': 'timeout', 'seconds': round(seconds, 1),
                'result': f'TIMEOUT after {limit:.0f} s (last output: {tail[:150]})'}
    return {'setting': '', 'status': 'failed', 'seconds': round(seconds, 1),
            'result': f'FAILED (exit {rc}): {tail[:200]}'}


def run_tests(args, work, limit, log) -> list:
    """``pytest -m cuda tests/test_cuda.py``: counts of passed/failed/skipped/xfailed tests and
    the names of the failing ones; cut at its limit, those of the tests that finished (from the
    per-test lines of ``-v``, :func:`pytest_outcomes`). With pytest-xdist, 4 test processes
    share the GPU: one after the other the tests took about 290 s on an H100 at the first check,
    mostly numba compiling each loader's pipeline (since compiled once per process,
    ``decoders.batch_decoder``) and two runs in CPU processes, more than the check's budget
    holds."""
    cmd = [PYTHON, '-m', 'pytest', '-m', 'cuda', 'tests/test_cuda.py', '-v', '-rfEsxX',
           '-p', 'no:cacheprovider', '--durations=8']
    probe = subprocess.run([PYTHON, '-c', 'import pytest, importlib.util as u; '
                                          'print(*(u.find_spec(m) is not None for m in '
                                          '("pytest_timeout", "xdist")))'],
                           capture_output=True, text=True, env=child_env(), cwd=REPO)
    setting = 'pytest -m cuda tests/test_cuda.py'
    if probe.returncode != 0:
        return [{'setting': setting, 'status': 'skipped',
                 'result': 'pytest is not installed here: CUDA tests not run'}]
    has_timeout, has_xdist = (word == 'True' for word in probe.stdout.split())
    if has_timeout:  # pytest-timeout: one hanging test fails alone
        cmd += ['--timeout=90']
    if has_xdist and args.device == 'cuda':
        cmd += ['-n', '4']
        setting += ' -n 4'
    rc, seconds = run_process(cmd, timeout_s=limit, log_path=log)
    text = Path(log).read_text(errors='replace')
    # pytest's summary line; numba's finalizers may print warnings after it at exit
    summaries = [line for line in text.splitlines()
                 if re.search(r'\d+ (passed|failed|skipped|errors?)\b.* in [\d.]+s', line)]
    counts = re.findall(r'(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)',
                        summaries[-1] if summaries else '')
    summary = ', '.join(f'{n} {what}' for n, what in counts) or 'no summary line'
    row = {'setting': setting, 'seconds': round(seconds, 1), 'tests': summary}
    if rc is None:  # no summary line: what each finished test's line said
        outcomes = pytest_outcomes(text)
        done = ', '.join(f'{n} {what.lower()}' for what, n in Counter(outcomes.values()).items())
        failing = [t.split('::', 1)[-1] for t, what in outcomes.items()
                   if what in ('FAILED', 'ERROR')]
        return [{**row, 'tests': done, 'status': 'timeout',
                 'result': f'TIMEOUT after {limit:.0f} s, with {done or "no test"} finished'
                           + (f'; failing: {", ".join(failing)}' if failing else '')}]
    # the short summary's lines (a test's own output printed above it may look the same)
    failing = re.findall(r'^(?:FAILED|ERROR) (\S+)', text.rpartition('short test summary')[2],
                         re.M)
    status = 'ok' if rc == 0 else 'failed'
    result = summary + (f'; failing: {", ".join(f.split("::", 1)[-1] for f in failing)}'
                        if failing else '')
    return [{**row, 'status': status, 'result': result}]


# pytest -v's line for each finished test: 'tests/t.py::name PASSED  [ 50%]' in one process,
# '[gw0] [ 50%] PASSED tests/t.py::name' with pytest-xdist.
OUTCOMES = 'PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS'
OUTCOME_LINE = re.compile(rf'^\[gw\d+\] \[ *\d+%\] (?P<xdist>{OUTCOMES}) (?P<xdist_id>\S+::.+?) *$'
                          rf'|^(?P<id>\S+::.+?) (?P<outcome>{OUTCOMES})\b', re.M)


def pytest_outcomes(text: str) -> dict:
    """Test id -> outcome ('PASSED', 'FAILED', 'ERROR', 'SKIPPED', 'XFAIL', 'XPASS') from the
    per-test lines of ``pytest -v`` output, in one process or with pytest-xdist: what a run cut
    at its limit, which prints no summary line, had finished."""
    return {m['xdist_id'] or m['id']: m['xdist'] or m['outcome']
            for m in OUTCOME_LINE.finditer(text)}


def run_bench_train(step, args, work, limit, log) -> list:
    """``bench_train.py`` on the pooled imagewoof320 .beton of the data step: the training step
    fed by our loader and by the synthetic batch ('train'), or by ffcv's stock pipeline
    ('train_stock'), in separate processes so that a hang of one loader costs only its rows."""
    sizes = SIZES[args.device]
    beton = work / 'train.beton'
    if not beton.exists():
        return [{'setting': '', 'status': 'skipped',
                 'result': 'no train.beton: the data step failed'}]
    feeds = 'synthetic,ours' if step.name == 'train' else 'ffcv_stock'
    out = work / step.name
    cmd = [PYTHON, REPO / 'benchmarks' / 'bench_train.py', '--device', args.device,
           '--arch', sizes.train_arch, '--res', ','.join(map(str, sizes.train_res)),
           '--batch-size', sizes.train_batch, '--steps', sizes.train_steps,
           '--windows', sizes.train_windows, '--warmup', sizes.train_warmup, '--feeds', feeds,
           '--beton', beton, '--out', out,
           '--compile', '0']  # eager only: compiling ResNet-50 would not fit the check's time
    rc, seconds = run_process(cmd, timeout_s=limit, log_path=log)
    if rc != 0 or not (out / 'train.csv').exists():
        return [failure_row(rc, seconds, limit, log)]
    rows = []
    for r in csv.DictReader(open(out / 'train.csv')):
        setting = (f'{r["arch"]}, {r["precision"]}, {r["res"]} px, batch {r["batch_size"]}, '
                   f'fed by {r["feed"]}')
        row = {'setting': setting, 'res': int(r['res']), 'feed': r['feed'],
               'seconds': round(seconds, 1)}
        if r.get('error'):
            rows.append({**row, 'status': 'failed', 'result': f'FAILED: {r["error"]}'})
        else:
            rows.append({**row, 'status': 'warning' if r.get('warning') else 'ok',
                         'img_per_s': float(r['img_per_s']),
                         'result': f'median of {r["windows"]} windows of {r["steps"]} steps '
                                   f'(spread {float(r["spread"]):,.0f} img/s)'
                                   + (f'; WARNING: {r["warning"]}' if r.get('warning') else '')})
    return rows


class Report:
    """The rows of the finished steps, and the report made of them: gpu.md (the Markdown
    printed at the end), gpu.csv (one line per row) and gpu-logs.txt (every step's log)."""

    def __init__(self, args, started, work):
        self.args, self.started, self.work = args, started, work
        self.rows = []
        self.out = Path(args.out)

    def add(self, step, rows) -> None:
        for r in rows:
            self.rows.append({'step': step.name, 'title': step.title, **r})
        self.write()

    def machine(self) -> dict:
        return next((r for r in self.rows if r['step'] == 'machine' and 'card' in r), {})

    def ratios(self) -> None:
        """Training rows: img/s over the synthetic feed at the same side (the headline: 1.00 =
        loading costs the loop nothing). Loader rows: loader img/s over the synthetic training
        step at that side (above 1: the loader alone is faster than the GPU consumes)."""
        limit = {r['res']: r['img_per_s'] for r in self.rows
                 if r['step'] == 'train' and r.get('feed', '').startswith('synthetic')
                 and r.get('img_per_s')}
        for r in self.rows:
            if r.get('img_per_s') and r.get('res') in limit and r['step'] in (
                    'train', 'train_stock', 'loader'):
                r['ratio'] = round(r['img_per_s'] / limit[r['res']], 2)

    def write(self) -> str:
        self.ratios()
        m = self.machine()
        when = time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))
        lines = [f'## GPU check: {m.get("card", "(machine step missing)")}, {when}, commit '
                 f'{commit()}', '']
        if m:
            lines += [f'- nvidia-smi: {nvidia_smi()}',
                      f'- {m["versions"]}', f'- decoder: {m["decoder"]}', f'- ffcv: {m["ffcv"]}']
        lines += [f'- device {self.args.device}; budget {self.args.budget_s:.0f} s, used '
                  f'{time.time() - self.started:.0f} s', '']
        lines.append(markdown_table(self.rows, [
            ('title', 'step', ''), ('setting', 'setting', ''), ('img_per_s', 'img/s', ',.0f'),
            ('ratio', 'ratio', '.2f'), ('result', 'result', ''), ('seconds', 's', '.0f')]))
        lines += ['', 'ratio: training rows, img/s over the synthetic batch already on the device '
                  'at the same side (1.00: loading costs the step nothing); loader rows, loader '
                  'img/s over that synthetic training step (above 1: the loader outruns the GPU).']
        problems = [r for r in self.rows if r['status'] in ('failed', 'timeout')]
        for step in dict.fromkeys(r['step'] for r in problems):
            tail = log_tail(self.work / f'{step}.log', 10)
            if tail:
                lines += ['', f'### {step}: last lines of its log', '', '```', tail, '```']
        text = '\n'.join(lines) + '\n'
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / 'gpu.md').write_text(text)
        write_csv(self.out / 'gpu.csv', [{k: v for k, v in r.items() if k != 'title'}
                                         for r in self.rows])
        with open(self.out / 'gpu-logs.txt', 'w') as f:
            for step in STEPS:
                log = self.work / f'{step.name}.log'
                if log.exists():
                    f.write(f'===== {step.name} =====\n{log_tail(log, 400)}\n')
        if os.environ.get('OUT'):
            Path(os.environ['OUT']).mkdir(parents=True, exist_ok=True)
            for name in ('gpu.md', 'gpu.csv', 'gpu-logs.txt'):
                shutil.copy(self.out / name, Path(os.environ['OUT']) / name)
        return text


_smi = None


def nvidia_smi() -> str:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version`` (or why there is none)."""
    global _smi
    if _smi is None:
        try:
            r = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                                '--format=csv,noheader'], capture_output=True, text=True,
                               timeout=30)
            _smi = r.stdout.strip().replace('\n', '; ') or r.stderr.strip()[:100]
        except (OSError, subprocess.SubprocessError) as e:
            _smi = f'not available ({type(e).__name__})'
    return _smi


# ---------------------------------------------------------------------------------------------
# The children: each step's body, in its own process; each returns its rows (written as JSON).

def child(args) -> int:
    """Run step ``args.child`` in this process and write its rows to WORK/STEP.json."""
    import faulthandler
    # A hang shows where it is: every thread's stack and 'Timeout (h:mm:ss)!' in the log, and the
    # process exits, just before the parent would kill it.
    limit = float(args.budget_s)
    faulthandler.dump_traceback_later(limit - 2 if limit > 4 else limit + 1, exit=True)
    rows = CHILDREN[args.child](args, Path(args.work), SIZES[args.device])
    (Path(args.work) / f'{args.child}.json').write_text(json.dumps(rows, default=str))
    return 0


def machine_info(args, work, sizes) -> list:
    """The card, torch/CUDA/cuDNN versions, CPU cores, and which JPEG decoder is active."""
    import platform

    import numba
    import torch

    import ffcv
    from imagenet_ffcv import jpeg_region
    from imagenet_ffcv.precision import native_bf16
    cuda = torch.cuda.is_available()
    if args.device == 'cuda' and not cuda:
        raise SystemExit('torch.cuda.is_available() is False: no usable GPU here')
    card = torch.cuda.get_device_name(0) if cuda else 'no GPU (CPU dry run)'
    extra = ''
    if cuda:
        cap = torch.cuda.get_device_capability(0)
        extra = (f', compute capability {cap[0]}.{cap[1]}, bf16 '
                 f'{"yes" if native_bf16(torch.device("cuda", 0)) else "no"}')
    versions = (f'Python {platform.python_version()}, torch {torch.__version__}, CUDA '
                f'{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, numba '
                f'{numba.__version__}{extra}, {os.cpu_count()} CPU cores')
    active = jpeg_region.region_decoder() is not None
    jpeg = [line.split()[-1] for line in Path('/proc/self/maps').read_text().splitlines()
            if 'libjpeg.so' in line]
    decoder = (f'region (libjpeg-turbo partial decode: {jpeg_region.library_path().name}, '
               f'libjpeg {jpeg[0] if jpeg else "?"})' if active else
               'FALLBACK: whole-image decode by ffcv (about half as fast); the C part could '
               'not be built or loaded (see this step\'s log)')
    ffcv_from = Path(ffcv.__file__).parent
    return [{'setting': card, 'status': 'ok' if active else 'warning',
             'result': f'decoder {"region" if active else "FALLBACK"}; {versions}',
             'card': card, 'versions': versions, 'decoder': decoder,
             'ffcv': f'{ffcv_from}' + (' (from .carry)' if 'ffcv-carry' in str(ffcv_from)
                                       else '')}]


def write_data(args, work, sizes) -> list:
    """The .beton files of the later steps, as imagenet-ffcv-write writes them (JPEG q90, shorter
    side at most 256): imagewoof320 pooled to the loader's and the training step's sizes,
    imagenette train and val with their class lists."""
    from common import pooled_samples
    from imagenet_ffcv import sources
    from imagenet_ffcv.classes import class_list_path, write_class_list
    from imagenet_ffcv.writer import write_beton
    root = data_root(args)
    woof = root / 'imagewoof320' if root else REPO / 'demo' / 'imagenette_sample'
    nette = root / 'imagenette' if root else REPO / 'demo' / 'imagenette_sample'
    train_samples = sizes.train_batch * (sizes.train_warmup + sizes.train_steps + 1)
    jobs = [('loader.beton', pooled_samples(woof, sizes.loader_samples)),
            ('train.beton', pooled_samples(woof, train_samples))]
    jobs += learn_run_samples(nette, train_images=sizes.learn_train_images,
                              val_images=sizes.learn_val_images).items()
    classes = sources.find_classes(nette / 'train')
    start, images = time.perf_counter(), 0
    for name, samples in jobs:
        write_beton(samples, work / name, max_res=256, num_workers=os.cpu_count())
        images += len(samples)
        if name.startswith('imagenette'):
            write_class_list(class_list_path(work / name), classes)
    seconds = time.perf_counter() - start
    counts = {name: len(samples) for name, samples in jobs}
    source = f'{root}' if root else 'the embedded demo sample (no imagenette/imagewoof320 found)'
    return [{'setting': f'from {source}', 'status': 'ok', 'img_per_s': None,
             'result': ', '.join(f'{k} {v:,}' for k, v in counts.items())
                       + f' images, written in {seconds:.0f} s ({images / seconds:,.0f} img/s)'}]


def loader_alone(args, work, sizes) -> list:
    """Our training loader on its own, on the device: img/s at each side, the median of timed
    epochs after one warm-up epoch (numba compiles the pipeline at its first batch), the device
    synchronised around each epoch."""
    import torch

    from common import our_loader, time_runs
    from imagenet_ffcv.precision import resolve_precision
    device = torch.device(args.device)
    dtype = resolve_precision('auto', device).input_dtype
    workers = os.cpu_count()
    loader, decoder = our_loader(work / 'loader.beton', res=sizes.loader_res[0], workers=workers,
                                 batch_size=sizes.loader_batch, device=device, dtype=dtype)

    def epoch() -> int:
        n = 0
        for x, y in loader:
            n += y.shape[0]
        if x.dtype != (dtype if device.type == 'cuda' else torch.float32):
            raise TypeError(f'batches came as {x.dtype}')
        return n

    sync = torch.cuda.synchronize if device.type == 'cuda' else None
    rows = []
    for res in sizes.loader_res:
        decoder.output_size = (res, res)
        timing = time_runs(epoch, repeats=sizes.loader_epochs, sync=sync)
        rows.append({'setting': f'ours, {res} px, batch {sizes.loader_batch}, {workers} threads, '
                                f'{str(dtype).replace("torch.", "")} on {device.type}',
                     'res': res, 'status': 'ok', 'img_per_s': round(timing.rate, 1),
                     'result': f'median of {len(timing.rates)} timed epoch(s) of '
                               f'{len(loader) * sizes.loader_batch:,} images (spread '
                               f'{timing.rate_spread:,.0f} img/s)'})
    return rows


def learn_argv(work, sizes) -> list:
    """imagenet-ffcv-train's options for the learning run: ResNet-18 (``resnet18_run_args``) on
    the imagenette betons, with this check's epochs, batch, sides and LR."""
    return resnet18_run_args(train=work / 'imagenette_train.beton',
                             val=work / 'imagenette_val.beton', folder=work / 'runs',
                             epochs=sizes.learn_epochs, batch_size=sizes.learn_batch,
                             res=sizes.learn_res, val_res=sizes.learn_val_res,
                             val_batch_size=250, lr_per_256=sizes.learn_lr_per_256)


def learn(args, work, sizes) -> list:
    """A short ResNet-18 run on imagenette with ``train.main``: final top-1 (centre crop
    + flip TTA), epochs, wall time, whether it passed PASS_TOP1."""
    from imagenet_ffcv import train
    from imagenet_ffcv import config
    argv = learn_argv(work, sizes)
    print('imagenet-ffcv-train ' + ' '.join(argv), flush=True)
    summary = train.main(config.load_config(argv))
    passed = summary['top_1'] > PASS_TOP1
    (work / 'weights.txt').write_text(str(Path(summary['run_dir']) / 'final_weights.pt'))
    sides = '-'.join(str(r) for r in sorted(set(sizes.learn_res)))
    return [{'setting': f'ResNet-18, imagenette {count_of(work, "train"):,}/'
                        f'{count_of(work, "val"):,} images, {summary["epochs"]} epochs at {sides} '
                        f'px, batch {sizes.learn_batch}, {precision_name()}, val '
                        f'{sizes.learn_val_res} px + flip',
             'status': 'ok' if passed or args.device == 'cpu' else 'failed',
             'img_per_s': round(summary['train_img_per_s'], 1),
             'top_1': summary['top_1'], 'epochs': summary['epochs'],
             'wall_time_s': round(summary['wall_time_s'], 1),
             'result': f'top-1 {summary["top_1"]:.3f} after {summary["epochs"]} epochs, wall '
                       f'{summary["wall_time_s"]:.0f} s: '
                       f'{"PASSED" if passed else "did NOT pass"} {PASS_TOP1}'
                       + (' (not expected on the CPU dry run)' if args.device == 'cpu'
                          and not passed else '')}]


def precision_name() -> str:
    """The mixed precision training.amp=auto picks here (bf16, fp16 or fp32)."""
    import torch

    from imagenet_ffcv.precision import resolve_precision
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return resolve_precision('auto', device).name


def count_of(work, split) -> int:
    from imagenet_ffcv.betons import num_samples
    return num_samples(work / f'imagenette_{split}.beton')


def weights_of(work) -> Path:
    path = work / 'weights.txt'
    if not path.exists():
        raise SystemExit('no weights: the learn step did not finish')
    return Path(path.read_text().strip())


def eval_only(args, work, sizes) -> list:
    """``--training.eval_only=1`` of the learning run's final weights: top-1 against the one the
    run logged (the same loader and precision, so equal or within an image or two)."""
    from imagenet_ffcv import train
    from imagenet_ffcv import config
    weights = weights_of(work)
    logged = json.loads((weights.parent / 'log.jsonl').read_text().splitlines()[-1])['top_1']
    start = time.perf_counter()
    summary = train.main(config.load_config(
        learn_argv(work, sizes) + ['--training.eval_only=1', f'--model.weights={weights}']))
    seconds = time.perf_counter() - start
    diff = round(abs(summary['top_1'] - logged) * summary['val_count'])
    return [{'setting': f'final_weights.pt, {summary["val_count"]} val images, '
                        f'{sizes.learn_val_res} px + flip',
             'status': 'ok' if diff <= 2 else 'failed',
             'img_per_s': round(summary['val_count'] / seconds, 1),
             'result': f'top-1 {summary["top_1"]:.3f}, the run logged {logged:.3f} '
                       f'({diff} image(s) apart)'}]


def predict_step(args, work, sizes) -> list:
    """``predict.predict`` on a few imagenette val images (two per class where there are that
    many): top-1 against their folders' labels."""
    import torch

    from imagenet_ffcv import predict
    weights = weights_of(work)
    root = data_root(args)
    val = (root / 'imagenette' / 'val') if root else REPO / 'demo' / 'imagenette_sample' / 'val'
    files = [f for d in sorted(val.iterdir()) for f in sorted(d.glob('*.JPEG'))[:2]]
    files = files[:sizes.predict_images]
    device = torch.device(args.device)
    start = time.perf_counter()
    results = predict.predict(files, weights=weights, top=5, device=device)
    seconds = time.perf_counter() - start
    hits = sum(r[0][0] == f.parent.name for r, f in zip(results, files))
    return [{'setting': f'{len(files)} imagenette val JPEGs on {device.type}', 'status': 'ok',
             'img_per_s': round(len(files) / seconds, 1),
             'result': f'top-1 right for {hits}/{len(files)}; first: {files[0].name} -> '
                       f'{results[0][0][1] or results[0][0][0]} ({results[0][0][2]:.2f})'}]


CHILDREN = {'machine': machine_info, 'data': write_data, 'loader': loader_alone, 'learn': learn,
            'eval_only': eval_only, 'predict': predict_step}


if __name__ == '__main__':
    arguments = parse_args(sys.argv[1:])
    sys.exit(child(arguments) if arguments.child else main(sys.argv[1:]))
