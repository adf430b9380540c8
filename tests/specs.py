"""Spec builders shared by the backend tests: one way to say "this run, in float64"."""

from __future__ import annotations

from typing import Any

import numpy as np

from runner.protocol import MinimizeSpec, OptimizerSpec, RecordPlan

STEPS = 100


def make_spec(
    problem: Any,
    name: str,
    lr: float,
    hyper: dict[str, Any],
    mode: str,
    update: str = "apply",
    *,
    dtype: str = "float64",
    steps: int = STEPS,
    every: int = 1,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
) -> MinimizeSpec:
    return MinimizeSpec(
        problem=problem,
        optimizer=OptimizerSpec(name, lr, hyper),
        mode=mode,
        steps=steps,
        dtype=dtype,
        record=RecordPlan(steps, every),
        update=update,
        device=device,
        options=options or {},
    )


def rel(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
