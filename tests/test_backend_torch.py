"""The PyTorch backend against mathematics: closed forms, NumPy replays and the notebook's numbers.

A torch.compile costs seconds here, so the default run holds one graph-mode test (float32
convergence of the three compiled updates); the other graph cases are marked slow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch import TorchBackend  # noqa: E402
from runner.engine import run_minimize  # noqa: E402
from runner.errors import ConfigError  # noqa: E402
from runner.optimizers import CONVENTIONS, resolve  # noqa: E402
from runner.problems import Quadratic, QuadraticForm, Rosenbrock  # noqa: E402
from runner.protocol import (  # noqa: E402
    DerivativesSpec,
    MinimizeSpec,
    OptimizerSpec,
    RecordPlan,
)
from runner.reference import run as reference_run  # noqa: E402
from tests.chunks import (  # noqa: E402
    assert_rows_kept_when_a_step_raises,
    run_compiled,
    same_trajectory,
)
from tests.specs import notebook_spec  # noqa: E402

EAGER = ["manual", "apply", "minimize"]
DEVICES = [
    "cpu",
    pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
UPDATES = ["apply", "minimize", "manual"]

# float32 stall points at the defaults: the notebook rounds lr*g before subtracting
# (torch manual mode and the compiled loops do the same); eager torch.optim.SGD's
# add_(g, alpha=-lr) rounds once and stalls one ulp lower.
NOTEBOOK_X = np.float32(0.99999857)
FUSED_X = np.float32(0.99999851)

OTHER = Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5)  # not the defaults: x* = 1.1

# Small vector problems and a learning rate each converges with; rows hold ||x - x*||, ||g||.
VECTORS = {
    "quadratic3": (
        Quadratic(a=(1, 2, 3), b=(-2, 1, 0.5), c=(1, 0, 2), x0=(0.5, -1, 2), dim=3),
        0.05,
    ),
    "quadratic_form4": (QuadraticForm(dim=4, cond=10, seed=1, x0=1.0), 0.05),
    "rosenbrock3": (Rosenbrock(dim=3, x0=0.0), 1e-3),
}


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return TorchBackend()


spec_for = notebook_spec


def replay_float32(problem: Quadratic, lr: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """x_k and loss(x_k) of plain SGD in NumPy float32, k = 0..steps."""
    f = np.float32
    a, b, c, rate = f(problem.a), f(problem.b), f(problem.c), f(lr)
    xs, losses = [f(problem.x0)], []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(steps):
            x = xs[-1]
            losses.append(a * x**2 + b * x + c)
            xs.append(x - rate * (f(2) * a * x + b))
        losses.append(a * xs[-1] ** 2 + b * xs[-1] + c)
    return np.array(xs, dtype=f), np.array(losses, dtype=f)


def momentum_replay(problem: Quadratic, lr: float, m: float, steps: int, nesterov: bool):
    """torch.optim.SGD's recursion in float64: buf = m*buf + g (buf = g at first); x -= lr*d."""
    x, buf, xs = problem.x0, None, []
    for _ in range(steps):
        xs.append(x)
        g = problem.grad(x)
        buf = g if buf is None else m * buf + g
        x = x - lr * (g + m * buf if nesterov else buf)
    return np.array(xs), x


def assert_closed_form(traj, problem: Quadratic, lr: float, steps: int, every: int) -> None:
    """Every row and the final state against x_k = x* + (x0 - x*)(1 - 2a*lr)^k, in float64."""
    assert traj.stopped_at == steps
    np.testing.assert_array_equal(traj.steps, np.arange(0, steps, every))
    assert traj.x.dtype == traj.loss.dtype == traj.grad.dtype == np.float64
    assert traj.x.shape == traj.loss.shape == traj.grad.shape == (RecordPlan(steps, every).rows,)
    expected = problem.sgd_closed_form(lr, traj.steps.astype(np.float64))
    assert np.all(np.abs(traj.x - expected) <= 1e-12 * np.maximum(1.0, np.abs(traj.x)))
    final = problem.sgd_closed_form(lr, steps)
    assert abs(float(traj.final_x) - final) <= 1e-12 * max(1.0, abs(final))
    p = problem.coefficients
    np.testing.assert_allclose(traj.loss, problem.loss(traj.x, p), rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(traj.grad, problem.grad(traj.x), rtol=1e-15, atol=1e-15)
    assert traj.final_loss == pytest.approx(problem.loss(float(traj.final_x), p), abs=1e-15)
    assert float(traj.final_grad) == pytest.approx(problem.grad(float(traj.final_x)), abs=1e-15)


def assert_matches_reference(traj, problem, lr: float, hyper: dict, steps: int) -> None:
    """float64 run vs runner.reference (torch convention): final x, and every row's summaries."""
    opt = resolve("sgd", lr, hyper, CONVENTIONS["torch"])
    xs, losses = reference_run(problem, opt, CONVENTIONS["torch"], steps)
    assert traj.stopped_at == steps
    assert np.asarray(traj.final_x).shape == (problem.dim,)
    np.testing.assert_allclose(traj.final_x, xs[-1], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(traj.final_grad, problem.grad(xs[-1]), rtol=1e-9, atol=1e-12)
    assert traj.final_loss == pytest.approx(losses[-1], rel=1e-10, abs=1e-13)
    at = xs[traj.steps]
    x_star = problem.optimum()[0]
    np.testing.assert_allclose(traj.loss, losses[traj.steps], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(traj.x, np.linalg.norm(at - x_star, axis=1), rtol=1e-9, atol=1e-13)
    grad_norms = [np.linalg.norm(problem.grad(x)) for x in at]
    np.testing.assert_allclose(traj.grad, grad_norms, rtol=1e-9, atol=1e-12)


def assert_diverged_like_replay(outcome, steps: int, every: int, graph: bool) -> None:
    """a=1, lr=1.5: x_{k+1} = 3 - 2 x_k, integers until x^2 overflows float32."""
    xs, losses = replay_float32(Quadratic(), 1.5, steps)
    first_bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    assert 0 < first_bad < steps
    traj = outcome.trajectory
    assert not np.isfinite(traj.final_loss)
    assert traj.stopped_at == first_bad
    np.testing.assert_array_equal(traj.steps, np.arange(0, first_bad, every))
    assert np.all(np.isfinite(traj.x)) and np.all(np.isfinite(traj.loss))
    np.testing.assert_array_equal(traj.x, xs[traj.steps])
    if graph:  # the compiled loops keep x_i of the step where the loss was met
        assert float(traj.final_x) == float(xs[first_bad])


# ----------------------------------------------------------------------------- eager modes


@pytest.mark.parametrize("mode", EAGER)
def test_eager_float32_defaults_converge(backend, mode):
    traj = run_minimize(backend, spec_for(mode)).trajectory
    assert traj.stopped_at == 1000
    assert abs(float(traj.final_x) - 1.0) < 1e-5
    assert traj.x.dtype == np.float32 and traj.x.shape == (1000,)
    assert np.float32(traj.final_x) in (NOTEBOOK_X, FUSED_X)
    assert traj.final_loss == pytest.approx(0.0, abs=1e-10)
    # Row k is the state before update k: row 0 is x0 with the notebook's loss and gradient.
    assert (traj.x[0], traj.loss[0], traj.grad[0]) == (0.0, 1.0, -2.0)
    np.testing.assert_allclose(
        traj.x[:50], replay_float32(Quadratic(), 0.01, 50)[0][:50], rtol=1e-6
    )


def test_manual_mode_is_the_notebooks_arithmetic(backend):
    xs, _ = replay_float32(Quadratic(), 0.01, 1000)
    traj = run_minimize(backend, spec_for("manual")).trajectory
    np.testing.assert_array_equal(traj.x, xs[:1000])  # bit for bit, NumPy float32
    assert np.float32(traj.final_x) == xs[1000] == NOTEBOOK_X


@pytest.mark.parametrize("mode", EAGER)
def test_eager_float64_matches_closed_form(backend, mode):
    traj = run_minimize(
        backend, spec_for(mode, problem=OTHER, lr=0.05, steps=200, dtype="float64")
    ).trajectory
    assert_closed_form(traj, OTHER, 0.05, 200, 1)


@pytest.mark.parametrize("mode", EAGER)
def test_eager_record_thinning(backend, mode):
    traj = run_minimize(
        backend, spec_for(mode, problem=OTHER, lr=0.05, steps=50, every=7, dtype="float64")
    ).trajectory
    np.testing.assert_array_equal(traj.steps, [0, 7, 14, 21, 28, 35, 42, 49])
    assert_closed_form(traj, OTHER, 0.05, 50, 7)


@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("mode", EAGER)
def test_eager_divergence_stops_at_first_non_finite_loss(backend, mode, every):
    outcome = run_minimize(backend, spec_for(mode, lr=1.5, steps=200, every=every))
    assert_diverged_like_replay(outcome, 200, every, graph=False)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["apply", "minimize"])
def test_eager_momentum_is_torch_sgd_recursion(backend, mode, nesterov):
    hyper = {"momentum": 0.9, "nesterov": nesterov}
    spec = spec_for(mode, problem=OTHER, lr=0.05, steps=60, dtype="float64", hyper=hyper)
    traj = run_minimize(backend, spec).trajectory
    expected, final = momentum_replay(OTHER, 0.05, 0.9, 60, nesterov)
    np.testing.assert_allclose(traj.x, expected, rtol=1e-12, atol=1e-12)
    assert float(traj.final_x) == pytest.approx(final, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", list(VECTORS))
@pytest.mark.parametrize("mode", EAGER)
def test_eager_vector_problems_match_reference(backend, mode, name):
    problem, lr = VECTORS[name]
    spec = spec_for(mode, problem=problem, lr=lr, steps=100, every=3, dtype="float64")
    assert_matches_reference(run_minimize(backend, spec).trajectory, problem, lr, {}, 100)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mode", ["apply", "minimize"])
def test_eager_vector_momentum_matches_reference(backend, mode, nesterov):
    problem, lr = VECTORS["quadratic_form4"]
    hyper = {"momentum": 0.9, "nesterov": nesterov}
    spec = spec_for(mode, problem=problem, lr=lr, steps=100, dtype="float64", hyper=hyper)
    assert_matches_reference(run_minimize(backend, spec).trajectory, problem, lr, hyper, 100)


def test_eager_vector_float32_rows_are_summaries(backend):
    problem, lr = VECTORS["rosenbrock3"]
    traj = run_minimize(backend, spec_for("apply", problem=problem, lr=lr, steps=20)).trajectory
    assert traj.x.shape == traj.grad.shape == (20,) and traj.x.dtype == np.float32
    assert np.asarray(traj.final_x).shape == (3,) and np.asarray(traj.final_x).dtype == np.float32
    assert traj.x[0] == np.float32(np.sqrt(3.0))  # ||0 - (1, 1, 1)||
    assert traj.grad[0] == np.float32(np.linalg.norm(problem.grad(np.zeros(3))))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_manual_steps_keep_no_autograd_history(backend, name):
    """The hand rule runs outside no_grad(): each step's x must still be a fresh leaf,
    with no graph reaching back to earlier steps."""
    program = backend.prepare(notebook_spec("manual", name=name, steps=3))
    for _ in range(3):
        program.step(False)
    assert program._x.is_leaf and program._x.grad_fn is None
    assert not any(s.requires_grad for s in program._state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", EAGER)
def test_a_step_that_raises_keeps_the_rows_before_it(backend, mode, device):
    assert_rows_kept_when_a_step_raises(
        backend, dataclasses.replace(spec_for(mode, steps=20, every=2), device=device), at=7
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", EAGER)
def test_eager_step_values_and_snapshots(backend, mode, device):
    """On the CPU a step's values are Python floats at once (nothing held for the chunk's
    end); on a GPU device tensors, which cross to the host once a chunk."""
    spec = dataclasses.replace(spec_for(mode, steps=4), device=device)
    program = backend.prepare(spec)
    loss, x, grad = program.step(True)
    if device == "cpu":
        assert all(type(v) is float for v in (loss, x, grad))
    else:
        assert all(isinstance(v, torch.Tensor) and v.is_cuda for v in (loss, x, grad))
        assert not loss.requires_grad  # no autograd graph kept alive per step
    loss1, x1, grad1 = program.step(False)
    assert x1 is None and grad1 is None
    # The snapshot of step 0 is not aliased to the live x that step 1 moved.
    assert float(x) == 0.0 and float(grad) == -2.0
    xs, replay_losses = replay_float32(Quadratic(), 0.01, 2)
    losses = program.to_numpy([loss, loss1])
    assert losses.shape == (2,) and losses.dtype == np.float32
    np.testing.assert_array_equal(losses, replay_losses[:2])
    final_loss, final_x, final_grad = program.final()
    assert program.to_numpy([final_x, final_loss]).tolist() == [xs[2], replay_losses[2]]
    assert float(final_grad) == pytest.approx(2 * xs[2] - 2, rel=1e-6)


# ----------------------------------------------------------------------------- graph mode


def test_graph_float32_defaults_converge_for_each_update(backend):
    """The one compile-paying test of the default run: the three compiled updates."""
    from torch._dynamo.utils import counters

    xs, _ = replay_float32(Quadratic(), 0.01, 1000)
    for update in UPDATES:
        spec = spec_for("graph", update)
        program = backend.prepare(spec)
        graphs = counters["stats"]["unique_graphs"]
        traj = run_compiled(program, spec)
        assert counters["stats"]["unique_graphs"] == graphs, "running compiled: prepare() must"
        assert traj.stopped_at == 1000, update
        assert abs(float(traj.final_x) - 1.0) < 1e-5, update
        assert np.float32(traj.final_x) in (NOTEBOOK_X, FUSED_X), update
        assert traj.x.dtype == np.float32 and traj.x.shape == (1000,)
        np.testing.assert_array_equal(traj.steps, np.arange(1000))
        # Inductor keeps the notebook's rounding (lr*g rounded, then subtracted): bit for bit.
        np.testing.assert_array_equal(traj.x, xs[:1000], err_msg=update)
        assert (traj.loss[0], traj.grad[0]) == (1.0, -2.0)
        assert traj.final_loss == pytest.approx(0.0, abs=1e-10)
        # From x0 again, in chunks of 1 (4: one compiled call), 2, 4, ... steps: the same bits.
        program._reset()
        again = run_compiled(program, spec, first=1, growth=2)
        assert same_trajectory(again, traj), update
        assert counters["stats"]["unique_graphs"] == graphs, "a chunk boundary compiled"


def test_compiled_adam_float32_is_recorded_as_its_own_convention(backend):
    """torch.compile turns torch.optim's step counter into a tensor in the run's dtype, so
    Adam's 1 - beta**t is float32 arithmetic: ~100 ulps from eager torch.optim by step 200.
    The run says so (convention torch_compiled) and the NumPy rule under it lands within
    a few ulps (the op order of Inductor's kernel); under eager torch's it does not."""
    from backends.numpy import NumpyBackend

    spec = spec_for("graph", "apply", name="adam", lr=0.001, steps=200)
    assert backend.convention(spec).name == "torch_compiled"
    assert backend.convention(spec_for("graph", "manual", name="adam")).name == "torch"
    assert backend.convention(spec_for("apply", name="adam")).name == "torch"
    compiled = run_compiled(backend.prepare(spec), spec).x.astype(np.float32)

    def numpy_x(convention: str) -> np.ndarray:
        options = {"convention": convention}
        rule = dataclasses.replace(spec, mode="manual", options=options)
        return run_minimize(NumpyBackend(), rule).trajectory.x.astype(np.float32)

    def ulps(a: np.ndarray, b: np.ndarray) -> int:
        return int(np.abs(a.view(np.int32) - b.view(np.int32)).max())  # x >= 0 throughout

    assert ulps(compiled, numpy_x("torch_compiled")) <= 8
    assert ulps(compiled, numpy_x("torch")) >= 50


@pytest.mark.slow
@pytest.mark.parametrize("update", UPDATES)
def test_graph_float64_closed_form_and_thinning(backend, update):
    from torch._dynamo.utils import counters

    # 199 steps: an odd count (unroll falls to 1) and 4 scan chunks of 64, the last masked.
    spec = spec_for(
        "graph", update, problem=OTHER, lr=0.05, steps=199, every=7, dtype="float64",
        options={"scan_chunk": 64},
    )  # fmt: skip
    program = backend.prepare(spec)
    graphs = counters["stats"]["unique_graphs"]
    assert_closed_form(run_compiled(program, spec), OTHER, 0.05, 199, 7)
    assert counters["stats"]["unique_graphs"] == graphs  # no re-compile from chunk to chunk
    spec = spec_for("graph", update, problem=OTHER, lr=0.05, steps=200, dtype="float64")
    assert_closed_form(run_minimize(backend, spec).trajectory, OTHER, 0.05, 200, 1)


@pytest.mark.slow
def test_graph_scan_computes_no_step_the_engine_did_not_ask_for(backend, monkeypatch):
    # The engine shrinks its chunks while calls are slow (Ctrl-C latency): with every call
    # "slow" they are as short as the program allows. 400 steps in scans of 16 are then 25
    # calls; were chunks shorter than the scan, each would compute 16 steps for each 1 asked.
    from runner import engine

    monkeypatch.setattr(engine, "CHUNK_S", 1e-9)
    spec = spec_for("graph", "manual", problem=OTHER, lr=0.05, steps=400, dtype="float64",
                    options={"scan_chunk": 16})  # fmt: skip
    program = backend.prepare(spec)
    compiled, calls = program._compiled, []

    def counted(*args):
        calls.append(int(args[2]))  # the chunk's first step
        return compiled(*args)

    program._compiled = counted
    assert_closed_form(run_compiled(program, spec), OTHER, 0.05, 400, 1)
    assert calls == list(range(0, 400, 16))


@pytest.mark.slow
@pytest.mark.parametrize("update", UPDATES)
def test_graph_divergence_stops_at_first_non_finite_loss(backend, update):
    # Divergence (step 65) lands in the 5th scan chunk of 16 / the 17th call of 4 steps.
    for every in (1, 5):
        spec = spec_for("graph", update, lr=1.5, steps=200, every=every, options={"scan_chunk": 16})
        assert_diverged_like_replay(run_minimize(backend, spec), 200, every, graph=True)
    # x0**2 overflows float32: the loop stops before the first update, with no rows.
    traj = run_minimize(
        backend, spec_for("graph", update, problem=Quadratic(x0=1e20), steps=12, every=3)
    ).trajectory
    assert traj.stopped_at == 0 and traj.steps.size == traj.x.size == 0
    assert float(traj.final_x) == np.float32(1e20) and not np.isfinite(traj.final_loss)


@pytest.mark.slow
@pytest.mark.parametrize("update", ["apply", "minimize"])
def test_graph_momentum_is_torch_sgd_recursion(backend, update):
    for nesterov in (False, True):
        hyper = {"momentum": 0.9, "nesterov": nesterov}
        spec = spec_for("graph", update, problem=OTHER, lr=0.05, steps=60, dtype="float64",
                        hyper=hyper)  # fmt: skip
        traj = run_minimize(backend, spec).trajectory
        expected, final = momentum_replay(OTHER, 0.05, 0.9, 60, nesterov)
        np.testing.assert_allclose(traj.x, expected, rtol=1e-12, atol=1e-12)
        assert float(traj.final_x) == pytest.approx(final, rel=1e-12, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("update", "name", "hyper"),
    [
        ("manual", "rosenbrock3", {}),
        ("apply", "quadratic_form4", {"momentum": 0.9, "nesterov": True}),
        ("minimize", "quadratic3", {"momentum": 0.5}),
    ],
)
def test_graph_vector_problems_match_reference(backend, update, name, hyper):
    problem, lr = VECTORS[name]
    spec = spec_for(
        "graph", update, problem=problem, lr=lr, steps=100, every=3, dtype="float64", hyper=hyper
    )
    assert_matches_reference(run_minimize(backend, spec).trajectory, problem, lr, hyper, 100)


@pytest.mark.slow
@pytest.mark.parametrize("update", ["manual", "apply"])
def test_graph_vector_final_is_compiled_by_prepare(backend, update):
    """A vector's final loss and gradient come from one function that prepare() compiled
    (at the loop's dense x: x0 is a broadcast view, whose strides Dynamo guards), so
    final() compiles nothing; they are plain autograd's at the same x."""
    from torch._dynamo.utils import counters

    from backends.torch import _Run

    problem, lr = VECTORS["rosenbrock3"]
    spec = spec_for("graph", update, problem=problem, lr=lr, steps=50, dtype="float64")
    program = backend.prepare(spec)
    graphs = counters["stats"]["unique_graphs"]
    traj = run_compiled(program, spec)
    assert counters["stats"]["unique_graphs"] == graphs, "final() compiled"
    eager = _Run(spec, torch.device("cpu"), torch.float64)  # not compiled: plain autograd
    loss, _x, grad = eager.final(torch.as_tensor(traj.final_x))
    assert traj.final_loss == pytest.approx(float(loss), rel=1e-14)
    np.testing.assert_allclose(traj.final_grad, grad.numpy(), rtol=1e-14)


@pytest.mark.slow
def test_many_graph_programs_in_one_process(backend):
    """Each program has its own Dynamo cache: no recompile limit after 8 prepare() calls."""
    for _ in range(10):
        traj = run_minimize(backend, spec_for("graph", "apply", steps=40)).trajectory
        assert traj.stopped_at == 40 and traj.x[1] == np.float32(0.02)


# ----------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_derivatives_match_the_notebook(backend, dtype):
    # x = 0: dy/dx = -2; x = 1: 0; x = 10: (x, a, b, c) grads (18, 100, 10, 1); d2 = 2;
    # the compiled get_gradient(3), (1), (2) = (dy_dx, y) = (4, 4), (0, 0), (2, 1).
    notebook = {0.0: (-2.0, 1.0), 1.0: (0.0, 0.0), 10.0: (18.0, 81.0), 3.0: (4.0, 4.0),
                2.0: (2.0, 1.0)}  # fmt: skip
    for x0, (dy_dx, y) in notebook.items():
        problem = Quadratic(x0=x0)
        d = backend.derivatives(DerivativesSpec(problem, dtype))
        analytic = (problem.grad(x0), problem.loss(x0, problem.coefficients))
        assert (d.dy_dx, d.y) == (dy_dx, y) == analytic
        assert (d.compiled_dy_dx, d.compiled_y) == (dy_dx, y)
        assert dict(d.dy_dcoef) == problem.grad_coefficients(x0) == {"a": x0**2, "b": x0, "c": 1.0}
        assert d.d2y_dx2 == 2.0 == problem.second_derivative(x0)


def test_derivatives_of_other_coefficients_in_float64(backend):
    d = backend.derivatives(DerivativesSpec(OTHER, "float64"))
    x0 = OTHER.x0
    assert d.y == OTHER.loss(x0, OTHER.coefficients) == d.compiled_y
    assert d.dy_dx == OTHER.grad(x0) == d.compiled_dy_dx
    assert dict(d.dy_dcoef) == OTHER.grad_coefficients(x0)
    assert d.d2y_dx2 == OTHER.second_derivative(x0) == 3.0


# ----------------------------------------------------------------------------- the plugin


def test_unsupported(backend):
    assert backend.unsupported(spec_for("apply")) is None
    adam = MinimizeSpec(
        Quadratic(), OptimizerSpec("adam", 0.1), "apply", 10, "float32", RecordPlan(10, 1)
    )
    assert backend.unsupported(adam) is None  # every optimizer runs (issue 4)
    assert "dampening" in backend.unsupported(spec_for("apply", hyper={"dampening": 0.5}))
    assert backend.unsupported(spec_for("minimize", hyper={"momentum": 0.9})) is None
    assert backend.unsupported(spec_for("graph", "apply", hyper={"momentum": 0.9})) is None
    assert backend.unsupported(spec_for("manual", hyper={"momentum": 0.9})) is None
    assert backend.unsupported(spec_for("graph", "manual", hyper={"momentum": 0.9})) is None
    assert "nesterov" in backend.unsupported(spec_for("apply", hyper={"nesterov": True}))
    assert "float16" in backend.unsupported(spec_for("apply", dtype="float16"))
    assert "update" in backend.unsupported(spec_for("graph", "assign"))
    assert "jit_compile" in backend.unsupported(spec_for("graph", options={"jit_compile": True}))
    assert "unroll" in backend.unsupported(spec_for("graph", options={"unroll": 0}))
    with pytest.raises(ConfigError, match="dampening"):
        backend.prepare(spec_for("manual", hyper={"dampening": 0.5}))


def test_devices_and_versions(backend):
    assert backend.resolved_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert backend.resolved_device("auto") == backend.resolved_device("gpu") == "cuda:0"
    else:
        assert backend.resolved_device("auto") == "cpu"
        with pytest.raises(ConfigError, match="device=gpu: PyTorch sees no GPU"):
            backend.resolved_device("gpu")
    with pytest.raises(ConfigError, match="tpu"):
        backend.resolved_device("tpu")
    assert backend.versions() == {"torch": torch.__version__}
    assert (TorchBackend.name, TorchBackend.framework) == ("torch", "PyTorch")


# Each process counts the dlopen probes Inductor runs (a spy around the real one).
_VEC_ISA_PROBES = """
import json
from torch._inductor import config, cpu_vec_isa
probes = []
probe = cpu_vec_isa.VecISA._probe_load
def counted(self, path):
    probes.append(str(self))
    return probe(self, path)
cpu_vec_isa.VecISA._probe_load = counted
from backends.torch_isa import trust_probed_vec_isa
trust_probed_vec_isa()
print(json.dumps({"probes": probes, "trusted": config.cpp.vec_isa_ok,
                  "picked": str(cpu_vec_isa.pick_vec_isa())}))
"""


# For each line read on stdin, runs _VEC_ISA_PROBES (argv[1]) in a new fork of this
# process, then prints "done <exit code>": torch and Inductor are imported once (~2.5 s of
# CPU), not once per process. This process only imports them, probing nothing and reading
# no record, so each fork starts with Inductor's probe caches and trust_probed_vec_isa's
# empty, and finds of the forks before it only the record on disk, as a new process would.
_FORKED_PROBES = """
import os, sys, traceback
from torch._inductor import config, cpu_vec_isa
while sys.stdin.readline():
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            exec(sys.argv[1], {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(f"done {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}", flush=True)
"""


def test_the_vector_isa_probe_runs_once_per_machine(tmp_path):
    import json
    import subprocess
    import sys
    from collections import Counter

    from backends.torch_isa import RECORD_FILE
    from tests.conftest import ROOT, python_code

    cache = tmp_path / "inductor"
    record_file = cache / RECORD_FILE
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as sink:
        forks = subprocess.Popen(
            [sys.executable, "-c", _FORKED_PROBES, _VEC_ISA_PROBES],
            cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=sink, text=True,
        )  # fmt: skip
    assert forks.stdin is not None and forks.stdout is not None

    def process() -> dict:
        """What a new process probed, trusted and picked (a fork of `forks`)."""
        forks.stdin.write("\n")
        forks.stdin.flush()
        lines = []
        while not (line := forks.stdout.readline()).startswith("done "):
            assert line, errors.read_text()[-2000:]  # `forks` itself ended
            lines.append(line)
        assert line == "done 0\n", errors.read_text()[-2000:]
        return json.loads(lines[-1])

    try:
        first = process()
        record = json.loads(record_file.read_text())
        claimed = record["key"]["claimed"]
        assert set(first["probes"]) == set(claimed)  # each claimed ISA probed (VNNI twice)
        all_passed = record["passed"] == claimed
        assert first["trusted"] is (True if all_passed else None)
        second = process()
        # trusted: the base probe of each claimed ISA is gone (AVX-512's own bf16/VNNI
        # checks stay: Inductor runs them whatever vec_isa_ok says)
        saved = Counter(claimed) if all_passed else Counter()
        assert Counter(second["probes"]) == Counter(first["probes"]) - saved
        assert (second["trusted"], second["picked"]) == (first["trusted"], first["picked"])
        # a record from another torch (or CPU, or compiler) is probed again and replaced
        record["key"]["torch"] = "0.0"
        record_file.write_text(json.dumps(record))
        assert set(process()["probes"]) == set(claimed)
        assert json.loads(record_file.read_text())["key"]["torch"] == torch.__version__
    finally:
        forks.stdin.close()
        forks.stdout.close()
        try:
            forks.wait(timeout=60)
        except subprocess.TimeoutExpired:
            forks.kill()
            forks.wait()
    # the user's own setting wins: nothing probed, nothing trusted. A process of its own:
    # Inductor reads TORCHINDUCTOR_VEC_ISA_OK as it is imported.
    proc = python_code(_VEC_ISA_PROBES, tmp_path, env={**env, "TORCHINDUCTOR_VEC_ISA_OK": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["probes"] == []
