"""Compiled loops (mode=graph) run in chunks: chunking changes no bit, and a signal stops them.

The engine advances a compiled program chunk by chunk (runner.engine._run_compiled), so
Ctrl-C and SIGTERM take effect between chunks and the partial run is saved as in the
eager modes. Rows of docs/reliability.md.
"""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from runner import engine
from runner.problems import Quadratic, QuadraticForm, Rosenbrock
from runner.protocol import MinimizeSpec, Span
from tests.chunks import chunk_schedule, compiled_loop, run_compiled, same_trajectory
from tests.conftest import LiveRun, single_result
from tests.specs import make_spec, notebook_spec

# --- the engine's chunking, with a NumPy program -------------------------------------------


@dataclass
class _NumpySgd:
    """A CompiledProgram in NumPy: plain SGD on the quadratic, and a log of its chunks."""

    spec: MinimizeSpec
    step_multiple: int = 1
    interrupt_at: int | None = None  # the advance() call (1-based) that Ctrl-C lands in
    signal_at: int | None = None  # the advance() call during which SIGINT arrives

    def __post_init__(self) -> None:
        self.dtype = np.dtype(self.spec.dtype)
        self.x = np.asarray(self.spec.problem.x0_array(), self.dtype)
        self.p = {k: np.asarray(v, self.dtype) for k, v in self.spec.problem.coefficients.items()}
        self.done = 0
        self.stops: list[int] = []
        self.finals = 0  # final() calls

    def advance(self, stop: int) -> Span:
        self.stops.append(stop)
        if len(self.stops) == self.interrupt_at:
            raise KeyboardInterrupt
        if len(self.stops) == self.signal_at:  # a signal mid-call; the call goes on
            signal.raise_signal(signal.SIGINT)
        every = self.spec.record.every
        steps, xs, losses, grads = [], [], [], []
        for i in range(self.done, stop):
            loss, grad = self._loss_and_grad()
            if i % every == 0:
                steps.append(i), xs.append(self.x), losses.append(loss), grads.append(grad)
            self.x = self.x - self.dtype.type(self.spec.optimizer.lr) * grad
        self.done = stop
        rows = (np.asarray(v) for v in (xs, losses, grads))
        return Span(np.asarray(steps, np.int64), *rows, stopped_at=stop)

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        return np.array(values)

    def final(self) -> tuple[Any, Any, Any]:
        self.finals += 1
        loss, grad = self._loss_and_grad()
        return loss, self.x, grad

    def _loss_and_grad(self) -> tuple[Any, np.ndarray]:
        problem = self.spec.problem
        return problem.loss(self.x, self.p), problem.grad(self.x).astype(self.dtype)


def _spec(steps: int = 1000, every: int = 7) -> MinimizeSpec:
    return notebook_spec("graph", problem=Quadratic(x0=3.0), steps=steps, every=every)


def test_chunks_are_aligned_and_cover_the_run() -> None:
    spec = _spec(1000, 7)
    program = _NumpySgd(spec, step_multiple=6)
    ticks: list[int] = []
    with chunk_schedule(10, 2):
        traj, interrupted = compiled_loop(program, spec, ticks.append)
    assert not interrupted and ticks == program.stops and program.stops[-1] == 1000
    assert program.stops[:4] == [12, 36, 84, 180]  # 12 (10 rounded up to 6), then x2
    assert all(stop % 6 == 0 for stop in program.stops[:-1])
    np.testing.assert_array_equal(traj.steps, np.arange(0, 1000, 7))
    whole = _NumpySgd(spec)
    with chunk_schedule(10**9, 2):
        assert same_trajectory(compiled_loop(whole, spec)[0], traj)
    assert whole.stops == [1000]


def test_chunks_grow_towards_the_time_target() -> None:
    assert engine._next_chunk(100, 1e-6, 1) == 100 * engine.CHUNK_GROWTH  # capped growth
    assert engine._next_chunk(1000, engine.CHUNK_S * 4, 1) == 250  # too slow: shrinks
    assert engine._next_chunk(1000, 10.0, 300) == 300  # never below one step_multiple


def test_ctrl_c_keeps_the_chunks_that_completed() -> None:
    spec = _spec(1000, 7)
    program = _NumpySgd(spec, interrupt_at=3)
    with chunk_schedule(50, 2):
        traj, interrupted = compiled_loop(program, spec)
    assert interrupted and program.stops == [50, 150, 350]
    assert traj.stopped_at == 150
    np.testing.assert_array_equal(traj.steps, np.arange(0, 150, 7))
    full = _NumpySgd(_spec(150, 7))
    assert same_trajectory(compiled_loop(full, full.spec)[0], traj)


def test_ctrl_c_during_a_chunk_takes_effect_when_it_returns() -> None:
    """The chunk's results are kept (a program may have given its buffers to the call)."""
    spec = _spec(1000, 7)
    program = _NumpySgd(spec, signal_at=3)
    with chunk_schedule(50, 2):
        traj, interrupted = compiled_loop(program, spec)
    assert interrupted and program.stops == [50, 150, 350] and traj.stopped_at == 350
    assert program.finals == 1
    full = _NumpySgd(_spec(350, 7))
    assert same_trajectory(compiled_loop(full, full.spec)[0], traj)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_in_another_thread_leaves_the_signal_handlers_alone() -> None:
    """Only the main thread may set handlers (and only it receives KeyboardInterrupt)."""
    spec = _spec(1000, 7)
    found: list[Any] = []
    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=lambda: found.append(compiled_loop(_NumpySgd(spec), spec)))
    thread.start()
    thread.join()
    ((traj, interrupted),) = found
    assert not interrupted and traj.stopped_at == 1000
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ctrl_c_before_the_first_chunk_is_the_state_at_x0(dtype: str) -> None:
    problem = Rosenbrock(dim=3, x0=0.5)
    spec = make_spec(problem, "sgd", 0.01, {}, "graph", dtype=dtype, steps=100, every=5)
    traj, interrupted = compiled_loop(_NumpySgd(spec, interrupt_at=1), spec)
    assert interrupted and traj.stopped_at == 0 and traj.steps.size == traj.x.size == 0
    x0 = np.asarray(problem.x0_array(), dtype)
    np.testing.assert_array_equal(traj.final_x, x0)
    assert traj.final_x.dtype == traj.final_grad.dtype == np.dtype(dtype)
    p = {k: np.asarray(v, dtype) for k, v in problem.coefficients.items()}
    assert traj.final_loss == float(problem.loss(x0, p))
    np.testing.assert_array_equal(traj.final_grad, problem.grad(x0).astype(dtype))


class _StoppedWhileCompiling:
    """A backend whose prepare() is where Ctrl-C lands (a long torch.compile, say)."""

    def prepare(self, spec: MinimizeSpec) -> Any:
        raise KeyboardInterrupt


@pytest.mark.parametrize("mode", ["graph", "manual"])
def test_ctrl_c_while_compiling_is_an_interrupted_run_at_step_0(mode: str) -> None:
    """So the run still gets results.json (status interrupted) and a KILLED MLflow run."""
    spec = make_spec(Quadratic(), "sgd", 0.1, {}, mode, dtype="float32", steps=100)
    outcome = engine.run_minimize(_StoppedWhileCompiling(), spec)  # type: ignore[arg-type]
    assert outcome.interrupted and np.isfinite(outcome.trajectory.final_loss)
    assert outcome.timings.steps_timed == 0 and outcome.trajectory.stopped_at == 0
    assert outcome.trajectory.steps.size == 0
    assert outcome.trajectory.final_x == np.float32(spec.problem.x0)


def test_ctrl_c_swallowed_while_compiling_is_an_interrupted_run_at_step_0() -> None:
    """torch.compile's cleanup code can drop the KeyboardInterrupt of a Ctrl-C ("Exception
    ignored in ..."): prepare() returns, and the first progress tick raises the stop the
    handler noted. That stop ended the run with no result ("stopped before a result
    existed"), nothing saved or logged, where one during prepare() is saved at step 0."""
    spec = _spec(100, 7)
    backend = SimpleNamespace(prepare=lambda s: _NumpySgd(s))

    def tick(done: int) -> None:
        raise KeyboardInterrupt  # the noted stop, raised again (runner.interrupts.raise_if_stopped)

    try:
        outcome = engine.run_minimize(backend, spec, progress=tick)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pytest.fail("the stop left run_minimize: the run has no result to save")
    assert outcome.interrupted and outcome.timings.steps_timed == 0
    assert outcome.trajectory.stopped_at == 0 and outcome.trajectory.steps.size == 0


class _FailsInChunk(_NumpySgd):
    """A program whose second advance() raises, as a framework out of memory would."""

    def advance(self, stop: int) -> Span:
        if len(self.stops) == 1:
            raise MemoryError("out of device memory")
        return super().advance(stop)


def test_a_chunk_that_raises_keeps_the_rows_of_the_chunks_before_it() -> None:
    """The error still ends the run (the job fails as before), but with the rows the
    chunks before it recorded, which the run's trajectory.csv keeps (they were lost)."""
    spec = _spec(1000, 7)  # a first chunk of 100 steps, the rest in a second
    backend = SimpleNamespace(prepare=lambda s: _FailsInChunk(s))
    whole = engine.run_minimize(SimpleNamespace(prepare=lambda s: _NumpySgd(s)), spec)  # type: ignore[arg-type]
    with pytest.raises(engine.StepsFailed) as failed:
        engine.run_minimize(backend, spec)  # type: ignore[arg-type]
    assert isinstance(failed.value.__cause__, MemoryError)
    rows = failed.value.rows
    kept = rows["steps"].size
    assert 0 < kept < whole.trajectory.steps.size
    np.testing.assert_array_equal(rows["steps"], whole.trajectory.steps[:kept])
    np.testing.assert_array_equal(rows["x"], whole.trajectory.x[:kept])


class _SlowFinal(_NumpySgd):
    """A program whose final state takes READ_BACK_S to reach the host (n = 1e7 on a GPU)."""

    READ_BACK_S = 0.3

    def final(self) -> tuple[Any, Any, Any]:
        time.sleep(self.READ_BACK_S)
        return super().final()


def test_the_final_read_back_is_timed_apart_from_the_steps() -> None:
    """step_us is the loop's alone: a run's one-off read-back is final_s, not spread over steps."""
    spec = _spec(100, 7)
    backend = SimpleNamespace(prepare=lambda s: _SlowFinal(s))
    timings = engine.run_minimize(backend, spec).timings  # type: ignore[arg-type]
    assert timings.final_s >= _SlowFinal.READ_BACK_S > timings.run_s
    assert timings.step_us == timings.run_s / 100 * 1e6


class _SeesTheCollector(_NumpySgd):
    """Notes how many objects the collector has frozen when each chunk runs."""

    def advance(self, stop: int) -> Span:
        self.frozen_during.append(gc.get_freeze_count())
        return super().advance(stop)


def test_the_loop_runs_with_the_objects_before_it_frozen() -> None:
    """No full collection rescans the framework's objects while steps run (engine docstring)."""
    before = gc.get_freeze_count()
    program = _SeesTheCollector(_spec(100, 7))
    program.frozen_during = []
    engine.run_minimize(SimpleNamespace(prepare=lambda _s: program), program.spec)  # type: ignore[arg-type]
    assert program.frozen_during and min(program.frozen_during) > before
    assert gc.get_freeze_count() == before  # unfrozen after the loop


# --- every backend: a chunk boundary changes no bit ----------------------------------------

# (id, spec): the notebook run; a last row shorter than every; a non-finite loss inside a
# row (step 64 of rows of 100); vector problems, one of them diverging (step 7).
CASES: list[tuple[str, MinimizeSpec]] = [
    ("notebook", notebook_spec("graph", steps=1000)),
    (
        "adam-float64-tail",
        make_spec(Quadratic(a=1.5, b=-3.3, c=0.7, x0=2.5), "adam", 0.05, {}, "graph", steps=203,
                  every=7),
    ),
    ("diverges-in-a-row", notebook_spec("graph", "manual", lr=1.5, steps=1000, every=100)),
    (
        "vector-momentum",
        make_spec(QuadraticForm(dim=5, cond=10.0, seed=3, x0=1.0), "sgd", 0.05,
                  {"momentum": 0.9, "nesterov": True}, "graph", "minimize", steps=250, every=3,
                  dtype="float32"),
    ),
    (
        "vector-diverges",
        make_spec(Rosenbrock(dim=4, x0=0.0), "sgd", 0.05, {}, "graph", steps=60, every=2),
    ),
    (  # past the unrolled loops' size: the per-step loop stops it
        "vector-diverges-flat",
        make_spec(Rosenbrock(dim=32, x0=0.0), "sgd", 0.05, {}, "graph", steps=60, every=2),
    ),
]  # fmt: skip

# (first chunk, growth cap): one step (or row) at a time, doubling; odd sizes; one chunk.
SCHEDULES = [(1, 2), (13, 1.5), (10**9, 32)]


def _backend(name: str) -> Any:
    if name == "jax":
        pytest.importorskip("jax")
        from backends.jax import JaxBackend

        return JaxBackend()
    pytest.importorskip("tensorflow")
    from backends.tf import TensorFlowBackend

    return TensorFlowBackend()


@pytest.mark.parametrize("case", [spec for _, spec in CASES], ids=[name for name, _ in CASES])
@pytest.mark.parametrize("variant", ["jax", "tf", "tf-xla"])
def test_chunk_boundaries_change_no_bit(variant: str, case: MinimizeSpec) -> None:
    backend = _backend(variant.split("-")[0])
    spec = replace(case, options={"jit_compile": True} if variant == "tf-xla" else {})
    found = []
    for first, growth in SCHEDULES:
        program = backend.prepare(spec)
        found.append(run_compiled(program, spec, first, growth))
        if variant.startswith("tf"):  # one trace (and XLA compile) served every chunk
            assert program._fn.experimental_get_tracing_count() == 1
    assert all(same_trajectory(traj, found[0]) for traj in found[1:])
    stops = {"diverges-in-a-row": 64, "vector-diverges": 7, "vector-diverges-flat": 7}
    name = next(name for name, s in CASES if s is case)
    assert found[0].stopped_at == stops.get(name, spec.steps)


def test_jax_chunks_compile_nothing() -> None:
    jax = pytest.importorskip("jax")
    from backends.jax import JaxBackend

    compiles: list[float] = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    spec = notebook_spec("graph", steps=5000, every=10)
    program = JaxBackend().prepare(spec)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        traj = run_compiled(program, spec, first=1, growth=2)  # 10 chunks
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and traj.stopped_at == 5000


# --- Ctrl-C and SIGTERM during a compiled run: the real CLI ------------------------------


def _assert_partial_run_saved(cwd: Path, steps: int) -> dict:
    result = single_result(cwd)
    assert result["status"] == "interrupted" and 0 < result["steps_run"] < steps
    run_dir = next((cwd / "outputs" / "runs").glob("*/*"))
    rows = (run_dir / "trajectory.csv").read_text().splitlines()
    assert len(rows) > 2 and rows[-1].startswith(f"{result['steps_run']},")
    assert float(rows[-1].split(",")[1]) == pytest.approx(1.0, abs=1e-5)  # converged meanwhile
    return result


HUGE = 2_000_000_000  # steps: hours of any compiled loop here
# A stopped run is saved within this many seconds of the signal: chunks last ~0.25 s and
# saving took ~0.3 s on an idle 2-core host, but 2.27 s once under load (JAX, in-process
# MLflow, a CI run beside other guests), so the bound leaves room; a loop that ignored the
# signal would run for hours.
SAVED_WITHIN_S = 5.0


_BACKENDS = {
    "jax": ("backend=jax",),
    "tf": ("backend=tf",),
    "tf-xla": ("backend=tf", "backend.jit_compile=true"),
}
_SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}
# By default each backend gets one of the two signals (the handler is the CLI's, the same
# for both; where the loop stops is the backend's); the other three cases run with -m slow.
# JAX with SIGINT is also the MLflow test below.
_DEFAULT = {("jax", "SIGTERM"), ("tf", "SIGINT"), ("tf-xla", "SIGTERM")}


@pytest.mark.parametrize(
    ("args", "signum", "code"),
    [
        pytest.param(
            args,
            *_SIGNALS[sig],
            id=f"{sig}-{name}",
            marks=() if (name, sig) in _DEFAULT else pytest.mark.slow,
        )
        for name, args in _BACKENDS.items()
        for sig in _SIGNALS
    ],
)
def test_signal_stops_a_compiled_run_and_saves_it(
    tmp_path: Path, args: tuple[str, ...], signum: int, code: int
) -> None:
    run = LiveRun(tmp_path, *args, "mode=graph", f"steps={HUGE}", "tracking=off")
    to_saved, to_exit = run.stop(signum, after=1.0)
    assert run.proc.returncode == code, run.lines
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert run.lines[-1][1] == f"{word}: what was computed is saved"
    # The exit then waits for the framework's own teardown (TensorFlow: ~2-3 s).
    assert to_saved < SAVED_WITHIN_S, (to_saved, run.lines)
    assert to_exit < 30.0
    result = _assert_partial_run_saved(tmp_path, HUGE)
    assert f", {result['steps_run']} of {HUGE} steps (INTERRUPTED)\n" in run.stdout()


def test_ctrl_c_during_a_compiled_run_is_killed_in_mlflow(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    in_process = "tracking.background=false"  # the run is RUNNING in MLflow while it runs
    run = LiveRun(tmp_path, "backend=jax", "mode=graph", f"steps={HUGE}", in_process)
    to_saved, _ = run.stop(signal.SIGINT, after=1.0)
    db = tmp_path / "outputs" / "mlflow.db"
    assert run.proc.returncode == 130, run.lines
    assert to_saved < SAVED_WITHIN_S, (to_saved, run.lines)
    result = _assert_partial_run_saved(tmp_path, HUGE)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("gradient-runner")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "KILLED" and found.data.tags["error"] == "interrupted"
    assert found.data.metrics["steps_run"] == result["steps_run"]
    assert json.loads((next((tmp_path / "outputs" / "runs").glob("*/*/results.json"))).read_text())
