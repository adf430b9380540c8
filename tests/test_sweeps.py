"""Sweeps at scale, end to end: real launchers (joblib, submitit_local), the Optuna sweeper,
skipped combinations, the matrix preset and a real `mlflow server`. No mocks: every test runs
`python -m runner` in a subprocess with tiny step counts and reads back what MLflow holds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tests.conftest import ROOT, cli, python_code, upload_command


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def sweep_args(tmp_path: Path, uri: str | None = None) -> list[str]:
    """Keep the sweep folder and the MLflow store inside tmp_path."""
    return [f"hydra.sweep.dir={tmp_path / 'sweep'}", f"tracking.uri={uri or store(tmp_path)}"]


def sweep_group(uri: str, experiment: str = "gradient-runner") -> tuple[Any, list[Any]]:
    """The sweep's one parent run and its job runs (the comparison run is neither)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    (parent,) = parents
    jobs = [r for r in runs if "runner.kind" not in r.data.tags]
    for job in jobs:
        assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert job.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        # the parent starts with the sweep: the sweep's logger made it, niced, as late as
        # after its last job, so it sorted among its own children
        assert parent.info.start_time <= job.info.start_time
    return parent, jobs


def job_results(sweep_dir: Path) -> dict[str, dict]:
    """results.json of every job, by job folder name (`<num>_<backend>_<mode>`)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}


JAX_IMPORT_ENV = {"TF_CPP_MIN_LOG_LEVEL", "TPU_SKIP_MDS_QUERY"}


def is_float32(value: float) -> bool:
    return float(np.float32(value)) == value


class WorkerProbe(Callback):
    """Added to a sweep with `+hydra.callbacks.probe._target_=tests.test_sweeps.WorkerProbe`.

    Runs inside the worker process around each job and writes, into the job's folder, the
    process id and the process-wide state the job found at its start and left at its end.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config, "start")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self._write(config, "end")

    @staticmethod
    def _write(config: DictConfig, when: str) -> None:
        mlflow = sys.modules.get("mlflow")
        active = mlflow.active_run() if mlflow is not None else None
        jax = sys.modules.get("jax")
        state = {
            "pid": os.getpid(),
            "mlflow_imported": mlflow is not None,
            "active_run": active.info.run_id if active is not None else None,
            "x64": bool(jax.config.jax_enable_x64) if jax is not None else None,
            "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            "env": dict(os.environ),
        }
        path = Path(config.hydra.runtime.output_dir) / f"probe_{when}.json"
        path.write_text(json.dumps(state))


def test_parallel_preset_jobs_in_a_reused_worker_start_clean(tmp_path: Path) -> None:
    """Two loky workers, four jobs: float64 jobs first, so the float32 jobs land in workers
    that already ran a float64 job (JAX's x64 switch is process-wide). Each job logs itself
    in-process here (tracking.background=false), so MLflow state could leak between jobs."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = cli(
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "tracking.background=false",
        "backend=jax",
        "mode=apply",
        "dtype=float64,float32",
        "optimizer.lr=0.01,0.02",
        "steps=50",
        "+hydra.callbacks.probe._target_=tests.test_sweeps.WorkerProbe",
        *sweep_args(tmp_path),
        cwd=tmp_path,
        progress=True,  # as users run it: each job builds its progress bar
    )
    assert proc.returncode == 0, proc.stderr
    # the workers are stopped at the sweep's end: none may leave a semaphore behind for
    # multiprocessing's resource tracker to warn about (tqdm's default lock made one)
    assert "leaked" not in proc.stderr, proc.stderr
    sweep_dir = tmp_path / "sweep"
    results = job_results(sweep_dir)
    assert sorted(results) == ["0_jax_apply", "1_jax_apply", "2_jax_apply", "3_jax_apply"]
    probes = {
        name: {
            w: json.loads((sweep_dir / name / f"probe_{w}.json").read_text())
            for w in ("start", "end")
        }
        for name in results
    }
    pids = {p["start"]["pid"] for p in probes.values()}
    assert len(pids) <= 2 and os.getpid() not in pids  # two loky workers, not this process
    assert all(p["start"]["pid"] == p["end"]["pid"] for p in probes.values())
    # a worker between jobs ignores Ctrl-C (the launcher stops the sweep): one idle in
    # joblib's loop printed multiprocessing's KeyboardInterrupt traceback (CI, under load)
    assert {p["end"]["sigint_ignored"] for p in probes.values()} == {True}
    # no MLflow active run in any job, at its start or left behind at its end
    assert {p["end"]["mlflow_imported"] for p in probes.values()} == {True}  # jobs logged
    assert {p[w]["active_run"] for p in probes.values() for w in ("start", "end")} == {None}
    # a job changes no environment variable for the next one; only importing JAX sets two
    # (jax/_src/cloud_tpu_init.py), and those the worker would have anyway for a JAX job
    for name, probe in probes.items():
        start, end = probe["start"]["env"], probe["end"]["env"]
        changed = {k for k in start.keys() | end.keys() if start.get(k) != end.get(k)}
        assert changed <= JAX_IMPORT_ENV, (name, changed)

    # a float32 job that started with x64 already on (left by a float64 job) stays float32
    inherited = [n for n in ("2_jax_apply", "3_jax_apply") if probes[n]["start"]["x64"]]
    assert inherited, "no float32 job ran in a worker after a float64 job"
    for name, result in results.items():
        expected = "float64" if name in ("0_jax_apply", "1_jax_apply") else "float32"
        assert result["status"] == "finished" and result["dtype"] == expected, (name, result)
    for name in ("2_jax_apply", "3_jax_apply"):
        result = results[name]
        assert is_float32(result["x"]) and is_float32(result["loss"]), (name, result)
        rows = np.genfromtxt(sweep_dir / name / "trajectory.csv", delimiter=",", names=True)
        assert all(is_float32(v) for v in rows["x"]), name
    # and the float64 jobs are float64: x_k = 1 - (1 - 2 lr)^k to 1e-12
    for name in ("0_jax_apply", "1_jax_apply"):
        overrides = yaml.safe_load((sweep_dir / name / ".hydra" / "overrides.yaml").read_text())
        lr = float(dict(o.split("=", 1) for o in overrides)["optimizer.lr"])
        assert results[name]["x"] == pytest.approx(1 - (1 - 2 * lr) ** 50, rel=1e-12, abs=0)

    # one MLflow run per job, each with its own params and its own numbers
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FINISHED"
    assert len(jobs) == 4 and {r.info.status for r in jobs} == {"FINISHED"}
    assert len({r.info.run_id for r in jobs}) == 4
    by_config = {(r.data.params["dtype"], r.data.params["optimizer.lr"]): r for r in jobs}
    assert sorted(by_config) == [
        ("float32", "0.01"),
        ("float32", "0.02"),
        ("float64", "0.01"),
        ("float64", "0.02"),
    ]
    for name, result in results.items():
        overrides = yaml.safe_load((sweep_dir / name / ".hydra" / "overrides.yaml").read_text())
        config = dict(o.split("=", 1) for o in overrides)
        run = by_config[(config["dtype"], config["optimizer.lr"])]
        assert run.data.tags["dtype"] == result["dtype"] == config["dtype"]
        assert run.data.metrics["final_x"] == result["x"]
        assert f"optimizer.lr={config['optimizer.lr']}" in run.data.tags["overrides"]


def test_submitit_local_sweep_records_both_jobs(tmp_path: Path) -> None:
    """`hydra/launcher=local`: the SLURM code path (pickled jobs, own processes), no cluster.
    NumPy: each job's process imports its framework, and the launcher is the same for all."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = cli(
        "-m",
        "hydra/launcher=local",
        "backend=numpy",
        "optimizer.lr=0.01,0.02",
        "steps=20",
        *sweep_args(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    sweep_dir = tmp_path / "sweep"
    results = job_results(sweep_dir)
    assert sorted(results) == ["0_numpy_manual", "1_numpy_manual"]
    assert {r["status"] for r in results.values()} == {"finished"}
    assert len(list((sweep_dir / ".submitit").glob("*_0_result.pkl"))) == 2, "not run by submitit"
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["optimizer.lr"] for r in jobs) == ["0.01", "0.02"]
    assert {r.info.status for r in jobs} == {"FINISHED"}
    by_lr = {"0.01": results["0_numpy_manual"], "0.02": results["1_numpy_manual"]}
    for run in jobs:
        assert run.data.metrics["final_x"] == by_lr[run.data.params["optimizer.lr"]]["x"]


def test_a_setting_every_swept_choice_has_is_set_though_the_default_lacks_it(
    tmp_path: Path,
) -> None:
    """Hydra composes a sweep's base config at the group's default: `-m
    optimizer=adagrad,rmsprop optimizer.eps=0.001` ended in its multi-line error, exit 1,
    no job run, SGD having no eps (a numerics review). Each job now runs with the eps."""
    from runner.naming import shown_overrides

    args = ["-m", "backend=numpy", "optimizer=adagrad,rmsprop", "optimizer.eps=0.001"]
    proc = cli(*args, "steps=5", "tracking=off", *sweep_args(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    used = [r["optimizer"] for _, r in sorted(job_results(tmp_path / "sweep").items())]
    assert [(o["name"], o["eps"]) for o in used] == [("adagrad", 0.001), ("rmsprop", 0.001)]
    assert shown_overrides(["++optimizer.eps=0.001"]) == ["optimizer.eps=0.001"]  # its name


def test_a_sweep_without_a_row_still_lists_each_job_and_why(tmp_path: Path) -> None:
    """Every job skipped or failed: no table to compare, but the lines a report lists
    below its table are printed all the same (they were on stderr only, among the jobs')."""
    proc = cli(
        "-m", "backend=numpy", "mode=apply,graph", "steps=5", "tracking=off",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # skipped jobs are holes, not failures
    listed = [line for line in proc.stdout.splitlines() if line.startswith("skipped")]
    assert listed == [  # one reason: one line (runner.compare.holes.hole_lines)
        "skipped, 2 jobs (numpy apply, numpy graph/apply): NumPy has no optimizer objects or "
        "compiler; only mode=manual is defined"
    ]
    assert "no comparison report: " in proc.stderr


def test_optuna_search_whose_every_trial_diverges_ends_with_its_report(tmp_path: Path) -> None:
    """A diverged trial is loss inf to Optuna (a completed, worst trial): with no value
    the sweeper counted it failed, and when every trial diverged it ended in a traceback
    (`No trials are completed yet`) with no comparison report."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cli(
        "+hparams_search=lr", "backend=numpy", "steps=200", "hydra.sweeper.n_trials=3",
        "optimizer.lr=tag(log, interval(2, 100))", "tracking=off", "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # diverged runs are results, not failures
    assert "Traceback" not in proc.stderr and "Failed experiment" not in proc.stderr
    diverged = [line for line in proc.stderr.splitlines() if line.startswith("diverged: ")]
    assert len(diverged) == 3 and "the loss became " in diverged[0], proc.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == math.inf
    assert "; 0 finished, 3 diverged, 3 rows" in proc.stdout, proc.stdout  # the report


def test_optuna_lr_search_improves_and_is_one_group(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cli(
        "+hparams_search=lr",
        "backend=jax",
        "steps=5",
        "hydra.sweeper.n_trials=6",
        "hydra.sweep.dir=sweep",  # relative: the group is its absolute path all the same
        f"tracking.uri={store(tmp_path)}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "alembic" not in proc.stdout + proc.stderr  # Optuna imports it under Hydra's INFO
    sweep_dir = tmp_path / "sweep"
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    results = job_results(sweep_dir)
    assert len(results) == 6
    first = results["0_jax_manual"]
    assert best["best_value"] < first["loss"]
    # every trial is in MLflow, in one sweep group, with the lr Optuna chose for it
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FINISHED"
    assert len(jobs) == 6 and {r.info.status for r in jobs} == {"FINISHED"}
    assert {r.data.tags["sweep_id"] for r in jobs} == {sweep_dir.as_posix()}
    assert len({r.info.run_name for r in jobs}) == 6  # each trial's lr in its name
    lrs = sorted(float(r.data.params["optimizer.lr"]) for r in jobs)
    assert lrs == sorted(r["optimizer"]["lr"] for r in results.values())
    assert len(set(lrs)) == 6 and all(1e-3 <= lr <= 1 for lr in lrs)
    best_run = min(jobs, key=lambda r: r.data.metrics["final_loss"])
    assert best_run.data.metrics["final_loss"] == best["best_value"]
    assert float(best_run.data.params["optimizer.lr"]) == best["best_params"]["optimizer.lr"]


def lr_search(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m runner +hparams_search=lr ...` into tmp_path/sweep, tracking off."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    return cli("+hparams_search=lr", *overrides, "tracking=off", sweep, cwd=tmp_path)


@pytest.mark.slow  # 20 trials: ~35 s on 2 busy cores
def test_optuna_default_search_finds_the_one_step_lr(tmp_path: Path) -> None:
    """a = 1: lr = 1/(2a) = 0.5 reaches the optimum in one step; 20 seeded TPE trials find it."""
    proc = lr_search(tmp_path, "backend=jax", "steps=5")
    assert proc.returncode == 0, proc.stderr
    assert len(job_results(tmp_path / "sweep")) == 20
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert 0.4 <= best["best_params"]["optimizer.lr"] <= 0.6, best


def test_eager_modes_and_graph_updates_sweep_together(tmp_path: Path) -> None:
    """`mode=manual,graph mode.update=manual` was refused whole (mode.update was a key of
    mode=graph only): an eager mode is its own update, so the matrix of eager modes and
    graph updates is one sweep, and an eager job asked for another update is skipped (it
    would be a second copy of its mode's run), not run."""
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=jax", "mode=manual,apply,graph", "mode.update=manual,apply",
        "steps=20", "tracking=off", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = job_results(sweep)
    ran = sorted((r["mode"], r["update"]) for r in results.values() if r["status"] == "finished")
    assert ran == [("apply", None), ("graph", "apply"), ("graph", "manual"), ("manual", None)]
    skipped = {k: r["reason"] for k, r in results.items() if r["status"] == "skipped"}
    assert skipped == {
        "1_jax_manual": "mode.update=apply is a setting of mode=graph (an eager mode is its "
        "own update); choose mode=graph mode.update=apply, or mode=apply",
        "2_jax_apply": "mode.update=manual is a setting of mode=graph (an eager mode is its "
        "own update); choose mode=graph mode.update=manual, or mode=manual",
    }
    assert "; 4 finished, 2 skipped, 4 rows" in proc.stdout


def test_unsupported_combination_is_skipped_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """backend=numpy has no optimizer objects: mode=apply is not expressible, mode=manual is."""
    proc = cli(
        "-m",
        "backend=numpy",
        "mode=apply,manual",
        "steps=20",
        *sweep_args(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    skipped_lines = [line for line in proc.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped_lines) == 1, proc.stderr
    # the job named as its MLflow run is (a parallel sweep's lines come in any order)
    assert skipped_lines[0].startswith("skipped: numpy-apply-float32 steps=20: backend=numpy ")
    results = job_results(tmp_path / "sweep")
    assert sorted(results) == ["0_numpy_apply", "1_numpy_manual"]  # the skip stopped nothing
    skipped, finished = results["0_numpy_apply"], results["1_numpy_manual"]
    assert skipped["status"] == "skipped" and skipped["mode"] == "apply"
    assert skipped["reason"] and skipped["reason"] in skipped_lines[0]
    # the report shows the hole too: which job, and why
    assert f"skipped: numpy apply: {skipped['reason']}" in proc.stdout.splitlines()
    assert not (tmp_path / "sweep" / "0_numpy_apply" / "trajectory.csv").exists()
    assert finished["status"] == "finished" and finished["steps_run"] == 20
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FINISHED"
    by_mode = {r.data.tags["mode"]: r for r in jobs}
    assert sorted(by_mode) == ["apply", "manual"]
    run = by_mode["apply"]
    assert run.data.tags["status"] == "skipped"
    assert skipped["reason"] in run.data.tags["skip_reason"]
    assert run.info.status == "FINISHED" and "error" not in run.data.tags  # skipped, not failed
    assert "final_x" not in run.data.metrics
    assert by_mode["manual"].info.status == "FINISHED"
    assert by_mode["manual"].data.tags["status"] == "finished"
    assert by_mode["manual"].data.metrics["final_x"] == finished["x"]


def test_a_wrong_backend_option_value_fails_its_job_not_skips_it(tmp_path: Path) -> None:
    """backend.convention=bogus (or backend.unroll=0) is a wrong setting, as it is for a
    single run (exit 2): its job was 'skipped' as if numpy could not express it, and the
    sweep exited 0. It fails its job; the others run; the sweep exits 2."""
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=numpy", "backend.convention=paper,bogus", "steps=3", "tracking=off",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "backend.convention='bogus' is not allowed; choose one of: " in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: 1 of 2 jobs failed; the first: ")
    assert not [line for line in proc.stdout.splitlines() if line.startswith("skipped")]
    # the report's line: the backend's label says the option, not again as a setting
    (failed,) = [line for line in proc.stdout.splitlines() if line.startswith("failed")]
    assert failed.startswith("failed: numpy+convention=bogus manual: backend=numpy: "), failed
    results = job_results(sweep)
    assert [r["status"] for r in results.values()] == ["finished"]  # none written skipped
    assert len(list(sweep.glob("*/job_failure.json"))) == 1  # its record: a failed job


def test_matrix_preset_composes_the_twelve_job_matrix(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "+experiment=matrix", "--cfg", "hydra"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    hydra_cfg = yaml.safe_load(proc.stdout)["hydra"]
    assert hydra_cfg["mode"] == "MULTIRUN"
    params = hydra_cfg["sweeper"]["params"]
    assert params["backend"].split(",") == ["tf", "torch", "jax"]
    assert params["mode"].split(",") == ["manual", "apply", "minimize", "graph"]
    assert "basic_sweeper" in hydra_cfg["sweeper"]["_target_"]


@pytest.mark.parametrize(
    ("preset", "plugin", "target", "settings"),
    [
        ("parallel", "hydra_joblib_launcher", "JoblibLauncher", {"n_jobs": -1}),  # -1: all cores
        ("local", "hydra_submitit_launcher", "LocalLauncher", {"cpus_per_task": 1}),
        (
            "slurm",
            "hydra_submitit_launcher",
            "SlurmLauncher",
            {"partition": None, "timeout_min": 60, "cpus_per_task": 2, "gpus_per_node": 0},
        ),
    ],
)
def test_launcher_presets_compose(
    preset: str, plugin: str, target: str, settings: dict[str, Any]
) -> None:
    """The SLURM preset cannot run here; its composed config is what submitit receives."""
    pytest.importorskip(f"hydra_plugins.{plugin}")
    from hydra import compose, initialize_config_dir

    from runner.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    assert {k: launcher[k] for k in settings} == settings


@pytest.mark.slow
def test_full_matrix_in_parallel(tmp_path: Path) -> None:
    """All 12 backend x mode runs, two workers: every one finished, compared, recorded once."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = cli(
        "+experiment=matrix",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "steps=100",
        *sweep_args(tmp_path),
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    results = job_results(tmp_path / "sweep")
    assert len(results) == 12
    assert {r["status"] for r in results.values()} == {"finished"}
    assert {(r["backend"], r["mode"]) for r in results.values()} == {
        (b, m) for b in ("tf", "torch", "jax") for m in ("manual", "apply", "minimize", "graph")
    }
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FINISHED"
    assert len(jobs) == 12 and {r.info.status for r in jobs} == {"FINISHED"}
    assert (tmp_path / "sweep" / "compare" / "comparison.md").exists()


def test_sweep_against_a_real_mlflow_server(tmp_path: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    proc = cli(
        "-m",
        "backend=jax",
        "mode=manual,graph",
        "steps=20",
        "tracking.experiment=sweep-over-http",
        *sweep_args(tmp_path, uri=mlflow_server),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    parent, jobs = sweep_group(mlflow_server, "sweep-over-http")
    assert parent.info.status == "FINISHED"
    assert len(jobs) == 2 and {r.info.status for r in jobs} == {"FINISHED"}
    assert sorted(r.data.tags["mode"] for r in jobs) == ["graph/apply", "manual"]
    client = MlflowClient(tracking_uri=mlflow_server)
    for run in jobs:
        assert "results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not list(tmp_path.rglob("*.db"))  # nothing went to a local store


def _without(module: str, *args: str) -> str:
    """`python -c` code: the runner's CLI with ARGS where `module` is not installed."""
    return (
        f"import sys; sys.modules[{module!r}] = None; "
        f"sys.argv = ['runner', *{list(args)!r}, 'tracking=off']; "
        "from runner.cli import main; main()"
    )


# hydra_plugins: an install without the [sweeps] extra, which alone creates that namespace
# (every run printed a ModuleNotFoundError traceback, from the Optuna sweeper's probe)
MISSING = ["hydra_plugins.hydra_joblib_launcher", "hydra_plugins"]


@pytest.mark.parametrize("missing", MISSING)
@pytest.mark.parametrize(
    "args",
    [["-m", "hydra/launcher=parallel"], ["+experiment=matrix_parallel"]],  # the preset's was
    ids=["launcher", "preset"],  # "Could not load 'hydra/launcher/joblib'"
)
def test_missing_sweep_plugin_names_the_extra(
    tmp_path: Path, args: list[str], missing: str
) -> None:
    proc = python_code(_without(missing, *args, "backend=jax"), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {args[-1]} needs the Hydra plugin 'hydra_joblib_launcher', "
        "which is not installed; pip install 'gradient-runner[sweeps]'"
    )
    assert not (tmp_path / "outputs").exists()


def test_a_run_needs_no_sweep_plugin(tmp_path: Path) -> None:
    proc = python_code(_without("hydra_plugins", "backend=numpy", "steps=5"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "running 5 steps ...\n" and "result    x = " in proc.stdout


def test_optuna_search_goes_on_past_a_diverged_trial(tmp_path: Path) -> None:
    """a = 10: an lr over 0.1 diverges (TPE's second seeded trial, lr = 0.14). That trial
    counts as failed, the search goes on, and the report's header counts it."""
    proc = lr_search(
        tmp_path, "backend=numpy", "problem.a=10", "steps=100", "hydra.sweeper.n_trials=3"
    )
    assert proc.returncode == 0, proc.stderr
    results = job_results(tmp_path / "sweep")
    assert sorted(r["status"] for r in results.values()) == ["diverged", "finished", "finished"]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    finished = [r for r in results.values() if r["status"] == "finished"]
    assert best["best_value"] == min(r["loss"] for r in finished)
    assert "; 2 finished, 1 diverged, 3 rows" in proc.stdout


NO_BEST = "error: the search has no best trial: none of its "


def no_best_line(proc: subprocess.CompletedProcess) -> str:
    """The one line of a search none of whose trials finished, last on stderr, and no
    traceback: that search ended in Optuna's `No trials are completed yet`, before the
    sweep's report, its MLflow parent's end and its exit code."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(NO_BEST)]
    assert len(lines) == 1 and proc.stderr.splitlines()[-1] == lines[0], proc.stderr
    return lines[0]


def test_optuna_search_whose_every_trial_fails_ends_like_a_failed_sweep(tmp_path: Path) -> None:
    """Failed trials are not losses (no best lr is made of them): the search has no best
    trial, and ends as a sweep whose jobs failed: report, FAILED parent, exit 2."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = cli(
        "+hparams_search=lr", "backend=jax", "problem.a=-1", "hydra.sweeper.n_trials=2",
        "steps=5", *sweep_args(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    sweep = tmp_path / "sweep"
    assert no_best_line(proc) == (
        f"{NO_BEST}2 trials finished with a loss (2 failed); no "
        f"{sweep / 'optimization_results.yaml'} is written; the lines above say why"
    )
    assert f"error: 2 of 2 jobs failed; the first: {BAD_A}" in proc.stderr.splitlines()
    failed = [line for line in proc.stdout.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and failed[0].endswith(BAD_A), proc.stdout  # the report's list
    assert failed[0].startswith("failed, 2 jobs (jax manual; optimizer.lr="), failed
    assert not (sweep / "optimization_results.yaml").exists()
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "2"
    assert [r.info.status for r in jobs] == ["FAILED", "FAILED"]


# the search of conf/hparams_search, and Optuna's sweeper chosen as Hydra's docs choose it
OPTUNA_AS_DOCUMENTED = ("-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log, interval(0.001, 1))")


@pytest.mark.parametrize("chosen", [(), OPTUNA_AS_DOCUMENTED], ids=["hparams_search", "sweeper"])
def test_optuna_search_whose_every_trial_is_skipped_says_it_has_no_best(
    tmp_path: Path, chosen: tuple[str, ...]
) -> None:
    """Skipped trials are results of the sweep, but not a search's: its report lists
    them, and it exits 2, as a single run of that combination is refused. It keeps its
    config in multirun.yaml, as any sweep does."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    search = (*chosen, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1")
    if chosen:  # hydra/sweeper=optuna alone: no +hparams_search
        proc = cli(*search, "backend=numpy", "mode=apply", "steps=5", "tracking=off",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)  # fmt: skip
    else:
        proc = lr_search(tmp_path, *search, "backend=numpy", "mode=apply", "steps=5")
    assert proc.returncode == 2, proc.stderr
    line = no_best_line(proc)
    assert line.startswith(f"{NO_BEST}3 trials finished with a loss (3 skipped); no ")
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped, 3 jobs (numpy apply; "), skipped
    assert skipped[0].endswith("only mode=manual is defined"), proc.stdout
    # the job's line says why; Optuna's sweeper's two lines on a None return are dropped
    assert "float-castable" not in proc.stdout + proc.stderr
    assert not (tmp_path / "sweep" / "optimization_results.yaml").exists()
    searched = OmegaConf.load(tmp_path / "sweep" / "multirun.yaml")
    assert searched.hydra.sweeper._target_ == "hydra_plugins.gradient_runner.OptunaSearch"
    assert searched.hydra.sweeper.n_trials == 3 and searched.backend.name == "numpy"


def test_only_a_search_whose_every_trial_ran_without_a_value_has_no_best() -> None:
    """Optuna's other errors stay errors: a trial that raised (the sweeper re-raises
    its error) or trials not all run (an error before or among them)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.utils import JobReturn, JobStatus

    from runner.search_sweeper import TrialReturns

    def trials(*returns: tuple[JobStatus, Any]) -> TrialReturns:
        launcher = TrialReturns(None)
        launcher.returns = [JobReturn(status=s, _return_value=v) for s, v in returns]
        return launcher

    done = JobStatus.COMPLETED
    assert trials((done, None), (done, None)).none_completed(2)
    assert trials((done, None), (done, float("nan"))).none_completed(2)  # Optuna: failed
    assert not trials((done, None), (done, math.inf)).none_completed(2)  # diverged: a value
    assert not trials((done, None), (JobStatus.FAILED, ValueError())).none_completed(2)
    assert not trials((done, None)).none_completed(2)


def test_optuna_search_with_some_trials_skipped_picks_its_best_of_the_rest(
    tmp_path: Path,
) -> None:
    """The search over mode too: TPE's seeded trials choose apply (skipped) twice and
    manual twice; the skipped ones are failed trials to Optuna, as before, never best."""
    proc = lr_search(
        tmp_path,
        "backend=numpy",
        "mode=choice(manual,apply)",
        "hydra.sweeper.n_trials=4",
        "steps=5",
    )
    assert proc.returncode == 0, proc.stderr
    assert NO_BEST not in proc.stderr and "Traceback" not in proc.stderr
    results = job_results(tmp_path / "sweep")
    assert sorted(r["status"] for r in results.values()) == ["finished"] * 2 + ["skipped"] * 2
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    finished = [r for r in results.values() if r["status"] == "finished"]
    assert best["best_params"]["mode"] == "manual"
    assert best["best_value"] == min(r["loss"] for r in finished)


def upload(*args: str, cwd: Path) -> str:
    """`python -m runner.upload ARGS`, run in this process (conftest.upload_command:
    these tests are about what the upload records, not its process): its last line (the
    counts)."""
    proc = upload_command(*args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


BAD_A = "problem.a=-1.0: a*x^2 + b*x + c has no minimum unless a > 0; give a positive problem.a"
GIT_TAG_PREFIXES = ("git_", "mlflow.source.git.")  # runner.tracking.git_tags's


def test_a_job_that_failed_before_a_result_is_in_the_report_and_in_mlflow(
    tmp_path: Path, fresh_store
) -> None:
    """The report names the failed job and its error; MLflow holds it as a FAILED run
    with its config, under a FAILED parent that says how many failed (the sweep's
    logger, and a later upload to another store; neither twice). Before, the parent was
    FINISHED over one child, and only stderr said which job had failed."""
    from mlflow import MlflowClient

    from runner.tracking import git_tags

    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=numpy", "problem.a=1,-1", "steps=20", *sweep_args(tmp_path), cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "; 1 finished, 1 failed, 1 row (one per run)" in proc.stdout, proc.stdout
    assert f"failed: numpy manual: {BAD_A}" in proc.stdout.splitlines()
    assert proc.stderr.strip().endswith(BAD_A)
    done = json.loads((sweep / "sweep_done.json").read_text())
    assert done == {"status": "FAILED"}  # as its parent ends (it said FINISHED)
    failure = json.loads(next(sweep.glob("*/job_failure.json")).read_text())
    assert ("git" in failure) == (ROOT / ".git").exists()  # the code as the job started
    for uri in (store(tmp_path), fresh_store(tmp_path / "later.db")):
        if uri != store(tmp_path):  # the sweep's logger made the first; an upload this one
            assert upload(str(sweep), "--tracking-uri", uri, cwd=tmp_path) == (
                "uploaded 2, already recorded 0, unreadable 0"
            )
        parent, jobs = sweep_group(uri)
        assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "1"
        by_a = {r.data.params["problem.a"]: r for r in jobs}
        assert sorted(by_a) == ["-1", "1"] and by_a["1"].info.status == "FINISHED"
        failed = by_a["-1"]
        assert failed.info.status == "FAILED" and failed.data.tags["error"] == BAD_A
        assert failed.info.run_name == "numpy-manual-float32 problem.a=-1 steps=20"
        artifacts = {a.path for a in MlflowClient(uri).list_artifacts(failed.info.run_id)}
        assert artifacts == {"hydra", "job_failure.json"}
        # the code the job recorded as it started, by its logger and by a later upload alike
        git = {k: v for k, v in failed.data.tags.items() if k.startswith(GIT_TAG_PREFIXES)}
        assert git == git_tags(failure.get("git"))
        assert upload(str(sweep), "--tracking-uri", uri, cwd=tmp_path) == (
            "uploaded 0, already recorded 2, unreadable 0"
        )


def test_in_process_jobs_record_each_failed_job_once(tmp_path: Path) -> None:
    """tracking.background=false: a job that fails as it runs (device=gpu: numpy has none)
    logs itself FAILED; one that fails on its config (a=-1) never starts a run, and the
    sweep's end records it; the parent ends FAILED with failed_jobs=3. An upload of the
    sweep then finds all four, repeating none."""
    proc = cli(
        "-m", "backend=numpy", "problem.a=1,-1", "device=cpu,gpu", "steps=5",
        "tracking.background=false", *sweep_args(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    parent, jobs = sweep_group(store(tmp_path))
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"] == "3"
    by_job = {(r.data.params["problem.a"], r.data.params["device"]): r for r in jobs}
    assert len(by_job) == len(jobs) == 4
    assert {k: r.info.status for k, r in by_job.items()} == {
        ("1", "cpu"): "FINISHED", ("1", "gpu"): "FAILED",
        ("-1", "cpu"): "FAILED", ("-1", "gpu"): "FAILED",
    }  # fmt: skip
    assert by_job["1", "gpu"].data.tags["error"].startswith("device=gpu: NumPy runs on the CPU")
    assert by_job["-1", "gpu"].data.tags["error"] == BAD_A
    assert upload(str(tmp_path / "sweep"), cwd=tmp_path) == (
        "uploaded 0, already recorded 4, unreadable 0"
    )
