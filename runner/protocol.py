"""The contract between the framework-free core and a framework plugin.

A backend knows how to differentiate and update in its framework; the core owns
validation, timing, the analytic reference, recording and reporting. Everything
that crosses this boundary is plain Python or NumPy, so the core never imports a
framework and a third party can add a backend by implementing these few names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from runner.errors import BadSetting, not_allowed, setting
from runner.optimizers import Convention
from runner.problems import Problem

EAGER_MODES = ("manual", "apply", "minimize")  # the core steps them; "graph" compiles a loop
MODES = (*EAGER_MODES, "graph")
GRAPH_UPDATES = ("apply", "minimize", "manual")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class OptimizerSpec:
    """One vocabulary of optimizer settings, mapped by each backend to its native optimizer."""

    name: str
    lr: float
    hyper: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordPlan:
    """Which steps are recorded: every `every`-th step from 0, plus the final state.

    Row k holds the state *before* update k (x_k, loss(x_k), grad(x_k)), which a loop
    computes anyway, so recording adds no arithmetic. Compiled loops preallocate
    `rows` slots and write slot i // every at step i when i % every == 0.
    """

    steps: int
    every: int

    @property
    def rows(self) -> int:
        return -(-self.steps // self.every)


@dataclass(frozen=True)
class MinimizeSpec:
    """Everything a backend needs to build one minimization run."""

    problem: Problem
    optimizer: OptimizerSpec
    mode: str
    steps: int
    dtype: str
    record: RecordPlan
    update: str = "apply"  # graph mode only: how the compiled loop updates x
    device: str = "cpu"
    options: Mapping[str, Any] = field(default_factory=dict)  # backend-specific (jit_compile, ...)

    @property
    def rule(self) -> str:
        """How x is updated: graph mode's inner update, else the mode itself (an eager
        mode is its own update)."""
        return self.update if self.mode == "graph" else self.mode


@dataclass(frozen=True)
class DerivativesSpec:
    problem: Problem
    dtype: str
    device: str = "cpu"


@dataclass(frozen=True)
class Derivatives:
    """The first half of the notebook, evaluated by one framework at problem.x0."""

    y: float
    dy_dx: float
    dy_dcoef: Mapping[str, float]
    d2y_dx2: float
    compiled_dy_dx: float
    compiled_y: float


@dataclass(frozen=True)
class Span:
    """The rows of a span of steps, on the host: what CompiledProgram.advance() hands back.

    `stopped_at` is the step the span ran to: advance()'s stop, or the step of the first
    non-finite loss, with the rows before it.
    """

    steps: np.ndarray  # int64, recorded step indices
    # x at each recorded step: scalar problems 1-D; vectors rows x n, or each row's
    # ||x - x*|| (1-D), and grad likewise (see EagerProgram)
    x: np.ndarray
    loss: np.ndarray
    grad: np.ndarray
    stopped_at: int


@dataclass(frozen=True)
class Trajectory:
    """A run's recorded rows and the state where it stopped.

    `stopped_at` equals the requested step count on success; a run that meets a
    non-finite loss stops at that step and reports it, with the rows before it.
    """

    steps: np.ndarray  # int64, recorded step indices
    x: np.ndarray  # x at each recorded step (scalar problems: 1-D)
    loss: np.ndarray
    grad: np.ndarray
    final_x: np.ndarray
    final_loss: float
    final_grad: np.ndarray
    stopped_at: int


class EagerProgram(Protocol):
    """One optimizer step at a time; the core drives the loop, records and checks.

    step(record) performs update i and returns (loss_i, x_i, grad_i) evaluated at the
    point before the update, as framework values (no host transfer). x_i and grad_i may
    be None when record is False, so that a framework that must copy x to snapshot it
    only pays for that on recorded steps. For a vector problem x_i and grad_i are the
    vectors, or (cheaper: one number a row to the host) ||x_i - x*|| and ||grad_i||, as
    the built-in backends give them; trajectory.csv records the norms either way. All
    values are in the run's dtype (spec.dtype). Ctrl-C acts between steps: the core
    holds SIGINT and SIGTERM until step() returns.
    """

    def step(self, record: bool) -> tuple[Any, Any, Any]: ...

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray:
        """Stack framework values into one host array: the only host sync per chunk."""
        ...

    def final(self) -> tuple[Any, Any, Any]:
        """(loss, x, grad) at the current x, after the last step."""
        ...


EAGER_CHUNK = 1000  # the engine drains a RecordingEagerProgram at least this often


@runtime_checkable
class RecordingEagerProgram(Protocol):
    """An eager program that records where it computes: a step hands nothing back.

    The core still drives the loop and says which steps are recorded. step(record)
    performs update i and keeps loss_i and, when record is True, the row (x_i, grad_i)
    on the framework's side, so the core holds no framework value per step. drain() is
    called at least every EAGER_CHUNK steps and after the last one. The core holds
    Ctrl-C (SIGINT, SIGTERM) until a step returns, so a step may give its buffers to a
    call; a step that raises KeyboardInterrupt itself leaves the program as if it had
    not run.
    """

    def step(self, record: bool) -> None: ...

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(loss, x, grad) of every step since the last drain, as host arrays.

        Each has one entry per step; x and grad are meaningful only on the steps made
        with record=True (the others may hold anything).
        """
        ...

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray: ...

    def final(self) -> tuple[Any, Any, Any]: ...


class CompiledProgram(Protocol):
    """The loop compiled; recording and the divergence check happen inside it.

    The engine runs it in chunks, so that Ctrl-C and SIGTERM (seen by Python only
    between calls into compiled code) take effect within a chunk's time: advance(stop)
    runs from the program's current step (0 after prepare()) to the absolute step
    `stop` and returns that Span: rows at its recorded steps i (i % every == 0, absolute
    step numbers) and `stopped_at` (== stop, or the step of the first non-finite loss,
    after which the engine calls no more). `stop` is a multiple of `step_multiple` or
    the run's last step. One compiled executable (traced function) serves every chunk:
    prepare() pays all the compiling, and a chunk boundary changes no number.

    The state stays on the framework's side between chunks: the engine asks for it once,
    with final() and to_numpy() as from an eager program, when the run ends. The engine
    delivers SIGINT and SIGTERM that arrive during advance() after it returns (in the
    main thread), so a program may give its state's buffers to the compiled call.
    """

    # The engine's chunk boundaries are multiples of this: 1 for a loop that can stop
    # anywhere; record.every for one that runs whole record rows; the steps of one
    # compiled call for one that runs a fixed number per call. A chunk is at least
    # this many steps, so it bounds how soon Ctrl-C can take effect.
    step_multiple: int

    def advance(self, stop: int) -> Span: ...

    def to_numpy(self, values: Sequence[Any]) -> np.ndarray: ...

    def final(self) -> tuple[Any, Any, Any]:
        """(loss, x, grad) at the state where the last advance() stopped (x0 before one)."""
        ...


@runtime_checkable
class Backend(Protocol):
    """A framework plugin, found through the `gradient_runner.backends` entry-point group.

    prepare() builds everything a run needs and pays every one-time cost (tracing,
    compilation, a warm-up step) before returning, leaving the state at x0: the core
    reports its wall time as compile_s and times only the loop after it.
    """

    name: ClassVar[str]
    framework: ClassVar[str]

    def versions(self) -> dict[str, str]:
        """Framework name -> version, for results.json and MLflow tags; the framework's
        own first (its MLflow tag `framework_version`, one key across backends)."""
        ...

    def resolved_device(self, requested: str) -> str:
        """The device a run will use for `requested` (cpu | gpu | auto), e.g. 'cpu', 'cuda:0'.

        Raises ConfigError when `gpu` is asked for and the framework sees none.
        """
        ...

    def unsupported(self, spec: MinimizeSpec) -> str | None:
        """A one-line reason when this backend cannot run `spec`, else None (a backend
        that runs every mode, update and dtype starts with `outside_vocabulary`). The
        user sees it after `backend=X mode=Y:`, or after `backend=X:` when it starts
        with the setting it refuses (`optimizer=adam: ...`), so it never blames the mode
        for what the optimizer or an option refuses."""
        ...

    def prepare(self, spec: MinimizeSpec) -> EagerProgram | CompiledProgram: ...

    def derivatives(self, spec: DerivativesSpec) -> Derivatives: ...


@runtime_checkable
class FollowsConvention(Protocol):
    """A backend that names whose optimizer formulas and defaults a run follows.

    Optional (a plugin without it records the settings as asked): with it, a run's
    results.json holds the hyperparameters the framework ran with, its defaults filled
    in (`optimizer_used`: Adam's eps is 1e-7 in TF and 1e-8 in torch and optax), which
    is often what explains two frameworks' different numbers.
    """

    def convention(self, spec: MinimizeSpec) -> Convention: ...


@runtime_checkable
class RecordsOptions(Protocol):
    """A backend that says which of a spec's options a run used, and at what values.

    Optional (a plugin without it records spec.options as asked): with it, results.json's
    `options`, which the comparison report names and groups backends by, hold the options
    as the run used them: one without effect in this spec left out (`legacy_optimizers`
    where TF's hand-written rule reads nothing of it), a value the backend adjusts as it
    ran (torch's `unroll`, reduced to a power of two dividing steps), so an option that
    changed nothing makes no backend of its own. The MLflow params keep what was asked.
    """

    def options_used(self, spec: MinimizeSpec) -> dict[str, Any]: ...


def outside_vocabulary(spec: MinimizeSpec) -> str | None:
    """Why a spec's mode, graph update or dtype is none of the shared vocabulary, else None.

    The config layer checks these before a framework is imported; a backend is also
    handed bare specs (the benchmark, tests, third-party callers), so its unsupported()
    checks them again, in the config layer's words.
    """
    checks = [("mode", spec.mode, MODES), ("dtype", spec.dtype, DTYPES)]
    if spec.mode == "graph":
        checks.append(("mode.update", spec.update, GRAPH_UPDATES))
    for key, value, allowed in checks:
        if value not in allowed:
            return not_allowed(key, value, allowed)
    return None


def option_misfit(
    spec: MinimizeSpec, options: Mapping[str, Any], graph_only: Sequence[str]
) -> str | None:
    """Why spec.options do not fit the backend, else None. `options` are its known options
    and their defaults; those in `graph_only` set the compiled loop, so an eager run
    setting one away from its default would run as if it were unset, yet be recorded and
    compared (as `tf+jit_compile`, say) as if it had run with it."""
    unknown = sorted(set(spec.options) - set(options))
    if unknown:
        allowed = f"allowed: {', '.join(options)}" if options else "it has none"
        given = setting(f"backend.{unknown[0]}", spec.options[unknown[0]])
        return BadSetting(f"{given} is not an option of this backend; {allowed}")
    if spec.mode == "graph":
        return None
    for key in graph_only:
        if spec.options.get(key, options[key]) != options[key]:
            return (
                f"{setting(f'backend.{key}', spec.options[key])} sets mode=graph's compiled "
                f"loop; mode={spec.mode} runs eagerly: choose mode=graph, or leave it out"
            )
    return None
