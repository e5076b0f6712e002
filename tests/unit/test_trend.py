"""kimi.bench.trend against gaps built from a known line: the slope per doubling and the crossing come back."""

import math

import pytest

from kimi.bench.trend import gap_trend, trend_line


def line(per_doubling, at_1m, noise=()):
    """Gaps at 0.5M..5M tokens on gap = at_1m + per_doubling * log2(t / 1M), plus optional noise per point."""
    toks = [500_000 * i for i in range(1, 11)]
    noise = list(noise) + [0.0] * (len(toks) - len(noise))
    return {t: at_1m + per_doubling * math.log2(t / 1e6) + e for t, e in zip(toks, noise)}


def test_an_exact_line_gives_its_slope_and_where_it_reaches_the_goal():
    tr = gap_trend(line(-0.005, -0.01))
    assert tr.per_doubling == pytest.approx(-0.005) and tr.stderr == pytest.approx(0.0, abs=1e-12)
    assert tr.points == 6  # 2.5M..5M: the first half of the budget is left out
    assert tr.at_end == pytest.approx(-0.01 - 0.005 * math.log2(5))
    assert tr.tokens_to_goal == pytest.approx(1e6 * 2**4)  # -0.01 - 0.005 * 4 = -0.03
    assert "-0.0050 ± 0.0000 nat per doubling" in trend_line("kimi", tr) and "~16.0M tokens" in trend_line("kimi", tr)


def test_noise_widens_the_error_and_a_flat_or_rising_gap_has_no_crossing():
    noisy = gap_trend(line(-0.005, -0.01, noise=[0, 0, 0, 0, 0.004, -0.004, 0.004, -0.004, 0.004, -0.004]))
    assert noisy.stderr > 0.001 and abs(noisy.per_doubling + 0.005) < 2 * noisy.stderr  # the true slope within 2 errors
    rising = gap_trend(line(+0.002, -0.01))
    assert rising.tokens_to_goal is None and "not falling toward -0.030" in trend_line("kimi", rising)
    past = gap_trend(line(-0.005, -0.05))
    assert "ends at or below -0.030" in trend_line("kimi", past)
    assert gap_trend({1000: 0.1}) is None and "too few evals" in trend_line("kimi", None)
