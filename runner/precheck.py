"""The checks `python -m runner` makes on its command line before Hydra starts.

Hydra reports an unknown config-group option as a page of search paths, a launcher or
sweeper from a missing extra as a failed import, and a run folder it cannot create as a
traceback; each is checked here first, so the user reads one line (a RunnerError)
naming what is allowed, before any job, run folder or MLflow run exists. Apart from
runner.cli, which runs what Hydra composes.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from runner.command_line import unwritable
from runner.config import CONFIG_DIR, MINIMIZE_ONLY, TASKS
from runner.errors import RunnerError, setting, text_lines
from runner.plugins import backend_entry_points, importable
from runner.problems import problem_classes

CHECKED_GROUPS = ("backend", "mode", "problem", "optimizer", "tracking")


def group_options(group: str) -> list[str]:
    options = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    installed = PLUGIN_GROUPS[group][0]() if group in PLUGIN_GROUPS else {}
    return sorted(options | set(installed))


def check_group_choices(args: list[str]) -> None:
    """Reject `backend=foo` (and comma-separated sweep lists) before Hydra starts."""
    for arg in args:
        match = re.fullmatch(r"(\w+)=([\w,\-]+)", arg)
        if not match or match.group(1) not in CHECKED_GROUPS:
            continue
        group, values = match.groups()
        options = group_options(group)
        for value in values.split(","):
            if value not in options:
                raise not_a_choice(f"{group}={value}", group, options)


def not_a_choice(typed: str, group: str, options: list[str]) -> RunnerError:
    """The one wording for a config group choice that does not exist."""
    return RunnerError(
        f"{typed} is not {_a(group)} {group} choice; choose one of: {', '.join(options)}"
    )


# The settings of conf/config.yaml no run goes without (progress has a default in the
# code, record_every may be null).
REQUIRED_SETTINGS = ("steps", "dtype", "device")


def check_deleted_groups(args: list[str]) -> None:
    """`~backend` (or `~backend=tf`, `~backend.name`, `~steps`) leaves the run without
    what every run needs: the run folder's name interpolates backend.name, mode.name and
    task (Hydra's traceback), a run without an optimizer or problem was refused without
    naming the choices, and one without steps as `steps=null`, a value nobody typed."""
    for arg in args:
        key = deleted_key(arg) or ""
        group = key.removesuffix(".name") if options_with(key) else key
        if group in (*CHECKED_GROUPS, "task"):
            options = group_options(group) if group in CHECKED_GROUPS else list(TASKS)
            needed, instead = f"{_a(group)} {group}", f"choose one of: {', '.join(options)}"
        elif key in REQUIRED_SETTINGS:
            default = _base_config()[key]
            needed, instead = key, f"drop {arg} to run with {key}={default} (the default)"
        else:
            continue
        raise RunnerError(
            f"{arg} leaves the run without {needed}, which every run needs; {instead}"
        )


def deleted_key(arg: str) -> str | None:
    """The key `~key` or `~key=value` deletes; None for any other argument."""
    match = re.fullmatch(r"~([\w.]+)(=.*)?", arg)
    return match.group(1) if match else None


def _a(word: str) -> str:
    """The article before `word`: an optimizer, a backend."""
    return "an" if word[0] in "aeiou" else "a"


SLURM_LAUNCHERS = ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm")
# Hydra plugins behind the [sweeps] extra, by the override that selects them.
SWEEP_PLUGINS = {
    "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=parallel": "hydra_plugins.hydra_joblib_launcher",
    "+experiment=matrix_parallel": "hydra_plugins.hydra_joblib_launcher",  # the preset's
    "hydra/launcher=submitit_local": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=submitit_slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=local": "hydra_plugins.hydra_submitit_launcher",
    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher",
    "hydra/sweeper=optuna": "hydra_plugins.hydra_optuna_sweeper",
    "+hparams_search=lr": "hydra_plugins.hydra_optuna_sweeper",
}


def check_sweep_plugins(args: list[str]) -> None:
    """A launcher or sweeper from a missing extra: name the extra, not Hydra's search path."""
    for arg in args:
        module = SWEEP_PLUGINS.get(arg)
        if module and not importable(module):
            raise RunnerError(
                f"{arg} needs the Hydra plugin '{module.split('.')[-1]}', which is not "
                "installed; pip install 'gradient-runner[sweeps]'"
            )
        # submitit would fail deep in the sweep, after its parent run was opened
        if arg in SLURM_LAUNCHERS and shutil.which("srun") is None:
            raise RunnerError(
                f"{arg} submits to a SLURM cluster, and this machine has no srun; "
                "use hydra/launcher=local or hydra/launcher=parallel here"
            )


def check_overrides(args: list[str]) -> None:
    """Compose the config once with the plain overrides: Hydra's errors become one line.

    Sweep lists are left to Hydra; this catches the common slips (a misspelt key, a value
    of the wrong shape, an unknown choice of any group, Hydra's own included, an
    interpolation that cannot resolve) before any job starts.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [a for a in args if "=" in a and not a.startswith("-") and "," not in a]
    plain = [a for a in plain if "(" not in a.split("=", 1)[1]]
    # `~optimizer` has no "=": a deletion is a setting of the task too
    check_task_settings([*plain, *(a for a in args if a.startswith("~") and "=" not in a)])
    check_deleted_groups(args)
    swept = swept_choices(args)
    # a setting swept too (optimizer.momentum=0.5,0.9) counts: Hydra composes each value
    check_swept_settings([a for a in args if "=" in a and not a.startswith(("-", "hydra"))], swept)
    # each swept group at its first choice (all have the settings given, checked above):
    # at the group's default, `-m optimizer=adam,rmsprop optimizer.beta1=0.8` was told to
    # choose optimizer=adam
    chosen = [f"{group}={values[0]}" for group, values in swept.items()]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*chosen, *plain])
    except (HydraException, OmegaConfBaseException) as exc:
        raise composition_error(exc, plain) from None
    check_interpolations(cfg, plain)
    check_deleted_settings(cfg, args)


def check_deleted_settings(cfg: Any, args: list[str]) -> None:
    """`~key` of a key the composed config lacks, or holds as null, is refused in one line.

    Hydra deletes only a value: it ended such a run in its two-line 'Could not delete from
    config' error (`~record_every`, null by default; `~tracking.name`, never a setting).
    Hydra's own keys and the groups (check_deleted_groups) are left to it."""
    absent = object()
    for arg in args:
        key = deleted_key(arg)
        if key is None or key.startswith("hydra"):
            continue
        value = OmegaConf.select(cfg, key, default=absent)
        if value is None:
            raise RunnerError(
                f"{arg}: {key} is null already, so there is nothing to delete; drop {arg}"
            )
        if value is absent:
            owners = options_with(key)
            where = (
                f"a setting of {' and '.join(owners)} only, which this run does not choose"
                if owners
                else "not a setting of this config (misspelt?)"
            )
            raise RunnerError(f"{arg}: {key} is {where}; drop {arg}")


def composition_error(exc: Exception, plain: list[str]) -> RunnerError:
    """Hydra's composition error as one line naming what is allowed, where it can tell."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError

    lines = text_lines(str(exc)) or [str(exc)]
    if isinstance(exc, MissingConfigException) and exc.options:
        # `mode=`, `+experiment=bogus`, `hydra/launcher=bogus`, as typed (a choice that a
        # preset's defaults name, e.g. a launcher of a missing plugin, is not the user's)
        group, _, value = (exc.missing_cfg_file or "").rpartition("/")
        typed = next((a for a in plain if a.lstrip("+") == f"{group}={value}"), None)
        if typed:
            return not_a_choice(typed if value else f"{typed}''", group, exc.options)
    unlisted = re.match(r"Could not override '(\w+)'\. No match in the defaults list", lines[0])
    typed = next((a for a in plain if unlisted and a.startswith(f"{unlisted.group(1)}=")), None)
    if unlisted and typed:  # `experiment=matrix`: a group the defaults choose nothing of
        group = unlisted.group(1)
        return RunnerError(
            f"{typed} overrides {_a(group)} {group} the config does not choose; "
            f"add one with +{typed}"
        )
    missing = re.match(r"Could not override '([^']+)'", lines[0])
    key, cause = missing.group(1) if missing else "", exc.__cause__
    if missing and "not in struct" in str(cause):
        owners = options_with(key)
        if owners:  # a real setting of another choice: +key would be silently ignored
            return RunnerError(
                f"{key} is a setting of {' and '.join(owners)} only; choose {owners[0]} to use it"
            )
        return RunnerError(
            f"{key} is not a setting of this config (misspelt?); "
            f"to add a new key on purpose, write +{key}=..."
        )
    node_type = getattr(cause, "object_type", None)
    if missing and isinstance(cause, ConfigAttributeError) and dataclasses.is_dataclass(node_type):
        # Hydra's own nodes (hydra.launcher.n_job=2) are typed: +key would not add one
        names = sorted(f.name for f in dataclasses.fields(node_type) if f.name[0] != "_")
        parent = key.rpartition(".")[0]
        allowed = f"choose one of: {', '.join(names)}" if names else f"{parent} has none here"
        return RunnerError(f"{key} is not a setting of {parent} (misspelt?); {allowed}")
    # e.g. a value Hydra's typed nodes cannot hold (hydra.job.chdir=maybe): the reason follows
    cause_lines = text_lines(str(cause)) if cause else []
    return RunnerError(": ".join([lines[0].rstrip("."), *cause_lines[:1]]))


def check_interpolations(cfg: Any, plain: list[str]) -> None:
    """A value given as an interpolation must resolve: `steps=${oc.env:NOPE}` failed only
    as the run resolved its config, reported as the backend's failure (exit 1). Hydra's
    own values (`${hydra:...}`, `${hydra.run.dir}`) are set only as the job starts: left."""
    from omegaconf.errors import OmegaConfBaseException

    for arg in plain:
        key, value = arg.split("=", 1)
        key = key.lstrip("+")
        if "${" not in value or "hydra" in value or key.startswith(("~", "hydra")):
            continue
        try:
            node = OmegaConf.select(cfg, key)
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as exc:
            reason = (text_lines(str(exc)) or [type(exc).__name__])[0]
            reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", reason).strip('"')
            raise RunnerError(
                f"{setting(key, value)} cannot be resolved: {reason}; "
                f"give {key} a value, or an interpolation that resolves"
            ) from None


def swept_choices(args: list[str]) -> dict[str, list[str]]:
    """The config groups a sweep lists choices of (`optimizer=adam,rmsprop`), in order."""
    swept = {}
    for arg in args:
        match = re.fullmatch(r"(\w+)=([\w\-]+(?:,[\w\-]+)+)", arg)
        if match and match.group(1) in CHECKED_GROUPS:
            swept[match.group(1)] = match.group(2).split(",")
    return swept


def check_swept_settings(settings: list[str], swept: Mapping[str, list[str]]) -> None:
    """A setting that some of a sweep's choices lack (`-m optimizer=adam,rmsprop
    optimizer.momentum=0`: Adam has none) is refused in one line, before any job: Hydra
    cannot compose those jobs, and ended the whole sweep in its own multi-line error,
    exit 1, with an empty sweep folder left behind and no job run."""
    for arg in settings:
        group, dot, setting = arg.split("=", 1)[0].partition(".")
        if not dot or group not in swept or "." in setting:
            continue
        having: list[str] = []
        lacking: list[str] = []
        for value in swept[group]:
            known = option_settings(group, value)  # None: unknown here, not judged
            if known is not None:
                (having if setting in known else lacking).append(value)
        if not lacking:
            continue
        key = f"{group}.{setting}"
        owners = options_with(key) or [f"{group}={v}" for v in having]
        if not owners:
            continue  # no choice has it (misspelt?): the composition below says so
        fix = (
            f"sweep {group}={','.join(having)} with it and {group}={','.join(lacking)} without it"
            if having
            else f"drop {key} or choose {owners[0]}"
        )
        raise RunnerError(
            f"{key} is a setting of {' and '.join(owners)} only, not of {group}={lacking[0]}, "
            f"which this sweep runs; {fix}"
        )


def set_in_every_swept_choice(args: list[str]) -> list[str]:
    """args, with a setting that every swept choice of its group has and the group's
    default lacks given as `++group.key=value`.

    Hydra composes a sweep's base config at the group's default, before any job: `-m
    optimizer=adagrad,rmsprop optimizer.eps=1e-3` failed in Hydra's multi-line error
    (SGD has no eps), though every job it names has one. `++` sets the key where it
    exists and adds it where it does not; each job's config is the same as with the
    plain override, which its name shows (runner.naming)."""
    if not {"-m", "--multirun"} & set(args):
        return args
    swept = swept_choices(args)
    defaults = _default_choices()
    given = []
    for arg in args:
        group, dot, setting = arg.split("=", 1)[0].partition(".")
        if dot and group in swept and group in defaults and "." not in setting:
            choices = [option_settings(group, value) for value in swept[group]]
            in_default = option_settings(group, defaults[group]) or {setting}
            if setting not in in_default and all(c and setting in c for c in choices):
                arg = f"++{arg}"
        given.append(arg)
    return given


def _default_choices() -> dict[str, str]:
    """conf/config.yaml's defaults list as {group: option}."""
    defaults = _base_config().get("defaults", [])
    return {k: str(v) for item in defaults if isinstance(item, Mapping) for k, v in item.items()}


def _base_config() -> Any:
    """conf/config.yaml as written: its defaults list and settings, unresolved."""
    return OmegaConf.load(CONFIG_DIR / "config.yaml")


def option_settings(group: str, value: str) -> set[str] | None:
    """The settings a config group option has (its yaml's keys, a plugin's fields);
    None where they cannot be read here (a plugin that fails to load: said elsewhere)."""
    path = CONFIG_DIR / group / f"{value}.yaml"
    if path.is_file():
        return set(OmegaConf.load(path))
    entries, settings = PLUGIN_GROUPS.get(group, (dict, lambda _entry: {}))
    entry = entries().get(value)
    if entry is None:
        return None
    try:
        return {"name", *settings(entry)}
    except Exception:
        return None


def check_task_settings(plain: list[str]) -> None:
    """`task=derivatives mode=graph` is refused: the mode would be recorded, not used."""
    if "task=derivatives" not in plain:
        return
    for arg in plain:
        root = re.split(r"[./]", arg.split("=", 1)[0].lstrip("+~"), maxsplit=1)[0]
        if root in MINIMIZE_ONLY:
            raise RunnerError(
                f"{arg} does not apply to task=derivatives, which runs no optimizer "
                f"(it evaluates the derivatives at problem.x0, eagerly and compiled); drop {arg}"
            )


def options_with(key: str) -> list[str]:
    """The shipped config group options that have `key` ('mode.update' -> ['mode=graph'])."""
    group, _, setting = key.partition(".")
    if not setting or "." in setting:
        return []
    stems = sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))
    return [f"{group}={stem}" for stem in stems if setting in (option_settings(group, stem) or ())]


def problem_defaults(entry_point: Any) -> dict[str, Any]:
    """A problem plugin's settings (its dataclass fields) with their defaults."""
    return {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(entry_point.load())
        if f.default is not dataclasses.MISSING
    }


# Config groups whose options installed plugins add: group -> ({name: entry point}, the
# settings of an option's config node). A backend's options reach it as +backend.<key>.
PLUGIN_GROUPS: dict[str, tuple[Callable[[], Mapping[str, Any]], Callable[[Any], dict]]] = {
    "backend": (backend_entry_points, lambda _entry_point: {}),
    "problem": (problem_classes, problem_defaults),
}


def check_output_dir(args: list[str]) -> None:
    """A run folder that cannot be written is named in one line, before Hydra starts.

    Hydra would create it itself and print a traceback; this checks the folder the
    command line names (or outputs/), without creating anything: its nearest existing
    parent must be a folder this process can write in.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return  # --help, --cfg, --info ...: Hydra writes no run folder
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    given = next((a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")), None)
    value = given or "outputs"
    static = value.split("${", 1)[0]
    path = Path(static if "${" not in value else static.rpartition("/")[0] or ".")
    problem = unwritable(path)
    if problem:
        setting = f"{key}={value}" if given else f"the run folder {path.absolute()}"
        raise RunnerError(
            f"{setting} cannot be written: {problem}; set {key}= to a folder you can write"
        )
