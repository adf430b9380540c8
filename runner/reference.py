"""The NumPy reference: every update rule written out in float64, independent of any framework.

Written from the papers' formulas, with the documented framework differences
(runner.optimizers.Convention) as explicit switches, so that "PyTorch's Adagrad
differs from Keras'" can be checked to be exactly the documented difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from runner.optimizers import Convention, Resolved

State = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    """init(x) -> state; update(x, g, state, t) -> (x_next, state), t counting from 1."""

    init: Callable[[np.ndarray], State]
    update: Callable[[np.ndarray, np.ndarray, State, int], tuple[np.ndarray, State]]


def rule(opt: Resolved, convention: Convention) -> Rule:
    return _RULES[opt.name](opt, convention)


def _sgd(opt: Resolved, _: Convention) -> Rule:
    lr, momentum, nesterov = opt.lr, opt["momentum"], opt["nesterov"]

    def update(x: np.ndarray, g: np.ndarray, s: State, t: int) -> tuple[np.ndarray, State]:
        if momentum == 0:
            return x - lr * g, s
        buf = momentum * s["buf"] + g
        direction = g + momentum * buf if nesterov else buf
        return x - lr * direction, {"buf": buf}

    return Rule(lambda x: {"buf": np.zeros_like(x)}, update)


def _adam(opt: Resolved, c: Convention) -> Rule:
    lr, b1, b2, eps = opt.lr, opt["beta1"], opt["beta2"], opt["eps"]

    def update(x: np.ndarray, g: np.ndarray, s: State, t: int) -> tuple[np.ndarray, State]:
        m = b1 * s["m"] + _complement(b1, x, c) * g
        v = b2 * s["v"] + _complement(b2, x, c) * g * g
        c1, c2 = _bias_correction(b1, t, x, c), _bias_correction(b2, t, x, c)
        if c.adam_eps_form == "corrected":
            step = lr * (m / c1) / (np.sqrt(v / c2) + eps)
        else:  # Keras' epsilon-hat: the bias correction folded into the step size
            step = lr * _sqrt(c2) / c1 * m / (np.sqrt(v) + eps)
        return x - step, {"m": m, "v": v}

    return Rule(lambda x: {"m": np.zeros_like(x), "v": np.zeros_like(x)}, update)


def _bias_correction(beta: float, t: int, x: np.ndarray, c: Convention) -> Any:
    """1 - beta**t as the convention computes it: in float64, or in x's dtype."""
    if c.adam_bias_correction == "float64":
        return 1 - beta**t
    dtype = np.asarray(x).dtype.type
    return dtype(1) - dtype(beta) ** dtype(t)


def _complement(decay: float, x: np.ndarray, c: Convention) -> Any:
    """1 - decay as the convention computes it: a Python float (rounded once where it
    meets x), or in x's dtype from the decay rounded to it."""
    if c.decay_complement == "float64":
        return 1 - decay
    dtype = np.asarray(x).dtype.type
    return dtype(1) - dtype(decay)


def _sqrt(value: Any) -> Any:
    """A square root that keeps a Python float a Python float: np.sqrt makes it a float64
    scalar, which NumPy 2 does not round to x's dtype, so a float32 step would be taken
    in float64 and only x rounded back."""
    return math.sqrt(value) if isinstance(value, float) else np.sqrt(value)


def _adagrad(opt: Resolved, c: Convention) -> Rule:
    lr, eps, initial = opt.lr, opt["eps"], opt["initial_accumulator"]

    def update(x: np.ndarray, g: np.ndarray, s: State, t: int) -> tuple[np.ndarray, State]:
        acc = s["acc"] + g * g
        return x - lr * g / _root(acc, eps, c.adagrad_eps_form), {"acc": acc}

    return Rule(lambda x: {"acc": np.full_like(x, initial)}, update)


def _rmsprop(opt: Resolved, c: Convention) -> Rule:
    lr, rho, momentum, eps = opt.lr, opt["rho"], opt["momentum"], opt["eps"]

    def update(x: np.ndarray, g: np.ndarray, s: State, t: int) -> tuple[np.ndarray, State]:
        ms = rho * s["ms"] + _complement(rho, x, c) * g * g
        direction = g / _root(ms, eps, c.rmsprop_form(momentum))
        buf = momentum * s["buf"] + direction if momentum else direction
        return x - lr * buf, {"ms": ms, "buf": buf}

    return Rule(lambda x: {"ms": np.zeros_like(x), "buf": np.zeros_like(x)}, update)


def _root(accumulated: np.ndarray, eps: float, form: str) -> np.ndarray:
    return np.sqrt(accumulated + eps) if form == "inside" else np.sqrt(accumulated) + eps


_RULES = {"sgd": _sgd, "adam": _adam, "adagrad": _adagrad, "rmsprop": _rmsprop}


def run(
    problem: Any, opt: Resolved, convention: Convention, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """x_k for k = 0..steps (float64) and the loss at each, by the reference rule."""
    update = rule(opt, convention)
    x = np.asarray(problem.x0_array(), dtype=np.float64)
    state = update.init(x)
    xs, losses = [x], [float(problem.loss(x, problem.coefficients))]
    for t in range(1, steps + 1):
        x, state = update.update(x, problem.grad(x), state, t)
        xs.append(x)
        losses.append(float(problem.loss(x, problem.coefficients)))
    return np.asarray(xs), np.asarray(losses)
