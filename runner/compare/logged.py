"""Logging a report to MLflow: its files as artifacts and the agreement as metrics.

To a new comparison run (tag runner.kind=comparison) or to an existing one: the sweep's
parent, when a multirun's report is logged as it ends (runner.callbacks), or later by
whoever ends that run (runner.follow, or an upload when the store was away), from the
comparison.json written then. MLflow is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from runner.compare.agreement import Agreement
from runner.compare.derivative_tables import DERIVATIVES_FILE, write_derivatives_csv
from runner.compare.derivatives import DerivativeRow, PointAgreement
from runner.compare.output import CSV_FILE, JSON_FILE, csv_text, rows_csv
from runner.compare.rows import Row
from runner.compare.stepwise import StepAgreement
from runner.compare.store import (
    COMPARISON_KIND,
    FILTERS,
    KIND_TAG,
    describe_selection,
    search_runs,
)
from runner.results import RESULTS_FILE, atomic_write
from runner.sweep_record import REPORT_DIR
from runner.tracking import log_batched, set_terminated
from runner.tracking_store import retry_locked


def _metric_key(*parts: str) -> str:
    return "/".join("".join(c if c.isalnum() or c in "_-. " else "_" for c in p) for p in parts)


def log_report(
    client: Any,
    experiment_id: str,
    files: Mapping[str, Path],
    agreement: Sequence[Agreement],
    rows: Sequence[Row],
    sweep_id: str | None,
    filters: Mapping[str, list[str]],
    log_to_run_id: str | None,
    derivatives: Sequence[DerivativeRow] = (),
    derivative_agreement: Sequence[PointAgreement] = (),
) -> str:
    """Log the files (and the agreement as metrics) to log_to_run_id or a new comparison run.

    Derivatives runs add their count and, per point two backends evaluated, the largest
    difference in ulps (`derivatives_ulps/<dtype>/<problem x0=...>`); a report without
    them logs what it logged before they had a table.
    """
    from mlflow.entities import Metric, RunStatus

    run_id = log_to_run_id
    if run_id is None:
        tags = {KIND_TAG: COMPARISON_KIND, "compare.filters": describe_selection(sweep_id, filters)}
        if sweep_id:
            tags["compare.sweep_id"] = sweep_id
        name = comparison_name(sweep_id, filters)
        run = retry_locked(lambda: client.create_run(experiment_id, run_name=name, tags=tags))
        run_id = run.info.run_id
    status = RunStatus.FAILED
    try:
        now = int(time.time() * 1000)
        several = len({a.optimizer for a in agreement}) > 1
        metrics = [Metric("compare.rows", float(len(rows)), now, 0)]
        for a in agreement:
            where = [a.dtype, a.mode] + ([a.optimizer] if several else [])
            where += [a.setup] if a.setup else []  # split groups: one metric each
            metrics += [
                Metric(_metric_key("agreement_abs", *where), a.abs_diff, now, 0),
                Metric(_metric_key("agreement_ulps_f32", *where), a.ulps_f32, now, 0),
            ]
            if a.ulps_f64 is not None:
                metrics.append(
                    Metric(_metric_key("agreement_ulps_f64", *where), a.ulps_f64, now, 0)
                )
        if derivatives:
            metrics.append(Metric("compare.derivative_rows", float(len(derivatives)), now, 0))
        for point in derivative_agreement:
            if not math.isfinite(point.ulps):  # stored as ±1.8e308 it would read as finite
                continue
            key = _metric_key("derivatives_ulps", point.dtype, point.problem)
            metrics.append(Metric(key, point.ulps, now, 0))
        log_batched(client, run_id, metrics=metrics)  # a metric pair per agreement group
        for path in files.values():
            retry_locked(lambda path=path: client.log_artifact(run_id, str(path)))
        status = RunStatus.FINISHED
    finally:
        if log_to_run_id is None:
            set_terminated(client, run_id, RunStatus.to_string(status))
    return run_id


def comparison_name(sweep_id: str | None, filters: Mapping[str, list[str]]) -> str:
    """'compare <sweep> backend=jax', 'compare all' only when nothing was filtered: a
    comparison of jax's runs was named 'compare all' in the run list."""
    parts = [sweep_id] if sweep_id else []
    parts += [f"{name}={','.join(values)}" for name, values in filters.items() if values]
    return f"compare {' '.join(parts) or 'all'}"


def log_sweep_report(
    client: Any, experiment_id: str, sweep_dir: Path, run_id: str, sweep_id: str
) -> None:
    """Log the report the sweep made as it ended (its folder REPORT_DIR; comparison.json
    holds the rows and agreement) to run_id, its parent, each row's run id filled in, in
    the folder too; nothing when it made none."""
    folder = sweep_dir / REPORT_DIR
    if not (folder / JSON_FILE).is_file():
        return
    data = json.loads((folder / JSON_FILE).read_text())
    rows = [Row(**row) for row in data["rows"]]
    agreement = [_agreement(item) for item in data["agreement"]]
    derivatives = [DerivativeRow(**row) for row in data.get("derivatives", [])]
    points = [PointAgreement(**item) for item in data.get("derivative_agreement", [])]
    ids = _run_ids(client, experiment_id, sweep_dir, sweep_id)
    if ids:
        rows = [replace(row, run_id=ids.get(row.run_name, row.run_id)) for row in rows]
        derivatives = [replace(d, run_id=ids.get(d.run_name, d.run_id)) for d in derivatives]
        _write_run_ids(folder, data, rows, derivatives)
    files = {path.name: path for path in sorted(folder.iterdir()) if path.is_file()}
    log_report(
        client, experiment_id, files, agreement, rows, sweep_id, {}, run_id, derivatives, points
    )


def _run_ids(client: Any, experiment_id: str, sweep_dir: Path, sweep_id: str) -> dict[str, str]:
    """{job folder name: its run id in this store}, matched by each folder's run_uid.

    The sweep's report is made as the sweep ends, from its folders, before its runs are
    all in MLflow: its run_id column was empty, and a reader of comparison.csv could not
    open a row's run."""
    folders = {}
    for path in sweep_dir.glob(f"*/{RESULTS_FILE}"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            folders[json.loads(path.read_text()).get("run_uid")] = path.parent.name
    runs = search_runs(client, experiment_id, sweep_id, {name: [] for name in FILTERS})
    return {
        folders[uid]: run.info.run_id
        for run in runs
        if (uid := run.data.tags.get("run_uid")) in folders
    }


def _write_run_ids(
    folder: Path, data: dict[str, Any], rows: Sequence[Row], derivatives: Sequence[DerivativeRow]
) -> None:
    """The report's files that name runs, rewritten with their run ids."""
    data["rows"] = [asdict(row) for row in rows]
    if "derivatives" in data:
        data["derivatives"] = [asdict(row) for row in derivatives]
    atomic_write(folder / JSON_FILE, json.dumps(data, indent=2) + "\n")
    if (folder / CSV_FILE).is_file():
        atomic_write(folder / CSV_FILE, csv_text(rows_csv(rows)))
    if (folder / DERIVATIVES_FILE).is_file():
        write_derivatives_csv(folder, derivatives)


def _agreement(item: Mapping[str, Any]) -> Agreement:
    """An Agreement as comparison.json holds it (a report older than its trajectory has
    none: not compared)."""
    steps = item.get("trajectory")
    return Agreement(**{**item, "trajectory": StepAgreement(**steps) if steps else None})
