"""Errors the user can act on: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class RunnerError(Exception):
    """An expected failure with a message written for the user, not a bug."""

    exit_code = 2


class ConfigError(RunnerError):
    """A setting is wrong: the message names it and says what is allowed."""


class MissingFrameworkError(RunnerError):
    """The chosen backend's framework is not installed: the message names the extra."""


class UnsupportedError(RunnerError):
    """The backend cannot express this combination of mode, update and optimizer."""


class BadSetting(str):
    """A reason a backend's unsupported() gives that is a wrong setting (a value outside
    what it allows, an option it does not have), not a combination it cannot express: a
    sweep's job fails on it, as on a wrong core setting, where a combination is skipped
    (a hole in the matrix, exit 0). Plain str reasons, a plugin's, stay combinations."""


class PluginError(RunnerError):
    """An installed plugin is broken: it fails to import, or lacks what its protocol requires."""


class RunFailed(RunnerError):
    """A run stopped on an exception nobody expected, a plugin's or the runner's own: one
    line names it (`backend=X failed: RuntimeError: ...`); HYDRA_FULL_ERROR=1 shows where."""

    exit_code = 1

    def __init__(self, backend: object, exc: BaseException) -> None:
        super().__init__(
            f"backend={backend} failed: {describe(exc)} (HYDRA_FULL_ERROR=1 shows the traceback)"
        )


class DivergenceError(RunnerError):
    """The loss became NaN or infinite; what was computed until then is kept."""

    exit_code = 3

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def as_typed(value: object, quote: bool = True) -> str:
    """A value in Hydra's (YAML's) words: `true`, `null`, not Python's `True`, `None`;
    strings quoted (unless `quote` is off), so that an empty one shows."""
    if value is None or isinstance(value, bool):
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if quote else str(value)


def setting(key: str, value: object) -> str:
    """`key=value` as the user wrote it (see as_typed)."""
    return f"{key}={as_typed(value)}"


def not_allowed(key: str, value: object, allowed: Iterable[str]) -> BadSetting:
    """The one wording for a setting outside its vocabulary, wherever it is checked."""
    return BadSetting(f"{setting(key, value)} is not allowed; choose one of: {', '.join(allowed)}")


def installed_choices(names: Iterable[str]) -> str:
    """The names an entry-point group offers, or why it offers none: run from a checkout
    that was never installed, the project's own entry points are missing too."""
    return ", ".join(sorted(names)) or "none (is the project installed? pip install -e .)"


def describe(exc: BaseException) -> str:
    """An exception as one line, `Type: message`: its message's first line (` ...` marks
    more; the rest, and where it was raised, are in the traceback)."""
    lines = text_lines(str(exc))
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}{' ...' if len(lines) > 1 else ''}"


def text_lines(text: str) -> list[str]:
    """A message's non-blank lines, stripped: its first is what a one-line report shows."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def whole_number(key: str, value: Any, low: int = 1) -> int:
    """`value` if it is a whole number >= low (a bool is not one), else the one line.

    Hydra reads `1e3` and `1000.0` as floats: refused too (a count given as a float is
    a slip, and a large one may not be the integer it reads as), but said as such, since
    "1000.0 is not allowed; give a whole number" reads as a contradiction.
    """
    if isinstance(value, float) and value.is_integer():
        raise ConfigError(f"{setting(key, value)} is a float; {_whole_hint(value, low)}")
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{setting(key, value)} is not allowed; give a whole number >= {low}")
    return value


def _whole_hint(value: float, low: int) -> str:
    """What to write instead of a float with a whole value (when that value is allowed)."""
    hint = f"give a whole number >= {low}"
    if value >= low:
        hint += f" (write {int(value)}, without a decimal point or an exponent)"
    return hint


def flag(key: str, value: Any) -> bool:
    """`value` if it is true or false (not 'yes', not 1), else the one line."""
    if not isinstance(value, bool):
        raise ConfigError(f"{setting(key, value)} is not allowed; give true or false")
    return value
