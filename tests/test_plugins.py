"""Backends are found through entry points; a run imports only the framework it uses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.plugins import BACKEND_GROUP
from runner.problems import PROBLEM_GROUP
from tests.conftest import ROOT, cli, python_code, single_result

# A third-party backend in plain NumPy: the whole protocol, nothing borrowed from the core.
PLUGIN_SOURCE = """
import numpy as np
from runner.protocol import Derivatives


class Stepper:
    def __init__(self, spec):
        self.dtype = np.dtype(spec.dtype).type
        self.p = {k: self.dtype(v) for k, v in spec.problem.coefficients.items()}
        self.x, self.problem = self.dtype(spec.problem.x0), spec.problem
        self.lr = self.dtype(spec.optimizer.lr)

    def _grad(self, x):
        return self.dtype(2) * self.p["a"] * x + self.p["b"]

    def step(self, record):
        x = self.x
        loss, grad = self.problem.loss(x, self.p), self._grad(x)
        self.x = x - self.lr * grad
        return loss, x, grad

    def to_numpy(self, values):
        return np.asarray(values)

    def final(self):
        return self.problem.loss(self.x, self.p), self.x, self._grad(self.x)


class AbacusBackend:
    name = "abacus"
    framework = "Abacus"

    def versions(self):
        return {"abacus": "0.1"}

    def resolved_device(self, requested):
        return "cpu"

    def unsupported(self, spec):
        return None if spec.mode == "manual" else "abacus only steps by hand (mode=manual)"

    def prepare(self, spec):
        return Stepper(spec)

    def derivatives(self, spec):
        raise NotImplementedError
"""


def install_plugin(
    site: Path,
    module: str = "abacus_backend",
    source: str = PLUGIN_SOURCE,
    entry_point: str = f"[{BACKEND_GROUP}]\nabacus = abacus_backend:AbacusBackend\n",
) -> None:
    """What `pip install abacus-backend` leaves behind: a module and its dist-info."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist = site / f"{module}-0.1.dist-info"
    dist.mkdir()
    name = module.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_point)


def test_a_backend_name_two_packages_install_is_refused(tmp_path: Path) -> None:
    """Two packages claiming backend=twin: one won in sys.path order, silently, and its
    runs were recorded as backend=twin, whichever it was."""
    site = tmp_path / "site"
    site.mkdir()
    for module in ("twin_a", "twin_b"):
        install_plugin(
            site, module, entry_point=f"[{BACKEND_GROUP}]\ntwin = {module}:AbacusBackend\n"
        )
    proc = cli(
        "backend=twin",
        "steps=3",
        "tracking=off",
        cwd=tmp_path,
        env={"PYTHONPATH": f"{ROOT}:{site}"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: backend=twin is installed by 2 packages: 'twin_a:AbacusBackend' (twin-a), "
        "'twin_b:AbacusBackend' (twin-b); uninstall all but one"
    )


def test_installed_plugin_is_discovered_and_runs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    proc = cli("backend=abacus", "steps=1000", "tracking=off", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    result = single_result(tmp_path)
    assert result["backend"] == "abacus" and result["framework"] == "Abacus"
    assert result["x"] == float(__import__("numpy").float32(0.99999857))

    refused = cli("backend=abacus", "mode=apply", "tracking=off", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: backend=abacus mode=apply: abacus only steps by hand (mode=manual)"
    )
    listed = cli("backend=nope", cwd=tmp_path, env=env)
    assert "choose one of: abacus, jax, numpy, tf, torch" in listed.stderr


def test_a_run_builds_its_backend_once_and_a_refusal_names_the_setting_refused(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    built = tmp_path / "built.txt"
    counted = PLUGIN_SOURCE.replace(
        'framework = "Abacus"',
        f'framework = "Abacus"\n    def __init__(self):\n'
        f'        open({str(built)!r}, "a").write("built\\n")',
    ).replace(
        'return None if spec.mode == "manual"',
        'if spec.optimizer.name != "sgd":\n'
        '            return f"optimizer={spec.optimizer.name}: abacus steps sgd only"\n'
        '        return None if spec.mode == "manual"',
    )
    install_backend(site, "counted", counted)
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    proc = cli("backend=counted", "steps=3", "tracking=off", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert built.read_text() == "built\n"  # checked and run by the one instance
    refused = cli("backend=counted", "optimizer=adam", "tracking=off", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    # the mode is not what was refused: not named
    assert refused.stderr.strip() == "error: backend=counted: optimizer=adam: abacus steps sgd only"


@pytest.mark.parametrize(
    ("backend", "framework"), [("jax", "jax"), ("tf", "tensorflow"), ("torch", "torch")]
)
def test_a_run_imports_only_its_framework(tmp_path: Path, backend: str, framework: str) -> None:
    # TensorFlow's own import would pull in JAX (tensorflow.lite); the TF backend keeps it
    # out. An eager torch run never imports Dynamo (~1 s), which only compiling needs, nor
    # Optuna (the search's sweeper is registered, not built) or MLflow (its upload does).
    code = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print('LOADED', json.dumps(sorted(\n"
        "    m for m in ('tensorflow', 'torch', 'torch._dynamo', 'jax', 'optuna', 'mlflow')\n"
        "    if m in sys.modules))))\n"
        f"sys.argv = ['runner', 'backend={backend}', 'steps=10', 'progress=false']\n"
        "from runner.cli import main\n"
        "main()\n"
    )
    proc = python_code(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.split("LOADED", 1)[1])
    assert loaded == [framework]


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, runner.cli, runner.job, runner.tracking, runner.callbacks\n"
        "print(sorted(m for m in ('tensorflow', 'torch', 'jax') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# A third-party problem: (x - s)^2 summed, minimum 0 at x = s; its settings are its fields.
PROBLEM_SOURCE = """
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Shifted:
    s: float = 3.0
    x0: float = 0.0
    dim: int | None = None
    name: ClassVar[str] = "shifted"

    @property
    def coefficients(self):
        return {"s": float(self.s)}

    def x0_array(self):
        return np.asarray(float(self.x0))

    def loss(self, x, p, ops=None):
        return (x - p["s"]) ** 2

    def grad(self, x):
        return 2 * (x - self.s)

    def optimum(self):
        return float(self.s), 0.0
"""


def test_an_installed_problem_plugin_is_a_choice_with_its_settings(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    entry_point = f"[{PROBLEM_GROUP}]\nshifted = shifted_problem:Shifted\n"
    install_plugin(site, "shifted_problem", PROBLEM_SOURCE, entry_point)
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    proc = cli(
        "backend=numpy", "problem=shifted", "problem.s=5", "optimizer.lr=0.5", "steps=3",
        "tracking=off", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = single_result(tmp_path)
    assert result["problem"] == {"name": "shifted", "s": 5.0, "x0": 0.0, "dim": None}
    assert result["x"] == 5.0  # lr = 1/2: one step to x* = s
    listed = cli("problem=nope", cwd=tmp_path, env=env)
    assert "choose one of: quadratic, quadratic_form, rosenbrock, shifted" in listed.stderr
    # installed under another name than the class gives: its records named a problem
    # the user never chose (`problem=moved` recorded as "shifted")
    install_plugin(
        site, "moved_problem", PROBLEM_SOURCE, f"[{PROBLEM_GROUP}]\nmoved = moved_problem:Shifted\n"
    )
    moved = cli("backend=numpy", "problem=moved", "steps=3", "tracking=off", cwd=tmp_path, env=env)
    assert moved.returncode == 2
    assert moved.stderr.strip() == (
        "error: problem=moved: its plugin 'moved_problem:Shifted' calls itself 'shifted'; "
        "its name must be the one it is installed as, 'moved'"
    )


def test_a_problem_that_sets_a_protocol_attribute_as_it_is_built_runs(tmp_path: Path) -> None:
    """coefficients set in __post_init__, not a property: the protocol check read the class
    and refused a problem whose every instance has them."""
    site = tmp_path / "site"
    site.mkdir()
    prop = '    @property\n    def coefficients(self):\n        return {"s": float(self.s)}\n'
    built = (
        "    def __post_init__(self):\n"
        '        object.__setattr__(self, "coefficients", {"s": float(self.s)})\n'
    )
    source = PROBLEM_SOURCE.replace(prop, built).replace('"shifted"', '"built"')
    assert source != PROBLEM_SOURCE
    install_plugin(
        site, "built_problem", source, f"[{PROBLEM_GROUP}]\nbuilt = built_problem:Shifted\n"
    )
    proc = cli(
        "backend=numpy", "problem=built", "optimizer.lr=0.5", "steps=3", "tracking=off",
        cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{site}"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert single_result(tmp_path)["x"] == 3.0  # lr = 1/2: one step to x* = s


def install_backend(site: Path, name: str, source: str, target: str = "AbacusBackend") -> None:
    """A backend plugin `name` in its own module, its entry point naming `target` there."""
    module = f"{name}_backend"
    install_plugin(site, module, source, f"[{BACKEND_GROUP}]\n{name} = {module}:{target}\n")


def test_a_broken_backend_plugin_fails_its_jobs_in_one_line_and_the_sweep_goes_on(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    install_backend(site, "noclass", PLUGIN_SOURCE, target="Nope")
    install_backend(site, "syntax", "x = = 1\n")
    install_backend(site, "badimport", "from runner.protocol import Nothing\n")
    install_backend(site, "partial", PLUGIN_SOURCE.replace("def unsupported(", "def _gone("))
    busy = "raise RuntimeError('abacus device is busy')"
    install_backend(site, "busy", PLUGIN_SOURCE.replace("return Stepper(spec)", busy))
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    sweep = tmp_path / "sweep"
    backends = "abacus,noclass,syntax,badimport,partial,busy"
    proc = cli(
        "-m", f"backend={backends}", "steps=3", "tracking=off", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr
    loading = "its plugin '{}_backend:{}' failed to load: "
    lines = proc.stderr.strip().splitlines()
    busy_line = (  # a single run's; a sweep's names its job first
        "error: backend=busy failed: RuntimeError: abacus device is busy "
        "(HYDRA_FULL_ERROR=1 shows the traceback)"
    )
    assert lines[0] == (
        "error: noclass-manual-float32 steps=3: backend=noclass: "
        + loading.format("noclass", "Nope")
        + "AttributeError: module 'noclass_backend' has no attribute 'Nope'"
    )  # fmt: skip
    assert lines[1].startswith(
        "error: syntax-manual-float32 steps=3: backend=syntax: "
        + loading.format("syntax", "AbacusBackend")
        + "SyntaxError: "
    )
    assert lines[2] == (
        "error: badimport-manual-float32 steps=3: backend=badimport: "
        + loading.format("badimport", "AbacusBackend")
        + f"ImportError: cannot import name 'Nothing' from 'runner.protocol' "
        f"({ROOT / 'runner' / 'protocol.py'})"
    )  # fmt: skip
    assert lines[3] == (
        "error: partial-manual-float32 steps=3: backend=partial: its plugin "
        "'partial_backend:AbacusBackend' lacks "
        "unsupported(), which runner.protocol.Backend requires (all: name, framework, "
        "versions(), resolved_device(), unsupported(), prepare(), derivatives())"
    )
    assert lines[4] == busy_line.replace("error: ", "error: busy-manual-float32 steps=3: ", 1)
    first = lines[0].removeprefix("error: noclass-manual-float32 steps=3: ")  # job's name
    assert lines[5] == f"error: 5 of 6 jobs failed; the first: {first}"
    assert len(lines) == 6 and proc.returncode == 2  # the installation is what is wrong
    failures = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/job_failure.json")}
    assert {k: v["exit_code"] for k, v in failures.items()} == {
        "1_noclass_manual": 2, "2_syntax_manual": 2, "3_badimport_manual": 2,
        "4_partial_manual": 2, "5_busy_manual": 1,
    }  # fmt: skip
    assert json.loads((sweep / "0_abacus_manual" / "results.json").read_text())["steps_run"] == 3
    assert (sweep / "compare" / "comparison.json").exists()  # the sweep reached its report

    code = (
        "import sys\n"
        "sys.argv = ['runner', 'backend=busy', 'tracking=off', 'progress=false']\n"
        "from runner.cli import main\n"
        "main()\n"
    )
    single = python_code(code, tmp_path, env={**env, "HYDRA_FULL_ERROR": "1"})
    assert single.returncode == 1  # a run that failed, not bad input
    assert "Traceback" in single.stderr and "in prepare\n" in single.stderr
    assert single.stderr.strip().splitlines()[-1] == busy_line


def test_a_single_run_a_plugin_fails_is_logged_failed_by_its_background_upload(
    tmp_path: Path,
) -> None:
    """A plugin that raised mid-run (tracking.background, the default) left no record in
    its folder (no results.json, no job_failure.json): its upload never started, and the
    run was in no store, where tracking.background=false logs it FAILED and a sweep's
    job is logged FAILED too. It is recorded as a sweep job's failure and uploaded."""
    from mlflow import MlflowClient

    from tests.conftest import run_dirs_in, wait_for_upload

    site = tmp_path / "site"
    site.mkdir()
    busy = "raise RuntimeError('abacus device is busy')"
    install_backend(site, "busy", PLUGIN_SOURCE.replace("return Stepper(spec)", busy))
    proc = cli("backend=busy", "steps=3", cwd=tmp_path, env={"PYTHONPATH": f"{ROOT}:{site}"})
    assert proc.returncode == 1, proc.stderr
    error = "backend=busy failed: RuntimeError: abacus device is busy"
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {error}")
    (run_dir,) = run_dirs_in(tmp_path)
    failure = json.loads((run_dir / "job_failure.json").read_text())
    assert failure["exit_code"] == 1 and failure["error"].startswith(error)
    assert "uploaded 1, already recorded 0, unreadable 0" in wait_for_upload(run_dir)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gradient-runner").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith(error)
    assert (
        run.data.tags["run_uid"] == failure["run_uid"] and run.data.params["backend.name"] == "busy"
    )
    # tracking=off: on record too, for the upload its user runs later
    off = tmp_path / "off"
    off.mkdir()
    proc = cli(
        "backend=busy", "steps=3", "tracking=off", cwd=off, env={"PYTHONPATH": f"{ROOT}:{site}"}
    )
    assert proc.returncode == 1, proc.stderr
    (off_dir,) = run_dirs_in(off)
    assert json.loads((off_dir / "job_failure.json").read_text())["error"].startswith(error)


BROKEN_PROBLEM = f"[{PROBLEM_GROUP}]\nbroken = broken_problem:Broken\n"


def test_a_broken_problem_plugin_fails_only_the_runs_that_choose_it(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, "broken_problem", "import no_such_module_here\n", BROKEN_PROBLEM)
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    other = cli("backend=numpy", "steps=3", "tracking=off", cwd=tmp_path, env=env)
    assert other.returncode == 0, other.stderr
    chosen = cli(
        "-m", "backend=numpy", "problem=quadratic,broken", "steps=3", "tracking=off",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert chosen.returncode == 2
    assert chosen.stderr.strip() == (
        "error: problem=broken: its plugin 'broken_problem:Broken' failed to load: "
        "ModuleNotFoundError: No module named 'no_such_module_here'"
    )
    assert not (tmp_path / "outputs" / "multirun").exists()  # refused before any job
    # half-written: no grad(); it failed in the backend's loop as "backend=numpy failed"
    source = PROBLEM_SOURCE.replace("def grad(", "def _gone(").replace('"shifted"', '"nograd"')
    install_plugin(
        site, "nograd_problem", source, f"[{PROBLEM_GROUP}]\nnograd = nograd_problem:Shifted\n"
    )
    partial = cli(
        "backend=numpy", "problem=nograd", "steps=3", "tracking=off", cwd=tmp_path, env=env
    )
    assert partial.returncode == 2
    every = "name, dim, coefficients, x0_array(), loss(), grad(), optimum()"
    assert partial.stderr.strip() == (
        "error: problem=nograd: its plugin 'nograd_problem:Shifted' lacks grad(), which "
        f"runner.problems.Problem requires (all: {every})"
    )
    # a property of the protocol: it failed in the backend, as `backend=numpy failed:
    # AttributeError: ... no attribute 'coefficients'`
    source = PROBLEM_SOURCE.replace("def coefficients(", "def _gone(").replace(
        '"shifted"', '"nocoef"'
    )
    install_plugin(
        site, "nocoef_problem", source, f"[{PROBLEM_GROUP}]\nnocoef = nocoef_problem:Shifted\n"
    )
    lacking = cli(
        "backend=numpy", "problem=nocoef", "steps=3", "tracking=off", cwd=tmp_path, env=env
    )
    assert lacking.returncode == 2
    assert lacking.stderr.strip() == (
        "error: problem=nocoef: its plugin 'nocoef_problem:Shifted' lacks coefficients, which "
        f"runner.problems.Problem requires (all: {every})"
    )


def test_a_step_that_raises_mid_run_keeps_the_steps_before_it(tmp_path: Path) -> None:
    """A plugin's step raising at step 5 of 8 (a framework's out-of-memory at step 10^6)
    threw away every step computed before it: the folder held job_failure.json alone.
    The run still fails as before, in one line, exit 1; trajectory.csv keeps steps 0-4,
    the same rows a run that stops there on its own records."""
    import csv

    site = tmp_path / "site"
    site.mkdir()
    old_step = "    def step(self, record):\n"
    raising = (
        old_step
        + "        self.taken = getattr(self, 'taken', 0) + 1\n"
        + "        if self.taken == 6:\n"
        + "            raise MemoryError('abacus ran out of beads')\n"
    )
    source = PLUGIN_SOURCE.replace(old_step, raising)
    assert source != PLUGIN_SOURCE
    install_backend(site, "fragile", source)
    install_plugin(site)  # abacus, the same plugin whose step does not raise
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    proc = cli("backend=fragile", "steps=8", "tracking=off", cwd=tmp_path / "a", env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: backend=fragile failed: MemoryError: abacus ran out of beads "
        "(HYDRA_FULL_ERROR=1 shows the traceback)"
    )
    (run_dir,) = (tmp_path / "a" / "outputs" / "runs").glob("*/*")
    assert (run_dir / "job_failure.json").exists() and not (run_dir / "results.json").exists()
    assert "kept      5 recorded steps before the error" in proc.stdout
    with (run_dir / "trajectory.csv").open() as f:
        kept = list(csv.DictReader(f))
    whole = cli("backend=abacus", "steps=5", "tracking=off", cwd=tmp_path / "b", env=env)
    assert whole.returncode == 0, whole.stderr
    with next((tmp_path / "b" / "outputs" / "runs").glob("*/*/trajectory.csv")).open() as f:
        expected = list(csv.DictReader(f))[:-1]  # less the final state's row
    assert kept == expected and [row["step"] for row in kept] == ["0", "1", "2", "3", "4"]


def test_a_backend_declines_derivatives_with_not_implemented_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)  # its derivatives() raises NotImplementedError
    env = {"PYTHONPATH": f"{ROOT}:{site}"}
    single = cli("backend=abacus", "task=derivatives", "tracking=off", cwd=tmp_path, env=env)
    assert single.returncode == 2
    assert single.stderr.strip() == "error: backend=abacus does not implement task=derivatives"
    assert not (tmp_path / "outputs").exists()  # refused: no folder, no record left
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=abacus,numpy,jax", "task=derivatives", "tracking=off",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # a hole in the matrix, as NumPy's, not a failure
    line = "skipped: abacus-derivatives-float32: backend=abacus does not implement task=derivatives"
    assert line in proc.stderr
    assert "Traceback" not in proc.stderr and not list(sweep.glob("*/job_failure.json"))
    # on record as a minimize job the backend declines: the report's header and list
    # counted them nowhere ("1 finished, 1 row"), MLflow had no run of them
    skipped = json.loads((sweep / "0_abacus_derivatives" / "results.json").read_text())
    assert (skipped["task"], skipped["status"]) == ("derivatives", "skipped")
    assert skipped["reason"] == "backend=abacus does not implement task=derivatives"
    assert f"sweep {sweep}; 1 finished, 2 skipped, 1 row" in proc.stdout
    assert "skipped: abacus derivatives: backend=abacus does not implement" in proc.stdout
    assert (
        "skipped: numpy derivatives: backend=numpy has no automatic differentiation" in proc.stdout
    )
    # plugins whose answers the runner cannot use, each refused in one line (exit 2)
    misfits = [
        (  # dy/d(coefficient) for other names than the problem's: a KeyError in the
            # runner's own comparison with the analytic values
            "partial",
            (
                "raise NotImplementedError",
                "return Derivatives(4.0, 4.0, {'a': 9.0, 'x0': 1.0}, 2.0, 4.0, 4.0)",
            ),
            "task=derivatives",
            "derivatives() gave dy_dcoef for a, x0; the problem's coefficients are a, b, c",
        ),
        (  # a version that is not a string reached the MLflow tags as 'None'
            "unversioned",
            ('{"abacus": "0.1"}', '{"abacus": None}'),
            "steps=3",
            "versions() must map framework names to version strings; it gave {'abacus': None}",
        ),
    ]
    for name, (old, new), setting, message in misfits:
        source = PLUGIN_SOURCE.replace(old, new)
        assert source != PLUGIN_SOURCE
        install_backend(site, name, source)
        refused = cli(f"backend={name}", setting, "tracking=off", cwd=tmp_path, env=env)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip() == f"error: backend={name}: {message}"
