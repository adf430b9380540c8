"""Logging a report to MLflow: its files as artifacts and the agreement as metrics.

To a new comparison run (tag runner.kind=comparison) or to an existing one: the sweep's
parent, when a multirun's report is logged as it ends (runner.callbacks), or later by
whoever ends that run (runner.follow, or an upload when the store was away), from the
comparison.json written then. MLflow is imported inside the functions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.compare.agreement import Agreement
from runner.compare.derivatives import DerivativeRow, PointAgreement
from runner.compare.output import JSON_FILE
from runner.compare.rows import Row
from runner.compare.stepwise import StepAgreement
from runner.compare.store import COMPARISON_KIND, KIND_TAG, describe_selection
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
    holds the rows and agreement) to run_id, its parent; nothing when it made none."""
    folder = sweep_dir / REPORT_DIR
    if not (folder / JSON_FILE).is_file():
        return
    files = {path.name: path for path in sorted(folder.iterdir()) if path.is_file()}
    data = json.loads(files[JSON_FILE].read_text())
    rows = [Row(**row) for row in data["rows"]]
    agreement = [_agreement(item) for item in data["agreement"]]
    derivatives = [DerivativeRow(**row) for row in data.get("derivatives", [])]
    points = [PointAgreement(**item) for item in data.get("derivative_agreement", [])]
    log_report(
        client, experiment_id, files, agreement, rows, sweep_id, {}, run_id, derivatives, points
    )


def _agreement(item: Mapping[str, Any]) -> Agreement:
    """An Agreement as comparison.json holds it (a report older than its trajectory has
    none: not compared)."""
    steps = item.get("trajectory")
    return Agreement(**{**item, "trajectory": StepAgreement(**steps) if steps else None})
