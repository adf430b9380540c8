"""Property-based tests (hypothesis): random problems, start points and learning rates.

Inside the stability bound 0 < lr < 1/a, plain gradient descent on a*x^2 + b*x + c
follows x_k = x* + (x0 - x*)(1 - 2a*lr)^k; every float64 trajectory must match it.
Derivatives must match the analytic ones at random points, and no run, stable or
not, may be reported as finished with a non-finite x or loss. The JAX and TF
backends run in-process; each test draws a mode per example.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runner.engine import run_minimize
from runner.problems import Quadratic
from runner.protocol import DTYPES, DerivativesSpec, MinimizeSpec, OptimizerSpec, RecordPlan
from runner.results import RunIdentity, minimize_result
from tests.specs import MODE_UPDATES

BACKENDS = ["jax", "tf"]
SETTINGS = settings(
    max_examples=25,
    deadline=None,  # the first example of a mode compiles; later ones are fast
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples on every run: CI stays reproducible
)

coefficient = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
curvature = st.floats(0.05, 10, allow_nan=False, allow_infinity=False)
stable_fraction = st.floats(0.01, 0.99)  # lr = fraction / a: inside 0 < lr < 1/a


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    if request.param == "jax":
        pytest.importorskip("jax")
        from backends.jax import JaxBackend

        return JaxBackend()
    pytest.importorskip("tensorflow")
    from backends.tf import TensorFlowBackend

    return TensorFlowBackend()


def spec(
    problem: Quadratic, lr: float, steps: int, mode: tuple[str, str], dtype: str = "float64"
) -> MinimizeSpec:
    return MinimizeSpec(
        problem=problem,
        optimizer=OptimizerSpec("sgd", lr, {}),
        mode=mode[0],
        steps=steps,
        dtype=dtype,
        record=RecordPlan(steps, 1),
        update=mode[1],
    )


@SETTINGS
@given(
    a=curvature,
    b=coefficient,
    c=coefficient,
    x0=coefficient,
    fraction=stable_fraction,
    steps=st.integers(1, 150),
    mode=st.sampled_from(MODE_UPDATES),
)
def test_float64_trajectory_is_the_closed_form(backend, a, b, c, x0, fraction, steps, mode):
    problem = Quadratic(a=a, b=b, c=c, x0=x0)
    lr = fraction / a
    traj = run_minimize(backend, spec(problem, lr, steps, mode)).trajectory
    assert traj.stopped_at == steps
    expected = problem.sgd_closed_form(lr, traj.steps.astype(np.float64))
    scale = np.maximum(1.0, np.abs(expected))
    assert np.all(np.abs(traj.x - expected) <= 1e-12 * scale), np.max(np.abs(traj.x - expected))
    final = problem.sgd_closed_form(lr, steps)
    assert abs(float(traj.final_x) - final) <= 1e-12 * max(1.0, abs(final))


@SETTINGS
@given(a=curvature, b=coefficient, c=coefficient, x=st.floats(-100, 100))
def test_derivatives_match_the_analytic_values(backend, a, b, c, x):
    problem = Quadratic(a=a, b=b, c=c, x0=x)
    found = backend.derivatives(DerivativesSpec(problem, "float64"))
    size = abs(a) * x * x + abs(b * x) + abs(c)  # the magnitude the arithmetic rounds at
    y = a * x * x + b * x + c
    dy_dx = 2 * a * x + b

    def close(value: float, exact: float, scale: float) -> bool:
        return abs(value - exact) <= 1e-12 * max(1.0, scale)

    assert close(found.y, y, size) and close(found.compiled_y, y, size)
    grad_scale = abs(2 * a * x) + abs(b)
    assert close(found.dy_dx, dy_dx, grad_scale) and close(found.compiled_dy_dx, dy_dx, grad_scale)
    assert close(found.dy_dcoef["a"], x * x, x * x)
    assert close(found.dy_dcoef["b"], x, abs(x))
    assert found.dy_dcoef["c"] == 1.0
    assert close(found.d2y_dx2, 2 * a, 2 * a)


IDENTITY = RunIdentity("any", "any", "cpu", {})


@SETTINGS
@given(
    a=curvature,
    b=coefficient,
    x0=coefficient,
    factor=st.floats(0.01, 1e4),  # lr = factor / a: stable below 1, diverging above
    steps=st.integers(1, 300),
    mode=st.sampled_from(MODE_UPDATES),
    dtype=st.sampled_from(["float32", "float64"]),
)
# float32, lr=1.5: the loss first overflows at step 64, i.e. in the state after the last
# update of a 64-step run, which no in-loop check sees
@example(a=1.0, b=-2.0, x0=0.0, factor=1.5, steps=64, mode=("manual", "apply"), dtype="float32")
@example(a=1.0, b=-2.0, x0=0.0, factor=1.5, steps=64, mode=("graph", "apply"), dtype="float32")
def test_never_finished_with_a_non_finite_result(backend, a, b, x0, factor, steps, mode, dtype):
    problem = Quadratic(a=a, b=b, c=1.0, x0=x0)
    run = spec(problem, factor / a, steps, mode, dtype)
    outcome = run_minimize(backend, run)
    result = minimize_result(run, outcome, IDENTITY)
    finite = math.isfinite(result["loss"]) and math.isfinite(result["x"])
    assert result["status"] in ("finished", "diverged")
    if result["status"] == "finished":
        assert finite and result["steps_run"] == steps
    else:
        assert not math.isfinite(result["loss"]) and result["diverged_at"] == result["steps_run"]
        assert result["steps_run"] < steps or not finite
    if factor < 0.99:  # inside the bound nothing can overflow from these starts
        assert result["status"] == "finished"


# Any finite float64, subnormals and values beyond float32's range included.
any_number = st.floats(allow_nan=False, allow_infinity=False)


def run_config(problem: dict, dtype: str):
    """build_run_config of a whole run's config (what the CLI hands it), with `problem`."""
    from runner.config import build_run_config

    return build_run_config(
        {
            "task": "minimize", "dtype": dtype, "device": "cpu", "steps": 10,
            "record_every": None, "progress": False, "backend": {"name": "numpy"},
            "mode": {"name": "manual"}, "problem": problem,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "nesterov": False},
        }
    )  # fmt: skip


def in_dtype(value: float, dtype: str) -> float:
    with np.errstate(over="ignore"):
        return float(np.asarray(value, dtype=dtype))


@SETTINGS
@given(a=any_number, b=any_number, c=any_number, x0=any_number, dtype=st.sampled_from(DTYPES))
@example(a=1e-320, b=-2.0, c=1.0, x0=0.0, dtype="float32")  # a is 0 in float32: no minimum
@example(a=1e40, b=-2.0, c=1.0, x0=0.0, dtype="float32")  # a is inf in float32
@example(a=1.0, b=-2.0, c=1.0, x0=1e39, dtype="float32")  # x0 is inf in float32
@example(a=1e-40, b=-2.0, c=1.0, x0=0.0, dtype="float32")  # x* = 1e40 overflows float32
@example(a=1e-320, b=-2.0, c=1.0, x0=0.0, dtype="float64")  # x* = 1e320 overflows float64
def test_an_accepted_problem_is_finite_in_its_dtype(a, b, c, x0, dtype):
    """A quadratic the config accepts has coefficients, x0 and optimum that the run's
    dtype holds (a > 0 in it): a run computes with them rounded to that dtype."""
    from runner.errors import ConfigError

    settings = {"name": "quadratic", "a": a, "b": b, "c": c, "x0": x0}
    try:
        problem = run_config(settings, dtype).minimize.problem
    except ConfigError:
        return  # refused before the run, in one line: fine
    assert all(math.isfinite(in_dtype(v, dtype)) for v in (a, b, c, x0))
    assert in_dtype(a, dtype) > 0
    with np.errstate(all="ignore"):
        x_star, loss_star = problem.optimum()
    assert math.isfinite(in_dtype(x_star, dtype)) and math.isfinite(in_dtype(loss_star, dtype))


@SETTINGS
@given(
    cond=st.floats(1.0, 1e30),
    dim=st.integers(1, 8),
    seed=st.integers(0, 50),
    dtype=st.sampled_from(DTYPES),
)
@example(cond=1e20, dim=2, seed=0, dtype="float64")  # was np.linalg.LinAlgError: Singular
@example(cond=1e16, dim=2, seed=0, dtype="float64")  # was solvable, but A not positive definite
@example(cond=1e9, dim=2, seed=2, dtype="float32")  # A rounded to float32 is indefinite
def test_an_accepted_quadratic_form_is_positive_definite_and_solvable(cond, dim, seed, dtype):
    """A condition number the config accepts builds an SPD A, SPD in the run's dtype too,
    whose x* = A^-1 b is exact to ~4 digits (runner.problems.MAX_COND says how its bound
    was measured); one it refuses within that bound is a float32 A that is not SPD."""
    from runner.errors import ConfigError
    from runner.problems import QuadraticForm

    settings = {"name": "quadratic_form", "dim": dim, "cond": cond, "seed": seed, "x0": 0.0}
    try:
        problem = run_config(settings, dtype).minimize.problem
    except ConfigError as exc:
        if cond <= 1e12:
            assert dtype != "float64" and "not positive definite" in str(exc)
            a = QuadraticForm(dim, cond, seed).coefficients["A"]
            with pytest.raises(np.linalg.LinAlgError):
                np.linalg.cholesky(a.astype(dtype).astype(np.float64))
        return
    a, b = problem.coefficients["A"], problem.coefficients["b"]
    np.linalg.cholesky(a)  # raises unless A is positive definite in float64
    np.linalg.cholesky(a.astype(dtype).astype(np.float64))  # ... and in the run's dtype
    x_star, _ = problem.optimum()
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    exact = q @ ((q.T @ b) / np.geomspace(1.0, cond, dim))  # A^-1 b from A's own spectrum
    assert np.linalg.norm(x_star - exact) <= 1e-3 * np.linalg.norm(exact)
