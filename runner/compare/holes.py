"""The jobs of a sweep that have no row in its report: skipped and failed, with why.

The table has a row per result, so a combination the backend cannot express (skipped:
results.json says why) or a job that stopped on an error (job_failure.json) would show
only as a count in the header; the reason was in the terminal's stderr stream alone.
Each is one line below the table instead, named by what it would have run (backend and
mode) and by the overrides that set it apart from the sweep's other jobs, so the hole in
the matrix can be read off the report (and off comparison.md on the sweep's parent run).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.compare.rows import backend_label
from runner.errors import text_lines
from runner.masking import mask_text
from runner.naming import RUN_NAMED, config_kind, job_kind, mode_label, shown_overrides
from runner.results import JOB_FAILURE_FILE, RECORD_FILES, RESULTS_FILE, job_order
from runner.run_folders import read_overrides

# Overrides the job's name says already (its backend and mode, not its dtype), left out
# of it; the rest of the rule is the run name's (runner.naming.shown_overrides).
NAMED = tuple(key for key in RUN_NAMED if key != "dtype")


@dataclass(frozen=True)
class Hole:
    """A job of the sweep without a row: what it would have run, and why it did not."""

    status: str  # skipped | failed
    job: str  # "numpy graph/apply", "numpy manual problem.a=-1"
    reason: str  # one line
    what: str = field(default="", compare=False, repr=False)  # "numpy graph/apply"
    apart: tuple[str, ...] = field(default=(), compare=False, repr=False)  # its overrides

    def line(self) -> str:
        return f"{self.status}: {self.job}: {self.reason}"

    def record(self) -> dict[str, str]:
        """comparison.json's entry: one per job, as a script reads them."""
        return {"status": self.status, "job": self.job, "reason": self.reason}


def hole_lines(holes: Sequence[Hole]) -> list[str]:
    """One line per reason: the jobs a sweep skipped or lost for one and the same reason
    (NumPy's 12 optimizer-object jobs in a 4 x 2 x 2 matrix) are one line, their
    overrides merged as a sweep writes them (`optimizer=sgd,adam; dtype=float32,float64`),
    rather than 12 lines repeating it."""
    groups: dict[tuple[str, str], list[Hole]] = {}
    for hole in holes:
        groups.setdefault((hole.status, hole.reason), []).append(hole)
    lines = []
    for (status, reason), group in groups.items():
        if len(group) == 1:
            lines.append(group[0].line())
            continue
        values: dict[str, list[str]] = {}  # key -> its values, in job order
        for hole in group:
            for override in hole.apart:
                key, _, value = override.partition("=")
                if value not in values.setdefault(key, []):
                    values[key].append(value)
        whats = ", ".join(dict.fromkeys(h.what or h.job for h in group))
        merged = [f"{key}={','.join(vals)}" for key, vals in values.items()]
        lines.append(f"{status}, {len(group)} jobs ({'; '.join([whats, *merged])}): {reason}")
    return lines


def sweep_holes(sweep_dir: Path) -> list[Hole]:
    """The sweep's skipped and failed jobs, in job order."""
    folders = sorted(
        {p.parent for name in RECORD_FILES for p in sweep_dir.glob(f"*/{name}")},
        key=job_order,
    )
    overrides = {folder: read_overrides(folder) for folder in folders}
    shared = set.intersection(*map(set, overrides.values())) if overrides else set()
    holes = []
    for folder in folders:
        found = _why(folder)
        if found is not None:
            shown = shown_overrides((o for o in overrides[folder] if o not in shared), NAMED)
            apart = said_apart(shown, found[1])
            what = _what(folder)
            job = " ".join([what, *apart])
            holes.append(Hole(found[0], job, found[1], what, tuple(apart)))
    return holes


def said_apart(overrides: Iterable[str], reason: str) -> list[str]:
    """The overrides a job's line adds to its backend and mode: not a backend option,
    which the backend's label says (`numpy+convention=bogus`), nor the setting its
    reason starts with, said there with its value as read."""
    return [
        o
        for o in overrides
        if not o.startswith("backend.") and not reason.startswith(o.split("=")[0] + "=")
    ]


def _why(folder: Path) -> tuple[str, str] | None:
    """("failed", its error) or ("skipped", its reason); None for a job with a row."""
    failure = _read_json(folder / JOB_FAILURE_FILE)
    if failure is not None:
        return "failed", _one_line(str(failure.get("error", "")))
    result = _read_json(folder / RESULTS_FILE)
    if result is not None and result.get("status") == "skipped":
        return "skipped", _one_line(str(result.get("reason", "")))
    return None


def _what(folder: Path) -> str:
    """'numpy graph/apply': the job's backend and mode as the table names them, from its
    config (.hydra/config.yaml), else its results.json, else its folder's name."""
    config = _read_yaml(folder / ".hydra" / "config.yaml")
    if isinstance(config, dict):
        backend = dict(config.get("backend") or {})
        kind, update = config_kind(config)
        return _named(str(backend.pop("name", "?")), backend, mode_label(kind, update))
    result = _read_json(folder / RESULTS_FILE)
    if result is not None:
        kind = job_kind(result.get("task"), str(result.get("mode")))
        label = mode_label(kind, result.get("update"))
        return _named(str(result.get("backend")), result.get("options") or {}, label)
    return folder.name


def _named(backend: str, options: Mapping[str, Any], label: str) -> str:
    return f"{backend_label(backend, options)} {label}"


def _one_line(text: str) -> str:
    lines = text_lines(text)
    return mask_text(lines[0]) if lines else "(no message)"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
