"""How a run is named: its kind, its mode label, and the overrides that tell it apart.

One place for the names a run gets: its folder (conf/config.yaml's `${job_kind:...}`,
a resolver cli.py registers), its MLflow run name and `mode` tag, the terminal
summary, the comparison tables and the lines a sweep's report gives the jobs that
have no row. Plain functions of the config or results.json: no Hydra, no MLflow, so
an upload names a run without importing either.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from runner.masking import is_secret_key

# Overrides a run's name leaves out because its first part says them already
# (`jax-graph-apply-float32`) ...
RUN_NAMED = ("backend", "mode", "mode.update", "dtype", "task")
# ... and those, by their root key, about where and how it is recorded rather than
# what it computes.
NOT_COMPUTED = ("progress", "tracking", "hydra", "experiment", "hparams_search")
RUN_NAME_LIMIT = 250  # MLflow's UI shows less; its store takes more


def job_kind(task: str | None, mode: str) -> str:
    """What a run did, for its folder and MLflow names: its mode, or the task where the
    mode does not apply (task=derivatives runs no optimizer)."""
    return "derivatives" if task == "derivatives" else mode


def config_kind(cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """(job_kind, the graph mode's update or None) of a resolved config."""
    mode = cfg.get("mode") or {}
    kind = job_kind(cfg.get("task"), mode.get("name", ""))
    return kind, (mode.get("update") if kind == "graph" else None)


def mode_label(mode: str, update: str | None) -> str:
    """`graph/apply` for graph mode with its update, the mode alone otherwise: the MLflow
    `mode` tag, the comparison tables' mode column and the terminal summary."""
    return f"{mode}/{update}" if update else f"{mode}"


def shown_overrides(overrides: Iterable[str], named: Collection[str] = RUN_NAMED) -> list[str]:
    """The overrides that tell a run from its siblings, in their order: all but those the
    name says already (`named`: keys such as `mode.update`), those about where and how it
    is recorded (NOT_COMPUTED, by root key: `tracking.uri`, `hydra/launcher`) and those
    whose key looks like it holds a secret."""

    def shown(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        root = key.split(".", 1)[0].split("/", 1)[0]
        return key not in named and root not in NOT_COMPUTED and not is_secret_key(key)

    # `++key=value` as key=value: what the run computed with (runner.precheck gives a
    # setting every swept choice has so)
    return [o.removeprefix("++") for o in overrides if shown(o)]


def run_name(cfg: Mapping[str, Any], overrides: Iterable[str] = ()) -> str:
    """`jax-graph-apply-float32`, then the overrides that tell this run from its
    siblings (`optimizer.lr=0.0443 steps=20`): a sweep's jobs, or an Optuna search's
    trials, would otherwise share one name in MLflow's run list."""
    kind, update = config_kind(cfg)
    parts = [cfg["backend"]["name"], kind, *([update] if update else []), str(cfg.get("dtype"))]
    return " ".join(["-".join(parts), *shown_overrides(overrides)])[:RUN_NAME_LIMIT]
