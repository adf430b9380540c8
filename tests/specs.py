"""Spec builders shared by the backend tests: one way to say "this run, in float64"."""

from __future__ import annotations

from typing import Any

import numpy as np

from runner.problems import Quadratic
from runner.protocol import EAGER_MODES, GRAPH_UPDATES, MinimizeSpec, OptimizerSpec, RecordPlan

STEPS = 100
# (mode, update): each eager mode (update is read in graph mode only), then graph with
# each inner update; the ids name them as the README's tables do.
EAGER_UPDATES = [(m, "apply") for m in EAGER_MODES]
GRAPH_MODE_UPDATES = [("graph", u) for u in GRAPH_UPDATES]
MODE_UPDATES = EAGER_UPDATES + GRAPH_MODE_UPDATES


def mode_ids(cases: list[tuple[str, str]]) -> list[str]:
    return [m if m != "graph" else f"graph-{u}" for m, u in cases]


MODE_IDS = mode_ids(MODE_UPDATES)
# name -> (optimizer, hyper); each of our settings appears at least once.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "sgd-momentum": ("sgd", {"momentum": 0.9}),
    "sgd-nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
    "adam": ("adam", {}),
    "adagrad": ("adagrad", {}),
    "rmsprop": ("rmsprop", {"rho": 0.8}),
    # RMSprop with momentum hovers around the minimum in steps of ~lr, where rounding
    # differences grow ~10x per 10 steps (with rho=0.8, 1e-16 -> 1e-10 in 100 steps even
    # between two NumPy writings of the same rule); rho=0.9 stays near 1e-12.
    "rmsprop-momentum": ("rmsprop", {"momentum": 0.5}),
}


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
