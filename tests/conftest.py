"""Shared fixtures: the real CLI in a subprocess, and a real `mlflow server` on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    progress: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python -m runner ARGS` in cwd (its outputs/ land there) and capture both streams.

    progress=false unless asked: off a terminal the bars are silent anyway, but a run
    with progress on still builds them (and tqdm's lock). Returns once the background
    uploads the run started have ended too, so no test leaves an uploader working (and
    loading the machine) while later tests run.
    """
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args, f"progress={str(progress).lower()}"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    from runner.upload_process import LOG_FILE
    from runner.upload_process import wait_for_upload as wait

    for log in cwd.glob(f"**/{LOG_FILE}"):
        wait(log.parent, timeout)
    return proc


def python_code(
    code: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -c CODE` with the project importable and a minimal environment
    (plus `env`)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})},
        timeout=timeout,
    )


def upload_command(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """runner.upload.main(ARGS) in this process, in cwd: what `python -m runner.upload ARGS`
    returns (its `sys.exit(main())`), as a CompletedProcess: exit code, stdout, stderr.

    For tests of what an upload does, not of its process boundary (the command's own
    process: tests/test_reliability.py::test_upload_goes_past_a_folder_whose_record_cannot_be_read,
    tests/test_tracking.py::test_concurrent_uploads_of_the_same_runs_record_each_once): no
    new interpreter, no second import of MLflow (~2-3 s a call). stderr gets what that
    process's stderr would: what is printed to sys.stderr (MLflow's own log stream writes
    there), warnings under Python's default filters, and log records of WARNING and up
    that reach the root logger.
    """
    import contextlib
    import io
    import logging
    import warnings

    from runner.upload import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    before = os.getcwd()
    root.addHandler(handler)
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            warnings.simplefilter("default")  # Python's default filters, as a new process has
            for category in (
                DeprecationWarning,
                PendingDeprecationWarning,
                ImportWarning,
                ResourceWarning,
            ):
                warnings.filterwarnings("ignore", category=category)
            if cwd is not None:
                os.chdir(cwd)
            try:
                code = main(list(args))
            except SystemExit as stop:  # refused by the argument parser
                code = stop.code
        for warning in caught:
            err.write(warnings.formatwarning(*(getattr(warning, k) for k in WARNING_FIELDS)))
    finally:
        os.chdir(before)
        root.removeHandler(handler)
    return subprocess.CompletedProcess(
        ["runner.upload", *args], code, out.getvalue(), err.getvalue()
    )


WARNING_FIELDS = ("message", "category", "filename", "lineno", "line")


@pytest.fixture(scope="session")
def fresh_store(tmp_path_factory: pytest.TempPathFactory):
    """fresh_store(PATH) -> its URI: a new, empty MLflow SQLite store at PATH.

    A copy of one store made once a session (per xdist worker) by the runner's own
    client (runner.tracking.client_for): MLflow's schema set-up (its Alembic migrations,
    ~1 s a store) runs once, not in every test whose store is only where its runs go.
    The copy is the store MLflow made: its schema and its Default experiment, no other;
    each test's experiments are created in it as in a new store. A test about making a
    store (its folder, its lock file, a dry run that must not make one) makes its own.
    """
    import shutil

    from runner.tracking import client_for
    from runner.tracking_store import resolve_target

    folder = tmp_path_factory.mktemp("store-template")
    template = folder / "mlflow.db"
    client = client_for(resolve_target({"uri": f"sqlite:///{template}"}, folder))
    assert [e.name for e in client.search_experiments()] == ["Default"]

    def new(path: Path) -> str:
        assert not path.exists(), path
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return new


def single_result(cwd: Path) -> dict:
    """The results.json of the one run made in cwd."""
    found = sorted((cwd / "outputs" / "runs").glob("*/*/results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def run_dirs_in(cwd: Path) -> list[Path]:
    """The run folders of the single runs made in cwd (outputs/runs/<date>/<time>_...)."""
    return sorted(p.parent for p in (cwd / "outputs" / "runs").glob("*/*/.hydra"))


def wait_for_upload(run_dir: Path, timeout: float = 180) -> str:
    """Wait until the run's background upload has exited; its log (upload.log).

    runner.upload_process.wait_for_upload: the upload holds the folder's lock (flock on
    .upload.lock) from before the run's command returns until it exits, so taking the
    lock means it is done: no polling of the store, no sleep that is too short on a
    loaded machine.
    """
    from runner.upload_process import LOCK_FILE
    from runner.upload_process import wait_for_upload as wait

    assert (run_dir / LOCK_FILE).exists(), f"no background upload was started for {run_dir}"
    return wait(run_dir, timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of the session's mlflow server share one xdist worker (see pyproject's
    --dist loadgroup), so the server starts once a run, not once per worker."""
    for item in items:
        if "mlflow_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("mlflow-server"))


def mlflow_server_env() -> dict[str, str]:
    """The environment of a test's `mlflow server`: this one, without MLflow's job runner.

    By default `mlflow server` also starts eight processes for its jobs (GenAI scorers,
    trace rollups: a job runner and Huey consumers), ~20 s of CPU as they start on a
    2-core machine whose cores the other test worker needs; no test uses them.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION is MLflow's own switch for that feature; the
    tracking server the tests talk to is the same.
    """
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (SQLite backend, local artifact root) on a free loopback port."""
    import requests

    base = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (base / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{base / 'server.db'}",
            "--artifacts-destination", str(base / "artifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=mlflow_server_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(base / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start within 90 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


class LiveRun:
    """`python -m runner ARGS progress=true` in cwd, its stderr read line by line as it comes.

    A signal test waits for the phase line printed as the loop starts, not a fixed sleep:
    a loaded machine can spend many seconds importing and compiling first.
    """

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", *args, "progress=true"],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,  # a few lines: read once the run has ended
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.running = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))
            if line.startswith("running "):  # the phase line printed as the loop starts
                self.running.set()

    def stop(self, signum: int, after: float) -> tuple[float, float]:
        """Signal the run `after` s into its loop: (s to the saved line, s to the exit)."""
        assert self.running.wait(240), self.lines
        time.sleep(after)
        sent = time.monotonic()
        self.proc.send_signal(signum)
        self.proc.wait(timeout=120)
        exited = time.monotonic()
        self._reader.join(10)
        saved = [t for t, line in self.lines if line.endswith(": what was computed is saved")]
        assert saved, self.lines
        return saved[0] - sent, exited - sent

    def stdout(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


IMPORT_TIME = "import time:"  # the lines `python -X importtime` writes to stderr


def imported(module: str) -> Callable[[list[str]], bool]:
    """ready for ctrl_c: `module`'s import has just ended (its `-X importtime` line), the
    command is still importing what comes after it: a point inside a window that prints
    nothing of its own."""
    return lambda lines: lines[-1].startswith(IMPORT_TIME) and lines[-1].endswith(f" {module}")


def ctrl_c(
    args: Sequence[str],
    cwd: Path,
    ready: Callable[[list[str]], bool],
    timeout: float = 120,
    signum: int = signal.SIGINT,
) -> subprocess.CompletedProcess:
    """`python -X importtime ARGS` in cwd, stopped as Ctrl-C in a terminal stops it: SIGINT
    (or signum) to its process group (a sweep's workers too) once `ready(lines)` holds for
    the lines it has printed so far (stdout and stderr, in the order read; see `imported`).
    Returns its exit code and output, the import-time lines left out of stderr; the test
    fails if the command ended before it was ready."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which the signal goes to
    )
    lines: list[str] = []
    streams: dict[str, list[str]] = {"out": [], "err": []}
    sent = threading.Event()
    lock = threading.Lock()

    def read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)
            with lock:
                lines.append(line.rstrip("\n"))
                if not sent.is_set() and ready(lines):
                    sent.set()
                    with contextlib.suppress(ProcessLookupError):  # it has just ended
                        os.killpg(proc.pid, signum)

    readers = [
        threading.Thread(target=read, args=(proc.stdout, streams["out"]), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, streams["err"]), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of its group, if any
            os.killpg(proc.pid, signal.SIGKILL)
    for reader in readers:
        reader.join(10)
    err = "".join(line for line in streams["err"] if not line.startswith(IMPORT_TIME))
    assert sent.is_set(), f"it ended before it was ready:\n{''.join(streams['out'])}\n{err}"
    return subprocess.CompletedProcess(args, proc.returncode, "".join(streams["out"]), err)
