"""Running a compiled program through the engine under a chosen chunk schedule."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from runner import engine
from runner.protocol import CompiledProgram, MinimizeSpec, Trajectory


@contextmanager
def chunk_schedule(first: int, growth: float) -> Iterator[None]:
    """The engine's first chunk and growth cap set for a while (rounded up to the alignment)."""
    saved = engine.FIRST_CHUNK, engine.CHUNK_GROWTH
    engine.FIRST_CHUNK, engine.CHUNK_GROWTH = first, growth
    try:
        yield
    finally:
        engine.FIRST_CHUNK, engine.CHUNK_GROWTH = saved


def compiled_loop(
    program: CompiledProgram, spec: MinimizeSpec, progress: Any = None
) -> tuple[Trajectory, bool]:
    """The engine's compiled loop and the final state after it: (trajectory, interrupted)."""
    loop = engine._run_compiled(program, spec, progress)
    return engine._final_trajectory(program, loop), loop.interrupted


def eager_loop(program: Any, spec: MinimizeSpec) -> tuple[Trajectory, int, bool]:
    """The engine's eager loop and the final state: (trajectory, steps executed, interrupted)."""
    loop = engine._run_eager(program, spec, None)
    return engine._final_trajectory(program, loop), loop.executed, loop.interrupted


def run_compiled(
    program: CompiledProgram, spec: MinimizeSpec, first: int | None = None, growth: float = 2
) -> Trajectory:
    """Advance a prepared program to the end; `first` given: chunks of first, x growth, ..."""
    if first is None:
        trajectory, interrupted = compiled_loop(program, spec)
    else:
        with chunk_schedule(first, growth):
            trajectory, interrupted = compiled_loop(program, spec)
    assert not interrupted
    return trajectory


def same_trajectory(a: Trajectory, b: Trajectory) -> bool:
    """Bit for bit: every row, the final state and the stopping step."""
    import numpy as np

    arrays = ("steps", "x", "loss", "grad", "final_x", "final_grad")
    return (
        all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True) for k in arrays)
        and np.array_equal(a.final_loss, b.final_loss, equal_nan=True)
        and a.stopped_at == b.stopped_at
    )
