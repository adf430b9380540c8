"""Spec builders shared by the backend tests: one way to say "this run, in float64"."""

from __future__ import annotations

from typing import Any

import numpy as np

from runner.problems import Quadratic
from runner.protocol import GRAPH_UPDATES, MODES, MinimizeSpec, OptimizerSpec, RecordPlan

STEPS = 100
# (mode, update): each eager mode (update is read in graph mode only), then graph with
# each inner update; the ids name them as the README's tables do.
MODE_UPDATES = [(m, "apply") for m in MODES if m != "graph"] + [("graph", u) for u in GRAPH_UPDATES]
MODE_IDS = [m if m != "graph" else f"graph-{u}" for m, u in MODE_UPDATES]


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


def notebook_spec(
    mode: str,
    update: str = "apply",
    *,
    problem: Any = None,
    lr: float = 0.01,
    steps: int = 1000,
    every: int = 1,
    dtype: str = "float32",
    hyper: dict | None = None,
    name: str = "sgd",
    options: dict | None = None,
) -> MinimizeSpec:
    """The notebook's run (quadratic, SGD lr 0.01, 1000 float32 steps) unless told otherwise."""
    return MinimizeSpec(
        problem=problem or Quadratic(),
        optimizer=OptimizerSpec(name, lr, hyper or {}),
        mode=mode,
        steps=steps,
        dtype=dtype,
        record=RecordPlan(steps, every),
        update=update,
        options=options or {},
    )
