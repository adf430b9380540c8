"""Running a compiled program through the engine under a chosen chunk schedule."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
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


def assert_rows_kept_when_a_step_raises(backend: Any, spec: MinimizeSpec, at: int) -> None:
    """An eager program of `backend` whose step `at` raises (a framework out of memory
    mid-chunk) fails the run with engine.StepsFailed holding the rows of steps 0..at-1,
    the whole run's own: on a GPU they wait on the device until the chunk ends."""
    import numpy as np
    import pytest

    def prepare(s: MinimizeSpec) -> Any:
        program = backend.prepare(s)
        real, taken = program.step, []

        def step(record: bool) -> Any:
            if len(taken) == at:
                raise MemoryError("out of device memory")
            taken.append(record)
            return real(record)

        program.step = step
        return program

    with pytest.raises(engine.StepsFailed) as failed:
        engine.run_minimize(SimpleNamespace(prepare=prepare), spec)  # type: ignore[arg-type]
    assert isinstance(failed.value.__cause__, MemoryError)
    whole = engine.run_minimize(backend, spec).trajectory
    rows = failed.value.rows
    np.testing.assert_array_equal(rows["steps"], np.arange(0, at, spec.record.every))
    for name in ("x", "loss", "grad"):
        np.testing.assert_array_equal(rows[name], getattr(whole, name)[: rows["steps"].size])
