"""`python -m runner.upload DIR...`: record in MLflow the runs whose tracking store was away.

A run always writes results.json (with its `run_uid`) and trajectory.csv, whether or not
MLflow could be reached. This command finds the run folders under the paths it is given
(runner.run_folders.run_dirs) and logs each one that the store does not hold yet,
exactly as a live run is logged (params from .hydra/config.yaml, tags, metrics,
artifacts, status), tagged `run_uid`. A run counts as held when a run with its run_uid
and a results.json artifact exists; a half-logged one (the store went away while logging
it) is deleted and logged again. Running the command twice adds nothing. A sweep job
that failed before a result (job_failure.json) is logged FAILED with its config and
error, its run_uid made from the sweep and the folder (runner.sweep_record.failure_uid).
A path with no run folder under it is an error: a silent "uploaded 0" would read like
success.

Without --tracking-uri each run goes to its own store; one that fails holds back only
its own runs: the others are uploaded, and the failure is reported once, at the end,
with exit code 4. With --tracking-uri there is one store, and its failure ends the
upload at once.

Runs of a sweep are nested under the sweep's parent run, found by its `sweep_id`
tag or created once; a parent left RUNNING by a sweep whose store went away is
closed as FINISHED, or FAILED where a job failed (tag failed_jobs).

Each run folder is uploaded under an exclusive lock (fcntl.flock on its `.upload.lock`,
runner.upload_process.folder_lock): a second upload of the same folder, at the same
time, waits and then finds the run recorded. The same lock guards a sweep's parent run.

A single run logs itself through this command by default: `python -m runner` writes
its files, then starts `python -m runner.background <run dir>` (this command with
--background, once the run's process has exited) as a detached process
(runner.upload_process.start_background_upload) that holds the folder's lock from
its first instant until it exits, writing to `<run dir>/upload.log`.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m runner.upload`: its imports (~0.4 s) and main()
    # run inside the command's Ctrl-C handling, as the module runner.upload
    from runner.interrupts import run_command

    run_command("runner.upload", "what was uploaded is recorded; the same command uploads the rest")

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yaml import YAMLError

from runner.command_line import OneLineParser
from runner.errors import RunnerError, text_lines
from runner.masking import mask_text, mask_uri
from runner.naming import run_name
from runner.results import (
    JOB_FAILURE_FILE,
    RECORD_FILES,
    RESULTS_FILE,
    TRAJECTORY_FILE,
    divergence_message,
    job_failures,
)
from runner.run_folders import (
    in_sweep,
    read_config,
    read_overrides,
    read_record,
    run_folders,
    run_started,
    started_in,
)
from runner.sweep_record import SweepInfo, read_sweep
from runner.tracking import (
    client_for,
    config_params,
    create_sweep_parent,
    end_sweep_parent,
    ensure_experiment,
    finish_run,
    run_tags,
    start_run,
)
from runner.tracking_store import (
    TrackingError,
    TrackingTarget,
    anchor_uri,
    in_command_flags,
    resolve_target,
    retry_locked,
    store_error,
    store_exists,
)
from runner.upload_process import folder_lock, inherit_lock, timestamp

STATUSES = {"finished": "FINISHED", "skipped": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}


UPLOADED_TAG = "runner.uploaded"  # on a sweep parent an upload made (no sweep made one here)
SWEEP_TAG = "sweep_id"  # a sweep job's tag naming its sweep (runner.tracking.run_tags)
RECORD_GLOBS = tuple(f"*/{name}" for name in RECORD_FILES)  # a sweep's jobs' records


@dataclass
class Unreached:
    """A store that failed, and the run folders it held back (not uploaded)."""

    error: TrackingError
    run_dirs: list[Path] = field(default_factory=list)

    def line(self) -> str:
        """One line, in the words of `python -m runner.upload` (its flags)."""
        first, more = self.run_dirs[0], len(self.run_dirs) - 1
        held = f"its {len(self.run_dirs)} runs were" if more else "its run was"
        also = f" and {more} more" if more else ""
        return f"{in_command_flags(str(self.error))}; {held} not uploaded: {first}{also}"


@dataclass
class Outcome:
    uploaded: int = 0
    present: int = 0
    # folders passed over, their record unreadable or without a run_uid: counted as
    # "unreadable", as "skipped" read as a sweep's skipped jobs, which are uploaded
    unread: int = 0
    unreached: dict[str, Unreached] = field(default_factory=dict)  # by store URI
    unreadable: list[Path] = field(default_factory=list)  # skipped: a record not readable

    @property
    def not_reached(self) -> int:
        return sum(len(store.run_dirs) for store in self.unreached.values())

    def summary(self, verb: str = "uploaded") -> str:
        """The last line; `not reached` only when a store failed, so scripts reading the
        usual three counts see the same line as before."""
        line = f"{verb} {self.uploaded}, already recorded {self.present}, unreadable {self.unread}"
        return line + (f", not reached {self.not_reached}" if self.unreached else "")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m runner.upload",
        description="Record in MLflow the runs under PATH that the tracking store does not "
        "hold yet (their server was away, or tracking=off). Safe to repeat: a run is "
        "uploaded once, identified by the run_uid in its results.json.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep/output folders")
    parser.add_argument(
        "--tracking-uri",
        help="where to record them (default: each run's own tracking.uri, or its "
        "default store outputs/mlflow.db, a relative SQLite path taken from the folder "
        "the run was started from; a relative path given here is from the current folder)",
    )
    parser.add_argument("--experiment", help="experiment name (default: each run's own)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be uploaded, write nothing (no store or experiment is created)",
    )
    # A run's own upload, started by `python -m runner`
    # (upload_process.start_background_upload): the store's URI comes in MLFLOW_TRACKING_URI
    # (never argv: it may hold credentials), the run folder's lock is inherited as an open
    # file descriptor.
    parser.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    uri = args.tracking_uri
    if args.background:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  (a log file)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
        print(f"{timestamp()} logging {', '.join(map(str, args.paths))} to {mask_uri(uri or '')}")
        if args.lock_fd is not None:
            inherit_lock(args.paths[0], args.lock_fd)
    import mlflow  # noqa: F401  (configures its loggers on import; quieted after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
    try:
        outcome = upload(
            args.paths, uri, args.experiment, dry_run=args.dry_run, live=args.background
        )
    except RunnerError as exc:
        print(f"error: {in_command_flags(str(exc))}", file=sys.stderr, flush=True)
        if args.background:
            print(
                f"{timestamp()} not recorded; once the store is fixed: "
                f"python -m runner.upload {' '.join(map(str, args.paths))}",
                flush=True,
            )
        return exc.exit_code
    print(outcome.summary("would upload" if args.dry_run else "uploaded"), flush=True)
    for store in outcome.unreached.values():  # after the summary: the last word is the fault
        print(f"error: {store.line()}", file=sys.stderr, flush=True)
    if outcome.unreadable:  # the rest is recorded; these need a person
        first = outcome.unreadable[0]
        print(
            f"error: {len(outcome.unreadable)} run folder(s) could not be read, the first "
            f"{first}; fix or remove their results.json / .hydra, then upload them again",
            file=sys.stderr,
            flush=True,
        )
    if args.background:
        print(f"{timestamp()} done in {time.monotonic() - started:.1f} s")
    if outcome.unreached:
        return TrackingError.exit_code
    return 2 if outcome.unreadable else 0


def upload(
    paths: Iterable[Path],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    dry_run: bool = False,
    out: Any = None,
    live: bool = False,
) -> Outcome:
    """Upload every run under `paths` that its store does not hold yet; report per run.

    live: the run's own background upload, as it ends: recorded as a live run is
    (tag runner.logged, no `runner.uploaded_from`).
    """
    folders = run_folders(paths)
    uploader = Uploader(tracking_uri, experiment, dry_run=dry_run, out=out, live=live)
    for run_dir in folders:
        uploader.add_run(run_dir)
    uploader.close_parents()
    return uploader.outcome


class Uploader:
    """Uploads run folders, keeping its stores and sweep parents open between calls.

    A sweep's logger (runner.follow) adds each job folder as it finishes, so MLflow
    is imported and each store opened once per sweep, not once per job.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        dry_run: bool = False,
        out: Any = None,
        live: bool = False,
    ) -> None:
        # a relative SQLite path given here (--tracking-uri) is from the caller's folder,
        # not from each run's start folder, which anchors only the run's own tracking.uri
        self.tracking_uri = anchor_uri(tracking_uri, Path.cwd()) if tracking_uri else None
        self.experiment = experiment
        self.dry_run, self.live = dry_run, live
        self.out = out or sys.stdout
        self.outcome = Outcome()
        self.stores: dict[TrackingTarget, tuple[Any, str | None]] = {}
        self.parents: dict[tuple[TrackingTarget, str], str] = {}
        self.sweeps: dict[str, Path] = {}  # sweep folders by sweep id: their failures end them
        self.logged_as = "background"  # tag runner.logged of a live upload's runs

    def store(self, target: TrackingTarget) -> tuple[Any, str | None]:
        """(client, experiment id) of the target, opened once.

        A dry run creates nothing: a store that does not exist is not opened (MlflowClient
        would create and migrate it), a missing experiment is not created; None stands
        for either (the client too, for the store), and every run is then one that would
        be uploaded.
        """
        if target in self.stores:
            return self.stores[target]
        if not self.dry_run:
            client = client_for(target)
            self.stores[target] = (client, ensure_experiment(client, target))
        elif not store_exists(target):
            self.stores[target] = (None, None)
        else:
            client = client_for(target)
            try:
                found = retry_locked(lambda: client.get_experiment_by_name(target.experiment))
            except Exception as exc:
                raise store_error(target.uri, exc) from None
            self.stores[target] = (client, found.experiment_id if found else None)
        return self.stores[target]

    def add_run(self, run_dir: Path) -> None:
        """Upload one run folder, unless its store failed earlier in this upload.

        Runs going to their own stores (no --tracking-uri) may go to several: one that
        fails (a server long gone) holds back its own runs only, tried once, not once
        per run; Outcome.unreached says which, at the end.
        """
        try:
            result = read_record(run_dir)
            if not isinstance(result, dict):
                raise ValueError(f"not a JSON object but {type(result).__name__}")
            cfg = read_config(run_dir, result)
        except (OSError, ValueError, YAMLError) as exc:  # one unreadable folder holds no other
            why = (text_lines(str(exc)) or [type(exc).__name__])[0]
            print(f"skipped {run_dir}: its record cannot be read ({why})", file=self.out)
            self.outcome.unread += 1
            self.outcome.unreadable.append(run_dir)
            return
        if in_sweep(run_dir):
            self.sweeps.setdefault(read_sweep(run_dir.parent).sweep_id, run_dir.parent)
        if not result.get("run_uid"):
            print(f"skipped {run_dir}: its results.json has no run_uid", file=self.out)
            self.outcome.unread += 1
            return
        target = _target(run_dir, cfg, self.tracking_uri, self.experiment)
        unreached = self.outcome.unreached.get(target.uri)
        if unreached is not None:
            unreached.run_dirs.append(run_dir)
            return
        try:
            self._upload(run_dir, cfg, result, target)
        except TrackingError as exc:
            if self.tracking_uri is not None:  # the one store asked for: nothing else to do
                raise
            self.outcome.unreached[target.uri] = Unreached(exc, [run_dir])

    def _sweep_of(
        self, run_dir: Path, target: TrackingTarget, client: Any, experiment_id: str
    ) -> tuple[str, str]:
        """(sweep_id, parent run id) of a sweep job's folder in this store, its parent
        made once per sweep and upload, under the sweep folder's lock; a store error is
        a TrackingError."""
        sweep = read_sweep(run_dir.parent)
        if (target, sweep.sweep_id) not in self.parents:
            with folder_lock(run_dir.parent, self.out):  # one parent run per sweep
                try:
                    self.parents[target, sweep.sweep_id] = _sweep_parent(
                        client, experiment_id, run_dir.parent, sweep
                    )
                except Exception as exc:
                    raise store_error(target.uri, exc) from None
        return sweep.sweep_id, self.parents[target, sweep.sweep_id]

    def _upload(
        self, run_dir: Path, cfg: Mapping[str, Any], result: Mapping[str, Any],
        target: TrackingTarget,
    ) -> None:  # fmt: skip
        client, experiment_id = self.store(target)
        if in_sweep(run_dir) and not self.dry_run:
            # the sweep folder's lock before the job's, in the order the sweep's logger
            # (runner.follow, which holds the sweep's all its life) takes them: taken the
            # other way round, an upload during a sweep and its logger waited on each
            # other for ever
            self._sweep_of(run_dir, target, client, experiment_id)
        # check, then log: one upload of a folder at a time (a dry run writes no lock file)
        with contextlib.nullcontext() if self.dry_run else folder_lock(run_dir, self.out):
            self._upload_locked(run_dir, cfg, result, target, client, experiment_id)

    def _upload_locked(
        self, run_dir: Path, cfg: Mapping[str, Any], result: Mapping[str, Any],
        target: TrackingTarget, client: Any, experiment_id: str | None,
    ) -> None:  # fmt: skip
        """One run folder, its lock held: recorded already, or logged now.

        experiment_id is None only in a dry run whose store or experiment does not exist.
        """
        outcome, out = self.outcome, self.out
        if experiment_id is None:
            outcome.uploaded += 1
            missing = (
                f"experiment {target.experiment} does not exist yet"
                if client is not None
                else "the store does not exist yet"
            )
            print(
                f"would upload {run_dir} to {mask_uri(target.uri)} ({missing}: it would be "
                "created)",
                file=out,
            )
            return
        try:
            failed = result.get("status") == "failed"
            held, stale = _existing(client, experiment_id, result["run_uid"], failed)
            if held is not None:
                nested = ""
                if in_sweep(run_dir) and SWEEP_TAG not in held.data.tags and not self.dry_run:
                    # logged alone first (a copy of the job folder uploaded by itself)
                    sweep_id, parent = self._sweep_of(run_dir, target, client, experiment_id)
                    tags = {SWEEP_TAG: sweep_id, "mlflow.parentRunId": parent}
                    for key, value in tags.items():
                        retry_locked(lambda k=key, v=value: client.set_tag(held.info.run_id, k, v))
                    nested = "; nested in its sweep now"
                print(f"already recorded {run_dir} (run {held.info.run_id}{nested})", file=out)
                outcome.present += 1
                return
            if self.dry_run:
                outcome.uploaded += 1
                print(f"would upload {run_dir} to {mask_uri(target.uri)}", file=out)
                return
            for run_id in stale:  # half-logged when the store went away: replaced
                retry_locked(lambda run_id=run_id: client.delete_run(run_id))
            sweep_id = parent = None
            if in_sweep(run_dir):
                sweep_id, parent = self._sweep_of(run_dir, target, client, experiment_id)
            live = self.logged_as if self.live else None
            run_id = _upload_one(
                client, experiment_id, run_dir, cfg, result, sweep_id, parent, live
            )
            outcome.uploaded += 1  # counted once logged: a store failing midway holds it back
            print(f"uploaded {run_dir} as run {run_id} ({_status(result)})", file=out)
        except RunnerError:
            raise
        except Exception as exc:
            raise store_error(target.uri, exc) from None

    def close_parents(self, status: str = "FINISHED") -> None:
        """End the sweep parents still RUNNING (their sweep could not close them), in the
        stores that did not fail, with the report the sweep made as it ended attached:
        FAILED where a job failed (end_sweep_parent)."""
        from runner.compare.logged import log_sweep_report

        for (target, sweep_id), parent in self.parents.items():
            if target.uri in self.outcome.unreached:
                continue
            client, experiment_id = self.stores[target]
            sweep_dir = self.sweeps.get(sweep_id)
            try:
                run = client.get_run(parent)
                if run.info.status != "RUNNING":
                    continue
                made_here = UPLOADED_TAG in run.data.tags and sweep_dir is not None
                ended = _sweep_time(sweep_dir, start=False) if made_here else None
                try:
                    if sweep_dir is not None:
                        log_sweep_report(client, experiment_id, sweep_dir, parent, sweep_id)
                finally:
                    end_sweep_parent(client, parent, sweep_dir, status, ended)
            except Exception as exc:
                raise store_error(target.uri, exc) from None


def _status(result: Mapping[str, Any]) -> str:
    return STATUSES.get(result.get("status"), "KILLED")


def _target(
    run_dir: Path, cfg: Mapping[str, Any], uri: str | None, experiment: str | None
) -> TrackingTarget:
    tracking = dict(cfg.get("tracking") or {})
    if uri:
        tracking["uri"] = uri
    if experiment:
        tracking["experiment"] = experiment
    return resolve_target(tracking, started_in(run_dir))


def _existing(
    client: Any, experiment_id: str, uid: str, failed: bool = False
) -> tuple[Any | None, list[str]]:
    """(a complete run with this uid, or None; the ids of incomplete ones).

    Complete: ended, and holding its results.json artifact (logged last), or for a job
    that failed before a result (failed), its error tag (logged last; a job that logged
    itself in-process, runner.tracking.tracked_run, failed before its job_failure.json
    was written, so the tag is what such runs share)."""
    from mlflow.entities import ViewType

    found = retry_locked(
        lambda: client.search_runs(
            [experiment_id], f"tags.run_uid = '{uid}'", run_view_type=ViewType.ACTIVE_ONLY
        )
    )
    stale = []
    for run in found:
        if failed:
            complete = "error" in run.data.tags
        else:
            complete = RESULTS_FILE in {a.path for a in client.list_artifacts(run.info.run_id)}
        if complete and run.info.status != "RUNNING":
            return run, []
        stale.append(run.info.run_id)
    return None, stale


def _sweep_parent(client: Any, experiment_id: str, sweep_dir: Path, sweep: SweepInfo) -> str:
    """The sweep's parent run in this store: the one its sweep made, or one made once here
    (tagged runner.uploaded). A store error is raised (the caller makes it a TrackingError)."""
    recorded = sweep.parent_run_id
    if recorded:
        try:
            return retry_locked(lambda: client.get_run(recorded)).info.run_id
        except Exception as exc:
            if not _not_found(exc):  # the store failed: raised, as its other errors are
                raise
            # not in this store: the sweep made it in another
    found = retry_locked(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.sweep_id = '{sweep.sweep_id}' and tags.`runner.kind` = 'sweep'",
        )
    )
    if found:
        return found[0].info.run_id
    started = sweep.started_ms or _sweep_time(sweep_dir, start=True)
    tags = {UPLOADED_TAG: "true"}
    return create_sweep_parent(client, experiment_id, sweep_dir, sweep, tags, started)


def _sweep_time(sweep_dir: Path, start: bool) -> int | None:
    """When a sweep ran, from its files, in MLflow's milliseconds: its first job's start
    (start: the launcher's multirun.yaml and the jobs' configs, the earliest) or its last
    job's end (their records, the latest). A parent an upload makes started and ended at
    upload time, after its children, which are timed from their own files."""
    names = ("multirun.yaml", "*/.hydra/config.yaml") if start else RECORD_GLOBS
    times = [path.stat().st_mtime for name in names for path in sweep_dir.glob(name)]
    if not times:
        return None
    return int((min(times) if start else max(times)) * 1000)


def _not_found(exc: Exception) -> bool:
    """MLflow's "no such run" (from its SQL store, or a server's HTTP 404)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _upload_one(
    client: Any,
    experiment_id: str,
    run_dir: Path,
    cfg: Mapping[str, Any],
    result: Mapping[str, Any],
    sweep_id: str | None,
    parent_run_id: str | None,
    live: str | None = None,
) -> str:
    """One run, logged as a live run is, ending with the status its results.json records
    (a job that failed before a result: FAILED, with its error).

    live (the run's own background upload as it ended, or the sweep's logger; the value
    of tag runner.logged): the run is not marked as uploaded later. Live or not, the git
    tags are the commit the run recorded as it started (none where its record has none,
    a folder written before runs recorded it): never the checkout's at upload time.
    """
    tags = run_tags(cfg, read_overrides(run_dir), sweep_id, result.get("git"))
    tags["run_uid"] = result["run_uid"]
    tags["runner.logged" if live else "runner.uploaded_from"] = live or str(run_dir)
    record = run_dir / (JOB_FAILURE_FILE if result.get("status") == "failed" else RESULTS_FILE)
    run_id = start_run(
        client,
        experiment_id,
        run_name(cfg, read_overrides(run_dir)),
        config_params(cfg),
        tags,
        parent_run_id,
        start_time=int(run_started(run_dir, record) * 1000),
    )
    status = result.get("status")
    end_tags = {}
    if status == "skipped":
        end_tags["skip_reason"] = str(result.get("reason", ""))[:5000]
    elif status == "failed":
        end_tags["error"] = mask_text(str(result.get("error", "")))[:5000]
    elif status == "diverged":  # as the run said it, and tracked_run tags it in-process
        trajectory = run_dir / TRAJECTORY_FILE
        message = divergence_message(result, trajectory if trajectory.exists() else None)
        end_tags["error"] = mask_text(message)[:5000]
    elif status != "finished":
        end_tags["error"] = "interrupted"
    problem = finish_run(
        client, run_id, run_dir, _status(result), end_tags, int(record.stat().st_mtime * 1000)
    )
    if problem is not None:
        raise problem
    return run_id


def upload_failed_jobs(sweep_dir: Path, target: TrackingTarget) -> None:
    """Log the sweep's jobs that failed before a result, and before any run of theirs was
    in MLflow (a bad setting fails a job before it logs itself): as FAILED runs under the
    sweep's parent, once each (one that logged itself in-process is found, not repeated).
    For the sweep's end when its jobs log in-process; the sweep's logger finds them itself."""
    uploader = Uploader(target.uri, target.experiment, out=io.StringIO(), live=True)
    uploader.logged_as = "sweep"
    for folder in job_failures(sweep_dir):
        if not (folder / RESULTS_FILE).exists():
            uploader.add_run(folder)  # one store, given: its failure is raised at once
