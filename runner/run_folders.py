"""Run folders on disk: finding them under the paths given, and reading their files.

Its own module because two processes need it that share nothing else: `python -m
runner.upload` (runner.upload) scans the paths it is given, and a sweep's logger
(runner.follow) rescans its sweep folder as jobs finish. Neither touches MLflow here:
a run folder is one holding a results.json, or a sweep job's job_failure.json,
outside MLflow's copies of logged runs' files (run_dirs). Reading one (its record,
resolved config, overrides, and the folder its command started in) needs only
OmegaConf, imported when a folder has a .hydra/ to read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.results import JOB_FAILURE_FILE, RECORD_FILES, RESULTS_FILE
from runner.sweep_record import SWEEP_FILE, failure_uid, read_sweep

ARTIFACTS_FOLDER = "artifacts"  # MLflow's copy of a logged run's files: <run id>/artifacts/
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids (uuid4 hex)
FOLDER_HINT = "give run folders or sweep folders (outputs/runs/..., outputs/multirun/...)"


def run_dirs(paths: Iterable[Path]) -> Iterator[Path]:
    """Every run folder under each path, in order, once (none under a path is no error:
    a sweep's logger scans its folder before the first job has a result).

    A run folder is one holding a results.json, or a sweep job's job_failure.json (it
    failed before a result: logged as a FAILED run with its config and error, so MLflow
    shows the hole in the sweep), outside MLflow's copies of logged runs'
    files (`<run id>/artifacts/`, under outputs/mlartifacts/ for the default store): a
    copy holds a results.json too, but uploading it would log its run a second time.
    `.hydra/` is not required beside results.json: a run made with
    hydra.output_subdir=null has none, and its own background upload must find it.
    """
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise RunnerError(f"{path} does not exist; give run folders or sweep folders")
        for folder in _results_folders(path):
            if folder not in seen:
                seen.add(folder)
                yield folder


def run_folders(paths: Iterable[Path]) -> list[Path]:
    """run_dirs, each path checked before anything is uploaded: a path with no run
    folder under it (a typo'd or empty folder, a file, a sweep's compare/) is an error."""
    found: dict[Path, None] = {}
    for path in paths:
        here = list(run_dirs([path]))
        if not here:
            raise RunnerError(_no_run_folder(path))
        found.update(dict.fromkeys(here))
    return list(found)


def _no_run_folder(path: Path) -> str:
    if not path.is_dir():
        return f"{path} is not a folder; {FOLDER_HINT}"
    if (path / ".hydra").is_dir():  # Hydra writes it first: the run ended before its result
        return (
            f"{path} holds no {RESULTS_FILE}: its run stopped before writing one; nothing to upload"
        )
    return f"no run folders under {path}; {FOLDER_HINT}"


def _results_folders(path: Path) -> list[Path]:
    """os.walk, not rglob: an artifact copy is pruned, not walked (mlartifacts/ grows with
    every run logged), and a path inside one (given by hand) yields nothing."""
    root = path.resolve()
    if any(_is_artifact_copy(p) for p in (root, *root.parents)):
        return []
    if not root.is_dir():
        return []
    found = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _is_artifact_copy(Path(top, d))]
        if any(name in files for name in RECORD_FILES):
            found.append(Path(top))
    return sorted(found)


def _is_artifact_copy(folder: Path) -> bool:
    return folder.name == ARTIFACTS_FOLDER and bool(_RUN_ID.fullmatch(folder.parent.name))


def read_config(run_dir: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """The run's resolved config from .hydra/config.yaml; a minimal one from results.json."""
    path = run_dir / ".hydra" / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]
        except Exception:
            return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]
    mode = {"name": result.get("mode"), "update": result.get("update") or "apply"}
    return {
        "backend": {"name": result.get("backend"), **(result.get("options") or {})},
        "task": result.get("task"),
        "mode": mode,
        "dtype": result.get("dtype"),
    }


def started_in(run_dir: Path) -> Path:
    """The folder the run's command started in (Hydra's runtime.cwd), for its default store."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", default=None)
        if cwd:
            return Path(cwd)
    return Path.cwd()


def run_started(run_dir: Path, record: Path) -> float:
    """When the run started (seconds since the epoch): Hydra writes .hydra/config.yaml as
    the job starts; without it, when record was written. The MLflow run's start time and
    a sweep report's `started` column both read it (the report had results.json's time,
    the run's end, where compare's report from MLflow had its start)."""
    config = run_dir / ".hydra" / "config.yaml"
    return (config if config.is_file() else record).stat().st_mtime


def in_sweep(run_dir: Path) -> bool:
    parent = run_dir.parent
    return (parent / SWEEP_FILE).is_file() or (parent / "multirun.yaml").is_file()


def read_record(run_dir: Path) -> dict[str, Any]:
    """results.json, or for a run that failed before a result, a stand-in made from its
    job_failure.json: status "failed", its error, its run_uid (a single run's own; a sweep
    job's made by failure_uid), and the code state it recorded as it started (git, None
    if it has none)."""
    results = run_dir / RESULTS_FILE
    if results.exists() or not (run_dir / JOB_FAILURE_FILE).exists():
        return json.loads(results.read_text())
    failure = json.loads((run_dir / JOB_FAILURE_FILE).read_text())
    uid = failure.get("run_uid") or failure_uid(read_sweep(run_dir.parent).sweep_id, run_dir.name)
    error = str(failure.get("error", ""))
    return {"run_uid": uid, "status": "failed", "error": error, "git": failure.get("git")}


def read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(path)) or []
    return [str(o) for o in loaded]  # type: ignore[union-attr]
