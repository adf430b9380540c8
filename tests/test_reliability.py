"""Faults, races and bad environments: what the user gets, and that nothing is lost.

Each case is a row of docs/reliability.md. The real CLI runs in a subprocess (an
upload whose process is not the point runs in this one: conftest.upload_command); the
tracking stores are real (SQLite files, `mlflow server`, a tiny HTTP server that
fails on purpose), and so are the signals.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow import MlflowClient

from runner.masking import mask_text
from runner.results import atomic_write
from tests.conftest import (
    ROOT,
    LiveRun,
    cli,
    ctrl_c,
    free_port,
    mlflow_server_env,
    single_result,
    upload_command,
    wait_for_upload,
)
from tests.specs import MODE_IDS, MODE_UPDATES

JAX = ("backend=jax",)
NUMPY_BACKEND = ("backend=numpy",)  # where the framework is incidental: the fastest to import


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Like conftest.cli, but the caller's env wins (HYDRA_FULL_ERROR included)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "runner", *args, "progress=false"],
        cwd=cwd,
        env={**full_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def upload(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The documented command: python -m runner.upload ..."""
    return subprocess.run(
        [sys.executable, "-m", "runner.upload", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed run, with no traceback around it."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def assert_nothing_half_written(folder: Path) -> None:
    """No temp file of an interrupted atomic write, and every results.json parses."""
    assert not list(folder.rglob(".results.json.*"))  # atomic_write's temp files
    assert not list(folder.rglob(".trajectory.csv.*"))
    for path in folder.rglob("results.json"):
        json.loads(path.read_text())


def all_runs(uri: str, experiment: str = "gradient-runner") -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


# --- bad environments: one line, a non-zero exit, nothing half-written -----------------


# Rows of docs/reliability.md beyond tests/test_cli.py::BAD_INPUTS (same contract).
MORE_BAD_INPUTS = [
    (["problem.dim=0"], "problem.dim=0 is not allowed; give a whole number >= 1"),
    (["problem.b=inf"], "problem.b=inf is not finite; give a finite number"),
    (
        ["problem=rosenbrock", "problem.dim=null"],
        "problem.dim=null is not allowed for problem=rosenbrock; give a whole number >= 2",
    ),
    (["optimizer.lr=0"], "optimizer.lr=0 is not allowed; give a finite number > 0"),
    (["stepz=3"], "stepz is not a setting of this config (misspelt?); to add a new key on"),
    (
        ["backend=numpy", "mode.update=minimize"],
        "mode.update=minimize is a setting of mode=graph (an eager mode is its own "
        "update); choose mode=graph mode.update=minimize, or mode=minimize",
    ),
    (
        ["-m", "hydra/launcher=slurm", "backend=numpy"],
        "hydra/launcher=slurm submits to a SLURM cluster, and this machine has no srun; use ",
    ),
    (
        ["backend=torch", "backend.jit_compile=true"],
        "backend.jit_compile is a setting of backend=tf only; choose backend=tf to use it",
    ),
    (["problem=cubic"], "problem=cubic is not a problem choice; choose one of: "),
    (["optimizer=adamw"], "optimizer=adamw is not an optimizer choice; choose one of: "),
    (
        ["backend=tf", "backend.legacy_optimizers=yes"],
        "backend.legacy_optimizers='yes' is not allowed; choose one of: true, false",
    ),
    (
        ["backend=numpy", "problem=quadratic_form", "problem.cond=[1,2]"],
        "problem.cond=[1, 2] must be a number, not a list",
    ),
    (
        ["backend=numpy", f"problem.a=1{'0' * 400}"],  # an int: math.isfinite raised
        f"problem.a=1{'0' * 400} overflows float64 (largest 1.8e+308); give a smaller number",
    ),
    # a required group deleted: Hydra's traceback (the run folder's name reads backend.name),
    # or `optimizer=None is not a config group choice` without the choices
    (["~backend"], "~backend leaves the run without a backend, which every run needs; choose"),
    (["~optimizer"], "~optimizer leaves the run without an optimizer, which every run needs"),
    (["~task"], "~task leaves the run without a task, which every run needs; choose one of: m"),
    # ... or its name (Hydra's traceback), or a required setting (`steps=null is not allowed`)
    (
        ["~backend.name"],
        "~backend.name leaves the run without a backend, which every run needs; choose one "
        "of: jax, numpy, tf, torch",
    ),
    (["~mode.name"], "~mode.name leaves the run without a mode, which every run needs; choose"),
    (["~steps"], "~steps leaves the run without steps, which every run needs; drop ~steps"),
    (
        ["-m", "backend=numpy", "~steps"],
        "~steps leaves the run without steps, which every run needs; drop ~steps to run with "
        "steps=1000 (the default)",
    ),
    (["task=derivatives", "~optimizer"], "~optimizer does not apply to task=derivatives"),
    # a key null or absent: Hydra's two-line 'Could not delete from config' error, exit 1
    (
        ["~record_every"],
        "~record_every: record_every is null already, so there is nothing to delete; drop ",
    ),
    (
        ["~tracking.name"],
        "~tracking.name: tracking.name is not a setting of this config (misspelt?); drop ",
    ),
    (
        ["backend=numpy", "~backend.jit_compile"],
        "~backend.jit_compile: backend.jit_compile is a setting of backend=tf only, which ",
    ),
    # the optimizer's numbers in the run's dtype: eps 0 in float32 was a NaN blamed on the lr
    (
        ["backend=numpy", "optimizer=adagrad", "optimizer.eps=1e-50"],
        "optimizer.eps=1e-50 is 0 in float32 (its smallest positive number is 1.4e-45); "
        "give a larger optimizer.eps, or dtype=float64",
    ),
    (
        ["backend=numpy", "optimizer=adagrad", "optimizer.initial_accumulator=1e39"],
        "optimizer.initial_accumulator=1e+39 overflows float32 (largest 3.4e+38)",
    ),
    (  # x never moved: 1 - beta2**t is 0 in float32 (optax, Keras)
        ["backend=numpy", "optimizer=adam", "optimizer.beta2=0.99999999"],
        "optimizer.beta2=0.99999999 is 1 in float32 (its largest number below 1 is 0.99999994)",
    ),
    (  # it said "drop problem.dim", which was never given
        ["task=derivatives", "problem=rosenbrock"],
        "task=derivatives evaluates the notebook's scalar problem=quadratic, not "
        "problem=rosenbrock; choose problem=quadratic",
    ),
    (
        ["task=derivatives", "problem.dim=3"],
        "task=derivatives evaluates the notebook's scalar problem=quadratic, not a vector "
        "(problem.dim=3); drop problem.dim",
    ),
    # choices of the groups the first check does not know, listed as for backend=keras
    (
        ["+experiment=bogus"],
        "+experiment=bogus is not an experiment choice; choose one of: matrix, matrix_parallel",
    ),
    (["mode="], "mode='' is not a mode choice; choose one of: apply, graph, manual, minimize"),
    (
        ["experiment=matrix"],
        "experiment=matrix overrides an experiment the config does not choose; "
        "add one with +experiment=matrix",
    ),
    (["hydra/launcher=bogus"], "hydra/launcher=bogus is not a hydra/launcher choice; choose one"),
    (
        ["hydra.launcher.n_job=2"],
        "hydra.launcher.n_job is not a setting of hydra.launcher (misspelt?); ",
    ),
    # failed as the run resolved its config, exit 1, blamed on the backend
    (
        ["backend=numpy", "steps=${oc.env:RUNNER_UNSET_FOR_TESTS}"],
        "steps='${oc.env:RUNNER_UNSET_FOR_TESTS}' cannot be resolved: Environment variable "
        "'RUNNER_UNSET_FOR_TESTS' not found; give steps a value",
    ),
]


@pytest.mark.parametrize(
    ("args", "message"), MORE_BAD_INPUTS, ids=[" ".join(a) for a, _ in MORE_BAD_INPUTS]
)
def test_more_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == error_line(proc)
    assert error_line(proc).startswith(f"error: {message}")
    assert not list(tmp_path.rglob("results.json"))
    if "-m" not in args:  # nor an empty run folder
        assert not list(tmp_path.glob("outputs/runs/*/*"))


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "tf"])
def test_a_device_alias_is_refused_as_typed(tmp_path: Path, backend: str) -> None:
    """device=cuda reaches a backend as device=gpu, and its refusal named device=gpu, a
    value the command never typed. Where the framework sees a GPU, the run uses it."""
    proc = cli(f"backend={backend}", "device=cuda", "steps=10", "tracking=off", cwd=tmp_path)
    if proc.returncode == 0:
        assert backend != "numpy" and single_result(tmp_path)["device"] == "gpu:0"
        return
    assert proc.returncode == 2
    assert proc.stderr.strip() == error_line(proc)
    runs_on = "runs on the CPU only" if backend == "numpy" else "sees no GPU on this machine"
    assert re.fullmatch(
        rf"error: device=cuda: \w+ {runs_on}; use device=cpu or .*auto", proc.stderr.strip()
    )


@pytest.mark.parametrize(
    "extra",
    [None, "results.json", ".upload.lock", "cli.log", ".hydra/notes.txt"],
    ids=["as-hydra-left-it", "a-result", "an-upload-lock", "a-log-line", "more-in-hydra"],
)
def test_a_refused_runs_folder_goes_only_if_it_holds_nothing(tmp_path: Path, extra) -> None:
    """runner.unused_folder removes a folder this command made (and the parents it made)
    only while it holds Hydra's three files and an empty log; anything more keeps it."""
    from runner import unused_folder

    run_dir = tmp_path / "outputs" / "runs" / "day" / "run"
    unused_folder.note_new(str(run_dir))  # as the callback does, before Hydra makes it
    (run_dir / ".hydra").mkdir(parents=True)
    for name in unused_folder.HYDRA_FILES:
        (run_dir / ".hydra" / name).write_text("{}\n")
    (run_dir / "cli.log").write_text("")
    if extra:
        (run_dir / extra).write_text("something\n")
    removed = unused_folder.remove_unused(run_dir, ".hydra", "cli.log")
    assert removed is (extra is None)
    assert run_dir.exists() is (extra is not None)
    assert tmp_path.is_dir() and (tmp_path / "outputs").exists() is (extra is not None)
    if extra:
        assert (run_dir / extra).read_text() == "something\n"


def test_a_folder_that_existed_before_the_run_is_never_removed(tmp_path: Path) -> None:
    from runner import unused_folder

    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    unused_folder.note_new(str(run_dir))
    (run_dir / "cli.log").write_text("")
    assert not unused_folder.remove_unused(run_dir, ".hydra", "cli.log")
    assert (run_dir / "cli.log").exists()


def test_overflow_on_the_very_last_step_is_not_success(tmp_path: Path) -> None:
    """float32, lr=1.5: the state after update 64 is the first whose loss overflows."""
    proc = cli(*JAX, "optimizer.lr=1.5", "steps=64", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 3
    assert error_line(proc).startswith("error: the loss became inf at step 64 of 64 ")
    result = single_result(tmp_path)
    assert result["status"] == "diverged" and result["diverged_at"] == 64


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_output_folder_that_cannot_be_written(tmp_path: Path, multirun: bool) -> None:
    """A run folder under a file: as root no chmod stops a write, a file in the path does."""
    (tmp_path / "file.txt").write_text("not a folder\n")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = (["-m"] if multirun else []) + [*JAX, "steps=5", f"{key}={tmp_path}/file.txt/run"]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == error_line(proc)
    assert error_line(proc) == (
        f"error: {key}={tmp_path}/file.txt/run cannot be written: {tmp_path}/file.txt is a "
        f"file, not a folder; set {key}= to a folder you can write"
    )
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "outputs").exists()


def test_output_folder_on_a_read_only_file_system(tmp_path: Path) -> None:
    proc = cli(*JAX, "steps=5", "hydra.run.dir=/proc/gradient-runner/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert error_line(proc).startswith(
        "error: hydra.run.dir=/proc/gradient-runner/run cannot be written: "
        "no file can be made in /proc ("
    )


def test_a_file_that_cannot_be_written_later_is_one_line(tmp_path: Path) -> None:
    """The run folder exists and is writable, but trajectory.csv cannot be replaced."""
    run_dir = tmp_path / "run"
    (run_dir / "trajectory.csv").mkdir(parents=True)
    proc = cli(*JAX, "steps=20", "tracking=off", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert error_line(proc) == f"error: cannot write {run_dir}/trajectory.csv: Is a directory"
    assert not (run_dir / "results.json").exists()  # no results without their trajectory
    assert_nothing_half_written(tmp_path)


def test_random_things_take_a_recorded_seed() -> None:
    from omegaconf import OmegaConf

    from runner.problems import QuadraticForm, problem_record

    def coefficients(seed: int) -> dict:
        return QuadraticForm(dim=4, cond=10.0, seed=seed).coefficients

    same, other = coefficients(3), coefficients(4)
    assert all(np.array_equal(same[k], coefficients(3)[k]) for k in same)
    assert not np.array_equal(same["A"], other["A"])
    assert problem_record(QuadraticForm(dim=4, seed=3))["seed"] == 3  # in results.json
    search = OmegaConf.load(ROOT / "conf" / "hparams_search" / "lr.yaml")
    assert search.hydra.sweeper.sampler.seed == 0  # Optuna's sampler is seeded


def test_corrupt_store_is_one_line_and_keeps_the_results(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"this is not SQLite\n" + os.urandom(4096))
    proc = cli(*NUMPY_BACKEND, "steps=20", f"tracking.uri=sqlite:///{store}", cwd=tmp_path)
    assert proc.returncode == 4
    line = error_line(proc)
    assert line.startswith(f"error: tracking store sqlite:///{store} is not an SQLite database")
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    assert line.endswith(f"record them later with: python -m runner.upload {run_dir}")
    result = single_result(tmp_path)
    assert result["status"] == "finished" and result["run_uid"]
    assert store.read_bytes().startswith(b"this is not SQLite")  # never "repaired" over
    assert_nothing_half_written(tmp_path)


def test_store_in_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a folder\n")
    store = f"sqlite:///{tmp_path}/file.txt/mlflow.db"
    proc = cli(*NUMPY_BACKEND, "steps=20", f"tracking.uri={store}", cwd=tmp_path)
    assert proc.returncode == 4
    assert error_line(proc).startswith(
        f"error: tracking store {store} cannot be created ({tmp_path}/file.txt is a file); "
    )
    assert single_result(tmp_path)["status"] == "finished"


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("CREATE TABLE IF NOT EXISTS held (x)")
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_locked_store_is_reported_after_the_retry_window(tmp_path: Path) -> None:
    """Another process holds the store's write lock for longer than LOCK_WAIT_S (10 s)."""
    store = tmp_path / "locked.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(store), "120"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        proc = cli(*NUMPY_BACKEND, "steps=20", f"tracking.uri=sqlite:///{store}", cwd=tmp_path)
        elapsed = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 4
    assert error_line(proc).startswith(
        f"error: tracking store sqlite:///{store} is locked by another process "
        "(still locked after 10 s)"
    )
    assert single_result(tmp_path)["status"] == "finished"
    assert elapsed < 60  # waited out the window, then said so
    assert_nothing_half_written(tmp_path)


HEALTHY = ("/health", 200, b"OK")
GET_EXPERIMENT = "/api/2.0/mlflow/experiments/get-by-name"


class _Failing(http.server.BaseHTTPRequestHandler):
    """500 to every request but those whose path starts with a prefix in `answers`."""

    answers: tuple[tuple[str, int, bytes], ...] = ()

    def _answer(self) -> None:
        code, body = next(
            ((c, b) for prefix, c, b in self.answers if self.path.startswith(prefix)),
            (500, b"internal error"),
        )
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """An HTTP server on loopback that answers 500 (to all, or to all but /health)."""
    handler = type("Handler", (_Failing,), {"answers": (HEALTHY,) if request.param else ()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("failing_server", "source"),
    [(False, "/health"), (True, "/api/2.0/mlflow/experiments/get-by-name")],
    ids=["500-everywhere", "healthy-but-500-on-the-api"],
    indirect=["failing_server"],
)
def test_failing_tracking_server(tmp_path: Path, failing_server: str, source: str) -> None:
    start = time.monotonic()
    proc = cli(*NUMPY_BACKEND, "steps=20", f"tracking.uri={failing_server}", cwd=tmp_path)
    assert proc.returncode == 4
    assert error_line(proc).startswith(
        f"error: tracking server {failing_server} is failing (HTTP 500 from {source}); "
    )
    assert single_result(tmp_path)["status"] == "finished"
    assert time.monotonic() - start < 60


class _FailsAfterTheCheck(_Failing):
    """Answers what a run checks before it starts (/health, the experiment lookup: no such
    experiment yet) and 500 to everything else: the store fails once the upload writes."""

    answers = (
        HEALTHY,
        (GET_EXPERIMENT, 404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none"}'),
    )


@pytest.fixture
def late_failing_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailsAfterTheCheck)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_store_failing_after_the_check_is_reported_in_the_upload_log(
    tmp_path: Path, late_failing_server: str
) -> None:
    """The background trade-off: the run's check passed and the command succeeded; the
    upload that fails later says so in upload.log, with the command that records it."""
    proc = cli(*NUMPY_BACKEND, "steps=20", f"tracking.uri={late_failing_server}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    log = wait_for_upload(run_dir)
    assert "Traceback" not in log, log
    assert (
        f"error: tracking server {late_failing_server} is failing (HTTP 500 from "
        "/api/2.0/mlflow/experiments/create); "
    ) in log, log
    assert f"not recorded; once the store is fixed: python -m runner.upload {run_dir}" in log
    assert single_result(tmp_path)["status"] == "finished"


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    plain = run_cli("steps=abc", cwd=tmp_path)
    full = run_cli("steps=abc", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    line = "error: steps='abc' is not allowed; give a whole number >= 1"
    assert plain.returncode == full.returncode == 2
    assert plain.stderr.strip() == line
    assert "Traceback (most recent call last)" in full.stderr
    assert "runner.errors.ConfigError" in full.stderr and full.stderr.strip().endswith(line)
    assert not list(tmp_path.rglob("results.json"))  # a config error writes no results


def test_atomic_write_never_leaves_a_truncated_file(tmp_path: Path, monkeypatch) -> None:
    """A write that dies half-way (here: at the rename) leaves the old file and no temp."""
    target = tmp_path / "results.json"
    atomic_write(target, '{"old": true}\n')

    def dies(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, '{"new": ' + "1" * 1_000_000 + "}\n")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --- signals -------------------------------------------------------------------------


def test_sigterm_marks_the_run_killed_and_keeps_the_partial_trajectory(tmp_path: Path) -> None:
    in_process = "tracking.background=false"  # the run is RUNNING in MLflow while it runs
    live = LiveRun(tmp_path, *JAX, "steps=100000000", in_process)
    live.stop(signal.SIGTERM, after=1.0)
    assert live.proc.returncode == 143, live.lines
    assert live.lines[-1][1] == "terminated: what was computed is saved"
    db = tmp_path / "outputs" / "mlflow.db"
    result = single_result(tmp_path)
    assert result["status"] == "interrupted" and 0 < result["steps_run"] < 100_000_000
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    rows = (run_dir / "trajectory.csv").read_text().splitlines()
    assert len(rows) > 2 and rows[-1].startswith(f"{result['steps_run']},")
    (run,) = all_runs(f"sqlite:///{db}")
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"
    assert run.data.metrics["steps_run"] == result["steps_run"]
    assert run.data.tags["run_uid"] == result["run_uid"]
    assert_nothing_half_written(tmp_path)


def test_interrupted_sweep_is_logged_killed(tmp_path: Path) -> None:
    """Ctrl-C in a sweep's second job: the sweep's logger, in its own session, still records
    both jobs (the first FINISHED, the stopped one KILLED) and closes the parent KILLED.
    The Ctrl-C comes 1 s after the second job says its loop began (its phase line)."""
    sweep = tmp_path / "sweep"
    live = LiveRun(tmp_path, "-m", *JAX, "steps=20,2000000000", f"hydra.sweep.dir={sweep}")
    proc = live.proc
    deadline = time.monotonic() + 240
    second = "running 2000000000 steps ..."
    while time.monotonic() < deadline and not any(line == second for _, line in live.lines):
        assert proc.poll() is None, live.lines
        time.sleep(0.05)
    assert any(line == second for _, line in live.lines), live.lines
    time.sleep(1.0)  # the second job is in its loop
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    live._reader.join(10)
    err = "\n".join(line for _, line in live.lines)
    live.stdout()  # a few lines: read once the run has ended
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    wait_for_upload(sweep)
    results = {p.parent.name[0]: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert results["0"]["status"] == "finished" and results["1"]["status"] == "interrupted"
    runs = all_runs(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (parent,) = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    assert parent.info.status == "KILLED"
    jobs = {r.data.tags["run_uid"]: r for r in runs if r.data.tags.get("runner.kind") is None}
    assert jobs[results["0"]["run_uid"]].info.status == "FINISHED"
    stopped = jobs[results["1"]["run_uid"]]
    assert stopped.info.status == "KILLED"
    assert stopped.data.metrics["steps_run"] == results["1"]["steps_run"] > 0
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs.values()} == {parent.info.run_id}


# --- a tracking server away during a sweep, and the upload command -----------------------


def test_sweep_without_its_server_completes_and_uploads_exactly_once(
    tmp_path: Path, fresh_store
) -> None:
    from runner.tracking import git_tags

    sweep = tmp_path / "sweep"
    away = f"http://127.0.0.1:{free_port()}"
    proc = cli(
        "-m",
        *NUMPY_BACKEND,
        "optimizer.lr=0.01,1.5",
        "steps=200",
        f"tracking.uri={away}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 4, proc.stderr  # the sweep went on, job after job, then said so
    assert "Traceback" not in proc.stderr
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(r["status"] for r in results.values()) == ["diverged", "finished"]
    # a warning as the sweep starts (as a single run's: it said `error:` and went on), and
    # the error as its last line, with the way to record it
    assert proc.stderr.count(f"warning: tracking server {away} is unreachable") == 1
    assert proc.stderr.count("error: ") == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the sweep is not in MLflow (tracking server {away} is unr")
    assert last.endswith(f"record the sweep later with: python -m runner.upload {sweep}")
    assert "lr=0.01" in proc.stdout  # and its report was printed all the same

    store = fresh_store(tmp_path / "later.db")  # uploads in-process: conftest.upload_command
    first = upload_command(str(sweep), "--tracking-uri", store, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "uploaded 2, already recorded 0, unreadable 0"
    assert first.stderr == ""
    again = upload_command(
        str(sweep), str(sweep / "0_numpy_manual"), "--tracking-uri", store, cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == "uploaded 0, already recorded 2, unreadable 0"

    runs = all_runs(store)
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("runner.kind") != "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # the sweep's record kept its overrides though the store was away as it started
    assert "optimizer.lr=0.01,1.5" in parents[0].data.tags["overrides"]
    # with the report the sweep printed as it ended, as a sweep logged live has it
    reported = {a.path for a in MlflowClient(store).list_artifacts(parents[0].info.run_id)}
    assert {"comparison.md", "comparison.json"} <= reported
    assert parents[0].data.metrics["compare.rows"] == 2
    assert len(jobs) == 2
    by_uid = {r.data.tags["run_uid"]: r for r in jobs}
    assert set(by_uid) == {r["run_uid"] for r in results.values()}
    report = json.loads((sweep / "compare" / "comparison.json").read_text())
    assert {row["run_name"]: row["run_id"] for row in report["rows"]} == {
        name: by_uid[result["run_uid"]].info.run_id for name, result in results.items()
    }  # filled in by the upload, which attached the report
    client = MlflowClient(store)
    for name, result in results.items():
        run = by_uid[result["run_uid"]]
        expected = {"finished": "FINISHED", "diverged": "FAILED"}[result["status"]]
        assert run.info.status == expected
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["runner.uploaded_from"] == str(sweep / name)
        # the commit the job recorded as it ran (results.json), not today's checkout's
        recorded = git_tags(result.get("git"))
        assert {k: run.data.tags.get(k) for k in recorded} == recorded
        assert ("git_commit" in run.data.tags) == ("git" in result)
        assert run.data.params["optimizer.lr"] == str(result["optimizer"]["lr"])
        assert f"optimizer.lr={result['optimizer']['lr']}" in run.info.run_name
        assert run.data.params["tracking.uri"] == away
        assert run.data.metrics["steps_run"] == result["steps_run"]
        if result["status"] == "diverged":
            assert f"at step {result['diverged_at']} " in run.data.tags["error"]
            # the upload tags the error the job printed, as a job logged in-process is tagged
            line = f"diverged: {run.info.run_name}: {run.data.tags['error']}"  # job named
            assert line in proc.stderr.splitlines()
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"results.json", "trajectory.csv", "hydra"} <= artifacts
        history = client.get_metric_history(run.info.run_id, "loss")
        losses = np.genfromtxt(sweep / name / "trajectory.csv", delimiter=",", names=True)["loss"]
        assert len(history) == np.isfinite(losses).sum()
    assert_nothing_half_written(sweep)


def test_ctrl_c_while_an_upload_waits_for_a_folder_is_one_line(tmp_path: Path, fresh_store) -> None:
    """Ctrl-C while `python -m runner.upload` waits for a run folder another upload holds
    was a traceback through folder_lock; the run's files stay as they were, and the same
    command, given again, uploads it (as its line says)."""
    from runner.upload_process import folder_lock

    assert cli(*NUMPY_BACKEND, "steps=20", "tracking=off", cwd=tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    kept = ("results.json", "trajectory.csv")
    before = [(run_dir / name).read_bytes() for name in kept]
    store = fresh_store(tmp_path / "later.db")
    args = ["-m", "runner.upload", str(run_dir), "--tracking-uri", store]
    with folder_lock(run_dir):  # another upload of the folder, still running
        proc = ctrl_c(args, tmp_path, lambda lines: lines[-1].startswith("waiting for another"))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == (
        "interrupted: what was uploaded is recorded; the same command uploads the rest\n"
    )
    assert [(run_dir / name).read_bytes() for name in kept] == before
    again = upload_command(str(run_dir), "--tracking-uri", store, cwd=tmp_path)
    assert again.stdout.splitlines()[-1] == "uploaded 1, already recorded 0, unreadable 0"


def test_upload_of_a_missing_folder_is_one_line(tmp_path: Path, capsys) -> None:
    from runner.upload import main

    assert main([str(tmp_path / "nowhere"), "--tracking-uri", "sqlite:///x.db"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'nowhere'} does not exist; give run folders or sweep folders\n"
    )
    killed = tmp_path / "killed"  # a run killed with -9 before its end: nothing to upload
    (killed / ".hydra").mkdir(parents=True)
    assert main([str(killed), "--tracking-uri", "sqlite:///x.db"]) == 2
    assert capsys.readouterr().err == (
        f"error: {killed} holds no results.json: its run stopped before writing one; "
        "nothing to upload\n"
    )


def start_server(base: Path, port: int) -> subprocess.Popen:
    """`mlflow server` in its own process group, so the test can crash it like a host would."""
    log = (base / f"server-{port}.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{base / 'server.db'}",
            "--artifacts-destination", str(base / "artifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=mlflow_server_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (base / f"server-{port}.log").read_text()[-2000:]
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
    stop_server(proc, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start within 120 s")


def stop_server(proc: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, how)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_server_crash_mid_sweep_then_upload_to_the_restarted_server(tmp_path: Path) -> None:
    """The server dies (SIGKILL) while the sweep runs; the sweep goes on and ends saying the
    sweep is not in MLflow; once the server is back, one upload completes the record and a
    second adds nothing."""
    base = tmp_path / "server"
    base.mkdir()
    server = start_server(base, free_port())
    url = f"http://127.0.0.1:{server.args[server.args.index('--port') + 1]}"
    sweep = tmp_path / "sweep"
    try:
        job = subprocess.Popen(
            [
                # The server goes down once job 2 has its results, while job 3 runs
                # (~4 s). How far the sweep's logger got by then varies: it runs at the
                # lowest priority and the jobs keep both cores busy (it had recorded no
                # run when the sweep ended in a run here), so what the upload adds varies.
                sys.executable, "-m", "runner", "-m", *JAX, "mode=manual",
                "steps=20,150000,1000001", f"tracking.uri={url}",
                f"hydra.sweep.dir={sweep}", "progress=false",
            ],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list(sweep.glob("*/results.json"))) < 2:
            time.sleep(0.1)
        stop_server(server, signal.SIGKILL)  # job 3 is running: the host goes down
        _, err = job.communicate(timeout=600)
    finally:
        stop_server(server, signal.SIGKILL)
    assert job.returncode == 4, err  # job 3 at least is not in MLflow: the exit code says so
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: tracking server {url} is unreachable") or last.startswith(
        "error: the sweep is not all in MLflow"
    ), err
    assert last.endswith(f"record the sweep later with: python -m runner.upload {sweep}")
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [r["status"] for r in results] == ["finished"] * 3

    restarted = start_server(base, free_port())
    url = f"http://127.0.0.1:{restarted.args[restarted.args.index('--port') + 1]}"
    try:
        first = upload(str(sweep), "--tracking-uri", url, cwd=tmp_path)
        again = upload(str(sweep), "--tracking-uri", url, cwd=tmp_path)
        runs = all_runs(url)
    finally:
        stop_server(restarted)
    assert first.returncode == 0, first.stderr
    uploaded, recorded = map(int, re.findall(r"\d+", first.stdout.strip().splitlines()[-1])[:2])
    assert first.stdout.strip().splitlines()[-1].endswith(", unreadable 0")
    assert uploaded >= 1 and uploaded + recorded == 3
    assert again.stdout.strip().splitlines()[-1] == "uploaded 0, already recorded 3, unreadable 0"
    jobs = [r for r in runs if r.data.tags.get("runner.kind") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    assert sorted(r.data.tags["run_uid"] for r in jobs) == sorted(r["run_uid"] for r in results)
    assert {r.info.status for r in jobs} == {"FINISHED"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}


# --- a parallel sweep on one SQLite store --------------------------------------------------


@pytest.mark.slow
def test_parallel_sweep_of_24_runs_on_one_sqlite_store(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        *JAX,
        "mode=manual,apply,graph",
        "dtype=float32,float64",
        "optimizer.lr=0.01,0.02,0.03,0.04",
        "steps=50",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(results) == 24
    runs = all_runs(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    jobs = [r for r in runs if r.data.tags.get("runner.kind") is None]
    assert len(jobs) == 24  # none lost, none duplicated
    assert sorted(r.data.tags["run_uid"] for r in jobs) == sorted(r["run_uid"] for r in results)
    assert {r.info.status for r in jobs} == {"FINISHED"}
    combos = {(r.data.params["mode.name"], r.data.params["dtype"], r.data.params["optimizer.lr"])
              for r in jobs}  # fmt: skip
    assert len(combos) == 24


# --- determinism: the same config twice gives the same bits ------------------------------


def _backend(name: str):
    if name == "jax":
        pytest.importorskip("jax")
        from backends.jax import JaxBackend

        return JaxBackend()
    if name == "tf":
        pytest.importorskip("tensorflow")
        from backends.tf import TensorFlowBackend

        return TensorFlowBackend()
    pytest.importorskip("torch")
    from backends.torch import TorchBackend

    return TorchBackend()


def _twice(backend_name: str, mode: str, update: str, dtype: str) -> None:
    from runner.engine import run_minimize
    from runner.problems import Quadratic
    from runner.protocol import MinimizeSpec, OptimizerSpec, RecordPlan

    backend = _backend(backend_name)
    spec = MinimizeSpec(
        problem=Quadratic(a=1.7, b=-2.3, c=0.4, x0=3.1),
        optimizer=OptimizerSpec("sgd", 0.05, {}),
        mode=mode,
        steps=150,
        dtype=dtype,
        record=RecordPlan(150, 1),
        update=update,
    )
    first, second = (run_minimize(backend, spec).trajectory for _ in range(2))
    for name in ("steps", "x", "loss", "grad"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name  # bit for bit
    for name in ("final_x", "final_grad"):
        assert (
            np.asarray(getattr(first, name)).tobytes()
            == np.asarray(getattr(second, name)).tobytes()
        )
    assert np.float64(first.final_loss).tobytes() == np.float64(second.final_loss).tobytes()
    assert first.stopped_at == second.stopped_at == 150


@pytest.mark.parametrize("backend_name", ["jax", "tf", "torch"])
def test_a_bare_spec_outside_the_vocabulary_is_refused_as_the_cli_refuses_it(backend_name):
    """Backends are handed specs that never passed the config layer (the benchmark,
    third-party callers): each refuses a bad mode, update or dtype in the CLI's words."""
    from runner.errors import RunnerError
    from runner.problems import Quadratic
    from runner.protocol import MinimizeSpec, OptimizerSpec, RecordPlan

    backend = _backend(backend_name)
    spec = MinimizeSpec(
        problem=Quadratic(),
        optimizer=OptimizerSpec("sgd", 0.01, {}),
        mode="graph",
        steps=10,
        dtype="float32",
        record=RecordPlan(10, 1),
        update="apply",
    )
    assert backend.unsupported(spec) is None
    refused = [
        (
            "mode",
            "warp",
            "mode='warp' is not allowed; choose one of: manual, apply, minimize, graph",
        ),
        (
            "update",
            "sgd",
            "mode.update='sgd' is not allowed; choose one of: apply, minimize, manual",
        ),
        ("dtype", "float16", "dtype='float16' is not allowed; choose one of: float32, float64"),
    ]
    for field, value, reason in refused:
        bad = dataclasses.replace(spec, **{field: value})
        assert backend.unsupported(bad) == reason
        with pytest.raises(RunnerError, match=re.escape(reason)):
            backend.prepare(bad)
    # an eager mode reads no update: a graph-only word there is no reason to refuse
    assert backend.unsupported(dataclasses.replace(spec, mode="manual", update="sgd")) is None


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
@pytest.mark.parametrize("backend_name", ["jax", "tf"])
def test_same_config_twice_is_bit_identical(backend_name, mode, update, dtype) -> None:
    _twice(backend_name, mode, update, dtype)


@pytest.mark.parametrize("mode", ["manual", "apply", "minimize"])
def test_same_config_twice_is_bit_identical_torch_eager(mode: str) -> None:
    _twice("torch", mode, "apply", "float32")


@pytest.mark.slow
@pytest.mark.parametrize("update", ["apply", "minimize", "manual"])
def test_same_config_twice_is_bit_identical_torch_compiled(update: str) -> None:
    _twice("torch", "graph", update, "float32")


# --- credentials never reach params, tags, logs or results.json --------------------------


def test_credentials_are_masked_everywhere(tmp_path: Path, mlflow_server: str) -> None:
    port = mlflow_server.rsplit(":", 1)[1]
    uri = f"http://alice:pw-s3cret-1@127.0.0.1:{port}"
    secrets = ("pw-s3cret-1", "tok-s3cret-2", "env-s3cret-3")
    proc = cli(
        *NUMPY_BACKEND,
        "steps=5",
        f"tracking.uri={uri}",
        "tracking.experiment=secrets",
        "+tracking.api_token=tok-s3cret-2",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_TOKEN": "env-s3cret-3"},
    )
    assert proc.returncode == 0, proc.stderr
    for secret in secrets:
        assert secret not in proc.stdout + proc.stderr
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    wait_for_upload(run_dir)  # the URI went to the upload in its environment, not argv
    for name in ("results.json", "trajectory.csv", "cli.log", "upload.log"):
        text = (run_dir / name).read_text() if (run_dir / name).exists() else ""
        assert not any(s in text for s in secrets), name
    # Hydra writes its own record of the command line verbatim, before the runner starts
    assert "pw-s3cret-1" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    (run,) = all_runs(mlflow_server, "secrets")
    recorded = json.dumps({**run.data.params, **run.data.tags})
    assert not any(s in recorded for s in secrets)
    assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{port}"
    assert run.data.params["tracking.api_token"] == "***"
    client = MlflowClient(mlflow_server)
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    logged = [p for p in local.rglob("*") if p.is_file()]
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "results.json"} <= {
        p.name for p in logged
    }
    for path in logged:
        if path.suffix in (".yaml", ".json", ".csv"):
            assert not any(s in path.read_text() for s in secrets), path.name


def test_mask_text_forms() -> None:
    text = (
        "- tracking.uri=https://bob:pw1@host:5000/x\n"
        "- +db.password=pw2\n"
        "api_token: pw3\n"
        "  nested_secret: 'pw4'\n"
        "override_dirname: steps=3,tracking.api_token=pw5\n"
        "steps: 3\n"
    )
    masked = mask_text(text)
    assert not any(f"pw{i}" in masked for i in range(1, 6))
    assert "steps: 3" in masked and "https://***@host:5000/x" in masked
    import yaml

    assert yaml.safe_load(mask_text("api_token: abc\nn: 1\n")) == {"api_token": "***", "n": 1}


# --- the README's commands bind to loopback ----------------------------------------------


def test_readme_mlflow_commands_bind_to_loopback() -> None:
    readme = (ROOT / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    commands = [
        line
        for line in readme.splitlines()
        if re.search(r"\bmlflow (ui|server)\b", line) and "--" in line  # commands, not prose
    ]
    assert len(commands) >= 2, commands
    for line in commands:
        assert "--host 127.0.0.1" in line, line
    assert "docs/reliability.md" in readme
    assert "python -m runner.upload" in readme


def test_sweep_with_a_failed_job_finishes_the_others_then_exits_non_zero(tmp_path: Path) -> None:
    """A job's bad setting fails that job only; the sweep's exit code then tells a script.
    Divergence is a result of a sweep (an lr search expects some), not a failure."""
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", *NUMPY_BACKEND, "steps=200", "problem.a=1,-1", "optimizer.lr=0.1,1.5",
        "tracking=off", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 4 jobs failed; the first: problem.a"), last
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/results.json"))
    assert statuses == ["diverged", "finished"]

    diverging = cli(
        "-m", *NUMPY_BACKEND, "steps=200", "optimizer.lr=0.1,1.5", "tracking=off",
        f"hydra.sweep.dir={tmp_path / 'lr'}", cwd=tmp_path,
    )  # fmt: skip
    assert diverging.returncode == 0, diverging.stderr


# --- runner.upload: what counts as a run folder, stores that fail, nothing to upload -------

NUMPY = ("backend=numpy", "steps=5")
FOLDER_HINT = "give run folders or sweep folders (outputs/runs/..., outputs/multirun/...)"


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def test_upload_passes_over_mlflow_artifact_copies(tmp_path: Path) -> None:
    """The default store keeps a copy of each logged run's files, results.json included,
    under outputs/mlartifacts/<experiment>/<run id>/artifacts/: not a run folder. An
    upload of outputs/ would log every run a second time (from another folder, into a new
    store there). A run made without .hydra/ (hydra.output_subdir=null) is still one.
    (Uploads in-process, conftest.upload_command: the command's process is
    test_upload_goes_past_a_folder_whose_record_cannot_be_read's.)"""
    from tests.conftest import run_dirs_in

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    logged = cli(*NUMPY, "tracking=off", cwd=start)
    assert logged.returncode == 0, logged.stderr
    (logged_dir,) = run_dirs_in(start)
    # logged to its own (default) store, as its background upload does: a copy in mlartifacts
    recorded = upload_command(str(logged_dir), cwd=start)
    assert recorded.returncode == 0, recorded.stderr
    bare = cli(*NUMPY, "tracking=off", "hydra.output_subdir=null", cwd=start)
    assert bare.returncode == 0, bare.stderr
    outputs = start / "outputs"
    assert len(list((outputs / "mlartifacts").rglob("results.json"))) == 1

    dry = upload_command(str(outputs), "--dry-run", cwd=elsewhere)
    assert dry.returncode == 0, dry.stderr
    assert "mlartifacts" not in dry.stdout, dry.stdout
    # the bare run has no .hydra/hydra.yaml naming its start folder: the store here
    assert last_line(dry.stdout) == "would upload 1, already recorded 1, unreadable 0"

    first = upload_command(str(outputs), cwd=start)
    again = upload_command(str(outputs), cwd=start)  # the bare run's copy is in mlartifacts now
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert last_line(first.stdout) == "uploaded 1, already recorded 1, unreadable 0"
    assert last_line(again.stdout) == "uploaded 0, already recorded 2, unreadable 0"
    assert "mlartifacts" not in first.stdout + again.stdout


def test_upload_goes_past_a_folder_whose_record_cannot_be_read(tmp_path: Path) -> None:
    """A results.json cut short (a full disk, a copy interrupted) or a broken
    .hydra/config.yaml ended the upload in a traceback, and the folders after it were
    never uploaded. Each is one skipped line; the rest are logged; the exit code (2) and
    the last line say that some need a person."""
    runs = tmp_path / "runs"
    for name in ("a", "b", "c"):
        proc = cli(*NUMPY, "tracking=off", f"hydra.run.dir={runs / name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    cut = runs / "a" / "results.json"
    cut.write_text(cut.read_text()[:100])
    (runs / "b" / ".hydra" / "config.yaml").write_text("backend: [\n")
    proc = upload(str(runs), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"skipped {runs / 'a'}: its record cannot be read (" in proc.stdout
    assert f"skipped {runs / 'b'}: its record cannot be read (" in proc.stdout
    assert last_line(proc.stdout) == "uploaded 1, already recorded 0, unreadable 2"
    assert proc.stderr.strip().splitlines() == [
        f"error: 2 run folder(s) could not be read, the first {runs / 'a'}; fix or remove "
        "their results.json / .hydra, then upload them again"
    ]


def test_a_job_uploaded_alone_first_is_nested_in_its_sweep_later(
    tmp_path: Path, fresh_store
) -> None:
    """A copy of a sweep job's folder uploaded by itself is a run without a sweep; the
    sweep's own upload then found it recorded and left it so: `tags.sweep_id` and the
    sweep's report missed that job for good. It is nested under the sweep's parent.
    (Uploads in-process: this process has imported MLflow already.)"""
    import io
    import shutil

    from runner.upload import upload as upload_in_process

    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", *NUMPY[:1], "steps=3,4", "tracking=off", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    alone = tmp_path / "copy"
    shutil.copytree(sweep / "1_numpy_manual", alone)
    uri = fresh_store(tmp_path / "m.db")

    def upload_here(path: Path) -> tuple[str, str]:
        out = io.StringIO()
        outcome = upload_in_process([path], uri, out=out)
        return out.getvalue(), outcome.summary()

    assert upload_here(alone)[1] == "uploaded 1, already recorded 0, unreadable 0"
    said, summary = upload_here(sweep)
    assert "; nested in its sweep now)" in said
    assert summary == "uploaded 1, already recorded 1, unreadable 0"
    runs = all_runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("runner.kind") != "sweep"]
    assert len(jobs) == 2
    for job in jobs:
        assert job.data.tags["sweep_id"] == str(sweep)
        assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
    said, summary = upload_here(sweep)
    assert summary == "uploaded 0, already recorded 2, unreadable 0" and "nested" not in said


def test_an_uploaded_sweeps_parent_spans_its_jobs(tmp_path: Path, fresh_store) -> None:
    """A sweep recorded later (tracking=off, or its store away): the parent the upload
    makes started and ended at upload time, after its children, which are timed from their
    own files. It spans them: from the sweep's start to its last job's end."""
    import io

    from runner.upload import upload as upload_in_process

    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", *NUMPY[:1], "steps=3,4", "tracking=off", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    time.sleep(1.1)  # the upload comes later
    uploaded_at = int(time.time() * 1000)
    uri = fresh_store(tmp_path / "m.db")
    upload_in_process([sweep], uri, out=io.StringIO())
    runs = all_runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("runner.kind") != "sweep"]
    assert parent.info.start_time <= min(j.info.start_time for j in jobs)
    assert parent.info.end_time == max(j.info.end_time for j in jobs) < uploaded_at


def test_upload_to_their_own_stores_goes_past_one_that_is_away(tmp_path: Path, fresh_store) -> None:
    """Runs made with a server that is gone now, and one with an SQLite store: without
    --tracking-uri the dead server is tried once and reported once, at the end, naming
    the runs it held back; the other store's run is uploaded all the same; exit 4.
    (Uploads in-process, conftest.upload_command.)"""
    from tests.conftest import run_dirs_in

    dead = f"http://127.0.0.1:{free_port()}"
    good = fresh_store(tmp_path / "good.db")
    for uri in (dead, good, dead):  # run folders sort by their start time
        proc = cli(*NUMPY, "tracking.enabled=false", f"tracking.uri={uri}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    first_dead, kept, _ = run_dirs_in(tmp_path)

    proc = upload_command(str(tmp_path / "outputs"), cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert last_line(proc.stdout) == "uploaded 1, already recorded 0, unreadable 0, not reached 2"
    assert error_line(proc) == (
        f"error: tracking server {dead} is unreachable (ConnectionRefusedError); start it or "
        f"point --tracking-uri elsewhere; its 2 runs were not uploaded: {first_dead} and 1 more"
    )
    client = MlflowClient(good)
    experiment = client.get_experiment_by_name("gradient-runner")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["run_uid"] == json.loads((kept / "results.json").read_text())["run_uid"]

    # the one store asked for is away: nothing else to try, so it stops at once
    only = upload_command(str(tmp_path / "outputs"), "--tracking-uri", dead, cwd=tmp_path)
    assert only.returncode == 4 and only.stdout == "", only.stdout
    assert error_line(only).endswith("start it or point --tracking-uri elsewhere")


def test_upload_of_no_run_folder_is_an_error_but_of_a_recorded_sweep_is_not(
    tmp_path: Path, capsys
) -> None:
    """An empty folder, a file, a sweep's compare/: "uploaded 0 ... exit 0" read like
    success. A sweep whose jobs are all recorded is a success: already recorded 2.
    (The sweep is recorded by an upload in this process, not by a logger process.)"""
    from runner.upload import main

    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", *NUMPY, "optimizer.lr=0.1,0.2", "tracking=off", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (sweep / "compare").is_dir()
    assert main([str(sweep)]) == 0  # to its own store, the default one
    assert last_line(capsys.readouterr().out) == "uploaded 2, already recorded 0, unreadable 0"
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a folder\n")
    said = {
        tmp_path / "empty": f"no run folders under {tmp_path / 'empty'}",
        tmp_path / "notes.txt": f"{tmp_path / 'notes.txt'} is not a folder",
        sweep / "compare": f"no run folders under {sweep / 'compare'}",
    }
    for path, what in said.items():
        assert main([str(path)]) == 2, path
        assert capsys.readouterr() == ("", f"error: {what}; {FOLDER_HINT}\n")
    assert main([str(sweep), str(tmp_path / "empty")]) == 2  # checked before any upload
    assert "uploaded" not in capsys.readouterr().out

    assert main([str(sweep)]) == 0
    assert last_line(capsys.readouterr().out) == "uploaded 0, already recorded 2, unreadable 0"


class _FailsOnTheFirstRun(_Failing):
    """A store that answers until the upload logs: it holds the experiment and no runs,
    and answers 500 to the creation of a run."""

    answers = (
        HEALTHY,
        (GET_EXPERIMENT, 200, b'{"experiment": {"experiment_id": "1", "name": "gradient-runner"}}'),
        ("/api/2.0/mlflow/runs/search", 200, b"{}"),
    )


def test_upload_failing_midway_in_its_own_store_is_not_counted_uploaded(
    tmp_path: Path, fresh_store
) -> None:
    """A run whose store fails as it is logged was not uploaded: counted `not reached`,
    not both; the run of the other store is uploaded; exit 4. (Uploads in-process,
    conftest.upload_command.)"""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailsOnTheFirstRun)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    failing = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for uri in (failing, fresh_store(tmp_path / "good.db")):
            proc = cli(*NUMPY, "tracking.enabled=false", f"tracking.uri={uri}", cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
        proc = upload_command(str(tmp_path / "outputs"), cwd=tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 4, proc.stderr
    assert last_line(proc.stdout) == "uploaded 1, already recorded 0, unreadable 0, not reached 1"
    assert error_line(proc).startswith(
        f"error: tracking server {failing} is failing (HTTP 500 from /api/2.0/mlflow/runs/create)"
    )
