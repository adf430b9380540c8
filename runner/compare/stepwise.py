"""Step-by-step agreement of an agreement group's trajectories, in ulps of the rows' dtype.

Final x alone can hide runs that parted and met again: XLA on and off in TF's graph
mode differ by 1-2 float32 ulps at steps 28, 35 and 42 of an RMSprop run, and end on the
same x. So each group's recorded trajectories (x, loss and gradient per step; a vector
problem's distance to x* and gradient norm) are compared at the steps every member
recorded: identical to the bit, or the first step where two members differ and the
largest difference over them in ulps. x is the state: its ulps count the representable
values between two members (agreement.ulps). The others (loss, gradient, a vector's
distance and gradient norm) are computed from x and go to 0 at x*, where representable
values crowd: a loss of 0 against 5.96e-8, what x one ulp apart gives, counted 864
million of them, and grad, x's 1 ulp doubled, 524,288. So their differences are
counted in ulps of the column's largest magnitude over the steps compared, the scale
the run computed them at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import combinations

import numpy as np

from runner.compare.agreement import ulps
from runner.compare.trajectories import Trajectory

IDENTICAL = "identical"
DIFFER = "differ"
NOT_RECORDED = "not recorded"
NO_COMMON_STEPS = "no common steps"
STATE = "x"  # the column counted in representable values; the others at their scale


@dataclass
class StepAgreement:
    """How a group's trajectories compare at the steps every member recorded."""

    status: str = NOT_RECORDED  # identical | differ | not recorded | no common steps
    steps: int = 0  # the steps compared
    first_diff_step: int | None = None
    ulps: float | None = None  # the largest difference in ulps of the rows' dtype (see above)
    column: str = ""  # where it is (x, loss, grad; dist, grad_norm for vectors)
    logged_only: bool = False  # over the steps MLflow kept of a longer record
    missing: list[str] = field(default_factory=list)  # the members without a trajectory


def step_agreement(
    trajectories: Sequence[Trajectory | None],
    labels: Sequence[str],
    dtype: type[np.floating],
) -> StepAgreement:
    """Compare the members' trajectories (labels name them) step by step.

    A member without one makes the group `not recorded`, naming it: the others' match
    would read as the group's. Equal values are the same bits (+0 and -0 differ, by 0
    ulps; inf equals inf, NaN equals NaN); a non-finite value against another value is a
    difference of inf ulps, as no count of values lies between them.
    """
    missing = [label for t, label in zip(trajectories, labels, strict=True) if t is None]
    found = [t for t in trajectories if t is not None]
    if missing or not found:
        return StepAgreement(missing=missing)
    common = reduce(np.intersect1d, (t.steps for t in found))
    logged_only = any(t.logged_only for t in found)
    if not common.size:
        return StepAgreement(NO_COMMON_STEPS, logged_only=logged_only)
    result = StepAgreement(IDENTICAL, int(common.size), ulps=0.0, logged_only=logged_only)
    for name in [n for n in found[0].columns if all(n in t.columns for t in found)]:
        values = np.stack([t.columns[name][np.searchsorted(t.steps, common)] for t in found])
        differs = ~np.all(_same(values, values[0]), axis=0)
        if not differs.any():
            continue
        at = int(common[np.argmax(differs)])
        if result.first_diff_step is None or at < result.first_diff_step:
            result.first_diff_step = at
        apart = (
            _largest_ulps(values[:, differs], dtype)
            if name == STATE
            else _ulps_at_scale(values[:, differs], _magnitude(values), dtype)
        )
        if result.status == IDENTICAL or apart > (result.ulps or 0.0):
            result.ulps, result.column = apart, name
        result.status = DIFFER
    return result


def _same(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each value is first's, bit for bit as far as a float64 read back tells."""
    equal = (values == first) & (np.signbit(values) == np.signbit(first))
    return equal | (np.isnan(values) & np.isnan(first))


def _largest_ulps(values: np.ndarray, dtype: type[np.floating]) -> float:
    """The largest difference between two members (rows of values) at any step (column).

    Values of the dtype are ordered as their ulps count, so per step the smallest and
    the largest member are the pair furthest apart; values finer than the dtype (a
    vector's final distance, a float64 norm) are compared pair by pair.
    """
    if not np.all(np.isfinite(values)):
        return float("inf")
    with np.errstate(over="ignore"):
        exact = np.all(values.astype(dtype).astype(np.float64) == values, axis=0)
    worst = 0.0
    if exact.any():
        held = values[:, exact]
        worst = ulps(held.max(axis=0), held.min(axis=0), dtype)
    if not exact.all():
        finer = values[:, ~exact]
        worst = max(worst, *(ulps(a, b, dtype) for a, b in combinations(finer, 2)))
    return worst


def _ulps_at_scale(values: np.ndarray, scale: float, dtype: type[np.floating]) -> float:
    """The largest difference between two members (rows of values) at any step, in ulps
    of `scale` (the column's largest magnitude) in dtype; inf where one is not finite."""
    if not np.all(np.isfinite(values)):
        return float("inf")
    spread = float(np.max(values.max(axis=0) - values.min(axis=0)))
    return spread / float(np.spacing(dtype(scale)))


def _magnitude(values: np.ndarray) -> float:
    """The largest finite |value| (a step where every member is inf still equals)."""
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max(initial=0.0))
