"""PyTorch backend, issue 4: every problem and optimizer against the NumPy reference.

Agreement is measured norm-wise: ||torch - ref|| <= 1e-10 ||ref|| over the final x and over
the recorded losses (a loss that crosses zero has no elementwise relative error). Eager
torch costs ~0.2 ms a step here, so the whole eager matrix (4 problems x 7 optimizer
settings x manual/apply/minimize, 100 steps) is in the default run; a torch.compile costs
10-35 s cold on this CPU, so the graph-mode cases are spot checks marked slow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends.torch import (  # noqa: E402
    _DTYPES,
    _OPTIONS,
    TorchBackend,
    _OptimizerLoop,
    _Run,
    _ScanLoop,
)
from runner import reference  # noqa: E402
from runner.engine import run_minimize  # noqa: E402
from runner.errors import ConfigError  # noqa: E402
from runner.optimizers import CONVENTIONS, resolve  # noqa: E402
from runner.problems import Quadratic, QuadraticForm, Rosenbrock  # noqa: E402
from runner.protocol import Trajectory  # noqa: E402
from tests.chunks import run_compiled, same_trajectory  # noqa: E402
from tests.specs import OPTIMIZERS, STEPS, make_spec, rel  # noqa: E402

BACKEND = TorchBackend()
TORCH = CONVENTIONS["torch"]

# name -> (problem, lr): small, cond 10, minimum loss away from 0.
# quadratic_dim4 starts 2.5-3.5 from x* in each coordinate with lr 0.02, so RMSprop is still
# on its way at step 100: once it hovers at the minimum, where 2a*x + b cancels, it divides
# the gradient's last-bit rounding by sqrt(mean g^2) and grows it to ~1e-10 by step 100
# (see test_rmsprop_at_the_minimum_amplifies_only_the_gradients_rounding).
QUADRATIC_DIM4 = Quadratic(a=(1.0, 2.0, 3.0, 0.5), b=(-1.0, 0.5, 2.0, -3.0), c=0.5, dim=4)
PROBLEMS: dict[str, tuple[Any, float]] = {
    "quadratic": (Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5), 0.05),
    "quadratic_dim4": (dataclasses.replace(QUADRATIC_DIM4, x0=(3.0, -3.0, 3.0, -3.0)), 0.02),
    "quadratic_dim1": (Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5, dim=1), 0.05),  # x0 broadcast
    "quadratic_form": (QuadraticForm(dim=4, cond=10.0, seed=0), 0.05),
    "rosenbrock": (Rosenbrock(dim=3), 1e-3),
}
MATRIX = [(p, o) for p in PROBLEMS for o in OPTIMIZERS]
EAGER = ["manual", "apply", "minimize"]


def reference_run(
    problem: Any, name: str, lr: float, hyper: dict, convention: Any = TORCH, steps: int = STEPS
) -> tuple[np.ndarray, np.ndarray]:
    return reference.run(problem, resolve(name, lr, hyper, convention), convention, steps)


def check_against_reference(traj: Trajectory, problem: Any, xs: np.ndarray, losses: np.ndarray):
    """Final x and every recorded row (x or ||x - x*||, loss, grad or ||grad||) vs the reference."""
    assert traj.stopped_at == STEPS
    assert rel(traj.final_x, xs[-1]) <= 1e-10
    assert rel(traj.loss, losses[:STEPS]) <= 1e-10
    assert traj.final_loss == pytest.approx(losses[-1], rel=1e-10)
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


# --- float64: every problem x optimizer x {manual, apply, minimize} against the reference ---


@pytest.mark.parametrize("mode", EAGER)
@pytest.mark.parametrize(("problem_id", "opt_id"), MATRIX, ids=[f"{p}-{o}" for p, o in MATRIX])
def test_float64_agrees_with_the_reference(problem_id: str, opt_id: str, mode: str) -> None:
    problem, lr = PROBLEMS[problem_id]
    name, hyper = OPTIMIZERS[opt_id]
    spec = make_spec(problem, name, lr, hyper, mode)
    traj = run_minimize(BACKEND, spec).trajectory
    xs, losses = reference_run(problem, name, lr, hyper)
    check_against_reference(traj, problem, xs, losses)
    assert BACKEND.convention(spec) is TORCH  # what results.json's optimizer_used names


# --- the documented formula differences are exactly the documented ones ------------------

# (optimizer, hyper, the Convention fields it exercises); rosenbrock, where they show.
DIFFERENCES = [
    ("adam", {}, ["adam_eps_form"]),  # + default eps 1e-8 vs Keras' 1e-7
    ("adagrad", {}, ["adagrad_initial_accumulator"]),  # + default eps and its form
    # With the default eps (1e-10) the form changes x by only ~1e-8: a larger eps shows it.
    ("adagrad", {"eps": 1e-3}, ["adagrad_eps_form"]),
    ("rmsprop", {}, ["rmsprop_eps_form"]),  # + default eps 1e-8 vs Keras' 1e-7
]


@pytest.mark.parametrize(
    ("name", "hyper", "fields"),
    DIFFERENCES,
    ids=[f"{n}-{'-'.join(f)}" for n, _, f in DIFFERENCES],
)
def test_documented_difference_is_exactly_the_documented_one(
    name: str, hyper: dict, fields: list[str]
) -> None:
    """torch.optim matches its own Convention to 1e-10 and is > 1e-8 away from Keras' one,
    and from its own with only the named field(s) set to Keras' value; where optax
    documents the same formula (Adam) it matches optax's Convention too."""
    problem, lr = PROBLEMS["rosenbrock"]
    tf, jax = CONVENTIONS["tf"], CONVENTIONS["jax"]
    got = run_minimize(BACKEND, make_spec(problem, name, lr, hyper, "apply")).trajectory.final_x
    own = reference_run(problem, name, lr, hyper)[0][-1]
    assert rel(got, own) <= 1e-10
    assert rel(got, reference_run(problem, name, lr, hyper, tf)[0][-1]) > 1e-8
    swapped = dataclasses.replace(TORCH, **{f: getattr(tf, f) for f in fields})
    assert any(getattr(TORCH, f) != getattr(tf, f) for f in fields)
    assert rel(got, reference_run(problem, name, lr, hyper, swapped)[0][-1]) > 1e-8
    same_as_jax = all(  # where the bias correction is computed: the same in float64
        getattr(TORCH, f) == getattr(jax, f)
        for f in TORCH.__dataclass_fields__
        if name in f and f != "adam_bias_correction"
    )
    jax_x = reference_run(problem, name, lr, hyper, jax)[0][-1]
    assert (rel(got, jax_x) <= 1e-10) == same_as_jax


def test_native_optimizers_get_the_resolved_hyperparameters() -> None:
    """What runs is what resolve() said: names mapped, defaults from CONVENTIONS['torch']."""
    problem, lr = PROBLEMS["quadratic_form"]
    cases = [
        ("sgd", {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
        ("adam", {"beta1": 0.8, "beta2": 0.99}, {"betas": (0.8, 0.99), "eps": 1e-8}),
        ("adam", {"eps": 1e-6}, {"betas": (0.9, 0.999), "eps": 1e-6, "amsgrad": False}),
        ("adagrad", {"initial_accumulator": 0.25}, {"initial_accumulator_value": 0.25}),
        ("adagrad", {}, {"initial_accumulator_value": 0.0, "eps": 1e-10, "lr_decay": 0}),
        ("rmsprop", {"rho": 0.8, "momentum": 0.5}, {"alpha": 0.8, "momentum": 0.5}),
        ("rmsprop", {"eps": 1e-5}, {"alpha": 0.9, "momentum": 0.0, "eps": 1e-5}),
    ]
    assert (TORCH.adam_eps, TORCH.adagrad_eps, TORCH.rmsprop_eps) == (1e-8, 1e-10, 1e-8)
    assert TORCH.adagrad_initial_accumulator == 0.0
    for name, given, native in cases:
        for mode in ("apply", "minimize"):
            group = BACKEND.prepare(make_spec(problem, name, lr, given, mode))._opt.param_groups[0]
            assert group["lr"] == lr and group["weight_decay"] == 0
            assert group["foreach"] is False and not group.get("fused")
            assert group.get("capturable", False) is False
            for key, value in native.items():
                assert group[key] == value, (name, mode, key)
        # The compiled loop's optimizer, built without compiling: the same settings.
        spec = make_spec(problem, name, lr, given, "graph")
        loop = _OptimizerLoop(spec, _Run(spec, torch.device("cpu"), torch.float64), _OPTIONS)
        group = loop._opt.param_groups[0]
        assert group["foreach"] is False and group.get("capturable", False) is False
        for key, value in native.items():
            assert group[key] == value, (name, "graph", key)


def test_manual_mode_follows_torchs_formulas_not_the_others() -> None:
    """The hand-written rules are torch's forms: Keras' or optax's differ by > 1e-8."""
    problem, lr = PROBLEMS["rosenbrock"]
    for name, hyper in [("adam", {}), ("adagrad", {}), ("rmsprop", {})]:
        got = run_minimize(BACKEND, make_spec(problem, name, lr, hyper, "manual")).trajectory
        assert rel(got.final_x, reference_run(problem, name, lr, hyper)[0][-1]) <= 1e-10
        assert (
            rel(got.final_x, reference_run(problem, name, lr, hyper, CONVENTIONS["tf"])[0][-1])
            > 1e-8
        )


# --- float32: every problem in the eager modes --------------------------------------------


@pytest.mark.parametrize("mode", EAGER)
@pytest.mark.parametrize("problem_id", list(PROBLEMS))
@pytest.mark.parametrize("opt_id", ["adam", "rmsprop-momentum"])
def test_float32_runs_every_problem(problem_id: str, mode: str, opt_id: str) -> None:
    problem, lr = PROBLEMS[problem_id]
    name, hyper = OPTIMIZERS[opt_id]
    spec = make_spec(problem, name, lr, hyper, mode, dtype="float32", steps=50)
    traj = run_minimize(BACKEND, spec).trajectory
    want = reference_run(problem, name, lr, hyper, steps=50)[0][-1]
    assert traj.stopped_at == 50
    assert traj.final_x.dtype == traj.x.dtype == traj.loss.dtype == traj.grad.dtype == np.float32
    assert np.shape(traj.final_x) == np.shape(want) and traj.x.shape == (50,)
    assert rel(traj.final_x, want) <= 1e-4


# --- vector recording and divergence with optimizer state --------------------------------


@pytest.mark.parametrize("mode", EAGER)
def test_vector_rows_every_7_are_the_full_rows_thinned(mode: str) -> None:
    problem, lr = PROBLEMS["rosenbrock"]
    name, hyper = OPTIMIZERS["adam"]

    def run(every: int) -> Trajectory:
        spec = make_spec(problem, name, lr, hyper, mode, steps=50, every=every)
        return run_minimize(BACKEND, spec).trajectory

    thin, full = run(7), run(1)
    np.testing.assert_array_equal(thin.steps, [0, 7, 14, 21, 28, 35, 42, 49])
    assert thin.x.shape == thin.loss.shape == thin.grad.shape == (8,)
    np.testing.assert_array_equal(thin.x, full.x[::7])
    np.testing.assert_array_equal(thin.loss, full.loss[::7])
    np.testing.assert_array_equal(thin.grad, full.grad[::7])
    np.testing.assert_array_equal(thin.final_x, full.final_x)
    assert thin.x[0] == pytest.approx(np.sqrt(3.0), rel=1e-15)  # ||0 - (1, 1, 1)||
    assert thin.grad[0] == pytest.approx(np.linalg.norm(problem.grad(np.zeros(3))), rel=1e-15)


DIVERGING = (Rosenbrock(dim=4, x0=2.0), 0.01, {"momentum": 0.5})


def _float32_momentum_stop(steps: int) -> tuple[int, np.ndarray]:
    """SGD with momentum on Rosenbrock(dim=4, x0=2) in float64: (first step whose float32
    loss is not finite, x there) — the loss overflows float32 long before float64."""
    problem, lr, hyper = DIVERGING
    with np.errstate(over="ignore", invalid="ignore"):
        xs, _ = reference_run(problem, "sgd", lr, hyper, steps=steps)
    for k, x in enumerate(xs):
        with np.errstate(over="ignore"):
            if not np.isfinite(np.float32(problem.loss(x, problem.coefficients))):
                return k, x
    raise AssertionError("did not diverge")


def check_diverged_with_state(mode: str, update: str = "apply") -> None:
    stop, x_stop = _float32_momentum_stop(10)
    assert stop == 3
    problem, lr, hyper = DIVERGING
    spec = make_spec(problem, "sgd", lr, hyper, mode, update, dtype="float32", steps=50, every=2)
    traj = run_minimize(BACKEND, spec).trajectory
    assert traj.stopped_at == stop and not np.isfinite(traj.final_loss)
    np.testing.assert_array_equal(traj.steps, [0, 2])
    assert np.all(np.isfinite(traj.x)) and np.all(np.isfinite(traj.grad))
    assert traj.x[0] == 2.0  # ||(2, 2, 2, 2) - (1, 1, 1, 1)||
    assert traj.final_x.shape == (4,) and np.all(np.isfinite(traj.final_x))
    np.testing.assert_allclose(traj.final_x, x_stop, rtol=1e-5)


@pytest.mark.parametrize("mode", EAGER)
def test_divergence_with_momentum_stops_with_the_state_at_that_step(mode: str) -> None:
    check_diverged_with_state(mode)


# --- graph mode: spot checks (each pays a torch.compile) ------------------------------------

# (update, problem, optimizer, dtype); manual runs scan chunks of 32: 100 steps = 4 chunks,
# the last one masked, with the rule's state carried from chunk to chunk.
SPOT = [
    ("apply", "quadratic_form", "adam", "float64"),
    ("apply", "quadratic", "adagrad", "float64"),  # the scalar problem, lifted to shape (1,)
    ("minimize", "rosenbrock", "rmsprop-momentum", "float64"),
    ("manual", "quadratic_dim4", "rmsprop-momentum", "float64"),
    ("manual", "quadratic_dim1", "sgd-momentum", "float64"),  # the carry of one entry
    ("manual", "quadratic_form", "adam", "float64"),
    ("manual", "rosenbrock", "adagrad", "float64"),
    ("apply", "rosenbrock", "adam", "float32"),
    ("manual", "quadratic_form", "sgd-nesterov", "float32"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("update", "problem_id", "opt_id", "dtype"), SPOT, ids=["-".join(s) for s in SPOT]
)
def test_graph_agrees_with_the_reference(
    update: str, problem_id: str, opt_id: str, dtype: str
) -> None:
    problem, lr = PROBLEMS[problem_id]
    name, hyper = OPTIMIZERS[opt_id]
    options = {"scan_chunk": 32} if update == "manual" else {}
    spec = make_spec(problem, name, lr, hyper, "graph", update, dtype=dtype, options=options)
    program = BACKEND.prepare(spec)
    traj = run_compiled(program, spec)
    xs, losses = reference_run(problem, name, lr, hyper)
    if dtype == "float64":
        check_against_reference(traj, problem, xs, losses)
    else:
        assert traj.stopped_at == STEPS and traj.final_x.dtype == np.float32
        assert rel(traj.final_x, xs[-1]) <= 1e-4
    # From x0 and a fresh optimizer state again, in chunks of 7, 14, 28, ...: the same bits.
    program._reset()
    assert same_trajectory(run_compiled(program, spec, first=7, growth=2), traj)


@pytest.mark.slow
@pytest.mark.parametrize("update", ["apply", "manual"])
def test_graph_divergence_with_momentum_stops_with_the_state_at_that_step(update: str) -> None:
    check_diverged_with_state("graph", update)


@pytest.mark.slow
def test_graph_replay_to_a_non_finite_loss_is_a_run_that_ends_there() -> None:
    # SGD with momentum, lr past stable: the float32 loss overflows at step 81, inside a
    # call of 4 steps, so the replay from x0 ends with one single-step call (_rewind).
    problem = QuadraticForm(dim=6, cond=10.0, seed=3, x0=1.0)

    def run(steps: int) -> Any:
        spec = make_spec(problem, "sgd", 0.35, {"momentum": 0.5}, "graph", dtype="float32",
                         steps=steps, every=3)  # fmt: skip
        program = BACKEND.prepare(spec)
        # Of size n the loop holds x (its gradient and the optimizer's momentum are x's and
        # the optimizer's), and nothing else: no latch, no copy of the fresh state.
        held = {
            name
            for name, value in vars(program).items()
            for t in (value.values() if isinstance(value, dict) else [value])
            if isinstance(t, torch.Tensor) and t.numel() == problem.dim
        }
        assert held == {"_x"}
        return run_compiled(program, spec)

    stopped = run(400)  # unroll 4
    assert stopped.stopped_at == 81 and not np.isfinite(stopped.final_loss)
    ended = run(81)  # gcd(81, 4) = 1: every call one step, none past it
    assert same_trajectory(stopped, ended)  # every row, x and grad at step 81, bit for bit


# --- devices --------------------------------------------------------------------------------


def _tensors(program: Any) -> dict[str, torch.Tensor]:
    """Every tensor a program holds: constants, x, optimizer or rule state, buffers."""
    run = program._run
    found = {"x0": run.x0, "lr": run.lr, **{f"p.{k}": v for k, v in run.p.items()}}
    if run.x_star is not None:
        found["x_star"] = run.x_star
    if isinstance(program, _ScanLoop):
        x, state = program._start_state()
        found |= {"x": x, **{f"state{i}": s for i, s in enumerate(state)}}
        carried_x, carried_state = program._carry
        found |= {"carry.x": carried_x, **{f"carry{i}": s for i, s in enumerate(carried_state)}}
    else:
        found["x"] = program._x
    if isinstance(program, _OptimizerLoop):
        found |= {"i": program._i, "stop": program._stop, "grad": program._x.grad}
    if isinstance(program, _ScanLoop | _OptimizerLoop):
        found |= {"rows.x": program._rows.x, "rows.loss": program._rows.loss}
        found["rows.grad"] = program._rows.grad
    if hasattr(program, "_state") and not isinstance(program, _ScanLoop):
        found |= {f"state{i}": s for i, s in enumerate(program._state)}
    if hasattr(program, "_opt"):
        for key, value in program._opt.state[program._x].items():
            found[f"opt.{key}"] = value
    return found


# (mode, update, optimizer): every program class, each with optimizer or rule state.
PLACED = [
    ("manual", "apply", "adam"),
    ("apply", "apply", "rmsprop-momentum"),
    ("minimize", "apply", "adagrad"),
    ("graph", "apply", "adam"),
    ("graph", "minimize", "sgd-momentum"),
    ("graph", "manual", "rmsprop-momentum"),
]


def _check_placement(device: str, compile_graphs: bool) -> None:
    """Every tensor on the resolved device, in the run's dtype where it is a float.

    The one exception is torch's own: eager Adam/Adagrad/RMSprop keep their step counter
    on the host as a 0-d tensor (read with .item(), no device sync); compiled, it is on x's
    device. Without compile_graphs the graph programs are built but not compiled.
    """
    problem, lr = PROBLEMS["quadratic_form"]
    want = torch.device(BACKEND.resolved_device(device))
    for mode, update, opt_id in PLACED:
        name, hyper = OPTIMIZERS[opt_id]
        for dtype in ("float32", "float64"):
            spec = make_spec(problem, name, lr, hyper, mode, update, dtype=dtype, device=device)
            if mode == "graph" and not compile_graphs:
                loop_cls = _ScanLoop if update == "manual" else _OptimizerLoop
                program = loop_cls(spec, _Run(spec, want, _DTYPES[dtype]), _OPTIONS)
            else:
                program = BACKEND.prepare(spec)
                if mode != "graph":
                    program.step(True)  # torch.optim creates its state on the first step
            found = _tensors(program)
            assert len(found) >= 7, (mode, update)
            for key, tensor in found.items():
                where = (mode, update, dtype, key)
                if mode in ("apply", "minimize") and key == "opt.step":
                    assert tensor.device == torch.device("cpu") and tensor.dim() == 0, where
                    continue
                assert tensor.device == want, where
                if tensor.is_floating_point():
                    assert tensor.dtype == _DTYPES[dtype], where
                if mode == "graph":
                    assert tensor.dim() >= 1 or key in ("x0", "lr"), where  # see _ONE


def test_every_tensor_is_on_the_cpu_for_device_cpu() -> None:
    _check_placement("cpu", compile_graphs=False)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="PyTorch sees no GPU on this machine: device=gpu placement is checked where one is",
)
def test_every_tensor_is_on_the_gpu_for_device_gpu() -> None:
    _check_placement("gpu", compile_graphs=True)
    for mode, update, opt_id, problem_id in [
        ("apply", "apply", "adam", "quadratic_form"),
        ("manual", "apply", "rmsprop-momentum", "rosenbrock"),
        ("graph", "apply", "adagrad", "quadratic_dim4"),
        ("graph", "manual", "adam", "quadratic_form"),
    ]:
        problem, lr = PROBLEMS[problem_id]
        name, hyper = OPTIMIZERS[opt_id]
        spec = make_spec(problem, name, lr, hyper, mode, update, device="gpu")
        traj = run_minimize(BACKEND, spec).trajectory
        check_against_reference(traj, problem, *reference_run(problem, name, lr, hyper))


# --- what the backend cannot run --------------------------------------------------------------


def test_every_optimizer_setting_runs_in_every_mode() -> None:
    problem, lr = PROBLEMS["quadratic_form"]
    modes = [(m, "apply") for m in EAGER] + [("graph", u) for u in ("apply", "minimize", "manual")]
    for name, hyper in OPTIMIZERS.values():
        for mode, update in modes:
            for dtype in ("float32", "float64"):
                spec = make_spec(problem, name, lr, hyper, mode, update, dtype=dtype)
                assert BACKEND.unsupported(spec) is None, (name, hyper, mode, update, dtype)


def test_cpp_wrapper_auto_is_on_for_the_cpu_only() -> None:
    """On CUDA Inductor's C++ wrapper could not generate the scan (torch 2.11, an H100)."""
    from backends.torch import _inductor_options

    assert _inductor_options({"cpp_wrapper": "auto"}, torch.device("cpu")) == {"cpp_wrapper": True}
    assert _inductor_options({"cpp_wrapper": "auto"}, torch.device("cuda:0")) == {
        "cpp_wrapper": False
    }
    assert _inductor_options({"cpp_wrapper": True}, torch.device("cuda:0")) == {"cpp_wrapper": True}
    problem, lr = PROBLEMS["quadratic_form"]
    spec = make_spec(problem, "sgd", lr, {}, "graph", options={"cpp_wrapper": "yes"})
    assert BACKEND.unsupported(spec) == (
        "backend.cpp_wrapper='yes' is not allowed; choose one of: true, false, auto"
    )
    for key in ("unroll", "scan_chunk"):  # the whole-number wording every count shares
        spec = make_spec(problem, "sgd", lr, {}, "graph", options={key: 4.0})
        assert BACKEND.unsupported(spec) == (
            f"backend.{key}=4.0 is a float; give a whole number >= 1 "
            "(write 4, without a decimal point or an exponent)"
        )
    eager = make_spec(problem, "sgd", lr, {}, "apply", options={"cpp_wrapper": False})
    assert BACKEND.unsupported(eager) == (
        "backend.cpp_wrapper=false sets mode=graph's compiled loop; mode=apply runs eagerly: "
        "choose mode=graph, or leave it out"
    )
    assert BACKEND.unsupported(make_spec(problem, "sgd", lr, {}, "apply", options={"x": 1})) == (
        "backend.x=1 is not an option of this backend; allowed: scan_chunk, unroll, cpp_wrapper"
    )


def test_unsupported_reasons_are_one_line() -> None:
    problem, lr = PROBLEMS["quadratic_form"]
    bad_hyper = make_spec(problem, "adam", lr, {"weight_decay": 0.1}, "apply")
    reason = BACKEND.unsupported(bad_hyper)
    assert reason is not None and "weight_decay" in reason and "adam" in reason
    reason = BACKEND.unsupported(make_spec(problem, "lion", lr, {}, "manual"))
    assert reason is not None and "lion" in reason and "\n" not in reason
    reason = BACKEND.unsupported(make_spec(problem, "rmsprop", lr, {"rho": 1.0}, "graph"))
    assert reason is not None and "rho" in reason
    reason = BACKEND.unsupported(make_spec(problem, "sgd", lr, {}, "apply", options={"xla": 1}))
    assert reason is not None and "xla" in reason
    with pytest.raises(ConfigError, match="weight_decay"):
        BACKEND.prepare(bad_hyper)


def test_results_record_the_graph_options_as_the_run_used_them() -> None:
    """results.json's options (the comparison's backend label) hold what a run used: an
    option this mode or update never reads is left out, unroll as reduced to a power of
    two dividing steps, one that ran as its default would is left out."""
    problem = PROBLEMS["quadratic"][0]

    def used(mode: str, update: str = "apply", steps: int = 300, **options: Any) -> dict:
        spec = make_spec(problem, "sgd", 0.05, {}, mode, update, steps=steps, options=options)
        assert BACKEND.unsupported(spec) is None
        return BACKEND.options_used(spec)

    assert used("graph", "apply", scan_chunk=7) == {}  # the scan's option, no scan here
    assert used("graph", "minimize", scan_chunk=7) == {}
    assert used("graph", "manual", scan_chunk=7) == {"scan_chunk": 7}
    assert used("graph", "manual", unroll=2) == {}  # no optimizer loop to unroll
    assert used("graph", "apply", unroll=3) == {"unroll": 2}  # as it ran
    assert used("graph", "apply", unroll=8) == {}  # 300 steps: 4 a call, as the default
    assert used("graph", "apply", steps=301, unroll=2) == {}  # odd steps: 1 a call either way
    assert used("graph", "manual", steps=300, scan_chunk=500) == {}  # 300 a call either way
    assert used("graph", "apply", cpp_wrapper=False) == {"cpp_wrapper": False}  # on CPU
    assert used("graph", "manual", cpp_wrapper=True) == {}  # auto's choice on CPU
    assert used("graph", "apply", **_OPTIONS) == {}
    for mode in EAGER:
        assert used(mode, **_OPTIONS) == {}
