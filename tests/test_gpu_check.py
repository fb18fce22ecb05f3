"""benchmarks/gpu_check.py, the one-shot check for the lent GPU machine, in its CPU mode: the
report's contract (gpu.md with the card, date and commit and one table row per result; gpu.csv;
copies in $OUT), a step past its time limit reported as such, and steps skipped once the budget is
spent. The GPU numbers themselves come from the GPU machine only."""
import csv
import os
import re
import subprocess

import pytest

from conftest import PYTHON, REPO, run_env

pytestmark = pytest.mark.slow


def gpu_check(tmp_path, *args, python_path=()):
    """Run gpu_check.py in CPU mode; ``python_path``: folders put first on its PYTHONPATH (and so
    on its children's)."""
    out, copies = tmp_path / 'results', tmp_path / 'OUT'
    copies.mkdir(exist_ok=True)
    result = subprocess.run(
        [PYTHON, str(REPO / 'benchmarks' / 'gpu_check.py'), '--device', 'cpu', '--out', str(out),
         '--work', str(tmp_path / 'work'), *args],
        env=dict(run_env(), PYTHONPATH=os.pathsep.join(
            p for p in (*map(str, python_path), str(REPO), os.environ.get('PYTHONPATH', ''))
            if p), OUT=str(copies)),
        cwd=REPO, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(open(out / 'gpu.csv')))
    return result, (out / 'gpu.md').read_text(), rows, copies


def test_the_report_names_machine_date_commit_and_has_a_row_per_step(tmp_path):
    result, md, rows, copies = gpu_check(tmp_path, '--only', 'machine,tests')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r'^## GPU check: no GPU \(CPU dry run\), \d{4}-\d\d-\d\d \d\d:\d\d, commit '
                     r'\S+', md, re.M)
    assert re.search(r'^- decoder: (region|FALLBACK)', md, re.M)
    assert re.search(r'^\| step +\| setting +\| img/s +\| ratio +\| result +\| s +\|$', md, re.M)
    assert [r['step'] for r in rows] == ['machine', 'tests']
    assert {'step', 'setting', 'status', 'result', 'seconds'} <= set(rows[0])
    assert rows[0]['status'] in ('ok', 'warning')
    # On a machine without a GPU every CUDA test is skipped, and the count says so.
    assert rows[1]['status'] == 'ok' and re.fullmatch(r'\d+ skipped', rows[1]['result'])
    assert md in result.stdout  # the same report printed at the end
    assert sorted(p.name for p in copies.iterdir()) == ['gpu-logs.txt', 'gpu.csv', 'gpu.md']


def test_a_step_past_its_limit_is_reported_and_the_budget_skips_steps(tmp_path):
    """A step's child that never ends (as one whose ffcv loader hangs): a ``sitecustomize`` on
    its path makes every step's child process wait forever before it starts."""
    hang = tmp_path / 'hang'
    hang.mkdir()
    (hang / 'sitecustomize.py').write_text(
        "import sys, time\nif '--child' in sys.argv:\n    time.sleep(3600)\n")
    result, md, rows, _ = gpu_check(tmp_path, '--only', 'machine', '--timeout', 'machine=2',
                                    python_path=[hang])
    assert result.returncode == 1  # a step failed
    assert rows[0]['status'] == 'timeout' and 'TIMEOUT after 2 s' in rows[0]['result']
    assert '### machine: last lines of its log' in md
    result, md, rows, _ = gpu_check(tmp_path, '--only', 'machine', '--budget-s', '5')
    assert result.returncode == 0  # nothing failed
    assert rows[0]['status'] == 'skipped' and 'not run' in rows[0]['result']


@pytest.mark.parametrize('processes', [[], ['-n', '2']], ids=['one process', 'xdist'])
def test_the_tests_finished_before_a_cut_are_read_from_pytest_lines(tmp_path, monkeypatch,
                                                                     processes):
    """gpu_check.pytest_outcomes on real ``pytest -v`` output (one process, and pytest-xdist's
    '[gw0] [ 50%] PASSED ...' lines): each finished test with its outcome, a teardown error
    after a pass counted as the error, ids with a space or '::' whole, and neither the short
    summary's lines nor a test's printed output taken for a test's line."""
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import gpu_check
    (tmp_path / 'test_sample.py').write_text(
        'import pytest\n\n'
        '@pytest.fixture\ndef broken_teardown():\n    yield\n    raise RuntimeError("teardown")\n\n'
        'def test_passes():\n    pass\n\n'
        'def test_fails():\n    assert False\n\n'
        'def test_skips():\n    pytest.skip("no GPU")\n\n'
        'def test_teardown_fails(broken_teardown):\n    pass\n\n'
        '@pytest.mark.parametrize("side", [160, 224])\ndef test_sides(side):\n    pass\n\n'
        '@pytest.mark.parametrize("name", ["a b", "x::y"])\ndef test_names(name):\n'
        '    print("FAILED test_sample.py::test_bogus")\n    assert name == "a b"\n')
    result = subprocess.run([PYTHON, '-m', 'pytest', '-v', '-rfEsxX', '-p', 'no:cacheprovider',
                             *processes, 'test_sample.py'], cwd=tmp_path, capture_output=True,
                            text=True, env=run_env(), timeout=120)
    assert result.returncode == 1, result.stdout[-2000:]
    assert gpu_check.pytest_outcomes(result.stdout) == {
        'test_sample.py::test_passes': 'PASSED', 'test_sample.py::test_fails': 'FAILED',
        'test_sample.py::test_skips': 'SKIPPED',
        'test_sample.py::test_teardown_fails': 'ERROR',
        'test_sample.py::test_sides[160]': 'PASSED', 'test_sample.py::test_sides[224]': 'PASSED',
        'test_sample.py::test_names[a b]': 'PASSED', 'test_sample.py::test_names[x::y]': 'FAILED'}
