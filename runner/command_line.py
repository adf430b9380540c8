"""What the runner's own commands (compare, upload, bench) share on their command lines.

Kept apart from any one command, and free of framework and MLflow imports, so that the
benchmark can check its arguments before it imports anything heavy.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import datetime
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, exit 2, as the commands' own
    checks are: its usage block pushed the line that says what was wrong out of sight."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def default_out_dir(command: str) -> Path:
    """outputs/<command>/<date>_<time>, to the microsecond: out_dir_error refuses a folder
    that holds files, so two commands started in one second must not share a default."""
    return Path("outputs") / command / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")


def out_dir_error(path: Path, given: bool) -> str | None:
    """Why the output folder `path` (--out, or the default when not given) cannot be
    used, or None; nothing is created. Checked before the work starts, so a bad --out
    costs no store read or benchmark and reads as one line, not mkdir's traceback.

    A folder that already holds files is refused too: a command's files went in beside an
    earlier one's (a comparison left the last report's stale files next to its own) or
    over them (a benchmark replaced an earlier benchmark's results)."""
    what = f"--out {path}" if given else f"the default output folder {path}"
    if problem := unwritable(path):
        return f"{what} cannot be written: {problem}; give --out a folder you can write in"
    if holds_files(path):
        return f"{what} already holds files; give --out a new folder, or remove that one"
    return None


def holds_files(path: Path) -> bool:
    """Whether path is a folder with anything in it (a folder it cannot list counts: what
    it holds cannot be told apart from an earlier command's files)."""
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return True


def unwritable(path: Path) -> str | None:
    """What keeps a folder from being made at path (None: nothing), creating nothing: its
    nearest existing ancestor (or itself) must be a folder this process can create files
    in. The run folder of `python -m runner` and the --out of the other commands."""
    existing = path.absolute()
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as exc:
        return f"no file can be made in {existing} ({exc.strerror})"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a folder above it that cannot be searched
        return False
