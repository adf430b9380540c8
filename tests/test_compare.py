"""`python -m runner.compare` against a real SQLite store filled by the real CLI.

Three multiruns run in parallel (one process each): JAX in every eager and compiled
mode in float32 and float64; a second framework (torch, else tf) in manual mode in both
dtypes; and JAX manual at lr 0.01 again (a second run of one row key) and at lr 10
(diverges). One upload (runner.upload, in this process) records their ten runs in one
store: what each sweep's logger would, without three more processes importing MLflow.
Every number in the report is checked against the runs' own results.json files on disk.
"""

from __future__ import annotations

import contextlib
import csv
import io
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

from runner.compare.rows import optimizer_label
from tests.conftest import ROOT, cli, ctrl_c, free_port, imported

# One worker builds the module's store (a ~30 s fixture) and runs every test of it.
pytestmark = [pytest.mark.timeout(240), pytest.mark.xdist_group("compare-store")]

EXPERIMENT = "gradient-runner"
SECOND = "torch" if (ROOT / "backends" / "torch.py").exists() else "tf"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARTIFACTS = {
    "comparison.md",
    "comparison.csv",
    "comparison.json",
    "agreement.csv",
    "convergence.png",
    "step_time.png",
}


def env() -> dict[str, str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT)}
    full.pop("HYDRA_FULL_ERROR", None)
    return full


def start(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def key_of(result: dict) -> tuple[str, str, str, str]:
    mode = result["mode"] + (f"/{result['update']}" if result.get("update") else "")
    return (result["backend"], mode, optimizer_label(result["optimizer"]), result["dtype"])


def test_ulps_count_the_values_between_across_a_power_of_two() -> None:
    """Adjacent float32s are 1 ulp apart also where the spacing doubles (x* = 1 is the
    notebook's optimum): |dx| over the larger one's spacing said 0.5. A float64 x counted
    in float32 ulps stays a fraction of the spacing."""
    from runner.compare.agreement import ulps

    f32 = np.float32
    below = np.nextafter(f32(1), f32(0))
    assert ulps(below, f32(1), f32) == 1
    assert ulps(below, np.nextafter(f32(1), f32(2)), f32) == 2
    assert ulps(f32(-0.0), f32(0.0), f32) == 0
    assert ulps(-np.nextafter(f32(0), f32(1)), np.nextafter(f32(0), f32(1)), f32) == 2
    assert ulps(np.nextafter(1.0, 0.0), 1.0, np.float64) == 1
    assert ulps(0.1, 0.1 + 1e-9, f32) == pytest.approx(1e-9 / float(np.spacing(f32(0.1))))


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def ulps(x1: float, x2: float, dtype: type) -> float:
    return abs(x1 - x2) / float(np.spacing(dtype(max(abs(x1), abs(x2)))))


def markdown_rows(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose first header cell is first_header."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
        rows.append(dict(zip(headers, cells, strict=True)))
    return rows


def is_png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        return path.read_bytes()[:8] == PNG_SIGNATURE and image.format == "PNG"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, fresh_store) -> dict:
    root = tmp_path_factory.mktemp("compare")
    uri = fresh_store(root / "mlflow.db")
    from runner.tracking import client_for, ensure_experiment
    from runner.tracking_store import resolve_target
    from runner.upload import upload

    target = resolve_target({"uri": uri}, root)
    client = client_for(target)
    ensure_experiment(client, target)
    # Recorded by one upload once all have ended (below), not by a logger per sweep: the
    # sweep's logger is tests/test_tracking.py::test_parallel_sweep_records_every_run_once's,
    # uploads racing on one store test_concurrent_uploads_of_the_same_runs_record_each_once's.
    common = ("steps=50", "progress=false", "tracking.enabled=false", f"tracking.uri={uri}")
    sweeps = {
        "jax": ("backend=jax", "mode=manual,apply,graph", "dtype=float32,float64"),
        SECOND: (f"backend={SECOND}", "mode=manual", "dtype=float32,float64"),
        "extra": ("backend=jax", "mode=manual", "optimizer.lr=0.01,10"),
    }
    procs = {
        name: start("runner", "-m", *args, *common, f"hydra.sweep.dir={root / name}", cwd=root)
        for name, args in sweeps.items()
    }
    for name, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 0, f"{name}: {out[-2000:]}\n{err[-3000:]}"
    assert not list(root.glob("*/upload.log"))  # no sweep started a logger of its own
    said = io.StringIO()
    outcome = upload([root / name for name in sweeps], uri, out=said)
    assert outcome.summary() == "uploaded 10, already recorded 0, unreadable 0", said.getvalue()
    results = [
        json.loads(path.read_text())
        for name in sweeps
        for path in (root / name).glob("*/results.json")
    ]
    assert len(results) == 10
    return {"root": root, "uri": uri, "client": client, "results": results}


def main_in_process(*argv: str) -> tuple[int, str, str]:
    """runner.compare.cli.main in this process (MLflow already imported): code, stdout, stderr."""
    from runner.compare.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as stop:  # refused by the argument parser
            code = stop.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def report(store: dict) -> dict:
    """The CLI over the whole store and with a bad experiment; two more through main()."""
    root, uri = store["root"], store["uri"]
    everything = start(
        "runner.compare", "--tracking-uri", uri, "--out", str(root / "out"), cwd=root
    )
    bad = start(
        "runner.compare", "--tracking-uri", uri, "--experiment", "no-such-experiment", cwd=root
    )
    done = {
        "filtered": main_in_process(
            *("--tracking-uri", uri, "--sweep", (root / "jax").as_posix(), "--mode", "graph"),
            *("--dtype", "float64,float32", "--backend", "jax", "--no-log", "--out"),
            str(root / "out2"),
        ),
        "no_match": main_in_process("--tracking-uri", uri, "--backend", "no-such-backend"),
        "one_backend": main_in_process(
            *("--tracking-uri", uri, "--sweep", (root / "jax").as_posix(), "--backend", "jax"),
            *("--out", str(root / "out3")),
        ),
        "bad_experiment": finish(bad),
        "all": finish(everything),
    }
    code, out, err = done["all"]
    assert code == 0, err
    return {**done, "out": root / "out", "stdout": out}


def test_rows_are_the_latest_runs_results(store: dict, report: dict) -> None:
    by_key: dict[tuple, list[dict]] = {}
    for result in store["results"]:
        by_key.setdefault(key_of(result), []).append(result)
    rows = read_csv(report["out"] / "comparison.csv")
    assert len(rows) == len(by_key) == 9
    client = store["client"]
    for row in rows:
        key = (row["backend"], row["mode"], row["optimizer"], row["dtype"])
        candidates = by_key.pop(key)
        matching = [r for r in candidates if float(row["step_us"]) == r["timings"]["step_us"]]
        assert len(matching) == 1, (key, row)
        result = matching[0]
        if len(candidates) > 1:  # two runs of one key: the row is the one started last
            runs = [client.get_run(r) for r in _run_ids_of(client, key)]
            assert row["run_id"] == max(runs, key=lambda r: r.info.start_time).info.run_id
        assert row["status"] == result["status"]
        assert int(row["steps"]) == result["steps"]
        assert int(row["steps_run"]) == result["steps_run"]
        assert same(float(row["final_x"]), result["x"])
        assert same(float(row["final_loss"]), result["loss"])
        assert same(float(row["error_x"]), result["error"]["x"])
        assert same(float(row["error_loss"]), result["error"]["loss"])
        timings = result["timings"]
        for name in ("compile_s", "run_s", "step_us", "final_s"):
            assert float(row[name]) == timings[name]
        assert float(row["total_s"]) == timings["compile_s"] + timings["run_s"] + timings["final_s"]
    assert not by_key
    diverged = [r for r in rows if r["status"] == "diverged"]
    assert [(r["backend"], r["optimizer"]) for r in diverged] == [("jax", "sgd lr=10")]

    # Relative speed: the fastest finished row is exactly 1.0, the others multiples of it.
    fastest = min(float(r["step_us"]) for r in rows if r["status"] == "finished")
    relative = [float(r["relative_step_time"]) for r in rows]
    assert min(float(r["relative_step_time"]) for r in rows if r not in diverged) == 1.0
    for row, rel in zip(rows, relative, strict=True):
        assert rel == pytest.approx(float(row["step_us"]) / fastest, rel=1e-12)

    # The markdown table shows the same rows, x and loss exact in the run's dtype.
    markdown = (report["out"] / "comparison.md").read_text()
    shown = markdown_rows(markdown, "backend")
    assert len(shown) == len(rows)
    for cells, row in zip(shown, rows, strict=True):
        assert [cells[k] for k in ("backend", "mode", "optimizer", "dtype")] == [
            row[k] for k in ("backend", "mode", "optimizer", "dtype")
        ]
        cast = np.float32 if row["dtype"] == "float32" else np.float64
        for column, field in (("final x", "final_x"), ("final loss", "final_loss")):
            assert same(cast(float(cells[column])), cast(float(row[field])))
        if row["status"] == "diverged":
            assert cells["status"] == "DIVERGED"
            assert cells["steps"] == f"{row['steps_run']}/{row['steps']}"
        assert (cells["vs fastest"] == "1.0x") == (float(row["relative_step_time"]) == 1.0)
        assert cells["total s"] == f"{float(row['total_s']):.3f}"
    # The terminal table is printed, and the agreement section is in the markdown.
    assert "vs fastest" in report["stdout"] and "1.0x" in report["stdout"]
    assert "## Cross-backend agreement" in markdown and "(convergence.png)" in markdown


def _run_ids_of(client, key: tuple[str, str, str, str]) -> list[str]:
    backend, mode, _optimizer, dtype = key
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs(
        [exp.experiment_id],
        f"tags.backend = '{backend}' and tags.mode = '{mode}' and tags.dtype = '{dtype}' "
        "and params.`optimizer.lr` = '0.01'",
    )
    return [run.info.run_id for run in found]


def test_agreement_is_computed_from_final_x(report: dict) -> None:
    rows = [
        r
        for r in read_csv(report["out"] / "comparison.csv")
        if r["status"] == "finished" and r["optimizer"] == "sgd lr=0.01"
    ]
    agreement = {(a["mode"], a["dtype"]): a for a in read_csv(report["out"] / "agreement.csv")}
    # Only manual mode ran on two backends; "all" compares every mode of a dtype.
    expected_keys = {(m, d) for m in ("manual", "all") for d in ("float32", "float64")}
    assert set(agreement) == expected_keys
    assert all(a["optimizer"] == "sgd lr=0.01" for a in agreement.values())  # lr=10 diverged
    for (mode, dtype), found in agreement.items():
        xs = [
            float(r["final_x"]) for r in rows if r["dtype"] == dtype and mode in ("all", r["mode"])
        ]
        pairs = [(a, b) for i, a in enumerate(xs) for b in xs[i + 1 :]]
        assert float(found["abs_diff"]) == max(abs(a - b) for a, b in pairs)
        assert float(found["ulps_float32"]) == pytest.approx(
            max(ulps(a, b, np.float32) for a, b in pairs), rel=1e-12
        )
        if dtype == "float64":
            assert float(found["ulps_float64"]) == pytest.approx(
                max(ulps(a, b, np.float64) for a, b in pairs), rel=1e-12
            )
        else:
            assert found["ulps_float64"] == ""
    manual32 = agreement[("manual", "float32")]
    assert {manual32["pair_a"], manual32["pair_b"]} == {"jax", SECOND}
    shown = markdown_rows((report["out"] / "comparison.md").read_text(), "mode")
    assert [(r["mode"], r["dtype"]) for r in shown] == [
        ("manual", "float32"),
        ("all", "float32"),
        ("manual", "float64"),
        ("all", "float64"),
    ]


def test_plots_and_comparison_run_in_mlflow(store: dict, report: dict) -> None:
    out = report["out"]
    assert is_png(out / "convergence.png") and is_png(out / "step_time.png")
    client = store["client"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.`compare.filters` = '(no filters)'")
    assert len(runs) == 1  # the --no-log and the failed invocations logged nothing
    run = runs[0]
    assert run.info.run_name == "compare all" and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == ARTIFACTS
    logged = Path(client.download_artifacts(run.info.run_id, "comparison.csv", str(out.parent)))
    assert logged.read_text() == (out / "comparison.csv").read_text()
    assert run.data.metrics["agreement_abs/float32/manual"] == float(
        read_csv(out / "agreement.csv")[0]["abs_diff"]
    )


def test_filters_select_one_sweep_and_mode(store: dict, report: dict) -> None:
    code, out, err = report["filtered"]
    assert code == 0, err
    rows = read_csv(store["root"] / "out2" / "comparison.csv")
    assert sorted((r["mode"], r["dtype"]) for r in rows) == [
        ("graph/apply", "float32"),
        ("graph/apply", "float64"),
    ]
    assert all(r["backend"] == "jax" for r in rows)
    assert "files in" in out and "logged to MLflow" not in out


def test_one_backends_modes_are_compared_across_modes_not_as_backends(
    store: dict, report: dict
) -> None:
    """`--backend jax`: the agreement row "all" read as cross-backend agreement for what
    was jax's modes against each other, and the comparison run was named 'compare all'."""
    code, out, err = report["one_backend"]
    assert code == 0, err
    client = store["client"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.`runner.kind` = 'comparison'")
    names = {r.info.run_name for r in runs}
    assert names == {"compare all", f"compare {(store['root'] / 'jax').as_posix()} backend=jax"}
    shown = markdown_rows((store["root"] / "out3" / "comparison.md").read_text(), "mode")
    assert [(r["mode"], r["dtype"], r["backends"]) for r in shown] == [
        ("across modes", "float32", "3 modes"),
        ("across modes", "float64", "3 modes"),
    ]
    assert "agreement of final x across modes (one backend: no mode ran on two backends)" in out
    assert "cross-backend" not in out


def test_bad_input_is_one_line_and_exit_2(report: dict) -> None:
    held = ", ".join(sorted(["jax", SECOND]))
    for name, words in (
        ("bad_experiment", ("no-such-experiment", "not found")),
        ("no_match", ("no finished minimize or derivatives runs", "backend=no-such-backend", held)),
    ):
        code, out, err = report[name]
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert all(word in lines[0] for word in words) and "Traceback" not in err
        assert out == ""


def test_function_logs_to_a_given_run(store: dict, tmp_path: Path) -> None:
    """What the multirun callback does: the files become artifacts of the sweep's parent."""
    from runner.compare.report import compare

    client = store["client"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    parent = client.create_run(exp.experiment_id, tags={"runner.kind": "sweep"})
    sweep_id = (store["root"] / SECOND).as_posix()
    found = compare(
        store["uri"],
        EXPERIMENT,
        sweep_id=sweep_id,
        out_dir=tmp_path,
        log_to_run_id=parent.info.run_id,
        client=client,
    )
    assert found.run_id == parent.info.run_id
    assert [(r.backend, r.dtype) for r in found.rows] == [(SECOND, "float32"), (SECOND, "float64")]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == ARTIFACTS
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # its owner ends it
    assert "vs fastest" in found.text and set(found.files) >= {"markdown", "csv"}


def test_a_sweep_of_vectors_too_long_to_list_gets_its_report(tmp_path: Path) -> None:
    # results.json keeps the norms of an x of more than 10,000 entries, not x: the sweep's
    # report lists the runs and compares no final x (it failed on x = None before).
    sweep = tmp_path / "sweep"
    code, out, err = finish(
        start(
            "runner", "-m", "backend=numpy,jax", "mode=manual", "problem.dim=20000", "steps=3",
            "tracking=off", f"hydra.sweep.dir={sweep}", "progress=false", cwd=tmp_path,
        )
    )  # fmt: skip
    assert code == 0 and "error" not in err, err
    assert "no mode has finished runs of two backends with a listed final x" in out
    rows = read_csv(sweep / "compare" / "comparison.csv")
    assert sorted(r["backend"] for r in rows) == ["jax", "numpy"]
    assert {r["final_x"] for r in rows} == {""}


# ------------------------------------------- backend options: rows of their own, both ways


def composed(*overrides: str) -> dict:
    """The resolved config Hydra hands a run for these overrides (what the run logs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from runner.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["steps=4", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def sgd_run(cfg: dict, shift: float = 0.0) -> tuple[dict, dict[str, np.ndarray]]:
    """results.json and trajectory rows of the config's run, computed here rather than by a
    framework: SGD on the notebook's quadratic, final x moved by `shift` (a rounding)."""
    from runner.config import build_run_config
    from runner.engine import MinimizeOutcome, Timings
    from runner.protocol import Trajectory
    from runner.results import RunIdentity, minimize_result, new_run_uid, trajectory_rows

    spec = build_run_config(cfg).minimize
    xs = [np.float32(spec.problem.x0)]
    for _ in range(spec.steps):
        xs.append(np.float32(xs[-1] - np.float32(spec.optimizer.lr) * (2 * xs[-1] - 2)))
    x = np.array(xs, np.float32)
    final = np.float32(x[-1] + shift)
    trajectory = Trajectory(
        np.arange(spec.steps), x[:-1], (x[:-1] - 1) ** 2, 2 * x[:-1] - 2,
        final, float((final - 1) ** 2), np.float32(2 * final - 2), spec.steps,
    )  # fmt: skip
    outcome = MinimizeOutcome(trajectory, Timings(0.5, 0.001 * (1 + shift), spec.steps))
    name = cfg["backend"]["name"]
    result = minimize_result(spec, outcome, RunIdentity(name, name, "cpu", {}, new_run_uid()))
    return result, trajectory_rows(spec, outcome)


def run_folders(root: Path, runs: dict[str, tuple[tuple[str, ...], float]]) -> Path:
    """Run folders as the CLI leaves them (results.json, trajectory.csv, .hydra/config.yaml)."""
    from omegaconf import OmegaConf

    from runner.results import RESULTS_FILE, TRAJECTORY_FILE, write_json, write_trajectory

    for name, (overrides, shift) in runs.items():
        cfg = composed(*overrides)
        result, rows = sgd_run(cfg, shift)
        folder = root / name
        write_json(folder / RESULTS_FILE, result)
        write_trajectory(folder / TRAJECTORY_FILE, rows)
        (folder / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create(cfg), folder / ".hydra" / "config.yaml")
    return root


OPTION_RUNS = {  # tf with and without XLA, numpy at two conventions: four rows
    "xla": (("backend=tf", "mode=graph", "backend.jit_compile=true"), 2.0**-20),
    "plain": (("backend=tf", "mode=graph", "backend.jit_compile=false"), 0.0),
    "numpy_tf": (("backend=numpy", "backend.convention=tf"), 0.0),
    "numpy_paper": (("backend=numpy",), 0.0),
}
OPTION_ROWS = [  # row_order: dtype, optimizer, mode (eager first), backend
    ("numpy", "manual"),
    ("numpy+convention=tf", "manual"),
    ("tf", "graph/apply"),
    ("tf+jit_compile", "graph/apply"),
]


def test_a_result_is_labelled_with_its_non_default_backend_options() -> None:
    from runner.compare.rows import row_from_result

    result, _ = sgd_run(composed("backend=tf", "mode=graph", "backend.jit_compile=true"))
    assert result["options"] == {"jit_compile": True, "legacy_optimizers": False}
    cases = {
        "tf+jit_compile": ("tf", {"jit_compile": True, "legacy_optimizers": False}),
        "tf+jit_compile+legacy_optimizers": (
            "tf", {"legacy_optimizers": True, "jit_compile": True},
        ),
        "tf": ("tf", {"jit_compile": False, "legacy_optimizers": False}),
        "numpy+convention=tf": ("numpy", {"convention": "tf"}),
        "numpy": ("numpy", {"convention": "paper"}),
        "torch+cpp_wrapper=false": ("torch", {"cpp_wrapper": False, "unroll": 4}),
        "torch+scan_chunk=10+unroll=8": ("torch", {"unroll": 8, "scan_chunk": 10}),
        # a plugin without a yaml: false and null are its defaults
        "abacus+fast+lanes=3": ("abacus", {"fast": True, "slow": False, "lanes": 3, "x": None}),
    }  # fmt: skip
    run = {"run_id": "", "run_name": "", "started": ""}
    for label, (backend, options) in cases.items():
        row = row_from_result({**result, "backend": backend, "options": options}, **run)
        assert row is not None and row.backend == label
    older = {k: v for k, v in result.items() if k != "options"}  # before results.json had them
    assert row_from_result(older, **run).backend == "tf"


def test_an_option_without_effect_makes_no_backend_of_its_own(tmp_path: Path) -> None:
    """`backend.legacy_optimizers=true mode=manual`: the hand-written rule uses no Keras
    optimizer, and SGD's reads nothing of the legacy convention, so the run records the
    options it used (none) and the comparison calls it `tf`, one backend with the plain
    run; Adagrad's legacy rule (eps outside the root) keeps its own label."""
    from omegaconf import OmegaConf

    from runner.compare.rows import row_from_result

    pytest.importorskip("tensorflow")
    proc = cli(
        "-m", "backend=tf", "mode=manual", "backend.legacy_optimizers=true,false",
        "optimizer=sgd,adagrad", "steps=20", "tracking=off",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = {"run_id": "", "run_name": "", "started": ""}
    found: dict[tuple[str, bool], tuple[dict, str]] = {}
    for path in (tmp_path / "sweep").glob("*/results.json"):
        result = json.loads(path.read_text())
        asked = OmegaConf.load(path.parent / ".hydra" / "config.yaml").backend
        row = row_from_result(result, **run)
        assert row is not None
        found[result["optimizer"]["name"], asked.legacy_optimizers] = (
            result["options"],
            row.backend,
            result["optimizer_used"]["convention"],
        )
    assert found == {
        ("sgd", True): ({}, "tf", "tf"),  # was {"jit_compile": False, ...: True}, tf_legacy
        ("sgd", False): ({}, "tf", "tf"),
        ("adagrad", True): ({"legacy_optimizers": True}, "tf+legacy_optimizers", "tf_legacy"),
        ("adagrad", False): ({}, "tf", "tf"),  # was {"legacy_optimizers": False}
    }


@pytest.mark.parametrize(
    ("optimizer", "convention", "dtype", "used"),
    [
        ("sgd", "tf", "float32", {}),  # SGD reads nothing of a convention
        ("adam", "torch", "float32", {}),  # the papers' rule under another name
        ("adam", "jax", "float64", {}),  # bias correction in float64 either way
        ("adam", "jax", "float32", {"convention": "jax"}),  # ... not in float32
        ("adagrad", "tf", "float64", {"convention": "tf"}),  # eps inside the root
    ],
)
def test_a_numpy_convention_without_effect_makes_no_backend_of_its_own(
    optimizer: str, convention: str, dtype: str, used: dict
) -> None:
    """`backend=numpy backend.convention=tf optimizer=sgd` was `numpy+convention=tf`, a
    row identical to numpy's: the run records the convention only where it changes the
    rule the reference follows."""
    from backends.numpy import NumpyBackend
    from runner.compare.rows import backend_label
    from tests.specs import notebook_spec

    spec = notebook_spec("manual", name=optimizer, dtype=dtype, options={"convention": convention})
    assert NumpyBackend().options_used(spec) == used
    assert NumpyBackend().convention(spec).name == used.get("convention", "paper")  # the record
    assert backend_label("numpy", used) == (
        "numpy" if not used else f"numpy+convention={convention}"
    )


def test_rows_order_numbers_as_numbers() -> None:
    """An lr sweep's rows come in the order of their lr, not of its text."""
    from runner.compare.rows import numbers_in_order, row_from_result, row_order

    result, _ = sgd_run(composed("backend=numpy"))
    run = {"run_id": "", "run_name": "", "started": ""}
    rows = [
        row_from_result({**result, "optimizer": {"name": "sgd", "lr": lr}}, **run)
        for lr in (0.5, 5e-05, 0.002, 10.0)
    ]
    assert [r.optimizer for r in sorted(rows, key=row_order)] == [
        "sgd lr=5e-05", "sgd lr=0.002", "sgd lr=0.5", "sgd lr=10"
    ]  # fmt: skip
    assert numbers_in_order("quadratic_form dim=10") > numbers_in_order("quadratic_form dim=9")


def test_runs_differing_only_by_an_option_are_rows_of_their_own(
    tmp_path: Path, fresh_store
) -> None:
    from runner.compare.report import compare, compare_folder
    from runner.upload import upload

    runs = run_folders(tmp_path / "runs", OPTION_RUNS)
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([runs], uri, EXPERIMENT, out=io.StringIO())
    from_store = compare(uri, EXPERIMENT, out_dir=tmp_path / "store", log=False)
    from_folders = compare_folder(runs, EXPERIMENT, tmp_path / "folders")  # a sweep's own
    for report in (from_store, from_folders):
        assert [(r.backend, r.mode) for r in report.rows] == OPTION_ROWS
        assert {r.source for r in report.rows} == {"results.json"}
        # XLA on and off agree (or not) like two backends do
        agreement = {a.mode: a for a in report.agreement}
        assert agreement["graph/apply"].compared == ["tf", "tf+jit_compile"]
        assert agreement["graph/apply"].abs_diff > 0
        assert agreement["manual"].compared == ["numpy", "numpy+convention=tf"]
    written = read_csv(tmp_path / "store" / "comparison.csv")
    assert [(r["backend"], r["mode"]) for r in written] == OPTION_ROWS
    # --backend takes a label (that backend at those options) or a name (all of them)
    for backends, want in ((["tf+jit_compile"], OPTION_ROWS[3:]), (["tf"], OPTION_ROWS[2:])):
        some = compare(uri, EXPERIMENT, backends=backends, out_dir=tmp_path / "f", log=False)
        assert [(r.backend, r.mode) for r in some.rows] == want


def test_started_is_when_the_run_started_in_both_reports(tmp_path: Path, fresh_store) -> None:
    """A sweep's own report took results.json's time, the run's end, for `started`, where
    compare's report from MLflow has the run's start (Hydra's .hydra/config.yaml)."""
    from datetime import datetime

    from runner.compare.report import compare, compare_folder
    from runner.upload import upload

    runs = run_folders(tmp_path / "runs", OPTION_RUNS)
    began = 1_700_000_000
    for folder in runs.iterdir():
        os.utime(folder / ".hydra" / "config.yaml", (began, began))
        os.utime(folder / "results.json", (began + 90, began + 90))
    from_folders = compare_folder(runs, EXPERIMENT, tmp_path / "folders")
    start = datetime.fromtimestamp(began).isoformat(timespec="seconds")
    assert {row.started for row in from_folders.rows} == {start}
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([runs], uri, EXPERIMENT, out=io.StringIO())
    from_store = compare(uri, EXPERIMENT, out_dir=tmp_path / "store", log=False)
    assert {row.started for row in from_store.rows} == {start}


def test_the_metrics_fallback_labels_options_from_the_logged_params(
    tmp_path: Path, fresh_store
) -> None:
    from urllib.parse import urlsplit

    from runner.compare.report import compare
    from runner.compare.store import open_client
    from runner.results import RESULTS_FILE
    from runner.upload import upload

    uri = fresh_store(tmp_path / "mlflow.db")
    upload([run_folders(tmp_path / "runs", OPTION_RUNS)], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    logged = client.search_runs([experiment.experiment_id], "tags.task = 'minimize'")
    tf_runs = [r for r in logged if r.data.tags["backend"] == "tf"]
    assert {r.data.params["backend.jit_compile"] for r in tf_runs} == {"True", "False"}
    artifacts = [Path(urlsplit(r.info.artifact_uri).path) / RESULTS_FILE for r in logged]
    for path in artifacts:  # results.json as written before it held the options
        older = {k: v for k, v in json.loads(path.read_text()).items() if k != "options"}
        path.write_text(json.dumps(older))
    report = compare(uri, EXPERIMENT, out_dir=tmp_path / "older", client=client, log=False)
    assert [(r.backend, r.mode) for r in report.rows] == OPTION_ROWS
    assert {r.source for r in report.rows} == {"results.json"}
    keys = [r.key for r in report.rows]
    for path in artifacts:  # the artifact store lost results.json: only the params say XLA
        path.unlink()
    report = compare(uri, EXPERIMENT, out_dir=tmp_path / "out", client=client, log=False)
    assert [(r.backend, r.mode) for r in report.rows] == OPTION_ROWS
    assert {r.source for r in report.rows} == {"metrics"}
    # the same configurations: params 'False' and 'None' read back as False and None (SGD's
    # label read `sgd lr=0.01 nesterov=False`, a group of its own, out of the agreement)
    assert [r.key for r in report.rows] == keys


def test_a_diverged_run_without_final_loss_metrics_is_compared(tmp_path: Path, fresh_store) -> None:
    """A diverged run logs no final_loss or error_loss (inf would be stored as 1.8e308, a
    finite-looking number): its row reads them from results.json, or, where the artifact
    store lost that, has none (nan), where it read 1.8e308 before."""
    from urllib.parse import urlsplit

    from runner.compare.report import compare
    from runner.compare.store import open_client
    from runner.results import RESULTS_FILE
    from runner.upload import upload

    args = ("backend=numpy", "optimizer.lr=1.5", "steps=300", "tracking=off", "progress=false")
    code, _, err = finish(start("runner", *args, cwd=tmp_path))
    assert code == 3, err
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([tmp_path / "outputs" / "runs"], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.data.tags["status"] == "diverged"
    assert not {"final_loss", "error_loss"} & set(run.data.metrics)
    report = compare(uri, EXPERIMENT, out_dir=tmp_path / "from_results", client=client, log=False)
    (row,) = report.rows
    assert (row.status, row.source, row.loss) == ("diverged", RESULTS_FILE, math.inf)
    (Path(urlsplit(run.info.artifact_uri).path) / RESULTS_FILE).unlink()
    report = compare(uri, EXPERIMENT, out_dir=tmp_path / "from_metrics", client=client, log=False)
    (row,) = report.rows
    assert (row.status, row.source) == ("diverged", "metrics")
    assert math.isnan(row.loss) and math.isnan(row.error_loss)
    assert row.x == run.data.metrics["final_x"] and row.steps_run == run.data.metrics["steps_run"]
    assert (tmp_path / "from_metrics" / "comparison.md").is_file()


class CountingClient:
    """An MlflowClient that counts its search_runs calls."""

    def __init__(self, client: Any) -> None:
        self.client, self.searches = client, 0

    def search_runs(self, *args: Any, **kwargs: Any) -> Any:
        self.searches += 1
        return self.client.search_runs(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def test_a_sweep_still_being_logged_is_said(tmp_path: Path, fresh_store) -> None:
    """Compared while its logger is still uploading (its parent run RUNNING), a sweep's
    report may lack its last jobs: one stderr line and a note in the header say so, at the
    cost of one search; it said "2 matching, 2 rows" of the sweep's 3 jobs, no warning."""
    from runner.compare.report import compare
    from runner.compare.store import open_client
    from runner.sweep_record import SweepInfo, read_sweep, sweep_id_of, write_sweep
    from runner.tracking import start_sweep_parent
    from runner.tracking_store import resolve_target
    from runner.upload import Uploader

    jobs = {f"{i}_job": ((f"optimizer.lr={lr}",), 0.0) for i, lr in enumerate((0.01, 0.1, 0.2))}
    sweep = run_folders(tmp_path / "sweep", jobs)
    sweep_id = sweep_id_of(sweep)
    write_sweep(sweep, SweepInfo(sweep_id, None))
    uri = fresh_store(tmp_path / "mlflow.db")
    warning = (
        f"sweep {sweep_id} is still being logged (its parent run is RUNNING): the report "
        "may lack its last jobs; if its logger has stopped (upload.log in the sweep's folder "
        f"does not end in `done`), `python -m runner.upload {sweep_id}` records them"
    )
    # its logger made the parent run and has logged no job yet: the sweep was said to
    # have no runs, and a report of the whole experiment left it out, unwarned
    logger = Uploader(uri, EXPERIMENT, out=io.StringIO(), live=True)
    target = resolve_target({"uri": uri, "experiment": EXPERIMENT}, tmp_path)
    start_sweep_parent(*logger.store(target), sweep, read_sweep(sweep))  # as runner.follow
    code, _, err = main_in_process("--tracking-uri", uri, "--sweep", sweep_id, "--no-log")
    assert code == 2
    assert err == (
        f"error: no finished minimize or derivatives runs in experiment '{EXPERIMENT}' match "
        f"sweep={sweep_id}; {warning}\n"
    )
    for name in sorted(jobs)[:2]:  # the third job is not logged yet
        logger.add_run(sweep / name)
    for selection in ((), ("--sweep", sweep_id)):
        out = tmp_path / f"out{len(selection)}"
        code, stdout, err = main_in_process(
            "--tracking-uri", uri, *selection, "--no-log", "--out", str(out)
        )
        assert code == 0, err
        assert err.splitlines() == [f"warning: {warning}"]
        assert "2 matching, 2 rows" in stdout
        assert f"- warning: {warning}\n" in (out / "comparison.md").read_text()
    client = CountingClient(open_client(uri))
    compare(uri, EXPERIMENT, out_dir=tmp_path / "counted", client=client, log=False)
    assert client.searches == 2  # the runs (one page), and the sweeps still RUNNING
    logger.add_run(sweep / sorted(jobs)[2])
    logger.close_parents()  # the sweep is logged: nothing to say
    out = tmp_path / "out-logged"  # a new folder: --out refuses one that holds files
    code, stdout, err = main_in_process("--tracking-uri", uri, "--no-log", "--out", str(out))
    assert code == 0 and err == "", err
    assert "3 matching, 3 rows" in stdout and "warning" not in (out / "comparison.md").read_text()


def test_agreement_compares_rows_of_one_problem_only() -> None:
    """problem.a=1 (results.json's int) and the default 1.0 are one problem, as in the
    table (the note said 'problems differ' for them); rows of two problems are not
    compared at all (a scalar's x against a 5-vector's read 2.1e9 ulps), each problem
    with the rows of its own."""
    from runner.compare.agreement import agreement_of
    from runner.compare.rows import row_from_result

    result, _ = sgd_run(composed("backend=jax"))
    run = {"run_id": "", "run_name": "", "started": ""}

    def row(backend: str, a: float) -> Any:
        problem = {**result["problem"], "a": a}
        return row_from_result({**result, "backend": backend, "problem": problem}, **run)

    (same,) = agreement_of([row("jax", 1.0), row("torch", 1)])
    assert same.note == ""
    assert agreement_of([row("jax", 1.0), row("torch", 2)]) == []
    a2 = [row("jax", 1.0), row("torch", 2), row("tf", 2)]
    (other,) = agreement_of(a2)
    assert other.compared == ["torch", "tf"] and other.setup  # named by its problem


def test_agreement_note_names_the_arithmetic_that_parts_rows_and_each_row() -> None:
    """tf against tf+legacy_optimizers (Adam, float32): 1 - beta in float32 parts them;
    the note had blamed the bias correction, said to be float64 for legacy optimizers (it
    is float32 there too: test_backend_tf_issue4). And one backend's two rows are named as
    the table names them ('torch graph/apply', 'torch graph/manual'), not 'torch' twice."""
    from runner.compare.agreement import agreement_of
    from runner.compare.rows import row_from_result

    result, _ = sgd_run(composed("backend=jax"))
    run = {"run_id": "", "run_name": "", "started": ""}
    adam = {"name": "adam", "lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-07}

    def row(backend: str, convention: str, x: float, **result_keys: Any) -> Any:
        used = {**adam, "convention": convention}
        changed = {"backend": backend, "optimizer": adam, "optimizer_used": used, "final_x": x}
        return row_from_result({**result, **changed, **result_keys}, **run)

    legacy = {"options": {"legacy_optimizers": True}}
    (tf,) = agreement_of(
        [row("tf", "tf", 0.19151743), row("tf", "tf_legacy", 0.19151859, **legacy)]
    )
    assert tf.note == "1 - beta in float64 (tf), run dtype (tf+legacy_optimizers)"
    torch = [
        row("torch", "torch_compiled", 0.1915185, mode="graph", update="apply"),
        row("torch", "torch", 0.19151856, mode="graph", update="manual"),
    ]
    (across,) = agreement_of(torch)
    assert across.note == (
        "bias correction in run dtype (torch graph/apply), float64 (torch graph/manual)"
    )


def test_agreement_names_the_framework_defaults_that_differ(tmp_path: Path, fresh_store) -> None:
    """Adam under TF's conventions (eps 1e-7, epsilon-hat) against the papers' (1e-8, eps on
    sqrt(v_hat)): the agreement note says so, from results.json and from MLflow's tags."""
    from urllib.parse import urlsplit

    from runner.compare.report import compare
    from runner.compare.store import open_client
    from runner.results import RESULTS_FILE
    from runner.upload import upload

    sweep = tmp_path / "sweep"
    code, out, err = finish(
        start(
            "runner", "-m", "backend=numpy", "backend.convention=tf,paper", "optimizer=adam",
            "steps=20", "tracking=off", f"hydra.sweep.dir={sweep}", "progress=false",
            cwd=tmp_path,
        )
    )  # fmt: skip
    assert code == 0, err
    want = (
        "eps 1e-08 (numpy), 1e-07 (numpy+convention=tf); "
        "eps form on sqrt(v_hat) (numpy), epsilon-hat (numpy+convention=tf); "
        "bias correction in float64 (numpy), run dtype (numpy+convention=tf)"
    )
    (written,) = read_csv(sweep / "compare" / "agreement.csv")
    assert written["note"] == want
    # the sweep's printed report: below the table, a difference a line (in the table,
    # every line was padded to the note's ~200 characters and wrapped)
    table_row = next(line for line in out.splitlines() if line.startswith("manual  float32"))
    assert table_row.endswith("  [1]")
    assert "[1] " + want.replace("; ", "\n    ") in out
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([sweep], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    (agreement,) = compare(uri, EXPERIMENT, out_dir=tmp_path / "a", client=client).agreement
    assert agreement.note == want
    experiment = client.get_experiment_by_name(EXPERIMENT)
    for run in client.search_runs([experiment.experiment_id], "tags.task = 'minimize'"):
        (Path(urlsplit(run.info.artifact_uri).path) / RESULTS_FILE).unlink()
    report = compare(uri, EXPERIMENT, out_dir=tmp_path / "b", client=client, log=False)
    assert {r.source for r in report.rows} == {"metrics"}
    assert [a.note for a in report.agreement] == [want]


# ------------------------------- what was run: one row per configuration, repeats once

SETUP_RUNS = {  # numpy at three setups, jax at two, and an older run of one numpy setup
    "numpy_older": (("backend=numpy",), 2.0**-20),
    "numpy": (("backend=numpy",), 0.0),
    "numpy_8_steps": (("backend=numpy", "steps=8"), 0.0),
    "numpy_x0_5": (("backend=numpy", "problem.x0=5"), 0.0),
    "jax": (("backend=jax",), 0.0),
    "jax_8_steps": (("backend=jax", "steps=8"), 0.0),
}
SETUP_ROWS = [  # row_order: problem, steps, then mode and backend
    ("jax", "quadratic x0=0", 4),
    ("numpy", "quadratic x0=0", 4),
    ("jax", "quadratic x0=0", 8),
    ("numpy", "quadratic x0=0", 8),
    ("numpy", "quadratic x0=5", 4),
]


def test_runs_differing_in_steps_or_problem_are_rows_of_their_own(
    tmp_path: Path, fresh_store
) -> None:
    """Only repeats of one configuration share a row (the latest run); runs at other steps
    or another x0 were dropped before, leaving one row per backend x mode x optimizer x dtype."""
    from runner.compare.report import compare, compare_folder
    from runner.compare.store import open_client
    from runner.upload import upload

    runs = run_folders(tmp_path / "runs", SETUP_RUNS)
    older = json.loads((runs / "numpy_older" / "results.json").read_text())
    older["device"] = "cpu:0"  # a framework's own name, as runs were logged before device_kind
    (runs / "numpy_older" / "results.json").write_text(json.dumps(older))
    for age, name in enumerate(reversed(SETUP_RUNS)):  # numpy_older is the oldest
        for path in (runs / name / "results.json", runs / name / ".hydra" / "config.yaml"):
            os.utime(path, (1.7e9 - 60 * age, 1.7e9 - 60 * age))
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([runs], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    from_store = compare(uri, EXPERIMENT, out_dir=tmp_path / "store", client=client)
    from_folders = compare_folder(runs, EXPERIMENT, tmp_path / "folders")
    for report, source in ((from_store, "store"), (from_folders, "folders")):
        assert [(r.backend, r.problem["x0"], r.steps) for r in report.rows] == [
            (b, float(p[-1]), s) for b, p, s in SETUP_ROWS
        ]  # 2 rows before, one per backend
        assert [r.problem_label for r in report.rows] == [p for _, p, _ in SETUP_ROWS]
        assert report.rows[1].run_s == 0.001  # the repeat's latest run, not numpy_older
        title = report.text.splitlines()[0]
        assert title.endswith(
            ", 5 rows (one per configuration; 1 earlier repeat of an identical "
            "configuration left out)"
        ), title
        # the tables say what tells the rows apart: a problem column, steps; no device
        shown = markdown_rows((tmp_path / source / "comparison.md").read_text(), "backend")
        assert [(r["backend"], r["problem"], r["steps"]) for r in shown] == [
            (b, p, str(s)) for b, p, s in SETUP_ROWS
        ]
        assert "device" not in shown[0]
        # backends are compared like with like: numpy x0=5 has no jax run to agree with
        assert [(a.mode, a.setup, a.compared, a.note) for a in report.agreement] == [
            ("manual", "quadratic x0=0 steps=4", ["jax", "numpy"], ""),
            ("manual", "quadratic x0=0 steps=8", ["jax", "numpy"], ""),
        ]
    written = read_csv(tmp_path / "store" / "comparison.csv")
    assert [(r["backend"], r["problem"], int(r["steps"])) for r in written] == SETUP_ROWS
    assert json.loads(written[4]["problem_settings"])["x0"] == 5
    assert {r["setup"] for r in read_csv(tmp_path / "store" / "agreement.csv")} == {
        "quadratic x0=0 steps=4",
        "quadratic x0=0 steps=8",
    }
    logged = client.get_run(from_store.run_id).data.metrics
    assert logged["compare.rows"] == 5
    assert "agreement_abs/float32/manual/quadratic x0_0 steps_8" in logged  # one per setup


def test_rows_of_other_step_counts_are_never_compared(tmp_path: Path) -> None:
    """jax and numpy at 4 steps, torch at 8, one row each: the group was not split (no
    backend had two rows) and its headline was torch's 8-step x against a 4-step one,
    noted `steps differ`, where the same report split such rows elsewhere."""
    from runner.compare.report import compare_folder

    runs = run_folders(
        tmp_path / "runs",
        {
            "jax": (("backend=jax", "steps=4"), 2.0**-24),
            "numpy": (("backend=numpy", "steps=4"), 0.0),
            "torch": (("backend=torch", "steps=8"), 0.0),
        },
    )
    report = compare_folder(runs, EXPERIMENT, tmp_path / "out")
    assert [(a.mode, a.setup, a.compared, a.note) for a in report.agreement] == [
        ("manual", "steps=4", ["jax", "numpy"], "")
    ]


def test_a_sweep_over_problems_keeps_every_problem(tmp_path: Path) -> None:
    """`problem=quadratic_form,rosenbrock` showed the last problem's row only."""
    sweep = tmp_path / "sweep"
    code, out, err = finish(
        start(
            "runner", "-m", "backend=numpy", "problem=quadratic_form,rosenbrock", "steps=20",
            "tracking=off", f"hydra.sweep.dir={sweep}", "progress=false", cwd=tmp_path,
        )
    )  # fmt: skip
    assert code == 0, err
    assert "2 finished, 2 rows (one per run)" in out
    rows = read_csv(sweep / "compare" / "comparison.csv")
    assert sorted(r["problem"] for r in rows) == ["quadratic_form", "rosenbrock"]
    shown = markdown_rows((sweep / "compare" / "comparison.md").read_text(), "backend")
    assert sorted(r["problem"] for r in shown) == ["quadratic_form", "rosenbrock"]


def test_an_unreachable_server_is_one_line_in_compares_own_flags() -> None:
    """The store's advice names compare's --tracking-uri, and not tracking=off: compare
    cannot do without the store it reads."""
    away = f"http://127.0.0.1:{free_port()}"
    code, out, err = main_in_process("--tracking-uri", away, "--no-log")
    assert code == 4 and out == ""
    assert err == (
        f"error: tracking server {away} is unreachable (ConnectionRefusedError); "
        "start it or point --tracking-uri elsewhere\n"
    )


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_is_one_line_and_leaves_the_store_as_it_was(
    tmp_path: Path, fresh_store, signum: int, code: int, word: str
) -> None:
    """Ctrl-C while compare opens the store (MLflow's SQLAlchemy store imports for ~2 s)
    was a traceback ending in SQLAlchemy's KeyboardInterrupt; SIGTERM ended it silently."""
    db = tmp_path / "mlflow.db"
    uri = fresh_store(db)
    before = db.read_bytes()
    out = tmp_path / "report"
    args = ["-m", "runner.compare", "--tracking-uri", uri, "--out", str(out), "--no-log"]
    proc = ctrl_c(args, tmp_path, imported("sqlalchemy"), signum=signum)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == f"{word}\n"
    assert db.read_bytes() == before and not out.exists()


def test_sweep_is_found_however_its_folder_is_spelt(store: dict, monkeypatch) -> None:
    """The sweep's tag is its folder as the sweep was given it (absolute here); typed
    relative to the current folder, with a tab-completed trailing slash, it still matches."""
    monkeypatch.chdir(store["root"])
    code, out, err = main_in_process(
        "--tracking-uri", store["uri"], "--sweep", "extra/", "--no-log",
        "--out", str(store["root"] / "out-spelt"),
    )  # fmt: skip
    assert code == 0, err
    assert f"sweep={(store['root'] / 'extra').as_posix()}; 2 matching, 2 rows" in out


# ------------------------------------------ bad input: one line; the report's wording


def test_bad_arguments_are_one_line_before_the_store_is_read(tmp_path: Path) -> None:
    """An --out that cannot be made was mkdir's traceback (FileExistsError, exit 1), after
    the store was read; argparse's own errors came under a usage block. The store here does
    not exist: the --out line coming first shows nothing was read."""
    a_file = tmp_path / "afile"
    a_file.write_text("")
    away = f"sqlite:///{tmp_path / 'none.db'}"
    for out, problem in (
        (a_file, f"{a_file} is a file, not a folder"),
        (a_file / "sub", f"{a_file} is a file, not a folder"),
        (Path("/proc/x"), "no file can be made in /proc (No such file or directory)"),
    ):
        code, text, err = main_in_process("--tracking-uri", away, "--no-log", "--out", str(out))
        assert (code, text) == (2, "")
        assert err == (
            f"error: --out {out} cannot be written: {problem}; give --out a folder you can "
            "write in\n"
        )
    code, text, err = main_in_process("--tracking-uri", away, "--no-such-flag")
    assert (code, text, err) == (2, "", "error: unrecognized arguments: --no-such-flag\n")


def test_a_missing_store_is_told_apart_from_the_default(tmp_path: Path, monkeypatch) -> None:
    """A --tracking-uri to no file was told to give --tracking-uri."""
    monkeypatch.chdir(tmp_path)
    code, _, err = main_in_process("--tracking-uri", "sqlite:///nonexist.db", "--no-log")
    assert code == 2
    assert err == (
        f"error: no MLflow store at {tmp_path / 'nonexist.db'}; check the path in "
        "--tracking-uri, or omit --tracking-uri to read the default store outputs/mlflow.db\n"
    )
    code, _, err = main_in_process("--no-log")
    assert code == 2
    assert err == (
        f"error: no MLflow store at {tmp_path / 'outputs' / 'mlflow.db'} (the default store, "
        "outputs/mlflow.db under the current folder); run from the folder the runs were "
        "started in, or give --tracking-uri\n"
    )
    # an empty file is no store (MLflow wrote its tables into it), a folder is none either
    (tmp_path / "empty.db").touch()
    (tmp_path / "folder.db").mkdir()
    for name, what in (("empty.db", "an empty file"), ("folder.db", "a folder")):
        code, _, err = main_in_process("--tracking-uri", f"sqlite:///{name}", "--no-log")
        assert code == 2
        assert err.startswith(f"error: no MLflow store at {tmp_path / name} ({what}); check")
    assert (tmp_path / "empty.db").stat().st_size == 0


def test_a_filter_that_matches_nothing_lists_what_there_is(tmp_path: Path, fresh_store) -> None:
    """`--backend keras` did not say which backends the store holds."""
    from runner.upload import upload

    uri = fresh_store(tmp_path / "mlflow.db")
    upload([run_folders(tmp_path / "runs", OPTION_RUNS)], uri, EXPERIMENT, out=io.StringIO())
    code, _, err = main_in_process("--tracking-uri", uri, "--backend", "keras", "--no-log")
    assert code == 2
    assert err == (
        "error: no finished minimize or derivatives runs in experiment 'gradient-runner' match "
        "backend=keras; backends there: numpy, numpy+convention=tf, tf, tf+jit_compile\n"
    )
    code, _, err = main_in_process(
        "--tracking-uri", uri, "--backend", "tf", "--mode", "manual", "--no-log"
    )
    assert code == 2
    assert err.endswith(
        "match backend=tf mode=manual; backends there (mode=manual): numpy, "
        "numpy+convention=tf; modes there (backend=tf): graph/apply\n"
    )


def test_the_fastest_finished_run_is_the_reference(tmp_path: Path) -> None:
    """A diverged run that stopped early was the 1.0x row when its steps were quickest."""
    from runner.compare.report import compare_folder

    runs = run_folders(
        tmp_path / "runs",
        {
            "slow": (("backend=numpy",), 1.0),
            "fast": (("backend=jax",), 0.0),
            "blew_up": (("backend=jax", "optimizer.lr=1.5"), 0.0),
        },
    )
    path = runs / "blew_up" / "results.json"
    blew_up = json.loads(path.read_text())
    blew_up.update(status="diverged", steps_run=2, loss=math.inf)
    blew_up["timings"]["step_us"] = 200.0  # the finished runs: 250 and 500 us a step
    path.write_text(json.dumps(blew_up))
    report = compare_folder(runs, EXPERIMENT, tmp_path / "out")
    assert [(r.backend, r.status, r.relative) for r in report.rows] == [
        ("jax", "finished", 1.0),
        ("numpy", "finished", 2.0),
        ("jax", "diverged", 0.8),  # timed over the steps it ran, against the reference
    ]
    shown = markdown_rows((tmp_path / "out" / "comparison.md").read_text(), "backend")
    assert [r["vs fastest"] for r in shown] == ["1.0x", "2.00x", "0.8x"]


def test_the_sweep_report_counts_and_lists_skipped_and_failed_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_store
) -> None:
    """'1 finished, 1 skipped, 1 failed, 1 row' for a sweep whose second job was skipped
    (numpy mode=graph) and whose third failed (a bad setting); each is listed after the
    table, with why: only stderr said which job it was, and why. The sweep is named by
    its MLflow group (sweep_id: the absolute path) though its folder is given relative.
    The report from MLflow lists them too (it said '1 matching, 1 row', nothing more)."""
    from omegaconf import OmegaConf

    from runner.compare.report import compare_folder
    from runner.errors import ConfigError
    from runner.results import record_job_failure

    runs = run_folders(tmp_path / "runs", {"0_ran": (("backend=numpy",), 0.0)})
    skipped = json.loads((runs / "0_ran" / "results.json").read_text())
    skipped.update(status="skipped", mode="graph", reason="NumPy has no compiler", run_uid="s")
    (runs / "1_skipped").mkdir()
    (runs / "1_skipped" / "results.json").write_text(json.dumps(skipped))
    failed = runs / "2_failed"  # stopped before a result: its config and its failure
    (failed / ".hydra").mkdir(parents=True)
    OmegaConf.save(composed("backend=jax", "problem.a=-1"), failed / ".hydra" / "config.yaml")
    (failed / ".hydra" / "overrides.yaml").write_text("- backend=jax\n- problem.a=-1\n")
    record_job_failure(failed, ConfigError("problem.a=-1.0: a*x^2 has no minimum\nmore"))
    monkeypatch.chdir(tmp_path)
    report = compare_folder(Path("runs"), EXPERIMENT, tmp_path / "out")
    lines = report.text.splitlines()
    assert lines[0] == (
        f"{EXPERIMENT}: sweep {runs.as_posix()}; 1 finished, 1 skipped, 1 failed, 1 row "
        "(one per run)"
    )
    listed = [
        "skipped: numpy graph: NumPy has no compiler",
        "failed: jax manual: problem.a=-1.0: a*x^2 has no minimum",  # the setting said once
    ]
    assert lines[4:7] == ["", *listed]  # after the title, the header, the rule and one row
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert (
        "## Skipped and failed jobs\n\n- skipped: numpy graph: NumPy has no compiler\n" in markdown
    )
    assert "- failed: jax manual: problem.a=-1.0: a\\*x^2 has no" in markdown
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [h["status"] for h in saved["skipped_and_failed"]] == ["skipped", "failed"]

    from runner.compare.report import compare
    from runner.upload import upload

    uri = fresh_store(tmp_path / "mlflow.db")
    upload([runs], uri, EXPERIMENT, out=io.StringIO())
    logged = compare(uri, EXPERIMENT, out_dir=tmp_path / "logged", log=False)
    assert "(no filters); 1 matching, 1 skipped, 1 failed, 1 row" in logged.text
    assert logged.text.splitlines()[4:7] == ["", *listed]


def test_jobs_skipped_for_one_reason_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4-mode x 2-optimizer x 2-dtype NumPy sweep listed the same reason 12 times: the
    jobs of one reason are one line, their overrides merged as a sweep writes them;
    comparison.json keeps one entry per job."""
    from runner.compare.report import compare_folder

    runs = run_folders(tmp_path / "runs", {"0_ran": (("backend=numpy",), 0.0)})
    result = json.loads((runs / "0_ran" / "results.json").read_text())
    why = "NumPy has no optimizer objects or compiler"
    jobs = [(m, o, d) for m in ("apply", "minimize") for o in ("sgd", "adam") for d in ("a", "b")]
    for i, (mode, opt, dtype) in enumerate(jobs, start=1):
        folder = runs / f"{i}_skipped"
        (folder / ".hydra").mkdir(parents=True)
        overrides = ["backend=numpy", f"mode={mode}", f"optimizer={opt}", f"+tag={dtype}"]
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        skipped = {**result, "status": "skipped", "mode": mode, "reason": why}
        (folder / "results.json").write_text(json.dumps(skipped))
    lone = runs / "9_skipped"  # another reason: a line of its own
    lone.mkdir()
    (lone / "results.json").write_text(json.dumps({**skipped, "reason": "another"}))
    monkeypatch.chdir(tmp_path)
    report = compare_folder(Path("runs"), EXPERIMENT, tmp_path / "out")
    listed = [
        f"skipped, 8 jobs (numpy apply, numpy minimize; optimizer=sgd,adam; +tag=a,b): {why}",
        "skipped: numpy minimize: another",
    ]
    assert report.text.splitlines()[4:7] == ["", *listed]
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert "".join(f"- {line}\n" for line in listed) in markdown
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert len(saved["skipped_and_failed"]) == 9
    assert saved["skipped_and_failed"][0] == {
        "status": "skipped",
        "job": "numpy apply optimizer=sgd +tag=a",
        "reason": why,
    }


def test_agreement_ulps_are_in_the_rows_dtype(tmp_path: Path) -> None:
    """The table's one ulps column was 'float32 ulps' for float64 rows too: float64 runs
    a float64 ulp apart read as 5e-10 ulps. agreement.csv keeps both."""
    from runner.compare.report import compare_folder

    runs = run_folders(
        tmp_path / "runs",
        {
            f"{backend}_{dtype}": ((f"backend={backend}", f"dtype={dtype}"), shift)
            for backend, shift in (("numpy", 0.0), ("jax", 2.0**-24))
            for dtype in ("float32", "float64")
        },
    )
    report = compare_folder(runs, EXPERIMENT, tmp_path / "out")
    ulps = {a.dtype: (a.ulps_f32, a.ulps_f64) for a in report.agreement if a.mode == "manual"}
    assert ulps["float32"][1] is None and ulps["float64"][1] > ulps["float64"][0]
    shown = markdown_rows((tmp_path / "out" / "comparison.md").read_text(), "mode")
    assert {r["dtype"]: r["ulps in dtype"] for r in shown if r["mode"] == "manual"} == {
        "float32": f"{ulps['float32'][0]:.4g}",
        "float64": f"{ulps['float64'][1]:.4g}",
    }
    written = read_csv(tmp_path / "out" / "agreement.csv")
    assert {r["dtype"]: float(r["ulps_float32"]) for r in written if r["mode"] == "manual"} == {
        dtype: f32 for dtype, (f32, _) in ulps.items()
    }


def test_an_unwritable_report_folder_is_a_compare_error(tmp_path: Path) -> None:
    from runner.compare.report import compare_folder
    from runner.compare.store import CompareError

    runs = run_folders(tmp_path / "runs", {"ran": (("backend=numpy",), 0.0)})
    (tmp_path / "afile").write_text("")
    with pytest.raises(CompareError, match=r"cannot write the report to .*afile"):
        compare_folder(runs, EXPERIMENT, tmp_path / "afile")


def test_agreement_figures_are_the_named_pairs(tmp_path: Path) -> None:
    """The row named one pair (largest |dx|) beside the largest ulps of any pair: for a
    vector, |dx| is largest on the big entries, ulps on the small ones."""
    import dataclasses

    from runner.compare.agreement import abs_diff, agreement_of, ulps
    from runner.compare.report import compare_folder

    runs = run_folders(
        tmp_path / "runs",
        {name: ((f"backend={name}",), 0.0) for name in ("numpy", "jax", "torch")},
    )
    rows = compare_folder(runs, EXPERIMENT, tmp_path / "out").rows
    big, small = np.float32(1.0), np.float32(1e-3)
    x = {  # jax: 4 ulps off on the big entry; torch: 50 ulps off on the small one
        "numpy": [big, small],
        "jax": [big + 4 * np.spacing(big), small],
        "torch": [big, small + 50 * np.spacing(small)],
    }
    rows = [dataclasses.replace(r, x=np.array(x[r.backend], np.float32)) for r in rows]
    (found,) = [a for a in agreement_of(rows) if a.mode == "manual"]
    by_backend = {r.backend: r for r in rows}
    a, b = (by_backend[name] for name in found.pair)
    assert found.ulps_f32 == ulps(a.x, b.x, np.float32) == 50
    assert found.abs_diff == abs_diff(a.x, b.x)
    assert "torch" in found.pair


# ------------------------------------------------ trajectories compared step by step

# NumPy's RMSprop under TF's conventions, eps inside the root (tf) and outside it
# (tf_legacy): the runs part at step 1 and meet again by step 12, on one final x.
PARTED = (
    "backend=numpy", "backend.convention=tf,tf_legacy", "optimizer=rmsprop",
    "optimizer.lr=0.1", "steps=20", "record_every=3",
)  # fmt: skip


def ordinal32(value: float) -> int:
    """A float32's place in the order of float32 values (+0 and -0 alike), counted here
    from its bits, apart from agreement.ulps: the ulps between two are the difference."""
    bits = int(np.float32(value).view(np.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def first_difference(tables: list[list[dict[str, str]]]) -> tuple[int, float, str]:
    """Two runs' trajectory.csv rows read here: the first step where they differ, the
    largest difference in float32 ulps (x's counted between them, the loss's and the
    gradient's in ulps of their column's largest magnitude), and its column."""
    first, worst, where = None, 0.0, ""
    scale = {
        c: max(abs(float(row[c])) for table in tables for row in table) for c in ("loss", "grad")
    }
    for a, b in zip(*tables, strict=True):
        assert a["step"] == b["step"]
        for column in ("x", "loss", "grad"):
            if float(a[column]) == float(b[column]):
                continue
            first = int(a["step"]) if first is None else first
            if column == "x":
                apart = abs(ordinal32(float(a[column])) - ordinal32(float(b[column])))
            else:
                spacing = float(np.spacing(np.float32(scale[column])))
                apart = abs(float(a[column]) - float(b[column])) / spacing
            if apart > worst:
                worst, where = apart, column
    assert first is not None
    return first, worst, where


@pytest.fixture(scope="module")
def parted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The PARTED sweep (two NumPy jobs, in-process: seconds), its output, and what its
    trajectory.csv files say."""
    root = tmp_path_factory.mktemp("parted")
    sweep = root / "sweep"
    code, out, err = finish(
        start(
            "runner", "-m", *PARTED, "tracking=off", f"hydra.sweep.dir={sweep}",
            "progress=false", cwd=root,
        )
    )  # fmt: skip
    assert code == 0, err
    tables = [read_csv(path) for path in sorted(sweep.glob("*/trajectory.csv"))]
    first, worst, column = first_difference(tables)
    cell = f"differ from step {first} (max {worst} ulps, {column}; {len(tables[0])} steps)"
    return {"root": root, "sweep": sweep, "out": out, "tables": tables, "first": first,
            "worst": worst, "column": column, "cell": cell}  # fmt: skip


def test_trajectories_that_part_and_meet_again_are_told_apart(parted: dict[str, Any]) -> None:
    """The agreement compared final x only: 0 ulps for runs whose trajectories differ at
    steps 3 to 9. Its trajectories column says where they part and by how much, as read
    here from the runs' trajectory.csv files, and the report says what each compares."""
    tables, first, sweep = parted["tables"], parted["first"], parted["sweep"]
    assert tables[0][-1] == tables[1][-1] and first > 0  # the same end, parted on the way
    (found,) = read_csv(sweep / "compare" / "agreement.csv")
    assert float(found["ulps_float32"]) == 0
    assert (found["trajectories"], found["first_diff_step"]) == ("differ", str(first))
    assert float(found["trajectory_ulps"]) == parted["worst"] > 1
    assert found["trajectory_column"] == parted["column"]
    assert found["trajectory_steps"] == str(len(tables[0]))
    assert parted["cell"] in parted["out"]
    assert "trajectories: at every step all its rows recorded" in parted["out"]
    markdown = (sweep / "compare" / "comparison.md").read_text()
    (shown,) = markdown_rows(markdown, "mode")
    assert shown["trajectories"] == parted["cell"]
    assert "the last step only" in markdown and "`trajectories` compares" in markdown
    (saved,) = json.loads((sweep / "compare" / "comparison.json").read_text())["agreement"]
    assert saved["trajectory"]["first_diff_step"] == first
    assert saved["trajectory"]["ulps"] == parted["worst"]


def test_the_mlflow_report_compares_the_logged_trajectories(
    parted: dict[str, Any], tmp_path: Path, fresh_store
) -> None:
    """From MLflow: the runs' trajectory.csv artifacts, every recorded step; where those
    are lost, the per-step metrics, which hold every step of a short run. The sweep's
    report from its parent logged the trajectory agreement it wrote (comparison.json)."""
    from urllib.parse import urlsplit

    from runner.compare.report import compare
    from runner.compare.store import open_client
    from runner.results import TRAJECTORY_FILE
    from runner.upload import upload

    uri = fresh_store(tmp_path / "mlflow.db")
    upload([parted["sweep"]], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], "tags.task = 'minimize'")
    assert len(runs) == 2
    for lost in (False, True):
        if lost:  # the artifact store lost trajectory.csv: the metrics have the steps
            for run in runs:
                (Path(urlsplit(run.info.artifact_uri).path) / TRAJECTORY_FILE).unlink()
        report = compare(uri, EXPERIMENT, out_dir=tmp_path / str(lost), client=client, log=False)
        (found,) = report.agreement
        assert found.trajectory is not None and not found.trajectory.logged_only
        assert (found.trajectory.first_diff_step, found.trajectory.ulps) == (
            parted["first"],
            parted["worst"],
        )
        (shown,) = markdown_rows((tmp_path / str(lost) / "comparison.md").read_text(), "mode")
        assert shown["trajectories"] == parted["cell"]
    (parent,) = client.search_runs([experiment], "tags.`runner.kind` = 'sweep'")
    logged = client.download_artifacts(parent.info.run_id, "agreement.csv", str(tmp_path))
    assert read_csv(Path(logged))[0]["first_diff_step"] == str(parted["first"])


def test_thinned_metrics_say_their_comparison_covers_the_logged_steps(
    tmp_path: Path, fresh_store
) -> None:
    """A run of more than 1000 recorded steps logs 1000 of them as metrics: compared from
    those, a difference at a step left out goes unseen, and the column says `logged steps`."""
    from urllib.parse import urlsplit

    from runner.compare.report import compare, compare_folder
    from runner.compare.store import open_client
    from runner.results import TRAJECTORY_FILE
    from runner.tracking import thin
    from runner.upload import upload

    steps = 1500
    runs = run_folders(
        tmp_path / "runs",
        {name: ((f"backend={name}", f"steps={steps}"), 0.0) for name in ("numpy", "jax")},
    )
    logged_steps = set(thin(steps + 1).tolist())  # rows are steps 0..1500
    unlogged = min(set(range(1, steps)) - logged_steps)
    later = min(s for s in logged_steps if s > unlogged)
    path = runs / "jax" / TRAJECTORY_FILE
    table = read_csv(path)
    for step in (unlogged, later):  # x one float32 ulp up at two steps, one not logged
        x = np.float32(float(table[step]["x"]))
        table[step]["x"] = repr(float(np.nextafter(x, np.float32(np.inf))))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    folders = compare_folder(runs, EXPERIMENT, tmp_path / "folders")
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([runs], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    for run in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id]):
        (Path(urlsplit(run.info.artifact_uri).path) / TRAJECTORY_FILE).unlink()
    from_metrics = compare(uri, EXPERIMENT, out_dir=tmp_path / "store", client=client, log=False)
    (every,), (logged,) = folders.agreement, from_metrics.agreement
    assert every.trajectory is not None and logged.trajectory is not None
    assert (every.trajectory.first_diff_step, every.trajectory.steps) == (unlogged, steps + 1)
    assert (logged.trajectory.first_diff_step, logged.trajectory.steps) == (later, 1000)
    assert logged.trajectory.logged_only and not every.trajectory.logged_only
    (shown,) = markdown_rows((tmp_path / "store" / "comparison.md").read_text(), "mode")
    assert shown["trajectories"] == f"differ from step {later} (max 1 ulp, x; 1000 logged steps)"
    (written,) = read_csv(tmp_path / "store" / "agreement.csv")
    assert written["trajectory_logged_only"] == "true"


def test_identical_trajectories_read_identical(tmp_path: Path) -> None:
    """Runs that computed the same values at every step (float32 and float64 groups)."""
    from runner.compare.report import compare_folder

    runs = run_folders(
        tmp_path / "runs",
        {
            f"{backend}_{dtype}": ((f"backend={backend}", f"dtype={dtype}"), 0.0)
            for backend in ("numpy", "jax")
            for dtype in ("float32", "float64")
        },
    )
    report = compare_folder(runs, EXPERIMENT, tmp_path / "out")
    assert [a.dtype for a in report.agreement] == ["float32", "float64"]
    for found in report.agreement:
        assert found.trajectory is not None
        assert (found.trajectory.status, found.trajectory.ulps) == ("identical", 0)
    shown = markdown_rows((tmp_path / "out" / "comparison.md").read_text(), "mode")
    assert [r["trajectories"] for r in shown] == ["identical (5 steps)"] * 2  # steps 0-4
    assert [r["between"] for r in shown] == ["all equal"] * 2  # it named one pair of them
    written = read_csv(tmp_path / "out" / "agreement.csv")
    assert [(r["trajectories"], r["first_diff_step"], r["trajectory_ulps"]) for r in written] == [
        ("identical", "", "0.0")
    ] * 2


def test_a_row_without_a_trajectory_is_not_recorded(tmp_path: Path) -> None:
    """A row without trajectory.csv (an older result, a lost file) leaves its group
    `not recorded`, naming it where others have one: never `identical`."""
    from runner.compare.report import compare_folder
    from runner.results import TRAJECTORY_FILE

    runs = run_folders(
        tmp_path / "runs",
        {name: ((f"backend={name}",), 0.0) for name in ("numpy", "jax", "torch")},
    )
    (runs / "jax" / TRAJECTORY_FILE).unlink()
    report = compare_folder(runs, EXPERIMENT, tmp_path / "some")
    (found,) = report.agreement
    assert found.trajectory is not None and found.trajectory.missing == ["jax"]
    (shown,) = markdown_rows((tmp_path / "some" / "comparison.md").read_text(), "mode")
    assert shown["trajectories"] == "not recorded (jax)"
    (written,) = read_csv(tmp_path / "some" / "agreement.csv")
    assert (written["trajectories"], written["trajectory_missing"]) == ("not recorded", "jax")
    assert (written["first_diff_step"], written["trajectory_ulps"]) == ("", "")
    for name in ("numpy", "torch"):
        (runs / name / TRAJECTORY_FILE).unlink()
    compare_folder(runs, EXPERIMENT, tmp_path / "none")
    (shown,) = markdown_rows((tmp_path / "none" / "comparison.md").read_text(), "mode")
    assert shown["trajectories"] == "not recorded"


def test_trajectories_compare_the_common_steps_bit_for_bit() -> None:
    """Runs recorded at other steps are compared where both recorded; inf equals inf and
    NaN NaN, NaN against a number is a difference; ulps are the group's dtype's, and a
    value finer than it (a vector's final distance, a float64 norm) is a fraction."""
    from runner.compare.stepwise import step_agreement
    from runner.compare.trajectories import Trajectory

    def run(steps: list[int], x: list[float]) -> Trajectory:
        values = np.array(x, np.float64)
        return Trajectory(np.array(steps), {"x": values, "loss": np.zeros(len(values))})

    f32, up = np.float32, np.nextafter
    one_up, three_up = float(up(f32(1), f32(2))), float(up(up(up(f32(1), f32(2)), 2), 2))
    every_3 = run([0, 3, 6, 9, 12], [0.5, 1.0, 1.0, 1.0, 1.0])
    every_2 = run([0, 2, 4, 6, 8, 10, 12], [0.5, 9.0, one_up, three_up, 7.0, 7.0, 1.0])
    found = step_agreement([every_3, every_2], ["a", "b"], f32)  # steps 0, 6, 12 in common
    assert (found.status, found.steps, found.first_diff_step) == ("differ", 3, 6)
    assert (found.ulps, found.column) == (3, "x")

    inf, nan = float("inf"), float("nan")
    same = step_agreement([run([0, 1], [inf, nan]), run([0, 1], [inf, nan])], ["a", "b"], f32)
    assert (same.status, same.ulps) == ("identical", 0)
    other = step_agreement([run([0, 1], [1.0, nan]), run([0, 1], [1.0, 1.0])], ["a", "b"], f32)
    assert (other.first_diff_step, other.ulps) == (1, inf)

    below = float(np.nextafter(1.0, 0.0))  # one float64 ulp: 5.6e-9 of a float32 one
    wide = step_agreement([run([0], [below]), run([0], [1.0])], ["a", "b"], np.float64)
    assert wide.ulps == 1
    finer = step_agreement([run([0], [1.0 + 2**-25]), run([0], [1.0])], ["a", "b"], f32)
    assert finer.ulps == 0.25  # 2^-25 over float32 spacing 2^-23 at 1.0
    signed = step_agreement([run([0], [-0.0]), run([0], [0.0])], ["a", "b"], f32)
    assert (signed.status, signed.ulps) == ("differ", 0)


def test_trajectories_count_loss_and_gradient_at_their_scale() -> None:
    """x one ulp apart near x* = 1 gives losses 0 and 2^-24 and gradients 2^-21 apart
    near 0, where representable values crowd: counted as values between them they read
    864 million and 524,288 ulps, and the report said the frameworks parted wildly. They
    are counted in ulps of their column's largest magnitude, so x's 1 ulp is the most."""
    from runner.compare.stepwise import step_agreement
    from runner.compare.trajectories import Trajectory

    f32 = np.float32
    x = f32(0.99999857)
    below = np.nextafter(x, f32(0))

    def run(last_x: np.float32) -> Trajectory:
        xs = np.array([0.0, last_x], f32)
        loss, grad = xs * xs - 2 * xs + 1, 2 * xs - 2  # the notebook's, in float32
        columns = {"x": xs, "loss": loss, "grad": grad}
        return Trajectory(np.array([0, 1]), {k: v.astype(np.float64) for k, v in columns.items()})

    found = step_agreement([run(x), run(below)], ["a", "b"], f32)
    assert (found.status, found.first_diff_step, found.ulps, found.column) == ("differ", 1, 1, "x")
    near = run(x)
    near.columns["loss"] = np.array([1.0, 2.0**-24])  # x equal, the loss alone apart
    loss_only = step_agreement([run(x), near], ["a", "b"], f32)
    assert (loss_only.ulps, loss_only.column) == (0.5, "loss")  # 2^-24 over 2^-23 at 1.0
