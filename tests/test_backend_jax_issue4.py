"""The JAX backend on every problem and optimizer, against the NumPy float64 reference.

Every problem x optimizer x {manual, apply} in float64 must agree with
`runner.reference.run` under CONVENTIONS["jax"] within 1e-10 relative over 100 steps
(final x, every recorded loss, and the recorded x/grad or their norms). Where the
frameworks' formulas differ, the documented difference is shown to be exactly that:
the run matches the reference under the jax convention and is measurably away from
the reference under the other framework's convention (or the jax one with only that
formula switched).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import backends.jax as jax_backend  # noqa: E402
from backends.jax import JaxBackend  # noqa: E402
from runner import reference  # noqa: E402
from runner.engine import run_minimize  # noqa: E402
from runner.errors import ConfigError  # noqa: E402
from runner.optimizers import CONVENTIONS, Convention, resolve  # noqa: E402
from runner.problems import Quadratic, QuadraticForm, Rosenbrock  # noqa: E402
from runner.protocol import (  # noqa: E402
    EAGER_CHUNK,
    MinimizeSpec,
    OptimizerSpec,
    RecordPlan,
    Trajectory,
)
from tests.chunks import compiled_loop  # noqa: E402
from tests.specs import MODE_UPDATES, notebook_spec  # noqa: E402

JAX = CONVENTIONS["jax"]
STEPS = 100
TOL = 1e-10  # relative, float64, 100 steps
GRAD_TOL = 1e-8  # recorded gradients: TOL times the curvature

PROBLEMS = {
    "quadratic": Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5),
    "quadratic_dim4": Quadratic(
        a=(1.0, 2.0, 0.5, 3.0), b=(-2.0, 1.0, 0.3, -1.5), c=0.5, x0=(0.0, 1.0, -1.0, 2.0), dim=4
    ),
    "quadratic_form": QuadraticForm(dim=5, cond=10.0, seed=3, x0=1.0),
    "rosenbrock": Rosenbrock(dim=4, x0=0.0),
}
# Past UNROLLED_SIZE: graph mode runs the per-step loop, whose rows get the problem's data
# as arguments of the executable (per-entry coefficients included).
FLAT_PROBLEMS = {
    "quadratic_dim32": Quadratic(
        a=tuple(np.linspace(0.5, 3.0, 32)),
        b=tuple(np.linspace(-2.0, 1.0, 32)),
        c=0.5,
        x0=tuple(np.linspace(-1.0, 2.0, 32)),
        dim=32,
    ),
    "quadratic_form_dim32": QuadraticForm(dim=32, cond=10.0, seed=3, x0=1.0),
    "rosenbrock_dim32": Rosenbrock(dim=32, x0=0.0),
}
# (name, lr, hyper): learning rates that still move x after 100 steps but do not reach
# the noise floor around x*, where sign-like rules (rmsprop) amplify rounding.
OPTIMIZERS = {
    "sgd": ("sgd", 0.01, {}),
    "sgd_momentum": ("sgd", 0.01, {"momentum": 0.9}),
    "sgd_nesterov": ("sgd", 0.01, {"momentum": 0.9, "nesterov": True}),
    "adam": ("adam", 0.01, {}),
    "adagrad": ("adagrad", 0.1, {}),
    "rmsprop": ("rmsprop", 0.003, {}),
    "rmsprop_momentum": ("rmsprop", 0.003, {"momentum": 0.5}),
}


@pytest.fixture(scope="module")
def backend() -> JaxBackend:
    return JaxBackend()


def optimizer_for(problem_id: str, optimizer_id: str) -> OptimizerSpec:
    name, lr, hyper = OPTIMIZERS[optimizer_id]
    if problem_id.startswith("rosenbrock") and name == "sgd":
        lr = 1e-3  # Rosenbrock's curvature (b=100) needs a small SGD step
    return OptimizerSpec(name, lr, hyper)


def spec_for(
    problem,
    optimizer: OptimizerSpec,
    mode: str,
    update: str = "apply",
    *,
    steps: int = STEPS,
    every: int = 1,
    dtype: str = "float64",
) -> MinimizeSpec:
    return MinimizeSpec(
        problem, optimizer, mode, steps, dtype, RecordPlan(steps, every), update=update
    )


def reference_run(
    problem, optimizer: OptimizerSpec, convention: Convention = JAX, steps: int = STEPS
):
    """x_k and loss(x_k), k = 0..steps, by the NumPy rule under `convention`."""
    opt = resolve(optimizer.name, optimizer.lr, optimizer.hyper, convention)
    return reference.run(problem, opt, convention, steps)


def rel_diff(found, expected) -> float:
    """max |found - expected| / max |expected| (the scale of the whole vector)."""
    found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(found - expected)) / np.max(np.abs(expected)))


def assert_matches_reference(
    traj: Trajectory, problem, xs: np.ndarray, losses: np.ndarray, every: int = 1
) -> float:
    """Final x, final loss and every recorded row against the reference; the max rel diff."""
    steps = len(xs) - 1
    assert traj.stopped_at == steps
    rows = traj.steps
    np.testing.assert_array_equal(rows, np.arange(0, steps, every))
    assert np.asarray(traj.final_x).shape == np.shape(xs[-1])
    diffs = {"final_x": rel_diff(traj.final_x, xs[-1])}
    diffs["loss"] = rel_diff(traj.loss, losses[rows])
    diffs["final_loss"] = (
        rel_diff(traj.final_loss, losses[-1]) * abs(losses[-1]) / np.max(np.abs(losses))
    )
    grads = np.array([problem.grad(x) for x in xs[rows]])
    if problem.dim is None:
        expected_x, expected_grad = xs[rows], grads
    else:  # vector problems record ||x - x*|| and ||grad|| per row
        x_star = problem.optimum()[0]
        expected_x = np.linalg.norm(xs[rows] - x_star, axis=1)
        expected_grad = np.linalg.norm(grads, axis=1)
    diffs["x_rows"] = rel_diff(traj.x, expected_x)
    worst = max(diffs.values())
    assert worst <= TOL, diffs
    # The gradient multiplies a difference in x by the curvature (Rosenbrock's reaches
    # ~10^3), so its rows get that much more room.
    grad_diff = rel_diff(traj.grad, expected_grad)
    assert grad_diff <= GRAD_TOL, grad_diff
    return worst


def assert_meaningful(problem, xs: np.ndarray) -> None:
    """The comparison means something: x moved, and is not yet sitting at x*."""
    x_star = np.asarray(problem.optimum()[0])
    moved = np.max(np.abs(xs[-1] - xs[0]))
    remaining = np.max(np.abs(xs[-1] - x_star)) / np.max(np.abs(xs[0] - x_star))
    assert moved > 1e-2 and 1e-8 < remaining < 1, (moved, remaining)


# -- every problem x optimizer x {manual, apply}, float64 -----------------------------------


@pytest.mark.parametrize("mode", ["manual", "apply"])
@pytest.mark.parametrize("optimizer_id", list(OPTIMIZERS))
@pytest.mark.parametrize("problem_id", list(PROBLEMS))
def test_float64_matches_numpy_reference(backend, problem_id, optimizer_id, mode):
    problem = PROBLEMS[problem_id]
    optimizer = optimizer_for(problem_id, optimizer_id)
    xs, losses = reference_run(problem, optimizer)
    assert_meaningful(problem, xs)
    spec = spec_for(problem, optimizer, mode)
    traj = run_minimize(backend, spec).trajectory
    assert traj.x.dtype == np.float64 and np.asarray(traj.final_x).dtype == np.float64
    assert_matches_reference(traj, problem, xs, losses)
    assert backend.convention(spec) is JAX  # what results.json's optimizer_used names


@pytest.mark.parametrize("mode", ["manual", "apply"])
@pytest.mark.parametrize(
    ("name", "lr", "hyper"),
    [("sgd", 2e-5, {"momentum": 0.9}), ("rmsprop", 2e-4, {"momentum": 0.5}), ("adam", 4e-4, {})],
)
def test_eager_state_goes_on_across_chunk_buffers(backend, name, lr, hyper, mode):
    """x and the optimizer state go on where the last chunk left them, whether a step
    carries them in the chunk buffer (a scalar x and up to two state numbers: momentum's
    trace, rmsprop's mean square and trace) or apart (Adam's integer count)."""
    problem, optimizer = PROBLEMS["quadratic"], OptimizerSpec(name, lr, hyper)
    steps = 2 * EAGER_CHUNK + 345  # small steps: x does not reach x* (see OPTIMIZERS)
    xs, losses = reference_run(problem, optimizer, steps=steps)
    assert_meaningful(problem, xs)
    spec = spec_for(problem, optimizer, mode, steps=steps, every=7)
    assert_matches_reference(run_minimize(backend, spec).trajectory, problem, xs, losses, 7)


# -- minimize and graph: spot checks --------------------------------------------------------

SPOT_CHECKS = [
    ("minimize", "apply", "quadratic", "rmsprop", 1),
    ("minimize", "apply", "quadratic_form", "adam", 1),
    ("minimize", "apply", "rosenbrock", "sgd_nesterov", 1),
    ("graph", "apply", "rosenbrock", "rmsprop_momentum", 1),
    ("graph", "apply", "quadratic", "adam", 1),
    ("graph", "minimize", "quadratic_dim4", "adagrad", 7),
    ("graph", "minimize", "quadratic_form", "sgd_momentum", 1),
    ("graph", "manual", "quadratic_form", "sgd_nesterov", 1),
    ("graph", "manual", "rosenbrock", "adam", 3),
    ("graph", "manual", "quadratic_dim4", "rmsprop", 1),
    ("graph", "apply", "quadratic_dim32", "adam", 1),
    ("graph", "minimize", "quadratic_form_dim32", "sgd_momentum", 3),
    ("graph", "manual", "rosenbrock_dim32", "adam", 1),
]


@pytest.mark.parametrize(("mode", "update", "problem_id", "optimizer_id", "every"), SPOT_CHECKS)
def test_minimize_and_graph_match_numpy_reference(
    backend, mode, update, problem_id, optimizer_id, every
):
    problem = {**PROBLEMS, **FLAT_PROBLEMS}[problem_id]
    optimizer = optimizer_for(problem_id, optimizer_id)
    xs, losses = reference_run(problem, optimizer)
    spec = spec_for(problem, optimizer, mode, update, every=every)
    traj = run_minimize(backend, spec).trajectory
    assert traj.x.shape == traj.loss.shape == traj.grad.shape == (spec.record.rows,)
    assert_matches_reference(traj, problem, xs, losses, every=every)


# -- the documented formula differences, exactly ---------------------------------------------

# (label, problem, optimizer, the other convention (resolved with its own defaults),
#  the jax convention with only the documented formula switched)
DIFFERENCES = [
    (
        "adam eps form: optax adds eps to sqrt(v_hat); tf-keras to sqrt(v) (eps-hat), 1e-7",
        "quadratic_form",
        OptimizerSpec("adam", 0.01, {}),
        "tf",
        OptimizerSpec("adam", 0.01, {"eps": 1e-4}),
        {"adam_eps_form": "raw"},
    ),
    (
        "adagrad: optax starts at 0.1, sqrt(acc + eps); torch starts at 0, sqrt(acc) + eps",
        "quadratic_dim4",
        OptimizerSpec("adagrad", 0.1, {}),
        "torch",
        OptimizerSpec("adagrad", 0.1, {"eps": 1e-3}),
        {"adagrad_eps_form": "outside"},
    ),
    (
        "adagrad first accumulator: 0.1 (optax) against 0 (torch), same eps",
        "rosenbrock",
        OptimizerSpec("adagrad", 0.1, {}),
        "torch",
        OptimizerSpec("adagrad", 0.1, {}),
        {"adagrad_initial_accumulator": 0.0},
    ),
    (
        "rmsprop eps form: optax sqrt(ms + eps); torch sqrt(ms) + eps",
        "quadratic_form",
        OptimizerSpec("rmsprop", 0.003, {"eps": 1e-4}),
        "torch",
        OptimizerSpec("rmsprop", 0.003, {"eps": 1e-4}),
        {"rmsprop_eps_form": "outside"},
    ),
]


@pytest.mark.parametrize(
    ("label", "problem_id", "optimizer", "other", "isolated", "switch"),
    DIFFERENCES,
    ids=["adam-eps-form", "adagrad-eps-form", "adagrad-initial", "rmsprop-eps-form"],
)
@pytest.mark.parametrize("mode", ["manual", "apply"])
def test_documented_difference_is_exactly_that(
    backend, mode, label, problem_id, optimizer, other, isolated, switch
):
    problem = PROBLEMS[problem_id]
    # Against another framework's convention (its defaults and its formula): far away;
    # against our own: within TOL.
    traj = run_minimize(backend, spec_for(problem, optimizer, mode)).trajectory
    xs, losses = reference_run(problem, optimizer)
    assert_matches_reference(traj, problem, xs, losses)
    other_xs, _ = reference_run(problem, optimizer, CONVENTIONS[other])
    assert rel_diff(traj.final_x, other_xs[-1]) > 1e-8, label
    # Only the documented formula switched, every value the same: still far away, so
    # the difference is that formula and not a default.
    traj = run_minimize(backend, spec_for(problem, isolated, mode)).trajectory
    xs, losses = reference_run(problem, isolated)
    assert_matches_reference(traj, problem, xs, losses)
    switched_xs, _ = reference_run(problem, isolated, dataclasses.replace(JAX, **switch))
    assert rel_diff(traj.final_x, switched_xs[-1]) > 1e-8, label


def test_native_optimizer_gets_the_resolved_values():
    """Our names -> optax's, with eps and the first accumulator passed explicitly."""
    opt = resolve("adagrad", 0.1, {}, JAX)
    assert (opt["eps"], opt["initial_accumulator"]) == (1e-7, 0.1)
    state = jax_backend.native_optimizer(opt, 0.1).init(jax.numpy.zeros(3))
    np.testing.assert_array_equal(state[0].sum_of_squares, [0.1, 0.1, 0.1])
    opt = resolve("rmsprop", 0.1, {"momentum": 0.5}, JAX)
    assert opt["eps"] == 1e-8
    state = jax_backend.native_optimizer(opt, 0.1).init(jax.numpy.zeros(3))
    assert len(state) == 3  # scale_by_rms, scale, trace (the momentum)
    opt = resolve("adam", 0.1, {"beta1": 0.8}, JAX)
    assert opt["eps"] == 1e-8


# -- float32, vector recording, divergence, devices -----------------------------------------

FLOAT32_CASES = [
    ("manual", "apply", "quadratic_dim4", "adam"),
    ("apply", "apply", "quadratic_form", "rmsprop_momentum"),
    ("minimize", "apply", "rosenbrock", "adagrad"),
    ("graph", "apply", "quadratic_form", "sgd_nesterov"),
    ("graph", "minimize", "rosenbrock", "rmsprop"),
    ("graph", "manual", "quadratic_dim4", "sgd_momentum"),
]


@pytest.mark.parametrize(("mode", "update", "problem_id", "optimizer_id"), FLOAT32_CASES)
def test_float32_runs_every_mode_in_float32(backend, mode, update, problem_id, optimizer_id):
    problem = PROBLEMS[problem_id]
    optimizer = optimizer_for(problem_id, optimizer_id)
    traj = run_minimize(
        backend, spec_for(problem, optimizer, mode, update, dtype="float32")
    ).trajectory
    for values in (traj.x, traj.loss, traj.grad, traj.final_x, traj.final_grad):
        assert np.asarray(values).dtype == np.float32
    assert np.asarray(traj.final_x).shape == (problem.dim,)
    xs, losses = reference_run(problem, optimizer)
    assert rel_diff(traj.final_x, xs[-1]) < 1e-3  # float32 rounding, not a different rule
    assert rel_diff(traj.loss, losses[:-1]) < 1e-3


@pytest.mark.parametrize("mode", ["manual", "apply", "minimize"])
def test_eager_vector_step_records_summaries_and_final_returns_vectors(backend, mode):
    problem = PROBLEMS["quadratic_form"]
    program = backend.prepare(spec_for(problem, optimizer_for("quadratic_form", "adam"), mode))
    program.step(True)
    program.step(False)
    losses, dists, grad_norms = program.drain()
    assert losses.shape == dists.shape == grad_norms.shape == (2,)
    x0, x_star = problem.x0_array(), problem.optimum()[0]
    assert losses[0] == pytest.approx(problem.loss(x0, problem.coefficients), rel=1e-14)
    assert dists[0] == pytest.approx(np.linalg.norm(x0 - x_star), rel=1e-14)
    assert grad_norms[0] == pytest.approx(np.linalg.norm(problem.grad(x0)), rel=1e-14)
    assert np.isfinite(losses[1]) and program.drain()[0].shape == (0,)
    _loss, x, grad = program.final()
    assert x.shape == grad.shape == (problem.dim,)


@pytest.mark.parametrize("mode", ["manual", "minimize", "graph"])
@pytest.mark.parametrize(
    ("problem_id", "optimizer_id"),
    [("rosenbrock", "adam"), ("quadratic", "sgd_momentum")],  # x apart; x in the chunk
)
def test_no_compilation_after_prepare(backend, mode, problem_id, optimizer_id):
    compiles: list[float] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    optimizer = optimizer_for(problem_id, optimizer_id)
    spec = spec_for(PROBLEMS[problem_id], optimizer, mode, steps=30, every=4)
    program = backend.prepare(spec)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        if mode == "graph":
            compiled_loop(program, spec)
        else:
            for i in range(30):
                program.step(i % 4 == 0)
            program.drain()
            program.to_numpy(list(program.final()[1:]))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize(
    ("mode", "update"), [("manual", "apply"), ("apply", "apply"), ("graph", "apply")]
)
# dim 32: past UNROLLED_SIZE, the compiled loop is the per-step one (_flat_steps).
@pytest.mark.parametrize("dim", [4, 32])
def test_vector_divergence_stops_at_the_references_first_non_finite_loss(
    backend, mode, update, dim
):
    problem = Rosenbrock(dim=dim, x0=0.0)
    optimizer = OptimizerSpec("sgd", 0.05, {})
    with np.errstate(all="ignore"):
        xs, losses = reference_run(problem, optimizer, steps=60)
    first_bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    assert 0 < first_bad < 60
    outcome = run_minimize(backend, spec_for(problem, optimizer, mode, update, steps=60, every=5))
    traj = outcome.trajectory
    assert not np.isfinite(traj.final_loss) and traj.stopped_at == first_bad
    np.testing.assert_array_equal(traj.steps, np.arange(0, first_bad, 5))
    assert np.all(np.isfinite(traj.x)) and np.asarray(traj.final_x).shape == (dim,)
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(traj.final_x, xs[first_bad], rtol=1e-10)


def _leaves_on(program, device) -> bool:
    # Both programs keep what their calls carry (the optimizer state, rows) as _carry.
    state = (program._x, program._carry)
    leaves = jax.tree_util.tree_leaves(state)
    return bool(leaves) and all(leaf.devices() == {device} for leaf in leaves)


@pytest.mark.parametrize("mode", ["manual", "apply", "graph"])
def test_state_lives_on_the_requested_device(backend, mode):
    problem = PROBLEMS["quadratic_form"]
    spec = dataclasses.replace(
        spec_for(problem, OptimizerSpec("adam", 0.01), mode, steps=5), device="cpu"
    )
    assert _leaves_on(backend.prepare(spec), jax.devices("cpu")[0])


def _gpu():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


@pytest.mark.skipif(_gpu() is None, reason="no GPU visible to JAX on this machine (CI has none)")
@pytest.mark.parametrize(
    ("mode", "update"),
    [("manual", "apply"), ("apply", "apply"), ("graph", "apply"), ("graph", "manual")],
)
@pytest.mark.parametrize(
    ("problem_id", "optimizer_id"),
    # x apart from the chunk; a scalar x and momentum's trace carried in it (eager modes)
    [("quadratic_form", "adam"), ("rosenbrock", "adam"), ("quadratic", "sgd_momentum")],
)
def test_gpu_float64_matches_numpy_reference(backend, problem_id, optimizer_id, mode, update):
    problem = PROBLEMS[problem_id]
    optimizer = optimizer_for(problem_id, optimizer_id)
    spec = dataclasses.replace(spec_for(problem, optimizer, mode, update), device="gpu")
    assert backend.resolved_device("gpu") == str(_gpu())
    assert _leaves_on(backend.prepare(spec), _gpu())
    xs, losses = reference_run(problem, optimizer)
    assert_matches_reference(run_minimize(backend, spec).trajectory, problem, xs, losses)


# -- what the backend cannot run -----------------------------------------------------------


def test_every_optimizer_runs_in_every_mode(backend):
    for optimizer_id in OPTIMIZERS:
        for mode, update in MODE_UPDATES:
            optimizer = optimizer_for("quadratic", optimizer_id)
            spec = spec_for(PROBLEMS["quadratic"], optimizer, mode, update)
            assert backend.unsupported(spec) is None, (optimizer_id, mode, update)


def test_unsupported_reasons_name_the_combination(backend, monkeypatch):
    problem = PROBLEMS["quadratic"]
    reason = backend.unsupported(spec_for(problem, OptimizerSpec("lbfgs", 0.1), "apply"))
    assert "optimizer=lbfgs" in reason and "adam" in reason
    reason = backend.unsupported(
        spec_for(problem, OptimizerSpec("adam", 0.1, {"rho": 0.9}), "apply")
    )
    assert "optimizer.rho" in reason
    reason = backend.unsupported(
        spec_for(problem, OptimizerSpec("sgd", 0.1, {"nesterov": True}), "manual")
    )
    assert "nesterov" in reason
    with pytest.raises(ConfigError, match="lbfgs"):
        backend.prepare(spec_for(problem, OptimizerSpec("lbfgs", 0.1), "apply"))
    # A convention optax cannot express is refused for the native modes, not the manual one.
    monkeypatch.setattr(
        jax_backend, "CONVENTION", dataclasses.replace(JAX, adagrad_eps_form="outside")
    )
    adagrad = OptimizerSpec("adagrad", 0.1)
    assert "optax.adagrad" in backend.unsupported(spec_for(problem, adagrad, "apply"))
    assert "optax.adagrad" in backend.unsupported(spec_for(problem, adagrad, "graph", "minimize"))
    assert backend.unsupported(spec_for(problem, adagrad, "graph", "manual")) is None


@pytest.mark.parametrize("update", ["manual", "apply", "minimize"])
def test_vector_loop_holds_no_n_sized_temporary(backend, update):
    # XLA on the CPU writes a scalar's broadcast that two fusions read as an n-sized
    # array, every step: with the coefficients as shared constants the loop held two.
    problem = Quadratic(a=1.0, b=-2.0, c=1.0, x0=0.0, dim=100_000)
    spec = spec_for(problem, OptimizerSpec("sgd", 0.01), "graph", update, steps=20, dtype="float32")
    program = backend.prepare(spec)
    temp = program._executable.memory_analysis().temp_size_in_bytes
    assert temp < 4 * problem.dim, temp
    traj = run_minimize(backend, spec).trajectory
    assert traj.stopped_at == 20 and np.isfinite(traj.final_loss)


@pytest.mark.parametrize("mode", ["manual", "apply"])
def test_float32_adam_is_the_numpy_rule_under_the_jax_convention_to_the_bit(backend, mode):
    """optax (and the manual rule) compute 1 - beta**t in float32 from betas rounded to
    it: 0.049693957 after 50 steps, ~90 ulps from torch's float64 bias correction. The
    NumPy rule under convention=jax does the same, so it lands on JAX's x; on the way
    XLA's float32 pow and NumPy's differ now and then by an ulp (measured: at most 1)."""
    from backends.numpy import NumpyBackend

    spec = notebook_spec(mode, name="adam", lr=0.001, steps=50)
    run_minimize(backend, dataclasses.replace(spec, dtype="float64"))  # as in a sweep before
    by_jax = run_minimize(backend, spec).trajectory
    by_numpy = run_minimize(
        NumpyBackend(), dataclasses.replace(spec, mode="manual", options={"convention": "jax"})
    ).trajectory
    assert np.float32(by_jax.final_x) == np.float32(0.049693957)
    assert by_jax.final_x == by_numpy.final_x
    ulps = np.abs(by_jax.x.view(np.int32) - by_numpy.x.view(np.int32))  # x > 0 throughout
    assert ulps.max() <= 1, ulps
    paper = run_minimize(NumpyBackend(), dataclasses.replace(spec, mode="manual")).trajectory
    assert np.float32(paper.final_x) == np.float32(0.0496943)  # float64 bias correction
