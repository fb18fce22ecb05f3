"""The benchmarks run end to end on the embedded sample and keep their output contract (the
numbers themselves are for the tables, not for tests)."""
import csv
import re
import subprocess

import pytest

from conftest import PYTHON, REPO, run_env

pytestmark = pytest.mark.slow


def test_bench_loader_writes_the_contract_csv_and_a_chart(tmp_path):
    result = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'bench_loader.py'), '--sets', 'none', '--res', '64',
         '--min-samples', '256', '--batch-size', '32', '--runs', '1', '--no-ablations',
         '--out', str(tmp_path)], env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'embedded demo sample' in result.stdout  # says what it measured instead
    rows = list(csv.DictReader(open(tmp_path / 'loader.csv')))
    assert {'data', 'pipeline', 'res', 'workers', 'img_per_s'} <= set(rows[0])
    assert {r['pipeline'] for r in rows} == {'ffcv', 'ffcv_stock', 'torchvision', 'decode_limit'}
    assert all(float(r['img_per_s']) > 0 for r in rows)
    ours = next(r for r in rows if r['pipeline'] == 'ffcv')
    assert float(ours['x_torchvision']) > 0 and float(ours['pct_of_decode_limit']) > 0
    assert re.search(r'^\| ffcv +\| 64 +\|', result.stdout, re.M)  # the Markdown table
    assert (tmp_path / 'loader.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
