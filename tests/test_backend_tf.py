"""TensorFlow backend: the notebook's numbers, the closed form, recording, divergence.

TF eager costs ~0.3-2 ms a step here, so eager cases stay at <= 200 steps except the
1000-step notebook checks; the compiled loop is cheap once traced.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

import tensorflow as tf

from backends.tf import TensorFlowBackend, _get_gradient
from runner.engine import run_minimize
from runner.errors import ConfigError
from runner.problems import Quadratic
from runner.protocol import (
    DerivativesSpec,
    MinimizeSpec,
)
from tests.chunks import compiled_loop
from tests.specs import (
    EAGER_UPDATES,
    GRAPH_MODE_UPDATES,
    MODE_IDS,
    MODE_UPDATES,
    mode_ids,
    notebook_spec,
)

BACKEND = TensorFlowBackend()
NOTEBOOK_X = np.float32(0.99999857)  # the notebook's x after 1000 steps, every TF variant
OTHER = Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5)


def make_spec(
    mode: str, update: str = "apply", *, jit_compile: bool = False, legacy: bool = False, **kw
) -> MinimizeSpec:
    options = {"jit_compile": jit_compile, "legacy_optimizers": legacy}
    return notebook_spec(mode, update, options=options, **kw)


# --- the notebook: 1000 float32 steps from x0 = 0 -------------------------------------


@pytest.mark.parametrize(
    ("mode", "update"),
    EAGER_UPDATES + GRAPH_MODE_UPDATES[:2],
    ids=mode_ids(EAGER_UPDATES + GRAPH_MODE_UPDATES[:2]),
)
def test_notebook_variants_end_exactly_where_the_notebook_does(mode: str, update: str) -> None:
    traj = run_minimize(BACKEND, make_spec(mode, update)).trajectory
    assert traj.stopped_at == 1000
    assert traj.final_x == NOTEBOOK_X
    assert traj.final_loss == 0.0


@pytest.mark.parametrize("mode", ["manual", "apply", "minimize"])
def test_eager_steps_on_the_cpu_hand_over_host_scalars(mode: str) -> None:
    """An eager CPU step's loss and row are NumPy scalars of the run's dtype at once
    (nothing held to the chunk's end), the values the notebook's arithmetic gives."""
    for dtype in ("float32", "float64"):
        program = BACKEND.prepare(make_spec(mode, steps=3, dtype=dtype))
        loss, x, grad = program.step(True)
        assert all(type(v) is np.dtype(dtype).type for v in (loss, x, grad))
        assert (x, grad, loss) == (0.0, -2.0, 1.0)
        loss1, x1, grad1 = program.step(False)
        assert x1 is None and grad1 is None
        losses = program.to_numpy([loss, loss1])
        assert losses.dtype == np.dtype(dtype)
        t = np.dtype(dtype).type
        x_1 = t(0) - t(0.01) * t(-2)  # the notebook's a*x^2 + b*x + c at x_1, in the dtype
        assert losses[1] == t(1) * x_1 * x_1 + t(-2) * x_1 + t(1)


@pytest.mark.parametrize(
    ("mode", "update"),
    [*EAGER_UPDATES[1:], *GRAPH_MODE_UPDATES[:2]],
    ids=mode_ids([*EAGER_UPDATES[1:], *GRAPH_MODE_UPDATES[:2]]),
)
def test_legacy_optimizers_step_exactly_as_the_current_ones(mode: str, update: str) -> None:
    """tf_keras.optimizers.legacy.SGD (the notebook's own class, TF <= 2.10) without XLA:
    every recorded row of the notebook's run the same bits as tf_keras' current SGD."""
    current = run_minimize(BACKEND, make_spec(mode, update)).trajectory
    legacy = run_minimize(BACKEND, make_spec(mode, update, legacy=True)).trajectory
    assert legacy.final_x == NOTEBOOK_X
    for column in ("x", "loss", "grad"):
        np.testing.assert_array_equal(getattr(legacy, column), getattr(current, column))


def test_legacy_sgd_with_xla_is_one_fused_rounding() -> None:
    """XLA fuses ResourceApplyGradientDescent's x - lr*g into one multiply-add: the
    notebook's run stalls one float32 ulp lower (README, "Float32, to the ulp")."""
    traj = run_minimize(BACKEND, make_spec("graph", jit_compile=True, legacy=True)).trajectory
    assert traj.stopped_at == 1000
    assert traj.final_x == np.nextafter(NOTEBOOK_X, np.float32(0))
    assert traj.x.dtype == np.float32 and traj.x.shape == (1000,)
    assert traj.x[0] == 0.0 and traj.loss[0] == 1.0 and traj.grad[0] == -2.0


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph-manual", "graph-manual-xla"])
def test_graph_manual_and_xla_converge(jit_compile: bool) -> None:
    """Reported, not pinned bit for bit: XLA may fuse x + (-lr*g) into one rounding."""
    traj = run_minimize(BACKEND, make_spec("graph", "manual", jit_compile=jit_compile)).trajectory
    assert abs(float(traj.final_x) - 1.0) < 1e-5
    assert traj.final_loss == pytest.approx(0.0, abs=1e-10)


def test_xla_loop_follows_the_plain_loop_with_apply() -> None:
    plain = run_minimize(BACKEND, make_spec("graph", "apply")).trajectory
    xla = run_minimize(BACKEND, make_spec("graph", "apply", jit_compile=True)).trajectory
    assert xla.stopped_at == 1000
    assert abs(float(xla.final_x) - 1.0) < 1e-5
    np.testing.assert_allclose(xla.x, plain.x, rtol=1e-6, atol=1e-7)


# --- float64: the closed form at every recorded step ------------------------------------


def _coefs64(problem: Quadratic) -> dict[str, np.float64]:
    return {k: np.float64(v) for k, v in problem.coefficients.items()}


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_float64_follows_the_closed_form(mode: str, update: str) -> None:
    spec = make_spec(mode, update, problem=OTHER, lr=0.05, steps=200, dtype="float64")
    traj = run_minimize(BACKEND, spec).trajectory
    assert traj.stopped_at == 200
    assert traj.x.dtype == np.float64
    np.testing.assert_array_equal(traj.steps, np.arange(200))
    closed = np.array([OTHER.sgd_closed_form(0.05, int(k)) for k in traj.steps])
    assert np.all(np.abs(traj.x - closed) <= 1e-12 * np.maximum(1.0, np.abs(traj.x)))
    x_end = OTHER.sgd_closed_form(0.05, 200)
    assert abs(float(traj.final_x) - x_end) <= 1e-12 * max(1.0, abs(x_end))
    p = _coefs64(OTHER)
    np.testing.assert_array_equal(traj.loss, OTHER.loss(traj.x, p))
    np.testing.assert_array_equal(traj.grad, 2 * p["a"] * traj.x + p["b"])
    assert traj.final_loss == pytest.approx(OTHER.loss(float(traj.final_x), p), abs=1e-15)
    assert float(traj.final_grad) == pytest.approx(OTHER.grad(float(traj.final_x)), abs=1e-14)


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_momentum_matches_keras2_sgd_from_fresh_state(mode: str, update: str) -> None:
    """Keras 2 SGD: m = -lr*g + mu*m; x += m (manual: the same rule as buf = mu*buf + g,
    x -= lr*buf). Also proves prepare() left the optimizer state and x fresh."""
    lr, mu, steps = 0.05, 0.9, 60
    spec = make_spec(
        mode, update, problem=OTHER, lr=lr, steps=steps, dtype="float64", hyper={"momentum": mu}
    )
    traj = run_minimize(BACKEND, spec).trajectory
    x, m, want = OTHER.x0, 0.0, []
    for _ in range(steps):
        want.append(x)
        m = -OTHER.grad(x) * lr + m * mu
        x += m
    np.testing.assert_allclose(traj.x, want, rtol=1e-12, atol=1e-12)
    assert float(traj.final_x) == pytest.approx(x, rel=1e-12)


# --- recording ---------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_record_every_7_of_50(mode: str, update: str) -> None:
    traj = run_minimize(BACKEND, make_spec(mode, update, steps=50, every=7)).trajectory
    np.testing.assert_array_equal(traj.steps, [0, 7, 14, 21, 28, 35, 42, 49])
    assert traj.x.shape == traj.loss.shape == traj.grad.shape == (8,)
    full = run_minimize(BACKEND, make_spec("graph", update, steps=50)).trajectory
    np.testing.assert_array_equal(traj.x, full.x[::7])
    np.testing.assert_array_equal(traj.loss, full.loss[::7])
    np.testing.assert_array_equal(traj.grad, full.grad[::7])
    assert traj.final_x == full.final_x and traj.stopped_at == 50


@pytest.mark.parametrize("update", ["apply", "manual"])
def test_graph_rows_are_the_eager_rows_bit_for_bit(update: str) -> None:
    """The per-step loop (every 1) and groups of steps (every 10) compute each op as eager
    TensorFlow does: Grappler's arithmetic optimizer, which rewrote the grouped loop's loss
    sum into one that rounds differently, is off for the runner's calls and only for them."""
    eager = run_minimize(BACKEND, make_spec(update, "apply", steps=200)).trajectory
    before = tf.config.optimizer.get_experimental_options()
    for every in (1, 10):
        graph = run_minimize(BACKEND, make_spec("graph", update, steps=200, every=every))
        traj = graph.trajectory
        np.testing.assert_array_equal(traj.steps, eager.steps[::every])
        for key in ("x", "loss", "grad"):
            np.testing.assert_array_equal(getattr(traj, key), getattr(eager, key)[::every])
        assert traj.final_x == eager.final_x and traj.final_loss == eager.final_loss
    assert tf.config.optimizer.get_experimental_options() == before


# --- divergence --------------------------------------------------------------------------


def _first_nonfinite_loss_float32(a: float, b: float, c: float, lr: float, steps: int) -> tuple:
    """Replay x <- x - lr*(2a x + b) in NumPy float32: (first step with a non-finite loss, x)."""
    f = np.float32
    a_, b_, c_, lr_ = f(a), f(b), f(c), f(lr)
    x = f(0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(steps):
            loss = a_ * x**2 + b_ * x + c_
            if not np.isfinite(loss):
                return k, x
            x = x + -lr_ * (a_ * (f(2) * x) + b_)
    raise AssertionError("the replay did not diverge")


DIVERGE = [(m, u, 3, False) for m, u in MODE_UPDATES] + [
    (m, u, e, xla) for xla in (False, True) for e in (8, 6) for m, u in GRAPH_MODE_UPDATES
]
DIVERGE_IDS = [
    f"{name}-every{e}" + ("-xla" if xla else "")
    for name, (*_, e, xla) in zip(
        mode_ids(MODE_UPDATES + GRAPH_MODE_UPDATES * 4), DIVERGE, strict=True
    )
]


@pytest.mark.parametrize(("mode", "update", "every", "xla"), DIVERGE, ids=DIVERGE_IDS)
def test_divergence_stops_at_the_first_nonfinite_loss(
    mode: str, update: str, every: int, xla: bool
) -> None:
    """every=3: the stopping step (64) is not a recorded one; every=8: it is, and starts a
    group of 8 steps; every=6: it is the 5th of a group of 6 (with XLA too, where groups
    locate it by selects)."""
    stop, x_stop = _first_nonfinite_loss_float32(1.0, -2.0, 1.0, 1.5, 100)
    assert stop == 64
    spec = make_spec(mode, update, lr=1.5, steps=100, every=every, jit_compile=xla)
    traj = run_minimize(BACKEND, spec).trajectory
    assert traj.stopped_at == stop
    assert not np.isfinite(traj.final_loss)
    assert np.all(traj.steps < stop) and traj.steps.size == -(-stop // every)
    assert np.all(np.isfinite(traj.x)) and np.all(np.isfinite(traj.loss))
    assert np.all(np.isfinite(traj.grad))
    if mode == "graph":  # the compiled loop hands back the state at the stopping step
        assert traj.final_x == x_stop


# --- prepare() pays the one-time costs ---------------------------------------------------


def test_graph_prepare_traces_once_and_run_does_not_retrace() -> None:
    spec = make_spec("graph", "minimize", steps=30, every=4)
    program = BACKEND.prepare(spec)
    assert program._fn.experimental_get_tracing_count() == 1
    assert int(program._run.opt.iterations) == 0 and float(program._run.x) == 0.0
    first, _ = compiled_loop(program, spec)
    assert program._fn.experimental_get_tracing_count() == 1
    assert int(program._run.opt.iterations) == 30
    assert first.steps.tolist() == [0, 4, 8, 12, 16, 20, 24, 28]


# --- derivatives: the notebook's first half ----------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("x0", "y", "dy_dx"), [(0.0, 1.0, -2.0), (1.0, 0.0, 0.0), (10.0, 81.0, 18.0)]
)
def test_derivatives_at_the_notebook_points(dtype: str, x0: float, y: float, dy_dx: float) -> None:
    problem = Quadratic(x0=x0)
    d = BACKEND.derivatives(DerivativesSpec(problem, dtype))
    assert (
        (d.y, d.dy_dx) == (y, dy_dx) == (problem.loss(x0, problem.coefficients), problem.grad(x0))
    )
    assert dict(d.dy_dcoef) == problem.grad_coefficients(x0)
    assert d.d2y_dx2 == problem.second_derivative(x0) == 2.0
    assert (d.compiled_dy_dx, d.compiled_y) == (dy_dx, y)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_get_gradient_is_traced_once_per_dtype(dtype: str) -> None:
    for x0, want in [(3.0, (4.0, 4.0)), (1.0, (0.0, 0.0)), (2.0, (2.0, 1.0))]:
        d = BACKEND.derivatives(DerivativesSpec(Quadratic(x0=x0), dtype))
        assert (d.compiled_dy_dx, d.compiled_y) == want
    d = BACKEND.derivatives(DerivativesSpec(OTHER, dtype))
    assert d.compiled_dy_dx == pytest.approx(OTHER.grad(OTHER.x0), rel=1e-6)
    fn = _get_gradient(OTHER, tf.float64 if dtype == "float64" else tf.float32)
    assert fn.experimental_get_tracing_count() == 1


# --- plugin surface ----------------------------------------------------------------------


def test_versions_and_devices() -> None:
    versions = BACKEND.versions()
    assert versions["tensorflow"] == tf.__version__ and "tf_keras" in versions
    assert "CPU" in BACKEND.resolved_device("cpu")
    if tf.config.list_logical_devices("GPU"):
        assert "GPU" in BACKEND.resolved_device("gpu")
        assert "GPU" in BACKEND.resolved_device("auto")
    else:
        assert "CPU" in BACKEND.resolved_device("auto")
        with pytest.raises(ConfigError, match="device=gpu: TensorFlow sees no GPU"):
            BACKEND.resolved_device("gpu")


def test_unsupported_names_the_reason() -> None:
    assert BACKEND.unsupported(make_spec("apply")) is None
    assert BACKEND.unsupported(make_spec("graph", "minimize", jit_compile=True)) is None
    assert BACKEND.unsupported(make_spec("apply", hyper={"momentum": 0.9})) is None
    assert BACKEND.unsupported(make_spec("apply", name="adam")) is None
    assert BACKEND.unsupported(make_spec("manual", hyper={"momentum": 0.9})) is None
    hyper = {"momentum": 0.9, "nesterov": True}
    assert BACKEND.unsupported(make_spec("graph", "manual", hyper=hyper)) is None
    assert "weight_decay" in BACKEND.unsupported(make_spec("apply", hyper={"weight_decay": 0.1}))
    assert "nesterov" in BACKEND.unsupported(make_spec("apply", hyper={"nesterov": True}))
    assert "'lion' is unknown" in BACKEND.unsupported(make_spec("apply", name="lion"))
    assert BACKEND.unsupported(make_spec("graph", jit_compile=True, legacy=True)) is None
    bad = notebook_spec("apply", options={"legacy_optimizers": "yes"})
    assert BACKEND.unsupported(bad) == (
        "backend.legacy_optimizers='yes' is not allowed; choose one of: true, false"
    )
    assert BACKEND.unsupported(notebook_spec("apply", options={"xla": True})) == (
        "backend.xla=true is not an option of this backend; allowed: jit_compile, legacy_optimizers"
    )
    assert BACKEND.unsupported(notebook_spec("manual", options={"jit_compile": True})) == (
        "backend.jit_compile=true sets mode=graph's compiled loop; mode=manual runs eagerly: "
        "choose mode=graph, or leave it out"
    )
    with pytest.raises(ConfigError, match="weight_decay"):
        BACKEND.prepare(make_spec("apply", hyper={"weight_decay": 0.1}))


def test_runs_in_one_process_do_not_warn_of_retracing(caplog: pytest.LogCaptureFixture) -> None:
    """Each run traces its own loop once; TF would count them together as retracing."""
    spec = make_spec("graph", steps=3)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(6):
            run_minimize(BACKEND, spec)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
