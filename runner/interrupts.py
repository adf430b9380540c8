"""Ctrl-C and SIGTERM in the runner's commands: one line and an exit code, no traceback.

Every command (`python -m runner`, runner.compare, runner.upload, runner.bench) starts
through run_command, which imports the command's module and runs its main() inside one
`except KeyboardInterrupt`: a Ctrl-C while the module imports (Hydra, MLflow, a
framework: seconds), while main() checks its arguments, or anywhere its own handling
does not reach, ends the command as its own handling does. This module imports nothing
heavy, so that the window before that `try` is as short as Python's own start.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import NoReturn

from runner.console import say

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command Ctrl-C stopped
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the same clean-up saves the partial run
    (runner.cli installs the handler that raises it)."""


def stopped(stop: KeyboardInterrupt, what: str | None = None) -> int:
    """Say on stderr that the command was stopped (`interrupted: <what>`, `terminated`
    for SIGTERM), in one line; its exit code, 130 or 143."""
    terminated = isinstance(stop, Terminated)
    word = "terminated" if terminated else "interrupted"
    say(f"{word}: {what}" if what else word, err=True)
    return TERMINATED if terminated else INTERRUPTED


_STOPS: list[KeyboardInterrupt] = []


def raise_stop(signum: int, frame: object) -> None:
    """The handler of SIGINT and SIGTERM in the main thread: raise the stop, and note it.

    SIGTERM (a scheduler's or `kill`'s) ends a command as Ctrl-C does, where its default
    ended it silently, mid-write, with exit 143 and no word of what was kept. The note is
    for a stop that is lost: Python drops an exception raised while a garbage-collection
    callback runs (it prints "Exception ignored in ..."), and a library's bare `except:`
    swallows it (torch.compile's clean-up does); raise_if_stopped raises it again.
    """
    stop = stop_for(signum)
    _STOPS.append(stop)
    raise stop


def stop_for(signum: int) -> KeyboardInterrupt:
    """The stop a signal stands for: Terminated for SIGTERM, else a Ctrl-C."""
    return Terminated("terminated") if signum == signal.SIGTERM else KeyboardInterrupt()


def stop_requested() -> KeyboardInterrupt | None:
    """The last stop raise_stop noted in this process, lost or not."""
    return _STOPS[-1] if _STOPS else None


def raise_if_stopped() -> None:
    """Raise again a stop that was requested, lost or not (the engine's progress tick,
    every chunk; run_command, once the command's module is imported)."""
    stop = stop_requested()
    if stop is not None:
        raise type(stop)(*stop.args)


def run_command(module: str, what: str | None = None) -> NoReturn:
    """`python -m <module>`: import it, run its main() and exit with what it returns.

    A Ctrl-C that main() does not handle itself is stopped(stop, what): `what` says
    what is left of the work (or None: the bare word); a stop raised with its own
    `what` attribute says that instead. A second Ctrl-C (or SIGTERM)
    while the command exits ends it at once, silently, instead of printing a
    traceback over that line.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):  # a command's own handlers may replace it
        signal.signal(signum, raise_stop)
    try:
        command = importlib.import_module(module)
        raise_if_stopped()  # a Ctrl-C that the imports swallowed: main() would run on
        code = command.main()
    except (KeyboardInterrupt, Exception) as exc:
        stop = _stop_behind(exc)
        if stop is None:
            raise
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        code = stopped(stop, getattr(stop, "what", what))
    if code in (INTERRUPTED, TERMINATED):
        _forget_escaped_interrupt()
    sys.exit(code)


def _stop_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that exc is, or that it was raised while handling.

    Clean-up that a stop cuts short can fail in its turn: OmegaConf, building Hydra's
    configs as they import, tidies a half-built list in a `finally` and raises
    AttributeError over the KeyboardInterrupt (1 of 60 Ctrl-Cs 0.25-0.7 s into `python -m
    runner`: a 60-line traceback, exit 1). The user stopped the command all the same."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _forget_escaped_interrupt() -> None:
    """Keep the exit code of a stop that was handled.

    A Ctrl-C that passes out of an `exec` of a string (dataclasses build their methods so,
    while Hydra's structured configs import) sets CPython's _Py_UnhandledKeyboardInterrupt,
    even once caught; `python -m` then ends the process by SIGINT (-2 to a parent) instead
    of with sys.exit's 130. Measured: 3 of 40 Ctrl-Cs 0.2-0.4 s into `python -m runner`."""
    import contextlib
    import ctypes

    with contextlib.suppress(AttributeError, ValueError):  # not CPython, or no such flag
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0
