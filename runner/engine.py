"""Drives a backend's program: times it, records the trajectory, catches divergence.

Eager programs are stepped from here, so every framework gets the same recording
and the same divergence check for free; the only host sync is one transfer of a
chunk's losses every CHECK_EVERY steps, never one per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from runner.protocol import (
    Backend,
    CompiledProgram,
    EagerProgram,
    MinimizeSpec,
    Trajectory,
)

CHECK_EVERY = 1000

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Timings:
    compile_s: float
    run_s: float
    steps_run: int

    @property
    def step_us(self) -> float:
        return self.run_s / max(self.steps_run, 1) * 1e6


@dataclass(frozen=True)
class MinimizeOutcome:
    trajectory: Trajectory
    timings: Timings
    interrupted: bool = False

    @property
    def diverged(self) -> bool:
        return not np.isfinite(self.trajectory.final_loss)


def run_minimize(
    backend: Backend,
    spec: MinimizeSpec,
    on_phase: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> MinimizeOutcome:
    """Prepare (timed as compile_s), then run (timed as run_s) one minimization."""
    announce = on_phase or (lambda _phase: None)
    announce("compile")
    start = time.perf_counter()
    program = backend.prepare(spec)
    compile_s = time.perf_counter() - start
    announce("run")
    start = time.perf_counter()
    interrupted = False
    if spec.mode == "graph":
        trajectory = _run_compiled(program)  # type: ignore[arg-type]
        executed = trajectory.stopped_at
    else:
        trajectory, executed, interrupted = _run_eager(program, spec, progress)  # type: ignore[arg-type]
    run_s = time.perf_counter() - start
    announce("done")
    if executed > trajectory.stopped_at and not interrupted:
        trajectory = _state_at_divergence(backend, spec, trajectory)
    timings = Timings(compile_s, run_s, executed)
    return MinimizeOutcome(trajectory, timings, interrupted)


def _state_at_divergence(backend: Backend, spec: MinimizeSpec, found: Trajectory) -> Trajectory:
    """Replay a diverged eager run up to the step it diverged at, for its exact final state.

    The eager loop checks finiteness once per chunk, so it has gone past the bad step
    by the time it knows; the arithmetic is deterministic, so a replay without
    recording (paid only by runs that diverge, outside the timed loop) recovers x there.
    """
    program = backend.prepare(spec)
    for _ in range(found.stopped_at):
        program.step(False)  # type: ignore[union-attr]
    loss, x, grad = program.final()  # type: ignore[union-attr]
    return replace(
        found,
        final_x=program.to_numpy([x])[0],  # type: ignore[union-attr]
        final_loss=float(program.to_numpy([loss])[0]),  # type: ignore[union-attr]
        final_grad=program.to_numpy([grad])[0],  # type: ignore[union-attr]
    )


def _run_compiled(program: CompiledProgram) -> Trajectory:
    return program.run()


def _run_eager(
    program: EagerProgram, spec: MinimizeSpec, progress: Progress | None
) -> tuple[Trajectory, int, bool]:
    """Step the program: (trajectory, steps executed, interrupted by Ctrl-C).

    A diverged run stops at the end of the chunk where the first non-finite loss is;
    its trajectory ends at that loss's step.
    """
    every = spec.record.every
    rec_steps: list[int] = []
    rec_x: list = []
    rec_loss: list = []
    rec_grad: list = []
    chunk: list = []
    chunk_start = done = 0

    def rows(upto: int) -> tuple[list, list, list, list]:
        keep = int(np.searchsorted(rec_steps, upto, side="left"))
        return rec_steps[:keep], rec_x[:keep], rec_loss[:keep], rec_grad[:keep]

    try:
        for i in range(spec.steps):
            loss, x, grad = program.step(i % every == 0)
            chunk.append(loss)
            if i % every == 0:
                rec_steps.append(i)
                rec_x.append(x)
                rec_loss.append(loss)
                rec_grad.append(grad)
            done = i + 1
            if len(chunk) == CHECK_EVERY or done == spec.steps:
                bad = np.flatnonzero(~np.isfinite(program.to_numpy(chunk)))
                if bad.size:
                    stop = chunk_start + int(bad[0])
                    return _eager_trajectory(program, *rows(stop), stop), done, False
                chunk_start, chunk = done, []
                if progress is not None:
                    progress(done)
    except KeyboardInterrupt:
        return _eager_trajectory(program, *rows(done), done), done, True
    return _eager_trajectory(program, *rows(done), done), done, False


def _eager_trajectory(
    program: EagerProgram,
    steps: list[int],
    xs: list,
    losses: list,
    grads: list,
    stopped_at: int,
) -> Trajectory:
    def stack(values: list) -> np.ndarray:
        return program.to_numpy(values) if values else np.zeros(0)

    final_loss, final_x, final_grad = program.final()
    return Trajectory(
        steps=np.asarray(steps, dtype=np.int64),
        x=stack(xs),
        loss=stack(losses),
        grad=stack(grads),
        final_x=program.to_numpy([final_x])[0],
        final_loss=float(program.to_numpy([final_loss])[0]),
        final_grad=program.to_numpy([final_grad])[0],
        stopped_at=stopped_at,
    )
