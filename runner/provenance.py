"""Which code ran a run: the runner's git commit, and whether its checkout was dirty.

Read once, as the run starts (runner.cli), and kept in the run's record (results.json,
or a sweep job's job_failure.json, under `git`): whoever logs the run to MLflow tags
it from there. Read when the run was logged instead (a background upload seconds
later, a sweep's logger minutes later), the tags named the checkout as it was then: a
commit made meanwhile was tagged as the code that ran.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

_COMMIT_LINE = "# branch.oid "  # `git status --porcelain=v2 --branch`: the HEAD commit


def git_state() -> dict[str, Any] | None:
    """{"commit": the HEAD of the runner's own checkout, "dirty": whether tracked files
    differ from it}, whatever folder the command was typed in: the code that made the
    numbers. None for an installed copy outside git (or a repository with no commit yet).

    One `git status` answers both (it was two processes, rev-parse and status): the run
    pays for a single short subprocess."""
    lines = _git("status", "--porcelain=v2", "--branch", "--untracked-files=no").splitlines()
    heads = [line.removeprefix(_COMMIT_LINE) for line in lines if line.startswith(_COMMIT_LINE)]
    if not heads or heads[0] == "(initial)":
        return None
    return {"commit": heads[0], "dirty": any(not line.startswith("#") for line in lines)}


def _git(*args: str) -> str:
    """`git ARGS` in the runner's own checkout: its output, "" where git cannot answer.

    GIT_OPTIONAL_LOCKS=0: `git status` would otherwise refresh the index under its lock,
    and a `git commit` the user types while a run starts would then fail on index.lock."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            capture_output=True,
            text=True,
            errors="replace",  # a file name that is not UTF-8 is still a changed file
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
