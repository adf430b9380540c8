"""Real MLflow: the default SQLite store, a real `mlflow server`, a parallel sweep.

A single run is logged by a background `python -m runner.upload` (the default) or
in-process (tracking.background=false); tests of the first wait for the upload with
conftest.wait_for_upload, which returns when the uploader has exited.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from runner.errors import ConfigError
from runner.masking import mask_uri
from runner.tracking import config_params, run_tags, thin
from runner.tracking_store import resolve_target
from tests.conftest import (
    ROOT,
    LiveRun,
    cli,
    free_port,
    run_dirs_in,
    single_result,
    upload_command,
    wait_for_upload,
)


def runs_of(uri: str, experiment: str = "gradient-runner") -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client.search_runs([found.experiment_id], max_results=1000)


def test_default_store_records_everything(tmp_path: Path) -> None:
    """The default: the command returns without importing MLflow, then a background
    upload logs the run once, as an in-process run would be logged."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runner", "backend=jax", "mode=graph",
         "steps=300", "problem.b=-3", "progress=false"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "jax" in imported  # the run's own framework: the import log is complete
    assert not imported & {"mlflow", "sqlalchemy", "alembic", "matplotlib", "requests"}
    (run_dir,) = run_dirs_in(tmp_path)
    uri = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert f"MLflow: logging this run to {uri} (experiment gradient-runner) in the " in proc.stdout
    assert f"its log: {run_dir / 'upload.log'}" in proc.stdout
    log = wait_for_upload(run_dir)
    assert "uploaded 1, already recorded 0, unreadable 0" in log and "done in" in log, log
    result = single_result(tmp_path)
    (run,) = runs_of(uri)
    client = MlflowClient(tracking_uri=uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_uid"] == result["run_uid"]
    assert run.data.tags["runner.logged"] == "background"
    assert "runner.uploaded_from" not in run.data.tags
    assert run.info.run_name == "jax-graph-apply-float32 steps=300 problem.b=-3"
    params = run.data.params
    assert params["problem.b"] == "-3" and params["optimizer.lr"] == "0.01"
    assert params["mode.update"] == "apply" and params["steps"] == "300"
    tags = run.data.tags
    assert tags["backend"] == "jax" and tags["framework"] == "JAX"
    assert tags["version.jax"] == tags["framework_version"] == result["versions"]["jax"]
    assert tags["device"] == result["device"] == "cpu" and tags["device_name"] == "cpu:0"
    assert tags["python"] == result["versions"]["python"]
    assert "problem.b=-3" in tags["overrides"] and tags["platform"]
    assert result["optimizer_used"] == {
        "convention": "jax", "name": "sgd", "lr": 0.01, "momentum": 0.0, "nesterov": False
    }  # fmt: skip
    assert tags["optimizer_used.convention"] == "jax" and tags["optimizer_used.lr"] == "0.01"
    metrics = run.data.metrics
    assert metrics["final_x"] == result["x"] and metrics["final_loss"] == result["loss"]
    assert metrics["error_x"] == result["error"]["x"]
    assert metrics["step_us"] == result["timings"]["step_us"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(301))
    assert len(client.get_metric_history(run.info.run_id, "x")) == 301
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "trajectory.csv", "convergence.png", "hydra"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"hydra/config.yaml", "hydra/overrides.yaml"} <= hydra_files
    png = Path(client.download_artifacts(run.info.run_id, "convergence.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the store lives under outputs/, never inside the per-run folder
    assert not list(run_dir.glob("*.db"))
    assert run.info.start_time <= run.info.end_time
    assert run.info.end_time / 1000 <= (run_dir / "results.json").stat().st_mtime + 1


def test_diverged_run_is_failed_with_its_trajectory(tmp_path: Path) -> None:
    proc = cli("backend=numpy", "optimizer.lr=1.5", "steps=300", cwd=tmp_path)
    assert proc.returncode == 3
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the loss became inf")
    (run_dir,) = run_dirs_in(tmp_path)
    wait_for_upload(run_dir)  # the background upload records the failure too
    (run,) = runs_of(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert run.info.status == "FAILED"
    # the upload tags the error the run printed, as a run logged in-process is tagged
    assert run.data.tags["error"] == proc.stderr.strip().splitlines()[-1].removeprefix("error: ")
    step = single_result(tmp_path)["diverged_at"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    losses = client.get_metric_history(run.info.run_id, "loss")
    xs = client.get_metric_history(run.info.run_id, "x")
    assert max(m.step for m in losses) == step - 1  # an infinite loss is not a point
    assert max(m.step for m in xs) == step  # x there is still finite: where it blew up
    # nor a final value: MLflow would store it as 1.8e308, a finite-looking number
    assert not {"final_loss", "error_loss"} & set(run.data.metrics)
    assert run.data.metrics["final_x"] == single_result(tmp_path)["x"]  # finite: logged
    assert run.data.metrics["steps_run"] == step


def test_final_metrics_leave_out_non_finite_values() -> None:
    """inf and NaN alike, as the per-step metrics leave them out; the finite ones stay."""
    from runner.tracking import result_metrics

    timings = {"compile_s": 0.0, "run_s": 0.5, "step_us": 2.0, "final_s": 0.0}
    for bad in (np.inf, -np.inf, np.nan):
        result = {
            "task": "minimize", "status": "diverged", "loss": bad, "x": 3.0e30,
            "error": {"x": bad, "loss": bad}, "steps_run": 7, "timings": timings,
        }  # fmt: skip
        assert result_metrics(result) == {"final_x": 3.0e30, "steps_run": 7.0, **timings}


def test_ctrl_c_marks_the_run_killed_and_keeps_the_partial_trajectory(tmp_path: Path) -> None:
    """In-process logging: the run is RUNNING in MLflow while it runs, then KILLED."""
    live = LiveRun(tmp_path, "backend=jax", "steps=100000000", "tracking.background=false")
    live.stop(signal.SIGINT, after=1.0)
    assert live.proc.returncode == 130, live.lines
    db = tmp_path / "outputs" / "mlflow.db"
    result = single_result(tmp_path)
    assert result["status"] == "interrupted" and 0 < result["steps_run"] < 100_000_000
    (run,) = runs_of(f"sqlite:///{db}")
    assert run.info.status == "KILLED"
    assert run.data.metrics["steps_run"] == result["steps_run"]
    assert not list(tmp_path.rglob("upload.log"))  # no background upload


def test_ctrl_c_in_background_mode_is_uploaded_as_killed(tmp_path: Path) -> None:
    """The background upload starts after Ctrl-C too, in its own session (the terminal's
    Ctrl-C does not reach it), and records the partial run as KILLED."""
    live = LiveRun(tmp_path, "backend=jax", "steps=100000000")
    live.stop(signal.SIGINT, after=1.0)
    assert live.proc.returncode == 130, live.lines
    assert live.lines[-1][1] == "interrupted: what was computed is saved"
    out = live.stdout()
    (run_dir,) = run_dirs_in(tmp_path)
    assert "in the background; its log: " in out
    log = wait_for_upload(run_dir)
    assert "(KILLED)" in log, log
    result = single_result(tmp_path)
    assert result["status"] == "interrupted" and 0 < result["steps_run"] < 100_000_000
    (run,) = runs_of(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"
    assert run.data.metrics["steps_run"] == result["steps_run"]
    assert run.data.tags["run_uid"] == result["run_uid"]


def test_tracking_server_over_http(tmp_path: Path, mlflow_server: str) -> None:
    proc = cli(
        "backend=jax",
        "task=derivatives",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=http-test",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs_in(tmp_path)
    assert "uploaded 1," in wait_for_upload(run_dir)
    (run,) = runs_of(mlflow_server, "http-test")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["dy_dx"] == -2.0 and run.data.metrics["error.d2y_dx2"] == 0.0
    artifacts = {a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id)}
    assert "results.json" in artifacts
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


@pytest.mark.parametrize("background", ["true", "false"], ids=["background", "in-process"])
def test_unreachable_server_fails_fast_and_keeps_results(tmp_path: Path, background: str) -> None:
    start = time.monotonic()
    proc = cli(
        "backend=numpy",
        "steps=50",
        f"tracking.uri=http://127.0.0.1:{free_port()}",
        f"tracking.background={background}",
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 4
    first, *_, last = proc.stderr.strip().splitlines()
    assert last.startswith("error: tracking server http://127.0.0.1:") and "unreachable" in last
    assert first.startswith("warning: tracking server http://127.0.0.1:")  # before the run
    assert first.endswith(
        "unreachable (ConnectionRefusedError); start it, point tracking.uri "
        "elsewhere, or run with tracking=off; the run goes on and keeps its files"
    )
    assert single_result(tmp_path)["status"] == "finished"
    assert not list(tmp_path.rglob("upload.log"))  # nothing started against a dead server
    assert elapsed < 30  # a clear error in seconds (imports included), not a retry storm


def test_concurrent_uploads_of_the_same_runs_record_each_once(tmp_path: Path) -> None:
    """Two `python -m runner.upload` of the same folders at the same moment: each run
    (and the sweep's parent run) once; the second waits for the first's lock."""
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=numpy", "steps=20", "optimizer.lr=0.01,0.02,0.03", "tracking=off",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    single = cli("backend=numpy", "steps=20", "tracking=off", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    (run_dir,) = run_dirs_in(tmp_path)
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "runner.upload", str(sweep), str(run_dir)]
    uploads = [
        subprocess.Popen(
            [*command, "--tracking-uri", store],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in uploads]
    for p, (_, err) in zip(uploads, outputs, strict=True):
        assert p.returncode == 0, err
    totals = [out.strip().splitlines()[-1] for out, _ in outputs]
    counts = sorted(
        tuple(int(word) for word in line.replace(",", "").split() if word.isdigit())
        for line in totals
    )
    assert sum(c[0] for c in counts) == 4 and sum(c[1] for c in counts) == 4, totals
    runs = runs_of(store)
    jobs = [r for r in runs if r.data.tags.get("runner.kind") != "sweep"]
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    uids = sorted(r.data.tags["run_uid"] for r in jobs)
    folders = [*sweep.glob("*/results.json"), run_dir / "results.json"]
    expected = sorted(json.loads(p.read_text())["run_uid"] for p in folders)
    assert uids == expected  # 4 runs, none twice
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs if "sweep_id" in r.data.tags} == {
        parents[0].info.run_id
    }


def test_an_upload_takes_a_sweeps_lock_before_its_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_store
) -> None:
    """The sweep's logger (runner.follow) holds the sweep folder's lock all its life and
    takes each job's; an upload of the sweep took a job's lock, then the sweep's, and the
    two waited on each other for ever (a user review, seen in /proc/locks). The locks the
    upload takes, the real ones, are recorded: none is the sweep's while a job's is held."""
    import contextlib
    import io

    import runner.upload
    from runner.upload_process import folder_lock

    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=numpy", "steps=5", "optimizer.lr=0.01,0.02", "tracking=off",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    held: list[Path] = []
    taken: list[tuple[Path, list[Path]]] = []

    @contextlib.contextmanager
    def recorded(folder: Path, out=None):
        taken.append((folder, list(held)))
        with folder_lock(folder, out):
            held.append(folder)
            try:
                yield
            finally:
                held.remove(folder)

    monkeypatch.setattr(runner.upload, "folder_lock", recorded)
    uri = fresh_store(tmp_path / "mlflow.db")
    outcome = runner.upload.upload([sweep], uri, "gradient-runner", out=io.StringIO())
    assert outcome.uploaded == 2
    assert [folder for folder, _ in taken if folder == sweep] == [sweep]  # once, as the first
    assert all(not during for folder, during in taken if folder == sweep), taken
    assert {folder for folder, _ in taken} == {
        sweep,
        *(p.parent for p in sweep.glob("*/results.json")),
    }


def test_an_in_process_run_on_a_server_prints_no_mlflow_links(
    tmp_path: Path, mlflow_server: str
) -> None:
    """MLflow prints "View run ..." and "View experiment ..." to stdout as a run in an HTTP
    store ends, between the runner's own lines; the upload kept them out, the in-process
    run and its sweep's parent did not (a user review)."""
    proc = cli(
        "-m", "backend=numpy", "steps=5", "optimizer.lr=0.01,0.02", f"tracking.uri={mlflow_server}",
        "tracking.background=false", "tracking.experiment=no-links",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "View run" not in proc.stdout + proc.stderr
    assert "View experiment" not in proc.stdout + proc.stderr


def test_parallel_sweep_records_every_run_once(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "backend=numpy",  # the sweep's logging is the same for every backend
        "optimizer.lr=0.01,0.02,0.03",
        "dtype=float32,float64",
        "steps=100",
        "+hydra.callbacks.probe._target_=tests.test_sweeps.WorkerProbe",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "sweep"
    # the sweep's one logger records the jobs: no worker imports MLflow
    probes = [json.loads(p.read_text()) for p in sweep.glob("*/probe_end.json")]
    assert len(probes) == 6 and {p["mlflow_imported"] for p in probes} == {False}
    assert "MLflow: logging this sweep to sqlite:///" in proc.stdout
    log = (sweep / "upload.log").read_text()
    assert log.count("uploaded ") == 7 and "uploaded 6, already recorded 0, unreadable 0" in log
    runs = runs_of(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    jobs = [r for r in runs if r.data.tags.get("runner.kind") is None]
    parents = [r for r in runs if r.data.tags.get("runner.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(jobs) == 6
    assert {r.info.status for r in jobs} == {"FINISHED"}
    assert len({r.info.run_name for r in jobs}) == 6
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parents[0].info.run_id}
    assert {r.data.tags["sweep_id"] for r in jobs} == {parents[0].data.tags["sweep_id"]}
    assert {r.data.tags["runner.logged"] for r in jobs} == {"background"}
    results = {json.loads(p.read_text())["run_uid"] for p in sweep.glob("*/results.json")}
    assert {r.data.tags["run_uid"] for r in jobs} == results
    # the report the sweep printed is on its parent run
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"comparison.md", "comparison.json", "convergence.png"} <= artifacts
    assert parents[0].data.metrics["compare.rows"] == 6
    # each row names its run, in the folder and on the parent, though the report was made
    # before the runs were in MLflow (its run_id column was empty)
    run_ids = {r.data.tags["run_uid"]: r.info.run_id for r in jobs}
    folders = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    expected = {name: run_ids[result["run_uid"]] for name, result in folders.items()}
    logged = client.download_artifacts(parents[0].info.run_id, "comparison.csv", str(tmp_path))
    for table in (sweep / "compare" / "comparison.csv", Path(logged)):
        with table.open() as lines:
            assert {row["run_name"]: row["run_id"] for row in csv.DictReader(lines)} == expected
    report = json.loads((sweep / "compare" / "comparison.json").read_text())
    assert {row["run_name"]: row["run_id"] for row in report["rows"]} == expected


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def run_with_relative_store(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(start, elsewhere, run folder): a run started in start/ with
    tracking.uri=sqlite:///stores/rel.db, not uploaded yet; elsewhere/ is empty."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    proc = cli(
        "backend=numpy", "steps=20", "tracking.enabled=false",
        "tracking.uri=sqlite:///stores/rel.db", cwd=start,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs_in(start)
    return start, elsewhere, run_dir


def test_relative_sqlite_uri_is_the_start_folders_from_any_folder(tmp_path: Path) -> None:
    """tracking.uri=sqlite:///<relative> names a file under the folder the run started
    in (as the default store does): `python -m runner.upload` typed in another folder
    records the run there, and finds it there again, creating nothing where it runs.
    (The command runs in this process, in elsewhere/: conftest.upload_command.)"""
    start, elsewhere, run_dir = run_with_relative_store(tmp_path)
    store = start / "stores" / "rel.db"
    up = upload_command(str(run_dir), cwd=elsewhere)
    assert up.returncode == 0, up.stderr
    assert "uploaded 1, already recorded 0, unreadable 0" in up.stdout, up.stdout
    (run,) = runs_of(f"sqlite:///{store}")
    assert run.data.tags["run_uid"] == single_result(start)["run_uid"]
    assert files_under(elsewhere) == set()  # no second store where the command ran
    Path(f"{store}.lock").unlink()  # as a store made by `mlflow server` or MLflow itself
    for args in ([], ["--dry-run"]):
        again = upload_command(str(run_dir), *args, cwd=elsewhere)
        assert again.returncode == 0, again.stderr
        assert " 0, already recorded 1, unreadable 0" in again.stdout, again.stdout
    assert files_under(elsewhere) == set()
    assert not Path(f"{store}.lock").exists()  # opening a store that exists adds no lock file
    # and the run's artifacts went beside its store too
    assert (start / "stores" / "mlartifacts" / "gradient-runner").is_dir()


def test_resolve_target_anchors_only_relative_sqlite_paths(tmp_path: Path) -> None:
    def uri(given: str | None) -> str:
        return resolve_target({"uri": given}, tmp_path).uri

    assert uri(None) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert uri("sqlite:///a/b.db") == f"sqlite:///{tmp_path / 'a' / 'b.db'}"
    assert uri("sqlite:////abs/b.db") == "sqlite:////abs/b.db"
    assert uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert uri("postgresql+psycopg2://u@host/db") == "postgresql+psycopg2://u@host/db"
    for refused in ("", "mlruns", "./mlruns", "file:///tmp/mlruns", 5):
        with pytest.raises(ConfigError, match="is not a store MLflow can log to"):
            uri(refused)
    target = resolve_target({"uri": "sqlite:///a/b.db", "experiment": "e"}, tmp_path)
    assert target.artifact_location == (tmp_path / "a" / "mlartifacts" / "e").as_uri()


def test_dry_run_creates_no_store(tmp_path: Path) -> None:
    """--dry-run against a store that is not there: every run would be uploaded, and it
    says so, but no store (nor its folder or lock file) is created, from any folder.
    (In this process, in each folder: conftest.upload_command.)"""
    start, elsewhere, run_dir = run_with_relative_store(tmp_path)
    before = files_under(tmp_path)
    for cwd, extra in (
        (elsewhere, []),  # the run's own (relative) store
        (start, []),
        (elsewhere, ["--tracking-uri", "sqlite:///given/other.db"]),
    ):
        dry = upload_command(str(run_dir), "--dry-run", *extra, cwd=cwd)
        assert dry.returncode == 0, dry.stderr
        assert "(the store does not exist yet: it would be created)" in dry.stdout, dry.stdout
        assert "would upload 1, already recorded 0, unreadable 0" in dry.stdout, dry.stdout
    assert files_under(tmp_path) == before
    assert f"to sqlite:///{elsewhere / 'given' / 'other.db'} (" in dry.stdout  # the caller's
    empty = elsewhere / "empty.db"  # no store yet: MLflow wrote its tables into it
    empty.touch()
    dry = upload_command(str(run_dir), "--dry-run", f"--tracking-uri=sqlite:///{empty}")
    assert "(the store does not exist yet: it would be created)" in dry.stdout, dry.stdout
    assert empty.stat().st_size == 0


def test_secrets_are_masked() -> None:
    assert mask_uri("http://alice:s3cret@127.0.0.1:5000") == "http://***@127.0.0.1:5000"
    params = config_params(
        {"tracking": {"uri": "https://bob:pw@host/", "api_token": "abc"}, "steps": 3}
    )
    assert params == {
        "tracking.uri": "https://***@host/",
        "tracking.api_token": "***",
        "steps": "3",
    }


def test_a_derivatives_run_has_no_optimization_params() -> None:
    """task=derivatives runs no optimizer: its params said mode.name=manual,
    optimizer.name=sgd, steps=1000, which its command line may not even set."""
    cfg = {
        "task": "derivatives",
        "backend": {"name": "jax"},
        "mode": {"name": "manual", "update": "apply"},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "steps": 1000,
        "record_every": None,
        "dtype": "float32",
    }
    assert config_params(cfg) == {"task": "derivatives", "backend.name": "jax", "dtype": "float32"}
    minimize = config_params({**cfg, "task": "minimize"})
    assert minimize["optimizer.name"] == "sgd" and minimize["steps"] == "1000"


def test_logged_points_are_bounded() -> None:
    keep = thin(10_000_001)
    assert len(keep) <= 1000 and keep[0] == 0 and keep[-1] == 10_000_000
    assert np.all(np.diff(keep) > 0)
    assert list(thin(5)) == [0, 1, 2, 3, 4]


def test_git_state_is_the_runners_own_whatever_the_folder(tmp_path: Path, monkeypatch) -> None:
    """Typed in another git repository (or none), the state still names the runner's code."""
    from runner.provenance import git_state

    if not (ROOT / ".git").exists():
        pytest.skip("the runner's code is not a git checkout here")
    own = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    state = git_state()
    assert state == {"commit": own, "dirty": bool(dirty)}
    tags = run_tags({"backend": {"name": "numpy"}}, [], None, state)
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == own
    assert tags["git_dirty"] == str(bool(dirty)).lower()
    assert not {"git_commit", "git_dirty"} & set(run_tags({"backend": {"name": "numpy"}}, [], None))


def git_in(folder: Path, *args: str) -> str:
    """`git ARGS` in folder, as a user who can commit; its output."""
    who = ["-c", "user.name=runner tests", "-c", "user.email=tests@localhost"]
    return subprocess.run(
        ["git", *who, *args], cwd=folder, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="no git here")
def test_a_commit_made_while_the_run_is_logged_is_not_the_runs(tmp_path: Path) -> None:
    """The review's reproduction: in a checkout of the runner, a run, then `git commit` at
    once, while its background upload imports MLflow. The run is tagged with the commit it
    ran at, dirty (a tracked file differed from it as it ran); the upload read the checkout
    as it logged, and tagged the commit made after the run, clean."""
    clone = tmp_path / "clone"
    for part in ("runner", "conf", "backends"):
        shutil.copytree(ROOT / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "NOTES").write_text("before the run\n")
    git_in(clone, "init", "-q")
    git_in(clone, "add", "-A")
    git_in(clone, "commit", "-q", "-m", "the code that runs")
    ran_at = git_in(clone, "rev-parse", "HEAD")
    (clone / "NOTES").write_text("edited, not committed, as the run starts\n")
    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{tmp_path / 'git.db'}"
    env = {**os.environ, "PYTHONPATH": str(clone)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "backend=numpy", "steps=3", "progress=false",
         f"tracking.uri={uri}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    git_in(clone, "commit", "-q", "-am", "made after the run")  # as its upload starts
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs_in(work)
    wait_for_upload(run_dir)
    (run,) = runs_of(uri)
    assert run.data.tags["git_commit"] == run.data.tags["mlflow.source.git.commit"] == ran_at
    assert run.data.tags["git_dirty"] == "true"
    assert single_result(work)["git"] == {"commit": ran_at, "dirty": True}


def test_uploads_tag_the_commit_the_run_recorded(tmp_path: Path, fresh_store) -> None:
    """Live (a run's background upload, a sweep's logger) or later (runner.upload), a run
    is tagged with the code state its record holds (results.json, or a failed job's
    job_failure.json), never the checkout's at logging time; a record without one (a
    folder from before runs kept it) gets no git tags, live or later."""
    import io

    from runner.results import JOB_FAILURE_FILE, new_run_uid, write_json
    from runner.run_folders import read_record
    from runner.sweep_record import SweepInfo, sweep_id_of, write_sweep
    from runner.upload import upload

    proc = cli("backend=numpy", "steps=3", "tracking=off", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (ran,) = run_dirs_in(tmp_path)
    recorded = {"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True}
    folders = {name: tmp_path / "runs" / name for name in ("with", "without")}
    for name, folder in folders.items():
        shutil.copytree(ran, folder)
        result = json.loads((folder / "results.json").read_text())
        result.pop("git", None)
        result.update(run_uid=new_run_uid(), **({"git": recorded} if name == "with" else {}))
        (folder / "results.json").write_text(json.dumps(result))
    sweep = tmp_path / "sweep"
    write_sweep(sweep, SweepInfo(sweep_id_of(sweep), None))
    folders["failed"] = sweep / "0_failed"  # stopped before a result: config and failure
    shutil.copytree(ran / ".hydra", folders["failed"] / ".hydra")
    failure = {"exit_code": 2, "error": "a bad setting", "git": recorded}
    write_json(folders["failed"] / JOB_FAILURE_FILE, failure)  # as record_job_failure writes
    uids = {name: read_record(folder)["run_uid"] for name, folder in folders.items()}
    tagged = {"git_commit": recorded["commit"], "git_dirty": "true"}
    want = {"with": tagged, "without": {}, "failed": tagged}
    for live in (True, False):
        uri = fresh_store(tmp_path / f"live_{live}.db")
        upload(list(folders.values()), uri, out=io.StringIO(), live=live)
        tags = {r.data.tags.get("run_uid"): r.data.tags for r in runs_of(uri)}
        for name, uid in uids.items():
            git = {k: v for k, v in tags[uid].items() if k in ("git_commit", "git_dirty")}
            assert git == want[name], (name, live)
            assert ("runner.uploaded_from" in tags[uid]) is not live


def test_log_batched_logs_past_mlflows_per_request_limits(tmp_path: Path) -> None:
    """The one batching helper (the comparison's metrics, the benchmark's metrics, params
    and tags): every value arrives, in requests of MLflow's sizes."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from runner.tracking import log_batched

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("batched")).info.run_id
    log_batched(
        client,
        run_id,
        metrics=[Metric(f"m{i}", float(i), 0, 0) for i in range(2500)],
        params=[Param(f"p{i}", str(i)) for i in range(250)],
        tags=[RunTag(f"t{i}", str(i)) for i in range(150)],
    )
    data = client.get_run(run_id).data
    assert len(data.metrics) == 2500 and data.metrics["m2499"] == 2499.0
    assert len(data.params) == 250
    assert len([k for k in data.tags if k.startswith("t")]) == 150


def test_a_sweep_job_records_only_its_own_backends_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep runs its jobs in one process (the basic launcher; a joblib worker runs
    several): the TF backend's TF_USE_LEGACY_KERAS=1 stayed set, and the NumPy job after
    it recorded it, which a single NumPy run does not. A variable the user set is every
    job's."""
    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)  # set by this process's TF
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m", "backend=tf,numpy", "steps=3", "tracking=off", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = {
        path.parent.name: json.loads(path.read_text())["environment"]
        for path in sweep.glob("*/results.json")
    }
    tf, numpy = found["0_tf_manual"], found["1_numpy_manual"]
    assert tf == {**numpy, "TF_USE_LEGACY_KERAS": "1"}  # the machine's own variables in both
    assert numpy["OMP_NUM_THREADS"] == "1" and "TF_USE_LEGACY_KERAS" not in numpy


def test_a_run_records_its_machine_and_numerics_environment(tmp_path: Path, fresh_store) -> None:
    """What moves the last ulp on another machine with the same code is in results.json
    (`machine`: the CPU and its FMA/AVX features; `environment`: the numerics-relevant
    variables set, a secret-looking one masked) and in the run's MLflow tags."""
    import io

    from runner.upload import upload

    env = {
        "XLA_FLAGS": "--xla_cpu_enable_fast_math=false",
        "OMP_NUM_THREADS": "1",
        "GRADIENT_RUNNER_UNRELATED": "not numerics",
        "TF_HUB_API_TOKEN": "hunter2",  # caught by the TF_ prefix: masked
    }
    proc = cli("backend=numpy", "steps=3", "tracking=off", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    result = single_result(tmp_path)
    assert result["machine"]["cpu"]
    assert result["machine"]["arch"]
    environment = result["environment"]
    assert environment["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    assert environment["OMP_NUM_THREADS"] == "1"
    assert environment["TF_HUB_API_TOKEN"] == "***"
    assert "GRADIENT_RUNNER_UNRELATED" not in environment
    assert "TF_CPP_MIN_LOG_LEVEL" not in environment  # logging, set by the runner itself
    (run_dir,) = run_dirs_in(tmp_path)
    assert "hunter2" not in (run_dir / "results.json").read_text()

    uri = fresh_store(tmp_path / "machine.db")
    upload([run_dir], uri, out=io.StringIO(), live=True)
    (run,) = runs_of(uri)
    tags = run.data.tags
    assert tags["cpu"] == result["machine"]["cpu"]
    features = result["machine"]["cpu_features"]
    if features is not None:  # /proc/cpuinfo said
        assert tags["cpu_features"] == (",".join(features) or "none")
    assert tags["env.XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    assert tags["env.OMP_NUM_THREADS"] == "1"
    assert tags["env.TF_HUB_API_TOKEN"] == "***"
    assert not any("GRADIENT_RUNNER_UNRELATED" in key for key in tags)
    assert "hunter2" not in json.dumps(tags)
