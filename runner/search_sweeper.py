"""The sweeper of `+hparams_search=...` and `hydra/sweeper=optuna`: Optuna's, except
when no trial completed, and writing the sweep's multirun.yaml as Hydra's own does.

Optuna's sweeper runs the trials, then reads its study's best trial, which raises when
none completed (`No trials are completed yet`): skipped and failed trials return no loss
(runner.cli), and Optuna counts them as failed trials, not as losses a best lr could be
picked from. Everything else is Optuna's own: its sampling, its
optimization_results.yaml whenever a trial completed, its max_failure_rate (which stops
a search only on a job that raised: the runner's jobs end by returning, their failures
said in their own lines). Only that last error becomes the
search's result, noted for the command's end (runner.search), so that Hydra goes on to
on_multirun_end: the report, the MLflow parent run closed, the exit code.

Imports Optuna's sweeper: read only where the [sweeps] extra is installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from runner.search import PLUGIN_MODULE, note_no_best

# Optuna's sweeper's words for a trial that returned None (a skipped or failed job)
NO_VALUE = "must be float-castable. Got 'None'"
SWEEPER_LOGGER = "hydra_plugins.hydra_optuna_sweeper._impl"  # named, not imported: Optuna


class OptunaSearch(OptunaSweeper):
    """Optuna's sweeper; a search none of whose trials completed ends like a sweep."""

    # Hydra instantiates only plugins named in the hydra_plugins namespace: the class
    # is registered under this name (runner.search.register_sweeper), which the
    # `hydra/sweeper=optuna` config it stores gives as hydra.sweeper._target_.
    __module__ = PLUGIN_MODULE

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        logging.getLogger(SWEEPER_LOGGER).addFilter(_said_by_the_job)
        # Optuna's sweeper keeps the trials' returns to itself: they are read on the way
        self.trials = TrialReturns(self.sweeper.launcher)
        self.sweeper.launcher = self.trials

    def sweep(self, arguments: list[str]) -> None:
        # the sweep's config, where Hydra's basic sweeper keeps it: what an upload's parent
        # run is dated by (runner.upload) and a person reads to see what was searched
        sweep_dir = Path(self.sweeper.sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.sweeper.config, sweep_dir / "multirun.yaml")
        try:
            return super().sweep(arguments)
        except ValueError:
            if not self.trials.none_completed(self.sweeper.n_trials):
                raise  # not the study's "no trials are completed": as before
        folders = [Path(r.hydra_cfg.hydra.runtime.output_dir) for r in self.trials.returns]
        note_no_best(folders, Path(self.sweeper.sweep_dir))
        return None


class TrialReturns:
    """The launcher Optuna's sweeper calls, passed through, keeping what each trial returned."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher
        self.returns: list[JobReturn] = []

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.returns.extend(returns)
        return returns

    def __getattr__(self, name: str) -> Any:  # anything else is the launcher's
        return getattr(self.launcher, name)

    def none_completed(self, n_trials: int) -> bool:
        """Every trial ran and none gave Optuna a value: the error after them is the
        study's, having no best trial. A job that raised (its error is re-raised by the
        sweeper) or a trial not run (an error before or during the trials) is not this."""
        if len(self.returns) != n_trials:
            return False
        return all(
            r.status == JobStatus.COMPLETED and not _is_value(r.return_value) for r in self.returns
        )


def _said_by_the_job(record: logging.LogRecord) -> bool:
    """Drop Optuna's sweeper's two lines about a trial that returned no loss ('Failed
    experiment: Return value must be float-castable. Got 'None'.', then 'Failed [...]
    times out of 1 with max_failure_rate=0.0.'): the job said why on its own line
    (skipped: ..., error: ...), and the search goes on, as the second seems to deny."""
    return NO_VALUE not in record.getMessage()


def _is_value(value: Any) -> bool:
    """What Optuna's sweeper takes as a trial's value: anything float() accepts."""
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False
