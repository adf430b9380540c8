"""What the benchmark measures: its settings, the backend x mode variants, their specs.

Specs are built by the runner's own config validation (build_run_config on the plain
config dict `python -m runner` would compose), so the benchmark times exactly the
runs a user gets.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.config import build_run_config
from runner.protocol import MODES, MinimizeSpec

DEFAULT_BACKENDS = ("tf", "torch", "jax")
FRAMEWORK_MODULE = {"tf": "tensorflow", "torch": "torch", "jax": "jax"}
# The least a step must move: a, b and c are numbers (as the CLI's problem.a=1 gives
# them), so x read once and written once; counting them as n-vectors overstated every
# bandwidth 2.5x.
BYTES_MODEL = "read x + write x: 2 x n x 4 B (float32) per step; a, b, c are scalars"
ARRAYS_PER_STEP = 2
ITEMSIZE = 4


# Step counts and dimensions of a full run and of --quick's smoke run.
EAGER_STEPS, QUICK_EAGER_STEPS = (1_000, 10_000), (100,)
COMPILED_STEPS, QUICK_COMPILED_STEPS = (1_000, 100_000, 1_000_000), (1_000,)
DIMS, QUICK_DIMS = (1, 1_000, 100_000, 1_000_000, 10_000_000), (1, 1_000)
# The n of issue 7's bandwidth and peak-memory targets: at smaller n the fixed costs (a
# framework's baseline, call overhead, caches) decide both, so neither is judged there.
TARGET_N = 10_000_000
DEFAULT_BUDGET_S, QUICK_BUDGET_S = 120.0, 5.0
# The sections only a fresh process measures (runner.bench.process), as results.md names them.
PROCESS_SECTIONS = {
    "tracking": "tracking cost",
    "startup": "start-up",
    "memory": "peak memory",
    "cache": "compile cache",
    "sweep": "matrix sweep",
}


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures; --quick shrinks every count to a smoke test."""

    quick: bool
    backends: tuple[str, ...]
    out: Path
    repeats: int
    max_n: int
    log: bool
    tracking_uri: str | None
    sweep: bool
    budget_s: float  # most seconds one scalar cell may take (all repeats, both loops)

    @property
    def eager_steps(self) -> tuple[int, ...]:
        return QUICK_EAGER_STEPS if self.quick else EAGER_STEPS

    @property
    def compiled_steps(self) -> tuple[int, ...]:
        return QUICK_COMPILED_STEPS if self.quick else COMPILED_STEPS

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(n for n in (QUICK_DIMS if self.quick else DIMS) if n <= self.max_n)


@dataclass(frozen=True)
class Variant:
    """One backend x mode the runner offers (graph mode: update=apply).

    TF's two options are variants of their own: XLA (`jit_compile`) and Keras 2's
    legacy optimizers (`legacy_optimizers`), whose hand-written loops use the same.
    """

    backend: str
    mode: str
    jit_compile: bool = False
    legacy_optimizers: bool = False

    @property
    def label(self) -> str:
        xla, legacy = "+xla" * self.jit_compile, "+legacy" * self.legacy_optimizers
        return f"{self.backend} {self.mode}{xla}{legacy}"

    @property
    def compiled(self) -> bool:
        return self.mode == "graph"

    def options(self) -> dict[str, Any]:
        """The backend.<key>=true settings of this variant."""
        names = ("jit_compile", "legacy_optimizers")
        return {name: True for name in names if getattr(self, name)}


def variants(backends: Sequence[str], quick: bool) -> list[Variant]:
    """Every mode of every backend, TF graph with XLA, and TF's optimizer modes with its
    legacy optimizers (--quick: XLA's only); --quick skips torch.compile."""
    found = []
    for backend in backends:
        for mode in MODES:
            if quick and backend == "torch" and mode == "graph":
                continue  # ~12 s of torch.compile: full run only
            found.append(Variant(backend, mode))
        if backend == "tf":
            found.append(Variant("tf", "graph", jit_compile=True))
            if not quick:
                found += [Variant("tf", mode, legacy_optimizers=True) for mode in MODES[1:]]
                found.append(Variant("tf", "graph", jit_compile=True, legacy_optimizers=True))
    return found


def quick_leaves_out(backends: Sequence[str]) -> str:
    """What a --quick run of these backends does not measure, in words: its results.md
    says so in its header, so that a smoke run is never read as a full one."""
    kept = set(variants(backends, quick=True))
    missing = [v.label for v in variants(backends, quick=False) if v not in kept]
    counts = ", ".join(f"{n:,}" for n in (*EAGER_STEPS, *COMPILED_STEPS[1:]))
    parts = [
        f"step counts above {max(QUICK_COMPILED_STEPS):,} (eager cells run "
        f"{QUICK_EAGER_STEPS[0]:,} steps, compiled {QUICK_COMPILED_STEPS[0]:,}; a full run: "
        f"{counts})",
        f"n above {max(QUICK_DIMS):,}",
        *([f"the variants {', '.join(missing)}"] if missing else []),
        "the subprocess sections (" + ", ".join(PROCESS_SECTIONS.values()) + ")",
    ]
    return "; ".join(parts)


def spec_for(variant: Variant, steps: int, dim: int | None = None) -> MinimizeSpec:
    """The spec `python -m runner backend=B mode=M steps=S [problem.dim=n]` would build."""
    cfg = {
        "task": "minimize",
        "dtype": "float32",
        "device": "cpu",
        "progress": False,
        "steps": steps,
        "record_every": None,
        "backend": {"name": variant.backend, **variant.options()},
        "mode": {"name": variant.mode, "update": "apply"},
        "problem": {"name": "quadratic", "a": 1.0, "b": -2.0, "c": 1.0, "x0": 0.0, "dim": dim},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "nesterov": False},
    }
    spec = build_run_config(cfg).minimize
    assert spec is not None
    return spec


@dataclass
class Best:
    """Best-of-N of a repeated measurement, keeping every sample for the JSON."""

    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else math.nan


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def vector_failure(row: Mapping[str, Any]) -> str:
    """Why an n-dim row has no time: a mode that does not run vectors, or an error."""
    return row.get("unsupported") or (f"error {row['error']}" if "error" in row else "")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def load_text(load: Sequence[float]) -> str:
    """`1.20, 1.10, 1.00`, as uptime prints it: a list's repr read as code."""
    return ", ".join(f"{v:.2f}" for v in load)


def vector_steps(n: int, quick: bool = False) -> int:
    """About 2e8 coordinate-updates per run (1e5 steps at n <= 2000, 20 at n = 1e7).

    Enough for the loop to dwarf the fixed cost of a run; --quick does 1/100 of that.
    """
    if quick:
        return max(10, min(1_000, 2_000_000 // n))
    return max(10, min(100_000, 200_000_000 // n))


def model_bytes(n: int) -> int:
    return ARRAYS_PER_STEP * n * ITEMSIZE
