"""Finds backends through Python entry points and imports only the one a run uses.

Listing entry points reads package metadata and imports nothing, so `backend=jax`
never pays TensorFlow's import; a third party adds a backend by installing a
package that declares an entry point in BACKEND_GROUP.
"""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points
from importlib.util import find_spec
from typing import Any

from runner.errors import (
    ConfigError,
    MissingFrameworkError,
    PluginError,
    RunnerError,
    describe,
    installed_choices,
)
from runner.protocol import Backend

BACKEND_GROUP = "gradient_runner.backends"
BUILTIN_EXTRAS = {"tf": "tf", "torch": "torch", "jax": "jax"}


def importable(module: str) -> bool:
    """Whether `module` is installed, without importing it. find_spec of a submodule
    imports its parent and raises where that is missing: `hydra_plugins`, a namespace
    only the [sweeps] extra's packages create, is absent from an install without it."""
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def backend_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=BACKEND_GROUP)}


def load_backend(name: str) -> Backend:
    """Import and instantiate the backend registered as `name`.

    A plugin that cannot be imported or built, or that lacks part of the protocol, is
    a PluginError naming it (the installation is wrong), raised before the run starts.
    """
    entry_point = sole_entry_point(BACKEND_GROUP, "backend", name)
    if entry_point is None:
        choices = installed_choices(backend_entry_points())
        raise ConfigError(f"backend={name!r} is not installed; choose one of: {choices}")
    try:
        backend = entry_point.load()()
    except ModuleNotFoundError as exc:
        extra = BUILTIN_EXTRAS.get(name)
        how = (
            f"pip install 'gradient-runner[{extra}]'"
            if extra
            else f"install the package that provides '{exc.name}'"
        )
        raise MissingFrameworkError(
            f"backend={name} needs the module '{exc.name}', which is not installed; {how}"
        ) from exc
    except RunnerError:  # the plugin's own words for the user
        raise
    except Exception as exc:  # SyntaxError, ImportError, a class the module lacks, ...
        raise load_failure("backend", name, entry_point, exc) from exc
    missing = missing_members(backend, Backend)
    if missing:
        raise PluginError(
            f"backend={name}: its plugin '{entry_point.value}' lacks {', '.join(missing)}, "
            f"which runner.protocol.Backend requires (all: {', '.join(members(Backend))})"
        )
    return backend


def sole_entry_point(group: str, kind: str, name: str) -> EntryPoint | None:
    """The one plugin installed as `name`, None where none is. Two packages claiming one
    name were read in sys.path order, one winning silently, its runs recorded under the
    name as if they were the other's."""
    claims = {ep.value: ep for ep in entry_points(group=group, name=name)}
    if len(claims) > 1:
        who = ", ".join(
            f"'{value}' ({ep.dist.name if ep.dist else '?'})"
            for value, ep in sorted(claims.items())
        )
        raise PluginError(
            f"{kind}={name} is installed by {len(claims)} packages: {who}; uninstall all but one"
        )
    return next(iter(claims.values()), None)


def load_failure(group: str, name: str, entry_point: EntryPoint, exc: Exception) -> PluginError:
    """The one line for a plugin whose import (or construction) raised `exc`."""
    return PluginError(
        f"{group}={name}: its plugin '{entry_point.value}' failed to load: {describe(exc)}"
    )


def members(protocol: type) -> list[str]:
    """What a Protocol class declares, in its order: attributes (annotated, or properties
    such as Problem.dim and Problem.coefficients) as `name`, methods as `name()` (read
    from the class, so a member added to the protocol is required too)."""
    own = {n: v for n, v in vars(protocol).items() if not n.startswith("_")}
    attributes = [a for a in inspect.get_annotations(protocol) if not a.startswith("_")]
    attributes += [n for n, v in own.items() if isinstance(v, property)]
    methods = [f"{n}()" for n, v in own.items() if callable(v)]
    return attributes + methods


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of `protocol` that `obj` (an instance) lacks (a method must be callable)."""
    missing = []
    for member in members(protocol):
        value = getattr(obj, member.removesuffix("()"), _ABSENT)
        if value is _ABSENT or (member.endswith("()") and not callable(value)):
            missing.append(member)
    return missing


_ABSENT = object()
