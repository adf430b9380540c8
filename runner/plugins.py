"""Finds backends through Python entry points and imports only the one a run uses.

Listing entry points reads package metadata and imports nothing, so `backend=jax`
never pays TensorFlow's import; a third party adds a backend by installing a
package that declares an entry point in BACKEND_GROUP.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from runner.errors import ConfigError, MissingFrameworkError, installed_choices
from runner.protocol import Backend

BACKEND_GROUP = "gradient_runner.backends"
BUILTIN_EXTRAS = {"tf": "tf", "torch": "torch", "jax": "jax"}


def backend_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=BACKEND_GROUP)}


def load_backend(name: str) -> Backend:
    """Import and instantiate the backend registered as `name`."""
    found = backend_entry_points()
    if name not in found:
        choices = installed_choices(found)
        raise ConfigError(f"backend={name!r} is not installed; choose one of: {choices}")
    try:
        cls = found[name].load()
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
    return cls()
