"""Where runs are logged, and whether that store can be used, without importing MLflow.

Addressing: tracking.uri and tracking.experiment as a TrackingTarget (the default
SQLite store, a relative SQLite path anchored to the folder the run started from, the
stores MLflow cannot log to turned away). Probing: check_store, in milliseconds, before
a run (an SQLite file's write lock; a server's /health and experiment lookup, with
MLflow's credentials and TLS settings), and the lock that serializes creating an SQLite
store. Faults: the one-line TrackingError every store fault becomes (store_error), and
retry_locked for a briefly locked SQLite store.

Apart from runner.tracking, which logs runs through MLflow: everything here is plain
Python, shared by a run's foreground, the sweep callbacks, uploads, the comparison and
the bench.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

try:
    import fcntl
except ImportError:  # not POSIX: no locks, as before
    fcntl = None  # type: ignore[assignment]

from runner.errors import ConfigError, RunnerError, setting
from runner.masking import mask_text, mask_uri

DEFAULT_STORE = Path("outputs") / "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # beside an SQLite store: its runs' files
DEFAULT_EXPERIMENT = "gradient-runner"
LOCK_WAIT_S = 10.0  # how long a write waits for a locked SQLite store, in all

T = TypeVar("T")


class TrackingError(RunnerError):
    """The tracking store cannot be used; the run's files on disk are unaffected."""

    exit_code = 4


@dataclass(frozen=True)
class TrackingTarget:
    uri: str
    experiment: str
    artifact_location: str | None  # only for stores this process creates (SQLite)


def resolve_target(tracking: Mapping[str, Any], base_dir: Path) -> TrackingTarget:
    """The default store is SQLite under <base_dir>/outputs, artifacts beside it.

    base_dir is the folder the run was started from (Hydra's runtime.cwd, which the run
    folder records in .hydra/hydra.yaml). A relative SQLite path in tracking.uri is
    relative to it as well, and the URI comes back absolute: the run, its background
    upload and a later `python -m runner.upload` from any folder open the same file.
    """
    uri = anchor_uri(store_uri(tracking.get("uri")), base_dir)
    experiment = tracking.get("experiment")
    experiment = DEFAULT_EXPERIMENT if experiment is None else experiment
    if not isinstance(experiment, str) or not experiment.strip():
        given = setting("tracking.experiment", experiment)
        raise ConfigError(f"{given} is not allowed; give an experiment name, e.g. my-study")
    artifacts = None
    if uri.startswith("sqlite:///"):
        db_path = Path(uri.removeprefix("sqlite:///"))
        artifacts = (db_path.parent / ARTIFACTS_DIR / experiment).resolve().as_uri()
    return TrackingTarget(uri, experiment, artifacts)


# What MLflow can log to: its SQLAlchemy stores (a driver may follow, postgresql+psycopg2),
# a tracking server, Databricks. Its file store (a bare path, file://) refuses new runs
# since MLflow 3.13, so it is turned away here, before the run, not after it.
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def store_uri(uri: Any) -> str:
    """tracking.uri as given, the default store for null, or a ConfigError for anything
    MLflow cannot log to (an empty `tracking.uri=` is not taken to mean the default)."""
    if uri is None:
        return f"sqlite:///{DEFAULT_STORE}"
    scheme = urlsplit(uri).scheme.split("+")[0] if isinstance(uri, str) else ""
    if scheme not in STORE_SCHEMES and uri != "databricks":
        raise ConfigError(
            f"{setting('tracking.uri', uri)} is not a store MLflow can log to; give "
            "sqlite:///path.db, http(s)://host:port or a database URI (postgresql://, "
            "mysql://, mssql://), or run with tracking=off"
        )
    return uri


def anchor_uri(uri: str, base_dir: Path) -> str:
    """`sqlite:///relative.db` as `sqlite:////<base_dir>/relative.db`; other URIs as given.

    SQLite (and MLflow) would open a relative path against whatever folder the process
    runs in, so the same run folder would be uploaded to a different store from each
    folder; an absolute path names one store. Servers (http) and `:memory:` are untouched.
    """
    path = sqlite_path(uri)
    if path is None or path.is_absolute() or str(path) == ":memory:":
        return uri
    return f"sqlite:///{(base_dir / path).resolve()}"


def store_exists(target: TrackingTarget) -> bool:
    """Whether opening the store would only read it: an SQLite file that exists, or a server.

    MlflowClient creates (and migrates) an SQLite store as it opens it, so a dry run
    asks this first and opens nothing that is not there.
    """
    path = sqlite_path(target.uri)
    return path is None or is_sqlite_store(path)


def is_sqlite_store(path: Path) -> bool:
    """A file that can hold a store: an empty one (0 bytes) is no store yet, and opening it
    writes MLflow's tables and a Default experiment into it (compare, and upload
    --dry-run, did so to a file the user only named)."""
    return path.is_file() and path.stat().st_size > 0


def in_command_flags(message: str, uri_flag: str = "--tracking-uri", off: str | None = None) -> str:
    """A store error's advice, written for `python -m runner` (tracking.uri, tracking=off),
    in the flags of the command that met it; `off` None: the command cannot do without
    the store (compare reads it, upload writes it), so that option is not offered."""
    message = message.replace("tracking.uri", uri_flag)
    if off is not None:
        return message.replace("tracking=off", off)
    message = re.sub(r", (point [^,;]*), or run with tracking=off", r" or \1", message)
    return re.sub(r",? or run with tracking=off", "", message)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def make_store_folder(uri: str) -> None:
    """The folder of an SQLite store exists, or a TrackingError says why it cannot."""
    path = sqlite_path(uri)
    if path is None:
        return
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, FileExistsError | NotADirectoryError):
            why = f"{next(p for p in (folder, *folder.parents) if p.exists())} is a file"
        raise TrackingError(
            f"tracking store {uri} cannot be created ({why}); "
            "point tracking.uri at a folder you can write, or run with tracking=off"
        ) from None


@contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """One process at a time opens (and so creates and migrates) an SQLite store.

    MLflow creates the schema of a new store in the first client that opens it, in
    several transactions; a second process opening it half-made fails. Background
    uploads of runs started one after another open the store at the same moment, so
    the opening is serialized on `<store>.lock` beside it (fcntl.flock).

    The lock file is made before the store, so a store that exists without one was not
    made by a runner process and none is making it now: it is opened without a lock,
    and a reader (compare, an upload's dry run) leaves nothing beside it.
    """
    path = sqlite_path(uri)
    if path is None or fcntl is None:
        yield
        return
    create = 0 if path.exists() else os.O_CREAT
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | create, 0o644)
    except OSError:  # no lock file beside a store, or a folder this process cannot write in
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def check_store(target: TrackingTarget) -> None:
    """Without importing MLflow (milliseconds): is the store there and usable?

    For runs logged by a background process: what MLflow would report at once is
    reported before the run, in the terminal. A server must answer /health and the
    experiment lookup; an SQLite file must be an SQLite database that can take a
    write lock within LOCK_WAIT_S (a missing file is created by the first upload).
    """
    make_store_folder(target.uri)
    path = sqlite_path(target.uri)
    if path is not None:
        _check_sqlite(target.uri, path)
    elif is_http(target.uri):
        probe_server(target)


def _check_sqlite(uri: str, path: Path) -> None:
    if not path.exists():
        return
    import sqlite3

    try:
        con = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=LOCK_WAIT_S,
            isolation_level=None,
        )  # fmt: skip
        try:
            con.execute("BEGIN IMMEDIATE")  # the write lock, taken and given back at once
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise store_error(uri, exc) from None


def probe_server(target: TrackingTarget) -> None:
    """GET /health and the experiment lookup, with urllib (no MLflow, no requests).

    HTTP errors and connection failures become the TrackingError lines store_error
    gives for the same faults seen through MLflow.
    """
    import urllib.error
    import urllib.request
    from urllib.parse import urlencode

    uri = target.uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    headers = _auth_headers(parts)
    context = _tls_context() if parts.scheme == "https" else None
    query = urlencode({"experiment_name": target.experiment})
    for endpoint in ("/health", f"/api/2.0/mlflow/experiments/get-by-name?{query}"):
        request = urllib.request.Request(base + endpoint, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            if exc.code == 404 and b"RESOURCE_DOES_NOT_EXIST" in body:
                continue  # no such experiment yet: the upload creates it
            raise TrackingError(
                f"tracking server {mask_uri(uri)} is failing (HTTP {exc.code} from "
                f"{endpoint.split('?')[0]}); check the server's log, point tracking.uri "
                "elsewhere, or run with tracking=off"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            why = type(reason).__name__ if isinstance(reason, BaseException) else "URLError"
            raise TrackingError(
                f"tracking server {mask_uri(uri)} is unreachable ({why}); "
                "start it, point tracking.uri elsewhere, or run with tracking=off"
            ) from None


def _auth_headers(parts: Any) -> dict[str, str]:
    """The credentials MLflow would send, in its order: MLFLOW_TRACKING_USERNAME and
    _PASSWORD, then the URI's user:password (requests sends them), then the token."""
    import base64
    from urllib.parse import unquote

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password) and parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
    if user is not None and password is not None:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _tls_context() -> Any:
    """MLflow's TLS settings: MLFLOW_TRACKING_INSECURE_TLS, _SERVER_CERT_PATH, _CLIENT_CERT_PATH."""
    import ssl

    context = ssl.create_default_context(
        cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
    )
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    client_cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if client_cert:
        context.load_cert_chain(client_cert)
    return context


def store_error(uri: str, exc: BaseException) -> TrackingError:
    """One line for the user from whatever MLflow, SQLAlchemy or requests raised."""
    if isinstance(exc, TrackingError):
        return exc
    text = str(exc)
    where = f"tracking store {mask_uri(uri)}"
    if "database is locked" in text:
        return TrackingError(
            f"{where} is locked by another process (still locked after {LOCK_WAIT_S:g} s); "
            "retry when it is free, point tracking.uri elsewhere, or run with tracking=off"
        )
    if "file is not a database" in text or "malformed" in text:
        return TrackingError(
            f"{where} is not an SQLite database (file is corrupt or of another kind); "
            "move it aside, point tracking.uri elsewhere, or run with tracking=off"
        )
    if uri.startswith(("http://", "https://")):
        server = f"tracking server {mask_uri(uri)}"
        code = re.search(r"too many (\d{3}) error responses|error code (\d{3})", text)
        endpoint = re.search(r"/api/[\w./-]+", text)
        if code:
            source = f" from {endpoint.group(0)}" if endpoint else ""
            return TrackingError(
                f"{server} is failing (HTTP {code.group(1) or code.group(2)}{source}); "
                "check the server's log, point tracking.uri elsewhere, or run with tracking=off"
            )
        if re.search(r"Connection ?refused|NewConnectionError|ConnectionError|timed out", text):
            return TrackingError(
                f"{server} stopped answering ({type(exc).__name__}: connection failed); "
                "start it again, point tracking.uri elsewhere, or run with tracking=off"
            )
    detail = " ".join(text.split())
    detail = mask_text(detail if len(detail) <= 200 else detail[:197] + "...")
    return TrackingError(
        f"{where} failed ({type(exc).__name__}: {detail}); "
        "check the store, point tracking.uri elsewhere, or run with tracking=off"
    )


def retry_locked(action: Callable[[], T], attempts: int = 8, window_s: float = LOCK_WAIT_S) -> T:
    """SQLite allows one writer: parallel jobs wait briefly instead of failing.

    Gives up after `attempts` tries or `window_s` seconds in all (each try may itself
    wait out SQLite's 5 s busy timeout), so a store held locked is reported, not awaited.
    """
    start = time.monotonic()
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:  # MLflow wraps the driver's error in its own types
            delay = 0.05 * 2**attempt
            late = time.monotonic() - start + delay > window_s
            if "database is locked" not in str(exc) or attempt == attempts - 1 or late:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
