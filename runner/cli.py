"""`python -m runner`: Hydra composes the config, the job runs, errors become one line.

Hydra reports an unknown config-group option as a page of search paths; the choices
are checked first (runner.precheck) so the user reads one line naming what is allowed.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runner.config import CONFIG_DIR, build_run_config
from runner.console import say
from runner.errors import DivergenceError, RunFailed, RunnerError, UnsupportedError
from runner.interrupts import Terminated, raise_stop, stop_requested, stopped
from runner.job import execute, supported_backend
from runner.masking import mask_uri
from runner.naming import job_kind, run_name
from runner.plugins import importable
from runner.precheck import (
    PLUGIN_GROUPS,
    check_group_choices,
    check_output_dir,
    check_overrides,
    check_sweep_plugins,
    set_in_every_swept_choice,
)
from runner.provenance import git_state
from runner.results import RESULTS_FILE, new_run_uid, record_job_failure
from runner.search import end_search, register_sweeper
from runner.sweep_record import NOT_STARTED, STOPPING_FILE, read_sweep
from runner.tracking import (
    client_for,
    config_params,
    ensure_experiment,
    logs_in_background,
    run_tags,
    tracked_run,
)
from runner.tracking_store import TrackingError, TrackingTarget, check_store, resolve_target
from runner.unused_folder import remove_unused
from runner.upload_process import folder_lock, start_background_upload


def register_plugins(args: Iterable[str] = ()) -> None:
    """Give every installed backend and problem plugin a config node, so `backend=<name>`
    and `problem=<name>` compose; a problem's node holds its settings' defaults (its
    dataclass fields), so `problem.<setting>=...` overrides them as for a shipped one.

    Reading those defaults imports the problem: one that fails to import gets no node, so
    it stops no run but those that choose it in `args` (`problem=<name>`, alone, in a
    comma list or in a sweep's choice(...)), which fail here, in one line naming the
    plugin and its error."""
    from runner.plugins import load_failure

    chosen: dict[str, set[str]] = {}
    for arg in args:
        key, _, value = arg.partition("=")
        chosen.setdefault(key.lstrip("+~"), set()).update(re.findall(r"[\w\-]+", value))
    store = ConfigStore.instance()
    for group, (installed, settings_of) in PLUGIN_GROUPS.items():
        shipped = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
        for name, entry_point in installed().items():
            if name in shipped:
                continue
            try:
                settings = settings_of(entry_point)
            except Exception as exc:  # its import failed, or it is no dataclass
                if name in chosen.get(group, ()):
                    raise load_failure(group, name, entry_point, exc) from exc
                continue
            store.store(group=group, name=name, node={"name": name, **settings})


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> Any:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    worker = multirun and multiprocessing.parent_process() is not None
    if worker and _sweep_stopping(Path(hydra_cfg.sweep.dir)):
        discard_run_folder(hydra_cfg, made_by_hydra=True)
        return NOT_STARTED
    with _worker_signals(worker):
        return _job(cfg, hydra_cfg, multirun, worker)


def _sweep_stopping(sweep_dir: Path) -> bool:
    """A queued job of a parallel sweep that was stopped (runner.joblib_launcher): this
    worker's own job was, or the launcher marked the sweep."""
    return stop_requested() is not None or (sweep_dir / STOPPING_FILE).exists()


@contextmanager
def _worker_signals(worker: bool) -> Iterator[None]:
    """In a launcher's worker process (joblib's), Ctrl-C or SIGTERM stops the job it
    runs, once: the launcher passes the terminal's Ctrl-C on to its workers, and a second
    signal would stop the job again while it saves what it computed. Between jobs Ctrl-C
    is ignored: the launcher stops the sweep, and a worker idle in joblib's loop printed
    multiprocessing's KeyboardInterrupt traceback over the sweep's lines."""
    if not worker:
        yield
        return
    previous_term = signal.signal(signal.SIGTERM, _stop_once)
    signal.signal(signal.SIGINT, _stop_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, previous_term)


def _stop_once(signum: int, frame: Any) -> None:
    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, signal.SIG_IGN)
    raise_stop(signum, frame)


def _job(cfg: DictConfig, hydra_cfg: Any, multirun: bool, worker: bool) -> Any:
    """The job hydra_main runs: its result's loss (Optuna's objective), inf for a
    diverged sweep job, None for one that failed, was skipped, or was stopped in a
    launcher's worker (whose launcher waits for it, runner.joblib_launcher)."""
    try:
        git = git_state()  # the code that runs, as it starts: a commit made later is not it
        try:
            result = run_job(cfg, hydra_cfg, multirun, git)
        except RunnerError:
            raise
        except Exception as exc:  # a plugin's code raised, or the runner's own: one line
            raise unexpected(exc, OmegaConf.select(cfg, "backend.name")) from exc
    except RunnerError as exc:
        if not multirun:
            report(exc)
            if exc.exit_code == 2:  # refused: a folder holding no result is not left behind
                discard_run_folder(hydra_cfg)
            sys.exit(exc.exit_code)
        # In a sweep a skipped or diverged job is a result, any other error a failed job;
        # the sweep goes on either way, and its exit code reports the failures. Each line
        # names its job as MLflow does: a parallel sweep's lines come in any order.
        job = _job_name(cfg, hydra_cfg)
        if isinstance(exc, DivergenceError):
            report(exc, f"diverged: {job}")
            # Optuna's sweeper takes inf as the trial's (worst) loss, so its sampler learns
            # that the lr is too large; with no value the trial would count as failed and
            # teach it nothing, and a search whose every trial diverged would end in a
            # traceback (no best trial).
            return math.inf
        report(exc, f"{'skipped' if isinstance(exc, UnsupportedError) else 'error'}: {job}")
        if not isinstance(exc, UnsupportedError):
            record_job_failure(Path(hydra_cfg.runtime.output_dir), exc, git)
        return None  # Optuna's sweeper marks the trial failed and carries on
    except KeyboardInterrupt as stop:
        noted = stop_requested()  # a SIGTERM whose own exception was lost is still one
        saved = (Path(hydra_cfg.runtime.output_dir) / RESULTS_FILE).exists()
        what = "what was computed is saved" if saved else "stopped before a result existed"
        if multirun:  # a parallel sweep's lines come in any order
            what = f"{_job_name(cfg, hydra_cfg)}: {what}"
        code = stopped(noted if isinstance(noted, Terminated) else stop, what)
        if worker:
            return None
        sys.exit(code)
    return result.get("loss")


def _job_name(cfg: DictConfig, hydra_cfg: Any) -> str:
    """A sweep job as its MLflow run is named (`numpy-apply-float64 optimizer=adam`), or
    its folder's name where its config cannot be resolved."""
    try:
        return run_name(OmegaConf.to_container(cfg, resolve=True), hydra_cfg.overrides.task)
    except Exception:
        return Path(hydra_cfg.runtime.output_dir).name


def discard_run_folder(hydra_cfg: Any, made_by_hydra: bool = False) -> None:
    """Remove the folder Hydra made for this run if it still holds only Hydra's files and
    an empty log (runner.unused_folder): a refused command leaves no empty run behind,
    nor a stopped sweep a job it never ran (made_by_hydra: a sweep job's own folder,
    which Hydra made in this process, where a single run's were noted before)."""
    log_name = f"{hydra_cfg.job.name}.log"  # Hydra's job_logging file
    remove_unused(
        Path(hydra_cfg.runtime.output_dir), hydra_cfg.output_subdir, log_name, made_by_hydra
    )


def unexpected(exc: Exception, backend: str | None) -> RunnerError:
    """An exception no one expected, as a job's error: a file the run could not write
    (e.g. a full disk) is exit 2, anything else (a plugin's bug, or the runner's own) a
    failed run, exit 1. Either fails only its job in a sweep."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return RunnerError(f"cannot write {exc.filename2 or exc.filename}: {exc.strerror}")
    return RunFailed(backend, exc)


def run_job(
    cfg: DictConfig, hydra_cfg: Any, multirun: bool, git: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Run the job and log it to MLflow when tracking is on; files first, always.

    A single run is logged after it ends by a detached upload (`python -m
    runner.background`, which runs runner.upload once this process has exited;
    tracking.background, the default): this process checks the store without
    importing MLflow, runs, starts the upload and returns. A sweep's jobs are logged
    by the sweep's one logger (runner.follow) as each ends. With
    tracking.background=false a run, or each job, logs in-process around the job
    (the run is RUNNING in MLflow while it runs). git: the code state read as the job
    started, into its record and its git tags, whoever logs it and whenever.
    """
    output_dir = Path(hydra_cfg.runtime.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    run = build_run_config(container)  # bad input fails here, before any import or record
    tracking = container.get("tracking") or {}
    cwd = Path(hydra_cfg.runtime.cwd)
    # The store's settings are checked before the backend is loaded (TensorFlow: ~3 s), so
    # a mistyped tracking.uri or experiment is said at once.
    target = resolve_target(tracking, cwd) if tracking.get("enabled", True) else None
    backend = None if multirun else supported_backend(run)
    run_uid = new_run_uid()  # results.json and the MLflow tag run_uid: uploads happen once
    executed = False

    def job() -> dict[str, Any]:
        nonlocal executed
        executed = True
        try:
            return execute(run, output_dir, run_uid, backend, git, record_skip=multirun)
        except RunnerError:
            raise
        except Exception as exc:  # a plugin's or the runner's: on record, as a sweep job's
            error = unexpected(exc, run.backend)  # is (hydra_main), so it is logged FAILED
            if not multirun and error.exit_code != 2:  # exit 2: refused, its folder removed
                record_job_failure(output_dir, error, git, run_uid)
            raise

    if target is None:  # tracking=off
        return job()
    sweep = read_sweep(Path(hydra_cfg.sweep.dir)) if multirun else None
    if sweep is not None and sweep.logged_by != "jobs":  # the sweep's logger, or nobody
        with folder_lock(output_dir):  # the logger uploads the folder once the job is done
            return job()
    try:
        if not multirun and logs_in_background(tracking, target):
            check_store(target)  # what MLflow would say at once, said here, before the run
            return run_then_upload(job, output_dir, run_uid, target, cwd)
        client = client_for(target)
        experiment_id = ensure_experiment(client, target)
        overrides = list(hydra_cfg.overrides.task)
        with (
            folder_lock(output_dir),  # an upload of this folder meanwhile waits for the run
            tracked_run(
                client,
                experiment_id,
                run_name=run_name(container, overrides),
                params=config_params(container),
                tags={
                    **run_tags(container, overrides, sweep.sweep_id if sweep else None, git),
                    "run_uid": run_uid,
                },
                run_dir=output_dir,
                parent_run_id=sweep.parent_run_id if sweep else None,
            ),
        ):
            return job()
    except TrackingError as outage:  # the store failed: the run's files are what counts
        unrecorded = not_recorded(outage, output_dir)
        if not executed:  # said now, not only after what may be hours of running
            say(f"warning: {outage}; the run goes on and keeps its files", err=True)
            try:
                job()
            except BaseException:
                report(unrecorded)  # the job's own error follows: the user reads both
                if multirun:
                    record_job_failure(output_dir, unrecorded, git)
                raise
        raise unrecorded from None


def not_recorded(outage: TrackingError, output_dir: Path) -> TrackingError:
    """The store failed: the error says where the run's files are and how to record them."""
    return TrackingError(
        f"{outage}; this run's results are in {output_dir}; record them later with: "
        f"python -m runner.upload {output_dir}"
    )


def run_then_upload(
    job: Callable[[], dict[str, Any]],
    output_dir: Path,
    run_uid: str,
    target: TrackingTarget,
    cwd: Path,
) -> dict[str, Any]:
    """The job, then its background upload, whether it finished, diverged, was stopped or
    failed (its job_failure.json: logged FAILED, as in-process)."""
    try:
        result = job()
    except BaseException as exc:
        if isinstance(exc, RunnerError) and exc.exit_code == 2:
            raise  # refused: hydra_main removes its folder, a record in it too
        try:
            announce_upload(output_dir, run_uid, target, cwd)
        except TrackingError as exc:  # the job's own error follows: the user reads both
            report(not_recorded(exc, output_dir))
        raise
    announce_upload(output_dir, run_uid, target, cwd)
    return result


def announce_upload(output_dir: Path, run_uid: str, target: TrackingTarget, cwd: Path) -> None:
    log = start_background_upload(output_dir, run_uid, target, cwd)
    if log is not None:
        print(
            f"MLflow: logging this run to {mask_uri(target.uri)} (experiment "
            f"{target.experiment}) in the background; its log: {log}",
            flush=True,
        )


# conf/config.yaml names run folders with it; registered on import, so that a sweep's
# worker processes (which import this module for the job function) resolve it too.
OmegaConf.register_new_resolver("job_kind", job_kind, replace=True)


def report(exc: RunnerError, kind: str = "error") -> None:
    """One line on stderr; with HYDRA_FULL_ERROR=1 the traceback comes first, as in Hydra."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and sys.exc_info()[1] is exc:
        traceback.print_exc()
    say(f"{kind}: {exc}", err=True)


def use_compile_caches(root: Path) -> None:
    """Compiled programs persist under outputs/cache/, so a rerun skips the compiler.

    Set as environment defaults (a user's own setting wins, the core imports no
    framework, and joblib/submitit workers inherit them). JAX only persists programs
    that took >= 1 s to compile unless told otherwise; ours take ~0.1 s each.
    TensorFlow has no persistent cache for tf.function graphs.
    """
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "torchinductor"))


def main() -> None:
    # Every job (and reused worker) starts TensorFlow equally quiet, whichever framework
    # a worker imported first: JAX sets this to 1 when it is unset.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The Optuna sweeper imports Alembic under Hydra's root logger (INFO, on stdout), and
    # Alembic logs a "setup plugin" line per module as it is imported: seven lines of noise.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    use_compile_caches(Path.cwd() / "outputs" / "cache")
    # A stop outside a job's own handling (hydra_main: the checks below, Hydra's set-up, a
    # parallel sweep's launcher waiting in joblib) goes up to runner.interrupts.run_command,
    # whose handler (raise_stop) raises it.
    try:
        check_group_choices(sys.argv[1:])
        check_sweep_plugins(sys.argv[1:])
        check_output_dir(sys.argv[1:])
        register_plugins(sys.argv[1:])
        check_overrides(sys.argv[1:])
    except RunnerError as exc:
        report(exc)
        sys.exit(exc.exit_code)
    sys.argv[1:] = set_in_every_swept_choice(sys.argv[1:])  # Hydra reads them from sys.argv
    register_sweeper()  # +hparams_search's sweeper (runner.search_sweeper)
    if importable("hydra_plugins.hydra_joblib_launcher"):  # hydra/launcher=parallel's
        from runner.joblib_launcher import register_launcher

        register_launcher()
    try:
        hydra_main()
    except SystemExit as stop:  # e.g. a sweep whose jobs failed (callbacks.SweepTracking)
        exit_now(end_search(stop.code))
    exit_now(end_search(0))


def exit_now(code: int | str | None) -> None:
    """Exit without the interpreter's teardown of the frameworks: TensorFlow's takes ~1.2 s.

    Everything the command owes is done by now: results and trajectories are written
    (atomically), uploads run in their own processes, compile caches are written as
    programs compile, a joblib sweep's workers were stopped as it ended
    (callbacks.stop_workers). The exit handlers still run (log files, joblib's
    temporary folders), then the output streams are flushed.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    import atexit

    atexit._run_exitfuncs()  # logging, joblib's temporary folders, ...: all but the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
