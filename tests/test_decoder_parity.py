"""benchmarks/decoder_parity.py's verdict: a decoder's mean top-1 is within the noise of ffcv's
when the difference is below twice its standard error (the training runs themselves are the
benchmark, not a test)."""
import pytest

from conftest import REPO


@pytest.fixture
def parity(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import decoder_parity
    return decoder_parity


def test_a_difference_below_two_standard_errors_is_within_the_noise(parity):
    rows = [{'decoder': d, 'top_1': v, 'img_per_s': speed}
            for d, values, speed in (('ffcv', (0.50, 0.52, 0.54), 100.0),
                                     ('fused', (0.51, 0.53, 0.55), 200.0),
                                     ('fused_aa', (0.30, 0.31, 0.32), 150.0))
            for v in values]
    summary = {s['decoder']: s for s in parity.summary_rows(rows)}
    se = 0.02 / 3 ** 0.5  # sd 0.02 over 3 runs
    assert summary['fused']['mean_top_1'] == pytest.approx(0.53)
    assert summary['fused']['se'] == pytest.approx(se)
    assert summary['fused']['diff_vs_ffcv'] == pytest.approx(0.01)
    assert summary['fused']['two_se_of_diff'] == pytest.approx(2 * (2 * se ** 2) ** 0.5)
    assert summary['fused']['within_noise'] is True
    assert summary['fused_aa']['within_noise'] is False
    assert 'diff_vs_ffcv' not in summary['ffcv'] and summary['ffcv']['img_per_s'] == 100.0
