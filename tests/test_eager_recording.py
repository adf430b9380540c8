"""The eager loop's two kinds of program, and problems that keep scalar coefficients scalar.

A RecordingEagerProgram keeps its rows itself and hands them over per chunk (drain);
a plain EagerProgram returns framework values per step, which the engine collects.
Both must give the same trajectory, stop at the first non-finite loss and keep exactly
the steps that ran when Ctrl-C lands. Framework-free: the programs here are NumPy.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

from runner.engine import CHECK_EVERY
from runner.problems import Quadratic, QuadraticForm, compact
from runner.protocol import MinimizeSpec, OptimizerSpec, RecordingEagerProgram, RecordPlan
from tests.chunks import eager_loop

LR = 0.01


def spec_for(steps: int, every: int) -> MinimizeSpec:
    return MinimizeSpec(
        problem=Quadratic(),
        optimizer=OptimizerSpec("sgd", LR),
        mode="manual",
        steps=steps,
        dtype="float64",
        record=RecordPlan(steps, every),
    )


class Values:
    """step() returns (loss, x, grad) per step, like the TF and torch programs."""

    def __init__(
        self,
        bad_at: int | None = None,
        interrupt_at: int | None = None,
        signal_at: int | None = None,
    ) -> None:
        self.x, self.i = 0.0, 0
        self.bad_at, self.interrupt_at, self.signal_at = bad_at, interrupt_at, signal_at

    def _advance(self) -> tuple[float, float, float]:
        if self.i == self.interrupt_at:
            raise KeyboardInterrupt  # before any state changes, as a cut-short call
        x = self.x
        loss = np.inf if self.i == self.bad_at else (x - 1.0) ** 2
        grad = 2 * x - 2
        self.x, self.i = x - LR * grad, self.i + 1
        if self.i - 1 == self.signal_at:  # Ctrl-C after the update, before the step returns
            signal.raise_signal(signal.SIGINT)
        return loss, x, grad

    def step(self, record: bool) -> tuple[float, float | None, float | None]:
        loss, x, grad = self._advance()
        return (loss, x, grad) if record else (loss, None, None)

    def to_numpy(self, values: list) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def final(self) -> tuple[float, float, float]:
        return (self.x - 1.0) ** 2, self.x, 2 * self.x - 2


class Recording(Values):
    """The same arithmetic, recording into a chunk buffer as the JAX program does."""

    def __init__(self, **kwargs: int | None) -> None:
        super().__init__(**kwargs)
        self.rows = np.full((CHECK_EVERY, 3), np.nan)
        self.k = 0
        self.drains = 0

    def step(self, record: bool) -> None:  # type: ignore[override]
        loss, x, grad = self._advance()
        self.rows[self.k] = (loss, x, grad) if record else (loss, np.nan, np.nan)
        self.k += 1

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.k <= CHECK_EVERY  # the engine drains at least every chunk
        host, self.k = self.rows[: self.k].copy(), 0
        self.drains += 1
        return host[:, 0], host[:, 1], host[:, 2]


def test_the_fakes_are_what_they_stand_for():
    assert isinstance(Recording(), RecordingEagerProgram)
    assert not isinstance(Values(), RecordingEagerProgram)


@pytest.mark.parametrize(("steps", "every"), [(2500, 1), (2500, 3), (999, 7), (1, 1), (3000, 1000)])
def test_recording_and_value_programs_give_the_same_trajectory(steps, every):
    spec = spec_for(steps, every)
    recording = Recording()
    traj, executed, interrupted = eager_loop(recording, spec)
    plain, *_ = eager_loop(Values(), spec)
    assert executed == traj.stopped_at == steps and not interrupted
    assert recording.drains == -(-steps // CHECK_EVERY)
    np.testing.assert_array_equal(traj.steps, np.arange(0, steps, every))
    for name in ("steps", "x", "loss", "grad", "final_x", "final_grad"):
        np.testing.assert_array_equal(getattr(traj, name), getattr(plain, name), err_msg=name)
    # Row k is the state before update k.
    x = 0.0
    xs = []
    for _ in range(steps):
        xs.append(x)
        x = x - LR * (2 * x - 2)
    np.testing.assert_array_equal(traj.x, np.asarray(xs)[::every])


@pytest.mark.parametrize("program", [Recording, Values])
@pytest.mark.parametrize("bad_at", [0, 999, 1000, 1537])
def test_divergence_ends_the_trajectory_at_the_first_non_finite_loss(program, bad_at):
    traj, executed, interrupted = eager_loop(program(bad_at=bad_at), spec_for(5000, 2))
    assert traj.stopped_at == bad_at and not interrupted
    assert executed == (bad_at // CHECK_EVERY + 1) * CHECK_EVERY  # the chunk ran to its end
    np.testing.assert_array_equal(traj.steps, np.arange(0, bad_at, 2))
    assert np.all(np.isfinite(traj.loss)) and traj.x.shape == traj.steps.shape


@pytest.mark.parametrize("program", [Recording, Values])
@pytest.mark.parametrize("interrupt_at", [0, 1000, 1234])
def test_ctrl_c_keeps_exactly_the_steps_that_ran(program, interrupt_at):
    found = program(interrupt_at=interrupt_at)
    traj, executed, interrupted = eager_loop(found, spec_for(5000, 1))
    assert interrupted and executed == traj.stopped_at == interrupt_at == found.i
    np.testing.assert_array_equal(traj.steps, np.arange(interrupt_at))
    assert traj.x.shape == traj.loss.shape == traj.grad.shape == (interrupt_at,)
    assert traj.final_x == found.x


@pytest.mark.parametrize("program", [Recording, Values])
@pytest.mark.parametrize("signal_at", [0, 999, 1234])
def test_ctrl_c_during_a_step_takes_effect_when_it_returns(program, signal_at):
    """The step is kept whole: its update made and its row taken, none after it."""
    found = program(signal_at=signal_at)
    traj, executed, interrupted = eager_loop(found, spec_for(5000, 1))
    assert interrupted and executed == traj.stopped_at == signal_at + 1 == found.i
    np.testing.assert_array_equal(traj.steps, np.arange(signal_at + 1))
    assert traj.final_x == found.x and traj.x[-1] != found.x
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("program", [Recording, Values])
def test_ctrl_c_after_a_non_finite_loss_in_the_same_chunk_ends_at_that_loss(program):
    """The steps a signal leaves of a chunk are checked like a whole chunk's."""
    found = program(bad_at=1100, signal_at=1500)
    traj, executed, interrupted = eager_loop(found, spec_for(5000, 1))
    assert interrupted and executed == found.i == 1501 and traj.stopped_at == 1100
    np.testing.assert_array_equal(traj.steps, np.arange(1100))
    assert np.all(np.isfinite(traj.loss))


# --- problems: a coefficient given as one number stays one number ---------------------


def test_scalar_coefficients_of_an_n_dim_quadratic_take_no_memory_of_size_n():
    problem = Quadratic(dim=10**8)  # would be 800 MB per float64 vector
    assert all(isinstance(v, float) for v in problem.coefficients.values())
    x0, (x_star, loss_star) = problem.x0_array(), problem.optimum()
    assert x0.shape == x_star.shape == (10**8,)
    assert x0.strides == x_star.strides == (0,)  # broadcast views of one number
    assert compact(x0) == 0.0 and compact(x_star) == 1.0 and loss_star == 0.0


def test_scalar_and_per_coordinate_coefficients_give_the_same_numbers():
    n, rng = 37, np.random.default_rng(5)
    a, b, c, x0 = 1.7, -0.3, 0.25, 0.6
    scalar = Quadratic(a=a, b=b, c=c, x0=x0, dim=n)
    vector = Quadratic(a=(a,) * n, b=(b,) * n, c=(c,) * n, x0=(x0,) * n, dim=n)
    assert isinstance(vector.coefficients["a"], np.ndarray)
    np.testing.assert_array_equal(scalar.x0_array(), vector.x0_array())
    np.testing.assert_array_equal(scalar.optimum()[0], vector.optimum()[0])
    assert scalar.optimum()[1] == vector.optimum()[1]
    x = rng.normal(size=n)
    assert scalar.loss(x, scalar.coefficients) == vector.loss(x, vector.coefficients)
    np.testing.assert_array_equal(scalar.grad(x), vector.grad(x))
    steps = np.arange(5.0)[:, None]
    np.testing.assert_array_equal(
        scalar.sgd_closed_form(0.1, steps), vector.sgd_closed_form(0.1, steps)
    )


def test_compact_leaves_real_vectors_alone():
    vector = np.arange(4.0)
    assert compact(vector) is vector
    assert compact(2.5) == 2.5
    assert np.ndim(compact(np.broadcast_to(np.arange(2.0), (3, 2)))) == 2
    assert QuadraticForm(dim=3, x0=1.0).x0_array().tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="read-only"):
        Quadratic(dim=3).x0_array()[0] = 1.0  # a view: convert it before writing


def test_progress_bar_is_made_outside_the_timed_loop() -> None:
    """The bar's first build (tqdm: ~0.5 ms) happened at the first tick, inside run_s:
    a 20-step run's step time read 30-50 us/step against 20 without the bar. (The engine
    makes its first tick before the timer starts, in every mode.)"""
    import time

    from backends.numpy import NumpyBackend
    from runner.engine import run_minimize

    ticks: list[int] = []

    def slow_first_tick(done: int) -> None:
        if not ticks:
            time.sleep(0.3)
        ticks.append(done)

    outcome = run_minimize(NumpyBackend(), spec_for(20, 1), progress=slow_first_tick)
    assert ticks[0] == 0 and ticks[-1] == 20
    assert outcome.timings.run_s < 0.15, outcome.timings


def test_ctrl_c_during_the_divergence_replay_keeps_the_run() -> None:
    """A diverged eager run is replayed to its bad step for the exact final state; a
    stop there (the replay can take as long as the run) left run_minimize with nothing,
    so the job said "stopped before a result existed". Now the run is kept, interrupted."""
    from backends.numpy import NumpyBackend
    from runner.engine import run_minimize

    class StoppedInTheReplay(NumpyBackend):
        prepared = 0

        def prepare(self, spec: MinimizeSpec):  # type: ignore[no-untyped-def]
            self.prepared += 1
            program = super().prepare(spec)
            if self.prepared == 2:  # the replay's program

                def stop(record: bool) -> None:
                    raise KeyboardInterrupt

                program.step = stop
            return program

    spec = MinimizeSpec(
        problem=Quadratic(),
        optimizer=OptimizerSpec("sgd", 1.5),
        mode="manual",
        steps=300,
        dtype="float32",
        record=RecordPlan(300, 1),
    )
    outcome = run_minimize(StoppedInTheReplay(), spec)
    assert outcome.interrupted
    traj = outcome.trajectory
    assert 0 < traj.stopped_at < 300  # the rows end where it diverged
    assert traj.steps[-1] == traj.stopped_at - 1 and np.all(np.isfinite(traj.loss))
