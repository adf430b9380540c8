"""What a report shows of derivatives runs: their table, the agreement per point, the
terminal lines, the comparison.md section, derivatives.csv and comparison.json's entries.

Values are shown as the minimize table shows final x (summary.fmt: the shortest text
that reads back exactly in the run's dtype), each beside its distance from the analytic
value in ulps of the dtype; a row `analytic` heads each point with the reference values
(float64, shortest text). The csv and json keep the exact float64s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runner.compare.derivatives import (
    DerivativeRow,
    PointAgreement,
    quantities,
    quantity_header,
)
from runner.compare.output import csv_text, exact_text, markdown_table, text_table
from runner.results import atomic_write
from runner.summary import fmt

DERIVATIVES_FILE = "derivatives.csv"
ULPS = "ulps"  # the column after each value: its distance from the analytic value
REFERENCE = "analytic"  # the backend cell of each point's reference row
AGREEMENT_HEADERS = ["problem", "dtype", "backends", "ulps in dtype", "between", "in", "|diff|"]
TABLE_TITLE = (
    "derivatives at problem.x0 (exact in the run's dtype; ulps: distance from the "
    "analytic value, in the dtype's ulps)"
)
AGREEMENT_TITLE = "cross-backend agreement of the derivatives (largest difference per point)"
NO_AGREEMENT = "no point (problem, x0, dtype) was evaluated by two backends"


def ulps_text(value: float) -> str:
    """Whole ulps as a whole number (12345, where '.3g' said 1.23e+04 and hid which),
    a fraction of one (the float64 analytic value between two float32s) to 3 digits."""
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and value < 1e15:
        return str(int(value))
    return f"{value:.3g}"


def derivatives_table(rows: Sequence[DerivativeRow]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: per point (problem, x0, dtype) its analytic row, then one row per
    run; each value and its ulps from the analytic value. A device column where the
    rows ran on several."""
    names = quantities(rows)
    devices = len({r.device for r in rows}) > 1
    headers = ["backend", "problem", "dtype", *(["device"] * devices)]
    for name in names:
        headers += [quantity_header(name), ULPS]
    cells, shown = [], set()
    for row in rows:
        if row.point not in shown and row.analytic:
            shown.add(row.point)
            reference = [REFERENCE, row.problem_label, row.dtype, *([""] * devices)]
            for name in names:
                value = row.analytic.get(name)
                reference += [fmt(value) if value is not None else "", ""]
            cells.append(reference)
        cell = [row.backend, row.problem_label, row.dtype, *([row.device] * devices)]
        for name in names:
            value = row.values.get(name)
            shown_value = fmt(value, row.dtype) if value is not None else "n/a"
            cell += [shown_value, ulps_text(row.from_analytic(name))]
        cells.append(cell)
    return headers, cells


TEXT_COLUMNS = {"backend", "problem", "dtype", "device", "backends", "between", "in"}


def numeric(headers: Sequence[str]) -> set[str]:
    """The right-aligned columns: the values, their ulps and the agreement's figures."""
    return set(headers) - TEXT_COLUMNS


def agreement_table(items: Sequence[PointAgreement]) -> tuple[list[str], list[list[str]]]:
    return AGREEMENT_HEADERS, [
        [
            a.problem,
            a.dtype,
            ", ".join(a.compared),
            ulps_text(a.ulps),
            " vs ".join(a.pair) if a.quantity else "all equal",
            quantity_header(a.quantity) if a.quantity else "",
            f"{a.abs_diff:.3g}",
        ]
        for a in items
    ]


def derivatives_text(rows: Sequence[DerivativeRow], items: Sequence[PointAgreement]) -> list[str]:
    """The terminal's lines: the table, then the agreement per point."""
    table = derivatives_table(rows)
    lines = [TABLE_TITLE, text_table(*table, numeric=numeric(table[0])), ""]
    if not items:
        return [*lines, f"cross-backend agreement of the derivatives: {NO_AGREEMENT}"]
    agreement = agreement_table(items)
    return [*lines, AGREEMENT_TITLE, text_table(*agreement, numeric=numeric(agreement[0]))]


def derivatives_markdown(
    rows: Sequence[DerivativeRow], items: Sequence[PointAgreement]
) -> list[str]:
    """comparison.md's section: the table and the agreement, with what they mean."""
    table = derivatives_table(rows)
    agreement = agreement_table(items)
    return [
        "## Derivatives",
        "",
        "Each derivatives run's values at problem.x0, exact in the run's dtype, each "
        "followed by its distance from the analytic value in units in the last place of "
        "the dtype (`ulps`; a fraction where the analytic value lies between two values of "
        f"the dtype). The `{REFERENCE}` row of each point gives the analytic values: "
        "results.json's, computed in float64 at the inputs rounded to the run's dtype.",
        "",
        markdown_table(*table, numeric=numeric(table[0])),
        "",
        "## Cross-backend agreement of the derivatives",
        "",
        "Per point evaluated by two or more backends: the largest difference between two "
        "backends' values in ulps of the dtype, the pair, and the value it is in.",
        "",
        markdown_table(*agreement, numeric=numeric(agreement[0]))
        if items
        else f"{NO_AGREEMENT.capitalize()}.",
        "",
    ]


def derivatives_data(
    rows: Sequence[DerivativeRow], items: Sequence[PointAgreement]
) -> dict[str, Any]:
    """comparison.json's entries: each row and each point's agreement, exact."""
    return {
        "derivatives": [asdict(r) for r in rows],
        "derivative_agreement": [asdict(a) for a in items],
    }


def write_derivatives_csv(out: Path, rows: Sequence[DerivativeRow]) -> Path:
    """derivatives.csv: one line per run, each value, the analytic one and the ulps
    between them, exact (repr of the float64 results.json holds)."""
    names = quantities(rows)
    header = ["backend", "problem", "problem_settings", "dtype", "device", "at"]
    header += [f"{n}{suffix}" for n in names for suffix in ("", "_analytic", "_ulps")]
    header += ["run_id", "run_name", "started", "source"]
    lines = [header]
    for row in rows:
        line = [
            row.backend,
            row.problem_label,
            json.dumps(row.problem, sort_keys=True, default=str),
            row.dtype,
            row.device,
            repr(row.at),
        ]
        for name in names:
            line += [
                exact_text(row.values.get(name)),
                exact_text(row.analytic.get(name)),
                repr(row.from_analytic(name)),
            ]
        lines.append([*line, row.run_id, row.run_name, row.started, row.source])
    path = out / DERIVATIVES_FILE
    atomic_write(path, csv_text(lines))
    return path
