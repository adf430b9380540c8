"""Turns Hydra's config into validated, typed run settings, with one-line errors.

Hydra accepts any value an override spells (`steps=abc` is a string); this is the
single place that says what each setting allows, so every entry point (CLI,
sweeps, tests) rejects bad input the same way before a framework is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from runner.errors import ConfigError, flag, not_allowed, setting, whole_number
from runner.optimizers import validate_hyper
from runner.problem_limits import check_in_dtype, check_optimizer_in_dtype
from runner.problems import Problem, build_problem
from runner.protocol import (
    DTYPES,
    EAGER_MODES,
    GRAPH_UPDATES,
    MODES,
    DerivativesSpec,
    MinimizeSpec,
    OptimizerSpec,
    RecordPlan,
)


def config_dir() -> Path:
    """conf/ beside the package in a checkout; runner/conf inside an installed wheel."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


CONFIG_DIR = config_dir()
TASKS = ("minimize", "derivatives")
# Settings of an optimization: task=derivatives evaluates dy/dx and d2y/dx2 at x0 and
# runs no optimizer, so these would change nothing in its results
# (refused on its command line, left out of its MLflow params).
MINIMIZE_ONLY = ("mode", "optimizer", "steps", "record_every")
DEVICES = ("cpu", "gpu", "auto")
# Other names users give a device: PyTorch's and JAX's own name for an NVIDIA GPU.
DEVICE_ALIASES = {"cuda": "gpu"}
MAX_RECORDED_ROWS = 10_000


@dataclass(frozen=True)
class RunConfig:
    """A run's settings; its task is whichever spec is set (minimize or derivatives)."""

    backend: str
    device: str
    progress: bool
    minimize: MinimizeSpec | None = None
    derivatives: DerivativesSpec | None = None
    # Why the run cannot be what it asks, though each setting is valid: skipped in a
    # sweep (its report lists the hole), refused before the backend loads in a single run.
    unsupported: str | None = None
    # device as the command typed it: a backend knows cpu, gpu and auto, not their
    # aliases, and its refusal of device=gpu would name a value nobody typed (job.py).
    device_typed: str | None = None


def build_run_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Validate a resolved config (plain dicts) and build the spec for its task."""
    task = _choice("task", cfg.get("task"), TASKS)
    dtype = _choice("dtype", cfg.get("dtype"), DTYPES)
    typed = cfg.get("device")
    device = DEVICE_ALIASES.get(typed, typed) if isinstance(typed, str) else typed
    device = _choice("device", device, DEVICES)
    backend = _node("backend", cfg)
    problem = build_problem(_node("problem", cfg))
    check_in_dtype(problem, dtype, minimize=task == "minimize")
    common = {
        "backend": str(backend.get("name")),
        "device": device,
        "device_typed": typed,
        "progress": flag("progress", cfg.get("progress", True)),
    }
    if task == "derivatives":
        # each says only what the command set: problem=rosenbrock has a dim no one gave
        scalar = "task=derivatives evaluates the notebook's scalar problem=quadratic"
        if problem.name != "quadratic":
            raise ConfigError(f"{scalar}, not problem={problem.name}; choose problem=quadratic")
        if problem.dim is not None:
            raise ConfigError(
                f"{scalar}, not a vector (problem.dim={problem.dim}); drop problem.dim"
            )
        return RunConfig(**common, derivatives=DerivativesSpec(problem, dtype, device))
    spec = _minimize_spec(cfg, backend, problem, dtype, device)
    return RunConfig(**common, minimize=spec, unsupported=_eager_update(_node("mode", cfg)))


def _eager_update(mode: Mapping[str, Any]) -> str | None:
    """An eager mode's update is the mode itself (conf/mode/<name>.yaml says so), so that
    `-m mode=manual,graph mode.update=manual` is a sweep: mode.update reaches every job,
    and an eager job whose mode is another update (mode=apply mode.update=manual, from
    `mode=manual,apply,minimize,graph mode.update=apply,minimize,manual`) is skipped, not
    a second copy of the same run."""
    name = mode.get("name")
    asked = mode.get("update", name)
    if name == "graph" or asked == name:
        return None
    _choice("mode.update", asked, GRAPH_UPDATES)
    other = f", or mode={asked}" if asked in EAGER_MODES else ""
    return (  # the same words for every eager mode: a sweep's report lists them as one
        f"mode.update={asked} is a setting of mode=graph (an eager mode is its own update); "
        f"choose mode=graph mode.update={asked}{other}"
    )


def _minimize_spec(
    cfg: Mapping[str, Any], backend: Mapping[str, Any], problem: Problem, dtype: str, device: str
) -> MinimizeSpec:
    steps = whole_number("steps", cfg.get("steps"))
    every = cfg.get("record_every")
    every = default_record_every(steps) if every is None else whole_number("record_every", every)
    mode = _node("mode", cfg)
    mode_name = _choice("mode", mode.get("name"), MODES)
    update = mode.get("update", "apply")
    if mode_name == "graph":
        update = _choice("mode.update", update, GRAPH_UPDATES)
    optimizer = _optimizer(_node("optimizer", cfg))
    check_optimizer_in_dtype(optimizer, dtype)
    return MinimizeSpec(
        problem=problem,
        optimizer=optimizer,
        mode=mode_name,
        steps=steps,
        dtype=dtype,
        record=RecordPlan(steps, every),
        update=update,
        device=device,
        options=_backend_options(backend),
    )


def _backend_options(backend: Mapping[str, Any]) -> dict[str, Any]:
    """The backend's options; a switch (true/false in its conf/backend yaml) must be one.

    Checked here, before any run, so that `backend.jit_compile=yes` is refused like any
    other bad input; what else an option allows, its backend checks (`unsupported`).
    """
    options = {k: v for k, v in backend.items() if k != "name"}
    defaults = backend_defaults(str(backend.get("name")))
    for key, value in options.items():
        if isinstance(defaults.get(key), bool) and not isinstance(value, bool):
            raise ConfigError(not_allowed(f"backend.{key}", value, ("true", "false")))
    return options


@cache
def backend_defaults(name: str) -> dict[str, Any]:
    """The options conf/backend/<name>.yaml sets (name aside), as Hydra reads them; {} for a
    plugin backend without a yaml. The comparison report names a run's backend by the
    options that differ from these, so runs at the defaults keep the plain name."""
    path = CONFIG_DIR / "backend" / f"{name}.yaml"
    if Path(name).name != name or not path.is_file():  # a tag read back is any text
        return {}
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(node, dict):
        return {}
    return {str(k): v for k, v in node.items() if k not in ("name", "defaults")}


def default_record_every(steps: int) -> int:
    """Every step up to MAX_RECORDED_ROWS steps, then thinned to at most that many rows."""
    return max(1, -(-steps // MAX_RECORDED_ROWS))


def _optimizer(node: Mapping[str, Any]) -> OptimizerSpec:
    """The optimizer in the shared vocabulary, checked; framework defaults stay None."""
    values = dict(node)
    name = values.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("optimizer.name is missing; choose an optimizer, e.g. optimizer=sgd")
    lr = positive_float("optimizer.lr", values.pop("lr", None))
    return OptimizerSpec(name=name, lr=lr, hyper=validate_hyper(name, values))


def positive_float(key: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{setting(key, value)} is not allowed; give a finite number > 0")
    return float(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(not_allowed(key, value, allowed))
    return value


def _node(key: str, cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    node = cfg.get(key)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key}={node!r} is not a config group choice; pick one, e.g. {key}=...")
    return node
