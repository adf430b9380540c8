"""The comparison report of derivatives runs (task=derivatives): a table of each run's
values and their ulps from the analytic values, and per point the backends' agreement.

One real sweep (jax and torch, two points, two dtypes) checks the table against the
runs' own results.json; results made here (a value moved by whole ulps) check the
agreement, a sweep mixing both tasks, and the report read back from MLflow.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runner.summary import fmt
from tests.conftest import cli
from tests.test_compare import EXPERIMENT, composed, read_csv, run_folders

pytestmark = pytest.mark.timeout(240)

QUANTITIES = [  # results.json's values, flattened, as the table's columns go
    "y",
    "dy_dx",
    "dy_dcoef.a",
    "dy_dcoef.b",
    "dy_dcoef.c",
    "d2y_dx2",
    "compiled.dy_dx",
    "compiled.y",
]
HEADERS = ["y", "dy/dx", "dy/da", "dy/db", "dy/dc", "d2y/dx2", "compiled dy/dx", "compiled y"]


def flat(result: Mapping[str, Any], key: str) -> float:
    value: Any = result
    for part in key.split("."):
        value = value[part]
    return float(value)


def expected_ulps(value: float, reference: float, dtype: str) -> float:
    """Counted here independently of agreement.ulps: whole steps between two values of
    the dtype (np.nextafter), else |difference| over the dtype's spacing there."""
    own = np.float32 if dtype == "float32" else np.float64
    if value == reference:
        return 0.0
    if float(own(reference)) == reference:  # both are values of the dtype: count the steps
        steps, at = 0, own(value)
        while at != own(reference):
            at = np.nextafter(at, own(reference))
            steps += 1
        return float(steps)
    return abs(value - reference) / float(np.spacing(own(max(abs(value), abs(reference)))))


def markdown_table(text: str, title: str) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the first markdown table after the line `title`."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("| ") and i > lines.index(title)
    )
    headers = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return headers, rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """jax and torch at x0 = 0.1 and 12345.678 (inputs that float32 rounds), in float32
    and float64: a derivatives sweep ended by printing `no comparison report`."""
    root = tmp_path_factory.mktemp("derivatives")
    folder = root / "sweep"
    proc = cli(
        "-m", "backend=jax,torch", "task=derivatives", "problem.x0=0.1,12345.678",
        "dtype=float32,float64", "tracking=off", f"hydra.sweep.dir={folder}", cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {
        path.parent.name: json.loads(path.read_text()) for path in folder.glob("*/results.json")
    }
    assert len(results) == 8
    return {"folder": folder, "stdout": proc.stdout, "stderr": proc.stderr, "results": results}


def test_a_derivatives_sweep_reports_each_value_and_its_ulps(sweep: dict) -> None:
    report = sweep["folder"] / "compare"
    assert "no comparison report" not in sweep["stderr"]
    assert "; 8 finished, 8 rows (one per run)" in sweep["stdout"]
    assert "derivatives at problem.x0" in sweep["stdout"]  # printed as the sweep ended
    assert not (report / "comparison.csv").exists()  # no minimize rows: no empty table

    written = {row["run_name"]: row for row in read_csv(report / "derivatives.csv")}
    assert set(written) == set(sweep["results"])
    for name, result in sweep["results"].items():
        row = written[name]
        assert (row["backend"], row["dtype"]) == (result["backend"], result["dtype"])
        assert row["problem"] == f"quadratic x0={result['problem']['x0']}"
        assert float(row["at"]) == result["at"]
        for key in QUANTITIES:
            value, analytic = flat(result, key), flat(result["analytic"], key)
            assert float(row[key]) == value and float(row[f"{key}_analytic"]) == analytic
            want = expected_ulps(value, analytic, result["dtype"])
            assert float(row[f"{key}_ulps"]) == pytest.approx(want, rel=1e-12, abs=0), (name, key)
    # in float32 the analytic y (float64) lies between two float32s at both points
    fractions = [float(r["y_ulps"]) for r in written.values() if r["dtype"] == "float32"]
    assert fractions and all(0 < f < 1 for f in fractions)

    # comparison.md: per point the analytic row, then a row per run; values as fmt shows them
    markdown = (report / "comparison.md").read_text()
    headers, cells = markdown_table(markdown, "## Derivatives")
    assert headers == ["backend", "problem", "dtype", *(h for q in HEADERS for h in (q, "ulps"))]
    by_run = {(r["backend"], r["dtype"], r["problem"]["x0"]): r for r in sweep["results"].values()}
    order = []
    for line in cells:
        backend, problem, dtype = line[:3]
        x0 = float(problem.removeprefix("quadratic x0="))
        order.append((backend, dtype, x0))
        if backend == "analytic":
            result = by_run[("jax", dtype, x0)]
            assert line[3::2] == [fmt(flat(result["analytic"], q)) for q in QUANTITIES]
            assert set(line[4::2]) == {""}
            continue
        result = by_run[(backend, dtype, x0)]
        cast = np.float32 if dtype == "float32" else np.float64
        assert line[3::2] == [fmt(flat(result, q), dtype) for q in QUANTITIES]
        assert [cast(float(c)) for c in line[3::2]] == [cast(flat(result, q)) for q in QUANTITIES]
        shown = [float(c) for c in line[4::2]]
        want = [
            expected_ulps(flat(result, q), flat(result["analytic"], q), dtype) for q in QUANTITIES
        ]
        assert shown == pytest.approx(want, rel=2e-3, abs=0)  # 3 digits
    assert order == [
        (backend, dtype, x0)
        for dtype in ("float32", "float64")
        for x0 in (0.1, 12345.678)
        for backend in ("analytic", "jax", "torch")
    ]

    # the agreement: per point, the largest ulps between jax and torch over every value
    saved = json.loads((report / "comparison.json").read_text())
    agreement = {(a["dtype"], a["problem"]): a for a in saved["derivative_agreement"]}
    assert len(agreement) == 4
    for (dtype, problem), found in agreement.items():
        x0 = float(problem.removeprefix("quadratic x0="))
        jax, torch = by_run[("jax", dtype, x0)], by_run[("torch", dtype, x0)]
        apart = {q: expected_ulps(flat(jax, q), flat(torch, q), dtype) for q in QUANTITIES}
        assert found["ulps"] == max(apart.values())
        assert found["compared"] == ["jax", "torch"]
        if found["ulps"]:
            assert found["pair"] == ["jax", "torch"] and apart[found["quantity"]] == found["ulps"]
        else:
            assert (found["pair"], found["quantity"]) == (["", ""], "")


# ------------------------------------------------------- results made here, no framework


def derivatives_folder(
    root: Path,
    name: str,
    backend: str,
    x0: float,
    dtype: str,
    moved: Mapping[str, int] | None = None,
) -> Path:
    """A derivatives run's folder as the CLI leaves it: its values the analytic ones
    rounded to the dtype, those in `moved` (results.json's key) moved by whole ulps."""
    from omegaconf import OmegaConf

    from runner.config import build_run_config
    from runner.protocol import Derivatives
    from runner.results import (
        RESULTS_FILE,
        RunIdentity,
        derivatives_result,
        new_run_uid,
        write_json,
    )

    cfg = composed(f"backend={backend}", "task=derivatives", f"problem.x0={x0}", f"dtype={dtype}")
    spec = build_run_config(cfg).derivatives
    own = np.float32 if dtype == "float32" else np.float64
    moved = moved or {}
    exact = Derivatives(1.0, 1.0, {"a": 1.0, "b": 1.0, "c": 1.0}, 1.0, 1.0, 1.0)
    analytic = derivatives_result(spec, exact, RunIdentity(backend, backend, "cpu", {}))["analytic"]

    def value(key: str) -> float:
        found = own(flat(analytic, key))
        for _ in range(abs(moved.get(key, 0))):
            found = np.nextafter(found, own(math.copysign(math.inf, moved[key])))
        return float(found)

    found = Derivatives(
        y=value("y"), dy_dx=value("dy_dx"),
        dy_dcoef={k: value(f"dy_dcoef.{k}") for k in "abc"}, d2y_dx2=value("d2y_dx2"),
        compiled_dy_dx=value("compiled.dy_dx"), compiled_y=value("compiled.y"),
    )  # fmt: skip
    identity = RunIdentity(backend, backend, "cpu", {}, new_run_uid())
    folder = root / name
    write_json(folder / RESULTS_FILE, derivatives_result(spec, found, identity))
    (folder / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(cfg), folder / ".hydra" / "config.yaml")
    return folder


def test_agreement_names_the_pair_and_the_value_furthest_apart(tmp_path: Path) -> None:
    """At x0 = 3 tf's compiled dy/dx is 2 ulps above jax's (as a fused multiply-add might
    leave it) and torch's d2y/dx2 1 ulp below: per value, the furthest apart are tf and
    another backend, 2 ulps in compiled dy/dx. A point one backend evaluated has none."""
    from runner.compare.report import compare_folder

    runs = tmp_path / "runs"
    derivatives_folder(runs, "0_jax", "jax", 3, "float32")
    derivatives_folder(runs, "1_tf", "tf", 3, "float32", {"compiled.dy_dx": 2})
    derivatives_folder(runs, "2_torch", "torch", 3, "float32", {"d2y_dx2": -1})
    derivatives_folder(runs, "3_jax", "jax", 5, "float32")  # a point only jax evaluated
    report = compare_folder(runs, EXPERIMENT, tmp_path / "out")
    (found,) = report.derivative_agreement
    assert (found.problem, found.dtype, found.compared) == (
        "quadratic x0=3",
        "float32",
        ["jax", "tf", "torch"],
    )
    assert (found.ulps, found.quantity) == (2, "compiled.dy_dx")
    assert set(found.pair) in ({"jax", "tf"}, {"tf", "torch"})
    rows = {(r.backend, r.problem_label): r for r in report.derivatives}
    assert rows[("tf", "quadratic x0=3")].from_analytic("compiled.dy_dx") == 2
    assert rows[("torch", "quadratic x0=3")].from_analytic("d2y_dx2") == 1
    lines = report.text.splitlines()
    title = lines.index("cross-backend agreement of the derivatives (largest difference per point)")
    assert lines[title + 3].split()[:7] == [
        "quadratic",
        "x0=3",
        "float32",
        "jax,",
        "tf,",
        "torch",
        "2",
    ]
    assert "compiled dy/dx" in lines[title + 3]


def test_a_sweep_of_both_tasks_gets_both_sections(tmp_path: Path) -> None:
    """The minimize section is the report it was without the derivatives runs; the
    derivatives section follows it, and the header counts both."""
    from runner.compare.report import compare_folder

    minimize = {name: ((f"backend={name}",), 0.0) for name in ("numpy", "jax")}
    alone = run_folders(tmp_path / "alone", minimize)
    mixed = tmp_path / "mixed"
    shutil.copytree(alone, mixed)
    derivatives_folder(mixed, "d_jax", "jax", 2, "float64")
    derivatives_folder(mixed, "d_torch", "torch", 2, "float64", {"y": 1})
    before = compare_folder(alone, EXPERIMENT, tmp_path / "out_alone")
    both = compare_folder(mixed, EXPERIMENT, tmp_path / "out_mixed")
    assert "4 finished, 4 rows (one per run)" in both.text.splitlines()[0]
    assert (
        both.text.splitlines()[1:][: len(before.text.splitlines()) - 1]
        == (before.text.splitlines()[1:])
    )
    assert both.rows == before.rows
    assert [(r.backend, r.values["y"]) for r in both.derivatives] == [
        ("jax", 1.0),
        ("torch", 1.0000000000000002),
    ]
    (found,) = both.derivative_agreement
    assert (found.ulps, found.pair, found.quantity) == (1, ("jax", "torch"), "y")
    markdown = (tmp_path / "out_mixed" / "comparison.md").read_text()
    assert markdown.index("## Cross-backend agreement\n") < markdown.index("## Derivatives\n")
    assert read_csv(tmp_path / "out_mixed" / "comparison.csv") == read_csv(
        tmp_path / "out_alone" / "comparison.csv"
    )
    assert {"derivatives", "csv", "agreement", "json", "markdown"} <= set(both.files)


def test_compare_reads_derivatives_runs_from_mlflow(tmp_path: Path, fresh_store) -> None:
    """`python -m runner.compare` selected tags.task = 'minimize': logged derivatives
    runs were not in its report. Read from results.json, and from the run's metrics
    where the artifact is lost (no analytic values there: no ulps)."""
    from urllib.parse import urlsplit

    from runner.compare.report import compare
    from runner.compare.store import open_client
    from runner.results import RESULTS_FILE
    from runner.upload import upload

    runs = tmp_path / "runs"
    derivatives_folder(runs, "jax", "jax", 0.1, "float32")
    derivatives_folder(runs, "torch", "torch", 0.1, "float32", {"dy_dcoef.a": 3})
    run_folders(runs, {"numpy": (("backend=numpy",), 0.0)})
    uri = fresh_store(tmp_path / "mlflow.db")
    upload([runs], uri, EXPERIMENT, out=io.StringIO())
    client = open_client(uri)
    report = compare(uri, EXPERIMENT, out_dir=tmp_path / "all", client=client)
    assert [r.backend for r in report.rows] == ["numpy"]
    assert [(r.backend, r.source) for r in report.derivatives] == [
        ("jax", RESULTS_FILE),
        ("torch", RESULTS_FILE),
    ]
    (found,) = report.derivative_agreement
    assert (found.ulps, found.quantity) == (3, "dy_dcoef.a")
    logged = client.get_run(report.run_id).data.metrics
    assert logged["compare.rows"] == 1 and logged["compare.derivative_rows"] == 2
    assert logged["derivatives_ulps/float32/quadratic x0_0.1"] == 3
    only = compare(uri, EXPERIMENT, modes=["derivatives"], out_dir=tmp_path / "d", log=False)
    assert (only.rows, len(only.derivatives)) == ([], 2)

    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for run in client.search_runs([experiment], "tags.task = 'derivatives'"):
        (Path(urlsplit(run.info.artifact_uri).path) / RESULTS_FILE).unlink()
    lost = compare(uri, EXPERIMENT, modes=["derivatives"], out_dir=tmp_path / "m", log=False)
    by_backend = {r.backend: r for r in lost.derivatives}
    assert {r.source for r in lost.derivatives} == {"metrics"}
    for backend, row in by_backend.items():
        assert row.values == report.derivatives[backend == "torch"].values
        assert row.at == float(np.float32(0.1)) and math.isnan(row.from_analytic("y"))
    assert lost.derivative_agreement[0].ulps == 3
