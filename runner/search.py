"""A hyperparameter search (`+hparams_search=...`) that found no best trial ends as a sweep.

Optuna's sweeper asks its study for the best trial once the trials have run; when none
completed (every trial skipped or failed: runner.cli gives those no loss, so that they
cannot be picked as best) the study raises, and the command used to end in a traceback,
before Hydra's on_multirun_end made the sweep's report, closed its MLflow parent run and
set its exit code. runner.search_sweeper catches that case and notes it here; the
command says it in one line after the report, and exits non-zero (main, runner.cli).

Nothing here imports Optuna: the CLI reads this module on every command.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from runner.plugins import importable
from runner.results import JOB_FAILURE_FILE, RESULTS_FILE
from runner.summary import plural

# Hydra builds a sweeper only from a class of the hydra_plugins namespace (the target of
# the `hydra/sweeper=optuna` config register_sweeper stores); runner.search_sweeper's
# class claims this module name and register_sweeper registers it under it.
PLUGIN_MODULE = "hydra_plugins.gradient_runner"
RESULTS_NAME = "optimization_results.yaml"  # Optuna's sweeper writes the best trial here
NO_BEST_EXIT = 2  # as for a single run refused: the search produced nothing to use
OUTCOMES = ("skipped", "failed", "without a loss")  # a trial with no loss: why, as said

_no_best: list[str] = []  # this command's search found no best trial: why, in one line


def register_sweeper() -> None:
    """Make runner.search_sweeper's class instantiable by Hydra, and the sweeper that
    `hydra/sweeper=optuna` chooses, where Optuna's sweeper is installed (the [sweeps]
    extra): Hydra's documented way to search with Optuna gets the same ending as
    `+hparams_search`.

    Hydra finds plugins by scanning the hydra_plugins namespace with pkgutil, which cannot
    list the packages of an editable install (setuptools' import hooks; hydra#3252), so
    the class is registered by hand (Plugins.register, Hydra's API for it), and its
    module is importable under the name it claims, whence Hydra imports the class: this
    works however the project is installed. Workers of a parallel sweep rescan, without
    it; they never build the sweeper."""
    if not importable("hydra_plugins.hydra_optuna_sweeper"):
        return
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

    from runner import search_sweeper

    sys.modules.setdefault(PLUGIN_MODULE, search_sweeper)
    Plugins.instance().register(search_sweeper.OptunaSearch)
    # Optuna's own config, stored again with this class as its target (Optuna's sweeper
    # stored it as its module was imported, once, by now: this one stays)
    ConfigStore.instance().store(
        group="hydra/sweeper",
        name="optuna",
        node=OptunaSweeperConf(_target_=f"{PLUGIN_MODULE}.{search_sweeper.OptunaSearch.__name__}"),
        provider="gradient_runner",
    )


def note_no_best(job_dirs: Iterable[Path], sweep_dir: Path) -> None:
    """The search ran its trials (their folders, in order) and none completed: keep why."""
    outcomes = Counter(_outcome(folder) for folder in job_dirs)
    total = sum(outcomes.values())
    counts = ", ".join(f"{outcomes[word]} {word}" for word in OUTCOMES if outcomes[word])
    _no_best.append(
        f"the search has no best trial: none of its {plural(total, 'trial')} finished with a loss "
        f"({counts}); no {sweep_dir / RESULTS_NAME} is written; the lines above say why"
    )


def end_search(code: int | str | None) -> int | str | None:
    """The command's exit code, once the sweep has ended (its report printed, its
    MLflow parent closed): a search with no best trial says so in one line, last, and
    exits non-zero; with the sweep's own code where it has one (2 when trials failed)."""
    if not _no_best:
        return code
    print(f"error: {_no_best[-1]}", file=sys.stderr, flush=True)
    return code or NO_BEST_EXIT


def _outcome(folder: Path) -> str:
    """Why a trial has no loss, from what its job left in its folder (runner.cli)."""
    if (folder / JOB_FAILURE_FILE).exists():
        return "failed"
    try:
        result = json.loads((folder / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return "failed"  # it stopped before it could record why
    if isinstance(result, dict) and result.get("status") == "skipped":
        return "skipped"
    return "without a loss"  # it ran, but its task has no loss to minimize
