"""The benchmarks run end to end on the embedded sample and keep their output contract (the
numbers themselves are for the tables, not for tests)."""
import csv
import importlib.util
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
    """loader_profile.py's steps on the embedded sample's JPEGs, in this process (bench_loader's
    test runs the loader): each step's µs per image, and the fraction of the pixels decoded for
    random-resized crops (below 1)."""
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import numpy as np
    from loader_profile import stage_costs
    from imagenet_ffcv.images import load_image
    from ffcv.fields.rgb_image import encode_jpeg
    jpegs = []
    for path in sorted((REPO / 'demo' / 'imagenette_sample' / 'train').glob('*/*'))[:8]:
        pixels = np.ascontiguousarray(load_image(path, 256))
        jpegs.append((encode_jpeg(pixels, 90), *pixels.shape[:2]))
    costs = stage_costs(jpegs, res=64, crops=2, runs=1)
    assert set(costs) == {'whole_decode_us', 'region_decode_us', 'decoded_fraction',
                          'resample_f32_us', 'resample_u8_us'}
    assert all(0 < costs[k] < 1e5 for k in costs if k.endswith('_us')), costs
    assert 0 < costs['decoded_fraction'] < 1


def test_bench_train_writes_its_rows_with_the_compile_column(tmp_path):
    """bench_train.py at its smallest, eager only (compiling even a small torchvision model takes
    30-70 s on 2 cores; compiled = eager is tested in test_models.py): one row, with the compile
    column, img/s and the first step's seconds (where torch.compile's time goes when on)."""
    result = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'bench_train.py'), '--res', '32', '--batch-size', '8',
         '--steps', '1', '--warmup', '1', '--feeds', 'synthetic', '--compile', '0',
         '--workers', '2', '--out', str(tmp_path)],
        env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / 'train.csv')))
    assert [(r['compile'], r['feed']) for r in rows] == [('0', 'synthetic (no loading)')]
    assert float(rows[0]['img_per_s']) > 0 and float(rows[0]['first_step_s']) > 0
    assert re.search(r'^\| 32 +\| synthetic \(no loading\) +\| fp32 +\| 0 +\|', result.stdout, re.M)
