"""`python -m runner.upload DIR...`: record in MLflow the runs whose tracking store was away.

A run always writes results.json (with its `run_uid`) and trajectory.csv, whether or
not MLflow could be reached. This command finds the run folders under the paths it is
given (run_dirs) and logs each one that the store does not hold yet, exactly as a live
run is logged (params from .hydra/config.yaml, tags, metrics, artifacts, status), tagged
`run_uid`. A run counts as held when a run with its run_uid and a results.json
artifact exists; a half-logged one (the store went away while logging it) is
deleted and logged again. Running the command twice adds nothing. A sweep job that
failed before a result (job_failure.json) is logged FAILED with its config and error,
its run_uid made from the sweep and the folder (runner.sweep_record.failure_uid). A path with no run
folder under it is an error: a silent "uploaded 0" would read like success.

Without --tracking-uri each run goes to its own store; one that fails holds back only
its own runs: the others are uploaded, and the failure is reported once, at the end,
with exit code 4. With --tracking-uri there is one store, and its failure ends the
upload at once.

Runs of a sweep are nested under the sweep's parent run, found by its `sweep_id`
tag or created once; a parent left RUNNING by a sweep whose store went away is
closed as FINISHED, or FAILED where a job failed (tag failed_jobs).

Each run folder is uploaded under an exclusive lock (fcntl.flock on its
`.upload.lock`): a second upload of the same folder, at the same time, waits and
then finds the run recorded. The same lock guards a sweep's parent run.

A single run logs itself through this command by default: `python -m runner` writes
its files, then starts `python -m runner.background <run dir>` (this command with
--background, once the run's process has exited) as a detached process
(start_background_upload) that holds the folder's lock from its first instant until
it exits, writing to `<run dir>/upload.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.command_line import OneLineParser
from runner.errors import RunnerError
from runner.masking import mask_text, mask_uri
from runner.naming import run_name
from runner.results import (
    JOB_FAILURE_FILE,
    RESULTS_FILE,
    TRAJECTORY_FILE,
    divergence_message,
    job_failures,
)
from runner.sweep_record import SWEEP_FILE, SweepInfo, failure_uid, read_sweep
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

try:
    import fcntl
except ImportError:  # not POSIX: uploads are not locked (as before)
    fcntl = None  # type: ignore[assignment]

STATUSES = {"finished": "FINISHED", "skipped": "FINISHED", "diverged": "FAILED", "failed": "FAILED"}
# The checkout now, not when the run ran: left off a run uploaded later.
UNCOMMITTED_TAGS = ("git_commit", "mlflow.source.git.commit", "git_dirty")
LOCK_FILE = ".upload.lock"
LOG_FILE = "upload.log"
_HELD_LOCKS: dict[Path, int] = {}  # folders whose lock this process inherited, by fd
ARTIFACTS_FOLDER = "artifacts"  # MLflow's copy of a logged run's files: <run id>/artifacts/
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids (uuid4 hex)
FOLDER_HINT = "give run folders or sweep folders (outputs/runs/..., outputs/multirun/...)"


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
    skipped: int = 0
    unreached: dict[str, Unreached] = field(default_factory=dict)  # by store URI

    @property
    def not_reached(self) -> int:
        return sum(len(store.run_dirs) for store in self.unreached.values())

    def summary(self, verb: str = "uploaded") -> str:
        """The last line; `not reached` only when a store failed, so scripts reading the
        usual three counts see the same line as before."""
        line = f"{verb} {self.uploaded}, already recorded {self.present}, skipped {self.skipped}"
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
    # A run's own upload, started by `python -m runner` (start_background_upload): the
    # store's URI comes in MLFLOW_TRACKING_URI (never argv: it may hold credentials),
    # the run folder's lock is inherited as an open file descriptor.
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
    if args.background:
        print(f"{timestamp()} done in {time.monotonic() - started:.1f} s")
    return TrackingError.exit_code if outcome.unreached else 0


def inherit_lock(folder: Path, fd: int) -> None:
    """This process holds folder's upload lock through fd, opened by its parent (start_logger)."""
    _HELD_LOCKS[folder.resolve()] = fd


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def run_dirs(paths: Iterable[Path]) -> Iterator[Path]:
    """Every run folder under each path, in order, once (none under a path is no error:
    a sweep's logger scans its folder before the first job has a result).

    A run folder is one holding a results.json, or a sweep job's job_failure.json (it
    failed before a result: logged as a FAILED run with its config and error, so MLflow
    shows the hole in the sweep), outside MLflow's copies of logged runs'
    files (`<run id>/artifacts/`, under outputs/mlartifacts/ for the default store): a
    copy holds a results.json too, but uploading it would log its run a second time.
    `.hydra/` is not required beside results.json: a run made with
    hydra.output_subdir=null has none, and its own background upload must find it.
    """
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise RunnerError(f"{path} does not exist; give run folders or sweep folders")
        for folder in _results_folders(path):
            if folder not in seen:
                seen.add(folder)
                yield folder


def run_folders(paths: Iterable[Path]) -> list[Path]:
    """run_dirs, each path checked before anything is uploaded: a path with no run
    folder under it (a typo'd or empty folder, a file, a sweep's compare/) is an error."""
    found: dict[Path, None] = {}
    for path in paths:
        here = list(run_dirs([path]))
        if not here:
            raise RunnerError(_no_run_folder(path))
        found.update(dict.fromkeys(here))
    return list(found)


def _no_run_folder(path: Path) -> str:
    if not path.is_dir():
        return f"{path} is not a folder; {FOLDER_HINT}"
    if (path / ".hydra").is_dir():  # Hydra writes it first: the run ended before its result
        return (
            f"{path} holds no {RESULTS_FILE}: its run stopped before writing one; nothing to upload"
        )
    return f"no run folders under {path}; {FOLDER_HINT}"


def _results_folders(path: Path) -> list[Path]:
    """os.walk, not rglob: an artifact copy is pruned, not walked (mlartifacts/ grows with
    every run logged), and a path inside one (given by hand) yields nothing."""
    root = path.resolve()
    if any(_is_artifact_copy(p) for p in (root, *root.parents)):
        return []
    if not root.is_dir():
        return []
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _is_artifact_copy(Path(top, d))]
        if RESULTS_FILE in files or JOB_FAILURE_FILE in files:
            found.append(Path(top))
    return sorted(found)


def _is_artifact_copy(folder: Path) -> bool:
    return folder.name == ARTIFACTS_FOLDER and bool(_RUN_ID.fullmatch(folder.parent.name))


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
    (git commit tags, no `runner.uploaded_from`).
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
        result = _record(run_dir)
        if _in_sweep(run_dir):
            self.sweeps.setdefault(read_sweep(run_dir.parent).sweep_id, run_dir.parent)
        if not result.get("run_uid"):
            print(f"skipped {run_dir}: its results.json has no run_uid", file=self.out)
            self.outcome.skipped += 1
            return
        cfg = _config(run_dir, result)
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

    def _upload(
        self, run_dir: Path, cfg: Mapping[str, Any], result: Mapping[str, Any],
        target: TrackingTarget,
    ) -> None:  # fmt: skip
        client, experiment_id = self.store(target)
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
            if held:
                print(f"already recorded {run_dir} (run {held})", file=out)
                outcome.present += 1
                return
            if self.dry_run:
                outcome.uploaded += 1
                print(f"would upload {run_dir} to {mask_uri(target.uri)}", file=out)
                return
            for run_id in stale:  # half-logged when the store went away: replaced
                retry_locked(lambda run_id=run_id: client.delete_run(run_id))
            sweep_id = parent = None
            if _in_sweep(run_dir):
                sweep = read_sweep(run_dir.parent)
                sweep_id = sweep.sweep_id
                if (target, sweep_id) not in self.parents:
                    with folder_lock(run_dir.parent, out):  # one parent run per sweep
                        self.parents[target, sweep_id] = _sweep_parent(
                            client, experiment_id, run_dir.parent, sweep
                        )
                parent = self.parents[target, sweep_id]
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
        stores that did not fail: FAILED where a job failed (end_sweep_parent)."""
        for (target, sweep_id), parent in self.parents.items():
            if target.uri in self.outcome.unreached:
                continue
            client = self.stores[target][0]
            try:
                if client.get_run(parent).info.status == "RUNNING":
                    end_sweep_parent(client, parent, self.sweeps.get(sweep_id), status)
            except Exception as exc:
                raise store_error(target.uri, exc) from None


@contextmanager
def folder_lock(folder: Path, out: Any = None) -> Iterator[None]:
    """Hold the folder's upload lock (flock on `<folder>/.upload.lock`), waiting for it.

    A lock this process inherited (a run's background upload) is already held. A
    folder this process cannot write in is read-locked if its lock file exists, and
    otherwise not locked (no upload started by the run can be writing it then).
    """
    if fcntl is None or folder.resolve() in _HELD_LOCKS:
        yield
        return
    fd = None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(folder / LOCK_FILE, flags, 0o644)
            break
        except OSError:
            continue
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another upload of {folder} to finish ...", file=out)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def start_background_upload(
    run_dir: Path, run_uid: str, target: TrackingTarget, cwd: Path
) -> Path | None:
    """Start `python -m runner.background run_dir` (runner.upload), detached; its log.

    Nothing is started (None) when run_dir holds no results.json of this run (it
    stopped before a result existed).
    """
    try:
        if json.loads((run_dir / RESULTS_FILE).read_text()).get("run_uid") != run_uid:
            return None
    except (OSError, ValueError):
        return None
    start_logger(run_dir, ["runner.background", f"--after-pid={os.getpid()}"], target, cwd)
    return run_dir / LOG_FILE


def start_logger(
    folder: Path, module: list[str], target: TrackingTarget, cwd: Path
) -> subprocess.Popen:
    """Start `python -m <module...> folder`, detached, holding the folder's upload lock.

    The lock is taken here and handed to the child as an open descriptor, so it is
    held from before the child exists until the child exits: a concurrent `python -m
    runner.upload` of the folder, or a test waiting for the upload (tests/conftest.py:
    wait_for_upload), waits for it. The child has its own session (Ctrl-C in the
    terminal does not reach it), no stdin, and writes to <folder>/upload.log; the
    store's URI is in its environment (MLFLOW_TRACKING_URI), never on its command
    line, which every user can read.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": target.uri}
    root = str(Path(__file__).resolve().parent.parent)  # runner/ lives here
    if root not in _site_dirs():  # a checkout: the child imports the same runner
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", *module, "--experiment", target.experiment]
    try:
        lock = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
                command.append(f"--lock-fd={lock}")
            with (folder / LOG_FILE).open("ab") as sink:
                return subprocess.Popen(
                    [*command, str(folder)],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(lock,),
                )
        finally:
            os.close(lock)  # the child's copy keeps the lock
    except OSError as exc:
        raise TrackingError(
            f"the background upload to {mask_uri(target.uri)} could not start "
            f"({exc.strerror or exc})"
        ) from None


def wait_for_upload(run_dir: Path, timeout_s: float = 300) -> str:
    """Wait until the background upload of run_dir has exited; its log (upload.log).

    The upload holds the folder's lock from before `python -m runner` returns until
    it exits, so getting the lock means it is done (no polling of the store, no
    guessed sleep). TimeoutError after timeout_s; FileNotFoundError when no upload
    was started for the folder.
    """
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    deadline = time.monotonic() + timeout_s
    try:
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    late = f"the upload of {run_dir} still runs after {timeout_s} s"
                    raise TimeoutError(late) from None
                time.sleep(0.02)
    finally:
        os.close(fd)
    return (run_dir / LOG_FILE).read_text()


def _site_dirs() -> set[str]:
    import site

    dirs = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return {str(Path(d).resolve()) for d in dirs}


def _status(result: Mapping[str, Any]) -> str:
    return STATUSES.get(result.get("status"), "KILLED")


def _config(run_dir: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """The run's resolved config from .hydra/config.yaml; a minimal one from results.json."""
    path = run_dir / ".hydra" / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]
        except Exception:
            return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]
    mode = {"name": result.get("mode"), "update": result.get("update") or "apply"}
    return {
        "backend": {"name": result.get("backend"), **(result.get("options") or {})},
        "task": result.get("task"),
        "mode": mode,
        "dtype": result.get("dtype"),
    }


def _target(
    run_dir: Path, cfg: Mapping[str, Any], uri: str | None, experiment: str | None
) -> TrackingTarget:
    tracking = dict(cfg.get("tracking") or {})
    if uri:
        tracking["uri"] = uri
    if experiment:
        tracking["experiment"] = experiment
    return resolve_target(tracking, _started_in(run_dir))


def _started_in(run_dir: Path) -> Path:
    """The folder the run's command started in (Hydra's runtime.cwd), for its default store."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", default=None)
        if cwd:
            return Path(cwd)
    return Path.cwd()


def _existing(
    client: Any, experiment_id: str, uid: str, failed: bool = False
) -> tuple[str | None, list[str]]:
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
            return run.info.run_id, []
        stale.append(run.info.run_id)
    return None, stale


def _in_sweep(run_dir: Path) -> bool:
    parent = run_dir.parent
    return (parent / SWEEP_FILE).is_file() or (parent / "multirun.yaml").is_file()


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
    return create_sweep_parent(client, experiment_id, sweep_dir, sweep, {"runner.uploaded": "true"})


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
    of tag runner.logged): the git commit is the run's, and the run is not marked as
    uploaded later.
    """
    tags = {
        k: v
        for k, v in run_tags(cfg, _overrides(run_dir), sweep_id).items()
        if live or k not in UNCOMMITTED_TAGS
    }
    tags["run_uid"] = result["run_uid"]
    tags["runner.logged" if live else "runner.uploaded_from"] = live or str(run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    record = run_dir / (JOB_FAILURE_FILE if result.get("status") == "failed" else RESULTS_FILE)
    started = config if config.is_file() else record
    run_id = start_run(
        client,
        experiment_id,
        run_name(cfg, _overrides(run_dir)),
        config_params(cfg),
        tags,
        parent_run_id,
        start_time=int(started.stat().st_mtime * 1000),
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
    with _no_run_links():
        problem = finish_run(
            client,
            run_id,
            run_dir,
            _status(result),
            end_tags,
            end_time=int(record.stat().st_mtime * 1000),
        )
    if problem is not None:
        raise problem
    return run_id


def _record(run_dir: Path) -> dict[str, Any]:
    """results.json, or for a sweep job that failed before a result, a stand-in made from
    its job_failure.json: status "failed", its error, and failure_uid for its run_uid."""
    results = run_dir / RESULTS_FILE
    if results.exists() or not (run_dir / JOB_FAILURE_FILE).exists():
        return json.loads(results.read_text())
    failure = json.loads((run_dir / JOB_FAILURE_FILE).read_text())
    sweep_id = read_sweep(run_dir.parent).sweep_id
    uid = failure_uid(sweep_id, run_dir.name)
    return {"run_uid": uid, "status": "failed", "error": str(failure.get("error", ""))}


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


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(path)) or []
    return [str(o) for o in loaded]  # type: ignore[union-attr]


@contextmanager
def _no_run_links() -> Iterator[None]:
    """MLflow prints a "View run" link per run for HTTP stores; the upload prints its own."""
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(name)
    os.environ[name] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


if __name__ == "__main__":
    sys.exit(main())
