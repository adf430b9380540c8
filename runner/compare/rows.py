"""One row per configuration: Row, the row a results.json gives, its labels and its order.

Plain data, no MLflow and no files: a run read from a store (store) and a run folder
read by a sweep's own report (report.compare_folder) end up as the same rows, so the
tables, agreement and plots (agreement, output) are the same whichever they came from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from runner.config import backend_defaults
from runner.naming import mode_label
from runner.optimizers import HYPERPARAMETERS
from runner.protocol import MODES
from runner.results import RESULTS_FILE, device_kind
from runner.tracking import flatten


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
    record_every: int | None = None  # results.json's: which steps trajectory.csv holds
    # the final state's read-back to the host; 0 for runs from before it was timed apart,
    # whose run_s holds it
    final_s: float = 0.0

    @property
    def total_s(self) -> float:
        """The run as the runner timed it: compile, loop and read-back (not the process's
        start and imports): what a short run costs, where compile_s can outweigh the loop."""
        return self.compile_s + self.run_s + self.final_s

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
            problem_key(self.problem),
            self.device,
        )


def row_from_result(result: Mapping[str, Any], **common: str) -> Row | None:
    """A minimize run's row from its results.json (exact values); None for other tasks."""
    if result.get("task") != "minimize":
        return None
    mode = mode_label(result["mode"], result.get("update"))
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
        final_s=float(timings.get("final_s", 0.0)),
        relative=math.nan,
        problem=dict(result.get("problem", {})),
        optimum_loss=float(result["optimum"]["loss"]),
        optimizer_used=dict(result.get("optimizer_used") or {}),
        device=device_kind(str(result.get("device", ""))),
        record_every=result.get("record_every"),
        **common,
    )


OPTION_TEXT = {"False": "false", "None": "null"}  # as an override spells them


def backend_label(name: str, options: Mapping[str, Any]) -> str:
    """'tf', 'tf+jit_compile', 'numpy+convention=tf': the backend and the options that
    differ from its conf/backend defaults, so runs that differ only by an option (XLA on
    and off) get rows of their own, and runs at the defaults keep the plain name.

    Values are compared as text, str(value), the form config_params logs as MLflow
    params, so a results.json value and its param give the same label. An option without
    a yaml default (a plugin backend's, a `+backend.key`) counts as default when false or
    null. A results.json written before it held options is read with the run's logged
    params in MLflow (row_of_run); in a sweep folder's report it gives the plain name.
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


class Keyed(Protocol):
    """A row of either table (Row, a derivatives run's row): what identifies it."""

    @property
    def key(self) -> tuple[str, ...]: ...


class OfProblem(Protocol):
    """A row of either table, as far as its problem's label goes."""

    problem: dict[str, Any]
    problem_label: str


K = TypeVar("K", bound=Keyed)


def latest_per_key(rows: Iterable[K]) -> dict[tuple[str, ...], K]:
    """Rows arrive newest first, so the first row of a key is its latest run: a re-run of
    one configuration replaces the older, it does not repeat it."""
    latest: dict[tuple[str, ...], K] = {}
    for row in rows:
        latest.setdefault(row.key, row)
    return latest


def problem_key(problem: Mapping[str, Any]) -> str:
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


def set_problem_labels(rows: Sequence[OfProblem], always: Sequence[str] = ()) -> None:
    """Label each row's problem by its name and the settings that take more than one value
    among the report's problems of that name ('quadratic x0=5'): rows that ran other
    problems are told apart, and settings all of them share are not repeated. Settings in
    `always` are named even where every row shares them: a derivatives run's x0 is where
    it evaluated, which its row must say."""
    by_name: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(str(row.problem.get("name", "?")), {})[problem_key(row.problem)] = (
            row.problem
        )
    labels = {}
    for name, problems in by_name.items():
        keys = sorted({k for p in problems.values() for k in p if k != "name"})
        varying = [
            k
            for k in keys
            if k in always or len({_setting_text(p.get(k)) for p in problems.values()}) > 1
        ]
        for key, problem in problems.items():
            parts = [f"{k}={_setting_text(problem.get(k))}" for k in varying]
            labels[key] = " ".join([name, *parts])
    for row in rows:
        row.problem_label = labels[problem_key(row.problem)]


def differing_settings(rows: Sequence[Row]) -> set[str]:
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


def varying_settings(row: Row, differing: set[str]) -> list[str]:
    """Row's problem, steps and device where they tell rows apart (`differing_settings`):
    for a label."""
    parts = {"problem": row.problem_label, "steps": f"steps={row.steps}", "device": row.device}
    return [text for name, text in parts.items() if name in differing]


def mode_order(mode: str) -> tuple[int, str]:
    """Eager to compiled, as the README's tables go (MODES' order); a mode a plugin
    defines comes after them."""
    name = mode.split("/")[0]
    return (MODES.index(name) if name in MODES else len(MODES), mode)


def row_order(row: Row) -> tuple[Any, ...]:
    """Rows that ran the same problem for as many steps are neighbours: the frameworks'
    rows that compare."""
    return (
        row.dtype,
        numbers_in_order(row.optimizer),
        numbers_in_order(row.problem_label),
        row.steps,
        mode_order(row.mode),
        row.backend,
        row.device,
    )


_NUMBER = re.compile(r"(-?\d+(?:\.\d*)?(?:e[-+]?\d+)?)")


def numbers_in_order(label: str) -> tuple[Any, ...]:
    """A label's sort key with its numbers as numbers: an lr sweep's rows read lr=5e-05,
    0.002, 0.5, 10, not in the order of their text. re.split alternates text and number,
    so keys compare text with text and number with number."""
    parts = _NUMBER.split(label)
    return tuple(float(part) if i % 2 else part for i, part in enumerate(parts))


def set_relative(rows: Sequence[Row]) -> None:
    """Per-step time over the fastest finished row's. A diverged run is no reference: it
    stopped early, often in inf/nan arithmetic of another speed. It still gets a ratio (of
    the steps it ran), which may be below 1.0x; with no finished row there is none."""
    finished = [r.step_us for r in rows if r.status == "finished" and _timed(r)]
    fastest = min(finished, default=math.nan)
    for row in rows:
        row.relative = row.step_us / fastest if _timed(row) else math.nan


def _timed(row: Row) -> bool:
    return math.isfinite(row.step_us) and row.step_us > 0
