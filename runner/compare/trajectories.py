"""Each row's recorded trajectory, read once for the convergence plot and the step-by-step
agreement (stepwise): from a sweep's trajectory.csv, or from MLflow.

From MLflow a run's trajectory.csv artifact is read where it is small enough: every
recorded step, exact, in one download, which on a local store takes less than the loss
history alone (what the plot read before; x and the gradient would be two more). A run
that recorded more rows, or whose artifact cannot be read, gives its per-step metrics,
which hold at most MAX_POINTS_PER_METRIC steps of it (runner.tracking.thin) and no
non-finite value.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner.compare.rows import Row
from runner.compare.store import download_text
from runner.results import TRAJECTORY_FILE
from runner.tracking import MAX_POINTS_PER_METRIC, parse_trajectory, read_trajectory, thin
from runner.tracking_store import retry_locked

# trajectory.csv is downloaded where the run recorded at most this many rows (~3 MB;
# record_every's default keeps any run to 10,001); longer ones are read from the metrics.
# Below it the file is the cheaper read on a local store (8 runs of 30,001 rows: 0.50 s
# against 0.6-0.9 s for their three metric histories; of 100,001 rows: 0.93 s against
# the same 0.6-0.9 s), and it holds every step.
CSV_ROWS_LIMIT = 50_001
# What trajectory_rows records per step: a scalar problem's x and grad, a vector
# problem's distance ||x - x*|| and gradient norm; the loss of both.
SCALAR_COLUMNS = ("x", "loss", "grad")
VECTOR_COLUMNS = ("dist", "loss", "grad_norm")


@dataclass
class Trajectory:
    """One run's recorded steps and their values, in order, one value per step.

    logged_only: the steps are those MLflow kept of a longer record (thinned), so a
    comparison over them may miss a step where runs differ.
    """

    steps: np.ndarray  # int64
    columns: dict[str, np.ndarray]  # float64, one entry per step
    logged_only: bool = False

    def curve(self) -> dict[str, np.ndarray]:
        """The convergence plot's step and loss, at most MAX_POINTS_PER_METRIC of them, as
        evenly spaced as MLflow's metrics hold them (runner.tracking.thin): a line of 10,001
        points looks the same and takes longer to draw. New arrays: the plot shifts the
        loss of runs of different problems in place."""
        keep = thin(len(self.steps))
        return {"step": self.steps[keep].astype(np.float64), "loss": self.columns["loss"][keep]}


def from_columns(columns: Mapping[str, np.ndarray], logged_only: bool = False) -> Trajectory:
    """A Trajectory from trajectory.csv's columns; a step written twice keeps its last row
    (the final state), so every step has one value."""
    steps = np.asarray(columns["step"]).astype(np.int64)
    _, last_first = np.unique(steps[::-1], return_index=True)
    keep = len(steps) - 1 - last_first  # ascending steps, the last row of each
    return Trajectory(
        steps[keep],
        {k: np.asarray(v, np.float64)[keep] for k, v in columns.items() if k != "step"},
        logged_only,
    )


def file_trajectory(path: Path) -> Trajectory | None:
    """A run folder's trajectory.csv; None where the run wrote none (an older result)."""
    if not path.is_file():
        return None
    return from_columns(read_trajectory(path))


def logged_trajectory(client: Any, row: Row) -> Trajectory | None:
    """A logged run's trajectory: its trajectory.csv where the run recorded few enough
    rows, else (or where the artifact cannot be read) its per-step metrics; None where
    it has neither."""
    if recorded_rows(row) <= CSV_ROWS_LIMIT:
        text = download_text(client, row.run_id, TRAJECTORY_FILE)
        if text is not None:
            return from_columns(parse_trajectory(io.StringIO(text)))
    return metric_trajectory(client, row)


def recorded_rows(row: Row) -> float:
    """How many rows the run's trajectory.csv holds at most: every record_every-th step
    from 0, and the final state; unknown (inf) where its results.json did not say."""
    if not row.record_every:
        return float("inf")
    return row.steps_run // row.record_every + 2


def metric_trajectory(client: Any, row: Row) -> Trajectory | None:
    """The run's per-step metrics (as runner.tracking.log_run_dir logged them), one
    history a column; None where a column has none (a run that logged the loss alone is
    no trajectory to call identical). A step where a column has no value held a
    non-finite one (MLflow is given none): it reads NaN, so two runs' non-finite values
    there compare equal. logged_only where the record may have been thinned."""
    vector = row.problem.get("dim") not in (None, "None")
    histories = {
        name: retry_locked(lambda name=name: client.get_metric_history(row.run_id, name))
        for name in (VECTOR_COLUMNS if vector else SCALAR_COLUMNS)
    }
    if not all(histories.values()):
        return None
    steps = np.array(sorted({m.step for h in histories.values() for m in h}), np.int64)
    at = {int(step): i for i, step in enumerate(steps)}
    columns = {}
    for name, history in histories.items():
        values = np.full(len(steps), np.nan)
        for metric in history:
            values[at[metric.step]] = metric.value
        columns[name] = values
    thinned = len(histories["loss"]) >= MAX_POINTS_PER_METRIC
    return Trajectory(steps, columns, logged_only=thinned)


def remembered(load: Callable[[Row], Trajectory | None]) -> Callable[[Row], Trajectory | None]:
    """load, read once per row: the agreement and the plot ask for the same rows."""
    seen: dict[tuple[str, ...], Trajectory | None] = {}

    def once(row: Row) -> Trajectory | None:
        key = (row.run_id, row.run_name, *row.key)
        if key not in seen:
            seen[key] = load(row)
        return seen[key]

    return once
