"""A run or sweep folder that already holds an earlier one's results is refused.

Hydra writes into a folder it is given whatever it holds. With `hydra.run.dir=` or
`hydra.sweep.dir=` set to a folder used before, the new command replaced the earlier
one's files while they were still to be logged (a single run's background upload then
logged the second run's files under the first's run, and the first was in MLflow
nowhere), or mixed its jobs with the earlier sweep's: the report, the exit code and
the sweep's MLflow parent counted the old jobs, and the sweep's logger found the old
`sweep_done.json` and ended before the new jobs had finished, logging none of them.
The default folders are new for every command (microseconds in their names), so only
a folder named on purpose meets this; the check runs in Hydra's on_run_start /
on_multirun_start, before Hydra writes anything into the folder.
"""

from __future__ import annotations

from pathlib import Path

from runner.errors import ConfigError
from runner.follow import DONE_FILE
from runner.results import RECORD_FILES
from runner.sweep_record import SWEEP_FILE

_SWEEP_FILES = (SWEEP_FILE, DONE_FILE)  # what a tracked sweep leaves in its folder


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a single run's folder that holds an earlier run's result or failure."""
    found = [name for name in RECORD_FILES if (run_dir / name).exists()]
    if found:
        raise ConfigError(
            f"hydra.run.dir={run_dir} holds an earlier run ({found[0]}); a run there "
            "would replace its files, logged or not; choose a new folder, or leave "
            "hydra.run.dir unset (a new folder per run)"
        )


def check_new_sweep_dir(sweep_dir: Path) -> None:
    """Refuse a sweep folder that holds an earlier sweep's jobs or its MLflow record."""
    jobs = [job for job in sweep_dir.glob("*") if any((job / n).exists() for n in RECORD_FILES)]
    records = [name for name in _SWEEP_FILES if (sweep_dir / name).exists()]
    if jobs or records:
        what = records[0] if not jobs else f"the results of {len(jobs)} jobs"
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds an earlier sweep ({what}); a sweep there "
            "would mix its jobs with those in its report, exit code and MLflow record; "
            "choose a new folder, or leave hydra.sweep.dir unset (a new folder per sweep)"
        )
