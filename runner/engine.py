"""Drives a backend's program: times it, records the trajectory, catches divergence.

Eager programs are stepped from here, so every framework gets the same recording
and the same divergence check for free; the engine asks for one transfer of a
chunk's losses and rows every CHECK_EVERY steps, never one per step (a program on
the CPU, where a value costs no device sync, may hand over host numbers at once).
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from runner.problems import NUMPY_OPS
from runner.protocol import (
    EAGER_CHUNK,
    Backend,
    CompiledProgram,
    EagerProgram,
    MinimizeSpec,
    RecordingEagerProgram,
    Span,
    Trajectory,
)

CHECK_EVERY = EAGER_CHUNK

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Timings:
    """compile_s: prepare(); run_s: the steps alone, which step_us divides by the steps
    the loop executed (steps_timed: past a divergence to its chunk's end, where an eager
    program records on the device, so not always results.json's steps_run); final_s: the
    final state read back to the host, paid once a run and kept out of the per-step
    figure (at n = 1e7: 0.01-0.14 s on this CPU, ~0.1 s on an H200, where it had been
    most of what a 200-step run reported a step)."""

    compile_s: float
    run_s: float
    steps_timed: int
    final_s: float = 0.0

    @property
    def step_us(self) -> float:
        return self.run_s / max(self.steps_timed, 1) * 1e6


class StepsFailed(Exception):
    """A program's step (or compiled chunk) raised mid-run, __cause__: the rows recorded
    before it (steps, x, loss, grad; Span's), for the run's trajectory.csv. They were
    lost with the exception, where Ctrl-C and a divergence keep theirs."""

    def __init__(self, rows: dict[str, np.ndarray]) -> None:
        super().__init__(f"{rows['steps'].size} rows recorded before the error")
        self.rows = rows


@dataclass(frozen=True)
class MinimizeOutcome:
    trajectory: Trajectory
    timings: Timings
    interrupted: bool = False


def run_minimize(
    backend: Backend,
    spec: MinimizeSpec,
    on_phase: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> MinimizeOutcome:
    """Prepare (timed as compile_s), run (run_s), read the final state (final_s).

    NumPy's overflow warnings are off throughout: a diverging run is an outcome the
    runner reports in one line (the step, the lr), and a backend that computes in NumPy
    would otherwise print a warning per operation that overflowed before it.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return _run_minimize(backend, spec, on_phase, progress)


def _run_minimize(
    backend: Backend,
    spec: MinimizeSpec,
    on_phase: Callable[[str], None] | None,
    progress: Progress | None,
) -> MinimizeOutcome:
    announce = on_phase or (lambda _phase: None)
    announce("compile")
    start = time.perf_counter()
    try:
        program = backend.prepare(spec)
        compile_s = time.perf_counter() - start
        announce("run")
        if progress is not None:
            # the bar is made here, untimed (its first build costs ~0.5 ms), and a stop
            # that the framework's code swallowed while compiling is raised again
            # (runner.interrupts.raise_stop: torch.compile's cleanup drops Ctrl-C)
            progress(0)
    except KeyboardInterrupt:  # stopped while compiling: the run is on record at step 0
        timings = Timings(time.perf_counter() - start, 0.0, 0)
        return MinimizeOutcome(_initial_state(spec), timings, interrupted=True)
    start = time.perf_counter()
    with _objects_so_far_frozen():
        if spec.mode == "graph":
            loop = _run_compiled(program, spec, progress)  # type: ignore[arg-type]
        else:
            loop = _run_eager(program, spec, progress)  # type: ignore[arg-type]
    run_s = time.perf_counter() - start
    if loop.failure is not None:  # the program's state is unknown: its rows are what is sure
        raise StepsFailed(_joined_rows(loop.spans)) from loop.failure
    trajectory = _final_trajectory(program, loop)
    final_s = time.perf_counter() - start - run_s
    announce("done")
    interrupted = loop.interrupted
    if loop.executed > loop.stopped_at and not interrupted:
        try:
            trajectory = _state_at_divergence(backend, spec, trajectory)
        except KeyboardInterrupt:  # the replay can take as long as the run: keep the rows
            interrupted = True  # (the state is the loop's own, past the diverged step)
    timings = Timings(compile_s, run_s, loop.executed, final_s)
    return MinimizeOutcome(trajectory, timings, interrupted)


@contextmanager
def _objects_so_far_frozen() -> Iterator[None]:
    """The loop runs with every object that exists before it out of the collector's view.

    An eager loop keeps a chunk's framework values alive until it drains them, so
    Python's collector promotes them and now and then runs a full collection, which
    scans every object the framework made (~170,000 after importing torch). Timed with
    gc.callbacks, torch eager, 10,000 steps: one or two full collections a run, 55-150
    ms in all (5-15 us a step); frozen (gc.freeze), none, and the young collections
    cost the same (~4 ms a run). What the loop makes is collected as usual.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass(frozen=True)
class _Loop:
    """What a run's loop leaves: its rows, the step it stopped at (a diverged run's first
    non-finite loss), the steps it executed (an eager run goes on to its chunk's end),
    whether a signal ended it, and the exception that did."""

    spans: list[Span]
    stopped_at: int
    executed: int
    interrupted: bool
    failure: Exception | None = None  # what a program's step or chunk raised


def _state_at_divergence(backend: Backend, spec: MinimizeSpec, found: Trajectory) -> Trajectory:
    """Replay a diverged eager run up to the step it diverged at, for its exact final state.

    The eager loop checks finiteness once per chunk, so it has gone past the bad step
    by the time it knows; the arithmetic is deterministic, so a replay without
    recording (paid only by runs that diverge, outside the timed loop) recovers x there.
    """
    program = backend.prepare(spec)
    recording = isinstance(program, RecordingEagerProgram)
    for done in range(1, found.stopped_at + 1):
        program.step(False)  # type: ignore[union-attr]
        if recording and done % CHECK_EVERY == 0:
            program.drain()  # type: ignore[union-attr]
    loss, x, grad = program.final()  # type: ignore[union-attr]
    return replace(
        found,
        final_x=program.to_numpy([x])[0],  # type: ignore[union-attr]
        final_loss=float(program.to_numpy([loss])[0]),  # type: ignore[union-attr]
        final_grad=program.to_numpy([grad])[0],  # type: ignore[union-attr]
    )


# Compiled loops run in chunks (see CompiledProgram): the first is FIRST_CHUNK steps
# (rounded up to the program's step_multiple), each next one sized from the last one's
# time towards CHUNK_S seconds and at most CHUNK_GROWTH times longer, so that Ctrl-C
# waits ~CHUNK_S at most, and a run of a million fast steps takes 3 calls.
FIRST_CHUNK = 100
CHUNK_S = 0.25
CHUNK_GROWTH = 100


def _run_compiled(
    program: CompiledProgram, spec: MinimizeSpec, progress: Progress | None = None
) -> _Loop:
    """Advance the program chunk by chunk.

    Chunk boundaries are multiples of the program's step_multiple. Ctrl-C (or SIGTERM)
    takes effect between chunks (see `_signals_held`), so the run ends with
    the rows of the chunks that completed and the program's state where the last of
    them stopped (x0 if none did), as an eager run does. Nothing of the state crosses
    to the host until then.
    """
    align = max(1, int(getattr(program, "step_multiple", 1)))
    spans: list[Span] = []
    done = 0
    length = -(-FIRST_CHUNK // align) * align
    try:
        with _signals_held() as caught:
            while done < spec.steps and not caught:
                stop = min(done + length, spec.steps)
                start = time.perf_counter()
                spans.append(program.advance(stop))
                elapsed = time.perf_counter() - start
                done = spans[-1].stopped_at
                if done < stop:  # a non-finite loss: the run ends at its step
                    break
                if progress is not None:
                    progress(done)
                length = _next_chunk(length, elapsed, align)
    except KeyboardInterrupt:
        return _Loop(spans, done, done, interrupted=True)
    except Exception as exc:  # the chunks before it are kept
        return _Loop(spans, done, done, interrupted=False, failure=exc)
    return _Loop(spans, done, done, interrupted=False)


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Notes SIGINT and SIGTERM while the chunks (or eager steps) run; the first is
    raised, by its own handler, once they stop.

    Python runs a signal's handler between bytecodes, so Ctrl-C during a compiled call
    would raise right after the call returns, dropping its results: a program that gave
    the call its state's buffers (JAX's donation) would have none left, and one that
    makes several calls per chunk would be past the rows it handed back. Noted instead,
    the signal ends the loop after the chunk, as if it had come between chunks. Handlers
    can only be set in the main thread, the only one Python raises signals in.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def note(signum: int, _frame: Any) -> None:
        caught.append(signum)

    handlers = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


def _next_chunk(length: int, elapsed: float, align: int) -> int:
    """Steps for the next chunk: towards CHUNK_S seconds, at most CHUNK_GROWTH times more."""
    wanted = length * min(CHUNK_GROWTH, CHUNK_S / max(elapsed, 1e-9))
    return max(align, int(wanted) // align * align)


def _joined_rows(parts: Sequence[Span]) -> dict[str, np.ndarray]:
    """steps, x, loss, grad of consecutive chunks end to end; chunks without rows add none."""
    with_rows = [part for part in parts if part.steps.size]
    if not with_rows:
        return {"steps": np.zeros(0, np.int64), **{k: np.zeros(0) for k in ("x", "loss", "grad")}}
    names = ("steps", "x", "loss", "grad")
    return {name: np.concatenate([getattr(part, name) for part in with_rows]) for name in names}


def _initial_state(spec: MinimizeSpec) -> Trajectory:
    """Step 0 of a run stopped while it compiled: x0, its loss and analytic gradient in NumPy
    (there is no program yet to ask)."""
    problem, dtype = spec.problem, np.dtype(spec.dtype)
    x0 = np.array(problem.x0_array(), dtype)  # a copy: x0_array may be a broadcast view
    p = {k: np.asarray(v, dtype) for k, v in problem.coefficients.items()}
    with np.errstate(all="ignore"):
        loss = dtype.type(problem.loss(x0, p, NUMPY_OPS))
        grad = np.asarray(problem.grad(x0), dtype)
    empty = np.zeros(0, dtype)
    return Trajectory(
        steps=np.zeros(0, np.int64),
        x=empty,
        loss=empty,
        grad=empty,
        final_x=x0,
        final_loss=float(loss),
        final_grad=grad,
        stopped_at=0,
    )


def _run_eager(
    program: EagerProgram | RecordingEagerProgram, spec: MinimizeSpec, progress: Progress | None
) -> _Loop:
    """Step the program.

    Every CHECK_EVERY steps the chunk's losses and rows cross to the host at once and
    the losses are checked, so the loop holds no framework value beyond one chunk. A
    diverged run stops at the end of the chunk where the first non-finite loss is; its
    trajectory ends at that loss's step.
    """
    source = program if isinstance(program, RecordingEagerProgram) else _HostRecorder(program)
    every = spec.record.every
    chunks: list[Span] = []
    drained = 0  # steps whose losses and rows are on the host

    def drain(check: bool) -> int | None:
        """Take the chunk to the host; the step of its first non-finite loss, if checked."""
        nonlocal drained
        losses, xs, grads = source.drain()
        start, drained = drained, drained + len(losses)
        steps = np.arange(-(-start // every) * every, drained, every, dtype=np.int64)
        bad = np.flatnonzero(~np.isfinite(losses)) if check else ()
        stop = start + int(bad[0]) if len(bad) else None
        if stop is not None:
            steps = steps[: int(np.searchsorted(steps, stop))]
        at = steps - start
        chunks.append(Span(steps, xs[at], losses[at], grads[at], drained if stop is None else stop))
        return stop

    step, total = source.step, spec.steps
    diverged: tuple[int, int] | None = None  # (step of the first non-finite loss, steps run)
    interrupted = False
    failure: Exception | None = None
    try:
        # A signal during a step takes effect once it returns: no step is cut in two
        # (its update made, its row not taken), and a step may give its buffers to a call.
        # The steps a signal leaves of a chunk are drained and checked like a whole one.
        with _signals_held() as caught:
            for begin in range(0, total, CHECK_EVERY):
                for i in range(begin, min(begin + CHECK_EVERY, total)):
                    if caught:
                        break
                    step(i % every == 0)
                stop = drain(check=True)
                if stop is not None:
                    diverged = (stop, drained)
                    break
                if caught:
                    break
                if progress is not None:
                    progress(drained)
    except KeyboardInterrupt:
        # A signal in the chunk that diverged: the rows end at the divergence, the state
        # is where the loop stopped (run_minimize replays to the exact state only for
        # runs that were not interrupted).
        interrupted = True
        if diverged is None:
            drain(check=False)
    except Exception as exc:  # a step raised: the steps before it are drained and kept
        failure = exc
        if diverged is None:
            with contextlib.suppress(Exception):  # the framework may be past handing them
                drain(check=True)
    if diverged is not None:
        return _Loop(chunks, diverged[0], diverged[1], interrupted, failure)
    return _Loop(chunks, drained, drained, interrupted, failure)


class _HostRecorder:
    """Gives a program whose step() returns values the drain() of a recording one.

    The values (framework values, or host numbers from a CPU program) wait in lists
    until the chunk ends, then go through one to_numpy() each and are spread over the
    chunk's steps.
    """

    def __init__(self, program: EagerProgram) -> None:
        self._program = program
        self._losses: list = []
        self._rows: list[tuple[int, Any, Any]] = []  # (position in the chunk, x, grad)

    def step(self, record: bool) -> None:
        loss, x, grad = self._program.step(record)
        if record:
            self._rows.append((len(self._losses), x, grad))
        self._losses.append(loss)

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        losses = self._program.to_numpy(self._losses) if self._losses else np.zeros(0)
        rows = [row for row in self._rows if row[0] < len(losses)]  # Ctrl-C may split a step
        self._losses, self._rows = [], []
        at = [position for position, _, _ in rows]
        return (
            losses,
            self._spread(at, [x for _, x, _ in rows], len(losses)),
            self._spread(at, [grad for _, _, grad in rows], len(losses)),
        )

    def _spread(self, at: list[int], values: list, steps: int) -> np.ndarray:
        """One entry per step, the recorded values at their steps (zeros elsewhere)."""
        if not values:
            return np.zeros(steps)
        host = self._program.to_numpy(values)
        spread = np.zeros((steps, *host.shape[1:]), host.dtype)
        spread[at] = host
        return spread


def _final_trajectory(
    program: EagerProgram | RecordingEagerProgram | CompiledProgram, loop: _Loop
) -> Trajectory:
    """The loop's rows end to end and the program's state where it stopped, on the host."""
    final_loss, final_x, final_grad = program.final()
    return Trajectory(
        **_joined_rows(loop.spans),
        final_x=program.to_numpy([final_x])[0],
        final_loss=float(program.to_numpy([final_loss])[0]),
        final_grad=program.to_numpy([final_grad])[0],
        stopped_at=loop.stopped_at,
    )
