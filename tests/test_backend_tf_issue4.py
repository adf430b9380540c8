"""TensorFlow backend, issue 4: every problem and optimizer against the NumPy reference.

Agreement is measured norm-wise: ||tf - ref|| <= 1e-10 ||ref|| over the final x and over
the recorded losses (a loss that crosses zero has no elementwise relative error).
Eager TF costs ~1-5 ms a step here, so the full matrix is eager at 100 steps on
problems of dimension 3-4; graph and minimize modes get spot checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

import tensorflow as tf
import tf_keras

from backends.tf import TensorFlowBackend, _EagerProgram, _GraphProgram, _Run
from runner import reference
from runner.engine import run_minimize
from runner.errors import ConfigError
from runner.optimizers import CONVENTIONS, resolve
from runner.problems import Quadratic, QuadraticForm, Rosenbrock
from runner.protocol import RecordPlan, Trajectory
from tests.specs import MODE_IDS, MODE_UPDATES, OPTIMIZERS, STEPS, make_spec, rel

BACKEND = TensorFlowBackend()
TF = CONVENTIONS["tf"]
LEGACY = CONVENTIONS["tf_legacy"]  # backend.legacy_optimizers=true
OTHER = CONVENTIONS["torch"]  # the papers' forms and defaults

# name -> (problem, lr): small, cond 10, minimum loss away from 0.
PROBLEMS: dict[str, tuple[Any, float]] = {
    "quadratic": (Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5), 0.05),
    "quadratic_dim4": (
        Quadratic(a=(1.0, 2.0, 3.0, 0.5), b=(-1.0, 0.5, 2.0, -3.0), c=0.5, x0=0.3, dim=4),
        0.05,
    ),
    "quadratic_form": (QuadraticForm(dim=4, cond=10.0, seed=0), 0.05),
    "rosenbrock": (Rosenbrock(dim=3), 1e-3),
}
# Past UNROLLED_SIZE: with XLA, graph mode runs the loop that computes each row after the
# update before it (_head_chunk).
FLAT_PROBLEMS: dict[str, tuple[Any, float]] = {
    "quadratic_dim32": (
        Quadratic(
            a=tuple(np.linspace(0.5, 3.0, 32)),
            b=tuple(np.linspace(-2.0, 1.0, 32)),
            c=0.5,
            x0=0.3,
            dim=32,
        ),
        0.05,
    ),
    "quadratic_form_dim32": (QuadraticForm(dim=32, cond=10.0, seed=0), 0.05),
    "rosenbrock_dim32": (Rosenbrock(dim=32), 1e-3),
}
# The full matrix takes one optimizer each; the other settings run on some problems.
MATRIX = [
    (p, o) for p in PROBLEMS for o in ("sgd-nesterov", "adam", "adagrad", "rmsprop-momentum")
] + [("quadratic_form", "sgd"), ("rosenbrock", "sgd-momentum"), ("quadratic_dim4", "rmsprop")]


def reference_run(problem: Any, name: str, lr: float, hyper: dict, convention: Any) -> tuple:
    return reference.run(problem, resolve(name, lr, hyper, convention), convention, STEPS)


def check_against_reference(traj: Trajectory, problem: Any, xs: np.ndarray, losses: np.ndarray):
    """Final x and every recorded row (x or ||x - x*||, loss, grad or ||grad||) vs the reference."""
    assert traj.stopped_at == STEPS
    assert rel(traj.final_x, xs[-1]) <= 1e-10
    assert rel(traj.loss, losses[:STEPS]) <= 1e-10
    grads = np.array([problem.grad(x) for x in xs[:STEPS]])
    if problem.dim is None:
        assert rel(traj.x, xs[:STEPS]) <= 1e-10
        assert rel(traj.grad, grads) <= 1e-10
    else:
        x_star = problem.optimum()[0]
        assert traj.final_x.shape == (problem.dim,)
        assert rel(traj.x, np.linalg.norm(xs[:STEPS] - x_star, axis=1)) <= 1e-10
        assert rel(traj.grad, np.linalg.norm(grads, axis=1)) <= 1e-10
    # The gradient at a rounded final x; it may be 0 at the optimum: scaled by the first one.
    scale = np.linalg.norm(grads[0])
    assert np.linalg.norm(traj.final_grad - problem.grad(xs[-1])) <= 1e-9 * scale


# --- float64: every problem x optimizer x {manual, apply} against the reference ------------


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
@pytest.mark.parametrize("mode", ["manual", "apply"])
@pytest.mark.parametrize(("problem_id", "opt_id"), MATRIX, ids=[f"{p}-{o}" for p, o in MATRIX])
def test_float64_agrees_with_the_reference(
    problem_id: str, opt_id: str, mode: str, legacy: bool
) -> None:
    """With backend.legacy_optimizers, tf_keras.optimizers.legacy's fused kernels, and
    manual mode's rules, follow CONVENTIONS['tf_legacy']."""
    problem, lr = PROBLEMS[problem_id]
    name, hyper = OPTIMIZERS[opt_id]
    spec = make_spec(problem, name, lr, hyper, mode, options={"legacy_optimizers": legacy})
    convention = LEGACY if legacy else TF
    xs, losses = reference_run(problem, name, lr, hyper, convention)
    check_against_reference(run_minimize(BACKEND, spec).trajectory, problem, xs, losses)
    # What results.json's optimizer_used names: the hand-written rule of SGD, Adam and
    # RMSprop with momentum is tf's under either convention, and is recorded so.
    plain_rule = mode == "manual" and opt_id not in ("adagrad", "rmsprop")
    assert BACKEND.convention(spec) is (TF if plain_rule else convention)


# Spot checks of minimize and the compiled loop (with and without XLA, current and legacy
# optimizers).
SPOT = [
    ("minimize", "apply", "rosenbrock", "adam", False, False),
    ("minimize", "apply", "quadratic_form", "sgd-nesterov", False, False),
    ("graph", "apply", "quadratic_form", "adam", False, False),
    ("graph", "apply", "quadratic_dim4", "adagrad", True, False),
    ("graph", "minimize", "rosenbrock", "rmsprop-momentum", False, False),
    ("graph", "minimize", "quadratic", "adagrad", False, False),
    ("graph", "manual", "quadratic_dim4", "rmsprop-momentum", False, False),
    ("graph", "manual", "rosenbrock", "sgd-nesterov", True, False),
    ("graph", "manual", "quadratic_form", "adam", False, False),
    ("graph", "apply", "quadratic_dim32", "adam", True, False),
    ("graph", "minimize", "quadratic_form_dim32", "sgd-momentum", True, False),
    ("graph", "manual", "rosenbrock_dim32", "sgd-nesterov", True, False),
    ("minimize", "apply", "rosenbrock", "rmsprop-momentum", False, True),
    ("graph", "apply", "quadratic_form", "adagrad", False, True),
    ("graph", "minimize", "quadratic_dim4", "adam", True, True),
    ("graph", "apply", "quadratic_dim32", "sgd-nesterov", True, True),
]


@pytest.mark.parametrize(
    ("mode", "update", "problem_id", "opt_id", "xla", "legacy"),
    SPOT,
    ids=[
        f"{m}-{u}-{p}-{o}{'-xla' if x else ''}{'-legacy' if g else ''}" for m, u, p, o, x, g in SPOT
    ],
)
def test_minimize_and_graph_agree_with_the_reference(
    mode: str, update: str, problem_id: str, opt_id: str, xla: bool, legacy: bool
) -> None:
    problem, lr = {**PROBLEMS, **FLAT_PROBLEMS}[problem_id]
    name, hyper = OPTIMIZERS[opt_id]
    options = {"jit_compile": xla, "legacy_optimizers": legacy}
    spec = make_spec(problem, name, lr, hyper, mode, update, options=options)
    xs, losses = reference_run(problem, name, lr, hyper, LEGACY if legacy else TF)
    check_against_reference(run_minimize(BACKEND, spec).trajectory, problem, xs, losses)


# (optimizer, hyper): where the legacy optimizers put eps differently from the current ones.
LEGACY_DIFFERENCES = [
    ("adagrad", {"eps": 1e-3}),  # outside the root (ResourceApplyAdagradV2)
    ("rmsprop", {"eps": 1e-3}),  # outside without momentum (composed ops) ...
]


@pytest.mark.parametrize(("name", "hyper"), LEGACY_DIFFERENCES, ids=["adagrad", "rmsprop"])
def test_legacy_eps_forms_are_exactly_the_documented_ones(name: str, hyper: dict) -> None:
    problem, lr = PROBLEMS["rosenbrock"]
    options = {"legacy_optimizers": True}
    legacy = run_minimize(BACKEND, make_spec(problem, name, lr, hyper, "apply", options=options))
    current = run_minimize(BACKEND, make_spec(problem, name, lr, hyper, "apply"))
    own, other = (reference_run(problem, name, lr, hyper, c)[0][-1] for c in (LEGACY, TF))
    assert rel(legacy.trajectory.final_x, own) <= 1e-10
    assert rel(legacy.trajectory.final_x, other) > 1e-8
    assert rel(current.trajectory.final_x, other) <= 1e-10
    # ... and inside with momentum (ResourceApplyRMSProp), as the current RMSprop always is.
    assert LEGACY.rmsprop_form(0.5) == TF.rmsprop_form(0.5) == "inside"


def test_legacy_optimizers_keep_float64_hyperparameters_exact() -> None:
    """Legacy Keras makes float32 variables of number hyperparameters; a float64 run
    steps with the exact values, and SGD at momentum 0 runs its momentum-free kernel."""
    problem, lr = PROBLEMS["quadratic_form"]
    options = {"legacy_optimizers": True}
    cases = [
        ("sgd", {}, {"learning_rate": lr}),
        ("sgd", {"momentum": 0.9}, {"learning_rate": lr, "momentum": 0.9}),
        ("adam", {"beta1": 0.8, "beta2": 0.99}, {"beta_1": 0.8, "beta_2": 0.99}),
        ("rmsprop", {"rho": 0.8, "momentum": 0.3}, {"rho": 0.8, "momentum": 0.3}),
    ]
    for name, given, native in cases:
        run = _Run(make_spec(problem, name, lr, given, "apply", options=options), "/CPU:0")
        assert isinstance(run.opt, tf_keras.optimizers.legacy.Optimizer)
        for key, value in native.items():
            assert float(run.opt._get_hyper(key, tf.float64)) == value, (name, key)
        if name == "sgd":
            assert run.opt._momentum == bool(given.get("momentum"))


# --- the documented formula differences are exactly the documented ones ------------------

# (optimizer, hyper, the Convention fields it exercises); rosenbrock, where they show.
DIFFERENCES = [
    ("adam", {}, ["adam_eps_form"]),  # + default eps 1e-7 vs 1e-8
    ("adagrad", {}, ["adagrad_initial_accumulator"]),  # + default eps, its form
    ("adagrad", {"eps": 1e-3, "initial_accumulator": 0.1}, ["adagrad_eps_form"]),
    ("rmsprop", {}, ["rmsprop_eps_form"]),  # + default eps 1e-7 vs 1e-8
]


@pytest.mark.parametrize(
    ("name", "hyper", "fields"),
    DIFFERENCES,
    ids=[f"{n}-{'-'.join(f)}" for n, _, f in DIFFERENCES],
)
def test_documented_difference_is_exactly_the_documented_one(
    name: str, hyper: dict, fields: list[str]
) -> None:
    """Keras matches its own Convention to 1e-10 and is > 1e-8 away from the papers' one,
    and from its own with only the named field(s) set to the papers' value."""
    problem, lr = PROBLEMS["rosenbrock"]
    got = run_minimize(BACKEND, make_spec(problem, name, lr, hyper, "apply")).trajectory.final_x
    own = reference_run(problem, name, lr, hyper, TF)[0][-1]
    other = reference_run(problem, name, lr, hyper, OTHER)[0][-1]
    swapped = dataclasses.replace(TF, **{f: getattr(OTHER, f) for f in fields})
    assert any(getattr(TF, f) != getattr(OTHER, f) for f in fields)
    one_field = reference_run(problem, name, lr, hyper, swapped)[0][-1]
    assert rel(got, own) <= 1e-10
    assert rel(got, other) > 1e-8
    assert rel(got, one_field) > 1e-8


def test_native_optimizers_get_the_resolved_hyperparameters() -> None:
    """What runs is what resolve() said: names mapped, defaults filled from CONVENTIONS['tf']."""
    problem, lr = PROBLEMS["quadratic_form"]
    cases = [
        ("sgd", {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
        ("adam", {"beta1": 0.8, "beta2": 0.99}, {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-7}),
        ("adagrad", {"initial_accumulator": 0.25}, {"initial_accumulator_value": 0.25}),
        ("adagrad", {}, {"initial_accumulator_value": 0.1, "epsilon": 1e-7}),
        ("rmsprop", {"rho": 0.8, "momentum": 0.5}, {"rho": 0.8, "momentum": 0.5}),
        ("rmsprop", {"eps": 1e-5}, {"rho": 0.9, "momentum": 0.0, "epsilon": 1e-5}),
    ]
    assert TF.adam_eps == TF.adagrad_eps == 1e-7 and TF.adagrad_initial_accumulator == 0.1
    for name, given, native in cases:
        run = _Run(make_spec(problem, name, lr, given, "apply"), "/device:CPU:0")
        assert float(run.opt.learning_rate) == lr
        assert run.opt.learning_rate.dtype == tf.float64
        assert not run.opt.jit_compile
        for key, value in native.items():
            assert getattr(run.opt, key) == value, (name, key)


# --- float32: every problem in every mode ---------------------------------------------------


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
@pytest.mark.parametrize("problem_id", ["quadratic_dim4", "quadratic_form", "rosenbrock"])
def test_float32_runs_every_problem(problem_id: str, mode: str, update: str) -> None:
    problem, lr = PROBLEMS[problem_id]
    name, hyper = OPTIMIZERS["adam"]
    spec = make_spec(problem, name, lr, hyper, mode, update, dtype="float32", steps=50)
    traj = run_minimize(BACKEND, spec).trajectory
    want = reference.run(problem, resolve(name, lr, hyper, TF), TF, 50)[0][-1]
    assert traj.stopped_at == 50
    assert traj.final_x.dtype == traj.x.dtype == traj.loss.dtype == traj.grad.dtype == np.float32
    assert traj.final_x.shape == (problem.dim,) and traj.x.shape == (50,)
    assert rel(traj.final_x, want) <= 1e-4


# --- vector recording: summaries per row, thinned the same way in every mode -------------


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_vector_rows_every_7_are_the_full_rows_thinned(mode: str, update: str) -> None:
    problem, lr = PROBLEMS["rosenbrock"]
    name, hyper = OPTIMIZERS["rmsprop-momentum"]

    def run(every: int) -> Trajectory:
        spec = make_spec(problem, name, lr, hyper, mode, update, steps=50, every=every)
        return run_minimize(BACKEND, spec).trajectory

    thin = assert_every_7_thins_the_full_rows(run)
    assert thin.x[0] == pytest.approx(np.sqrt(3.0), rel=1e-15)  # ||0 - (1, 1, 1)||
    assert thin.grad[0] == pytest.approx(np.linalg.norm(problem.grad(np.zeros(3))), rel=1e-15)


def assert_every_7_thins_the_full_rows(run: Callable[[int], Trajectory]) -> Trajectory:
    """run(7)'s rows are run(1)'s every 7th, bit for bit; returns run(7)'s trajectory."""
    thin, full = run(7), run(1)
    np.testing.assert_array_equal(thin.steps, [0, 7, 14, 21, 28, 35, 42, 49])
    assert thin.x.shape == thin.loss.shape == thin.grad.shape == (8,)
    np.testing.assert_array_equal(thin.x, full.x[::7])
    np.testing.assert_array_equal(thin.loss, full.loss[::7])
    np.testing.assert_array_equal(thin.grad, full.grad[::7])
    np.testing.assert_array_equal(thin.final_x, full.final_x)
    return thin


@pytest.mark.parametrize("xla", [False, True], ids=["graph", "graph-xla"])
def test_long_vector_rows_every_7_are_the_full_rows_thinned(xla: bool) -> None:
    """x of 32 entries takes the per-step loops (with XLA: each row computed the step
    before), whose unrecorded steps skip ||x - x*|| and ||grad||."""
    problem, lr = FLAT_PROBLEMS["rosenbrock_dim32"]
    name, hyper = OPTIMIZERS["rmsprop-momentum"]

    def run(every: int) -> Trajectory:
        options = {"jit_compile": xla}
        spec = make_spec(problem, name, lr, hyper, "graph", steps=50, every=every, options=options)
        return run_minimize(BACKEND, spec).trajectory

    thin = assert_every_7_thins_the_full_rows(run)
    assert np.all(thin.x > 0) and np.all(thin.grad > 0)  # a skipped step's zeros are not rows


def _float32_rosenbrock_stop(lr: float, steps: int) -> tuple[int, np.ndarray]:
    """Plain gradient descent on Rosenbrock(dim=4, x0=2) in float64: (first step whose
    float32 loss is not finite, x there) — the loss overflows float32 long before float64."""
    problem = Rosenbrock(dim=4, x0=2.0)
    x = problem.x0_array()
    for k in range(steps):
        with np.errstate(over="ignore"):
            if not np.isfinite(np.float32(problem.loss(x, problem.coefficients))):
                return k, x
        x = x - lr * problem.grad(x)
    raise AssertionError("did not diverge")


@pytest.mark.parametrize(("mode", "update"), MODE_UPDATES, ids=MODE_IDS)
def test_vector_divergence_stops_with_the_state_at_that_step(mode: str, update: str) -> None:
    stop, x_stop = _float32_rosenbrock_stop(0.01, 50)
    assert stop == 3
    spec = make_spec(Rosenbrock(dim=4, x0=2.0), "sgd", 0.01, {}, mode, update, dtype="float32")
    spec = dataclasses.replace(spec, steps=50, record=RecordPlan(50, 2))
    traj = run_minimize(BACKEND, spec).trajectory
    assert traj.stopped_at == stop
    assert not np.isfinite(traj.final_loss)
    np.testing.assert_array_equal(traj.steps, [0, 2])
    assert np.all(np.isfinite(traj.x)) and np.all(np.isfinite(traj.grad))
    assert traj.x[0] == 2.0  # ||(2, 2, 2, 2) - (1, 1, 1, 1)||
    assert traj.final_x.shape == (4,) and np.all(np.isfinite(traj.final_x))
    np.testing.assert_allclose(traj.final_x, x_stop, rtol=1e-5)


# --- devices --------------------------------------------------------------------------------


def _tensors(program: Any) -> dict[str, Any]:
    run = program._run
    found = {"x": run.x, "x_star": run.x_star, **{f"p.{k}": v for k, v in run.p.items()}}
    if run.opt is not None:
        found |= {f"opt.{v.name}": v for v in run.opt.variables}
    if run.manual is not None:
        found |= {"manual.t": run.manual.t, "manual.lr": run.manual.lr}
        found |= {f"manual.{k}": v for k, v in run.manual.state.items()}
    if isinstance(program, _GraphProgram):
        found |= {f"buffer{i}": b for i, b in enumerate(program._buffers)}
        if program._x_prev is not None:  # vectors under update=minimize
            found["x_prev"] = program._x_prev
    return found


def _where(device: str) -> tuple[str, int]:
    spec = tf.DeviceSpec.from_string(device)
    return spec.device_type, spec.device_index


def _check_placement(device: str) -> None:
    problem, lr = PROBLEMS["quadratic_form"]
    want = BACKEND.resolved_device(device)
    for (mode, update), (name, hyper) in zip(
        MODE_UPDATES,
        [OPTIMIZERS[k] for k in ("adam", "rmsprop-momentum", "sgd-momentum")] * 2,
        strict=True,
    ):
        spec = make_spec(problem, name, lr, hyper, mode, update, steps=5, device=device)
        program = BACKEND.prepare(spec)
        assert isinstance(program, _EagerProgram | _GraphProgram)
        found = _tensors(program)
        assert len(found) >= 5
        for key, tensor in found.items():
            assert _where(tensor.device) == _where(want), (mode, update, key, tensor.device)


def test_every_tensor_is_on_the_cpu_for_device_cpu() -> None:
    _check_placement("cpu")


@pytest.mark.skipif(
    not tf.config.list_logical_devices("GPU"),
    reason="TensorFlow sees no GPU on this machine: device=gpu placement is checked where one is",
)
def test_every_tensor_is_on_the_gpu_for_device_gpu() -> None:
    _check_placement("gpu")
    problem, lr = PROBLEMS["quadratic_form"]
    traj = run_minimize(
        BACKEND, make_spec(problem, "adam", lr, {}, "graph", "apply", device="gpu")
    ).trajectory
    xs, losses = reference_run(problem, "adam", lr, {}, TF)
    check_against_reference(traj, problem, xs, losses)


# --- what the backend cannot run --------------------------------------------------------------


def test_every_optimizer_setting_runs_in_every_mode() -> None:
    problem, lr = PROBLEMS["quadratic_form"]
    for name, hyper in OPTIMIZERS.values():
        for mode, update in MODE_UPDATES:
            for dtype in ("float32", "float64"):
                spec = make_spec(problem, name, lr, hyper, mode, update, dtype=dtype)
                assert BACKEND.unsupported(spec) is None


def test_unsupported_reasons_are_one_line() -> None:
    problem, lr = PROBLEMS["quadratic_form"]
    bad_hyper = make_spec(problem, "adam", lr, {"weight_decay": 0.1}, "apply")
    reason = BACKEND.unsupported(bad_hyper)
    assert reason is not None and "weight_decay" in reason and "adam" in reason
    reason = BACKEND.unsupported(make_spec(problem, "lion", lr, {}, "apply"))
    assert reason is not None and "lion" in reason and "\n" not in reason
    reason = BACKEND.unsupported(make_spec(problem, "sgd", lr, {}, "apply", options={"xla": 1}))
    assert reason is not None and "xla" in reason
    with pytest.raises(ConfigError, match="weight_decay"):
        BACKEND.prepare(bad_hyper)


def test_float32_adam_bias_correction_is_computed_as_keras_does() -> None:
    """Keras computes 1 - beta**t in float32 from betas rounded to it (tf.pow); the NumPy
    rule under convention=tf does the same and lands on TF's x (0.049693942 after 50
    steps), ~90 ulps from the float64 bias correction torch.optim uses."""
    from backends.numpy import NumpyBackend
    from tests.specs import notebook_spec

    spec = notebook_spec("manual", name="adam", lr=0.001, steps=50)
    by_tf = run_minimize(BACKEND, spec).trajectory
    by_numpy = run_minimize(
        NumpyBackend(), dataclasses.replace(spec, options={"convention": "tf"})
    ).trajectory
    assert np.float32(by_tf.final_x) == np.float32(0.049693942) == by_numpy.final_x


def test_float32_legacy_adam_and_rmsprop_are_float32_arithmetic_throughout() -> None:
    """Keras 2's legacy Adam keeps its betas in float32 variables, and its fused kernel
    (ResourceApplyAdam) takes beta**t, 1 - beta**t and 1 - beta in float32: 1 - 0.9f is
    0.100000024, where the current optimizer's Python 1 - 0.9 rounds to 0.1f. A float32
    replay of the kernel is TF's x at every step. CONVENTIONS['tf_legacy'] had said its
    bias correction was float64, and the agreement note blamed that for the 78 ulps
    between tf and tf+legacy_optimizers after 200 steps."""
    from tests.specs import notebook_spec

    steps, f = 200, np.float32
    legacy = {"legacy_optimizers": True}
    spec = notebook_spec("apply", name="adam", lr=0.001, steps=steps, options=legacy)
    by_tf = run_minimize(BACKEND, spec).trajectory
    one, lr, b1, b2, eps = f(1), f(0.001), f(0.9), f(0.999), f(1e-7)
    x = m = v = f(0)
    xs = [x]
    for t in range(1, steps + 1):
        g = f(2) * x - f(2)  # the notebook's quadratic: a = 1, b = -2
        alpha = lr * np.sqrt(one - b2 ** f(t)) / (one - b1 ** f(t))
        m = m + (g - m) * (one - b1)
        v = v + (g * g - v) * (one - b2)
        x = x - m * alpha / (np.sqrt(v) + eps)
        xs.append(x)
    assert np.array_equal(np.asarray(by_tf.x, np.float32), xs[:steps])
    assert f(by_tf.final_x) == xs[-1] == f(0.19151859)
    assert LEGACY.adam_bias_correction == LEGACY.decay_complement == "run dtype"
    # RMSprop's 1 - rho likewise (with momentum: ResourceApplyRMSProp, eps inside)
    hyper = {"momentum": 0.5}
    spec = notebook_spec("apply", name="rmsprop", steps=steps, hyper=hyper, options=legacy)
    by_tf = run_minimize(BACKEND, spec).trajectory
    lr, rho, momentum = f(0.01), f(0.9), f(0.5)
    x = ms = mom = f(0)
    xs = [x]
    for _ in range(steps):
        g = f(2) * x - f(2)
        ms = ms + (g * g - ms) * (one - rho)
        mom = mom * momentum + lr * g / np.sqrt(ms + eps)
        x = x - mom
        xs.append(x)
    assert np.array_equal(np.asarray(by_tf.x, np.float32), xs[:steps])
    assert f(by_tf.final_x) == xs[-1]
    # the hand-written rule where the legacy convention is its own (RMSprop without
    # momentum: eps outside the root) is recorded tf_legacy, so it takes 1 - rho in
    # float32 too; it took it in float64 (0.97674292 after 1000 steps, not 0.97674286)
    from backends.numpy import NumpyBackend

    spec = notebook_spec("manual", name="rmsprop", lr=0.001, steps=1000, options=legacy)
    by_tf = run_minimize(BACKEND, spec).trajectory
    assert BACKEND.convention(spec) is LEGACY
    numpy_spec = dataclasses.replace(spec, options={"convention": "tf_legacy"})
    by_numpy = run_minimize(NumpyBackend(), numpy_spec).trajectory
    assert np.array_equal(by_tf.x, by_numpy.x) and by_tf.final_x == by_numpy.final_x
    assert by_tf.final_x == f(0.9767428636550903)


@pytest.mark.parametrize("mode", ["manual", "graph"])
def test_results_record_legacy_optimizers_only_where_it_changes_the_rule(mode: str) -> None:
    """The hand-written rule (mode=manual, update=manual) uses no Keras optimizer:
    legacy_optimizers reaches it only through CONVENTIONS['tf_legacy'], whose SGD, Adam and
    RMSprop with momentum are tf's, so results.json leaves it out there."""
    problem = PROBLEMS["quadratic"][0]
    options = {"jit_compile": False, "legacy_optimizers": True}
    without: dict = {}  # jit_compile at its default is no option of the run's

    def used(opt_id: str, update: str = "manual") -> dict:
        name, hyper = OPTIMIZERS[opt_id]
        run_mode = update if mode == "manual" else mode  # manual: update names the mode
        spec = make_spec(problem, name, 0.05, hyper, run_mode, update, options=options)
        assert BACKEND.unsupported(spec) is None
        return BACKEND.options_used(spec)

    for opt_id in ("sgd", "sgd-nesterov", "adam", "rmsprop-momentum"):
        assert used(opt_id) == without, opt_id
        name, hyper = OPTIMIZERS[opt_id]
        spec = make_spec(problem, name, 0.05, hyper, "manual", options=options)
        assert BACKEND.convention(spec) is TF, opt_id  # optimizer_used's convention
    for opt_id in ("adagrad", "rmsprop"):  # eps outside the root: another rule
        assert used(opt_id) == {**without, "legacy_optimizers": True}, opt_id
    assert used("sgd", "apply") == {**without, "legacy_optimizers": True}  # Keras' legacy SGD
