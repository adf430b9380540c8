"""The terminal summary: what ran, where it ended, how far from the optimum, how fast."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from runner.errors import as_typed
from runner.naming import mode_label


def fmt(value: Any, dtype: str = "float64", head: int = 4) -> str:
    """Shortest text that reads back as the same value in the run's dtype (a list: its
    first `head` entries), for the run's summary and the comparison table alike."""
    if value is None:
        return "(too long to list)"
    if isinstance(value, list):
        shown = ", ".join(fmt(v, dtype) for v in value[:head])
        return f"[{shown}{', ...' if len(value) > head else ''}] (n={len(value)})"
    number = (np.float32 if dtype == "float32" else np.float64)(value)
    # Positional reads best (0.99999857), but spells a diverged 1.8446744e+19 in 20 digits.
    if number and np.isfinite(number) and not 1e-5 <= abs(number) < 1e16:
        return np.format_float_scientific(number, unique=True, trim="-")
    return np.format_float_positional(number, unique=True, trim="-")


def step_time_text(step_us: float) -> str:
    """Three significant digits, without an exponent from 1000 us up (1760, not 1.76e+03)."""
    if not math.isfinite(step_us):
        return str(step_us)
    return f"{step_us:.0f}" if step_us >= 1000 else f"{step_us:.3g}"


def minimize_summary(result: Mapping[str, Any]) -> str:
    dtype = result["dtype"]
    problem, opt, timings = result["problem"], result["optimizer"], result["timings"]
    mode = mode_label(result["mode"], result.get("update"))
    versions = result["versions"]
    runtime = ("python", "gradient_runner") + (() if result["backend"] == "numpy" else ("numpy",))
    framework = ", ".join(f"{k} {v}" for k, v in versions.items() if k not in runtime)
    settings = ", ".join(
        f"{k}={_short(v)}" for k, v in problem.items() if k != "name" and v is not None
    )
    hyper = " ".join(
        _setting(k, v, result.get("optimizer_used")) for k, v in opt.items() if k != "name"
    )
    status = result["status"]
    lines = [
        f"backend   {result['backend']} ({framework}), device {result['device']}",
        f"mode      {mode}, {dtype}, {_steps(result)}",
        f"problem   {problem['name']} ({settings}); {opt['name']} {hyper}",
        f"result    x = {fmt(result['x'], dtype)}   loss = {fmt(result['loss'], dtype)}"
        + (f"   DIVERGED at step {result['diverged_at']}" if status == "diverged" else ""),
        f"optimum   x* = {fmt(result['optimum']['x'])}   loss* = {fmt(result['optimum']['loss'])}",
        f"error     |x - x*| = {result['error']['x']:.3g}   "
        f"|loss - loss*| = {result['error']['loss']:.3g}",
        *([_vector_line(result)] if "x_norm" in result else []),
        f"timing    compile {timings['compile_s']:.3f} s   run {timings['run_s']:.3f} s   "
        f"{step_time_text(timings['step_us'])} us/step   final state {timings['final_s']:.3f} s",
    ]
    return "\n".join(lines)


def _steps(result: Mapping[str, Any]) -> str:
    """The steps asked for, and how many ran where a signal stopped the run early (a
    diverged run says where on its result line)."""
    if result["status"] == "interrupted":
        return f"{result['steps_run']} of {plural(result['steps'], 'step')} (INTERRUPTED)"
    return plural(result["steps"], "step")


def plural(count: int, noun: str) -> str:
    """'1 step', '2 steps', '0 rows'."""
    return f"{count} {noun}{'s' * (count != 1)}"


def derivatives_summary(result: Mapping[str, Any]) -> str:
    dtype = result["dtype"]
    dcoef = result["dy_dcoef"]
    compiled = result["compiled"]
    worst = max(_leaves(result["error"]))
    return "\n".join(
        [
            f"backend   {result['backend']}, {dtype}, device {result['device']}",
            f"at        x = {fmt(result['at'], dtype)}",
            f"y         {fmt(result['y'], dtype)}",
            f"dy/dx     {fmt(result['dy_dx'], dtype)}",
            "dy/da,b,c "
            + ", ".join(f"{k}={fmt(dcoef[k], dtype)}" for k in ("a", "b", "c") if k in dcoef),
            f"d2y/dx2   {fmt(result['d2y_dx2'], dtype)}",
            f"compiled  dy/dx = {fmt(compiled['dy_dx'], dtype)}   y = {fmt(compiled['y'], dtype)}",
            f"error     largest |value - analytic| = {worst:.3g}",
        ]
    )


def _leaves(tree: Any) -> list[float]:
    if isinstance(tree, Mapping):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    return [float(tree)]


def _setting(key: str, asked: Any, used: Mapping[str, Any] | None) -> str:
    """`eps=1e-07 (tf default)` for a setting left to the framework, else `key=value`."""
    if asked is None and used is not None and used.get(key) is not None:
        return f"{key}={_short(used[key])} ({used['convention']} default)"
    return f"{key}={_short(asked)}"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"[{', '.join(_short(v) for v in value[:3])}{', ...' if len(value) > 3 else ''}]"
    if isinstance(value, float):
        return f"{value:g}"
    return as_typed(value, quote=False)  # nesterov=false, not False


def _vector_line(result: Mapping[str, Any]) -> str:
    return (
        f"vector    ||x|| = {result['x_norm']:.6g}   ||x - x*|| = {result['error']['dist']:.3g}"
        f"   ||grad|| = {result['grad_norm']:.3g}"
    )
