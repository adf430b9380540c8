"""`python -m runner.bench --quick`: the smoke version of the benchmark, run for real.

One subprocess runs the quick benchmark on JAX (the framework that imports fastest)
and logs it to a temporary SQLite store; the tests read what it wrote. The full
benchmark is not run here (it takes 10-30 minutes): see README "Benchmarks".
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from runner.bench.report import (
    all_targets,
    header_lines,
    longest,
    process_lines,
    scalar_rows,
    vector_rows,
)
from runner.bench.run import parse_args
from tests.conftest import ROOT, ctrl_c, free_port, imported, python_code

# One worker runs the quick benchmark (the module's fixture) for every test of it.
pytestmark = [pytest.mark.timeout(180), pytest.mark.xdist_group("bench-quick")]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, CompletedProcess]:
    """(out folder, tracking uri, process) of one `--quick --backends jax` run, with one
    numerics-relevant variable set (TensorFlow's, which JAX ignores) for it to record."""
    base = tmp_path_factory.mktemp("bench")
    out, uri = base / "out", f"sqlite:///{base / 'bench.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_DETERMINISTIC_OPS": "1"}
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
    assert verdicts <= {"MET", "NOT MET", "not measured", "not measured (--quick)"}
    assert any(t["target"].startswith("runner / hand-written") for t in results["targets"])
    assert results["process"] == {}  # subprocess sections are full-run only


def test_quick_is_logged_to_mlflow(quick) -> None:
    from mlflow import MlflowClient

    _out, uri, _proc = quick
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("gradient-runner-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "bench --quick"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ratio.jax_graph.1000"] > 0
    assert run.data.metrics["vector_final_s.jax_graph.n1000"] > 0
    assert run.data.params["quick"] == "True"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.md", "results.json", "step_time.png", "n_scaling.png"} <= logged


def test_a_run_records_the_code_machine_and_environment_it_ran_with(quick) -> None:
    """results.json had no commit, CPU features or environment, the MLflow run only
    runner.kind and target tags: now both as `python -m runner` records a run."""
    from mlflow import MlflowClient

    from runner.provenance import git_state, machine_state

    out, uri, _proc = quick
    results = json.loads((out / "results.json").read_text())
    title = (out / "results.md").read_text().splitlines()[0]
    git = results["git"]
    if git_state() is None:  # an installed copy, outside git
        assert git is None and "no git commit recorded" in title
    else:
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]) and isinstance(git["dirty"], bool)
        assert f", commit {git['commit'][:7]}" in title
    features = machine_state()["cpu_features"]
    assert results["machine"]["cpu_features"] == features
    assert results["environment"]["TF_DETERMINISTIC_OPS"] == "1"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("gradient-runner-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    tags = run.data.tags
    assert tags["runner.kind"] == "bench"
    assert tags["env.TF_DETERMINISTIC_OPS"] == "1"
    if features is not None:
        assert tags["cpu_features"] == (",".join(features) or "none")
    if git:
        assert tags["git_commit"] == git["commit"]
        assert tags["git_dirty"] == str(git["dirty"]).lower()


def test_a_quick_run_says_it_is_one_and_logs_no_verdicts(quick) -> None:
    """--quick's results.md read as a full run's; its 100-step verdicts were target.* tags
    of a run named `bench`, like a full run's."""
    from mlflow import MlflowClient

    out, uri, _proc = quick
    report = (out / "results.md").read_text()
    assert report.splitlines()[0].endswith(", quick (smoke) run")
    assert "\nQuick (smoke) run: it leaves out step counts above 1,000" in report
    assert "## Targets (issue 7): smoke checks only (--quick), not verdicts" in report
    assert "Skipped (--quick): tracking cost, start-up, peak memory" in report
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("gradient-runner-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "bench --quick"
    assert run.data.tags["bench.quick"] == "true"
    assert not [k for k in run.data.tags if k.startswith("target.")]
    assert "targets_met" not in run.data.metrics


def test_results_json_keeps_every_sample_of_the_floor_and_numpy(quick) -> None:
    """README promised every sample; the floor and NumPy rows (best of 5, where the header
    said best of 3) kept only the best."""
    out, _uri, _proc = quick
    results = json.loads((out / "results.json").read_text())
    floor = results["floor"]
    for steps, best in floor["ns_per_step"].items():
        assert len(floor["samples_ns"][steps]) == 5 and min(floor["samples_ns"][steps]) == best
    for row in results["vectors"]["numpy"]:
        assert len(row["update_samples_us"]) == len(row["stream_samples_us"]) == 5
        assert min(row["update_samples_us"]) == pytest.approx(row["update_step_us"])
    report = (out / "results.md").read_text()
    assert "Best of 3 repeats, interleaved (the floor and NumPy rows: best of 5)" in report


def results_of(
    scalar: list[dict] | None = None,
    vectors: dict | None = None,
    process: dict | None = None,
    **settings: object,
) -> dict:
    """A results dict as results.json holds it, with what a test gives."""
    return {
        "started": "2026-11-29T10:00:00",
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
        "machine": {
            "cpu": "CPU",
            "cpu_features": ["fma"],
            "cores": 2,
            "python": "3.11.7",
            "versions": {"numpy": "2.0", "jax": "0.10"},
            "load_before": [0.5, 0.4, 0.3],
            "load_after": [0.6, 0.5, 0.4],
        },
        "environment": {},
        "settings": {
            "quick": False,
            "backends": ["tf", "torch", "jax"],
            "repeats": 3,
            "max_n": 10_000_000,
            "sweep": True,
            "budget_s": 120.0,
            "tracking_uri": None,
            "dims": [1, 1_000, 100_000, 1_000_000, 10_000_000],
            **settings,
        },
        "floor": {"ns_per_step": {"1000000": 3.0}},
        "scalar": scalar or [],
        "vectors": vectors or {"numpy": [], "rows": []},
        "process": process or {},
    }


def memory_row(n: int, growth_in_x: float) -> dict:
    return {
        "label": "jax graph",
        "n": n,
        "x_bytes": 4 * n,
        "baseline_bytes": 250e6,
        "peak_bytes": 250e6 + growth_in_x * 4 * n,
        "growth_bytes": growth_in_x * 4 * n,
        "growth_in_x": growth_in_x,
    }


def test_the_n_1e7_targets_are_judged_only_where_n_reaches_1e7() -> None:
    """--max-n 1000 judged peak RSS at n = 1e3 (a framework's +3 MB read as 816x bytes(x),
    NOT MET) and dropped the bandwidth target silently: both now say why they are not
    measured, and log no verdict tag."""
    vectors = {
        "numpy": [{"n": 1_000, "steps": 10, "stream_gbps": 30.0}],
        "rows": [{"label": "jax graph", "n": 1_000, "steps": 10, "gbps": 3.0}],
    }
    small = results_of(vectors=vectors, process={"memory": [memory_row(1_000, 816.1)]}, max_n=1_000)
    small["settings"]["dims"] = [1, 1_000]
    found = {t.target: t for t in all_targets(small)}
    memory = found["peak RSS at n=1e7 <= 3x bytes(x) + baseline"]
    assert (memory.met, memory.verdict) == (None, "not measured (--max-n 1,000)")
    assert memory.measured == "+3 MB = 816.1x bytes(x) at n=1,000"
    bandwidth = found[">= 50% of NumPy bandwidth at n=1e7"]
    assert bandwidth.verdict == "not measured (--max-n 1,000)"
    from runner.bench.logged import bench_tags

    assert not [k for k in bench_tags(small) if "peak_rss" in k or "bandwidth" in k]
    full = results_of(process={"memory": [memory_row(10_000_000, 2.1)]})
    (judged,) = all_targets(full)
    assert (judged.verdict, judged.measured) == ("MET", "+84 MB = 2.1x bytes(x)")
    assert bench_tags(full)["target.peak_rss.jax_graph"] == "MET"


def test_quick_names_what_it_leaves_out_and_keeps_an_explicit_budget() -> None:
    """torch graph and TF's +legacy variants were missing from a quick run unsaid, and
    --quick replaced a --budget the user gave with its own 5 s."""
    from runner.bench.cases import quick_leaves_out

    left_out = quick_leaves_out(("tf", "torch", "jax"))
    assert (
        "the variants tf apply+legacy, tf minimize+legacy, tf graph+legacy, "
        "tf graph+xla+legacy, torch graph;" in left_out
    )
    assert "the variants" not in quick_leaves_out(("jax",))
    assert parse_args(["--quick", "--budget", "30"]).budget_s == 30.0
    assert parse_args(["--quick"]).budget_s == 5.0
    assert parse_args([]).budget_s == 120.0


def test_an_interrupted_run_says_what_it_did_not_measure() -> None:
    """An interrupted full run printed `Skipped (--quick).` where its fresh-process
    section would be."""
    interrupted = results_of(process={"tracking": {"error": "x"}})
    interrupted["interrupted"] = True
    text = "\n".join(process_lines(interrupted))
    assert "--quick" not in text
    assert (
        "Not measured (the run was interrupted by Ctrl-C first): start-up, peak memory, "
        "compile cache, matrix sweep." in text
    )
    no_sweep = "\n".join(process_lines(results_of(sweep=False)))
    assert "Matrix sweep skipped (--no-sweep)." in no_sweep
    assert "interrupted" not in no_sweep


def test_the_floor_multiple_has_two_decimals() -> None:
    """`x floor` was rounded to a whole number: 1.13x read `1x`, so 2x could not be read."""
    graph = {**cell("jax graph", 1_000_000, 0.00339, 0.004), "hand_compile_s": 0.1, "runner_x": 1}
    rows = scalar_rows([graph], {"ns_per_step": {"1000000": 3.0}})
    assert rows[0][-2] == "1.13x"


def test_fresh_process_numbers_are_mlflow_metrics() -> None:
    """Tracking cost, start-up, RSS growth, the compile-cache ratio and the sweep speedup
    reached MLflow only as verdict tags."""
    from runner.bench.logged import bench_metrics

    process = {
        "tracking": {"cost_s": 0.007, "in_process_cost_s": 2.38, "on_s": 0.89, "off_s": 0.88},
        "startup": [
            {"backend": "jax", "run_s": 0.82, "import_s": 0.51, "extra_s": 0.31, "imports": []}
        ],
        "memory": [memory_row(10_000_000, 2.1)],
        "cache": [
            {"label": "jax graph", "first_compile_s": 0.2, "second_compile_s": 0.08, "ratio": 0.4}
        ],
        "sweep": {
            "sequential": {"wall_s": 13.0},
            "joblib_2": {"wall_s": 8.5},
            "speedup": 1.53,
            "speedup_logged": 1.04,
        },
    }
    metrics = bench_metrics(results_of(process=process))
    assert metrics["tracking_cost_s"] == 0.007
    assert metrics["tracking_in_process_cost_s"] == 2.38
    assert metrics["startup_extra_s.jax"] == 0.31
    assert metrics["rss_growth_in_x.jax_graph.n10000000"] == 2.1
    assert metrics["compile_cache_ratio.jax_graph"] == 0.4
    assert (metrics["sweep_speedup"], metrics["sweep_wall_s.joblib_2"]) == (1.53, 8.5)


def test_params_and_target_tags_read_as_typed() -> None:
    """Params were reprs (backends="('tf', 'torch', 'jax')", machine.versions a dict) and
    tag keys mangled target text (target.jax_apply.runner_/_hand-written____1.05)."""
    from runner.bench.logged import bench_params, bench_tags

    results = results_of(
        scalar=[cell("tf graph+xla", 1_000_000, 0.005, 0.006)],
        tracking_uri="http://user:secret@host:5000",
    )
    params = bench_params(results)
    assert params["backends"] == "tf,torch,jax"
    assert params["dims"] == "1,1000,100000,1000000,10000000"
    assert params["machine.load_before"] == "0.5,0.4,0.3"
    header = header_lines(results)
    assert any("load average 0.50, 0.40, 0.30 before, 0.60, 0.50, 0.40 after." in h for h in header)
    assert params["versions.numpy"] == "2.0" and "machine.versions" not in params
    assert "secret" not in params["tracking_uri"]
    assert "tracking_uri" not in bench_params(results_of())  # not given: no "None"
    tags = bench_tags(results)
    assert tags["target.runner_vs_hand.tf_graph_xla"] == "MET"
    assert tags["target.floor_2x.tf_graph_xla"] == "MET"
    assert tags["git_commit"] == results["git"]["commit"] and tags["cpu_features"] == "fma"


def test_repeated_backends_steps_and_sizes_are_read_as_written() -> None:
    """--backends tf,tf imported TF twice; vector steps lacked separators; --max-n 1e3
    (the help's own notation) was refused."""
    assert parse_args(["--backends", "tf,jax,tf"]).backends == ("tf", "jax")
    assert parse_args(["--max-n", "1e3"]).max_n == 1_000
    vectors = {
        "numpy": [{"n": 1_000, "steps": 100_000, "update_step_us": 1.0, "update_gbps": 8.0,
                   "stream_gbps": 30.0}],
        "rows": [{"label": "jax graph", "n": 1_000, "steps": 100_000, "step_us": 1.0,
                  "gbps": 8.0, "final_s": 1e-4}],
    }  # fmt: skip
    assert [row[2] for row in vector_rows(vectors)] == ["100,000", "100,000"]


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
    from runner.bench.targets import ratio_targets

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
    from runner.bench.targets import ratio_targets

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
    from runner.bench.targets import bandwidth_targets

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
    (target, _) = bandwidth_targets(vectors, {"dims": [1, 10_000_000]})
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


def test_an_out_that_holds_files_is_refused_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second bench into one --out replaced the first one's results; a comparison left
    the last report's stale files beside its own. Both are refused in one line now."""
    from runner.bench import run
    from runner.compare.cli import parse_args as compare_args

    def measured(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(run, "load_backends", measured)
    monkeypatch.setattr(run, "run_bench", measured)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    message = (
        f"error: --out {earlier} already holds files; give --out a new folder, or remove that one\n"
    )
    for command in (
        lambda: run.main(["--quick", "--backends", "jax", "--no-log", "--out", str(earlier)]),
        lambda: compare_args(["--no-log", "--out", str(earlier)]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            command()
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == message
    assert [p.name for p in earlier.iterdir()] == ["results.json"]
    assert (earlier / "results.json").read_text() == "{}"
    (tmp_path / "empty").mkdir()
    assert parse_args(["--out", str(tmp_path / "empty")]).out == tmp_path / "empty"


def test_default_out_folders_do_not_collide_within_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """outputs/bench/<date>_<H-M-S> (and compare's): two runs in one second shared a
    folder, which --out now refuses once it holds files."""
    from runner.compare.cli import parse_args as compare_args

    monkeypatch.chdir(tmp_path)
    for parse, command in ((parse_args, "bench"), (compare_args, "compare")):
        first, second = parse([]).out, parse([]).out
        assert first != second and first.parent == Path("outputs") / command
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}", first.name), first.name


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


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_keeps_what_was_measured(tmp_path: Path, signum: int, code: int, word: str) -> None:
    """SIGINT once the first scalar cell is printed: that cell and the floor are written.
    SIGTERM the same (it ended the benchmark silently, measured cells unwritten)."""
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
            proc.send_signal(signum)
            break
    _rest, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip() == f"{word}: what was measured is in {out} (not logged to MLflow)"
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] is True
    assert results["floor"]["ns_per_step"] and results["scalar"][0]["label"] == "jax manual"
    assert "**Interrupted** (Ctrl-C)" in (out / "results.md").read_text()
    assert (out / "step_time.png").read_bytes()[:8] == PNG_SIGNATURE


def test_ctrl_c_before_anything_is_measured_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while the benchmark imports, before main() and its own handling, was a
    traceback through the import."""
    out = tmp_path / "bench"
    args = ["-m", "runner.bench", "--quick", "--backends", "jax", "--no-log", "--out", str(out)]
    proc = ctrl_c(args, tmp_path, imported("numpy"))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "interrupted: nothing was measured (not logged to MLflow)\n"
    assert not out.exists()


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


def test_fresh_process_runs_start_without_what_backends_set_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bench loads every backend in its own process, then starts fresh-process runs
    (start-up, a bare `import tensorflow`): they inherited the TF backend's
    TF_USE_LEGACY_KERAS=1, which a user's command would not have (and which skips Keras 3
    in the bare import it is compared with). A variable the user set still reaches them."""
    from runner import provenance
    from runner.bench.process import child_env

    monkeypatch.delenv("RUNNER_TEST_BACKEND_SET", raising=False)
    monkeypatch.setenv("RUNNER_TEST_USER_SET", "mine")
    monkeypatch.setattr(provenance, "_SET_BY_BACKEND", {})
    provenance.backend_default("Abacus", "RUNNER_TEST_BACKEND_SET", "1")
    try:
        env = child_env()
        assert "RUNNER_TEST_BACKEND_SET" not in env and env["RUNNER_TEST_USER_SET"] == "mine"
    finally:
        os.environ.pop("RUNNER_TEST_BACKEND_SET", None)
