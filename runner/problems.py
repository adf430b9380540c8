"""Problems written once, in framework-neutral arithmetic, with their analytic answers.

`loss(x, p, ops)` uses Python operators plus the few reductions in `ops` (sum,
matvec) that a backend hands in from its own namespace, so the same expression runs
on TensorFlow, PyTorch, JAX and NumPy: every backend is checked against mathematics,
not against another backend. The scalar quadratic uses operators only, exactly the
notebook's `a*x**2 + b*x + c`. Problems are plugins, found like backends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from importlib.metadata import entry_points
from types import SimpleNamespace
from typing import Any, ClassVar, Protocol

import numpy as np

from runner.errors import ConfigError, installed_choices, setting, whole_number

PROBLEM_GROUP = "gradient_runner.problems"
NUMPY_OPS = SimpleNamespace(sum=np.sum, matvec=np.matmul)
Number = float | int
# QuadraticForm builds A = Q diag(geomspace(1, cond, n)) Q^T in float64, where its
# eigenvalue 1 is rounding noise beside cond once cond nears 1/eps = 4.5e15. Measured over
# dims 1-200 (seeds 0-19) and 500-2000 (seeds 0-2), x* = A^-1 b against the spectral
# Q diag(1/lambda) Q^T b: worst relative error 6e-5 at cond 1e12, 7e-3 at 1e14, 7e-2
# at 1e15; from 1e16 A is not positive definite for some seeds (Cholesky fails), from 1e17
# np.linalg.solve raises LinAlgError (Singular matrix). 1e12 keeps x* to ~4 digits and
# leaves a margin of 1e4 below the breakdown.
MAX_COND = 1e12


class Problem(Protocol):
    name: ClassVar[str]

    @property
    def dim(self) -> int | None:
        """None for a scalar problem; n for x in R^n."""
        ...

    @property
    def coefficients(self) -> Mapping[str, float | np.ndarray]:
        """The constants `loss` reads from `p`, in float64; backends convert them.

        A coefficient given as one number stays one number, also for x in R^n: the
        loss broadcasts it, so it costs no memory (nor bandwidth) of size n.
        """
        ...

    def x0_array(self) -> np.ndarray:
        """x0 in float64. It may be a read-only broadcast view (np.broadcast_to) of one
        number, which a conversion to the run's dtype or a framework copies."""
        ...

    def loss(self, x: Any, p: Mapping[str, Any], ops: Any = NUMPY_OPS) -> Any: ...

    def grad(self, x: np.ndarray) -> np.ndarray:
        """The analytic gradient, in NumPy (the reference's and backend=numpy's)."""
        ...

    def optimum(self) -> tuple[Any, float]:
        """(x*, loss(x*)), analytically."""
        ...


def _value(key: str, value: Any, dim: int) -> float | np.ndarray:
    """One number as a float, or a list of exactly dim numbers as a float64 array."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        return float(array)
    if array.shape != (dim,):
        raise ConfigError(f"problem.{key} has {array.size} entries; give one number or {dim}")
    return np.array(array)


def _check_dim(problem: Any, low: int, why: str = "") -> None:
    """Vector-only problems: problem.dim=null (the scalar quadratic's) or too small a
    dim would otherwise fail deep in NumPy, or (Rosenbrock, dim=1) give a loss that is
    identically 0."""
    if problem.dim is None or problem.dim < low:
        reason = f" ({why})" if why else ""
        raise ConfigError(
            f"problem.dim={'null' if problem.dim is None else problem.dim} is not allowed "
            f"for problem={problem.name}; "
            f"give a whole number >= {low}{reason}"
        )


def _check_scalar(problem: Any, key: str) -> None:
    """A setting that is one number for every dim (a list would fail in a comparison)."""
    value = getattr(problem, key)
    if np.ndim(value) != 0:
        raise ConfigError(f"problem.{key}={shown(value)} must be a number, not a list")


def _vector(key: str, value: Any, dim: int) -> np.ndarray:
    """A scalar broadcast to dim (a read-only view: no memory of size n), or dim numbers."""
    return np.broadcast_to(_value(key, value, dim), (dim,))


def compact(value: Any) -> Any:
    """`value` with a broadcast stored once: an array that repeats one number through
    zero strides (np.broadcast_to, as x0_array and Quadratic.optimum give) comes back
    as that number (0-d), so a backend's constant of it takes no memory of size n.
    Anything else comes back unchanged."""
    array = np.asarray(value)
    if array.ndim and array.size and not any(array.strides):
        return array.reshape(-1)[0]
    return value


@dataclass(frozen=True)
class Quadratic:
    """The notebook's y = a*x^2 + b*x + c; with dim=n, the sum over n coordinates.

    It has a minimum only when a > 0 (in every coordinate).
    """

    a: Number | Sequence[Number] = 1.0
    b: Number | Sequence[Number] = -2.0
    c: Number | Sequence[Number] = 1.0
    x0: Number | Sequence[Number] = 0.0
    dim: int | None = None
    name: ClassVar[str] = "quadratic"
    positive: ClassVar[tuple[str, ...]] = ("a",)  # see runner.problem_limits

    def __post_init__(self) -> None:
        if self.dim is None:
            for key in ("a", "b", "c", "x0"):
                if np.ndim(getattr(self, key)) != 0:
                    raise ConfigError(
                        f"problem.{key}={list(getattr(self, key))} must be a number "
                        "(set problem.dim=n for one value per coordinate)"
                    )
        values = self.coefficients | {"x0": _value("x0", self.x0, self.dim or 0)}
        if np.any(np.asarray(values["a"]) <= 0):
            raise ConfigError(
                f"problem.a={shown(self.a)}: a*x^2 + b*x + c has no minimum unless a > 0; "
                "give a positive problem.a"
            )

    @property
    def coefficients(self) -> dict[str, Any]:
        if self.dim is None:
            return {"a": float(self.a), "b": float(self.b), "c": float(self.c)}
        return {k: _value(k, getattr(self, k), self.dim) for k in ("a", "b", "c")}

    def x0_array(self) -> np.ndarray:
        if self.dim is None:
            return np.float64(self.x0)
        return _vector("x0", self.x0, self.dim)

    def loss(self, x: Any, p: Mapping[str, Any], ops: Any = NUMPY_OPS) -> Any:
        y = p["a"] * x**2 + p["b"] * x + p["c"]  # the notebook's expression
        return y if self.dim is None else ops.sum(y)

    def grad(self, x: np.ndarray) -> np.ndarray:
        p = self.coefficients
        return 2 * p["a"] * x + p["b"]

    def optimum(self) -> tuple[Any, float]:
        """x* = -b / 2a and loss* = sum(c - b^2 / 4a) over the coordinates.

        With scalar coefficients x* is a broadcast view and the sum runs over one, so
        neither takes memory of size n; the numbers are those of the n-vectors.
        """
        p = self.coefficients
        a, b, c = (np.asarray(p[k]) for k in ("a", "b", "c"))
        x_star, loss = -b / (2 * a), c - b**2 / (4 * a)
        if self.dim is None:
            return float(x_star), float(loss)
        shape = (self.dim,)
        return np.broadcast_to(x_star, shape), float(np.sum(np.broadcast_to(loss, shape)))

    def grad_coefficients(self, x: float) -> dict[str, float]:
        return {"a": x * x, "b": x, "c": 1.0}

    def second_derivative(self, x: float) -> float:
        return 2 * float(self.a)

    def sgd_closed_form(self, lr: float, k: Any) -> Any:
        """x_k of plain gradient descent: x* + (x0 - x*)(1 - 2a*lr)^k (exact arithmetic)."""
        x_star, _ = self.optimum()
        a = self.coefficients["a"]
        return x_star + (self.x0_array() - x_star) * (1 - 2 * a * lr) ** k


@dataclass(frozen=True)
class QuadraticForm:
    """1/2 x^T A x - b^T x, A symmetric positive definite with condition number `cond`.

    A = Q diag(geomspace(1, cond, n)) Q^T with Q from a seeded QR, b seeded normal:
    the same (dim, cond, seed) gives the same problem on every machine.
    """

    dim: int = 2
    cond: Number = 10.0
    seed: int = 0
    x0: Number | Sequence[Number] = 0.0
    name: ClassVar[str] = "quadratic_form"
    definite: ClassVar[tuple[str, ...]] = ("A",)  # see runner.problem_limits

    def __post_init__(self) -> None:
        _check_dim(self, 1)
        _check_scalar(self, "cond")
        if not 1 <= self.cond <= MAX_COND:
            raise ConfigError(
                f"problem.cond={shown(self.cond)} is not allowed; give a condition number "
                f"from 1 to {MAX_COND:.0e} (beyond it float64 loses A's smallest eigenvalues: "
                "x* = A^-1 b loses its digits, then A its definiteness)"
            )
        self.x0_array()

    @cached_property
    def coefficients(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        q, _ = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        a = (q * np.geomspace(1.0, float(self.cond), self.dim)) @ q.T
        return {"A": (a + a.T) / 2, "b": rng.standard_normal(self.dim)}

    def x0_array(self) -> np.ndarray:
        return _vector("x0", self.x0, self.dim)

    def loss(self, x: Any, p: Mapping[str, Any], ops: Any = NUMPY_OPS) -> Any:
        return 0.5 * ops.sum(x * ops.matvec(p["A"], x)) - ops.sum(p["b"] * x)

    def grad(self, x: np.ndarray) -> np.ndarray:
        p = self.coefficients
        return p["A"] @ x - p["b"]

    def optimum(self) -> tuple[np.ndarray, float]:
        return self._solution

    @cached_property
    def _solution(self) -> tuple[np.ndarray, float]:
        p = self.coefficients
        x_star = np.linalg.solve(p["A"], p["b"])
        return x_star, float(-0.5 * p["b"] @ x_star)


@dataclass(frozen=True)
class Rosenbrock:
    """sum_i b*(x[i+1] - x[i]^2)^2 + (1 - x[i])^2; minimum 0 at (1, ..., 1)."""

    dim: int = 2
    b: Number = 100.0
    x0: Number | Sequence[Number] = 0.0
    name: ClassVar[str] = "rosenbrock"
    positive: ClassVar[tuple[str, ...]] = ("b",)  # see runner.problem_limits

    def __post_init__(self) -> None:
        _check_dim(self, 2, "its sum runs over neighbouring coordinates")
        _check_scalar(self, "b")
        if not self.b > 0:
            raise ConfigError(f"problem.b={self.b} is not allowed; give a number > 0")
        self.x0_array()

    @property
    def coefficients(self) -> dict[str, float]:
        return {"b": float(self.b)}

    def x0_array(self) -> np.ndarray:
        return _vector("x0", self.x0, self.dim)

    def loss(self, x: Any, p: Mapping[str, Any], ops: Any = NUMPY_OPS) -> Any:
        head, tail = x[:-1], x[1:]
        return ops.sum(p["b"] * (tail - head**2) ** 2) + ops.sum((1 - head) ** 2)

    def grad(self, x: np.ndarray) -> np.ndarray:
        b = float(self.b)
        head, tail = x[:-1], x[1:]
        g = np.zeros_like(x)
        g[:-1] += -4 * b * head * (tail - head**2) - 2 * (1 - head)
        g[1:] += 2 * b * (tail - head**2)
        return g

    def optimum(self) -> tuple[np.ndarray, float]:
        return np.ones(self.dim), 0.0


def largest_text(dtype: str) -> str:
    """`largest 3.4e+38`: a dtype's limit, as the refusals of a setting beyond it say."""
    return f"largest {np.finfo(dtype).max:.2g}"


def shown(value: Any) -> str:
    """A setting as a refusal quotes it: a float, or a list of them."""
    return str(list(value)) if np.ndim(value) else repr(float(value))


def problem_record(problem: Problem) -> dict[str, Any]:
    """The problem's settings as JSON-ready data (what results.json and reports show)."""
    record: dict[str, Any] = {"name": problem.name}
    for f in fields(problem):  # type: ignore[arg-type]
        value = getattr(problem, f.name)
        record[f.name] = list(value) if isinstance(value, tuple) else value
    return record


def problem_classes() -> dict[str, type]:
    """Installed problems by name; entry points are read, nothing else is imported."""
    return {ep.name: ep for ep in entry_points(group=PROBLEM_GROUP)}  # type: ignore[misc]


def build_problem(cfg: Mapping[str, Any]) -> Problem:
    """Build a problem from its config group node (name plus its own keys)."""
    values = dict(cfg)
    name = values.pop("name", None)
    from runner.plugins import sole_entry_point  # plugins -> protocol -> problems

    entry_point = sole_entry_point(PROBLEM_GROUP, "problem", name)
    if entry_point is None:
        choices = installed_choices(problem_classes())
        raise ConfigError(f"problem={name!r} is unknown; choose one of: {choices}")
    cls = entry_point.load()
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(
            f"problem.{unknown[0]} is not a setting of problem={name}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    for key, value in values.items():
        values[key] = _setting(key, value)
    problem = cls(**values)
    _check_protocol(name, entry_point.value, problem)
    return problem


def _check_protocol(name: str, entry_point: str, problem: Problem) -> None:
    """A plugin problem that lacks part of the protocol is named here, before the run: it
    would fail inside the backend's loop and read as the backend's error. The instance is
    checked: a property may be set as it is built (__post_init__). Its `name` is what the
    records call it, so it must be the name the user chose it by."""
    from runner.errors import PluginError
    from runner.plugins import members, missing_members  # plugins -> protocol -> problems

    missing = missing_members(problem, Problem)
    if missing:
        raise PluginError(
            f"problem={name}: its plugin '{entry_point}' lacks {', '.join(missing)}, "
            f"which runner.problems.Problem requires (all: {', '.join(members(Problem))})"
        )
    if problem.name != name:  # results.json, the reports and MLflow name a problem by it
        raise PluginError(
            f"problem={name}: its plugin '{entry_point}' calls itself {problem.name!r}; "
            f"its name must be the one it is installed as, {name!r}"
        )


def _setting(key: str, value: Any) -> Any:
    """dim and seed are whole numbers; the rest finite numbers or lists of them."""
    if key in ("dim", "seed"):
        if value is None and key == "dim":
            return None
        low = 1 if key == "dim" else 0  # a seed is NumPy's: a non-negative integer
        return whole_number(f"problem.{key}", value, low)
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ConfigError(f"{setting(f'problem.{key}', value)} must be a number")
        _check_finite(key, value, item)
    return tuple(value) if isinstance(value, list) else value


def _check_finite(key: str, value: Any, item: float) -> None:
    """One number of a setting is finite in float64, where every problem computes first.
    An int beyond float64 (`problem.a=1` and 400 zeros) makes math.isfinite raise."""
    try:
        finite = math.isfinite(item)
    except OverflowError:
        raise ConfigError(
            f"problem.{key}={value!r} overflows float64 ({largest_text('float64')}); "
            "give a smaller number"
        ) from None
    if not finite:
        raise ConfigError(f"problem.{key}={value!r} is not finite; give a finite number")
