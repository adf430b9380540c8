"""Problems written once, in framework-neutral arithmetic, with their analytic answers.

`loss(x, p)` uses only Python operators, so the same expression runs on TensorFlow,
PyTorch and JAX values (and NumPy, for the reference): every backend is checked
against mathematics, not against another backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from runner.errors import ConfigError


class Problem(Protocol):
    name: ClassVar[str]
    coefficients: Mapping[str, float]
    x0: float

    def loss(self, x: Any, p: Mapping[str, Any]) -> Any: ...

    def optimum(self) -> tuple[float, float]:
        """(x*, loss(x*)), analytically."""
        ...


@dataclass(frozen=True)
class Quadratic:
    """The notebook's y = a*x^2 + b*x + c; it has a minimum only when a > 0."""

    a: float = 1.0
    b: float = -2.0
    c: float = 1.0
    x0: float = 0.0
    name: ClassVar[str] = "quadratic"

    def __post_init__(self) -> None:
        for key in ("a", "b", "c", "x0"):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise ConfigError(f"problem.{key}={value} is not finite; give a finite number")
        if self.a <= 0:
            raise ConfigError(
                f"problem.a={self.a}: a*x^2 + b*x + c has no minimum unless a > 0; "
                "give a positive problem.a"
            )

    @property
    def coefficients(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c}

    def loss(self, x: Any, p: Mapping[str, Any]) -> Any:
        return p["a"] * x**2 + p["b"] * x + p["c"]

    def optimum(self) -> tuple[float, float]:
        x_star = -self.b / (2 * self.a)
        return x_star, self.c - self.b**2 / (4 * self.a)

    def grad(self, x: float) -> float:
        return 2 * self.a * x + self.b

    def grad_coefficients(self, x: float) -> dict[str, float]:
        return {"a": x * x, "b": x, "c": 1.0}

    def second_derivative(self, x: float) -> float:
        return 2 * self.a

    def sgd_closed_form(self, lr: float, k: Any) -> Any:
        """x_k of plain gradient descent: x* + (x0 - x*)(1 - 2a*lr)^k (exact arithmetic)."""
        x_star, _ = self.optimum()
        return x_star + (self.x0 - x_star) * (1 - 2 * self.a * lr) ** k


PROBLEMS: dict[str, type] = {"quadratic": Quadratic}


def build_problem(cfg: Mapping[str, Any]) -> Problem:
    """Build a problem from its config group node (name plus its own keys)."""
    values = dict(cfg)
    name = values.pop("name", None)
    if name not in PROBLEMS:
        raise ConfigError(f"problem={name!r} is unknown; choose one of {', '.join(PROBLEMS)}")
    cls = PROBLEMS[name]
    allowed = {f for f in cls.__dataclass_fields__ if f != "name"}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(
            f"problem.{unknown[0]} is not a setting of problem={name}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"problem.{key}={value!r} must be a number (problem={name} takes scalars)"
            )
    return cls(**{k: float(v) for k, v in values.items()})
