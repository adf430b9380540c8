"""One report from end to end: rows, agreement, files, and the MLflow log.

compare() reads the rows from an MLflow store (what `python -m runner.compare` runs),
compare_folder() from a sweep's run folders (what a sweep runs as it ends); both go
through _report, so the two give the same tables and files. The one module that uses
all the others, so none of them needs to import it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.command_line import default_out_dir
from runner.compare.agreement import Agreement, agreement_of
from runner.compare.derivative_tables import (
    derivatives_data,
    derivatives_markdown,
    derivatives_text,
    write_derivatives_csv,
)
from runner.compare.derivatives import (
    DerivativeRow,
    PointAgreement,
    derivative_order,
    derivative_row_from_result,
    point_agreement,
)
from runner.compare.holes import Hole, sweep_holes
from runner.compare.logged import log_report
from runner.compare.output import terminal_text, write_files, write_plots
from runner.compare.rows import (
    Row,
    latest_per_key,
    row_from_result,
    row_order,
    set_problem_labels,
    set_relative,
)
from runner.compare.stepwise import step_agreement
from runner.compare.store import (
    FILTERS,
    CompareError,
    describe_selection,
    latest_sweep,
    newest_per_setting,
    no_match_message,
    open_client,
    row_of_run,
    run_holes,
    run_kind,
    search_runs,
    split_values,
    still_logging,
    sweep_spellings,
    sweeps_still_logging,
)
from runner.compare.trajectories import (
    Trajectory,
    file_trajectory,
    logged_trajectory,
    remembered,
)
from runner.masking import mask_uri
from runner.results import RESULTS_FILE, TRAJECTORY_FILE, sweep_failures
from runner.run_folders import run_started
from runner.summary import plural
from runner.sweep_record import sweep_id_of
from runner.tracking_store import DEFAULT_EXPERIMENT, resolve_target


@dataclass
class Report:
    rows: list[Row]
    agreement: list[Agreement]
    text: str  # the terminal tables
    out_dir: Path
    files: dict[str, Path]
    run_id: str | None  # the run the files were logged to, None with log=False
    experiment: str
    sweep_id: str | None
    holes: list[Hole] = field(default_factory=list)  # a sweep's skipped and failed jobs
    warnings: list[str] = field(default_factory=list)  # in the header; the CLI's stderr
    derivatives: list[DerivativeRow] = field(default_factory=list)  # task=derivatives runs
    derivative_agreement: list[PointAgreement] = field(default_factory=list)


def compare(
    tracking_uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    sweep_id: str | None = None,
    backends: Iterable[str] | None = None,
    modes: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    out_dir: Path | str | None = None,
    log_to_run_id: str | None = None,
    client: Any = None,
    *,
    log: bool = True,
) -> Report:
    """Compare the matching runs, write the files to out_dir and log them to MLflow.

    With log_to_run_id the files become artifacts of that run (left running: its owner
    ends it); otherwise of a new run "compare <sweep and filters, or 'all'>" tagged
    runner.kind=comparison. `modes` matches a mode exactly ("graph/apply") or by its
    name before the slash ("graph"). Raises CompareError when nothing can be compared.
    """
    uri = resolve_target({"uri": tracking_uri}, Path.cwd()).uri
    if client is None:
        client = open_client(uri, default=tracking_uri is None)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        known = f"; experiments there: {', '.join(names)}" if names else ""
        raise CompareError(f"experiment {experiment!r} not found in {mask_uri(uri)}{known}")
    if sweep_id == "latest":
        sweep_id = latest_sweep(client, found.experiment_id, experiment)
    filters = dict(zip(FILTERS, map(split_values, (backends, modes, dtypes)), strict=True))
    for spelling in sweep_spellings(sweep_id):
        runs = search_runs(client, found.experiment_id, spelling, filters)
        compared = [run for run in runs if run_kind(run) == "row"]
        if compared:
            sweep_id = spelling
            break
    logging = sweeps_still_logging(client, found.experiment_id, sweep_id)
    if not compared:
        message = no_match_message(client, found.experiment_id, experiment, sweep_id, filters)
        raise CompareError("; ".join([message, *map(still_logging, logging)]))
    read = [row_of_run(client, run) for run in newest_per_setting(compared)]
    holes = run_holes(runs)
    without_row = [f"{n} {status}" for status, n in Counter(h.status for h in holes).items()]
    report = _report(
        [row for row in read if isinstance(row, Row)],
        len(compared),
        f"tracking URI: `{mask_uri(uri)}`, experiment `{experiment}`",
        ", ".join(
            [f"{describe_selection(sweep_id, filters)}; {len(compared)} matching", *without_row]
        ),
        experiment,
        sweep_id,
        Path(out_dir) if out_dir else default_out_dir("compare"),
        lambda row: logged_trajectory(client, row),
        holes,
        warnings=[still_logging(s) for s in logging],
        derivatives=[row for row in read if isinstance(row, DerivativeRow)],
    )
    if log:
        report.run_id = log_report(
            client,
            found.experiment_id,
            report.files,
            report.agreement,
            report.rows,
            sweep_id,
            filters,
            log_to_run_id,
            report.derivatives,
            report.derivative_agreement,
        )
    return report


def compare_folder(sweep_dir: Path, experiment: str, out_dir: Path) -> Report:
    """The report of a sweep from its job folders (results.json, trajectory.csv), no MLflow.

    A sweep's own report is made this way as it ends: the same rows as reading the
    runs back from MLflow (results.json is what both read), without waiting for the
    store; the sweep's logging then attaches the files to the sweep's parent run.
    """
    written = {path: path.stat().st_mtime for path in sweep_dir.glob(f"*/{RESULTS_FILE}")}
    # newest first, as latest_per_key expects
    newest_first = sorted(sorted(written), key=written.__getitem__, reverse=True)
    rows, derivatives, not_compared = [], [], []
    for path in newest_first:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("status") not in ("finished", "diverged"):
            not_compared.append(str(result.get("status")))  # skipped, interrupted
            continue
        began = run_started(path.parent, path)
        started = datetime.fromtimestamp(began).isoformat(timespec="seconds")
        common = {"run_id": "", "run_name": path.parent.name, "started": started}
        row = row_from_result(result, **common)
        if row is not None:
            rows.append(row)
        elif (derivative := derivative_row_from_result(result, **common)) is not None:
            derivatives.append(derivative)
    if not rows and not derivatives:
        raise CompareError(f"no finished minimize or derivatives runs in {sweep_dir}")
    sweep_id = sweep_id_of(sweep_dir)  # as its MLflow group is tagged
    statuses = [row.status for row in [*rows, *derivatives]]
    counts = _job_counts(statuses, not_compared, len(sweep_failures(sweep_dir)))
    return _report(
        rows,
        len(rows) + len(derivatives),
        f"run folders: `{sweep_dir}`",
        f"sweep {sweep_id}; {counts}",
        experiment,
        sweep_id,
        out_dir,
        lambda row: file_trajectory(sweep_dir / row.run_name / TRAJECTORY_FILE),
        sweep_holes(sweep_dir),
        derivatives=derivatives,
    )


def _job_counts(statuses: Sequence[str], not_compared: Sequence[str], failed: int) -> str:
    """'4 finished', '3 finished, 1 diverged, 1 skipped, 1 failed': every job the sweep
    ran, so one that has no row (a combination the backend cannot express, a bad setting)
    is not silently missing from the header."""
    counts = {"finished": 0, "diverged": 0, "skipped": 0, "interrupted": 0}
    for status in [*statuses, *not_compared]:
        counts[status] = counts.get(status, 0) + 1
    counts["failed"] = failed
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n or status == "finished")


def _report(
    newest_first: list[Row],
    found: int,
    source: str,
    runs: str,
    experiment: str,
    sweep_id: str | None,
    out: Path,
    trajectory_of: Callable[[Row], Trajectory | None],
    holes: Sequence[Hole] = (),
    warnings: Sequence[str] = (),
    derivatives: Sequence[DerivativeRow] = (),
) -> Report:
    """Tables, agreement, plots and files for one row per configuration (the latest), of
    the `found` runs, whatever they came from; the header says how many were repeats,
    and what the rows may lack (warnings: a sweep still being logged), and a sweep's jobs
    without a row (holes) are listed after the table. Derivatives runs (newest first too)
    get a table and an agreement of their own, after the minimize runs'. Each row's
    trajectory (trajectory_of) is read once, for the step-by-step agreement and the plot."""
    rows = list(latest_per_key(newest_first).values())
    set_problem_labels(rows)
    rows.sort(key=row_order)
    set_relative(rows)
    trajectory_of = remembered(trajectory_of)
    agreement = agreement_of(
        rows,
        lambda members, labels, dtype: step_agreement(
            [trajectory_of(m) for m in members], labels, dtype
        ),
    )
    points = list(latest_per_key(derivatives).values())
    set_problem_labels(points, always=("x0",))  # a derivative is at a point: say which
    points.sort(key=derivative_order)
    point_agreed = point_agreement(points)
    _make_out(out)
    repeats = found - len(rows) - len(points)
    kept = (
        f"one per configuration; {plural(repeats, 'earlier repeat')} of an "
        "identical configuration left out"
        if repeats
        else "one per run"
    )
    header = [
        f"- {source}",
        f"- runs: {runs}, {plural(len(rows) + len(points), 'row')} ({kept})",
        *(f"- warning: {warning}" for warning in warnings),
        f"- made {datetime.now().isoformat(timespec='seconds')}",
    ]
    title = f"{experiment}: {header[1].removeprefix('- runs: ')}"
    shown = derivatives_text(points, point_agreed) if points else []
    text = terminal_text(rows, agreement, title, holes, shown)
    plots = write_plots(out, rows, trajectory_of)
    files = write_files(
        out,
        rows,
        agreement,
        header,
        plots,
        holes,
        derivatives_markdown(points, point_agreed) if points else (),
        derivatives_data(points, point_agreed) if points else None,
    )
    if points:
        files["derivatives"] = write_derivatives_csv(out, points)
    return Report(
        rows,
        agreement,
        text,
        out,
        {**files, **plots},
        None,
        experiment,
        sweep_id,
        list(holes),
        list(warnings),
        points,
        point_agreed,
    )


def _make_out(out: Path) -> None:
    """The report's folder, or a CompareError naming it (a caller that skipped
    out_dir_error, or a folder that became unwritable since)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompareError(f"cannot write the report to {out}: {exc.strerror}") from None
