"""The benchmarks run end to end on the embedded sample and keep their output contract (the
numbers themselves are for the tables, not for tests)."""
import csv
import importlib.util
import itertools
import re
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO, run_env

pytestmark = pytest.mark.slow


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec('nvidia.dali') is not None
    except ModuleNotFoundError:  # no nvidia namespace at all
        return False


def test_bench_loader_writes_the_contract_csv_and_a_chart(tmp_path, monkeypatch):
    """Ours and its peers at the smallest; DALI's rows where DALI is installed (make bench
    installs it, CI does not), else the line that says they are skipped."""
    result = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'bench_loader.py'), '--sets', 'none', '--res', '64',
         '--min-samples', '256', '--batch-size', '32', '--runs', '1', '--no-ablations',
         '--out', str(tmp_path)], env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'embedded demo sample' in result.stdout  # says what it measured instead
    rows = list(csv.DictReader(open(tmp_path / 'loader.csv')))
    assert {'data', 'pipeline', 'res', 'workers', 'img_per_s'} <= set(rows[0])
    pipelines = {'ffcv', 'ffcv_stock', 'torchvision', 'decode_limit'}
    skipped = ('DALI (nvidia-dali-cuda130 2.4.0) not installed: its rows are skipped; '
               'make bench installs it')
    if _dali_installed():
        pipelines |= {'dali', 'dali_antialias'}
        assert skipped not in result.stdout
        monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))  # and where it is missing:
        monkeypatch.setitem(sys.modules, 'nvidia.dali', None)  # (import raises ImportError)
        from bench_loader import dali_missing
        assert dali_missing() == skipped
    else:
        assert skipped in result.stdout
    assert {r['pipeline'] for r in rows} == pipelines
    assert all(float(r['img_per_s']) > 0 for r in rows)
    ours = next(r for r in rows if r['pipeline'] == 'ffcv')
    assert float(ours['x_torchvision']) > 0 and float(ours['pct_of_decode_limit']) > 0
    assert (float(ours['x_dali']) > 0) if 'dali' in pipelines else not ours.get('x_dali')
    assert re.search(r'^\| ffcv +\| 64 +\|', result.stdout, re.M)  # the Markdown table
    assert (tmp_path / 'loader.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_loader_profile_splits_the_time_per_image(monkeypatch):
    """loader_profile.py's steps on the embedded sample's JPEGs stored with restart markers, in
    this process (bench_loader's test runs the loader): each step's µs per image, every crop
    decoded the marker way, and the fraction of the pixels decoded for random-resized crops
    (below 1). Without markers no crop goes the marker way (and no small JPEG is entropy-decoded)."""
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import numpy as np
    from loader_profile import stage_costs
    from imagenet_ffcv.images import encode_jpeg, load_image
    paths = sorted((REPO / 'demo' / 'imagenette_sample' / 'train').glob('*/*'))[:8]
    pixels = [np.ascontiguousarray(load_image(path, 256)) for path in paths]
    for interval in (4, 0):
        jpegs = [(encode_jpeg(a, quality=90, restart_interval=interval), *a.shape[:2])
                 for a in pixels]
        costs = stage_costs(jpegs, res=64, crops=2, runs=1)
        assert set(costs) == {'whole_decode_us', 'region_decode_us', 'no_markers_us',
                              'marker_way_fraction', 'intervals_us', 'entropy_us', 'idct_us',
                              'decoded_fraction', 'resample_f32_us', 'resample_u8_us'}
        assert all(0 < costs[k] < 1e5 for k in ('whole_decode_us', 'region_decode_us',
                                                 'no_markers_us', 'resample_f32_us',
                                                 'resample_u8_us')), costs
        assert 0 < costs['decoded_fraction'] < 1
        assert costs['marker_way_fraction'] == (1.0 if interval else 0.0), costs
    assert costs['entropy_us'] == 0.0


def test_bench_train_times_both_feeds_over_the_same_windows(tmp_path):
    """bench_train.py at its smallest, eager only (compiling even a small torchvision model takes
    30-70 s on 2 cores; compiled = eager is tested in test_models.py): a row per feed with the
    compile column, the median img/s of as many windows for each feed, their spread, the first
    step's seconds (where torch.compile's time goes when on), the loader's percentage of the
    synthetic feed, and the warning column (whatever this machine's timing, a warning in a row
    comes with its WARNING line)."""
    result = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'bench_train.py'), '--res', '32', '--batch-size', '8',
         '--steps', '1', '--warmup', '1', '--windows', '2', '--feeds', 'synthetic,ours',
         '--compile', '0', '--workers', '2', '--out', str(tmp_path)],
        env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / 'train.csv')))
    assert [(r['compile'], r['feed']) for r in rows] == [('0', 'synthetic (no loading)'),
                                                         ('0', 'our loader')]
    assert [r['windows'] for r in rows] == ['2', '2']
    for r in rows:
        assert float(r['img_per_s']) > 0 and float(r['spread']) >= 0
        assert float(r['first_step_s']) > 0
    assert float(rows[1]['pct_of_synthetic']) > 0 and rows[0]['pct_of_synthetic'] == ''
    assert ('WARNING:' in result.stdout) == bool(rows[1]['warning'])
    assert re.search(r'^\| 32 +\| synthetic \(no loading\) +\| fp32 +\| 0 +\|', result.stdout,
                     re.M)


@pytest.fixture
def benchmarks(monkeypatch):
    """The benchmarks folder on the path, as when a benchmark runs."""
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))


def test_alternate_times_each_function_in_turn_after_the_warm_up(benchmarks):
    """common.alternate: the warm-up calls first, then rounds in the given order and in reverse
    (A B, B A, ...), the same number of timed calls for each, with the work each returned."""
    from common import alternate
    calls = []

    def run(name, images):
        def call():
            calls.append(name)
            return images
        return call
    timings = alternate({'a': run('a', 8), 'b': run('b', 16)}, repeats=3, warmup=2)
    assert calls == ['a', 'a', 'b', 'b'] + ['a', 'b', 'b', 'a', 'a', 'b']
    assert [len(t.seconds) for t in timings.values()] == [3, 3]
    assert timings['a'].units == [8] * 3 and timings['b'].units == [16] * 3
    assert all(s > 0 for t in timings.values() for s in t.seconds)


def test_alternate_settles_each_run_untimed_before_its_timed_calls(benchmarks):
    """common.alternate's ``settle``: called just before each timed call of its run, before the
    ``sync`` that opens the timed region (so outside it); not before the warm-up calls, and not
    for a run without one."""
    from common import alternate
    calls = []

    def run(name):
        def call():
            calls.append(name)
            return 1
        return call
    alternate({'a': run('a'), 'b': run('b')}, repeats=2, warmup=1, sync=run('sync'),
              settle={'a': run('settle a')})
    assert calls == ['a', 'b'] + ['settle a', 'sync', 'a', 'sync', 'sync', 'b', 'sync'] + [
        'sync', 'b', 'sync', 'settle a', 'sync', 'a', 'sync']


def test_measure_feeds_alternates_the_feeds_after_a_common_warm_up(benchmarks):
    """common.measure_feeds (bench_train's and gpu_speed's measurement) with a stubbed training
    step (no model, no timing guessed): each feed's first step and warm-up before any timed
    window, then windows alternating between the feeds, as many for each, a settled feed's each
    after its untimed steps; a feed whose loader failed, or that fails in a window, gets its
    error and does not stop the others."""
    from common import measure_feeds
    calls = []

    def step(batches, n):
        calls.append((next(batches), n))
        if calls[-1][0] == 'broken' and len(calls) > 6:
            raise RuntimeError('the loader broke')
        return 8 * n
    streams = {'synthetic': itertools.repeat('synthetic'), 'ours': itertools.repeat('ours'),
               'ffcv_stock': ValueError('no cupy')}
    results = measure_feeds(step, streams, steps=5, warmup=3, windows=4,
                            settle={'ours': 7, 'ffcv_stock': 7})
    window = {'synthetic': [('synthetic', 5)], 'ours': [('ours', 7), ('ours', 5)]}
    assert calls == [('synthetic', 1), ('synthetic', 2), ('ours', 1), ('ours', 2)] + [
        call for feed in ('synthetic', 'ours', 'ours', 'synthetic') * 2 for call in window[feed]]
    assert results['synthetic']['windows'] == results['ours']['windows'] == 4
    assert {'img_per_s', 'spread', 'first_step_s'} <= set(results['ours'])
    assert results['ffcv_stock'] == {'error': 'ValueError: no cupy'}

    calls.clear()
    streams = {'synthetic': itertools.repeat('synthetic'), 'broken': itertools.repeat('broken')}
    results = measure_feeds(step, streams, steps=1, warmup=1, windows=3)
    assert results['broken'] == {'error': 'RuntimeError: the loader broke'}
    assert results['synthetic']['windows'] == 3


def test_gpu_speed_ratios_skip_a_failed_feed_and_use_the_one_thread_loader_row(benchmarks):
    """gpu_speed.add_ratios on stubbed rows: a real feed's img/s over the synthetic one's at the
    same section, model, mode, side and batch; a loader row's img/s per thread over the 1-thread
    row's; a failed real feed (no img/s, as step_rows adds it) gets no ratio and breaks
    nothing."""
    import gpu_speed
    step = {'section': 'eager', 'model': 'resnet50', 'mode': 'eager', 'batch': 256}
    rows = [{**step, 'res': 160, 'feed': 'synthetic', 'img_per_s': 6800.0},
            {**step, 'res': 160, 'feed': 'real', 'img_per_s': 6732.0},
            {**step, 'res': 224, 'feed': 'synthetic', 'img_per_s': 3500.0},
            {**step, 'res': 224, 'feed': 'real', 'status': 'failed', 'result': 'FAILED: x'},
            {'section': 'loader', 'threads': 16, 'img_per_s': 32000.0},
            {'section': 'loader', 'threads': 1, 'img_per_s': 2500.0}]
    gpu_speed.add_ratios(rows)
    assert rows[1]['ratio'] == 0.99 and 'ratio' not in rows[0] and 'ratio' not in rows[3]
    assert rows[4]['ratio'] == 0.8 and rows[5]['ratio'] == 1.0


def test_a_loader_faster_than_the_synthetic_feed_is_flagged(benchmarks, capsys):
    """A real feed above 1.05 x the synthetic one (here 89.4 against 51.7 img/s, 173 %)
    is a measurement error: the row's warning column and a WARNING line say so; at or below 1.05
    there is none. Stubbed rows, no timing."""
    import bench_train
    common = {'res': 128, 'compile': 0, 'precision': 'fp32'}
    rows = [{**common, 'feed': 'synthetic (no loading)', 'img_per_s': 51.7},
            {**common, 'feed': 'our loader', 'img_per_s': 89.4},
            {**common, 'compile': 1, 'feed': 'synthetic (no loading)', 'img_per_s': 50.0},
            {**common, 'compile': 1, 'feed': 'our loader', 'img_per_s': 52.5},
            {**common, 'compile': 1, 'feed': 'ffcv stock loader', 'error': 'ValueError: x'}]
    bench_train.compare_to_synthetic(rows)
    assert rows[1]['pct_of_synthetic'] == 172.9 and '173 % of synthetic' in rows[1]['warning']
    assert rows[3]['pct_of_synthetic'] == 105.0 and rows[3]['warning'] == ''
    assert rows[0]['warning'] == rows[2]['warning'] == '' and 'warning' not in rows[4]
    bench_train.print_results(rows, '### header')
    out = capsys.readouterr().out
    assert len(re.findall(r'^WARNING: 128 px, compile 0: our loader at 173 % of synthetic '
                          r'\(89\.4 vs 51\.7 img/s\)', out, re.M)) == 1
    assert 'compile 1:' not in out
    assert re.search(r'^\| res +\|.*\| warning +\| error +\|$', out, re.M)


def test_gpu_speed_dry_run_writes_the_csv_and_the_table(tmp_path):
    """gpu_speed.py --device cpu with one measuring section (variants: SGD foreach, fused and
    for-loop, batch 8 and 16, on the dry run's 2-conv model) besides machine and data; the other
    sections' flow is the same child machinery (compiling and the learning run take minutes on 2
    cores). The CSV's columns, one row per variant, each with the card, date and commit; the
    Markdown header (card, date, commit); the sections' logs' last lines beside them (a failure's
    traceback comes back from the GPU machine with the table). A second run with --reuse-data
    into the same --work keeps the betons."""
    out = tmp_path / 'out'
    result = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'gpu_speed.py'), '--device', 'cpu', '--sections',
         'variants', '--budget-s', '300', '--work', str(tmp_path / 'work'), '--out', str(out)],
        env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / 'gpu_speed.csv')))
    assert [r['section'] for r in rows] == ['machine', 'data'] + ['variants'] * 4
    assert {'section', 'setting', 'status', 'img_per_s', 'spread', 'model', 'mode', 'res',
            'batch', 'feed', 'optimizer', 'result'} <= set(rows[0])
    variants = rows[2:]
    assert [(r['optimizer'], r['batch']) for r in variants] == [
        ('foreach', '8'), ('fused', '8'), ('for_loop', '8'), ('foreach', '16')]
    assert all(r['status'] == 'ok' and float(r['img_per_s']) > 0 for r in variants)
    md = (out / 'gpu_speed.md').read_text()
    assert re.match(r'## GPU speed: no GPU \(CPU dry run\), \d{4}-\d\d-\d\d \d\d:\d\d, commit ',
                    md)
    assert re.search(r'^\| variants +\| tiny, eager, 64 px, batch 16, SGD foreach', md, re.M)
    assert {(r['card'], r['date'][:4], r['commit']) for r in rows} == {
        ('no GPU (CPU dry run)', md[len('## GPU speed: no GPU (CPU dry run), '):][:4],
         md.split('commit ', 1)[1].split('\n', 1)[0])}
    logs = (out / 'gpu_speed-logs.txt').read_text()
    assert [line.split(' (')[0] for line in logs.splitlines() if line.startswith('==> ')] == [
        '==> machine', '==> data', '==> variants']
    again = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'gpu_speed.py'), '--device', 'cpu', '--sections',
         'machine', '--reuse-data', '--work', str(tmp_path / 'work'), '--out', str(out)],
        env=run_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    [data] = [r for r in csv.DictReader(open(out / 'gpu_speed.csv')) if r['section'] == 'data']
    assert data['result'].endswith('(speed.beton, imagenette_train.beton, imagenette_val.beton '
                                   'kept from an earlier run)'), data['result']


def test_loader_scaling_fits_amdahl_and_schedules_a_batch(benchmarks):
    """loader_scaling's arithmetic on stubbed figures (no timing): s = 2 t2 / t1 - 1 and its
    16-thread prediction; the fixed CPU per batch from batch 256 against 1,024; a batch of one
    slow image and 15 fast ones ends later with static chunks than with dynamic ones."""
    import numpy as np
    from loader_scaling import amdahl, fixed_cost_per_batch, makespan
    rows = [{'threads': 1, 'batch': 256, 'img_per_s': 1000.0, 'cpu_us_per_image': 1004.0,
             'cores_used': 1.0},
            {'threads': 1, 'batch': 1024, 'img_per_s': 1000.0, 'cpu_us_per_image': 1001.0,
             'cores_used': 1.0},
            {'threads': 2, 'batch': 256, 'img_per_s': 1600.0, 'cpu_us_per_image': 1004.0,
             'cores_used': 2.0}]
    assert fixed_cost_per_batch(rows) == 1.02  # (4 - 1) µs / (1/256 - 1/1024) = 1,024 µs
    (fit,) = amdahl(rows, 16)
    assert fit['serial_fraction'] == 0.25  # 2 * (1/1600) / (1/1000) - 1
    assert fit['predicted_efficiency'] == round(1 / (0.25 + 0.75 / 16) / 16, 3)
    costs = np.array([16.0] + [1.0] * 31)
    assert makespan(costs, 16, 0) == 17.0  # chunks of 2: the slow image and the next one
    assert makespan(costs, 16, 1) == 16.0
    assert makespan(costs, 16, 4) == 19.0


def test_loader_scaling_splits_a_batch_into_decode_and_serial_parts_and_predicts_from_them(
        benchmarks):
    """batch_parts on a stubbed stage log (no timing): the longest stage is the decode, the
    serial part runs from its end to its next start; predict's (D / n) / (D / (n e) + g) from the
    1-thread decode and the most threads' serial part, at the loader's schedule's imbalance."""
    from common import batch_parts
    from imagenet_ffcv import decoders
    from loader_scaling import predict
    log = []  # three batches: decode (stage 0) 10 ms, labels (stage 1) 1 ms, 1 ms of Python
    for b in range(3):
        start = 0.012 * b
        log += [(0, start, start + 0.010), (1, start + 0.010, start + 0.011)]
    decode_ms, serial_ms = batch_parts(log)
    assert round(decode_ms, 6) == 10.0 and round(serial_ms, 6) == 2.0
    own = decoders.PARALLEL_CHUNK
    rows = [{'threads': 1, 'batch': 256, 'chunk': own, 'img_per_s': 100.0, 'decode_ms': 32.0,
             'serial_ms': 9.0},
            {'threads': 2, 'batch': 256, 'chunk': own, 'img_per_s': 190.0, 'decode_ms': 16.0,
             'serial_ms': 0.5},
            {'threads': 2, 'batch': 256, 'chunk': own + 1, 'img_per_s': 1.0, 'decode_ms': 1.0,
             'serial_ms': 99.0}]
    sim = [{'batch': 256, 'chunk': own, 'efficiency': 0.8},
           {'batch': 256, 'chunk': own + 1, 'efficiency': 0.1}]
    (fit,) = predict(rows, sim, 16)
    assert (fit['decode_ms_1'], fit['serial_ms'], fit['serial_ms_threads']) == (32.0, 0.5, 2)
    assert fit['predicted_efficiency'] == 0.667  # D / n = 2 ms: 2 / (2 / 0.8 + 0.5)
    assert fit['predicted_img_per_s'] == round(16 * 100 * 2 / 3)
