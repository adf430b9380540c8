"""Derivatives runs in a report: one row per run, and per point how far apart backends are.

A derivatives run (task=derivatives) evaluates y, dy/dx, the coefficients' derivatives,
d2y/dx2 and the compiled dy/dx and y at problem.x0, and its results.json holds, beside
each value, the analytic one at the inputs the framework had (x0, a, b, c rounded to the
run's dtype). A row keeps both, so the table can show each value with its distance from
the analytic value in ulps of the run's dtype (agreement.ulps), and the agreement says,
per point (problem, x0, dtype), which two backends are furthest apart and in which value.
Plain data, as rows.py: no MLflow, no files; the tables are derivative_tables.py's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from runner.compare.agreement import ulps
from runner.compare.rows import numbers_in_order, problem_key
from runner.results import RESULTS_FILE, device_kind
from runner.tracking import flatten

TASK = "derivatives"
ERROR_PREFIX = "error."  # a derivatives run's error metrics; the rest are its values


@dataclass
class DerivativeRow:
    """The latest derivatives run of one backend at one point: its values and the analytic
    ones, each keyed as results.json nests them, flattened (`dy_dcoef.a`, `compiled.y`)."""

    backend: str  # the plain name: backend options do not apply to derivatives
    dtype: str
    status: str
    at: float  # x0 as the framework had it: rounded to the dtype
    values: dict[str, float]
    analytic: dict[str, float]  # the same keys; empty where unknown (read from metrics)
    run_id: str
    run_name: str
    started: str
    problem: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    source: str = RESULTS_FILE  # or "metrics" when results.json could not be read
    problem_label: str = ""  # set by the report: the name, x0 and what varies among rows

    @property
    def key(self) -> tuple[str, ...]:
        """What decides what a run computed: repeats of one share it, and the latest
        stands for them (rows.latest_per_key)."""
        return (self.backend, self.dtype, problem_key(self.problem), self.device)

    @property
    def point(self) -> tuple[str, str]:
        """Where backends must agree: one problem at one x0 in one dtype."""
        return (self.dtype, problem_key(self.problem))

    def from_analytic(self, quantity: str) -> float:
        """Ulps of the run's dtype from the analytic value: a fraction where the analytic
        value (float64) falls between the dtype's values; NaN where it is not known."""
        if quantity not in self.analytic or quantity not in self.values:
            return math.nan
        return apart(self.values[quantity], self.analytic[quantity], self.dtype)


def derivative_row_from_result(result: Mapping[str, Any], **common: str) -> DerivativeRow | None:
    """A derivatives run's row from its results.json (exact values); None for other tasks.
    The quantities are those results.json gives an analytic value, so a value without a
    reference gets no column that could not say how far off it is."""
    if result.get("task") != TASK:
        return None
    analytic = {k: float(v) for k, v in flatten(result["analytic"]).items()}
    values = flatten({k: result[k] for k in result["analytic"] if k in result})
    return DerivativeRow(
        backend=str(result["backend"]),
        dtype=str(result["dtype"]),
        status=str(result["status"]),
        at=float(result["at"]),
        values={k: float(v) for k, v in values.items()},
        analytic=analytic,
        problem=dict(result.get("problem", {})),
        device=device_kind(str(result.get("device", ""))),
        **common,
    )


def derivative_row_from_metrics(
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    problem: Mapping[str, Any],
    **common: str,
) -> DerivativeRow:
    """A logged run's row where its results.json cannot be read: the values are its
    metrics (a value that was not finite was not logged: NaN), without analytic values."""
    dtype = tags.get("dtype", "?")
    x0 = problem.get("x0", math.nan)
    cast = np.float32 if dtype == "float32" else np.float64
    return DerivativeRow(
        backend=tags.get("backend", "?"),
        dtype=dtype,
        status=tags.get("status", "finished"),
        at=float(cast(x0)) if isinstance(x0, float) else math.nan,
        values={k: v for k, v in metrics.items() if not k.startswith(ERROR_PREFIX)},
        analytic={},
        problem=dict(problem),
        device=device_kind(tags.get("device", "")),
        source="metrics",
        **common,
    )


ORDER = ("y", "dy_dx", "dy_dcoef", "d2y_dx2", "compiled")  # results.json's, as it nests them


def quantities(rows: Sequence[DerivativeRow]) -> list[str]:
    """The quantities the rows hold, in results.json's order (y, dy_dx, dy_dcoef.a, ...),
    also where they were read from metrics, which MLflow returns in an order of its own."""
    found = dict.fromkeys(k for row in rows for k in [*row.analytic, *row.values])

    def rank(key: str) -> int:
        head = key.split(".")[0]
        return ORDER.index(head) if head in ORDER else len(ORDER)

    return sorted(found, key=rank)


def quantity_header(quantity: str) -> str:
    """'dy/dx', 'dy/da', 'd2y/dx2', 'compiled dy/dx': results.json's key as the
    derivative is written (the summary's names)."""
    head, _, rest = quantity.partition(".")
    if head == "compiled":
        return f"compiled {quantity_header(rest)}"
    if head == "dy_dcoef":
        return f"dy/d{rest}"
    return head.replace("_d", "/d")


def derivative_order(row: DerivativeRow) -> tuple[Any, ...]:
    """Rows of one point are neighbours (as the minimize table's rows of one setup)."""
    return (row.dtype, numbers_in_order(row.problem_label), row.backend, row.device)


def apart(a: float, b: float, dtype: str) -> float:
    """agreement.ulps in the dtype, and 0 for equal values: two backends' (or a backend's
    and the analytic) inf is the same answer, where ulps' |inf - inf| says NaN."""
    if a == b:
        return 0.0
    return ulps(a, b, np.float32 if dtype == "float32" else np.float64)


@dataclass
class PointAgreement:
    """The largest difference between two backends' values at one point, in ulps."""

    problem: str  # the point's label: the problem, its x0 and what varies
    dtype: str
    compared: list[str]
    ulps: float  # of the dtype; 0 where every value is equal
    pair: tuple[str, str]  # the two rows furthest apart; empty where all agree
    quantity: str  # results.json's key of the value where they are; "" where all agree
    abs_diff: float


def point_agreement(rows: Sequence[DerivativeRow]) -> list[PointAgreement]:
    """Per point that two or more rows evaluated, the pair of rows and the value furthest
    apart in ulps of the dtype: what the report is for, whether frameworks give the same
    derivatives to the last bit. A NaN against a number counts as furthest apart.
    Rows of one backend on two devices are compared as two, named by their device."""
    groups: dict[tuple[str, str], list[DerivativeRow]] = {}
    for row in rows:
        groups.setdefault(row.point, []).append(row)
    found = []
    for members in groups.values():
        if len(members) < 2:
            continue
        devices = len({m.device for m in members}) > 1

        def label(row: DerivativeRow, devices: bool = devices) -> str:
            return f"{row.backend} {row.device}" if devices else row.backend

        names = quantities(members)
        differences = [
            (apart(a.values[q], b.values[q], a.dtype), a, b, q)
            for a, b in combinations(members, 2)
            for q in names
            if q in a.values and q in b.values
        ]
        if not differences:  # no value that both rows hold
            continue
        worst = max(differences, key=lambda d: math.inf if math.isnan(d[0]) else d[0])
        distance, a, b, quantity = worst
        agree = distance == 0
        found.append(
            PointAgreement(
                problem=members[0].problem_label,
                dtype=members[0].dtype,
                compared=[label(m) for m in members],
                ulps=distance,
                pair=("", "") if agree else (label(a), label(b)),
                quantity="" if agree else quantity,
                abs_diff=0.0 if agree else abs(a.values[quantity] - b.values[quantity]),
            )
        )
    return found
