"""Where a loss gap is heading: a straight line through the gap against log2(tokens) over the last half
of the budget, and the tokens at which that line would reach a goal.

The gap is one variant's validation loss minus a reference's at the same tokens (kimi.bench.compare's
`gaps_by_tokens`, averaged over seeds). Gaps between two learning curves tend to move by similar amounts per
doubling of training, so the fit is in log2(tokens); the first half of the budget is left out, where one
model is still catching up from a slower start. The projection is a trend, not a measurement: it assumes
the line holds past the budget, and the slope's standard error says how loosely the evals pin it.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

GOAL_GAP = -0.03  # issue 19: the MoE should end 0.03 nat below dense_muon


class Trend(NamedTuple):
    per_doubling: float  # nat the gap moves per doubling of tokens
    stderr: float  # the slope's standard error (nan with fewer than 3 points)
    points: int  # evals in the fit
    at_end: float  # the line's gap at the last eval
    goal: float  # the gap wanted (at or below)
    tokens_to_goal: float | None  # where the falling line crosses the goal (past the end if not there yet)


def gap_trend(gap_by_tokens: dict[int, float], goal: float = GOAL_GAP) -> Trend | None:
    """Least squares of gap on log2(tokens) over the evals in the last half of the budget (by tokens).
    The goal is a gap at or below `goal`; tokens_to_goal is None when the line does not fall. None with
    fewer than two such evals."""
    end = max(gap_by_tokens, default=0)
    pts = [(math.log2(t), g) for t, g in sorted(gap_by_tokens.items()) if t >= end / 2 and t > 0]
    if len(pts) < 2:
        return None
    xs, ys = zip(*pts)
    slope, intercept = statistics.linear_regression(xs, ys)
    sxx = sum((x - statistics.fmean(xs)) ** 2 for x in xs)
    resid2 = sum((y - intercept - slope * x) ** 2 for x, y in pts)
    stderr = math.sqrt(resid2 / (len(pts) - 2) / sxx) if len(pts) > 2 else math.nan
    to_goal = 2 ** ((goal - intercept) / slope) if slope < 0 else None
    return Trend(slope, stderr, len(pts), intercept + slope * xs[-1], goal, to_goal)


def trend_line(name: str, trend: Trend | None) -> str:
    """One markdown bullet for `trend` (what results.md prints under the gap table)."""
    if trend is None:
        return f"- {name}: too few evals in the last half of the budget for a trend"
    goal = trend.goal
    if trend.at_end <= goal:
        where = f"it ends at or below {goal:+.3f}"
    elif trend.tokens_to_goal is None:
        where = f"it is not falling toward {goal:+.3f}"
    else:
        where = f"at that rate it would reach {goal:+.3f} at ~{trend.tokens_to_goal / 1e6:,.1f}M tokens"
    return (
        f"- {name}: {trend.per_doubling:+.4f} ± {trend.stderr:.4f} nat per doubling of tokens over the last half "
        f"({trend.points} evals; the line ends at {trend.at_end:+.4f}); {where}"
    )
