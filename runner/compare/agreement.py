"""Cross-backend agreement: how far apart the backends' final x are, in ulps of the dtype.

What the report is for: backends that ran one problem the same way should reach the same
x to a few ulps. Groups are compared like with like (split by problem and steps, and
by device where a backend has several rows), and where rows cannot agree exactly
(framework defaults or eps forms) the note says why. Final x can agree where the
runs parted on the way: each group's trajectories are compared step by step too, by a
function the report gives (stepwise.step_agreement over the rows' trajectories).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np

from runner.compare.rows import (
    Row,
    differing_settings,
    mode_order,
    problem_key,
    varying_settings,
)
from runner.optimizers import CONVENTIONS, DECAYS, eps_form

if TYPE_CHECKING:  # stepwise counts its ulps with ulps() below
    from runner.compare.stepwise import StepAgreement

    # A group's members, their labels and the rows' dtype: their trajectories' agreement.
    CompareSteps = Callable[[Sequence[Row], Sequence[str], type[np.floating]], StepAgreement]

ALL_MODES = "all"
# The "all" group where one backend ran every row: its pair is two of that backend's
# modes, which says whether the modes agree, not whether the backends do.
ACROSS_MODES = "across modes"
ALL_GROUPS = (ALL_MODES, ACROSS_MODES)


@dataclass
class Agreement:
    """The largest difference of final x between the rows of one mode x dtype x optimizer,
    and how their trajectories compare step by step (None: not compared)."""

    mode: str
    dtype: str
    optimizer: str
    compared: list[str]
    pair: tuple[str, str]
    abs_diff: float
    ulps_f32: float
    ulps_f64: float | None  # only for float64 runs
    note: str = ""
    setup: str = ""  # the problem, steps, device all compared rows ran, where a group was split
    trajectory: StepAgreement | None = None


def ulps(a: Any, b: Any, dtype: type[np.floating]) -> float:
    """How far apart a and b are in `dtype`'s ulps (elementwise max).

    Values of that dtype (a float32 run's x counted in float32) are counted in steps
    between representable values: adjacent floats are 1 apart, also across a power of
    two, where |a - b| over the larger one's spacing said 0.5 (0.99999994 and 1.0).
    Values finer than the dtype (a float64 run's x in float32 ulps), or not finite, are
    |a - b| over the spacing at the larger magnitude: a fraction.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a_own, b_own = a64.astype(dtype), b64.astype(dtype)
    exact = np.array_equal(a_own, a64) and np.array_equal(b_own, b64)
    if exact and np.all(np.isfinite(a64)) and np.all(np.isfinite(b64)):
        steps = np.abs(_ordinal(a_own).astype(object) - _ordinal(b_own).astype(object))
        return float(np.max(steps))
    scale = np.maximum(np.abs(a64), np.abs(b64)).astype(dtype)
    return float(np.max(np.abs(a64 - b64) / np.spacing(scale).astype(np.float64)))


def _ordinal(x: np.ndarray) -> np.ndarray:
    """Each float's place in the order of its dtype's values, as an integer (+0 and -0
    alike): the bit pattern of a positive float, minus the magnitude's for a negative."""
    bits = np.atleast_1d(x).view(np.int32 if x.dtype == np.float32 else np.int64)
    magnitude = bits & np.iinfo(bits.dtype).max
    return np.where(bits < 0, -magnitude, magnitude)


def abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def agreement_of(rows: Sequence[Row], compare_steps: CompareSteps | None = None) -> list[Agreement]:
    """Per mode x dtype x optimizer, the two backends whose final x are furthest apart in
    ulps of the rows' dtype: their largest |dx| and their ulps; and with compare_steps,
    the group's trajectories compared step by step (Agreement.trajectory).

    A group "all" per dtype x optimizer compares every row with every other, across modes;
    where its rows are of one backend it is named "across modes" (ACROSS_MODES), since
    no other backend is in it to agree with.
    Diverged rows have no final x to compare and are left out, and so are vectors too long
    for results.json to list (it keeps their norms only). Rows of several problems or step
    counts, and where a backend has several rows in a group (it ran on several devices
    too), the group is split by those (Agreement.setup), so backends are compared like
    with like.
    """
    usable = [
        r for r in rows if r.status != "diverged" and r.x is not None and np.all(np.isfinite(r.x))
    ]
    whole: dict[tuple[str, str, str], list[Row]] = {}
    for row in usable:
        whole.setdefault((row.mode, row.dtype, row.optimizer), []).append(row)
        whole.setdefault((ALL_MODES, row.dtype, row.optimizer), []).append(row)
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    differing = differing_settings(usable)
    for (mode, dtype, optimizer), members in whole.items():
        runs = [(m.backend, m.mode if mode == ALL_MODES else "") for m in members]
        split = len(set(runs)) < len(runs)  # a backend (x mode) with several rows
        # rows of two problems never agree by design: a scalar's x against a 5-vector's
        # read 2.1e9 ulps, logged as a metric; nor do rows of two step counts (a
        # 100-step x against a 1000-step one read 2.4e7 ulps as the group's headline)
        problems = len({problem_key(m.problem) for m in members}) > 1
        steps = len({m.steps for m in members}) > 1
        for m in members:
            if split:
                setup = " ".join(varying_settings(m, differing))
            else:
                own = [m.problem_label or problem_key(m.problem)] * problems
                setup = " ".join(own + [f"steps={m.steps}"] * steps)
            groups.setdefault((mode, dtype, optimizer, setup), []).append(m)
    found = []
    for (mode, dtype, optimizer, setup), members in groups.items():
        if mode == ALL_MODES and len({m.mode for m in members}) < 2:
            continue
        if mode != ALL_MODES and len(members) < 2:
            continue

        apart = differing_settings(members)

        def label(row: Row, across: bool = mode == ALL_MODES, apart: set[str] = apart) -> str:
            parts = [row.backend, row.mode] if across else [row.backend]
            return " ".join(parts + varying_settings(row, apart))

        # The pair furthest apart in ulps of the rows' dtype, and that pair's figures: the
        # largest |dx| and the largest ulps can be different pairs (a vector's small entries).
        own = np.float64 if dtype == "float64" else np.float32
        worst = max(combinations(members, 2), key=lambda p: ulps(p[0].x, p[1].x, own))
        labels = [label(m) for m in members]
        found.append(
            Agreement(
                mode=_group_name(mode, members),
                dtype=dtype,
                optimizer=optimizer,
                compared=labels,
                pair=(label(worst[0]), label(worst[1])),
                abs_diff=abs_diff(worst[0].x, worst[1].x),
                ulps_f32=ulps(worst[0].x, worst[1].x, np.float32),
                ulps_f64=ulps(worst[0].x, worst[1].x, np.float64) if dtype == "float64" else None,
                note=_setup_note(members, labels),
                setup=setup,
                trajectory=compare_steps(members, labels, own) if compare_steps else None,
            )
        )
    setups = {setup: i for i, setup in enumerate(dict.fromkeys(k[3] for k in groups))}
    return sorted(  # setups as the rows go (steps=50 before steps=100)
        found,
        key=lambda a: (
            a.dtype,
            a.optimizer,
            setups[a.setup],
            a.mode in ALL_GROUPS,
            mode_order(a.mode),
        ),
    )


def _group_name(mode: str, members: Sequence[Row]) -> str:
    """The group's mode, "all" across backends and modes, or "across modes" where one
    backend ran every row (`compare --backend jax`): "all" read as a cross-backend
    figure there, for what was jax's modes against each other."""
    if mode == ALL_MODES and len({m.backend for m in members}) < 2:
        return ACROSS_MODES
    return mode


def _setup_note(members: Sequence[Row], labels: Sequence[str]) -> str:
    """Rows that ran with other framework defaults are not expected to agree (rows of
    different problems or step counts are never grouped: agreement_of)."""
    return "; ".join(_defaults_differ(members, labels))


def _defaults_differ(members: Sequence[Row], labels: Sequence[str]) -> list[str]:
    """The framework defaults, eps forms and arithmetic dtypes the rows ran with, where
    they differ: what keeps e.g. TF's Adam (eps 1e-7, epsilon-hat) from agreeing with
    torch's to the ulp. Each value names its rows as the table does (labels): one
    backend's two rows (torch graph/apply, graph/manual) read "torch" twice."""
    seen: dict[str, dict[str, list[str]]] = {}  # setting -> value -> row labels
    for row, row_label in zip(members, labels, strict=True):
        used = row.optimizer_used
        name = str(used.get("name"))
        convention = CONVENTIONS.get(str(used.get("convention")))
        settings = {k: v for k, v in used.items() if k not in ("convention", "name", "lr")}
        if convention is not None:
            form = eps_form(name, float(used.get("momentum") or 0), convention)
            if form is not None:
                settings["eps form"] = form
            if row.dtype != "float64":  # in float64 both ways are one
                if name == "adam":
                    settings["bias correction in"] = convention.adam_bias_correction
                if name in DECAYS:
                    settings[f"{DECAYS[name]} in"] = convention.decay_complement
        for key, value in settings.items():
            named = seen.setdefault(key, {}).setdefault(str(value), [])
            if row_label not in named:
                named.append(row_label)
    return [
        f"{key} " + ", ".join(f"{value} ({', '.join(b)})" for value, b in values.items())
        for key, values in seen.items()
        if len(values) > 1
    ]
