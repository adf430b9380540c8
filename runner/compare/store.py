"""Reading runs from an MLflow tracking store: which runs match, and each as a Row.

The store filters what it can and Python the rest (search_runs); when nothing matches,
the error says what the runs there hold (no_match_message), so a mistyped filter is told what to
choose from. A run's results.json artifact gives its row (exact floats), its metrics,
tags and params where the artifact cannot be read (row_of_run). MLflow is reached through
the client only: this module imports no framework.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.compare.derivatives import (
    DerivativeRow,
    derivative_row_from_metrics,
    derivative_row_from_result,
)
from runner.compare.holes import Hole, said_apart
from runner.compare.rows import Row, backend_label, optimizer_label, row_from_result
from runner.errors import RunnerError
from runner.naming import config_kind, job_kind, mode_label
from runner.results import RESULTS_FILE, device_kind
from runner.tracking import client_for
from runner.tracking_store import (
    DEFAULT_EXPERIMENT,
    TrackingTarget,
    is_sqlite_store,
    retry_locked,
)

KIND_TAG = "runner.kind"
COMPARISON_KIND = "comparison"
SWEEP_KIND = "sweep"
FILTERS = ("backend", "mode", "dtype")  # the tags --backend, --mode and --dtype select by
TASKS = ("minimize", "derivatives")  # the runs a report has tables for


class CompareError(RunnerError):
    """Nothing to compare: unknown store or experiment, or no run matches the filters."""


def open_client(uri: str, default: bool = False) -> Any:
    """A client for an existing store: a missing SQLite file is an error, not a new store.

    default: the URI is the default store, not one the user gave, so the advice differs:
    a given path may be mistyped; the default one is relative to the current folder.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not is_sqlite_store(path):  # MlflowClient would write a new store into it
            raise CompareError(_no_store(path, default))
    return client_for(TrackingTarget(uri, DEFAULT_EXPERIMENT, None))


def _no_store(path: Path, default: bool) -> str:
    found = ["a folder"] if path.is_dir() else ["an empty file"] if path.is_file() else []
    if default:
        where = ", ".join(["the default store, outputs/mlflow.db under the current folder", *found])
        return (
            f"no MLflow store at {path} ({where}); run from the folder the runs were started "
            "in, or give --tracking-uri"
        )
    return (
        f"no MLflow store at {path}{''.join(f' ({f})' for f in found)}; check the path in "
        "--tracking-uri, or omit --tracking-uri to read the default store outputs/mlflow.db"
    )


def split_values(items: Iterable[str] | None) -> list[str]:
    """Repeated and comma-separated values, in order, without duplicates."""
    out: list[str] = []
    for item in items or ():
        for value in str(item).split(","):
            if value.strip() and value.strip() not in out:
                out.append(value.strip())
    return out


def _quoted(value: str) -> str | None:
    """A filter-string literal for value, or None when it cannot be quoted safely."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def search_runs(
    client: Any, experiment_id: str, sweep_id: str | None, filters: Mapping[str, list[str]]
) -> list[Any]:
    """Matching runs, newest first, with a row or not (a job skipped or failed: run_kind);
    the store filters what it can, Python the rest.

    MLflow's tag filters have no IN, and `!=` drops runs that lack the tag, so the
    exclusions (comparison and sweep runs), the tasks (minimize and derivatives runs) and
    multi-valued filters are applied here.
    """
    clauses = []
    if sweep_id is not None and _quoted(sweep_id):
        clauses.append(f"tags.sweep_id = {_quoted(sweep_id)}")
    for tag in ("backend", "dtype"):
        names = {value.split("+")[0] for value in filters[tag]}  # tf+jit_compile: tag tf
        if len(names) == 1 and _quoted(only := names.pop()):
            clauses.append(f"tags.{tag} = {_quoted(only)}")
    runs, token = [], None
    while True:
        page = retry_locked(
            lambda token=token: client.search_runs(
                [experiment_id],
                " and ".join(clauses),  # "" for no clause: every run
                max_results=1000,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
        )
        runs += [run for run in page if _matches(run, sweep_id, filters)]
        token = page.token
        if not token:
            return runs


def _matches(run: Any, sweep_id: str | None, filters: Mapping[str, list[str]]) -> bool:
    tags = run.data.tags
    if tags.get(KIND_TAG) in (COMPARISON_KIND, SWEEP_KIND) or tags.get("task") not in TASKS:
        return False
    if run_kind(run) is None:
        return False
    if sweep_id is not None and tags.get("sweep_id") != sweep_id:
        return False
    if filters["dtype"] and tags.get("dtype") not in filters["dtype"]:
        return False
    wanted = filters["backend"]
    backend = tags.get("backend", "?")
    if (
        wanted
        and backend not in wanted  # the label is made only where the name did not match
        and backend_label(backend, _logged_options(run.data.params)) not in wanted
    ):
        return False
    mode = _mode_of(tags)
    return not filters["mode"] or any(m in (mode, mode.split("/")[0]) for m in filters["mode"])


def run_kind(run: Any) -> str | None:
    """'row' (finished or diverged: the tables compare it), 'skipped' (the backend cannot
    express it) or 'failed' (an error ended it: with skipped, a job the report lists below
    its table, as a sweep's own report does from its folders); None while it runs, or
    where a signal stopped it."""
    tags, status = run.data.tags, run.info.status
    if status == "FINISHED":
        return "skipped" if tags.get("status") == "skipped" else "row"
    if status == "FAILED":
        return "row" if tags.get("status") == "diverged" else "failed"
    return None


def run_holes(runs: Sequence[Any]) -> list[Hole]:
    """The runs without a row (newest first) as the report's lines below its table, the
    latest per job, oldest first: named by backend and mode and by the overrides in their
    run names that not every run shares. The report from MLflow had left them out, where
    the sweep's own report lists them."""
    tails = [(run.info.run_name or "").split(" ")[1:] for run in runs]
    shared = set.intersection(*map(set, tails)) if tails else set()
    holes: dict[str, Hole] = {}
    for run, tail in zip(runs, tails, strict=True):
        status = run_kind(run)
        if status in (None, "row"):
            continue
        tags = run.data.tags
        reason = tags.get("skip_reason" if status == "skipped" else "error") or "(no message)"
        reason = reason.splitlines()[0]
        apart = said_apart((o for o in tail if o not in shared), reason)
        what = f"{_filter_value(run, 'backend')} {_mode_of(tags) or _asked_mode(run)}"
        job = " ".join([what, *apart])
        holes.setdefault(job, Hole(status, job, reason, what, tuple(apart)))
    return list(reversed(holes.values()))


def _asked_mode(run: Any) -> str:
    """The mode label of a run that failed before a result (no `mode` tag), from its
    config's params."""
    params = run.data.params
    mode = {"name": params.get("mode.name", "?"), "update": params.get("mode.update")}
    return mode_label(*config_kind({"task": run.data.tags.get("task"), "mode": mode}))


def _mode_of(tags: Mapping[str, str]) -> str:
    """The run's mode tag; `derivatives` for a derivatives run, which has none (it runs
    no optimizer), as its folder and the sweep's lines name it: --mode derivatives."""
    return job_kind(tags.get("task"), tags.get("mode", ""))


def sweep_spellings(sweep_id: str | None) -> list[str | None]:
    """The ways a sweep's folder may be tagged, the one given first: its sweep_id is the
    folder as the sweep was given it (usually relative to where it started), while a
    user may paste the absolute path upload.log prints, or a tab-completed trailing /."""
    if sweep_id is None:
        return [None]
    path, here = Path(sweep_id), Path.cwd()
    if not path.is_absolute():
        other = here / path
    elif path.is_relative_to(here):
        other = path.relative_to(here)
    else:
        other = path
    return list(dict.fromkeys([sweep_id, path.as_posix(), other.as_posix()]))


def latest_sweep(client: Any, experiment_id: str, experiment: str) -> str:
    page = retry_locked(  # a sweep's jobs may be writing to the same SQLite store
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`{KIND_TAG}` = '{SWEEP_KIND}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
    )
    if not page or "sweep_id" not in page[0].data.tags:
        raise CompareError(f"experiment {experiment!r} has no sweep; run one with -m first")
    return page[0].data.tags["sweep_id"]


def sweeps_still_logging(client: Any, experiment_id: str, sweep_id: str | None) -> list[str]:
    """The selected sweep (each spelling of it), or any sweep when none is selected, whose
    parent run is still RUNNING: its logger (runner.follow, which logs the last jobs after
    a parallel sweep's command returned) or its in-process jobs may not have logged every
    job yet, so a report may lack its rows, silently. Asked of the parents, not of the
    matched runs: a sweep whose logger had not logged a job yet was missing unwarned."""
    running = retry_locked(
        lambda: client.search_runs(
            [experiment_id],
            f"tags.`{KIND_TAG}` = '{SWEEP_KIND}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
    )
    sweeps = {run.data.tags.get("sweep_id") for run in running} - {None}
    selected = sweep_spellings(sweep_id)
    return sorted(s for s in sweeps if sweep_id is None or s in selected)


def still_logging(sweep_id: str) -> str:
    """The warning for such a sweep: stderr's line and the report header's note. A parent
    stays RUNNING too when the sweep's logger was killed or its store was away: the
    upload command then records the rest (the sweep's id is its folder); while the logger
    lives, that command waits for it."""
    return (
        f"sweep {sweep_id} is still being logged (its parent run is RUNNING): the report may "
        f"lack its last jobs; if its logger has stopped (upload.log in the sweep's folder "
        f"does not end in `done`), `python -m runner.upload {sweep_id}` records them"
    )


def describe_selection(sweep_id: str | None, filters: Mapping[str, list[str]]) -> str:
    parts = [f"sweep={sweep_id}"] if sweep_id else []
    parts += [f"{k}={','.join(v)}" for k, v in filters.items() if v]
    return " ".join(parts) or "(no filters)"


def no_match_message(
    client: Any,
    experiment_id: str,
    experiment: str,
    sweep_id: str | None,
    filters: Mapping[str, list[str]],
) -> str:
    """Nothing matched: for each filter given, the values the runs there hold, so a
    mistyped or absent one (`--backend keras`) is told what there is to choose from."""
    message = (
        f"no finished minimize or derivatives runs in experiment {experiment!r} match "
        f"{describe_selection(sweep_id, filters)}"
    )
    given = [name for name, values in filters.items() if values]
    if not given:
        return message
    runs, spelling = _unfiltered_runs(client, experiment_id, sweep_id)
    return message + "".join(f"; {_held(runs, name, spelling, filters)}" for name in given)


def _unfiltered_runs(
    client: Any, experiment_id: str, sweep_id: str | None
) -> tuple[list[Any], str | None]:
    """The experiment's (or sweep's, however its folder is spelt) runs, no filter applied."""
    for spelling in sweep_spellings(sweep_id):
        runs = search_runs(client, experiment_id, spelling, {name: [] for name in FILTERS})
        if runs:
            return runs, spelling
    return [], sweep_id


def _held(
    runs: Sequence[Any], name: str, sweep_id: str | None, filters: Mapping[str, list[str]]
) -> str:
    """'backends there (mode=graph): jax, torch': the values of one filter among the runs
    that the other filters keep, so the line says which of the filters left nothing."""
    others = {**filters, name: []}
    values = {_filter_value(run, name) for run in runs if _matches(run, sweep_id, others)}
    scope = describe_selection(sweep_id, others)
    where = "" if scope == describe_selection(None, {}) else f" ({scope})"
    return f"{name}s there{where}: {', '.join(sorted(values)) or 'none'}"


def _filter_value(run: Any, name: str) -> str:
    """What --backend, --mode or --dtype would take to select the run."""
    tags = run.data.tags
    if name == "backend":
        return backend_label(tags.get("backend", "?"), _logged_options(run.data.params))
    if name == "mode":
        return _mode_of(tags) or "?"
    return tags.get(name, "?")


def row_of_run(client: Any, run: Any) -> Row | DerivativeRow:
    """One run as a row: results.json when the artifact can be read, else its metrics."""
    result = _download_json(client, run.info.run_id, RESULTS_FILE)
    started = datetime.fromtimestamp(run.info.start_time / 1000).isoformat(timespec="seconds")
    common = {"run_id": run.info.run_id, "run_name": run.info.run_name or "", "started": started}
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    if tags.get("task") == "derivatives":
        found = derivative_row_from_result(result, **common) if result is not None else None
        return found or derivative_row_from_metrics(tags, metrics, _problem(params), **common)
    options = _logged_options(params)
    if result is not None and "options" not in result:  # written before it held them
        result = {**result, "options": options}
    row = row_from_result(result, **common) if result is not None else None
    if row is not None:
        return row
    hyper = {
        k.removeprefix("optimizer."): v for k, v in params.items() if k.startswith("optimizer.")
    }
    optimum = metrics.get("final_loss", math.nan) - metrics.get("error_loss", math.nan)
    return Row(
        backend=backend_label(tags.get("backend", "?"), options),
        mode=tags.get("mode", "?"),
        optimizer=optimizer_label({k: _number(v) for k, v in hyper.items()}),
        dtype=tags.get("dtype", "?"),
        status=tags.get("status", "finished"),
        steps=int(_number(params.get("steps", metrics.get("steps_run", 0)))),
        steps_run=int(metrics.get("steps_run", 0)),
        x=metrics.get("final_x", math.nan),
        loss=metrics.get("final_loss", math.nan),
        error_x=metrics.get("error_x", math.nan),
        error_loss=metrics.get("error_loss", math.nan),
        compile_s=metrics.get("compile_s", math.nan),
        run_s=metrics.get("run_s", math.nan),
        step_us=metrics.get("step_us", math.nan),
        final_s=metrics.get("final_s", 0.0),
        relative=math.nan,
        problem=_problem(params),
        optimum_loss=optimum,
        source="metrics",
        device=device_kind(tags.get("device", "")),  # runs logged before it was canonical
        optimizer_used={
            k.removeprefix("optimizer_used."): _number(v)
            for k, v in tags.items()
            if k.startswith("optimizer_used.")
        },
        **common,
    )


def _problem(params: Mapping[str, str]) -> dict[str, Any]:
    """The problem's settings from a run's params (`problem.x0` = '1.5': 1.5)."""
    prefix = "problem."
    return {k.removeprefix(prefix): _number(v) for k, v in params.items() if k.startswith(prefix)}


def _logged_options(params: Mapping[str, str]) -> dict[str, str]:
    """The backend options a run's params hold: config_params logged the resolved config's
    backend node as `backend.<key>` = str(value)."""
    return {
        k.removeprefix("backend."): v
        for k, v in params.items()
        if k.startswith("backend.") and k != "backend.name"
    }


# config_params logs str(value): a boolean or null setting comes back as 'False', 'None'
_LOGGED_AS = {"True": True, "False": False, "None": None}


def _number(text: Any) -> Any:
    """A logged param or tag as the value it was: a label compares it with its default."""
    if isinstance(text, str) and text in _LOGGED_AS:
        return _LOGGED_AS[text]
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _download_json(client: Any, run_id: str, path: str) -> dict[str, Any] | None:
    text = download_text(client, run_id, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def download_text(client: Any, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return Path(local).read_text(encoding="utf-8")
        except Exception:  # missing artifact, unreachable artifact store: use metrics
            return None


SETTING_PARAMS = ("steps", "optimizer.", "backend.", "problem.", "mode.")


def newest_per_setting(runs: Sequence[Any]) -> list[Any]:
    """The newest run per task, backend, mode, dtype, device and steps, optimizer, backend,
    problem and mode params, before any download.

    A finer key than a row's (every such param counts), so no row loses its latest run;
    it spares reading results.json of every older run in a long-lived experiment.
    """
    seen, kept = set(), []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        setting = (
            tags.get("task"),
            tags.get("backend"),
            tags.get("mode"),
            tags.get("dtype"),
            device_kind(tags.get("device", "")),
            tuple(sorted((k, v) for k, v in params.items() if k.startswith(SETTING_PARAMS))),
        )
        if setting not in seen:
            seen.add(setting)
            kept.append(run)
    return kept
