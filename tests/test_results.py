"""results.json and trajectory.csv of a vector run: float64 norms and errors, a block at a time.

A run at n = 1e7 holds x in float32 (40 MB); its record must not cost several times that
(a float64 copy of x, its differences, a Python list of its entries).
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from runner.engine import MinimizeOutcome, Timings
from runner.problems import Quadratic
from runner.protocol import MinimizeSpec, OptimizerSpec, RecordPlan, Trajectory
from runner.results import (
    BLOCK,
    RunIdentity,
    _abs_error,
    device_kind,
    minimize_result,
    norm,
    skipped_result,
    trajectory_rows,
)
from runner.tracking import result_metrics

IDENTITY = RunIdentity("numpy", "NumPy", "cpu", {})


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("/device:CPU:0", "cpu"),  # TensorFlow
        ("cpu:0", "cpu"),  # JAX
        ("cpu", "cpu"),  # PyTorch
        ("/job:localhost/replica:0/task:0/device:GPU:1", "gpu:1"),
        ("cuda:0", "gpu:0"),
        ("cuda", "gpu:0"),
        ("TPU_0", "TPU_0"),  # another kind: as it is
    ],
)
def test_device_kind_is_one_name_whichever_framework_ran(name: str, kind: str) -> None:
    assert device_kind(name) == kind
    assert RunIdentity("b", "B", name, {}).fields()["device"] == kind


@pytest.mark.parametrize("n", [1, BLOCK, 3 * BLOCK + 5])
@pytest.mark.parametrize("broadcast", [True, False])
def test_norm_and_error_match_the_whole_array_expressions(n: int, broadcast: bool) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).astype(np.float32)
    target = np.broadcast_to(0.5, (n,)) if broadcast else rng.normal(size=n)
    diff = x.astype(np.float64) - target
    assert _abs_error(x, target) == np.max(np.abs(diff))  # a max is exact in any order
    if n <= BLOCK:  # one block: the same dot product, the same bits
        assert norm(x, target) == np.linalg.norm(diff)
        assert norm(x) == np.linalg.norm(x.astype(np.float64))
    else:
        assert norm(x, target) == pytest.approx(np.linalg.norm(diff), rel=1e-13)


def test_a_nan_or_inf_anywhere_reaches_the_error_and_norm() -> None:
    x = np.zeros(2 * BLOCK + 1, np.float32)
    x[BLOCK + 3] = np.nan
    assert np.isnan(_abs_error(x, 0.0)) and np.isnan(norm(x))
    x[BLOCK + 3] = np.inf
    assert _abs_error(x, 0.0) == np.inf and norm(x) == np.inf


def test_a_large_vector_is_recorded_in_a_fraction_of_its_own_bytes() -> None:
    n = 1_000_000
    problem = Quadratic(x0=0.0, dim=n)
    spec = MinimizeSpec(
        problem, OptimizerSpec("sgd", 0.1), "graph", 10, "float32", RecordPlan(10, 1)
    )
    rows = np.zeros(10, np.float32)
    final_x = np.full(n, 0.75, np.float32)
    trajectory = Trajectory(
        np.arange(10), rows, rows, rows, final_x, 1.5, np.full(n, -0.5, np.float32), 10
    )
    outcome = MinimizeOutcome(trajectory, Timings(0.1, 0.2, 10))
    tracemalloc.start()
    try:
        result = minimize_result(spec, outcome, IDENTITY)
        columns = trajectory_rows(spec, outcome)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < final_x.nbytes / 2, peak  # a float64 copy alone would be 2x
    assert result["x"] is None and result["error"]["x"] == 0.25
    assert result["error"]["dist"] == pytest.approx(0.25 * np.sqrt(n), rel=1e-12)
    assert result["grad_norm"] == pytest.approx(0.5 * np.sqrt(n), rel=1e-12)
    assert columns["dist"][-1] == result["error"]["dist"]
    assert columns["grad_norm"][-1] == result["grad_norm"]


def test_the_final_rows_dist_is_from_x_star_in_the_runs_dtype() -> None:
    """x* = 0.1 is not a float32: the framework's rows measure from float32(0.1); the final
    row measured from the float64 0.1 and jumped by the difference at convergence."""
    problem = Quadratic(a=1.0, b=-0.2, c=0.0, x0=0.0, dim=3)
    spec = MinimizeSpec(
        problem, OptimizerSpec("sgd", 0.1), "manual", 5, "float32", RecordPlan(5, 1)
    )
    rows = np.zeros(5, np.float32)
    at_x_star = np.full(3, 0.1, np.float32)
    trajectory = Trajectory(np.arange(5), rows, rows, rows, at_x_star, -0.03, at_x_star * 0, 5)
    outcome = MinimizeOutcome(trajectory, Timings(0.1, 0.2, 5))
    assert trajectory_rows(spec, outcome)["dist"][-1] == 0.0
    assert minimize_result(spec, outcome, IDENTITY)["error"]["dist"] > 0  # from the exact x*


def test_a_float32_vector_runs_final_row_is_float32() -> None:
    """The final row's norms were float64 (host norms of the float32 state) under 100
    float32 rows from the framework; a review found no float32 run's last row a float32."""
    problem = Quadratic(a=1.0, b=0.0, c=0.0, x0=0.0, dim=3)  # x* = 0
    spec = MinimizeSpec(
        problem, OptimizerSpec("sgd", 0.1), "manual", 5, "float32", RecordPlan(5, 1)
    )
    rows = np.zeros(5, np.float32)
    x = np.array([0.1, 0.2, 0.3], np.float32)
    trajectory = Trajectory(np.arange(5), rows, rows, rows, x, 0.07, 2 * x, 5)
    columns = trajectory_rows(spec, MinimizeOutcome(trajectory, Timings(0.1, 0.2, 5)))
    for name, vector in (("dist", x), ("grad_norm", 2 * x)):
        exact = np.linalg.norm(vector.astype(np.float64))
        assert np.float32(exact) != exact  # the float64 norm is no float32
        assert columns[name][-1] == np.float32(exact)


def test_results_say_which_backend_options_the_run_had() -> None:
    # backend.jit_compile=true (XLA) and the like change what a run measures: results.json
    # records them after the run's identity, as JSON whatever types they came in.
    options = {"jit_compile": np.bool_(True), "unroll": np.int64(4), "sizes": (1, 2), "x": None}
    spec = MinimizeSpec(
        Quadratic(), OptimizerSpec("sgd", 0.1), "graph", 2, "float32", RecordPlan(2, 1),
        options=options,
    )  # fmt: skip
    steps = np.arange(2)
    rows = np.zeros(2, np.float32)
    trajectory = Trajectory(steps, rows, rows, rows, np.float32(0.5), 0.25, np.float32(-1.0), 2)
    finished = minimize_result(spec, MinimizeOutcome(trajectory, Timings(0.1, 0.2, 2)), IDENTITY)
    skipped = skipped_result(spec, IDENTITY, "not here")
    expected = {"jit_compile": True, "unroll": 4, "sizes": [1, 2], "x": None}
    for result in (finished, skipped):
        assert json.loads(json.dumps(result, allow_nan=True))["options"] == expected
        keys = list(result)
        assert keys[keys.index("versions") + 1 : keys.index("versions") + 3] == ["options", "mode"]
        assert type(result["options"]["jit_compile"]) is bool


@pytest.mark.parametrize("n", [4, 20_000], ids=["listed", "summarized"])
def test_a_vector_run_is_logged_to_mlflow_by_its_norms(n: int) -> None:
    """final_x is ||x|| whether or not results.json lists x (it lists up to 10,000)."""
    problem = Quadratic(x0=0.0, dim=n)
    spec = MinimizeSpec(problem, OptimizerSpec("sgd", 0.1), "graph", 2, "float32", RecordPlan(2, 1))
    rows = np.zeros(2, np.float32)
    final_x = np.full(n, 0.75, np.float32)  # x* = 1: every coordinate 0.25 away
    trajectory = Trajectory(
        np.arange(2), rows, rows, rows, final_x, 1.5, np.full(n, -0.5, np.float32), 2
    )
    result = minimize_result(spec, MinimizeOutcome(trajectory, Timings(0.1, 0.2, 2)), IDENTITY)
    metrics = result_metrics(result)
    assert metrics["final_x"] == pytest.approx(0.75 * np.sqrt(n), rel=1e-12)
    assert metrics["error_dist"] == pytest.approx(0.25 * np.sqrt(n), rel=1e-12)
    assert metrics["error_x"] == 0.25


def test_derivatives_are_judged_at_the_inputs_the_framework_had() -> None:
    """x0 = 12345.678 is 12345.677734375 in float32. A framework exact at its float32
    inputs was reported 8.25 off (the inputs' rounding, counted as its error)."""
    from runner.protocol import Derivatives, DerivativesSpec
    from runner.results import derivatives_result

    f32 = np.float32
    x, a, b, c = f32(12345.678), f32(1.0), f32(0.7), f32(1.0)
    exact = {  # float64 arithmetic on the float32 inputs: exact here
        "y": float(a) * float(x) ** 2 + float(b) * float(x) + float(c),
        "dy_dx": 2 * float(a) * float(x) + float(b),
    }
    found = Derivatives(
        y=exact["y"], dy_dx=exact["dy_dx"],
        dy_dcoef={"a": float(x) ** 2, "b": float(x), "c": 1.0},
        d2y_dx2=2.0, compiled_dy_dx=exact["dy_dx"], compiled_y=exact["y"],
    )  # fmt: skip
    spec = DerivativesSpec(Quadratic(a=1.0, b=0.7, c=1.0, x0=12345.678), "float32")
    result = derivatives_result(spec, found, IDENTITY)
    assert result["at"] == 12345.677734375
    assert result["problem"]["x0"] == 12345.678  # as asked
    assert max(_leaves(result["error"])) == 0.0


def _leaves(tree: object) -> list[float]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [float(tree)]


def test_numerics_environment_keeps_what_changes_numerics_and_masks_secrets() -> None:
    from runner.provenance import numerics_environment

    environ = {
        "XLA_FLAGS": "--xla_cpu_enable_fast_math=false",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "TORCHINDUCTOR_FREEZING": "1",
        "NVIDIA_TF32_OVERRIDE": "0",
        "MKL_NUM_THREADS": "4",
        "TF_CPP_MIN_LOG_LEVEL": "2",  # logging
        "JAX_COMPILATION_CACHE_DIR": "/tmp/cache",  # where files go
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor",
        "HOME": "/home/me",
        "NVIDIA_VISIBLE_DEVICES": "all",
        "TORCH_HUB_TOKEN": "hunter2",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "https://user:pw@host/x",  # a credential in a value
    }
    found = numerics_environment(environ)
    assert list(found) == sorted(found)
    assert found == {
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "MKL_NUM_THREADS": "4",
        "NVIDIA_TF32_OVERRIDE": "0",
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "TORCHINDUCTOR_FREEZING": "1",
        "TORCH_HUB_TOKEN": "***",
        "XLA_FLAGS": "--xla_cpu_enable_fast_math=false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "https://***@host/x",
    }


def test_machine_state_reads_the_cpu_model_and_features(tmp_path, monkeypatch) -> None:
    """The first processor's block of /proc/cpuinfo: x86 `model name`/`flags`, ARM
    `Features`; without the file, platform's answer and no claim about features."""
    import platform

    from runner import provenance

    x86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 fma avx avx2 avx512f\n\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd0c\n\n"
    cases = [(x86, "Some CPU", ["fma", "avx", "avx2", "avx512f"]), (arm, None, ["asimd", "sve"])]
    for text, model, features in cases:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(text + text.replace(": 0", ": 1").replace("fma ", ""))
        monkeypatch.setattr(provenance, "_CPUINFO", cpuinfo)
        provenance.machine_state.cache_clear()
        state = provenance.machine_state()
        assert state["cpu_features"] == features
        assert state["cpu"] == (model or platform.processor() or platform.machine() or "unknown")
    monkeypatch.setattr(provenance, "_CPUINFO", tmp_path / "absent")
    provenance.machine_state.cache_clear()
    assert provenance.machine_state()["cpu_features"] is None
    provenance.machine_state.cache_clear()


def test_machine_and_environment_reach_the_record_and_the_tags() -> None:
    from runner.tracking import result_tags

    identity = RunIdentity(
        "numpy", "NumPy", "cpu", {}, None, None,
        {"cpu": "Some CPU", "arch": "x86_64", "cpu_features": ["fma", "avx2"]},
        {"XLA_FLAGS": "--a=1", "TF_API_TOKEN": "***"},
    )  # fmt: skip
    fields = identity.fields()
    assert fields["machine"]["cpu_features"] == ["fma", "avx2"]
    assert fields["environment"] == {"XLA_FLAGS": "--a=1", "TF_API_TOKEN": "***"}
    tags = result_tags(fields)
    assert tags["cpu"] == "Some CPU"
    assert tags["cpu_features"] == "fma,avx2"
    assert tags["env.XLA_FLAGS"] == "--a=1"
    assert tags["env.TF_API_TOKEN"] == "***"
    assert "machine" not in IDENTITY.fields()  # recorded where read (runner.job), not guessed


def test_a_plugins_vector_rows_are_recorded_as_their_norms() -> None:
    """A backend plugin whose step() returns x and grad as vectors (what EagerProgram's
    docstring says it returns) had them flattened into trajectory.csv's dist and grad_norm
    columns: dist 0.0 at every row, a negative grad_norm, with no error. The core takes
    their norms, as the built-in backends hand them over."""
    problem = Quadratic(a=1.0, b=-2.0, c=0.0, x0=0.0, dim=3)  # x* = 1 in every coordinate
    spec = MinimizeSpec(
        problem, OptimizerSpec("sgd", 0.1), "manual", 2, "float32", RecordPlan(2, 1)
    )
    x = np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.2]], np.float32)
    grad = 2 * x - 2
    final = np.full(3, 0.36, np.float32)
    trajectory = Trajectory(
        np.arange(2), x, np.array([3.0, 1.92]), grad, final, 1.2288, 2 * final - 2, 2
    )
    rows = trajectory_rows(spec, MinimizeOutcome(trajectory, Timings(0.1, 0.2, 2)))
    np.testing.assert_allclose(
        rows["dist"], [np.sqrt(3), 0.8 * np.sqrt(3), 0.64 * np.sqrt(3)], rtol=1e-6
    )
    np.testing.assert_allclose(
        rows["grad_norm"], [2 * np.sqrt(3), 1.6 * np.sqrt(3), 1.28 * np.sqrt(3)], rtol=1e-6
    )
    assert rows["step"].tolist() == [0, 1, 2] and rows["dist"].size == rows["loss"].size == 3
