"""NumPy backend: plain arithmetic as a baseline, built on the core's reference rules.

No autodiff and no optimizer objects: the gradient is the problem's analytic one
(evaluated in float64 and rounded to the run's dtype) and the update is the NumPy
reference rule, so `backend=numpy` answers "what does the mathematics give?" in the
same tables as the frameworks. `backend.convention` picks whose formula details
(epsilon placement and defaults) the adaptive rules follow: paper (= torch), tf, jax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from runner.errors import ConfigError, UnsupportedError, not_allowed
from runner.optimizers import CONVENTIONS, Convention, resolve, rule_convention
from runner.protocol import Derivatives, DerivativesSpec, MinimizeSpec, option_misfit
from runner.reference import rule


def _convention(spec: MinimizeSpec) -> Convention:
    """The formulas backend.convention names (checked by unsupported()), or the papers'
    where it gives this run's rule nothing of its own (any convention with SGD): that run
    is numpy's plain row in the comparison, and its record says so. The dtypes of Adam's
    bias correction and of 1 - beta, 1 - rho count below float64 only, where the ways part."""
    chosen = CONVENTIONS[spec.options.get("convention", "paper")]
    return rule_convention(spec.optimizer, chosen, CONVENTIONS["paper"], spec.dtype != "float64")


class _Stepper:
    """x, the rule's state and the step count; each step reads the analytic gradient."""

    def __init__(self, spec: MinimizeSpec) -> None:
        problem = spec.problem
        self.dtype = np.dtype(spec.dtype).type
        self.problem = problem
        self.p = {k: np.asarray(v, dtype=self.dtype) for k, v in problem.coefficients.items()}
        self.x = np.asarray(problem.x0_array(), dtype=self.dtype)
        convention = _convention(spec)
        opt = resolve(spec.optimizer.name, spec.optimizer.lr, spec.optimizer.hyper, convention)
        self.rule = rule(opt, convention)
        self.state = self.rule.init(self.x)
        self.t = 0
        self.vector = problem.dim is not None
        self.x_star = np.asarray(problem.optimum()[0], dtype=self.dtype)

    def _grad(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.problem.grad(np.asarray(x, np.float64)), dtype=self.dtype)

    def _loss(self, x: np.ndarray) -> Any:
        return self.dtype(self.problem.loss(x, self.p))

    def step(self, record: bool) -> tuple[Any, Any, Any]:
        x = self.x
        grad = self._grad(x)
        loss = self._loss(x)
        self.t += 1
        self.x, self.state = self.rule.update(x, grad, self.state, self.t)
        self.x = np.asarray(self.x, dtype=self.dtype)
        if not record:
            return loss, None, None
        if self.vector:
            return loss, np.linalg.norm(x - self.x_star), np.linalg.norm(grad)
        return loss, x, grad

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        return np.asarray(values)

    def final(self) -> tuple[Any, Any, Any]:
        return self._loss(self.x), self.x, self._grad(self.x)


class NumpyBackend:
    name: ClassVar[str] = "numpy"
    framework: ClassVar[str] = "NumPy"

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    def resolved_device(self, requested: str) -> str:
        if requested == "gpu":
            raise ConfigError("device=gpu: NumPy runs on the CPU only; use device=cpu or auto")
        return "cpu"

    def convention(self, spec: MinimizeSpec) -> Convention:
        return _convention(spec)

    def options_used(self, spec: MinimizeSpec) -> dict[str, Any]:
        """backend.convention where it changed this run's rule (see _convention)."""
        convention = _convention(spec)
        return {} if convention.name == "paper" else {"convention": convention.name}

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        if spec.mode != "manual":
            return "NumPy has no optimizer objects or compiler; only mode=manual is defined"
        convention = spec.options.get("convention", "paper")
        if convention not in CONVENTIONS:
            return not_allowed("backend.convention", convention, CONVENTIONS)
        return option_misfit(spec, {"convention": "paper"}, ())

    def prepare(self, spec: MinimizeSpec) -> _Stepper:
        return _Stepper(spec)

    def derivatives(self, spec: DerivativesSpec) -> Derivatives:
        raise UnsupportedError(
            "backend=numpy has no automatic differentiation; "
            "task=derivatives needs a backend that has it (tf, torch and jax do)"
        )
