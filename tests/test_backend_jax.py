"""The JAX backend against mathematics: closed forms, NumPy replays and the notebook's numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

from backends.jax import JaxBackend, make_minimize_step  # noqa: E402
from runner.engine import run_minimize  # noqa: E402
from runner.errors import ConfigError  # noqa: E402
from runner.problems import Quadratic  # noqa: E402
from runner.protocol import (  # noqa: E402
    EAGER_CHUNK,
    DerivativesSpec,
    MinimizeSpec,
    OptimizerSpec,
    RecordPlan,
)
from tests.chunks import assert_rows_kept_when_a_step_raises, compiled_loop  # noqa: E402
from tests.specs import MODE_IDS, MODE_UPDATES, notebook_spec  # noqa: E402

# float32 stall points at the defaults: the notebook rounds lr*g before subtracting;
# XLA contracts x - lr*g into one fused multiply-add and stalls one ulp lower.
NOTEBOOK_X = np.float32(0.99999857)
FUSED_X = np.float32(0.99999851)


@pytest.fixture(scope="module")
def backend() -> JaxBackend:
    return JaxBackend()


spec_for = notebook_spec


def replay_float32(problem: Quadratic, lr: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """x_k and loss(x_k) of plain SGD in NumPy float32, k = 0..steps."""
    f = np.float32
    a, b, c, rate = f(problem.a), f(problem.b), f(problem.c), f(lr)
    xs, losses = [f(problem.x0)], []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            x = xs[-1]
            losses.append(a * x * x + b * x + c)
            xs.append(x - rate * (a * (f(2) * x) + b))
        x = xs[-1]
        losses.append(a * x * x + b * x + c)
    return np.array(xs, dtype=f), np.array(losses, dtype=f)


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_float32_defaults_converge(backend, mode, update):
    outcome = run_minimize(backend, spec_for(mode, update))
    traj = outcome.trajectory
    assert traj.stopped_at == 1000
    assert abs(float(traj.final_x) - 1.0) < 1e-5
    assert np.asarray(traj.final_x).dtype == np.float32
    assert traj.x.dtype == np.float32 and traj.x.shape == (1000,)
    # Either the notebook's stall point or one ulp below it, never anything else.
    assert np.float32(traj.final_x) in (NOTEBOOK_X, FUSED_X)
    assert traj.final_loss == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_float64_matches_closed_form_at_every_row(backend, mode, update):
    problem = Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5)
    lr, steps = 0.05, 200
    traj = run_minimize(
        backend, spec_for(mode, update, problem=problem, lr=lr, steps=steps, dtype="float64")
    ).trajectory
    assert traj.x.dtype == np.float64
    np.testing.assert_array_equal(traj.steps, np.arange(steps))
    expected = problem.sgd_closed_form(lr, traj.steps.astype(np.float64))
    assert np.all(np.abs(traj.x - expected) <= 1e-12 * np.maximum(1.0, np.abs(traj.x)))
    final_expected = problem.sgd_closed_form(lr, steps)
    assert abs(float(traj.final_x) - final_expected) <= 1e-12 * max(1.0, abs(final_expected))
    # Recorded loss and grad are the problem's at the recorded x (to the last ulp or so).
    p = problem.coefficients
    np.testing.assert_allclose(traj.loss, problem.loss(traj.x, p), rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(traj.grad, problem.grad(traj.x), rtol=1e-15, atol=1e-15)
    assert traj.final_loss == pytest.approx(problem.loss(float(traj.final_x), p), abs=1e-15)


@pytest.mark.parametrize("mode", ["manual", "apply", "minimize"])
def test_eager_rows_span_several_chunk_buffers(backend, mode):
    """The device buffer is drained and its cursor rewound every EAGER_CHUNK steps."""
    problem = Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5)
    lr, steps = 0.0005, 2 * EAGER_CHUNK + 345
    spec = spec_for(mode, problem=problem, lr=lr, steps=steps, dtype="float64")
    traj = run_minimize(backend, spec).trajectory
    np.testing.assert_array_equal(traj.steps, np.arange(steps))
    expected = problem.sgd_closed_form(lr, traj.steps.astype(np.float64))
    np.testing.assert_allclose(traj.x, expected, rtol=1e-12)
    np.testing.assert_allclose(traj.grad, problem.grad(traj.x), rtol=1e-15, atol=1e-15)
    loss = problem.loss(traj.x, problem.coefficients)
    np.testing.assert_allclose(traj.loss, loss, rtol=1e-15, atol=1e-15)


_GPU = any(d.platform == "gpu" for d in jax.devices())
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not _GPU, reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["manual", "apply", "minimize"])
def test_a_step_that_raises_keeps_the_rows_before_it(backend, mode, device):
    assert_rows_kept_when_a_step_raises(
        backend, dataclasses.replace(spec_for(mode, steps=20, every=2), device=device), at=7
    )


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_record_thinning(backend, mode, update):
    problem = Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5)
    traj = run_minimize(
        backend,
        spec_for(mode, update, problem=problem, lr=0.05, steps=50, every=7, dtype="float64"),
    ).trajectory
    np.testing.assert_array_equal(traj.steps, [0, 7, 14, 21, 28, 35, 42, 49])
    assert traj.x.shape == traj.loss.shape == traj.grad.shape == (RecordPlan(50, 7).rows,)
    expected = problem.sgd_closed_form(0.05, traj.steps.astype(np.float64))
    np.testing.assert_allclose(traj.x, expected, rtol=1e-12, atol=1e-12)
    assert traj.stopped_at == 50


@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_divergence_stops_at_first_non_finite_loss(backend, mode, update, every):
    problem = Quadratic(a=1.0, b=-2.0, c=1.0, x0=0.0)  # |1 - 2*a*lr| = 2: diverges
    lr, steps = 1.5, 200
    xs, losses = replay_float32(problem, lr, steps)
    first_bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    assert 0 < first_bad < steps  # the replay itself overflows inside the run

    outcome = run_minimize(backend, spec_for(mode, update, lr=lr, steps=steps, every=every))
    traj = outcome.trajectory
    assert not np.isfinite(outcome.trajectory.final_loss)
    assert traj.stopped_at == first_bad
    assert np.all(traj.steps < first_bad)
    np.testing.assert_array_equal(traj.steps, np.arange(0, first_bad, every))
    assert np.all(np.isfinite(traj.x)) and np.all(np.isfinite(traj.loss))
    np.testing.assert_array_equal(traj.x, xs[traj.steps])  # exact: integers until overflow
    assert not np.isfinite(traj.final_loss)
    if mode == "graph":  # the compiled loop keeps x_i where loss_i was met
        assert float(traj.final_x) == float(xs[first_bad])


@pytest.mark.parametrize("update", ["apply", "minimize", "manual"])
def test_graph_non_finite_loss_at_step_zero(backend, update):
    # x0**2 overflows float32: the loop stops before the first update, with no rows.
    traj = run_minimize(
        backend, spec_for("graph", update, problem=Quadratic(x0=1e20), steps=10, every=3)
    ).trajectory
    assert traj.stopped_at == 0
    assert traj.steps.size == traj.x.size == 0
    assert float(traj.final_x) == np.float32(1e20)
    assert not np.isfinite(traj.final_loss)


@pytest.mark.parametrize("mode", ["manual", "apply", "minimize", "graph"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_optax_sgd_recursion(backend, mode, nesterov):
    problem = Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5)
    lr, m, steps = 0.05, 0.9, 60
    hyper = {"momentum": m, "nesterov": nesterov}
    traj = run_minimize(
        backend, spec_for(mode, problem=problem, lr=lr, steps=steps, dtype="float64", hyper=hyper)
    ).trajectory
    x, t, expected = problem.x0, 0.0, []
    for _ in range(steps):  # optax.trace: t = g + m*t; update = -lr * (g + m*t if nesterov)
        expected.append(x)
        g = problem.grad(x)
        t = g + m * t
        x = x - lr * (g + m * t if nesterov else t)
    np.testing.assert_allclose(traj.x, expected, rtol=1e-12, atol=1e-12)
    assert float(traj.final_x) == pytest.approx(x, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_derivatives_match_the_notebook(backend, dtype):
    # x = 0: dy/dx = -2; x = 1: 0; x = 10: (x, a, b, c) grads (18, 100, 10, 1); d2 = 2;
    # the compiled get_gradient(3), (1), (2) = (dy_dx, y) = (4, 4), (0, 0), (2, 1).
    notebook = {
        0.0: (-2.0, 1.0),
        1.0: (0.0, 0.0),
        10.0: (18.0, 81.0),
        3.0: (4.0, 4.0),
        2.0: (2.0, 1.0),
    }
    for x0, (dy_dx, y) in notebook.items():
        problem = Quadratic(x0=x0)
        d = backend.derivatives(DerivativesSpec(problem, dtype))
        assert (
            (d.dy_dx, d.y)
            == (dy_dx, y)
            == (problem.grad(x0), problem.loss(x0, problem.coefficients))
        )
        assert (d.compiled_dy_dx, d.compiled_y) == (dy_dx, y)
        assert (
            dict(d.dy_dcoef) == problem.grad_coefficients(x0) == {"a": x0 * x0, "b": x0, "c": 1.0}
        )
        assert d.d2y_dx2 == 2.0 == problem.second_derivative(x0)


def test_float32_stays_float32_after_x64_is_enabled(backend):
    backend.derivatives(DerivativesSpec(Quadratic(x0=0.1), "float64"))  # switches x64 on
    assert jax.config.jax_enable_x64
    d = backend.derivatives(DerivativesSpec(Quadratic(x0=0.1), "float32"))
    assert d.y == float(np.float32(np.float32(0.1) ** 2 - np.float32(2) * np.float32(0.1) + 1))
    for mode, update in [("manual", "apply"), ("graph", "apply")]:
        traj = run_minimize(backend, spec_for(mode, update, steps=20)).trajectory
        assert traj.x.dtype == traj.loss.dtype == traj.grad.dtype == np.float32
        xs, _ = replay_float32(Quadratic(), 0.01, 20)
        np.testing.assert_allclose(traj.x, xs[:20], rtol=2e-7)


@pytest.mark.parametrize("mode", ["manual", "minimize", "graph"])
def test_no_compilation_after_prepare(backend, mode):
    """prepare() pays every compile: stepping, final() and to_numpy() compile nothing."""
    compiles: list[float] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    spec = spec_for(mode, steps=30, every=4)
    program = backend.prepare(spec)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        if mode == "graph":
            compiled_loop(program, spec)
        else:
            assert [program.step(i % 4 == 0) for i in range(30)] == [None] * 30
            losses, xs, grads = program.drain()
            assert losses.shape == xs.shape == grads.shape == (30,)
            assert losses.dtype == np.float32
            program.to_numpy(list(program.final()))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def test_minimize_step_is_handed_the_loss_function():
    import optax

    jnp = jax.numpy
    step = make_minimize_step(optax.sgd(0.25))

    def loss_fn(x):
        return (x - 3.0) ** 2

    x, state = jnp.asarray(1.0, jnp.float32), optax.sgd(0.25).init(jnp.asarray(1.0))
    x, state, loss, grad = step(loss_fn, x, state)
    assert (float(loss), float(grad), float(x)) == (4.0, -4.0, 2.0)


def test_unsupported_and_devices(backend):
    assert backend.unsupported(spec_for("apply")) is None
    for name in ("adam", "adagrad", "rmsprop"):
        assert (
            backend.unsupported(
                MinimizeSpec(
                    Quadratic(), OptimizerSpec(name, 0.1), "apply", 10, "float32", RecordPlan(10, 1)
                )
            )
            is None
        )
    assert "optimizer=lbfgs" in backend.unsupported(
        MinimizeSpec(
            Quadratic(), OptimizerSpec("lbfgs", 0.1), "apply", 10, "float32", RecordPlan(10, 1)
        )
    )
    assert "optimizer.dampening" in backend.unsupported(spec_for("apply", hyper={"dampening": 1}))
    assert backend.unsupported(spec_for("apply", hyper={"momentum": 0.9})) is None
    # Momentum is written by hand in manual mode now (see test_backend_jax_issue4.py).
    assert backend.unsupported(spec_for("manual", hyper={"momentum": 0.9})) is None
    assert backend.unsupported(spec_for("graph", "manual", hyper={"momentum": 0.9})) is None
    assert "nesterov" in backend.unsupported(spec_for("apply", hyper={"nesterov": True}))
    with pytest.raises(ConfigError):
        backend.prepare(spec_for("manual", hyper={"nesterov": True}))

    assert backend.resolved_device("cpu") == "cpu:0"
    if _GPU:
        assert backend.resolved_device("auto") == backend.resolved_device("gpu") != "cpu:0"
    else:
        assert backend.resolved_device("auto") == "cpu:0"
        with pytest.raises(ConfigError, match="device=gpu: JAX sees no GPU"):
            backend.resolved_device("gpu")
    with pytest.raises(ConfigError):
        backend.resolved_device("tpu9")
    versions = backend.versions()
    assert versions["jax"] == jax.__version__ and "optax" in versions
    assert (JaxBackend.name, JaxBackend.framework) == ("jax", "JAX")


_COMPILES_OF_PREPARE = """
import json, logging
import jax
from backends.jax import JaxBackend
from tests.specs import notebook_spec

names = []
class Compiles(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            names.append(message.split()[1])

logging.getLogger("jax").addHandler(Compiles())
with jax.log_compiles():
    JaxBackend().prepare(notebook_spec("graph", "apply", steps=10))
print(json.dumps(names))
"""


def test_a_graph_run_compiles_its_loop_and_final_step_only(tmp_path) -> None:
    """In a fresh process (a run's), prepare() compiles the loop and final()'s
    value_and_grad, and nothing eagerly: optax.sgd negating a jax.Array lr compiled
    jit(multiply) for one number (~77 ms of a cold 0.23 s compile, 2026-11-29)."""
    import json

    from tests.conftest import python_code

    proc = python_code(_COMPILES_OF_PREPARE, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(json.loads(proc.stdout.splitlines()[-1])) == ["jit(run)", "jit(value_and_grad)"]
