"""Hydra callbacks: a multirun is one group in MLflow, ending with the comparison report.

on_multirun_start runs once, in the launching process, before any worker exists. By
default (tracking.background) it checks the store without importing MLflow and
starts one `python -m runner.follow` for the sweep, which logs every job folder as it
finishes: jobs never import MLflow, so a parallel sweep's workers spend their cores
on the jobs. With tracking.background=false (or inside a SLURM job, whose end would
kill the logger) it creates the store, the experiment and the sweep's parent run
itself, and each job logs itself in-process. Either way the choice is left in the
sweep folder (SWEEP_FILE), where every job (any launcher, any host sharing the
folder) reads it.

on_multirun_end makes the comparison report from the job folders, prints it, and
hands it to whoever logs the sweep; it exits non-zero when jobs failed or the
sweep could not be recorded. A sweep with failed jobs ends its parent run FAILED,
tagged failed_jobs, and each job that failed before it had a run in MLflow (a bad
setting stops a job before it logs itself) is logged as a FAILED run under it, with
its config and error, so the hole shows in MLflow as in the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.errors import RunnerError
from runner.follow import DONE_FILE
from runner.masking import mask_uri
from runner.results import atomic_write, sweep_failures
from runner.reused_folder import check_new_run_dir, check_new_sweep_dir
from runner.sweep_record import REPORT_DIR, SweepInfo, read_sweep, sweep_id_of, write_sweep
from runner.tracking import (
    client_for,
    end_sweep_parent,
    ensure_experiment,
    logs_in_background,
    start_sweep_parent,
)
from runner.tracking_store import (
    DEFAULT_EXPERIMENT,
    TrackingError,
    check_store,
    resolve_target,
    store_error,
)
from runner.unused_folder import note_new
from runner.upload import upload_failed_jobs
from runner.upload_process import LOG_FILE, start_logger

# The sweep's logger (runner.follow), by sweep folder: kept out of the callback, which
# Hydra's joblib launcher pickles into every job (a process handle cannot be pickled).
_LOGGERS: dict[Path, subprocess.Popen] = {}


class NewRunFolder(Callback):
    """Notes, just before Hydra makes a single run's folder, which folders it is about to
    create: a run refused before it computed anything removes them (runner.unused_folder)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # Hydra resolves it the same way next (`now` is cached per config)
            run_dir = OmegaConf.select(config, "hydra.run.dir")
        except Exception:  # e.g. a ${hydra:...} only the job resolves: nothing is noted
            return
        if not run_dir:
            return
        try:
            check_new_run_dir(Path(run_dir).absolute())
        except RunnerError as exc:
            refuse(exc)
        note_new(str(run_dir))


class SweepTracking(Callback):
    def __init__(self) -> None:
        self.outage: TrackingError | None = None  # the store was away as the sweep started

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            check_new_sweep_dir(sweep_dir.absolute())
        except RunnerError as exc:
            refuse(exc)
        if "BasicLauncher" not in _launcher(config):  # jobs elsewhere: this process waits
            from runner.plots import preload_while_waiting

            preload_while_waiting()
        tracking = _tracking(config)
        if not tracking.get("enabled", True):
            return
        sweep_dir.mkdir(parents=True, exist_ok=True)
        cwd = Path(config.hydra.runtime.cwd)
        sweep_id = sweep_id_of(sweep_dir)
        overrides = " ".join(config.hydra.overrides.task)
        started = int(time.time() * 1000)
        try:
            target = resolve_target(tracking, cwd)
            if logs_in_background(tracking, target):
                check_store(target)  # what MLflow would say at once, said before any job
                write_sweep(sweep_dir, SweepInfo(sweep_id, None, "follower", overrides, started))
                follow = ["runner.follow", f"--launcher-pid={os.getpid()}"]
                _LOGGERS[sweep_dir] = start_logger(sweep_dir, follow, target, cwd)
                return
            client = client_for(target)
            experiment_id = ensure_experiment(client, target)
        except TrackingError as exc:
            self.outage = exc
            print(f"warning: {exc}; the jobs run and keep their results", file=sys.stderr)
            write_sweep(sweep_dir, SweepInfo(sweep_id, None, "nobody", overrides, started))
            return
        except RunnerError as exc:  # a bad tracking setting
            refuse(exc)
        start_sweep_parent(
            client, experiment_id, sweep_dir, SweepInfo(sweep_id, None, "jobs", overrides, started)
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        stop_workers(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        tracking = _tracking(config)
        status = _report(sweep_dir, str(tracking.get("experiment") or DEFAULT_EXPERIMENT))
        failures = sweep_failures(sweep_dir)
        if failures:  # the parent ends FAILED, and sweep_done.json says so too
            status = "FAILED"
        problems = []
        if tracking.get("enabled", True):
            problem = self._close_sweep(config, sweep_dir, status)
            if problem is not None:
                problems.append(problem)
        if failures:  # every job ran; a script still learns that some did not succeed
            jobs = len(list(sweep_dir.glob("**/.hydra")))
            first = failures[0]
            problems.append(
                (
                    first["exit_code"],
                    f"{len(failures)} of {jobs} jobs failed; the first: {first['error']}",
                )
            )
        for _, message in problems:
            print(f"error: {message}", file=sys.stderr)
        if problems:
            sys.exit(problems[-1][0])

    def _close_sweep(
        self, config: DictConfig, sweep_dir: Path, status: str
    ) -> tuple[int, str] | None:
        """Hand the report to whoever logs the sweep and end its parent run; what failed."""
        later = f"record the sweep later with: python -m runner.upload {sweep_dir}"
        if self.outage is not None:
            return self.outage.exit_code, f"the sweep is not in MLflow ({self.outage}); {later}"
        logger = _LOGGERS.pop(sweep_dir, None)
        if logger is not None:
            done = {"status": status}  # the logger attaches the report as it ends the parent
            atomic_write(sweep_dir / DONE_FILE, json.dumps(done))
            log = sweep_dir / LOG_FILE
            code = logger.poll()  # not waited for: it logs the last jobs after this exits
            if code:
                lines = log.read_text(errors="replace").splitlines() if log.exists() else []
                error = next((x for x in reversed(lines) if x.startswith("error: ")), "")
                why = error.removeprefix("error: ") or f"its logger exited with {code}"
                return code, f"the sweep is not all in MLflow ({why}); log: {log}; {later}"
            target = resolve_target(_tracking(config), Path(config.hydra.runtime.cwd))
            try:
                check_store(target)  # still there for the last uploads?
            except TrackingError as exc:
                return exc.exit_code, f"{exc}; the last runs cannot be logged; {later}"
            print(
                f"MLflow: logging this sweep to {mask_uri(target.uri)} (experiment "
                f"{target.experiment}), the last runs in the background; its log: {log}",
                flush=True,
            )
            return None
        sweep = read_sweep(sweep_dir)
        if sweep.parent_run_id is None:
            return None
        target = resolve_target(_tracking(config), Path(config.hydra.runtime.cwd))
        try:
            client = client_for(target)
            experiment_id = ensure_experiment(client, target)
        except TrackingError as exc:
            return exc.exit_code, f"{exc}; the sweep's parent run stays open until {later}"
        from runner.compare.logged import log_sweep_report

        problem = None
        try:
            problem = _log_failed_jobs(sweep_dir, target)
            log_sweep_report(client, experiment_id, sweep_dir, sweep.parent_run_id, sweep.sweep_id)
        except Exception as exc:
            status = "FAILED"
            why = store_error(target.uri, exc)
            print(f"error: the report is not in MLflow: {why}", file=sys.stderr)
        finally:
            end_sweep_parent(client, sweep.parent_run_id, sweep_dir, status)
        return problem


def _log_failed_jobs(sweep_dir: Path, target: Any) -> tuple[int, str] | None:
    """The jobs that failed before logging themselves (a bad setting stops a job before
    its run starts) as FAILED runs of the sweep, as the sweep's logger records them."""
    try:
        upload_failed_jobs(sweep_dir, target)
    except TrackingError as exc:
        later = f"record them later with: python -m runner.upload {sweep_dir}"
        return exc.exit_code, f"the failed jobs are not in MLflow ({exc}); {later}"
    return None


def refuse(exc: RunnerError) -> NoReturn:
    """A setting refused before the run or sweep starts: the one line and its exit code
    (Hydra would print an exception raised from a callback as a traceback)."""
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)


def stop_workers(config: DictConfig) -> None:
    """Stop a joblib launcher's worker processes, idle now that every job has run.

    Left alone they outlive a command that ends with os._exit (cli.exit_now), and a
    normal exit would wait for each to tear its frameworks down (TensorFlow: ~1.2 s).
    """
    if "joblib" in _launcher(config):
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor(reuse=True).shutdown(wait=True, kill_workers=True)


def _launcher(config: DictConfig) -> str:
    """The launcher's class path, e.g. hydra_plugins.hydra_joblib_launcher....JoblibLauncher."""
    return str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")


def _report(sweep_dir: Path, experiment: str) -> str:
    """The sweep's comparison report from its job folders (REPORT_DIR), printed; the
    status its parent run ends with."""
    from runner.compare.report import compare_folder
    from runner.compare.store import CompareError

    try:
        report = compare_folder(sweep_dir, experiment, sweep_dir / REPORT_DIR)
    except CompareError as exc:  # e.g. every job failed: nothing to compare
        from runner.compare.holes import hole_lines, sweep_holes

        # what a report would have listed below its table: each job and why it has no row
        for line in hole_lines(sweep_holes(sweep_dir)):
            print(line)
        print(f"no comparison report: {exc}", file=sys.stderr)
        return "FINISHED"
    except Exception as exc:  # the sweep's runs are all recorded; say why no report
        print(f"error: comparison report not made: {exc}", file=sys.stderr)
        return "FAILED"
    print(report.text)
    return "FINISHED"


def _tracking(config: DictConfig) -> dict[str, Any]:
    node = config.get("tracking")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}
