"""A single run refused before it computed anything leaves no run folder behind.

Hydra makes the run's folder (outputs/runs/<date>/<time>_...), writes `.hydra/` and
opens the job's log before the job starts, and most refusals (a setting runner.config
refuses, a combination the backend cannot express) can only be made by the job, with
the composed config: each refused command used to leave a folder holding nothing but
Hydra's files, which buried the runs that had results among empty ones.

So, just before Hydra makes the folder (runner.callbacks.NewRunFolder), the folders
that do not exist yet are noted, and a refused run removes them again (remove_unused)
only if they are still as Hydra left them: nothing but its own files and an empty log.
A folder that existed before the command, or holds anything else, is never touched.
A sweep keeps its job folders: its report lists the skipped and failed jobs.
"""

from __future__ import annotations

import os
from pathlib import Path

HYDRA_FILES = frozenset({"config.yaml", "hydra.yaml", "overrides.yaml"})

# run folder -> the folders this command is about to create for it, deepest first
_NEW: dict[Path, list[Path]] = {}


def note_new(run_dir: str) -> None:
    """Before Hydra makes run_dir: it and those of its parents that do not exist yet."""
    folder = Path(os.path.abspath(run_dir))  # as Hydra spells hydra.runtime.output_dir
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing:
        _NEW[missing[0]] = missing


def remove_unused(
    run_dir: Path, output_subdir: str | None, log_name: str, made_by_hydra: bool = False
) -> bool:
    """Remove run_dir, and the parents made for it, if this command created them and they
    hold only Hydra's files (in `output_subdir`) and an empty `log_name`; True if it did.
    made_by_hydra: run_dir alone is known to be new (a sweep job's folder, made by Hydra
    in this process), its parents are not.

    Best effort: a folder that cannot be removed is left as it is (the refusal the user
    reads matters more), and a parent that gained other entries meanwhile stays.
    """
    folder = Path(os.path.abspath(run_dir))
    made = [folder] if made_by_hydra else _NEW.get(folder)
    if not made or not made[0].is_dir() or not _as_hydra_left_it(made[0], output_subdir, log_name):
        return False
    hydra = made[0] / output_subdir if output_subdir else None
    try:
        (made[0] / log_name).unlink(missing_ok=True)
        if hydra is not None and hydra.exists():
            for name in HYDRA_FILES:
                (hydra / name).unlink(missing_ok=True)
            hydra.rmdir()
        made[0].rmdir()
    except OSError:
        return False
    for parent in made[1:]:
        try:
            parent.rmdir()
        except OSError:  # not empty: something else arrived meanwhile, so it stays
            break
    return True


def _as_hydra_left_it(run_dir: Path, output_subdir: str | None, log_name: str) -> bool:
    """Nothing in run_dir but Hydra's own files and an empty log (no results, no lock)."""
    entries = {p.name: p for p in run_dir.iterdir()}
    log = entries.pop(log_name, None)
    if log is not None and (log.is_symlink() or not log.is_file() or log.stat().st_size):
        return False
    hydra = entries.pop(output_subdir, None) if output_subdir else None
    if entries:  # anything else: a result, an upload lock, another subfolder
        return False
    return hydra is None or _only_hydra_files(hydra)


def _only_hydra_files(folder: Path) -> bool:
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(
        p.name in HYDRA_FILES and p.is_file() and not p.is_symlink() for p in folder.iterdir()
    )
