"""The framework-free half of the lab: problems, the optimizer vocabulary, the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from runner.errors import ConfigError
from runner.optimizers import CONVENTIONS, resolve, used_record, validate_hyper
from runner.problems import Quadratic, QuadraticForm, Rosenbrock, build_problem
from runner.reference import run

PROBLEMS = [
    Quadratic(a=1.5, b=-3.0, c=0.5, x0=2.0),
    Quadratic(a=(1.0, 2.0, 0.5), b=(-2.0, 1.0, 0.0), c=1.0, x0=(0.0, 1.0, -1.0), dim=3),
    QuadraticForm(dim=4, cond=10.0, seed=3, x0=0.5),
    Rosenbrock(dim=3, x0=0.0),
]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p.name}-{p.dim}")
def test_analytic_gradient_matches_finite_differences(problem) -> None:
    rng = np.random.default_rng(0)
    x = problem.x0_array() + rng.normal(scale=0.3, size=np.shape(problem.x0_array()))
    p = problem.coefficients
    h = 1e-6
    for i in range(np.size(x)):
        e = np.zeros(np.shape(x))
        e.flat[i] = h
        numeric = (problem.loss(x + e, p) - problem.loss(x - e, p)) / (2 * h)
        assert np.asarray(problem.grad(x)).flat[i] == pytest.approx(numeric, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p.name}-{p.dim}")
def test_optimum_is_a_minimum(problem) -> None:
    x_star, loss_star = problem.optimum()
    np.testing.assert_allclose(problem.grad(np.asarray(x_star)), 0, atol=1e-12)
    assert problem.loss(np.asarray(x_star), problem.coefficients) == pytest.approx(loss_star)
    nearby = np.asarray(x_star) + 0.01
    assert problem.loss(nearby, problem.coefficients) > loss_star


def test_quadratic_form_is_reproducible_with_the_asked_condition() -> None:
    a = QuadraticForm(dim=6, cond=250.0, seed=7).coefficients["A"]
    np.testing.assert_array_equal(a, a.T)
    assert np.linalg.cond(a) == pytest.approx(250.0, rel=1e-9)
    assert np.all(np.linalg.eigvalsh(a) > 0)
    np.testing.assert_array_equal(a, QuadraticForm(dim=6, cond=250.0, seed=7).coefficients["A"])
    assert not np.array_equal(a, QuadraticForm(dim=6, cond=250.0, seed=8).coefficients["A"])


def test_sgd_reference_is_the_closed_form() -> None:
    problem = Quadratic(a=0.8, b=1.6, c=0.0, x0=3.0)
    opt = resolve("sgd", 0.1, {}, CONVENTIONS["paper"])
    xs, _ = run(problem, opt, CONVENTIONS["paper"], 60)
    k = np.arange(61)
    np.testing.assert_allclose(xs, problem.sgd_closed_form(0.1, k), rtol=1e-13, atol=1e-15)


def test_numpy_default_convention_is_named_for_itself() -> None:
    """NumPy's default follows the papers (as torch.optim does): its record and summary
    say `(paper default)`, not that a NumPy run took torch's defaults."""
    used = used_record("adam", 1e-3, {"eps": None}, CONVENTIONS["paper"])
    assert used["convention"] == "paper" and used["eps"] == CONVENTIONS["torch"].adam_eps


def test_momentum_and_nesterov_follow_their_recurrences() -> None:
    """Heavy ball on a 1-D quadratic is a linear recurrence: check two steps by hand."""
    problem = Quadratic(a=0.5, b=0.0, c=0.0, x0=1.0)  # grad = x
    for nesterov in (False, True):
        opt = resolve("sgd", 0.1, {"momentum": 0.9, "nesterov": nesterov}, CONVENTIONS["paper"])
        xs, _ = run(problem, opt, CONVENTIONS["paper"], 2)
        g0 = 1.0
        buf1 = g0
        x1 = 1.0 - 0.1 * (g0 + 0.9 * buf1 if nesterov else buf1)
        buf2 = 0.9 * buf1 + x1
        x2 = x1 - 0.1 * (x1 + 0.9 * buf2 if nesterov else buf2)
        np.testing.assert_allclose(xs, [1.0, x1, x2], rtol=1e-15)


def test_adam_first_step_is_lr_times_sign_whatever_the_convention() -> None:
    """With bias correction, Adam's first step is lr * g/(|g| + eps'), nearly lr."""
    problem = Quadratic(a=1.0, b=0.0, c=0.0, x0=2.0)
    for name in ("tf", "torch", "jax"):
        opt = resolve("adam", 0.01, {}, CONVENTIONS[name])
        xs, _ = run(problem, opt, CONVENTIONS[name], 1)
        assert xs[1] == pytest.approx(2.0 - 0.01, abs=1e-8)


@pytest.mark.parametrize(
    ("optimizer", "hyper", "a", "b"),
    [
        ("adam", {}, "tf", "torch"),  # eps added before vs after the bias correction
        ("adagrad", {}, "tf", "torch"),  # accumulator starts at 0.1 vs 0; eps inside vs out
        ("rmsprop", {}, "tf", "torch"),  # eps inside vs outside the square root
    ],
)
def test_conventions_make_a_visible_difference(optimizer, hyper, a, b) -> None:
    problem = Quadratic(a=1.0, b=-2.0, c=1.0, x0=0.0)
    runs = {
        name: run(
            problem, resolve(optimizer, 0.01, hyper, CONVENTIONS[name]), CONVENTIONS[name], 50
        )
        for name in (a, b)
    }
    assert abs(runs[a][0][-1] - runs[b][0][-1]) > 1e-9


def test_explicit_settings_override_framework_defaults() -> None:
    opt = resolve("adagrad", 0.1, {"eps": 1e-3, "initial_accumulator": 0.5}, CONVENTIONS["torch"])
    assert opt["eps"] == 1e-3 and opt["initial_accumulator"] == 0.5
    assert resolve("adam", 0.1, {}, CONVENTIONS["tf"])["eps"] == 1e-7
    assert resolve("adam", 0.1, {}, CONVENTIONS["torch"])["eps"] == 1e-8


@pytest.mark.parametrize(
    ("name", "hyper", "message"),
    [
        ("adam", {"beta3": 0.5}, "optimizer.beta3 is not a setting of optimizer=adam"),
        (
            "sgd",
            {"momentum": 1.5},
            "optimizer.momentum=1.5 is not allowed; give a number in [0, 1)",
        ),
        ("sgd", {"nesterov": True}, "optimizer.nesterov=true needs optimizer.momentum > 0"),
        ("rmsprop", {"eps": 0}, "optimizer.eps=0 is not allowed; give a number > 0"),
        ("lbfgs", {}, "optimizer='lbfgs' is unknown; choose one of: sgd, adam, adagrad, rmsprop"),
    ],
)
def test_bad_optimizer_settings(name, hyper, message) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        validate_hyper(name, hyper)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "quadratic", "dim": 0}, "problem.dim=0 is not allowed; give a whole number >= 1"),
        ({"name": "quadratic_form", "cond": 0.5}, "problem.cond=0.5 is not allowed"),
        ({"name": "quadratic", "dim": 2, "a": [1, 2, 3]}, "problem.a has 3 entries"),
        ({"name": "quadratic", "a": [1, -1], "dim": 2}, "no minimum unless a > 0"),
        ({"name": "rosenbrock", "cond": 3}, "problem.cond is not a setting of problem=rosenbrock"),
        (
            {"name": "rosenbrock", "dim": None},
            "problem.dim=null is not allowed for problem=rosenbrock; give a whole number >= 2",
        ),
        ({"name": "rosenbrock", "dim": 1}, "problem.dim=1 is not allowed for problem=rosenbrock"),
        (
            {"name": "quadratic_form", "dim": None},
            "problem.dim=null is not allowed for problem=quadratic_form; give a whole number >= 1",
        ),
        ({"name": "bowl"}, "problem='bowl' is unknown; choose one of: quadratic, quadratic_form"),
    ],
)
def test_bad_problem_settings(cfg, message) -> None:
    with pytest.raises(ConfigError) as caught:
        build_problem(cfg)
    assert message in str(caught.value)


def test_unknown_names_say_when_nothing_is_installed(monkeypatch) -> None:
    """Run from a checkout that was never pip-installed, no entry point is registered."""
    import runner.plugins
    import runner.problems

    for module in (runner.problems, runner.plugins):
        monkeypatch.setattr(module, "entry_points", lambda group, **_: [])
    with pytest.raises(ConfigError, match=r"choose one of: none \(is the project installed"):
        build_problem({"name": "quadratic"})
    with pytest.raises(ConfigError, match=r"choose one of: none \(is the project installed"):
        runner.plugins.load_backend("jax")


def test_numpy_backend_matches_the_reference_and_the_notebook() -> None:
    from backends.numpy import NumpyBackend
    from runner.engine import run_minimize
    from runner.protocol import MinimizeSpec, OptimizerSpec, RecordPlan

    backend = NumpyBackend()
    notebook = run_minimize(
        backend,
        MinimizeSpec(Quadratic(), OptimizerSpec("sgd", 0.01, validate_hyper("sgd", {})),
                     "manual", 1000, "float32", RecordPlan(1000, 1)),
    )  # fmt: skip
    assert notebook.trajectory.final_x == np.float32(0.99999857)
    for problem in PROBLEMS[1:]:
        for name in ("sgd", "adam", "adagrad", "rmsprop"):
            hyper = validate_hyper(name, {"momentum": 0.5} if name == "sgd" else {})
            spec = MinimizeSpec(
                problem, OptimizerSpec(name, 1e-3, hyper), "manual", 100, "float64",
                RecordPlan(100, 10),
            )  # fmt: skip
            outcome = run_minimize(backend, spec)
            opt = resolve(name, 1e-3, hyper, CONVENTIONS["paper"])
            xs, losses = run(problem, opt, CONVENTIONS["paper"], 100)
            np.testing.assert_allclose(outcome.trajectory.final_x, xs[-1], rtol=1e-10)
            np.testing.assert_allclose(outcome.trajectory.loss, losses[:100:10], rtol=1e-10)
            x_star = np.asarray(problem.optimum()[0])
            dist = np.linalg.norm(xs[:100:10] - x_star, axis=1)
            np.testing.assert_allclose(outcome.trajectory.x, dist, rtol=1e-10)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
@pytest.mark.parametrize("name", ["sgd", "adam", "adagrad", "rmsprop"])
def test_a_float32_step_is_float32_arithmetic(name: str, convention: str) -> None:
    """backend=numpy runs the reference in the run's dtype. Under tf_legacy, Adam's
    epsilon-hat step took np.sqrt of a Python float, a float64 scalar, which NumPy 2 does
    not round to float32: the whole step was float64 and only x rounded back (1 ulp off
    after 200 steps). Every value a float32 step makes stays float32."""
    from runner.reference import rule

    opt = resolve(name, 0.01, {"momentum": 0.5} if name == "rmsprop" else {}, CONVENTIONS["tf"])
    update = rule(opt, CONVENTIONS[convention])
    x = np.array([0.25, -1.5], np.float32)
    state = update.init(x)
    for t in (1, 2):
        x, state = update.update(x, np.float32(2) * x - np.float32(2), state, t)
        assert x.dtype == np.float32 and all(v.dtype == np.float32 for v in state.values())
