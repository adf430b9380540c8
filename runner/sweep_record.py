"""A sweep's record file (SWEEP_FILE, in the sweep's folder) and the ids made from it.

The multirun callback writes it before any job starts: the sweep's group in MLflow
(sweep_id), its parent run, who logs its jobs and its overrides. The jobs, the sweep's
logger (runner.follow) and later uploads read it, and name a job that failed before
writing results.json alike (failure_uid). Files and ids only, no MLflow: reading the
record is the same whether the store is there or not.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from runner.results import atomic_write

SWEEP_FILE = "mlflow_sweep.json"
REPORT_DIR = "compare"  # the comparison report of its jobs a sweep makes as it ends
# a parallel sweep's launcher was stopped and waits for its running jobs to save: a queued
# job that a worker starts now does not run (runner.joblib_launcher)
STOPPING_FILE = ".stopping"
NOT_STARTED = "not started"  # what such a job returns to the launcher


@dataclass(frozen=True)
class SweepInfo:
    sweep_id: str
    parent_run_id: str | None
    # who logs the sweep's jobs: "jobs" (each job, in-process), "follower" (one
    # `python -m runner.follow` for the sweep) or "nobody" (its store was away)
    logged_by: str = "jobs"
    overrides: str = ""  # the sweep's command-line overrides, a tag of its parent run
    # when the sweep started, in MLflow's ms: its parent's start, which the sweep's logger
    # (niced, so late under load) made as late as after the last job had ended
    started_ms: int | None = None


def read_sweep(sweep_dir: Path) -> SweepInfo:
    """The sweep's group, written by the multirun callback before any job started."""
    path = sweep_dir / SWEEP_FILE
    if path.exists():
        data = json.loads(path.read_text())
        return SweepInfo(
            data["sweep_id"],
            data.get("parent_run_id"),
            data.get("logged_by", "jobs"),
            data.get("overrides", ""),
            data.get("started_ms"),
        )
    return SweepInfo(sweep_id_of(sweep_dir), None)


def sweep_id_of(sweep_dir: Path) -> str:
    """A sweep's group in MLflow: its folder's absolute path. The path as given (usually
    outputs/multirun/<date>/<time>, relative) made sweeps started in different folders
    at the same second one group in a shared store, and an absolute path pasted into
    `compare --sweep` from another folder matched nothing."""
    return sweep_dir.absolute().as_posix()


def write_sweep(sweep_dir: Path, info: SweepInfo) -> None:
    atomic_write(sweep_dir / SWEEP_FILE, json.dumps(asdict(info)))


def failure_uid(sweep_id: str, job: str) -> str:
    """The run_uid of a sweep job that failed before writing results.json (which holds a
    run's run_uid): made from the sweep's id (mlflow_sweep.json) and the job folder's
    name, so every logger of the sweep, and every later upload, names the run alike."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{sweep_id}/{job}").hex
