"""What a report shows and writes: the terminal tables, comparison.md, comparison.csv,
comparison.json, agreement.csv, and the convergence and step-time plots.

Shown values are the shortest text that reads back exactly in the run's dtype; the csv
and json files keep the exact float64. matplotlib is imported only where plots are drawn
(runner.plots, inside write_plots).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runner.compare.agreement import ACROSS_MODES, ALL_MODES, Agreement
from runner.compare.holes import Hole, hole_lines
from runner.compare.rows import Row, differing_settings, varying_settings
from runner.compare.stepwise import DIFFER, IDENTICAL, NOT_RECORDED, StepAgreement
from runner.compare.trajectories import Trajectory
from runner.results import atomic_write
from runner.summary import fmt, plural, step_time_text
from runner.tracking import MAX_POINTS_PER_METRIC

MARKDOWN_FILE = "comparison.md"
CSV_FILE = "comparison.csv"
JSON_FILE = "comparison.json"
AGREEMENT_FILE = "agreement.csv"
CONVERGENCE_FILE = "convergence.png"
STEP_TIME_FILE = "step_time.png"


ULPS_HEADER = "ulps in dtype"
TRAJECTORIES_HEADER = "trajectories"
ROW_HEADERS = [
    "backend",
    "mode",
    "optimizer",
    "dtype",
    "status",
    "steps",
    "final x",
    "final loss",
    "|x - x*|",
    "|loss - loss*|",
    "compile s",
    "total s",
    "us/step",
    "vs fastest",
]
AGREEMENT_HEADERS = [
    "mode",
    "dtype",
    "optimizer",
    "backends",
    "largest |dx|",
    "between",
    ULPS_HEADER,
    TRAJECTORIES_HEADER,
    "note",
]
# Right-aligned: the row table's columns from steps on, and the agreement's figures.
NUMERIC = {*ROW_HEADERS[ROW_HEADERS.index("steps") :], "largest |dx|", ULPS_HEADER}
# What comparison.md says the trajectories column compares.
TRAJECTORIES_TEXT = [
    "`trajectories` compares the rows' trajectories at every step all of them recorded (x, "
    "loss and gradient; for a vector problem the distance to x* and the gradient norm): "
    "`identical` to the bit, or the first step where two rows differ and the largest "
    "difference over those steps in ulps of the rows' dtype, with the column it is in: x's "
    "ulps count the representable values between two rows, the other columns' are ulps of "
    "the column's largest magnitude (they go to 0 at x*, where values crowd: losses of 0 "
    "and 6e-8, from x one ulp apart, are 864 million values apart). "
    f"`logged steps`: from MLflow's metrics, which keep at most {MAX_POINTS_PER_METRIC} "
    "steps of a run, so a "
    "difference at another step goes unseen; `not recorded`: a row has no trajectory "
    "(named where others have one), and nothing was compared.",
]


def relative_text(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value == 1.0:
        return "1.0x"
    if value < 1:  # a diverged row, timed over the steps it ran: 0.8x, 0.004x
        return f"{value:.2g}x"
    if value < 10:
        return f"{value:.2f}x"  # 1.00x: within 0.5% of the fastest, but not it
    return f"{value:.3g}x" if value < 1000 else f"{value:,.0f}x"


def _g(value: float, spec: str = ".3g") -> str:
    return format(value, spec) if math.isfinite(value) else str(value)


OPTIONAL_COLUMNS: dict[str, Callable[[Row], str]] = {  # after dtype, where rows differ
    "problem": lambda r: r.problem_label,
    "device": lambda r: r.device,
}  # steps has a column always


def row_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the rows' table: a problem or device column only where the
    rows differ in it (steps always has one), so every row can be told apart and a report
    of one setup stays as compact as before."""
    differing = differing_settings(rows)
    columns = {
        name: [get(r) for r in rows] for name, get in OPTIONAL_COLUMNS.items() if name in differing
    }
    return _insert_columns(ROW_HEADERS, [row_cells(r) for r in rows], "dtype", columns)


def _insert_columns(
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    after: str,
    columns: Mapping[str, Sequence[str]],
) -> tuple[list[str], list[list[str]]]:
    """headers and cells with columns (name: one cell per row) put after the header `after`."""
    at = headers.index(after) + 1
    return [*headers[:at], *columns, *headers[at:]], [
        [*c[:at], *(column[i] for column in columns.values()), *c[at:]] for i, c in enumerate(cells)
    ]


def row_cells(row: Row) -> list[str]:
    """Display cells; x and loss are the shortest text that reads back exactly in the dtype."""
    steps = str(row.steps_run) if row.steps_run == row.steps else f"{row.steps_run}/{row.steps}"
    status = "DIVERGED" if row.status == "diverged" else row.status
    return [
        row.backend,
        row.mode,
        row.optimizer,
        row.dtype,
        status,
        steps,
        fmt(row.x, row.dtype, head=3),
        fmt(row.loss, row.dtype),
        _g(row.error_x),
        _g(row.error_loss),
        _g(row.compile_s, ".3f"),
        _g(row.total_s, ".3f"),
        step_time_text(row.step_us),
        relative_text(row.relative),
    ]


def agreement_table(agreement: Sequence[Agreement]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the agreement table; a setup column only where a group was split."""
    setups = [a.setup for a in agreement]
    columns = {"setup": setups} if any(setups) else {}
    return _insert_columns(
        AGREEMENT_HEADERS, [agreement_cells(a) for a in agreement], "optimizer", columns
    )


def agreement_cells(item: Agreement) -> list[str]:
    return [
        item.mode,
        item.dtype,
        item.optimizer,
        _compared(item),
        _g(item.abs_diff),
        " vs ".join(item.pair) if item.abs_diff else "all equal",  # no pair is furthest
        _g(ulps_in_dtype(item), ".4g"),
        trajectory_text(item),
        item.note,
    ]


def trajectory_text(item: Agreement) -> str:
    """The trajectories cell: `identical (9 steps)`, `differ from step 28 (max 1 ulp, x;
    9 steps)`, `not recorded (jax manual)`; `logged steps` where MLflow kept only some."""
    found = _steps(item)
    if found.status == NOT_RECORDED:
        some = found.missing and len(found.missing) < len(item.compared)
        return f"{NOT_RECORDED} ({', '.join(found.missing)})" if some else NOT_RECORDED
    steps = plural(found.steps, "logged step" if found.logged_only else "step")
    if found.status == IDENTICAL:
        return f"{IDENTICAL} ({steps})"
    if found.status == DIFFER:
        apart = found.ulps if found.ulps is not None else math.nan
        size = "non-finite" if math.isinf(apart) else f"{_g(apart, '.4g')} ulp{'s' * (apart != 1)}"
        return f"{DIFFER} from step {found.first_diff_step} (max {size}, {found.column}; {steps})"
    return found.status


def _compared(item: Agreement) -> str:
    """The backends a row compares; for a group across modes, how many rows or modes."""
    if item.mode == ALL_MODES:
        return f"{len(item.compared)} rows"
    if item.mode == ACROSS_MODES:
        return f"{len(item.compared)} modes"
    return ", ".join(item.compared)


def agreement_title(agreement: Sequence[Agreement]) -> str:
    """What the agreement table compares: backends per mode, or (where one backend ran
    the rows, e.g. `compare --backend jax`) that backend's modes against each other."""
    across = {a.mode == ACROSS_MODES for a in agreement}
    if across == {True}:
        title = "agreement of final x across modes (one backend: no mode ran on two backends)"
    elif True in across:
        title = (
            "cross-backend agreement of final x (largest difference per mode; "
            "across modes: one backend's modes)"
        )
    else:
        title = "cross-backend agreement of final x (largest difference per mode)"
    return f"{title}; {TRAJECTORIES_HEADER}: at every step all its rows recorded"


NO_AGREEMENT = (  # the rows agreement.agreement_of leaves out
    "no mode has finished runs of two backends with a listed final x "
    "(diverged runs, and vectors too long for results.json to list, are not compared)"
)
NOTE_WIDTH = 40  # a longer note is numbered in its cell and written below the table


def notes_below(
    headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> tuple[list[list[str]], list[str]]:
    """The terminal's agreement rows with each long note replaced by `[n]`, and the lines
    `[n] note` for below the table, one difference a line: an Adam group's note on the
    frameworks' conventions runs to ~350 characters, and every line of the table wrapped."""
    at = list(headers).index("note")
    shown, below, marks = [], [], 0
    for row in rows:
        cells = list(row)
        if len(cells[at]) > NOTE_WIDTH:
            marks += 1
            mark = f"[{marks}]"
            first, *rest = cells[at].split("; ")
            below += [f"{mark} {first}", *(f"{' ' * len(mark)} {part}" for part in rest)]
            cells[at] = mark
        shown.append(cells)
    return shown, below


def ulps_in_dtype(item: Agreement) -> float:
    """The ulps of the rows' own dtype: a float64 group's float32 ulps (still in
    agreement.csv) read as if float64 runs agreed only to float32 precision."""
    return item.ulps_f64 if item.ulps_f64 is not None else item.ulps_f32


def text_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Collection[str] = NUMERIC
) -> str:
    """Columns padded to their widest cell; those headed by a `numeric` name right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if h in numeric else c.ljust(w)
            for c, w, h in zip(cells, widths, headers, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Collection[str] = NUMERIC
) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = ["---:" if h in numeric else "---" for h in headers]
    return "\n".join([line(headers), "|" + "|".join(rule) + "|", *map(line, rows)])


def terminal_text(
    rows: Sequence[Row],
    agreement: Sequence[Agreement],
    title: str = "",
    holes: Sequence[Hole] = (),
    derivatives: Sequence[str] = (),
) -> str:
    """The rows' table, the sweep's jobs without a row (one line each), the agreement;
    then the derivatives runs' section (derivative_tables.derivatives_text), if any.
    A report of derivatives runs alone has no minimize table: its jobs without a row
    come after its section."""
    parts = [title] if title else []
    if rows:
        parts.append(text_table(*row_table(rows)))
        parts.append("")
        if holes:
            parts += hole_lines(holes)
            parts.append("")
        if agreement:
            headers, cells = agreement_table(agreement)
            cells, notes = notes_below(headers, cells)
            parts += [agreement_title(agreement), text_table(headers, cells), *notes]
        else:
            parts.append(f"cross-backend agreement: {NO_AGREEMENT}")
    if derivatives:
        parts += [""] * bool(rows) + list(derivatives)
        if holes and not rows:
            parts += ["", *hole_lines(holes)]
    return "\n".join(parts)


def write_files(
    out: Path,
    rows: Sequence[Row],
    agreement: Sequence[Agreement],
    header: Sequence[str],
    plots: Mapping[str, Path],
    holes: Sequence[Hole] = (),
    derivatives: Sequence[str] = (),
    derivatives_data: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """comparison.md (tables and plots), comparison.csv, agreement.csv, comparison.json.

    derivatives: the derivatives runs' markdown section (derivative_tables), put after
    the agreement, and derivatives_data their entries in comparison.json. A report of
    derivatives runs alone has no minimize table, comparison.csv or agreement.csv: its
    section comes first, its jobs without a row after it.
    """
    images = [f"![{name}]({path.name})\n" for name, path in plots.items()]
    across = (
        "; `across modes`: one backend's modes"
        if any(a.mode == ACROSS_MODES for a in agreement)
        else ""
    )
    minimize = [
        "Final x and loss are exact in the run's dtype; `total s` is the run as the runner "
        "timed it (compile, loop, final read-back; not the process's start and imports); "
        "`vs fastest` is the per-step time over the fastest finished row's (1.0x); a "
        "diverged row's is timed over the steps it ran, and may be below 1.0x.",
        "",
        markdown_table(*row_table(rows)),
        "",
        *_holes_markdown(holes),
        "## Cross-backend agreement",
        "",
        f"Largest difference of final x between backends per mode (`all`: across modes "
        f"too{across}), absolute and in ulps of the rows' dtype, counted as the representable "
        "values between them (agreement.csv has float32 ulps for every row, float64 ulps for "
        "float64): the last step only.",
        "",
        *TRAJECTORIES_TEXT,
        "",
        markdown_table(*agreement_table(agreement))
        if agreement
        else f"{NO_AGREEMENT.capitalize()}.",
        "",
    ]
    md = [
        "# Comparison",
        "",
        *header,
        "",
        *(minimize if rows else []),
        *derivatives,
        *(_holes_markdown(holes) if derivatives and not rows else []),
        *(["## Plots", "", *images] if images else []),
    ]
    files = {"markdown": out / MARKDOWN_FILE}
    if rows or not derivatives:
        files["csv"] = out / CSV_FILE
        files["agreement"] = out / AGREEMENT_FILE
    files["json"] = out / JSON_FILE
    atomic_write(files["markdown"], "\n".join(md))
    if "csv" in files:
        atomic_write(files["csv"], csv_text(rows_csv(rows)))
        atomic_write(files["agreement"], csv_text(agreement_csv(agreement)))
    data = {
        "rows": [asdict(r) for r in rows],
        "agreement": [asdict(a) for a in agreement],
        **(derivatives_data or {}),
        "skipped_and_failed": [h.record() for h in holes],
    }
    atomic_write(files["json"], json.dumps(data, indent=2) + "\n")
    return files


def _holes_markdown(holes: Sequence[Hole]) -> list[str]:
    """A section after the table: each job without a row, one list item (its reason's
    `*` and `_` escaped: `a*x^2 + b*x` is no emphasis)."""
    if not holes:
        return []
    items = [f"- {_markdown_text(line)}" for line in hole_lines(holes)]
    return ["## Skipped and failed jobs", "", *items, ""]


def _markdown_text(text: str) -> str:
    return "".join(f"\\{c}" if c in "\\`*_[]<>|" else c for c in text)


def exact_text(value: Any) -> str:
    """repr of the float64 (the value results.json holds), a JSON list for vectors."""
    if isinstance(value, list):
        return json.dumps(value)
    return "" if value is None else repr(float(value))


ROW_CSV = {
    "backend": lambda r: r.backend,
    "mode": lambda r: r.mode,
    "optimizer": lambda r: r.optimizer,
    "dtype": lambda r: r.dtype,
    "status": lambda r: r.status,
    "steps": lambda r: str(r.steps),
    "steps_run": lambda r: str(r.steps_run),
    "problem": lambda r: r.problem_label,
    "problem_settings": lambda r: json.dumps(r.problem, sort_keys=True, default=str),
    "device": lambda r: r.device,
    "final_x": lambda r: exact_text(r.x),
    "final_loss": lambda r: exact_text(r.loss),
    "error_x": lambda r: exact_text(r.error_x),
    "error_loss": lambda r: exact_text(r.error_loss),
    "compile_s": lambda r: exact_text(r.compile_s),
    "run_s": lambda r: exact_text(r.run_s),
    "final_s": lambda r: exact_text(r.final_s),
    "total_s": lambda r: exact_text(r.total_s),
    "step_us": lambda r: exact_text(r.step_us),
    "relative_step_time": lambda r: exact_text(r.relative),
    "run_id": lambda r: r.run_id,
    "run_name": lambda r: r.run_name,
    "started": lambda r: r.started,
    "source": lambda r: r.source,
}
AGREEMENT_CSV = {
    "mode": lambda a: a.mode,
    "dtype": lambda a: a.dtype,
    "optimizer": lambda a: a.optimizer,
    "setup": lambda a: a.setup,
    "backends": lambda a: "; ".join(a.compared),
    "abs_diff": lambda a: exact_text(a.abs_diff),
    "pair_a": lambda a: a.pair[0],
    "pair_b": lambda a: a.pair[1],
    "ulps_float32": lambda a: exact_text(a.ulps_f32),
    "ulps_float64": lambda a: exact_text(a.ulps_f64),
    "trajectories": lambda a: _steps(a).status,
    "trajectory_steps": lambda a: str(_steps(a).steps),
    "first_diff_step": lambda a: _text(_steps(a).first_diff_step),
    "trajectory_ulps": lambda a: exact_text(_steps(a).ulps),
    "trajectory_column": lambda a: _steps(a).column,
    "trajectory_logged_only": lambda a: str(_steps(a).logged_only).lower(),
    "trajectory_missing": lambda a: "; ".join(_steps(a).missing),
    "note": lambda a: a.note,
}


def _steps(item: Agreement) -> StepAgreement:
    """The group's step-by-step agreement; a group not compared reads `not recorded`."""
    return item.trajectory or StepAgreement()


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


def rows_csv(rows: Sequence[Row]) -> list[list[str]]:
    return [list(ROW_CSV), *([get(r) for get in ROW_CSV.values()] for r in rows)]


def agreement_csv(agreement: Sequence[Agreement]) -> list[list[str]]:
    return [list(AGREEMENT_CSV), *([get(a) for get in AGREEMENT_CSV.values()] for a in agreement)]


def csv_text(table: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    return buffer.getvalue()


def _labels(rows: Sequence[Row]) -> list[str]:
    """The plots' names for rows: unique among them, as short as they allow."""
    several_optimizers = len({r.optimizer for r in rows}) > 1
    differing = differing_settings(rows)
    labels = []
    for r in rows:
        parts = [r.backend, r.mode, r.dtype]
        if several_optimizers:
            parts.append(r.optimizer)
        labels.append(" ".join(parts + varying_settings(r, differing)))
    return labels


def write_plots(
    out: Path, rows: Sequence[Row], trajectory_of: Callable[[Row], Trajectory | None]
) -> dict[str, Path]:
    from runner.plots import convergence_plot, step_time_plot

    files: dict[str, Path] = {}
    curves = {}
    optima = {r.optimum_loss for r in rows if math.isfinite(r.optimum_loss)}
    shared = optima.pop() if len(optima) == 1 else None
    labels = _labels(rows)
    for row, label in zip(rows, labels, strict=True):
        trajectory = trajectory_of(row)
        if trajectory is None or not len(trajectory.steps):
            continue
        curve = trajectory.curve()
        if shared is None:  # different problems: plot each run's own gap to its optimum
            curve["loss"] = curve["loss"] - row.optimum_loss
        curves[label] = curve
    if curves:
        files["convergence"] = convergence_plot(
            curves, shared if shared is not None else 0.0, out / CONVERGENCE_FILE
        )
    times = {  # barh draws the first bar at the bottom: reversed, it reads like the table
        label: r.step_us
        for r, label in reversed(list(zip(rows, labels, strict=True)))
        if math.isfinite(r.step_us) and r.step_us > 0
    }
    if times:
        files["step_time"] = step_time_plot(times, out / STEP_TIME_FILE)
    return files
