"""What a run's dtype can hold of a problem and its optimizer, checked before the run.

Settings are read in float64 (Python's floats), but a backend computes with them
rounded to the run's dtype: in float32 `problem.a=1e40` is inf and `problem.a=1e-320`
is 0. Each such setting is refused in one line naming it, before anything runs.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np

from runner.errors import ConfigError, setting
from runner.optimizers import UNIT_INTERVAL
from runner.problems import Problem, compact, largest_text, shown
from runner.protocol import OptimizerSpec


def check_in_dtype(problem: Problem, dtype: str, minimize: bool = True) -> None:
    """Refuse a problem the run's dtype cannot hold, before the run, naming the setting.

    Settings are checked in float64 (Python's floats), but a backend computes with them
    rounded to `dtype`: in float32 `problem.a=1e40` is inf and `problem.a=1e-320` is 0
    (the quadratic then has no minimum), which used to run and end in a NaN blamed on
    the lr, or in x* = inf. Every coefficient and x0 must be finite in `dtype`, a
    coefficient the problem needs positive (its class's `positive`) nonzero, and for a
    minimization the optimum, where the problem gives a numeric one, finite too.
    """
    for key, value in {**problem.coefficients, "x0": problem.x0_array()}.items():
        positive = key in getattr(problem, "positive", ())
        _check_value(_subject(problem, key), f"problem.{key}", value, dtype, positive)
    if minimize:
        for key in getattr(problem, "definite", ()):
            _check_definite(problem, key, dtype)
        _check_optimum(problem, dtype)


def check_optimizer_in_dtype(optimizer: OptimizerSpec, dtype: str) -> None:
    """The optimizer's numbers as the run's dtype holds them. `optimizer.lr=1e-50` is 0 in
    float32 (x never moved, silently), `1e39` inf (a divergence blamed on the lr); an eps
    of 0 there divides 0 by 0 at the optimum (a NaN blamed on the lr), and an eps or
    initial_accumulator that overflows makes every step 0. A decay (beta, rho, momentum)
    in [0, 1) may be 0, but not 1: 0.99999999 is 1 in float32, where Adam's bias
    correction 1 - beta2**t is 0 and x never moved."""
    for key, value in {"lr": optimizer.lr, **optimizer.hyper}.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # nesterov; None: the framework's default
        subject = setting(f"optimizer.{key}", value)
        _check_value(subject, f"optimizer.{key}", value, dtype, positive=key in ("lr", "eps"))
        if key in UNIT_INTERVAL and _rounded(value, dtype) == 1:
            below_one = np.nextafter(np.asarray(1, dtype=dtype), 0)
            raise ConfigError(
                f"{subject} is 1 in {dtype} (its largest number below 1 is {below_one:.8g}); "
                f"give a smaller optimizer.{key}{wider_dtype(dtype)}"
            )


def _check_value(subject: str, key: str, value: Any, dtype: str, positive: bool) -> None:
    """One setting: finite in dtype, and nonzero where it must be positive."""
    extremes = _extremes(value)
    if extremes is None:
        return
    if not all(np.isfinite(_rounded(v, dtype)) for v in extremes):
        raise ConfigError(
            f"{subject} overflows {dtype} ({largest_text(dtype)}); "
            f"give a smaller number{wider_dtype(dtype)}"
        )
    if positive and _rounded(min(extremes), dtype) == 0:
        raise ConfigError(
            f"{subject} is 0 in {dtype} (its smallest positive number is "
            f"{np.finfo(dtype).smallest_subnormal:.2g}); "
            f"give a larger {key}{wider_dtype(dtype)}"
        )


def _check_optimum(problem: Problem, dtype: str) -> None:
    """The optimum the run is measured against must be a number in the run's dtype:
    x* = -b/2a of a float32 quadratic with a=1e-40 is 1e40, beyond float32's reach."""
    with np.errstate(all="ignore"):  # an infinite optimum is refused, not warned about
        x_star, loss_star = problem.optimum()
    x_range, loss_range = _extremes(x_star), _extremes(loss_star)
    if x_range is None or loss_range is None:
        return  # the problem states no numeric optimum
    if all(np.isfinite(_rounded(v, dtype)) or np.isnan(v) for v in (*x_range, *loss_range)):
        return  # NaN: the problem states no optimum value
    x_text = f"{max(x_range, key=abs):.6g}" + ("" if np.ndim(x_star) == 0 else " in a coordinate")
    settings = [f"problem.{k}" for k in problem.coefficients if k in _fields(problem)]
    raise ConfigError(
        f"problem={problem.name} has its minimum at x* = {x_text}, "
        f"loss* = {loss_range[0]:.6g}, which {dtype} cannot hold ({largest_text(dtype)}); "
        f"change {_either(settings) or 'its settings'}{wider_dtype(dtype)}"
    )


def _check_definite(problem: Problem, key: str, dtype: str) -> None:
    """A matrix the problem needs positive definite (its class's `definite`) must stay so
    rounded to `dtype`: float32 moves an entry by up to 6e-8 of it, so a quadratic_form
    with cond 1e9 can have a negative eigenvalue there, a float32 problem without a
    minimum, whose run drifts away from the x* it is measured against. Cholesky in float64
    of the rounded matrix: ~5% of what building A costs at dim 2000."""
    exact = np.asarray(problem.coefficients[key], dtype=np.float64)
    rounded = np.asarray(exact, dtype=dtype).astype(np.float64)
    if np.array_equal(rounded, exact):
        return
    try:
        np.linalg.cholesky(rounded)
    except np.linalg.LinAlgError:
        settings = [  # what builds the matrix: the start point does not
            setting(f"problem.{f.name}", getattr(problem, f.name))
            for f in fields(problem)  # type: ignore[arg-type]
            if f.name != "x0"
        ]
        raise ConfigError(
            f"{_subject(problem, key)} is not positive definite once rounded to {dtype}, "
            f"so the {dtype} problem has no minimum; "
            f"change {_either(settings) or 'its settings'}{wider_dtype(dtype)}"
        ) from None


def _either(names: list[str]) -> str:
    """`a, b or c`."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def wider_dtype(dtype: str) -> str:
    """The other way out of a float32 limit (`, or dtype=float64`), for a setting beyond
    it and for a loss that is not finite at the start alike."""
    return ", or dtype=float64" if np.finfo(dtype).max < np.finfo(np.float64).max else ""


def _extremes(value: Any) -> tuple[float, float] | None:
    """The smallest and largest entry, in float64 (a broadcast is read once, no copy of
    size n); None for an empty or non-numeric value (a plugin's optimum may be None)."""
    try:
        array = np.asarray(compact(value), dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if not array.size:
        return None
    return float(array.min()), float(array.max())


def _rounded(value: float, dtype: str) -> float:
    """`value` as the run's dtype holds it (inf where it overflows), without a warning."""
    with np.errstate(over="ignore"):
        return float(np.asarray(value, dtype=dtype))


def _fields(problem: Any) -> set[str]:
    return {f.name for f in fields(problem)} if is_dataclass(problem) else set()


def _subject(problem: Any, key: str) -> str:
    """A value as the user set it (`problem.a=1e+40`), or, for one the problem derives
    (quadratic_form's A), as the problem's."""
    if key in _fields(problem):
        return f"problem.{key}={shown(getattr(problem, key))}"
    return f"problem={problem.name}'s {key}"
