"""`python -m runner.compare`: do the frameworks agree, and which way is fastest?

Reads finished minimize runs from any MLflow tracking URI (the runner's SQLite store
by default), keeps one row per configuration (Row.key: backend, mode, optimizer, dtype,
steps, problem, device; of repeats of one configuration the latest), and writes (a
backend run with options other than its conf/backend defaults is a backend of its own,
named with them: `tf+jit_compile`, `numpy+convention=tf`):

- comparison.md / comparison.csv / comparison.json: one row per configuration with final
  x and loss, the error to the analytic optimum, steps, compile and per-step time, and the
  per-step time relative to the fastest finished row (1.0x; a diverged run is no
  reference); a problem and a device column where the rows differ in them;
- agreement.csv (and a section of comparison.md): per mode and dtype, the two backends
  whose final x are furthest apart in ulps of the rows' dtype, their largest |dx| and ulps (the
  csv: float32 ulps, and float64 ulps for float64 runs); a row "all" per dtype compares
  every mode with every other;
- convergence.png (|loss - loss*| against step, from each run's per-step `loss`
  metric) and step_time.png (per-step time, log scale).

The files are logged as artifacts of a comparison run (tag runner.kind=comparison) in
the same experiment, or of an existing run (the sweep's parent when a multirun ends).
Values come from each run's results.json artifact (exact floats, vectors included);
a run whose artifact cannot be read falls back to its MLflow metrics, tags and params.
The module imports no framework; MLflow is imported inside functions.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from runner.command_line import OneLineParser, out_dir_error
from runner.config import backend_defaults
from runner.errors import RunnerError
from runner.optimizers import CONVENTIONS, HYPERPARAMETERS, eps_form
from runner.protocol import MODES
from runner.results import (
    RESULTS_FILE,
    TRAJECTORY_FILE,
    atomic_write,
    device_kind,
    sweep_failures,
)
from runner.tracking import (
    DEFAULT_EXPERIMENT,
    TrackingTarget,
    client_for,
    flatten,
    in_command_flags,
    mask_uri,
    read_trajectory,
    resolve_target,
    retry_locked,
)

KIND_TAG = "runner.kind"
COMPARISON_KIND = "comparison"
SWEEP_KIND = "sweep"
MARKDOWN_FILE = "comparison.md"
CSV_FILE = "comparison.csv"
JSON_FILE = "comparison.json"
AGREEMENT_FILE = "agreement.csv"
CONVERGENCE_FILE = "convergence.png"
STEP_TIME_FILE = "step_time.png"
ALL_MODES = "all"
FILTERS = ("backend", "mode", "dtype")  # the tags --backend, --mode and --dtype select by


class CompareError(RunnerError):
    """Nothing to compare: unknown store or experiment, or no run matches the filters."""


@dataclass
class Row:
    """The latest run of one configuration (key): what was run, not when or where it was
    logged."""

    backend: str  # backend_label: the name, + the options that differ from its defaults
    mode: str
    optimizer: str
    dtype: str
    status: str  # finished | diverged
    steps: int
    steps_run: int
    x: float | list[float] | None  # None: more entries than results.json lists
    loss: float
    error_x: float
    error_loss: float
    compile_s: float
    run_s: float
    step_us: float
    relative: float  # step_us / the fastest finished row's step_us
    run_id: str
    run_name: str
    started: str
    problem: dict[str, Any] = field(default_factory=dict)
    optimum_loss: float = math.nan
    source: str = RESULTS_FILE  # or "metrics" when results.json could not be read
    optimizer_used: dict[str, Any] = field(default_factory=dict)  # results.json's, if any
    device: str = ""
    problem_label: str = ""  # set by _report: the name + the settings that vary among rows

    @property
    def key(self) -> tuple[str, ...]:
        """Everything that decides what a run computed (the labels hold the optimizer's
        hyperparameters, the backend's options, the graph update): runs that differ in any
        of it are rows of their own; only repeats of one configuration share a key, so a
        store holding re-runs shows each configuration once."""
        return (
            self.backend,
            self.mode,
            self.optimizer,
            self.dtype,
            str(self.steps),
            _problem_key(self.problem),
            self.device,
        )


@dataclass
class Agreement:
    """The largest difference of final x between the rows of one mode x dtype x optimizer."""

    mode: str
    dtype: str
    optimizer: str
    compared: list[str]
    pair: tuple[str, str]
    abs_diff: float
    ulps_f32: float
    ulps_f64: float | None  # only for float64 runs
    note: str = ""
    setup: str = ""  # the problem, steps, device all compared rows ran, where a group was split


@dataclass
class Report:
    rows: list[Row]
    agreement: list[Agreement]
    text: str  # the terminal tables
    out_dir: Path
    files: dict[str, Path]
    run_id: str | None  # the run the files were logged to, None with log=False
    experiment: str
    sweep_id: str | None


# ---------------------------------------------------------------- reading runs


def compare(
    tracking_uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    sweep_id: str | None = None,
    backends: Iterable[str] | None = None,
    modes: Iterable[str] | None = None,
    dtypes: Iterable[str] | None = None,
    out_dir: Path | str | None = None,
    log_to_run_id: str | None = None,
    client: Any = None,
    *,
    log: bool = True,
) -> Report:
    """Compare the matching runs, write the files to out_dir and log them to MLflow.

    With log_to_run_id the files become artifacts of that run (left running: its owner
    ends it); otherwise of a new run "compare <sweep or 'all'>" tagged
    runner.kind=comparison. `modes` matches a mode exactly ("graph/apply") or by its
    name before the slash ("graph"). Raises CompareError when nothing can be compared.
    """
    uri = resolve_target({"uri": tracking_uri}, Path.cwd()).uri
    if client is None:
        client = open_client(uri, default=tracking_uri is None)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        known = f"; experiments there: {', '.join(names)}" if names else ""
        raise CompareError(f"experiment {experiment!r} not found in {mask_uri(uri)}{known}")
    if sweep_id == "latest":
        sweep_id = latest_sweep(client, found.experiment_id, experiment)
    filters = dict(zip(FILTERS, map(_values, (backends, modes, dtypes)), strict=True))
    for spelling in _sweep_spellings(sweep_id):
        runs = search_runs(client, found.experiment_id, spelling, filters)
        if runs:
            sweep_id = spelling
            break
    if not runs:
        raise CompareError(_no_match(client, found.experiment_id, experiment, sweep_id, filters))
    report = _report(
        [_record(client, run) for run in _newest_per_setting(runs)],
        len(runs),
        f"tracking URI: `{mask_uri(uri)}`, experiment `{experiment}`",
        f"{_describe(sweep_id, filters)}; {len(runs)} matching",
        experiment,
        sweep_id,
        Path(out_dir) if out_dir else default_out_dir(),
        lambda row: loss_curve(client, row),
    )
    if log:
        report.run_id = log_report(
            client,
            found.experiment_id,
            report.files,
            report.agreement,
            report.rows,
            sweep_id,
            filters,
            log_to_run_id,
        )
    return report


def compare_folder(sweep_dir: Path, experiment: str, out_dir: Path) -> Report:
    """The report of a sweep from its job folders (results.json, trajectory.csv), no MLflow.

    A sweep's own report is made this way as it ends: the same rows as reading the
    runs back from MLflow (results.json is what both read), without waiting for the
    store; the sweep's logging then attaches the files to the sweep's parent run.
    """
    written = {path: path.stat().st_mtime for path in sweep_dir.glob(f"*/{RESULTS_FILE}")}
    # newest first, as _latest_per_key expects
    newest_first = sorted(sorted(written), key=written.__getitem__, reverse=True)
    rows, not_compared = [], []
    for path in newest_first:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("status") not in ("finished", "diverged"):
            not_compared.append(str(result.get("status")))  # skipped, interrupted
            continue
        started = datetime.fromtimestamp(written[path]).isoformat(timespec="seconds")
        row = row_from_result(result, run_id="", run_name=path.parent.name, started=started)
        if row is not None:
            rows.append(row)
    if not rows:
        raise CompareError(f"no finished minimize runs in {sweep_dir}")
    sweep_id = sweep_dir.as_posix()
    return _report(
        rows,
        len(rows),
        f"run folders: `{sweep_dir}`",
        f"sweep {sweep_id}; {_job_counts(rows, not_compared, len(sweep_failures(sweep_dir)))}",
        experiment,
        sweep_id,
        out_dir,
        lambda row: _trajectory_loss(sweep_dir / row.run_name / TRAJECTORY_FILE),
    )


def _job_counts(rows: Sequence[Row], not_compared: Sequence[str], failed: int) -> str:
    """'4 finished', '3 finished, 1 diverged, 1 skipped, 1 failed': every job the sweep
    ran, so one that has no row (a combination the backend cannot express, a bad setting)
    is not silently missing from the header."""
    counts = {"finished": 0, "diverged": 0, "skipped": 0, "interrupted": 0}
    for status in [row.status for row in rows] + list(not_compared):
        counts[status] = counts.get(status, 0) + 1
    counts["failed"] = failed
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n or status == "finished")


def _report(
    newest_first: list[Row],
    found: int,
    source: str,
    runs: str,
    experiment: str,
    sweep_id: str | None,
    out: Path,
    curve_of: Callable[[Row], dict[str, np.ndarray] | None],
) -> Report:
    """Tables, agreement, plots and files for one row per configuration (the latest), of
    the `found` runs, whatever they came from; the header says how many were repeats."""
    rows = list(_latest_per_key(newest_first).values())
    _set_problem_labels(rows)
    rows.sort(key=_row_order)
    _set_relative(rows)
    agreement = agreement_of(rows)
    _make_out(out)
    repeats = found - len(rows)
    kept = (
        f"one per configuration; {plural(repeats, 'earlier repeat')} of an "
        "identical configuration left out"
        if repeats
        else "one per run"
    )
    header = [
        f"- {source}",
        f"- runs: {runs}, {plural(len(rows), 'row')} ({kept})",
        f"- made {datetime.now().isoformat(timespec='seconds')}",
    ]
    text = terminal_text(rows, agreement, f"{experiment}: {header[1].removeprefix('- runs: ')}")
    plots = write_plots(out, rows, curve_of)
    files = {**write_files(out, rows, agreement, header, plots), **plots}
    return Report(rows, agreement, text, out, files, None, experiment, sweep_id)


def open_client(uri: str, default: bool = False) -> Any:
    """A client for an existing store: a missing SQLite file is an error, not a new store.

    default: the URI is the default store, not one the user gave, so the advice differs:
    a given path may be mistyped; the default one is relative to the current folder.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise CompareError(_no_store(path, default))
    return client_for(TrackingTarget(uri, DEFAULT_EXPERIMENT, None))


def _no_store(path: Path, default: bool) -> str:
    if default:
        return (
            f"no MLflow store at {path} (the default store, outputs/mlflow.db under the "
            "current folder); run from the folder the runs were started in, or give "
            "--tracking-uri"
        )
    return (
        f"no MLflow store at {path}; check the path in --tracking-uri, or omit "
        "--tracking-uri to read the default store outputs/mlflow.db"
    )


def _make_out(out: Path) -> None:
    """The report's folder, or a CompareError naming it (a caller that skipped
    out_dir_error, or a folder that became unwritable since)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompareError(f"cannot write the report to {out}: {exc.strerror}") from None


def plural(count: int, noun: str) -> str:
    """'1 row', '2 rows', '0 rows'."""
    return f"{count} {noun}{'s' * (count != 1)}"


def default_out_dir() -> Path:
    return Path("outputs") / "compare" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def _values(items: Iterable[str] | None) -> list[str]:
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
    """Matching runs, newest first; the store filters what it can, Python the rest.

    MLflow's tag filters have no IN, and `!=` drops runs that lack the tag, so the
    exclusions (comparison and sweep runs) and multi-valued filters are applied here.
    """
    clauses = ["tags.task = 'minimize'"]
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
                " and ".join(clauses),
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
    if tags.get(KIND_TAG) in (COMPARISON_KIND, SWEEP_KIND) or tags.get("task") != "minimize":
        return False
    finished = run.info.status == "FINISHED" and tags.get("status") != "skipped"
    diverged = run.info.status == "FAILED" and tags.get("status") == "diverged"
    if not (finished or diverged):
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
    mode = tags.get("mode", "")
    return not filters["mode"] or any(m in (mode, mode.split("/")[0]) for m in filters["mode"])


def _sweep_spellings(sweep_id: str | None) -> list[str | None]:
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
    page = client.search_runs(
        [experiment_id],
        f"tags.`{KIND_TAG}` = '{SWEEP_KIND}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not page or "sweep_id" not in page[0].data.tags:
        raise CompareError(f"experiment {experiment!r} has no sweep; run one with -m first")
    return page[0].data.tags["sweep_id"]


def _describe(sweep_id: str | None, filters: Mapping[str, list[str]]) -> str:
    parts = [f"sweep={sweep_id}"] if sweep_id else []
    parts += [f"{k}={','.join(v)}" for k, v in filters.items() if v]
    return " ".join(parts) or "(no filters)"


def _no_match(
    client: Any,
    experiment_id: str,
    experiment: str,
    sweep_id: str | None,
    filters: Mapping[str, list[str]],
) -> str:
    """Nothing matched: for each filter given, the values the runs there hold, so a
    mistyped or absent one (`--backend keras`) is told what there is to choose from."""
    message = (
        f"no finished minimize runs in experiment {experiment!r} match "
        f"{_describe(sweep_id, filters)}"
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
    for spelling in _sweep_spellings(sweep_id):
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
    scope = _describe(sweep_id, others)
    where = "" if scope == _describe(None, {}) else f" ({scope})"
    return f"{name}s there{where}: {', '.join(sorted(values)) or 'none'}"


def _filter_value(run: Any, name: str) -> str:
    """What --backend, --mode or --dtype would take to select the run."""
    tags = run.data.tags
    if name == "backend":
        return backend_label(tags.get("backend", "?"), _logged_options(run.data.params))
    return tags.get(name, "?")


def _record(client: Any, run: Any) -> Row:
    """One run as a row: results.json when the artifact can be read, else its metrics."""
    result = _download_json(client, run.info.run_id, RESULTS_FILE)
    started = datetime.fromtimestamp(run.info.start_time / 1000).isoformat(timespec="seconds")
    common = {"run_id": run.info.run_id, "run_name": run.info.run_name or "", "started": started}
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
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
        relative=math.nan,
        problem={
            k.removeprefix("problem."): _number(v)
            for k, v in params.items()
            if k.startswith("problem.")
        },
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


def _logged_options(params: Mapping[str, str]) -> dict[str, str]:
    """The backend options a run's params hold: config_params logged the resolved config's
    backend node as `backend.<key>` = str(value)."""
    return {
        k.removeprefix("backend."): v
        for k, v in params.items()
        if k.startswith("backend.") and k != "backend.name"
    }


def row_from_result(result: Mapping[str, Any], **common: str) -> Row | None:
    """A minimize run's row from its results.json (exact values); None for other tasks."""
    if result.get("task") != "minimize":
        return None
    mode = result["mode"] + (f"/{result['update']}" if result.get("update") else "")
    timings = result["timings"]
    return Row(
        backend=backend_label(result["backend"], result.get("options") or {}),
        mode=mode,
        optimizer=optimizer_label(result["optimizer"]),
        dtype=result["dtype"],
        status=result["status"],
        steps=int(result["steps"]),
        steps_run=int(result["steps_run"]),
        x=result["x"],
        loss=float(result["loss"]),
        error_x=float(result["error"]["x"]),
        error_loss=float(result["error"]["loss"]),
        compile_s=float(timings["compile_s"]),
        run_s=float(timings["run_s"]),
        step_us=float(timings["step_us"]),
        relative=math.nan,
        problem=dict(result.get("problem", {})),
        optimum_loss=float(result["optimum"]["loss"]),
        optimizer_used=dict(result.get("optimizer_used") or {}),
        device=device_kind(str(result.get("device", ""))),
        **common,
    )


def _number(text: Any) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


OPTION_TEXT = {"False": "false", "None": "null"}  # as an override spells them


def backend_label(name: str, options: Mapping[str, Any]) -> str:
    """'tf', 'tf+jit_compile', 'numpy+convention=tf': the backend and the options that
    differ from its conf/backend defaults, so runs that differ only by an option (XLA on
    and off) get rows of their own, and runs at the defaults keep the plain name.

    Values are compared as text, str(value), the form config_params logs as MLflow
    params, so a results.json value and its param give the same label. An option without
    a yaml default (a plugin backend's, a `+backend.key`) counts as default when false or
    null. A results.json written before it held options is read with the run's logged
    params in MLflow (_record); in a sweep folder's report it gives the plain name.
    """
    defaults = {k: str(v) for k, v in flatten(backend_defaults(name)).items()}
    parts = [name]
    for key, value in sorted(flatten(options).items()):
        text = str(value)
        if text == defaults.get(key) or (key not in defaults and text in OPTION_TEXT):
            continue
        parts.append(key if text == "True" else f"{key}={OPTION_TEXT.get(text, text)}")
    return "+".join(parts)


def optimizer_label(optimizer: Mapping[str, Any]) -> str:
    """'sgd lr=0.01' (+ settings that differ from the vocabulary's defaults), so runs at
    other settings stay apart and default ones read short."""
    name = str(optimizer.get("name", "?"))
    defaults = HYPERPARAMETERS.get(name, {})
    hyper = [
        f"{k}={v}"
        if isinstance(v, bool) or not isinstance(v, int | float)
        else f"{k}={_g_exact(v)}"
        for k, v in sorted(optimizer.items(), key=lambda kv: (kv[0] != "lr", kv[0]))
        if k != "name" and v not in (None, "None") and (k not in defaults or v != defaults[k])
    ]
    return " ".join([name, *hyper])


def _g_exact(value: float) -> str:
    """'0.01', '1e-07': the short form where it reads back as value, else repr; a label is
    part of Row.key, so runs at lr 0.0012345671 and 0.0012345674 must not share one."""
    text = f"{value:g}"
    return text if float(text) == value else repr(value)


def _download_json(client: Any, run_id: str, path: str) -> dict[str, Any] | None:
    text = _download_text(client, run_id, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _download_text(client: Any, run_id: str, path: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return Path(local).read_text(encoding="utf-8")
        except Exception:  # missing artifact, unreachable artifact store: use metrics
            return None


SETTING_PARAMS = ("steps", "optimizer.", "backend.", "problem.", "mode.")


def _newest_per_setting(runs: Sequence[Any]) -> list[Any]:
    """The newest run per backend, mode, dtype, device and steps, optimizer, backend,
    problem and mode params, before any download.

    A finer key than a row's (every such param counts), so no row loses its latest run;
    it spares reading results.json of every older run in a long-lived experiment.
    """
    seen, kept = set(), []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        setting = (
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


def _latest_per_key(rows: Iterable[Row]) -> dict[tuple[str, ...], Row]:
    """Rows arrive newest first, so the first row of a key is its latest run: a re-run of
    one configuration replaces the older, it does not repeat it."""
    latest: dict[tuple[str, ...], Row] = {}
    for row in rows:
        latest.setdefault(row.key, row)
    return latest


def _problem_key(problem: Mapping[str, Any]) -> str:
    """The problem's settings as its label spells them (x0=5 and x0=5.0 are one problem),
    so two rows of one name have other keys exactly where their labels differ."""
    return json.dumps({k: _setting_text(v) for k, v in problem.items()}, sort_keys=True)


def _setting_text(value: Any) -> str:
    """A problem setting as an override spells it: 5, 0.5, [1, 2], null."""
    if isinstance(value, list):
        return "[" + ",".join(map(_setting_text, value)) + "]"
    if isinstance(value, float):
        return _g_exact(value)
    return "null" if value in (None, "None") else str(value)  # "None": a logged param


def _set_problem_labels(rows: Sequence[Row]) -> None:
    """Label each row's problem by its name and the settings that take more than one value
    among the report's problems of that name ('quadratic x0=5'): rows that ran other
    problems are told apart, and settings all of them share are not repeated."""
    by_name: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(str(row.problem.get("name", "?")), {})[_problem_key(row.problem)] = (
            row.problem
        )
    labels = {}
    for name, problems in by_name.items():
        keys = sorted({k for p in problems.values() for k in p if k != "name"})
        varying = [k for k in keys if len({_setting_text(p.get(k)) for p in problems.values()}) > 1]
        for key, problem in problems.items():
            parts = [f"{k}={_setting_text(problem.get(k))}" for k in varying]
            labels[key] = " ".join([name, *parts])
    for row in rows:
        row.problem_label = labels[_problem_key(row.problem)]


def _differing(rows: Sequence[Row]) -> set[str]:
    """What besides backend, mode, optimizer and dtype tells rows apart: problem and steps
    and device where they take several values."""
    found = set()
    if len({r.problem_label for r in rows}) > 1:
        found.add("problem")
    if len({r.steps for r in rows}) > 1:
        found.add("steps")
    if len({r.device for r in rows}) > 1:
        found.add("device")
    return found


def _varying(row: Row, differing: set[str]) -> list[str]:
    """Row's problem, steps and device where they tell rows apart (`_differing`): for a label."""
    parts = {"problem": row.problem_label, "steps": f"steps={row.steps}", "device": row.device}
    return [text for name, text in parts.items() if name in differing]


def _mode_order(mode: str) -> tuple[int, str]:
    """Eager to compiled, as the README's tables go (MODES' order); a mode a plugin
    defines comes after them."""
    name = mode.split("/")[0]
    return (MODES.index(name) if name in MODES else len(MODES), mode)


def _row_order(row: Row) -> tuple[Any, ...]:
    """Rows that ran the same problem for as many steps are neighbours: the frameworks'
    rows that compare."""
    return (
        row.dtype,
        row.optimizer,
        row.problem_label,
        row.steps,
        _mode_order(row.mode),
        row.backend,
        row.device,
    )


def _set_relative(rows: Sequence[Row]) -> None:
    """Per-step time over the fastest finished row's. A diverged run is no reference: it
    stopped early, often in inf/nan arithmetic of another speed. It still gets a ratio (of
    the steps it ran), which may be below 1.0x; with no finished row there is none."""
    finished = [r.step_us for r in rows if r.status == "finished" and _timed(r)]
    fastest = min(finished, default=math.nan)
    for row in rows:
        row.relative = row.step_us / fastest if _timed(row) else math.nan


def _timed(row: Row) -> bool:
    return math.isfinite(row.step_us) and row.step_us > 0


# ---------------------------------------------------------------- agreement


def ulps(a: Any, b: Any, dtype: type[np.floating]) -> float:
    """|a - b| in units in the last place of the larger magnitude, in `dtype` (elementwise max)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(a64), np.abs(b64)).astype(dtype)
    return float(np.max(np.abs(a64 - b64) / np.spacing(scale).astype(np.float64)))


def abs_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def agreement_of(rows: Sequence[Row]) -> list[Agreement]:
    """Per mode x dtype x optimizer, the two backends whose final x are furthest apart in
    ulps of the rows' dtype: their largest |dx| and their ulps.

    A group "all" per dtype x optimizer compares every row with every other, across modes.
    Diverged rows have no final x to compare and are left out, and so are vectors too long
    for results.json to list (it keeps their norms only). Where a backend has several rows
    in a group (it ran several problems, step counts or devices), the group is split by
    those (Agreement.setup), so backends are compared like with like.
    """
    usable = [
        r for r in rows if r.status != "diverged" and r.x is not None and np.all(np.isfinite(r.x))
    ]
    whole: dict[tuple[str, str, str], list[Row]] = {}
    for row in usable:
        whole.setdefault((row.mode, row.dtype, row.optimizer), []).append(row)
        whole.setdefault((ALL_MODES, row.dtype, row.optimizer), []).append(row)
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    differing = _differing(usable)
    for (mode, dtype, optimizer), members in whole.items():
        runs = [(m.backend, m.mode if mode == ALL_MODES else "") for m in members]
        split = len(set(runs)) < len(runs)  # a backend (x mode) with several rows
        for m in members:
            setup = " ".join(_varying(m, differing)) if split else ""
            groups.setdefault((mode, dtype, optimizer, setup), []).append(m)
    found = []
    for (mode, dtype, optimizer, setup), members in groups.items():
        if mode == ALL_MODES and len({m.mode for m in members}) < 2:
            continue
        if mode != ALL_MODES and len(members) < 2:
            continue

        apart = _differing(members)

        def label(row: Row, across: bool = mode == ALL_MODES, apart: set[str] = apart) -> str:
            parts = [row.backend, row.mode] if across else [row.backend]
            return " ".join(parts + _varying(row, apart))

        # The pair furthest apart in ulps of the rows' dtype, and that pair's figures: the
        # largest |dx| and the largest ulps can be different pairs (a vector's small entries).
        own = np.float64 if dtype == "float64" else np.float32
        worst = max(combinations(members, 2), key=lambda p: ulps(p[0].x, p[1].x, own))
        found.append(
            Agreement(
                mode=mode,
                dtype=dtype,
                optimizer=optimizer,
                compared=[label(m) for m in members],
                pair=(label(worst[0]), label(worst[1])),
                abs_diff=abs_diff(worst[0].x, worst[1].x),
                ulps_f32=ulps(worst[0].x, worst[1].x, np.float32),
                ulps_f64=ulps(worst[0].x, worst[1].x, np.float64) if dtype == "float64" else None,
                note=_setup_note(members),
                setup=setup,
            )
        )
    setups = {setup: i for i, setup in enumerate(dict.fromkeys(k[3] for k in groups))}
    return sorted(  # setups as the rows go (steps=50 before steps=100)
        found,
        key=lambda a: (
            a.dtype,
            a.optimizer,
            setups[a.setup],
            a.mode == ALL_MODES,
            _mode_order(a.mode),
        ),
    )


def _setup_note(members: Sequence[Row]) -> str:
    """Rows that ran different problems or step counts are not expected to agree."""
    notes = []
    steps = sorted({m.steps for m in members})
    if len(steps) > 1:
        notes.append("steps differ: " + ", ".join(map(str, steps)))
    problems = {json.dumps(m.problem, sort_keys=True) for m in members}
    if len(problems) > 1:
        notes.append("problems differ")
    notes += _defaults_differ(members)
    return "; ".join(notes)


def _defaults_differ(members: Sequence[Row]) -> list[str]:
    """The framework defaults and eps forms the rows ran with, where they differ: what
    keeps e.g. TF's Adam (eps 1e-7, epsilon-hat) from agreeing with torch's to the ulp."""
    seen: dict[str, dict[str, list[str]]] = {}  # setting -> value -> backends
    for row in members:
        used = row.optimizer_used
        convention = CONVENTIONS.get(str(used.get("convention")))
        settings = {k: v for k, v in used.items() if k not in ("convention", "name", "lr")}
        if convention is not None:
            form = eps_form(str(used.get("name")), float(used.get("momentum") or 0), convention)
            if form is not None:
                settings["eps form"] = form
            if used.get("name") == "adam" and row.dtype != "float64":  # float64: the same
                settings["bias correction in"] = convention.adam_bias_correction
        for key, value in settings.items():
            backends = seen.setdefault(key, {}).setdefault(str(value), [])
            if row.backend not in backends:
                backends.append(row.backend)
    return [
        f"{key} " + ", ".join(f"{value} ({', '.join(b)})" for value, b in values.items())
        for key, values in seen.items()
        if len(values) > 1
    ]


# ---------------------------------------------------------------- output


ULPS_HEADER = "ulps in dtype"
ROW_HEADERS = [
    "backend",
    "mode",
    "optimizer",
    "dtype",
    "status",
    "steps",
    "final x",
    "final loss",
    "|x - x*|",
    "|loss - loss*|",
    "compile s",
    "us/step",
    "vs fastest",
]
AGREEMENT_HEADERS = [
    "mode",
    "dtype",
    "optimizer",
    "backends",
    "largest |dx|",
    "between",
    ULPS_HEADER,
    "note",
]
NUMERIC = {
    "steps",
    "final x",
    "final loss",
    "|x - x*|",
    "|loss - loss*|",
    "compile s",
    "us/step",
    "vs fastest",
    "largest |dx|",
    ULPS_HEADER,
}


def relative_text(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value == 1.0:
        return "1.0x"
    if value < 1:  # a diverged row, timed over the steps it ran: 0.8x, 0.004x
        return f"{value:.2g}x"
    if value < 10:
        return f"{value:.2f}x"  # 1.00x: within 0.5% of the fastest, but not it
    return f"{value:.3g}x" if value < 1000 else f"{value:,.0f}x"


def exact_text(value: Any, dtype: str) -> str:
    """Shortest text that reads back as the same value in the run's dtype (a list: its head)."""
    if value is None:
        return "(too long to list)"
    if isinstance(value, list):
        head = ", ".join(exact_text(v, dtype) for v in value[:3])
        return f"[{head}{', ...' if len(value) > 3 else ''}] (n={len(value)})"
    with np.errstate(over="ignore"):
        return str((np.float32 if dtype == "float32" else np.float64)(value))


def _g(value: float, spec: str = ".3g") -> str:
    return format(value, spec) if math.isfinite(value) else str(value)


OPTIONAL_COLUMNS: dict[str, Callable[[Row], str]] = {  # after dtype, where rows differ
    "problem": lambda r: r.problem_label,
    "device": lambda r: r.device,
}  # steps has a column always


def row_table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the rows' table: a problem or device column only where the
    rows differ in it (steps always has one), so every row can be told apart and a report
    of one setup stays as compact as before."""
    differing = _differing(rows)
    columns = {
        name: [get(r) for r in rows] for name, get in OPTIONAL_COLUMNS.items() if name in differing
    }
    return _insert_columns(ROW_HEADERS, [row_cells(r) for r in rows], "dtype", columns)


def _insert_columns(
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    after: str,
    columns: Mapping[str, Sequence[str]],
) -> tuple[list[str], list[list[str]]]:
    """headers and cells with columns (name: one cell per row) put after the header `after`."""
    at = headers.index(after) + 1
    return [*headers[:at], *columns, *headers[at:]], [
        [*c[:at], *(column[i] for column in columns.values()), *c[at:]] for i, c in enumerate(cells)
    ]


def row_cells(row: Row) -> list[str]:
    """Display cells; x and loss are the shortest text that reads back exactly in the dtype."""
    steps = str(row.steps_run) if row.steps_run == row.steps else f"{row.steps_run}/{row.steps}"
    status = "DIVERGED" if row.status == "diverged" else row.status
    return [
        row.backend,
        row.mode,
        row.optimizer,
        row.dtype,
        status,
        steps,
        exact_text(row.x, row.dtype),
        exact_text(row.loss, row.dtype),
        _g(row.error_x),
        _g(row.error_loss),
        _g(row.compile_s, ".3f"),
        _g(row.step_us) if not row.step_us >= 1000 else f"{row.step_us:.0f}",
        relative_text(row.relative),
    ]


def agreement_table(agreement: Sequence[Agreement]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the agreement table; a setup column only where a group was split."""
    setups = [a.setup for a in agreement]
    columns = {"setup": setups} if any(setups) else {}
    return _insert_columns(
        AGREEMENT_HEADERS, [agreement_cells(a) for a in agreement], "optimizer", columns
    )


def agreement_cells(item: Agreement) -> list[str]:
    return [
        item.mode,
        item.dtype,
        item.optimizer,
        ", ".join(item.compared) if item.mode != ALL_MODES else f"{len(item.compared)} rows",
        _g(item.abs_diff),
        " vs ".join(item.pair),
        _g(ulps_in_dtype(item), ".4g"),
        item.note,
    ]


def ulps_in_dtype(item: Agreement) -> float:
    """The ulps of the rows' own dtype: a float64 group's float32 ulps (still in
    agreement.csv) read as if float64 runs agreed only to float32 precision."""
    return item.ulps_f64 if item.ulps_f64 is not None else item.ulps_f32


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if h in NUMERIC else c.ljust(w)
            for c, w, h in zip(cells, widths, headers, strict=True)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = ["---:" if h in NUMERIC else "---" for h in headers]
    return "\n".join([line(headers), "|" + "|".join(rule) + "|", *map(line, rows)])


def terminal_text(rows: Sequence[Row], agreement: Sequence[Agreement], title: str = "") -> str:
    parts = [title] if title else []
    parts.append(text_table(*row_table(rows)))
    parts.append("")
    if agreement:
        parts.append("cross-backend agreement of final x (largest difference per mode)")
        parts.append(text_table(*agreement_table(agreement)))
    else:
        parts.append(
            "cross-backend agreement: no mode has a finite, listed final x from two backends"
        )
    return "\n".join(parts)


def write_files(
    out: Path,
    rows: Sequence[Row],
    agreement: Sequence[Agreement],
    header: Sequence[str],
    plots: Mapping[str, Path],
) -> dict[str, Path]:
    """comparison.md (tables and plots), comparison.csv, agreement.csv, comparison.json."""
    images = [f"![{name}]({path.name})\n" for name, path in plots.items()]
    md = [
        "# Comparison",
        "",
        *header,
        "",
        "Final x and loss are exact in the run's dtype; `vs fastest` is the per-step time "
        "over the fastest finished row's (1.0x); a diverged row's is timed over the steps "
        "it ran, and may be below 1.0x.",
        "",
        markdown_table(*row_table(rows)),
        "",
        "## Cross-backend agreement",
        "",
        "Largest difference of final x between backends per mode (`all`: across modes "
        "too), absolute and in units in the last place of the larger value in the rows' "
        "dtype (agreement.csv has float32 ulps for every row, float64 ulps for float64).",
        "",
        markdown_table(*agreement_table(agreement))
        if agreement
        else "No mode has runs from two backends.",
        "",
        *(["## Plots", "", *images] if images else []),
    ]
    files = {"markdown": out / MARKDOWN_FILE, "csv": out / CSV_FILE}
    files["agreement"] = out / AGREEMENT_FILE
    files["json"] = out / JSON_FILE
    atomic_write(files["markdown"], "\n".join(md))
    atomic_write(files["csv"], _csv(rows_csv(rows)))
    atomic_write(files["agreement"], _csv(agreement_csv(agreement)))
    data = {"rows": [asdict(r) for r in rows], "agreement": [asdict(a) for a in agreement]}
    atomic_write(files["json"], json.dumps(data, indent=2) + "\n")
    return files


def _exact(value: Any) -> str:
    """repr of the float64 (the value results.json holds), a JSON list for vectors."""
    if isinstance(value, list):
        return json.dumps(value)
    return "" if value is None else repr(float(value))


ROW_CSV = {
    "backend": lambda r: r.backend,
    "mode": lambda r: r.mode,
    "optimizer": lambda r: r.optimizer,
    "dtype": lambda r: r.dtype,
    "status": lambda r: r.status,
    "steps": lambda r: str(r.steps),
    "steps_run": lambda r: str(r.steps_run),
    "problem": lambda r: r.problem_label,
    "problem_settings": lambda r: json.dumps(r.problem, sort_keys=True, default=str),
    "device": lambda r: r.device,
    "final_x": lambda r: _exact(r.x),
    "final_loss": lambda r: _exact(r.loss),
    "error_x": lambda r: _exact(r.error_x),
    "error_loss": lambda r: _exact(r.error_loss),
    "compile_s": lambda r: _exact(r.compile_s),
    "run_s": lambda r: _exact(r.run_s),
    "step_us": lambda r: _exact(r.step_us),
    "relative_step_time": lambda r: _exact(r.relative),
    "run_id": lambda r: r.run_id,
    "run_name": lambda r: r.run_name,
    "started": lambda r: r.started,
    "source": lambda r: r.source,
}
AGREEMENT_CSV = {
    "mode": lambda a: a.mode,
    "dtype": lambda a: a.dtype,
    "optimizer": lambda a: a.optimizer,
    "setup": lambda a: a.setup,
    "backends": lambda a: "; ".join(a.compared),
    "abs_diff": lambda a: _exact(a.abs_diff),
    "pair_a": lambda a: a.pair[0],
    "pair_b": lambda a: a.pair[1],
    "ulps_float32": lambda a: _exact(a.ulps_f32),
    "ulps_float64": lambda a: _exact(a.ulps_f64),
    "note": lambda a: a.note,
}


def rows_csv(rows: Sequence[Row]) -> list[list[str]]:
    return [list(ROW_CSV), *([get(r) for get in ROW_CSV.values()] for r in rows)]


def agreement_csv(agreement: Sequence[Agreement]) -> list[list[str]]:
    return [list(AGREEMENT_CSV), *([get(a) for get in AGREEMENT_CSV.values()] for a in agreement)]


def _csv(table: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    return buffer.getvalue()


def _labels(rows: Sequence[Row]) -> list[str]:
    """The plots' names for rows: unique among them, as short as they allow."""
    several_optimizers = len({r.optimizer for r in rows}) > 1
    differing = _differing(rows)
    labels = []
    for r in rows:
        parts = [r.backend, r.mode, r.dtype]
        if several_optimizers:
            parts.append(r.optimizer)
        labels.append(" ".join(parts + _varying(r, differing)))
    return labels


def loss_curve(client: Any, row: Row) -> dict[str, np.ndarray] | None:
    """The per-step loss from the run's metric history, or from its trajectory.csv."""
    history = retry_locked(lambda: client.get_metric_history(row.run_id, "loss"))
    if history:
        points = sorted((m.step, m.value) for m in history)
        return {
            "step": np.array([p[0] for p in points], dtype=np.float64),
            "loss": np.array([p[1] for p in points], dtype=np.float64),
        }
    text = _download_text(client, row.run_id, TRAJECTORY_FILE)
    if text is None:
        return None
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        path = Path(tmp) / TRAJECTORY_FILE
        path.write_text(text)
        return _trajectory_loss(path)


def _trajectory_loss(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    columns = read_trajectory(path)
    return {"step": columns["step"], "loss": columns["loss"]}


def write_plots(
    out: Path, rows: Sequence[Row], curve_of: Callable[[Row], dict[str, np.ndarray] | None]
) -> dict[str, Path]:
    from runner.plots import convergence_plot, step_time_plot

    files: dict[str, Path] = {}
    curves = {}
    optima = {r.optimum_loss for r in rows if math.isfinite(r.optimum_loss)}
    shared = optima.pop() if len(optima) == 1 else None
    labels = _labels(rows)
    for row, label in zip(rows, labels, strict=True):
        curve = curve_of(row)
        if curve is None or not len(curve["step"]):
            continue
        if shared is None:  # different problems: plot each run's own gap to its optimum
            curve["loss"] = curve["loss"] - row.optimum_loss
        curves[label] = curve
    if curves:
        files["convergence"] = convergence_plot(
            curves, shared if shared is not None else 0.0, out / CONVERGENCE_FILE
        )
    times = {  # barh draws the first bar at the bottom: reversed, it reads like the table
        label: r.step_us
        for r, label in reversed(list(zip(rows, labels, strict=True)))
        if math.isfinite(r.step_us) and r.step_us > 0
    }
    if times:
        files["step_time"] = step_time_plot(times, out / STEP_TIME_FILE)
    return files


def _metric_key(*parts: str) -> str:
    return "/".join("".join(c if c.isalnum() or c in "_-. " else "_" for c in p) for p in parts)


def log_report(
    client: Any,
    experiment_id: str,
    files: Mapping[str, Path],
    agreement: Sequence[Agreement],
    rows: Sequence[Row],
    sweep_id: str | None,
    filters: Mapping[str, list[str]],
    log_to_run_id: str | None,
) -> str:
    """Log the files (and the agreement as metrics) to log_to_run_id or a new comparison run."""
    from mlflow.entities import Metric, RunStatus

    run_id = log_to_run_id
    if run_id is None:
        tags = {KIND_TAG: COMPARISON_KIND, "compare.filters": _describe(sweep_id, filters)}
        if sweep_id:
            tags["compare.sweep_id"] = sweep_id
        run = retry_locked(
            lambda: client.create_run(
                experiment_id, run_name=f"compare {sweep_id or 'all'}", tags=tags
            )
        )
        run_id = run.info.run_id
    status = RunStatus.FAILED
    try:
        now = int(time.time() * 1000)
        several = len({a.optimizer for a in agreement}) > 1
        metrics = [Metric("compare.rows", float(len(rows)), now, 0)]
        for a in agreement:
            where = [a.dtype, a.mode] + ([a.optimizer] if several else [])
            where += [a.setup] if a.setup else []  # split groups: one metric each
            metrics += [
                Metric(_metric_key("agreement_abs", *where), a.abs_diff, now, 0),
                Metric(_metric_key("agreement_ulps_f32", *where), a.ulps_f32, now, 0),
            ]
            if a.ulps_f64 is not None:
                metrics.append(
                    Metric(_metric_key("agreement_ulps_f64", *where), a.ulps_f64, now, 0)
                )
        retry_locked(lambda: client.log_batch(run_id, metrics=metrics))
        for path in files.values():
            retry_locked(lambda path=path: client.log_artifact(run_id, str(path)))
        status = RunStatus.FINISHED
    finally:
        if log_to_run_id is None:
            retry_locked(lambda: client.set_terminated(run_id, RunStatus.to_string(status)))
    return run_id


def log_saved_report(
    client: Any, experiment_id: str, files: Mapping[str, Path], run_id: str, sweep_id: str
) -> None:
    """Log a report written earlier (its comparison.json holds rows and agreement) to run_id."""
    data = json.loads(next(p for p in files.values() if p.name == JSON_FILE).read_text())
    rows = [Row(**row) for row in data["rows"]]
    agreement = [Agreement(**item) for item in data["agreement"]]
    log_report(client, experiment_id, files, agreement, rows, sweep_id, {}, run_id)


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="python -m runner.compare",
        description="Compare finished minimize runs in MLflow: a table per backend x mode "
        "(x optimizer, dtype), cross-backend agreement of final x, convergence and "
        "per-step time plots. Files go to --out and to a comparison run in MLflow.",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI to read (default: the runner's store, "
        "sqlite:///<cwd>/outputs/mlflow.db)",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="(default: %(default)s)")
    parser.add_argument(
        "--sweep", help="only runs of this sweep (tag sweep_id); 'latest' for the newest sweep"
    )
    for name, example in (("backend", "jax,torch"), ("mode", "graph"), ("dtype", "float32")):
        parser.add_argument(
            f"--{name}",
            action="append",
            help=f"only these {name}s; repeat or comma-separate (e.g. {example})"
            + ("; 'graph' matches every graph/<update>" if name == "mode" else "")
            + ("; 'tf' matches tf+<options> too" if name == "backend" else ""),
        )
    parser.add_argument("--out", type=Path, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument(
        "--no-log", action="store_true", help="write the files only; log nothing to MLflow"
    )
    args = parser.parse_args(argv)
    given = args.out is not None
    args.out = args.out or default_out_dir()
    if problem := out_dir_error(args.out, given):
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = compare(
            args.tracking_uri,
            args.experiment,
            sweep_id=args.sweep,
            backends=args.backend,
            modes=args.mode,
            dtypes=args.dtype,
            out_dir=args.out,
            log=not args.no_log,
        )
    except RunnerError as exc:
        print(f"error: {in_command_flags(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # the store refused: say so in one line
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"error: tracking store: {message}", file=sys.stderr, flush=True)
        return 4
    print(report.text)
    print(f"\nfiles in {report.out_dir}")
    if report.run_id:
        print(f"logged to MLflow run {report.run_id} (experiment {report.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
