"""`python -m runner.bench --quick`: the smoke version of the benchmark, run for real.

One subprocess runs the quick benchmark on JAX (the framework that imports fastest)
and logs it to a temporary SQLite store; the tests read what it wrote. The full
benchmark is not run here (it takes 10-30 minutes): see README "Benchmarks".
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from runner.bench.report import (
    all_targets,
    bandwidth_targets,
    longest,
    ratio_targets,
    vector_rows,
)
from runner.bench.run import parse_args
from tests.conftest import ROOT, free_port, python_code

# One worker runs the quick benchmark (the module's fixture) for every test of it.
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("bench-quick")]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, CompletedProcess]:
    """(out folder, tracking uri, process) of one `--quick --backends jax` run."""
    base = tmp_path_factory.mktemp("bench")
    out, uri = base / "out", f"sqlite:///{base / 'bench.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--quick", "--backends", "jax", "--out", str(out), "--tracking-uri", uri]
    proc = subprocess.run(
        [sys.executable, "-m", "runner.bench", *args],
        cwd=base,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, uri, proc


def positive_finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_quick_writes_table_json_and_plots(quick) -> None:
    out, _uri, proc = quick
    for name in ("step_time.png", "n_scaling.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    report = (out / "results.md").read_text()
    for heading in ("## Targets (issue 7)", "## Scalar quadratic", "## n-dimensional quadratic"):
        assert heading in report
    assert "| jax graph | 1,000 |" in report
    scalar = report.split("## Scalar quadratic")[1].split("## n-dimensional")[0]
    (graph_row,) = [line for line in scalar.splitlines() if line.startswith("| jax graph |")]
    low, high = graph_row.split(" | ")[5].split("-")  # the repeat pairs' range
    assert 0 < float(low) <= float(high)
    assert "## Targets" in proc.stdout  # the table is printed too


def test_quick_values_are_sane(quick) -> None:
    out, _uri, _proc = quick
    results = json.loads((out / "results.json").read_text())
    cells = [c for c in results["scalar"] if "ratio" in c]
    assert {c["label"] for c in cells} == {"jax manual", "jax apply", "jax minimize", "jax graph"}
    for cell in cells:
        for key in ("ratio", "runner_step_us", "hand_step_us", "runner_compile_s"):
            assert positive_finite(cell[key]), (cell["label"], key, cell[key])
        assert len(cell["runner_samples_us"]) == len(cell["hand_samples_us"]) == 3
        # Both loops did the same arithmetic: x_k = 1 - 0.98^k in float32 (FMA or not).
        expected = 1 - 0.98 ** cell["steps"]
        assert cell["runner_x"] == pytest.approx(expected, rel=1e-5)
        assert cell["hand_x"] == pytest.approx(cell["runner_x"], rel=1e-6)
    floor = results["floor"]
    assert all(positive_finite(ns) for ns in floor["ns_per_step"].values())
    assert floor["final_x"] == pytest.approx(1.0, abs=2e-6)
    vectors = results["vectors"]
    assert [row["n"] for row in vectors["numpy"]] == [1, 1_000]
    for row in vectors["numpy"]:
        assert positive_finite(row["stream_gbps"]) and positive_finite(row["update_step_us"])
    for row in vectors["rows"]:  # measured, or said why not; never failed
        assert "error" not in row, row["error"]
        assert positive_finite(row["gbps"]) if "gbps" in row else row["unsupported"]
        assert positive_finite(row["final_s"]) if "gbps" in row else "final_s" not in row
    verdicts = {t["verdict"] for t in results["targets"]}
    assert verdicts <= {"MET", "NOT MET", "not measured"}
    assert any(t["target"].startswith("runner / hand-written") for t in results["targets"])
    assert results["process"] == {}  # subprocess sections are full-run only


def test_quick_is_logged_to_mlflow(quick) -> None:
    from mlflow import MlflowClient

    _out, uri, _proc = quick
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("gradient-runner-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "bench"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ratio.jax_graph.1000"] > 0
    assert run.data.metrics["vector_final_s.jax_graph.n1000"] > 0
    assert run.data.params["quick"] == "True"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.md", "results.json", "step_time.png", "n_scaling.png"} <= logged


def cell(label: str, steps: int, runner: float, hand: float) -> dict:
    backend, mode = label.split()[:2]
    return {
        "label": label,
        "backend": backend,
        "mode": mode,
        "steps": steps,
        "runner_step_us": runner,
        "hand_step_us": hand,
        "ratio": runner / hand,
        "runner_compile_s": 0.1,
    }


def test_targets_are_judged_on_the_longest_run() -> None:
    cells = [
        cell("jax graph", 1_000, 1.0, 0.1),  # fixed cost dominates: not judged
        cell("jax graph", 1_000_000, 0.0052, 0.005),
        {"label": "jax graph", "backend": "jax", "mode": "graph", "steps": 10**7, "skipped": "x"},
    ]
    assert longest(cells)["jax graph"]["steps"] == 1_000_000
    (target,) = ratio_targets(cells)
    assert target.met is True and target.measured.startswith("1.040")
    results = {
        "scalar": cells,
        "floor": {"ns_per_step": {"1000000": 3.0}},
        "vectors": {"numpy": [], "rows": []},
        "settings": {"dims": [1]},
    }
    floor = [t for t in all_targets(results) if "floor" in t.target]
    assert [(t.met, t.measured.split()[0]) for t in floor] == [(True, "1.73x")]


def test_ratio_target_shows_the_spread_of_its_repeat_pairs() -> None:
    judged = cell("tf apply", 10_000, 101.0, 100.0)
    judged.update(runner_samples_us=[103.0, 101.0, 106.0], hand_samples_us=[100.0, 101.0, 100.0])
    (target,) = ratio_targets([judged])
    assert target.measured == "1.010 at 10,000 steps (repeat pairs 1.000-1.060)"
    (unpaired,) = ratio_targets([cell("tf apply", 10_000, 101.0, 100.0)])
    assert unpaired.measured.endswith("(repeat pairs -)")


def test_eager_targets_compare_with_the_fastest_idiom() -> None:
    cells = [cell("jax manual", 10_000, 20.0, 10.0), cell("jax apply", 10_000, 12.0, 11.0)]
    results = {
        "scalar": cells,
        "floor": {"ns_per_step": {}},
        "vectors": {"numpy": [], "rows": []},
        "settings": {"dims": [1]},
    }
    targets = all_targets(results)
    judged = {(t.target, t.subject): t.met for t in targets}
    measured = {(t.target, t.subject): t.measured for t in targets}
    idiom = "eager <= 1.5x fastest hand-written eager idiom"
    assert measured[(idiom, "jax manual")] == "2.00x of hand manual (10.0 us)"
    assert (
        measured[(idiom, "jax apply")] == "1.20x of hand manual (10.0 us); hand apply itself 1.10x"
    )
    assert judged[("eager JAX <= 25 us/step", "jax manual")] is True
    assert judged[("eager <= 1.5x fastest hand-written eager idiom", "jax manual")] is False
    assert judged[("eager <= 1.5x fastest hand-written eager idiom", "jax apply")] is True


def test_a_failed_vector_run_reads_as_an_error_not_as_unsupported() -> None:
    numpy_row = {"n": 10_000_000, "steps": 20, "update_step_us": 1.0, "update_gbps": 1.0}
    vectors = {
        "numpy": [{**numpy_row, "stream_gbps": 30.0}],
        "rows": [
            {"label": "jax graph", "n": 10_000_000, "steps": 20, "error": "TypeError: in code"},
            {"label": "x graph", "n": 10_000_000, "steps": 20, "unsupported": "not yet supported"},
        ],
    }
    assert [row[-1] for row in vector_rows(vectors)[1:]] == [
        "error TypeError: in code",
        "not yet supported",
    ]
    (target, _) = bandwidth_targets(vectors)
    assert (target.measured, target.verdict) == ("error TypeError: in code", "not measured")


def test_tf_options_are_variants_of_their_own() -> None:
    """XLA and the legacy optimizers are measured as the CLI runs them (backend.<key>=true),
    and the legacy variants' hand-written loops get the option too (measure_cell)."""
    from runner.bench.cases import Variant, spec_for, variants

    labels = [v.label for v in variants(["tf"], quick=False)]
    assert labels == [
        "tf manual",
        "tf apply",
        "tf minimize",
        "tf graph",
        "tf graph+xla",
        "tf apply+legacy",
        "tf minimize+legacy",
        "tf graph+legacy",
        "tf graph+xla+legacy",
    ]
    assert [v.label for v in variants(["tf"], quick=True)] == labels[:5]
    both = Variant("tf", "graph", jit_compile=True, legacy_optimizers=True)
    assert both.options() == {"jit_compile": True, "legacy_optimizers": True}
    assert spec_for(both, 10).options == {"jit_compile": True, "legacy_optimizers": True}
    assert spec_for(Variant("tf", "apply"), 10).options == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "2"], "--repeats must be >= 3"),
        (["--backends", "tf,mxnet"], "'mxnet' has no hand-written loops; choose from: tf,"),
        (["--backends", "numpy"], "'numpy' has no hand-written loops"),
        (["--backends", ","], "--backends ',': names no backend"),
        (["--max-n", "0"], "--max-n 0 is not allowed; give a whole number >= 1"),
        (["--budget", "-1"], "--budget -1.0 is not allowed; give seconds > 0"),
        (["--budget", "nan"], "--budget nan is not allowed"),
        (["--repeats", "x"], "argument --repeats: invalid int value: 'x'"),
        (["--out", "/proc/x"], "--out /proc/x cannot be written: no file can be made in /proc"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line, as compare's and upload's own checks: argparse's usage block came first."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_an_unwritable_out_is_refused_before_anything_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out under a file imported the frameworks and measured, then failed to write."""
    from runner.bench import run

    def measured(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(run, "load_backends", measured)
    monkeypatch.setattr(run, "run_bench", measured)
    a_file = tmp_path / "afile"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--quick", "--no-log", "--out", str(a_file / "bench")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: --out {a_file / 'bench'} cannot be written: {a_file} is a file, not a "
        "folder; give --out a folder you can write in\n"
    )


def test_an_unusable_store_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    out, away = tmp_path / "bench", f"http://127.0.0.1:{free_port()}"
    code = (
        "import sys; from runner.bench.run import main; sys.exit(main(['--backends', 'jax', "
        f"'--out', {str(out)!r}, '--tracking-uri', {away!r}]))"
    )
    proc = python_code(code, tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip() == (
        f"error: tracking server {away} is unreachable (ConnectionRefusedError); "
        "start it, point --tracking-uri elsewhere, or run with --no-log"
    )
    assert not out.exists()


def test_ctrl_c_keeps_what_was_measured(tmp_path: Path) -> None:
    """SIGINT once the first scalar cell is printed: that cell and the floor are written."""
    out = tmp_path / "bench"
    args = ["--quick", "--backends", "jax", "--no-log", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.bench", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "jax manual" in line:
            proc.send_signal(signal.SIGINT)
            break
    _rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == f"interrupted: what was measured is in {out} (not logged to MLflow)"
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] is True
    assert results["floor"]["ns_per_step"] and results["scalar"][0]["label"] == "jax manual"
    assert "**Interrupted** (Ctrl-C)" in (out / "results.md").read_text()
    assert (out / "step_time.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_missing_framework_is_one_line_before_anything_is_measured(tmp_path: Path) -> None:
    """`sys.modules[name] = None` is how Python itself spells 'this module is absent'."""
    out = tmp_path / "bench"
    code = (
        "import sys; sys.modules['jax'] = None; "
        "from runner.bench.run import main; "
        f"sys.exit(main(['--backends', 'jax', '--no-log', '--out', {str(out)!r}]))"
    )
    proc = python_code(code, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: backend=jax needs the module 'jax', which is not installed; "
        "pip install 'gradient-runner[jax]'"
    )
    assert not out.exists()
