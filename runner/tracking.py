"""MLflow as one consumer of a run's files: everything logged is read from the run dir.

Reading results.json and trajectory.csv (rather than live objects) means the same
code logs a run as it ends and uploads a run whose server was away later on. The
client API (MlflowClient) is used throughout, never MLflow's process-wide active
run, so a worker process reused by a parallel launcher starts every job clean.

What needs no MLflow lives beside it: addressing and checking the store, and its
errors (runner.tracking_store), masking credentials (runner.masking) and a sweep's
record file (runner.sweep_record).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import urlsplit

import numpy as np

from runner.config import MINIMIZE_ONLY
from runner.console import say
from runner.errors import RunnerError, UnsupportedError, setting
from runner.masking import is_secret_key, mask_text, mask_uri
from runner.naming import mode_label
from runner.results import (
    JOB_FAILURE_FILE,
    RESULTS_FILE,
    TRAJECTORY_FILE,
    sweep_failures,
)
from runner.sweep_record import SweepInfo, failure_uid, write_sweep
from runner.tracking_store import (
    TrackingError,
    TrackingTarget,
    is_http,
    make_store_folder,
    probe_server,
    retry_locked,
    sqlite_path,
    store_creation_lock,
    store_error,
)

MAX_POINTS_PER_METRIC = 1000
BATCH_VALUES = 1000  # MLflow's own per-request limit for metrics (and all values)
TAGS_PER_BATCH = 100  # ... and for tags
PARAM_VALUE_LIMIT = 6000
KEY_LIMIT = 250
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
FAILED_JOBS_TAG = "failed_jobs"  # on a sweep's parent run: how many of its jobs failed
PLOT_FILE = "convergence.png"

T = TypeVar("T")


def client_for(target: TrackingTarget) -> Any:
    """An MlflowClient with HTTP retries short enough that an outage is reported in seconds.

    Every way the store can be unusable (unreachable or failing server, a file that is
    not an SQLite database, a store locked for longer than LOCK_WAIT_S) is a TrackingError.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if urlsplit(target.uri).password is not None or urlsplit(target.uri).username is not None:
        # MLflow prints "View run ... at <tracking URI>" to stdout: not with credentials in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow import MlflowClient

    # MLflow's own handler would print its schema set-up (INFO) into the run's summary.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    make_store_folder(target.uri)
    if is_http(target.uri):
        probe_server(target)
        lock: Any = contextlib.nullcontext()
    else:
        if target.uri.startswith("sqlite:///"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported unlocked)
        lock = store_creation_lock(target.uri)
    try:
        with lock:
            return retry_locked(lambda: MlflowClient(tracking_uri=target.uri))
    except Exception as exc:
        raise store_error(target.uri, exc) from None


def logs_in_background(tracking: Mapping[str, Any], target: TrackingTarget) -> bool:
    """Whether a single run is logged by a detached upload after it ends.

    tracking.background (default true), for the stores the foreground can check
    without MLflow (SQLite files, HTTP servers), and not inside a SLURM job, whose
    end would kill the upload with the job.
    """
    background = tracking.get("background", True)
    if not isinstance(background, bool):
        given = setting("tracking.background", background)
        raise RunnerError(f"{given} is not allowed; give true or false")
    known = is_http(target.uri) or sqlite_path(target.uri) is not None
    return background and known and "SLURM_JOB_ID" not in os.environ


def ensure_experiment(client: Any, target: TrackingTarget) -> str:
    """Get or create the experiment; safe when several processes race to create it."""
    try:
        return _ensure_experiment(client, target)
    except Exception as exc:
        raise store_error(target.uri, exc) from None


def _ensure_experiment(client: Any, target: TrackingTarget) -> str:

    def get_or_create() -> str:
        found = client.get_experiment_by_name(target.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(
                target.experiment,
                artifact_location=target.artifact_location,
                tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
            )
        except Exception:
            found = client.get_experiment_by_name(target.experiment)
            if found is None:
                raise
            return found.experiment_id

    return retry_locked(get_or_create)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config as dotted params within MLflow's limits, secrets masked; a
    derivatives run's without the optimization's settings, which it does not use (its
    params read mode.name=manual, optimizer.name=sgd, steps=1000)."""
    unused = MINIMIZE_ONLY if cfg.get("task") == "derivatives" else ()
    params = {}
    for key, value in flatten({k: v for k, v in cfg.items() if k not in unused}).items():
        text = "***" if is_secret_key(key) else str(value)
        if key.endswith("uri") and isinstance(value, str):
            text = mask_uri(value)
        params[key[:KEY_LIMIT]] = text[:PARAM_VALUE_LIMIT]
    return params


def run_tags(
    cfg: Mapping[str, Any],
    overrides: Iterable[str],
    sweep_id: str | None,
    git: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Tags known before the run starts; result_tags adds framework, versions and device.

    git: the code state the run recorded as it started (runner.provenance.git_state, kept
    in its record), never read here: a run is often logged after it ran, when the
    checkout may hold another commit. None (a record made outside git, or before runs
    recorded it): no git tags, rather than those of the checkout at logging time."""
    tags = {
        "backend": str(cfg["backend"]["name"]),
        "task": str(cfg.get("task")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "overrides": mask_text(
            " ".join(o for o in overrides if not is_secret_key(o.split("=")[0]))
        ),
        **git_tags(git),
    }
    if sweep_id:
        tags["sweep_id"] = sweep_id
    return tags


def git_tags(git: Mapping[str, Any] | None) -> dict[str, str]:
    """The commit (as ours and as MLflow's own source tag) and git_dirty: whether tracked
    files differed from it, when the commit alone does not say which code ran."""
    if not git or not git.get("commit"):
        return {}
    commit = str(git["commit"])
    return {
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "git_dirty": str(bool(git.get("dirty"))).lower(),
    }


def thin(rows: int, limit: int = MAX_POINTS_PER_METRIC) -> np.ndarray:
    """Evenly spaced row indices, always keeping the first and last row."""
    if rows <= limit:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, limit).round().astype(np.int64))


def _batches(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_batched(
    client: Any,
    run_id: str,
    metrics: Sequence[Any] = (),
    params: Sequence[Any] = (),
    tags: Sequence[Any] = (),
) -> None:
    """Metrics, params and tags in requests of MLflow's sizes (1000 metrics, 100 params or
    tags), each retried alone on a locked store. MlflowClient.log_batch splits a long list
    itself, but a retry of the whole call would send again what its first requests stored."""
    for kind, items, size in (
        ("metrics", metrics, BATCH_VALUES),
        ("params", params, TAGS_PER_BATCH),
        ("tags", tags, TAGS_PER_BATCH),
    ):
        for batch in _batches(list(items), size):
            retry_locked(lambda kind=kind, batch=batch: client.log_batch(run_id, **{kind: batch}))


def log_run_dir(
    client: Any, run_id: str, run_dir: Path, tags: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Log results.json, trajectory.csv and their plot from run_dir to an existing run.

    Metrics and tags (the result's and `tags`) go in as few log_batch calls as MLflow
    allows (1000 values a call): 4 for a 1000-step run's 3003 trajectory points.
    """
    from mlflow.entities import Metric, RunTag

    extra = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    results_path = run_dir / RESULTS_FILE
    if not results_path.exists():  # failed or stopped before a result: what it was to run
        try:
            log_hydra_config(client, run_id, run_dir)
            if (run_dir / JOB_FAILURE_FILE).exists():
                client.log_artifact(run_id, str(run_dir / JOB_FAILURE_FILE))
        finally:  # last, and whatever became of the files: its error is what it has to say
            if extra:
                retry_locked(lambda: client.log_batch(run_id, tags=extra))
        return None
    result = json.loads(results_path.read_text())
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in result_metrics(result).items()]
    all_tags = [RunTag(k, str(v)) for k, v in result_tags(result).items()] + extra
    trajectory = run_dir / TRAJECTORY_FILE
    if trajectory.exists():
        columns = read_trajectory(trajectory)
        keep = thin(len(columns["step"]))
        steps = columns["step"][keep].astype(np.int64).tolist()
        for name, values in columns.items():
            if name == "step":
                continue
            kept = values[keep]
            finite = np.isfinite(kept).tolist()
            metrics += [
                Metric(name, value, now, step)
                for value, step, ok in zip(kept.tolist(), steps, finite, strict=True)
                if ok
            ]
    # tags ride in the first batch (MLflow: <= 100 tags, <= 1000 values in all a call)
    head, rest = all_tags[:TAGS_PER_BATCH], all_tags[TAGS_PER_BATCH:]
    first, metrics = metrics[: BATCH_VALUES - len(head)], metrics[BATCH_VALUES - len(head) :]
    retry_locked(lambda: client.log_batch(run_id, metrics=first, tags=head))
    for batch in _batches(rest, TAGS_PER_BATCH):
        retry_locked(lambda batch=batch: client.log_batch(run_id, tags=batch))
    for batch in _batches(metrics, BATCH_VALUES):
        retry_locked(lambda batch=batch: client.log_batch(run_id, metrics=batch))
    if trajectory.exists():
        from runner.plots import convergence_plot

        convergence_plot(
            {result_label(result): columns}, result["optimum"]["loss"], run_dir / PLOT_FILE
        )
    for name in (TRAJECTORY_FILE, PLOT_FILE):
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name))
    log_hydra_config(client, run_id, run_dir)
    # last: a run holding results.json is complete (python -m runner.upload relies on it)
    client.log_artifact(run_id, str(results_path))
    return result


def log_hydra_config(client: Any, run_id: str, run_dir: Path) -> None:
    """Log the run's .hydra/*.yaml with credentials masked (Hydra writes them verbatim)."""
    hydra_dir = run_dir / ".hydra"
    files = sorted(hydra_dir.glob("*.yaml")) if hydra_dir.is_dir() else []
    if not files:
        return
    with tempfile.TemporaryDirectory(prefix="runner-hydra-") as tmp:
        for path in files:
            (Path(tmp) / path.name).write_text(mask_text(path.read_text()))
        client.log_artifacts(run_id, tmp, artifact_path="hydra")


def result_label(result: Mapping[str, Any]) -> str:
    mode = mode_label(result.get("mode") or result.get("task"), result.get("update"))
    return f"{result.get('backend')} {mode} {result.get('dtype')}"


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The final numbers of a run, as MLflow metrics (vectors by their norm), those that
    are finite: as for the per-step metrics, a diverged run's inf or NaN (final_loss,
    error_loss, ...) is left out, since MLflow stores inf as ±1.8e308, which reads as a
    finite number. results.json keeps the value itself."""
    if result.get("status") == "skipped":
        return {}
    return {k: v for k, v in _final_numbers(result).items() if np.isfinite(v)}


def _final_numbers(result: Mapping[str, Any]) -> dict[str, float]:
    """Every final number of a run that is not skipped, finite or not."""
    if result["task"] == "derivatives":
        values = flatten({k: result[k] for k in ("y", "dy_dx", "dy_dcoef", "d2y_dx2", "compiled")})
        errors = {f"error.{k}": v for k, v in flatten(result["error"]).items()}
        return {k: float(v) for k, v in {**values, **errors}.items()}
    # A vector x is logged by its norms, whether or not results.json lists it (x of more
    # than MAX_JSON_VECTOR entries is not): ||x|| and ||x - x*||.
    vector = {"error_dist": result["error"]["dist"]} if "x_norm" in result else {}
    metrics = {
        "final_loss": result["loss"],
        "final_x": result.get("x_norm", result["x"]),
        "error_x": result["error"]["x"],
        "error_loss": result["error"]["loss"],
        **vector,
        "steps_run": result["steps_run"],
        **result["timings"],
    }
    out = {}
    for key, value in metrics.items():
        array = np.asarray(value, dtype=np.float64)
        out[key] = float(array if array.ndim == 0 else np.linalg.norm(array))
    return out


def result_tags(result: Mapping[str, Any]) -> dict[str, str]:
    tags = {
        "framework": result.get("framework", ""),
        "status": result.get("status", ""),
        "device": result.get("device", ""),
        "device_name": result.get("device_name", ""),
        "dtype": result.get("dtype", ""),
    }
    if result.get("mode"):
        tags["mode"] = mode_label(result["mode"], result.get("update"))
    versions = result.get("versions", {})
    for name, version in versions.items():
        tags[f"version.{name}"] = version
    if versions:  # the backend's first (Backend.versions): one key across backends
        tags["framework_version"] = next(iter(versions.values()))
    for key, value in result.get("optimizer_used", {}).items():  # the params are as asked
        tags[f"optimizer_used.{key}"] = str(value)
    return {**tags, **machine_tags(result)}


def machine_tags(result: Mapping[str, Any]) -> dict[str, str]:
    """Where the run ran, from its record (results.json `machine`, `environment`): `cpu`,
    `cpu_features` (comma-joined; none where /proc/cpuinfo did not say) and `env.NAME`
    for each numerics-relevant variable that was set, its value masked as recorded."""
    machine = result.get("machine") or {}
    tags = {}
    if machine.get("cpu"):
        tags["cpu"] = str(machine["cpu"])[:PARAM_VALUE_LIMIT]
    if machine.get("cpu_features") is not None:
        tags["cpu_features"] = ",".join(machine["cpu_features"]) or "none"
    for name, value in (result.get("environment") or {}).items():
        text = "***" if is_secret_key(name) else mask_text(str(value))
        tags[f"env.{name}"[:KEY_LIMIT]] = text[:PARAM_VALUE_LIMIT]
    return tags


def read_trajectory(path: Path) -> dict[str, np.ndarray]:
    """trajectory.csv's columns by name, float64."""
    with path.open(encoding="utf-8") as handle:
        return parse_trajectory(handle)


def parse_trajectory(handle: TextIO) -> dict[str, np.ndarray]:
    """trajectory.csv's columns from an open file or a logged copy's text (io.StringIO).
    np.loadtxt, not genfromtxt: a report reads every run's file, and loadtxt parses one
    ~3.5 times as fast (10,001 rows: 5 ms)."""
    names = handle.readline().strip().split(",")
    data = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    return {name: data[:, i] for i, name in enumerate(names)}


def start_sweep_parent(
    client: Any, experiment_id: str, sweep_dir: Path, sweep: SweepInfo
) -> SweepInfo:
    """Create the sweep's parent run (RUNNING while the sweep runs); its id goes to SWEEP_FILE.

    Whoever logs the sweep creates it: the launcher (jobs log in-process) or the
    sweep's logger (runner.follow).
    """
    started = replace(
        sweep, parent_run_id=create_sweep_parent(client, experiment_id, sweep_dir, sweep)
    )
    write_sweep(sweep_dir, started)
    return started


def create_sweep_parent(
    client: Any,
    experiment_id: str,
    sweep_dir: Path,
    sweep: SweepInfo,
    extra_tags: Mapping[str, str] | None = None,
    start_time: int | None = None,
) -> str:
    """A new parent run for the sweep (RUNNING), its id: named after the sweep's folder,
    tagged with its sweep_id and command-line overrides (SWEEP_FILE's), and `extra_tags`.
    Made as the sweep starts (start_sweep_parent), or by an upload to a store that has
    none (runner.upload, extra_tags runner.uploaded); it starts at start_time, else when
    the sweep started (its record's started_ms), else now."""
    tags = {
        "sweep_id": sweep.sweep_id,
        "runner.kind": "sweep",
        "overrides": sweep.overrides,
        **(extra_tags or {}),
    }
    run = retry_locked(
        lambda: client.create_run(
            experiment_id,
            run_name=f"sweep {sweep_dir.name}",
            tags=tags,
            start_time=start_time or sweep.started_ms,
        )
    )
    return run.info.run_id


@contextmanager
def tracked_run(
    client: Any,
    experiment_id: str,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    run_dir: Path,
    parent_run_id: str | None = None,
) -> Iterator[str]:
    """An MLflow run around the job: FINISHED, FAILED (error tagged) or KILLED.

    Whatever the job left in run_dir is logged in every case, so a diverged or
    interrupted run keeps its partial trajectory in MLflow too. A store that fails
    before the job starts raises TrackingError before the job runs; one that fails
    while recording the result raises TrackingError after it (the files are on disk),
    unless the job itself failed: then the job's error goes on and the store's is
    printed, so the user reads both.
    """
    from mlflow.entities import RunStatus

    uri = getattr(client, "tracking_uri", "") or ""
    run_id = start_run(client, experiment_id, run_name, params, tags, parent_run_id)
    status, error, extra_tags = RunStatus.FINISHED, None, {}
    job_failed = False
    try:
        yield run_id
    except KeyboardInterrupt:
        status, error, job_failed = RunStatus.KILLED, "interrupted", True
        raise
    except UnsupportedError as skipped:  # by design: results.json says why
        extra_tags["skip_reason"] = str(skipped)[:5000]
        job_failed = True
        raise
    except BaseException as exc:
        status, error, job_failed = RunStatus.FAILED, str(exc) or type(exc).__name__, True
        raise
    finally:
        if error:
            extra_tags["error"] = mask_text(error)[:5000]
        if status == RunStatus.FAILED:
            extra_tags.update(_failed_job_identity(tags, run_dir))
        problem = finish_run(client, run_id, run_dir, RunStatus.to_string(status), extra_tags)
        if problem is not None:
            outage = store_error(uri, problem)
            if not job_failed:
                raise outage
            say(f"error: {outage}", err=True)


def _failed_job_identity(tags: Mapping[str, str], run_dir: Path) -> dict[str, str]:
    """A sweep job that failed before it had a result is named by failure_uid, not by the
    run_uid no results.json holds: the sweep's end (and a later upload) records the job
    folders that failed without a run in MLflow, and must find this one there."""
    sweep_id = tags.get("sweep_id")
    if not sweep_id or (run_dir / RESULTS_FILE).exists():
        return {}
    return {"run_uid": failure_uid(sweep_id, run_dir.name)}


def failed_jobs(sweep_dir: Path) -> int:
    """The sweep's jobs that failed (job_failure.json), a store that was away aside: a
    job whose only fault was the store has its results, and uploading records them."""
    return sum(
        1 for f in sweep_failures(sweep_dir) if f.get("exit_code") != TrackingError.exit_code
    )


def end_sweep_parent(
    client: Any, run_id: str, sweep_dir: Path | None, status: str, end_time: int | None = None
) -> None:
    """End the sweep's parent run: FAILED where a job failed (a sweep that ran to its end
    was FINISHED even then; KILLED, an interrupted sweep, stays KILLED), tagged with how
    many failed (FAILED_JOBS_TAG), so the run list tells a sweep with holes from one without.
    sweep_dir None: the sweep's folder is not known here (none of its jobs was seen)."""
    if sweep_dir is not None:
        failed = failed_jobs(sweep_dir)
        if failed and status == "FINISHED":
            status = "FAILED"
        retry_locked(lambda: client.set_tag(run_id, FAILED_JOBS_TAG, str(failed)))
    set_terminated(client, run_id, status, end_time)


def start_run(
    client: Any,
    experiment_id: str,
    run_name: str,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
    start_time: int | None = None,
) -> str:
    """Create a run with its params; a store that fails is a TrackingError."""
    from mlflow.entities import Param

    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        run = retry_locked(
            lambda: client.create_run(
                experiment_id, run_name=run_name, tags=all_tags, start_time=start_time
            )
        )
        run_id = run.info.run_id
        batch = [Param(k, v) for k, v in params.items()]
        for chunk in _batches(batch, 100):
            retry_locked(lambda chunk=chunk: client.log_batch(run_id, params=chunk))
    except Exception as exc:
        raise store_error(getattr(client, "tracking_uri", "") or "", exc) from None
    return run_id


def finish_run(
    client: Any,
    run_id: str,
    run_dir: Path,
    status: str,
    tags: Mapping[str, str],
    end_time: int | None = None,
) -> Exception | None:
    """Log the run dir, its end tags and status; the first store error, if any, is returned.

    The status is set even when logging failed, so the run does not stay RUNNING
    when the store is still there; `python -m runner.upload` completes it later.
    """
    problem: Exception | None = None
    try:
        log_run_dir(client, run_id, run_dir, tags)
    except Exception as exc:
        problem = exc
    try:
        set_terminated(client, run_id, status, end_time)
    except Exception as exc:
        problem = problem or exc
    return problem


def set_terminated(client: Any, run_id: str, status: str, end_time: int | None = None) -> None:
    """End the run. MLflow prints a "View run" link per run ended in an HTTP store, to
    stdout, between the runner's own lines (which name the run's files and upload)."""
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(name)
    os.environ[name] = "true"
    try:
        retry_locked(lambda: client.set_terminated(run_id, status, end_time=end_time))
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
