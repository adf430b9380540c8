"""A run's or a sweep's upload as a process of its own, and the folder lock it holds.

Its own module because it is the side of uploading that is about processes, not
MLflow: `python -m runner` starts a run's background upload (start_background_upload),
a sweep's launcher starts its logger (start_logger), and each is kept apart from a
concurrent `python -m runner.upload` of the same folder only by the folder's upload
lock (flock on `<folder>/.upload.lock`, folder_lock), which the starter takes and
hands to the child, and which tests and the benchmarks wait on (wait_for_upload).
`python -m runner` (runner.cli) needs only this side, not the uploader (runner.upload).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.masking import mask_uri
from runner.results import RECORD_FILES
from runner.tracking_store import TrackingError, TrackingTarget

try:
    import fcntl
except ImportError:  # not POSIX: uploads are not locked (as before)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".upload.lock"
LOG_FILE = "upload.log"
_HELD_LOCKS: dict[Path, int] = {}  # folders whose lock this process inherited, by fd


def inherit_lock(folder: Path, fd: int) -> None:
    """This process holds folder's upload lock through fd, opened by its parent (start_logger)."""
    _HELD_LOCKS[folder.resolve()] = fd


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


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

    Nothing is started (None) when run_dir holds no record of this run: no results.json,
    nor the job_failure.json of a run that failed before one (it stopped before a result
    existed).
    """
    for record in RECORD_FILES:
        try:
            if json.loads((run_dir / record).read_text()).get("run_uid") == run_uid:
                break
        except (OSError, ValueError):
            continue
    else:
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
