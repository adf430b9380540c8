"""The real CLI end to end: one subprocess per framework, bad input, divergence."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runner.summary import fmt
from runner.sweep_record import STOPPING_FILE
from tests.conftest import ROOT, cli, ctrl_c, imported, python_code, single_result, wait_for_upload

NOTEBOOK_X = np.float32(0.99999857)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_default_run_is_the_notebook(tmp_path: Path) -> None:
    """`python -m runner`: TF, manual, float32, 1000 steps, tracked in outputs/mlflow.db."""
    proc = cli(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = single_result(tmp_path)
    assert result["backend"] == "tf" and result["mode"] == "manual"
    assert result["dtype"] == "float32" and result["steps"] == 1000
    assert result["device"] == "cpu" and result["device_name"] == "/device:CPU:0"
    assert np.float32(result["x"]) == NOTEBOOK_X
    assert result["loss"] == 0.0
    assert result["optimum"] == {"x": 1.0, "loss": 0.0}
    assert set(result["timings"]) >= {"compile_s", "run_s", "step_us"}
    assert result["timings"]["step_us"] > 0
    assert "tensorflow" in result["versions"] and "python" in result["versions"]
    assert "x = 0.99999857" in proc.stdout and "us/step" in proc.stdout
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    assert f"\nfiles     {run_dir}\n" in proc.stdout
    assert "sgd lr=0.01 momentum=0 nesterov=false\n" in proc.stdout  # as typed, not False
    rows = read_csv(run_dir / "trajectory.csv")
    assert len(rows) == 1001
    assert [int(r["step"]) for r in rows[:3]] == [0, 1, 2] and rows[-1]["step"] == "1000"
    assert float(rows[0]["x"]) == 0.0 and float(rows[0]["grad"]) == -2.0
    assert np.float32(float(rows[-1]["x"])) == NOTEBOOK_X
    assert "MLflow: logging this run to sqlite:///" in proc.stdout  # in the background
    assert "uploaded 1," in wait_for_upload(run_dir)
    assert (tmp_path / "outputs" / "mlflow.db").exists()


def test_the_record_says_which_defaults_ran(tmp_path: Path) -> None:
    """optimizer keeps the settings as asked (None: the framework's default);
    optimizer_used and the summary line say what ran, and whose default it was."""
    proc = cli(
        "backend=numpy", "backend.convention=tf", "optimizer=adagrad", "optimizer.eps=1e-6",
        "steps=20", "tracking=off", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = single_result(tmp_path)
    assert result["optimizer"] == {
        "name": "adagrad", "lr": 0.01, "initial_accumulator": None, "eps": 1e-6
    }  # fmt: skip
    assert result["optimizer_used"] == {
        "convention": "tf", "name": "adagrad", "lr": 0.01, "initial_accumulator": 0.1, "eps": 1e-6
    }  # fmt: skip
    assert "adagrad lr=0.01 initial_accumulator=0.1 (tf default) eps=1e-06\n" in proc.stdout


def test_every_backend_end_to_end(tmp_path: Path) -> None:
    """One multirun per framework keeps imports to one per framework."""
    for backend, modes in (("torch", "manual,minimize"), ("jax", "apply,graph")):
        proc = cli(
            "-m",
            f"backend={backend}",
            f"mode={modes}",
            "steps=1000",
            "tracking=off",
            f"hydra.sweep.dir={tmp_path / backend}",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        results = [json.loads(p.read_text()) for p in (tmp_path / backend).glob("*/results.json")]
        assert sorted(r["mode"] for r in results) == sorted(modes.split(","))
        for result in results:
            assert result["backend"] == backend
            assert abs(result["x"] - 1) < 1e-5


def test_derivatives_task(tmp_path: Path) -> None:
    proc = cli("backend=jax", "task=derivatives", "problem.x0=10", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = single_result(tmp_path)
    assert next((tmp_path / "outputs" / "runs").glob("*/*")).name.endswith("_jax_derivatives")
    assert result["task"] == "derivatives" and result["at"] == 10.0
    assert result["dy_dx"] == 18.0 and result["y"] == 81.0
    assert result["dy_dcoef"] == {"a": 100.0, "b": 10.0, "c": 1.0}
    assert result["d2y_dx2"] == 2.0
    assert result["compiled"] == {"dy_dx": 18.0, "y": 81.0}


def test_divergence_keeps_what_was_computed(tmp_path: Path) -> None:
    proc = cli(
        "backend=jax", "mode=manual", "optimizer.lr=1.5", "steps=500", "tracking=off", cwd=tmp_path
    )
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the loss became inf at step ")
    assert "Traceback" not in proc.stderr
    result = single_result(tmp_path)
    step = result["diverged_at"]
    assert result["status"] == "diverged" and f"step {step} " in line
    # float32 replay of x <- x - lr * (2x - 2): the first step whose loss overflows
    x, lr, two, k = np.float32(0), np.float32(1.5), np.float32(2), 0
    with np.errstate(over="ignore", invalid="ignore"):
        while np.isfinite(x * x - two * x + np.float32(1)):
            x, k = x - lr * (two * x - two), k + 1
    assert step == k
    assert np.float32(result["x"]) == x  # the state at the step it diverged, not later
    # JAX's eager loop, which records on the device, sees the divergence as its chunk
    # ends: step_us is over the steps it executed, which steps_timed says (it was not
    # recorded, and run_s / steps_run read ~8x step_us)
    timed = result["timings"]
    assert timed["steps_timed"] == 500 > result["steps_run"] == step
    assert timed["step_us"] == timed["run_s"] / timed["steps_timed"] * 1e6
    run_dir = next((tmp_path / "outputs" / "runs").glob("*/*"))
    rows = read_csv(run_dir / "trajectory.csv")
    assert int(rows[-2]["step"]) == step - 1 and int(rows[-1]["step"]) == step


def test_numpy_divergence_is_one_line_without_overflow_warnings(tmp_path: Path) -> None:
    """backend=numpy computes in NumPy: each overflowing operation used to print a
    RuntimeWarning before the runner's own line."""
    proc = cli(
        "backend=numpy", "problem=quadratic_form", "problem.dim=8", "optimizer.lr=1.5",
        "steps=200", "tracking=off", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 3
    assert proc.stderr.strip().startswith("error: the loss became inf at step ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


BAD_INPUTS = [
    (["backend=keras"], "backend=keras is not a backend choice; choose one of: jax, numpy, tf"),
    (["mode=fast"], "mode=fast is not a mode choice; choose one of: apply, graph, manual"),
    (["steps=0"], "steps=0 is not allowed; give a whole number >= 1"),
    (["steps=abc"], "steps='abc' is not allowed; give a whole number >= 1"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is not allowed; give a finite number > 0"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' is not allowed; give a finite number > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is not allowed; give a finite number > 0"),
    (["problem.a=0"], "problem.a=0.0: a*x^2 + b*x + c has no minimum unless a > 0"),
    (["problem.a=[1,2]"], "problem.a=[1, 2] must be a number"),
    (["problem.x0=nan"], "problem.x0=nan is not finite"),
    (["problem=quadratic_form", "problem.seed=-1"], "problem.seed=-1 is not allowed; give a whole"),
    (["dtype=float16"], "dtype='float16' is not allowed; choose one of: float32, float64"),
    (["mode=graph", "mode.update=sgd"], "mode.update='sgd' is not allowed; choose one of"),
    (["backend=numpy", "device=cuda"], "device=cuda: NumPy runs on the CPU only"),  # as typed
    # refused before MLflow's run opens: it was logged as a FAILED run
    (["backend=numpy", "device=gpu", "tracking.background=false"], "NumPy runs on the CPU only"),
    (["device=[1]"], "device=[1] is not allowed; choose one of: cpu, gpu, auto"),
    (["backend=numpy", "mode=apply"], "backend=numpy mode=apply: NumPy has no optimizer objects"),
    # the setting first, with its value: the reason blamed the mode (backend=numpy mode=manual:)
    (["backend=numpy", "+backend.foo=1"], "error: backend=numpy: backend.foo=1 is not an option"),
    (["optimizer.nesterov=null"], "optimizer.nesterov=null is not allowed; give true or false"),
    (["tracking.experiment="], "tracking.experiment='' is not allowed; give an experiment name"),
    (["tracking.uri="], "tracking.uri='' is not a store MLflow can log to; give sqlite:///"),
    (["task=derivatives", "mode=graph"], "mode=graph does not apply to task=derivatives"),
    (["-m", "tracking.uri=./mlruns"], "tracking.uri='./mlruns' is not a store MLflow can log"),
    # a setting some of a sweep's choices lack: Hydra's multi-line error, exit 1, an empty
    # sweep folder and no job run; and at the group's default, "choose optimizer=adam"
    (
        ["-m", "optimizer=adam,rmsprop", "optimizer.momentum=0.5"],
        "optimizer.momentum is a setting of optimizer=rmsprop and optimizer=sgd only, not of "
        "optimizer=adam, which this sweep runs; sweep optimizer=rmsprop with it and "
        "optimizer=adam without it",
    ),
    (
        ["-m", "optimizer=adam,adagrad", "optimizer.beta1=0.8,0.9"],  # a setting swept too
        "optimizer.beta1 is a setting of optimizer=adam only, not of optimizer=adagrad,",
    ),
    # settings checked in the run's dtype (float32 by default), not only in float64
    (["backend=numpy", "problem.a=1e-320"], "problem.a=1e-320 is 0 in float32 (its smallest"),
    (["backend=numpy", "problem.a=1e40"], "problem.a=1e+40 overflows float32 (largest 3.4e+38)"),
    (["backend=numpy", "problem.x0=1e39"], "problem.x0=1e+39 overflows float32 (largest 3.4e+38)"),
    (["backend=numpy", "problem.a=1e-40"], "problem=quadratic has its minimum at x* = 1e+40,"),
    # an lr that is 0 in float32 ran with x never moving; inf was a divergence blamed on it
    (["backend=numpy", "optimizer.lr=1e-50"], "optimizer.lr=1e-50 is 0 in float32 (its small"),
    (["backend=numpy", "optimizer.lr=1e39"], "optimizer.lr=1e+39 overflows float32 (largest"),
    (
        ["backend=numpy", "problem=quadratic_form", "problem.cond=1e20"],
        "problem.cond=1e+20 is not allowed; give a condition number from 1 to 1e+12",
    ),
    (
        ["backend=numpy", "problem=quadratic_form", "problem.cond=1e9", "problem.seed=2"],
        "problem=quadratic_form's A is not positive definite once rounded to float32",
    ),
    (["steps=1e3"], "steps=1000.0 is a float; give a whole number >= 1 (write 1000, without"),
    (
        ["backend=numpy", "backend.convention=keras"],
        "backend=numpy: backend.convention='keras' is not allowed; choose one of: tf, ",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not list((tmp_path / "outputs").glob("**/results.json"))
    if "-m" not in args:  # a refused single run leaves no empty run folder (a sweep's job does)
        assert not list((tmp_path / "outputs").glob("runs/*/*")), "an empty run folder is left"
    if "which this sweep runs" in message:  # refused before Hydra: no sweep folder either
        assert not (tmp_path / "outputs" / "multirun").exists()
    assert not list((tmp_path / "outputs").glob("**/upload.log"))
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing logged either


def test_a_bad_store_setting_is_said_before_the_framework_loads(tmp_path: Path) -> None:
    """A mistyped tracking.uri was refused only after TensorFlow's import (~2.5 s)."""
    for bad in ("tracking.uri=", "tracking.experiment="):
        proc = cli("backend=tf", bad, cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert proc.returncode == 2
        imported = [line for line in proc.stderr.splitlines() if line.startswith("import time")]
        assert imported and not [line for line in imported if "| tensorflow" in line]


def test_refused_run_removes_only_the_folders_it_made(tmp_path: Path) -> None:
    """Hydra makes the run folder (and outputs/runs/<date>/) before the job can refuse a
    setting; the refusal removes what this command made, nothing that was there before."""
    proc = cli("backend=numpy", "steps=0", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "outputs").exists()  # the first command here: all of it was new
    (tmp_path / "outputs" / "runs").mkdir(parents=True)
    (tmp_path / "outputs" / "keep.txt").write_text("mine")
    proc = cli("backend=numpy", "steps=0", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["keep.txt", "runs"]
    assert not list((tmp_path / "outputs" / "runs").iterdir())  # its date folder was new
    mine = tmp_path / "mine"  # a folder that existed before the command stays
    mine.mkdir()
    proc = cli("backend=numpy", "steps=0", "tracking=off", f"hydra.run.dir={mine}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert (mine / ".hydra" / "config.yaml").is_file()
    proc = cli("backend=numpy", "steps=3", "tracking=off", cwd=tmp_path)  # a run that ran
    assert proc.returncode == 0, proc.stderr
    assert single_result(tmp_path)["steps"] == 3


@pytest.mark.parametrize(
    ("key", "first", "second", "refusal"),
    [
        (
            "hydra.run.dir", ("steps=11",), ("steps=22",),
            "holds an earlier run (results.json); a run there would replace its files, "
            "logged or not; choose a new folder, or leave hydra.run.dir unset (a new folder "
            "per run)",
        ),
        (
            "hydra.sweep.dir", ("-m", "steps=10,20"), ("-m", "steps=30"),
            "holds an earlier sweep (the results of 2 jobs); a sweep there would mix its jobs "
            "with those in its report, exit code and MLflow record; choose a new folder, or "
            "leave hydra.sweep.dir unset (a new folder per sweep)",
        ),
    ],
    ids=["run", "sweep"],
)  # fmt: skip
def test_a_folder_holding_an_earlier_run_or_sweep_is_refused(
    tmp_path: Path, key: str, first: tuple, second: tuple, refusal: str
) -> None:
    """hydra.run.dir / hydra.sweep.dir naming a folder used before: the second command
    replaced the first's files (a single run's background upload then logged the second
    run under the first's MLflow run), or mixed its jobs into the earlier sweep's report,
    exit code and MLflow record. Refused in one line, before Hydra writes a file there."""
    folder = tmp_path / "used"
    args = ("backend=numpy", "tracking=off", f"{key}={folder}")
    assert cli(*first, *args, cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    proc = cli(*second, *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {key}={folder} {refusal}"]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_two_sweeps_started_in_one_second_get_two_folders() -> None:
    """The default sweep folder was named to the second: two sweeps started together
    (two terminals, a script) wrote their jobs into one folder and one report."""
    from hydra import compose, initialize_config_dir

    import runner.cli  # noqa: F401  (its job_kind resolver names run folders)
    from runner.config import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", ["backend=numpy"], return_hydra_config=True)
    stamp = r"\d{2}-\d{2}-\d{2}-\d{6}"  # to the microsecond, as run folders are named
    assert re.fullmatch(rf"outputs/multirun/[\d-]+/{stamp}", cfg.hydra.sweep.dir)
    assert re.fullmatch(rf"outputs/runs/[\d-]+/{stamp}_numpy_manual", cfg.hydra.run.dir)


def test_loss_not_finite_at_the_start_does_not_blame_the_lr(tmp_path: Path) -> None:
    """x0=1e20 is finite in float32, x0^2 is not: the loss is inf before any update."""
    proc = cli("backend=numpy", "problem.x0=1e20", "steps=5", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: the loss at the starting point is inf in float32, before any update "
        "(step 0 of 5; not the lr's doing): give a problem.x0 nearer the optimum, "
        "or dtype=float64; the trajectory up to step 0 is in "
    ), line
    assert "too large" not in line
    result = single_result(tmp_path)  # what was computed is kept
    assert result["status"] == "diverged" and result["diverged_at"] == 0


def test_help_says_what_the_runner_does(tmp_path: Path) -> None:
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("python -m runner: minimize a problem"), proc.stdout[:200]
    assert (
        "hydra/launcher=parallel" in proc.stdout and "\n\n== Configuration groups ==" in proc.stdout
    )
    assert "backend: jax, numpy, tf, torch\n" in proc.stdout


def test_progress_takes_true_or_false(tmp_path: Path) -> None:
    """(cli() adds progress=false last, which would win over a bad value.)"""
    code = "import sys; sys.argv = ['runner', 'progress=abc']; from runner.cli import main; main()"
    proc = python_code(code, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: progress='abc' is not allowed; give true or false"


def test_missing_framework_names_the_extra(tmp_path: Path) -> None:
    """`sys.modules[name] = None` is how Python itself spells 'this module is absent'."""
    code = (
        "import sys; sys.modules['tensorflow'] = None; "
        "sys.argv = ['runner', 'backend=tf', 'tracking=off']; "
        "from runner.cli import main; main()"
    )
    proc = python_code(code, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: backend=tf needs the module 'tensorflow', which is not installed; "
        "pip install 'gradient-runner[tf]'"
    )


def test_a_one_step_run_says_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """'running 1 steps ...' and 'mode manual, float32, 1 steps' read as slips."""
    from runner.job import _phase_printer

    proc = cli("backend=numpy", "steps=1", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mode      manual, float32, 1 step\n" in proc.stdout
    announce = _phase_printer(True, False, 1)
    assert announce is not None
    announce("run")
    assert capsys.readouterr().err == "running 1 step ...\n"


@pytest.mark.parametrize(
    ("value", "dtype", "text"),
    [
        (0.99999857, "float32", "0.99999857"),
        (-18446744073709551616.0, "float32", "-1.8446744e+19"),  # a diverged x
        (1e-7, "float64", "1e-07"),
        (0.0, "float32", "0"),
        (math.inf, "float32", "inf"),
    ],
)
def test_summary_numbers_are_short_and_read_back_exactly(value, dtype, text) -> None:
    assert fmt(value, dtype) == text
    cast = np.float32 if dtype == "float32" else np.float64
    assert cast(float(text)) == cast(value)


@pytest.mark.parametrize(
    ("step_us", "text"),
    [(1760.4, "1760"), (999.4, "999"), (12.345, "12.3"), (0.0421, "0.0421"), (math.inf, "inf")],
)
def test_step_times_read_without_an_exponent(step_us: float, text: str) -> None:
    """A short run's 1760 us/step read 1.76e+03 in the summary (the comparison table
    already wrote 1760); one function now serves both."""
    from runner.summary import step_time_text

    assert step_time_text(step_us) == text


def test_a_sweep_setting_every_swept_choice_has_is_not_refused() -> None:
    """The override check composed at the group's default (sgd), which lacks eps: `-m
    optimizer=adam,rmsprop optimizer.eps=1e-6` was refused with 'choose optimizer=adagrad
    to use it'. It composes at the first swept choice (and Hydra's sweep gets the setting
    as ++optimizer.eps: test_sweeps)."""
    from runner.precheck import check_overrides

    check_overrides(["-m", "optimizer=adam,rmsprop", "optimizer.eps=1e-6", "backend=numpy"])


@pytest.mark.parametrize(
    "point",
    [
        "hydra",  # runner.cli's imports: no handler yet
        "runner.follow",  # runner.callbacks, as Hydra sets the run up: no job yet
    ],
)
def test_ctrl_c_before_the_job_starts_is_one_line(tmp_path: Path, point: str) -> None:
    """Ctrl-C in the first second (`timeout -s INT 1 python -m runner`) was a traceback:
    through an import before main() installed its handlers, or from its handler while
    main() checked the settings or Hydra set the run up, before the job's own handling."""
    # A run that cannot end first: under load the signal can land later than the import
    # line read (the reader lags the pipe), in the job, which says it in its own words.
    args = ["-m", "runner", "backend=numpy", "steps=2000000000", "tracking=off"]
    proc = ctrl_c(args, tmp_path, imported(point))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.startswith("interrupted") and proc.stderr.count("\n") == 1, proc.stderr


SWALLOWED_AS_IT_IMPORTS = """
import os, signal, time
try:  # a library's bare except, around the line a Ctrl-C lands on
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except BaseException:
    pass
def main():
    return 0
"""


@pytest.mark.parametrize(
    "command",
    [
        # CPython's 'unhandled KeyboardInterrupt' flag stayed set although run_command
        # caught the stop: `python -m` then ended the process by SIGINT (-2), after it had
        # printed `interrupted` (dataclasses exec their methods as Hydra's configs import;
        # test_ctrl_c_before_the_job_starts_is_one_line, flaky under load)
        "def main():\n    exec('raise KeyboardInterrupt')\n",
        # clean-up that the stop cut short raised over it (OmegaConf, building Hydra's
        # configs): a traceback, exit 1
        "def main():\n    try:\n        raise KeyboardInterrupt\n    finally:\n        None.x()\n",
        # swallowed while the command imported: it ran on, exit 0 here (one of ~360
        # early Ctrl-Cs let python -m runner run its 2e9 steps; a stop lost so, or in a
        # garbage-collection callback, is the explanation the code allows)
        SWALLOWED_AS_IT_IMPORTS,
    ],
    ids=["an-exec", "failed-clean-up", "swallowed-as-it-imports"],
)
def test_ctrl_c_deep_in_a_library_is_one_line(tmp_path: Path, command: str) -> None:
    package = tmp_path / "stopped"
    package.mkdir()
    (package / "__main__.py").write_text(
        "from runner.interrupts import run_command\nrun_command('stopped.command')\n"
    )
    (package / "command.py").write_text(command)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    proc = subprocess.run(
        [sys.executable, "-m", "stopped"], env=env, capture_output=True, text=True
    )
    assert (proc.returncode, proc.stderr) == (130, "interrupted\n")


def test_ctrl_c_in_a_parallel_sweep_is_one_line_and_keeps_the_finished_jobs(
    tmp_path: Path,
) -> None:
    """Ctrl-C in a joblib sweep, once job 0 has its results and job 1 is in its loop: the
    launcher printed a 45-line traceback (joblib's _retrieve, then runner.cli._raise_stop)."""
    sweep = tmp_path / "sweep"
    finished = sweep / "0_numpy_manual" / "results.json"

    def ready(lines: list[str]) -> bool:
        return "running 2000000000 steps ..." in lines and finished.exists()

    args = ["-m", "runner", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    args += ["backend=numpy", "steps=20,2000000000", "tracking=off", f"hydra.sweep.dir={sweep}"]
    proc = ctrl_c([*args, "progress=true"], tmp_path, ready)  # progress: the phase line
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "interrupted"
    assert json.loads(finished.read_text())["status"] == "finished"


def test_ctrl_c_in_a_parallel_sweep_with_an_idle_worker_is_one_line(tmp_path: Path) -> None:
    """One job on two workers: the worker that never ran a job printed multiprocessing's
    KeyboardInterrupt traceback (its Ctrl-C was ignored only after a first job)."""
    sweep = tmp_path / "sweep"
    args = ["-m", "runner", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    args += ["backend=numpy", "steps=2000000000", "tracking=off", f"hydra.sweep.dir={sweep}"]

    def ready(lines: list[str]) -> bool:
        return "running 2000000000 steps ..." in lines

    proc = ctrl_c([*args, "progress=true"], tmp_path, ready)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == [
        "running 2000000000 steps ...",
        "interrupted: numpy-manual-float32 steps=2000000000: what was computed is saved",
        "interrupted",
    ], proc.stderr


def test_ctrl_c_in_a_parallel_sweep_waits_for_its_running_jobs_to_save(tmp_path: Path) -> None:
    """joblib killed its workers as soon as the launcher stopped, so a job still writing
    its partial result lost it (under load: no results.json, a .results.json.* temp file).
    Two long jobs with a second of rows each to write, and a third queued behind them: the
    two keep their interrupted results, the third never starts."""
    sweep = tmp_path / "sweep"
    long_jobs = ("2000000000", "2000000001")

    def ready(lines: list[str]) -> bool:
        if not all(f"running {steps} steps ..." in lines for steps in long_jobs):
            return False
        time.sleep(1.5)  # rows enough that writing them takes longer than a kill
        return True

    args = ["-m", "runner", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    args += ["backend=numpy", f"steps={','.join(long_jobs)},20", "record_every=1", "tracking=off"]
    proc = ctrl_c([*args, f"hydra.sweep.dir={sweep}", "progress=true"], tmp_path, ready)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "interrupted: 1 job not started", proc.stderr
    for job in ("0_numpy_manual", "1_numpy_manual"):
        result = json.loads((sweep / job / "results.json").read_text())
        assert result["status"] == "interrupted" and result["steps_run"] > 1000, result
        with (sweep / job / "trajectory.csv").open() as f:
            assert sum(1 for _ in f) == result["steps_run"] + 2  # the header, steps 0..steps_run
    assert not (sweep / "2_numpy_manual").exists()
    assert not (sweep / STOPPING_FILE).exists()


class Writes(io.StringIO):
    """A stream that keeps each write call apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_a_workers_lines_are_whole_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers of a parallel sweep share the terminal, and print wrote a line's text and
    its newline apart: two jobs' phase lines came out as one, `running 20 steps
    ...running 2000000000 steps ...`, and a test waiting for the second line hung."""
    from runner.cli import report
    from runner.errors import RunnerError
    from runner.interrupts import stopped
    from runner.job import _phase_printer

    err = Writes()
    monkeypatch.setattr(sys, "stderr", err)
    _phase_printer(True, True, 20)("run")
    stopped(KeyboardInterrupt(), "job 1: what was computed is saved")
    report(RunnerError("bad"))
    assert err.calls == [
        "running 20 steps ...\n",
        "interrupted: job 1: what was computed is saved\n",
        "error: bad\n",
    ]
