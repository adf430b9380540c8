"""One run, start to finish: config -> plugin -> result -> files (and the tracker).

Files are written before anything can fail after the computation, so a diverged run,
a tracking outage or a bad summary never loses what was computed.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.config import RunConfig
from runner.console import say
from runner.engine import StepsFailed, run_minimize
from runner.errors import (
    BadSetting,
    ConfigError,
    DivergenceError,
    PluginError,
    RunnerError,
    UnsupportedError,
)
from runner.interrupts import raise_if_stopped
from runner.optimizers import used_record
from runner.plugins import load_backend
from runner.protocol import (
    Backend,
    Derivatives,
    FollowsConvention,
    MinimizeSpec,
    RecordsOptions,
)
from runner.provenance import machine_state, numerics_environment
from runner.results import (
    RESULTS_FILE,
    TRAJECTORY_FILE,
    RunIdentity,
    derivatives_result,
    divergence_message,
    minimize_result,
    new_run_uid,
    recorded_rows,
    skipped_result,
    trajectory_rows,
    write_json,
    write_trajectory,
)
from runner.summary import derivatives_summary, minimize_summary, plural


def supported_backend(run: RunConfig) -> Backend:
    """The run's backend, loaded once for the check and the run (a plugin's __init__ may
    be costly, or count). A single run the backend cannot express is bad input, refused
    here, before anything is written or logged. (A sweep's job records it as skipped
    instead, so that the sweep's report shows the hole in its matrix: `execute` does
    that.)"""
    if run.unsupported:  # no framework needed to say so
        raise UnsupportedError(run.unsupported)
    backend = load_backend(run.backend)
    resolved_device(backend, run)  # device=gpu where there is none: refused here too
    if run.minimize is not None:
        reason = backend.unsupported(run.minimize)
        if reason:
            raise _unsupported(run, run.minimize, reason)
    return backend


def resolved_device(backend: Backend, run: RunConfig) -> str:
    """backend.resolved_device, whose refusal names the device as typed: the backend is
    given device=gpu for device=cuda, and the user would read of a value never typed."""
    try:
        return backend.resolved_device(run.device)
    except ConfigError as refusal:
        if run.device_typed in (None, run.device):
            raise
        typed = str(refusal).replace(f"device={run.device}:", f"device={run.device_typed}:")
        raise ConfigError(typed) from refusal


# A reason that starts by naming a setting ("optimizer=adam: ...", "backend.unroll=0
# must ...") says what it refuses; any other is about the mode asked for, which is named.
_NAMES_ITS_SETTING = re.compile(r"[\w.]+=")


def _unsupported(run: RunConfig, spec: MinimizeSpec, reason: str) -> RunnerError:
    """A combination the backend cannot express (UnsupportedError: a sweep's job is
    skipped), or a wrong setting (BadSetting: ConfigError, its job failed)."""
    asked = f"backend={run.backend}"
    if not _NAMES_ITS_SETTING.match(reason):
        asked += f" mode={spec.mode}" + (
            f" mode.update={spec.update}" if spec.mode == "graph" else ""
        )
    refusal = ConfigError if isinstance(reason, BadSetting) else UnsupportedError
    return refusal(f"{asked}: {reason}")


def execute(
    run: RunConfig,
    output_dir: Path,
    run_uid: str | None = None,
    backend: Backend | None = None,
    git: Mapping[str, Any] | None = None,
    record_skip: bool = True,
) -> dict[str, Any]:
    """Run the task `run` asks for, write its files to output_dir, return the result.

    run_uid (a fresh one when not given) goes into results.json: the run's identity
    in MLflow, live or uploaded later. backend: supported_backend's, when it checked
    the run; else the run's is loaded here. git: the code state read as the run started
    (runner.provenance.git_state), kept in results.json for its MLflow tags, as are the
    machine and the numerics-relevant environment, read here once the backend (whose
    module may set a framework's default) is loaded. record_skip: a derivatives job its
    backend declines is on record (results.json, status skipped) in a sweep; a single
    run is refused and leaves no folder.
    """
    backend = backend or load_backend(run.backend)
    identity = RunIdentity(
        run.backend,
        backend.framework,
        resolved_device(backend, run),
        _checked_versions(run.backend, backend.versions()),
        run_uid or new_run_uid(),
        git,
        machine_state(),
        numerics_environment(framework=backend.framework),
    )
    if run.minimize is not None:
        return _minimize(run, run.minimize, backend, identity, output_dir)
    assert run.derivatives is not None
    try:
        try:
            found = backend.derivatives(run.derivatives)
        except NotImplementedError as exc:  # a plugin's way to decline, as UnsupportedError is
            raise UnsupportedError(
                f"backend={run.backend} does not implement task=derivatives"
            ) from exc
    except UnsupportedError as declined:  # on record, as a minimize job the backend declines
        if record_skip:
            skipped = skipped_result(run.derivatives, identity, str(declined))
            write_json(output_dir / RESULTS_FILE, skipped)
        raise
    _check_coefficients(run.backend, found, run.derivatives.problem.coefficients)
    result = derivatives_result(run.derivatives, found, identity)
    write_json(output_dir / RESULTS_FILE, result)
    say(derivatives_summary(result), _files_line(output_dir))
    return result


def _minimize(
    run: RunConfig,
    spec: MinimizeSpec,
    backend: Backend,
    identity: RunIdentity,
    output_dir: Path,
) -> dict[str, Any]:
    reason = run.unsupported or backend.unsupported(spec)
    if reason:
        refusal = UnsupportedError(reason) if run.unsupported else _unsupported(run, spec, reason)
        if isinstance(refusal, UnsupportedError):  # a hole in the sweep's matrix, recorded
            write_json(output_dir / RESULTS_FILE, skipped_result(spec, identity, reason))
        raise refusal
    try:
        with _progress(run.progress, spec.steps) as advance:
            outcome = run_minimize(
                backend,
                spec,
                on_phase=_phase_printer(run.progress, spec.mode == "graph", spec.steps),
                progress=advance,
            )
    except StepsFailed as failed:  # the run fails as it would have; its rows are kept
        rows = recorded_rows(spec, failed.rows)
        write_trajectory(output_dir / TRAJECTORY_FILE, rows)
        kept = plural(len(rows["step"]), "recorded step")
        say(f"kept      {kept} before the error in {output_dir / TRAJECTORY_FILE}")
        assert failed.__cause__ is not None
        raise failed.__cause__ from None
    options = backend.options_used(spec) if isinstance(backend, RecordsOptions) else None
    result = minimize_result(spec, outcome, identity, _optimizer_used(backend, spec), options)
    write_trajectory(output_dir / TRAJECTORY_FILE, trajectory_rows(spec, outcome))
    write_json(output_dir / RESULTS_FILE, result)
    say(minimize_summary(result), _files_line(output_dir))
    if outcome.interrupted:
        raise KeyboardInterrupt
    if result["status"] == "diverged":
        message = divergence_message(result, output_dir / TRAJECTORY_FILE)
        raise DivergenceError(message, result["diverged_at"])
    return result


def _check_coefficients(backend: str, found: Derivatives, coefficients: Mapping) -> None:
    """dy/d(coefficient) must name the problem's coefficients: another set ended the run in
    a KeyError from the runner's own comparison with the analytic values."""
    if set(found.dy_dcoef) != set(coefficients):
        raise PluginError(
            f"backend={backend}: derivatives() gave dy_dcoef for {', '.join(found.dy_dcoef)}; "
            f"the problem's coefficients are {', '.join(coefficients)}"
        )


def _checked_versions(backend: str, versions: Mapping[str, Any]) -> dict[str, str]:
    """versions() must name versions as strings: another value reached results.json as
    itself and the MLflow tags as its repr ('None'), where a version is what tells two
    runs' numbers apart."""
    wrong = {name: v for name, v in versions.items() if not (isinstance(v, str) and v)}
    if wrong or not all(isinstance(name, str) and name for name in versions):
        raise PluginError(
            f"backend={backend}: versions() must map framework names to version strings; "
            f"it gave {dict(versions)!r}"
        )
    return dict(versions)


def _files_line(output_dir: Path) -> str:
    """Where results.json and trajectory.csv are: a run without background tracking
    prints no other line naming its folder."""
    return f"files     {output_dir}"


def _optimizer_used(backend: Backend, spec: MinimizeSpec) -> dict[str, Any] | None:
    """What the run's optimizer ran with, where the backend names its convention."""
    if not isinstance(backend, FollowsConvention):
        return None
    opt = spec.optimizer
    return used_record(opt.name, opt.lr, opt.hyper, backend.convention(spec))


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; silent when stderr is not a terminal.

    The tick (every engine chunk, eager or compiled) also re-raises a stop whose signal
    was lost. The bar appears at the first tick, after prepare() and its phase lines.
    """
    if not enabled:
        yield lambda done: raise_if_stopped()
        return
    from tqdm import tqdm

    bars: list[tqdm] = []

    def advance(done: int) -> None:
        raise_if_stopped()
        if not bars:
            # A thread lock, not tqdm's default multiprocessing one: that is a POSIX
            # semaphore, which a joblib worker stopped at the sweep's end leaves behind,
            # and multiprocessing's resource tracker then warns of it after the sweep.
            # No bar here is shared with another process.
            tqdm.set_lock(threading.RLock())
            bars.append(tqdm(total=total, unit="step", file=sys.stderr, disable=None, leave=False))
        bars[0].update(done - bars[0].n)

    try:
        yield advance
    finally:
        for bar in bars:
            bar.close()


def _phase_printer(enabled: bool, compiled: bool, steps: int) -> Callable[[str], None] | None:
    """Compiling can take a while (torch.compile: 5-35 s): say which phase is running.

    The run line is printed in every mode: off a terminal the bar is off, and a log (or
    a script waiting to interrupt the loop) still sees when the loop begins.
    """
    if not enabled:
        return None
    messages = {"run": f"running {plural(steps, 'step')} ..."}
    if compiled:
        messages["compile"] = "compiling the loop ..."

    def announce(phase: str) -> None:
        if phase in messages:
            say(messages[phase], err=True)

    return announce
