"""`python -m runner.follow SWEEP_DIR`: a sweep's MLflow logging, in one process beside its jobs.

Why one process: importing MLflow and opening its store cost ~3.5 s of CPU per
process. When each job logged itself, every worker of a parallel sweep paid that
again, on the cores the jobs needed. The sweep's launcher starts this once as the
sweep starts (runner.callbacks.SweepTracking); jobs only write their folders and
hold each folder's upload lock while they run. This process creates the sweep's
parent run, uploads each job folder once its results.json exists (runner.upload:
exactly once, logged as a live run is), and once the launcher has written the
sweep's report and marked the sweep done (DONE_FILE), uploads what is left,
attaches the report to the parent run and closes it with the launcher's status. A
launcher that ends without marking the sweep done (Ctrl-C, a crash) leaves the
parent KILLED, after every job folder that has a result is uploaded.

Arguments: --launcher-pid (its parent, the sweep's launcher), --experiment,
--lock-fd (the sweep folder's upload lock, held until this exits), the sweep
folder. The store's URI comes in MLFLOW_TRACKING_URI, never argv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from runner.errors import RunnerError
from runner.masking import mask_uri
from runner.run_folders import run_dirs
from runner.sweep_record import read_sweep
from runner.tracking import start_sweep_parent
from runner.tracking_store import resolve_target, store_error
from runner.upload import Uploader
from runner.upload_process import inherit_lock, timestamp

DONE_FILE = "sweep_done.json"  # {"status": the status the sweep's parent run ends with}
POLL_S = 0.2
# Below the jobs: on a machine whose cores the jobs fill (a parallel sweep), logging
# waits for a free core (the slack at the end of the sweep, or after it) instead of
# slowing every job down; with a core to spare (a sequential sweep) it keeps up.
NICENESS = 19


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.follow")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--launcher-pid", type=int, required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--lock-fd", type=int)
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  (a log file)
    lower_priority()
    started = time.monotonic()
    sweep_dir = args.sweep_dir.resolve()
    if args.lock_fd is not None:
        inherit_lock(sweep_dir, args.lock_fd)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print(f"{timestamp()} logging the sweep {sweep_dir} to {mask_uri(uri)}")
    import mlflow  # noqa: F401  (configures its loggers on import; quieted after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        uploader = follow(sweep_dir, uri, args.experiment, args.launcher_pid)
    except RunnerError as exc:
        print(f"error: {exc}", flush=True)
        print(f"{timestamp()} not all recorded; once the store is fixed: python -m runner.upload "
              f"{sweep_dir}", flush=True)  # fmt: skip
        return exc.exit_code
    print(uploader.outcome.summary())
    print(f"{timestamp()} done in {time.monotonic() - started:.1f} s")
    return 0


def lower_priority() -> None:
    """Run below the jobs, also where Linux shares CPU by session (autogroups).

    This process has its own session (Ctrl-C in the terminal must not stop it), and
    with autogroup scheduling a session's niceness is its autogroup's: without it the
    logger would get as much CPU as all of the sweep's jobs together.
    """
    os.nice(NICENESS)
    with contextlib.suppress(OSError):  # not Linux, or autogroups off
        Path("/proc/self/autogroup").write_text(str(NICENESS))


def follow(
    sweep_dir: Path, uri: str, experiment: str, launcher_pid: int, out: TextIO | None = None
) -> Uploader:
    """Upload the sweep's job folders as they finish, until the launcher is done or gone."""
    target = resolve_target({"uri": uri, "experiment": experiment}, Path.cwd())
    uploader = Uploader(uri, experiment, live=True, out=out)
    client, experiment_id = uploader.store(target)
    try:
        sweep = start_sweep_parent(client, experiment_id, sweep_dir, read_sweep(sweep_dir))
    except Exception as exc:
        raise store_error(uri, exc) from None
    parent = sweep.parent_run_id
    assert parent is not None
    uploader.parents[target, sweep.sweep_id] = parent
    uploader.sweeps[sweep.sweep_id] = sweep_dir  # its failed jobs decide how the parent ends
    done_file = sweep_dir / DONE_FILE
    uploaded: set[Path] = set()
    while True:
        last = done_file.exists() or os.getppid() != launcher_pid  # checked before the scan
        for run_dir in run_dirs([sweep_dir]):
            if run_dir not in uploaded:
                uploader.add_run(run_dir)  # waits for a job still holding its folder's lock
                uploaded.add(run_dir)
        if last:
            break
        time.sleep(POLL_S)
    done = json.loads(done_file.read_text()) if done_file.exists() else {"status": "KILLED"}
    uploader.close_parents(done["status"])  # with the sweep's report attached
    return uploader


if __name__ == "__main__":
    sys.exit(main())
