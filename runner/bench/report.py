"""Turns the measurements into verdicts, a markdown report and two plots.

Works on the plain results dict (what results.json holds), so a report can be
re-rendered from a saved run without measuring again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner.bench.cases import FRAMEWORK_MODULE, model_bytes, vector_failure
from runner.protocol import EAGER_MODES


@dataclass(frozen=True)
class Target:
    """One target of issue 7, judged from the measurements: met is None if not measured.

    A target that does not apply (a persistent cache for a framework that has none)
    keeps its measurement for the record and reads "n/a".
    """

    target: str
    subject: str
    measured: str
    met: bool | None
    applies: bool = True

    @property
    def verdict(self) -> str:
        if not self.applies:
            return "n/a"
        return {True: "MET", False: "NOT MET", None: "not measured"}[self.met]


def longest(cells: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each variant's measured cell with the most steps: the steady state."""
    found: dict[str, Mapping[str, Any]] = {}
    for cell in cells:
        if "ratio" in cell and cell["steps"] >= found.get(cell["label"], {}).get("steps", 0):
            found[cell["label"]] = cell
    return found


def paired_ratios(cell: Mapping[str, Any]) -> str:
    """The range of runner / hand-written over the repeats, each repeat's two loops run
    back to back.

    The verdict's ratio is best over best; the pairs, each run back to back under the
    same load, show how far this run's machine moved it: a cell that misses 1.05 by
    less than that spread may meet it in the next run.
    """
    runner, hand = cell.get("runner_samples_us", []), cell.get("hand_samples_us", [])
    pairs = [r / h for r, h in zip(runner, hand, strict=True)]
    return f"{min(pairs):.3f}-{max(pairs):.3f}" if pairs else "-"


def ratio_targets(cells: Sequence[Mapping[str, Any]]) -> list[Target]:
    return [
        Target(
            "runner / hand-written <= 1.05",
            label,
            f"{cell['ratio']:.3f} at {cell['steps']:,} steps (repeat pairs {paired_ratios(cell)})",
            cell["ratio"] <= 1.05,
        )
        for label, cell in longest(cells).items()
    ]


def floor_targets(cells: Sequence[Mapping[str, Any]], floor: Mapping[str, Any]) -> list[Target]:
    """JAX and TF+XLA within 2x of the numba floor at >= 1e6 steps; torch <= 100 ns.

    Judged on each mode's longest measured run; below 1e5 steps a run's fixed cost
    still shows in its per-step time, so shorter runs are not judged at all.
    """
    found = []
    last = longest(cells)
    goals = {
        "jax graph": "2x",
        "tf graph+xla": "2x",
        "tf graph+xla+legacy": "2x",
        "torch graph": "100ns",
    }
    for label, goal in goals.items():
        cell = last.get(label)
        if cell is None:
            continue
        name = (
            "compiled <= 100 ns/step" if goal == "100ns" else "compiled within 2x of native floor"
        )
        steps = cell["steps"]
        if steps < 100_000:
            found.append(Target(name, label, f"only {steps:,} steps measured", None))
            continue
        ns = cell["runner_step_us"] * 1e3
        at = f" at {steps:,} steps"
        if goal == "100ns":
            found.append(Target(name, label, f"{ns:.1f} ns{at}", ns <= 100))
            continue
        floor_ns = floor["ns_per_step"].get(str(steps), math.nan)
        multiple = ns / floor_ns
        measured = f"{multiple:.2f}x ({ns:.1f} ns vs {floor_ns:.2f} ns){at}"
        found.append(Target(name, label, measured, multiple <= 2))
    return found


def eager_targets(cells: Sequence[Mapping[str, Any]]) -> list[Target]:
    """Eager JAX <= 25 us/step; each eager mode <= 1.5x its framework's fastest idiom."""
    last = {k: v for k, v in longest(cells).items() if v["mode"] in EAGER_MODES}
    found = [
        Target(
            "eager JAX <= 25 us/step",
            label,
            f"{cell['runner_step_us']:.1f} us",
            cell["runner_step_us"] <= 25,
        )
        for label, cell in last.items()
        if cell["backend"] == "jax"
    ]
    for backend in sorted({c["backend"] for c in last.values()}):
        mine = [c for c in last.values() if c["backend"] == backend]
        fastest = min(mine, key=lambda c: c["hand_step_us"])
        for cell in mine:
            multiple = cell["runner_step_us"] / fastest["hand_step_us"]
            measured = (
                f"{multiple:.2f}x of hand {fastest['mode']} ({fastest['hand_step_us']:.1f} us)"
            )
            if cell is not fastest:  # what the framework's own idiom for this mode costs
                own = cell["hand_step_us"] / fastest["hand_step_us"]
                measured += f"; hand {cell['mode']} itself {own:.2f}x"
            found.append(
                Target(
                    "eager <= 1.5x fastest hand-written eager idiom",
                    cell["label"],
                    measured,
                    multiple <= 1.5,
                )
            )
    return found


def process_targets(process: Mapping[str, Any], dims: Sequence[int]) -> list[Target]:
    found = []
    tracking = process.get("tracking", {})
    if "cost_s" in tracking:
        cost = tracking["cost_s"]
        measured = f"{cost * 1e3:.0f} ms (background upload)"
        if "in_process_cost_s" in tracking:
            measured += f"; in-process {tracking['in_process_cost_s'] * 1e3:.0f} ms"
        found.append(Target("tracking adds <= 100 ms", "jax 1000 steps", measured, cost <= 0.1))
    for row in process.get("startup", []):
        if "run_s" not in row:
            continue
        added = row.get("added_by_runner", row["imports"])
        others = [m for m in added if m not in (FRAMEWORK_MODULE[row["backend"]], "mlflow")]
        seen = ", ".join(row["imports"]) or "none seen"
        bare = ", ".join(row.get("framework_imports", [])) or "-"
        found.append(
            Target(
                "a run imports only its framework",
                row["backend"],
                f"{seen} (the bare import itself: {bare})",
                not others,
            )
        )
        found.append(
            Target(
                "run wall <= framework import + 1.5 s",
                row["backend"],
                f"{row['run_s']:.2f} s vs import {row['import_s']:.2f} s (+{row['extra_s']:.2f})",
                row["extra_s"] <= 1.5,
            )
        )
    n = max(dims)
    for row in process.get("memory", []):
        if "growth_bytes" not in row:
            continue
        found.append(
            Target(
                f"peak RSS at n={n:.0e} <= 3x bytes(x) + baseline",
                row["label"],
                f"+{row['growth_bytes'] / 1e6:.0f} MB = {row['growth_in_x']:.1f}x bytes(x)",
                row["growth_bytes"] <= 3 * row["x_bytes"],
            )
        )
    for row in process.get("cache", []):
        if "ratio" not in row:
            continue
        tf = row["label"].startswith("tf ")  # TensorFlow has no persistent compile cache
        found.append(
            Target(
                "second compile <= 25% of first (persistent cache)",
                row["label"],
                f"{row['ratio']:.0%} ({row['second_compile_s']:.2f} s / "
                f"{row['first_compile_s']:.2f} s)" + ("; TF has no such cache" if tf else ""),
                row["ratio"] <= 0.25,
                applies=not tf,
            )
        )
    return found


def bandwidth_targets(vectors: Mapping[str, Any]) -> list[Target]:
    """At n = 1e7 only (the issue's size); not measured when --max-n is smaller."""
    stream = {row["n"]: row["stream_gbps"] for row in vectors["numpy"]}
    if 10_000_000 not in stream:
        return []
    found = []
    for row in vectors["rows"]:
        if row["n"] != 10_000_000:
            continue
        if "gbps" not in row:
            found.append(
                Target(
                    ">= 50% of NumPy bandwidth at n=1e7", row["label"], vector_failure(row), None
                )
            )
            continue
        share = row["gbps"] / stream[row["n"]]
        found.append(
            Target(
                ">= 50% of NumPy bandwidth at n=1e7",
                row["label"],
                f"{share:.0%} ({row['gbps']:.1f} of {stream[row['n']]:.1f} GB/s)",
                share >= 0.5,
            )
        )
    return found


def all_targets(results: Mapping[str, Any]) -> list[Target]:
    cells = results["scalar"]
    return [
        *ratio_targets(cells),
        *floor_targets(cells, results["floor"]),
        *eager_targets(cells),
        *bandwidth_targets(results["vectors"]),
        *process_targets(results.get("process", {}), results["settings"]["dims"]),
    ]


# --------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 3) -> str:
    """Three significant digits; big numbers in full with separators, never 1e+03."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def scalar_rows(cells: Sequence[Mapping[str, Any]], floor: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for cell in cells:
        head = [cell["label"], f"{cell['steps']:,}"]
        if "ratio" not in cell:
            rows.append([*head, cell.get("skipped") or cell.get("error"), *["-"] * 7])
            continue
        floor_ns = floor["ns_per_step"].get(str(cell["steps"]))
        multiple = cell["runner_step_us"] * 1e3 / floor_ns if floor_ns else math.nan
        rows.append(
            [
                *head,
                cell["runner_step_us"],
                cell["hand_step_us"],
                f"{cell['ratio']:.3f}",
                paired_ratios(cell),
                cell["runner_compile_s"],
                cell["hand_compile_s"],
                f"{multiple:,.0f}x" if cell["mode"] == "graph" else "-",
                f"{cell['runner_x']:.8f}",
            ]
        )
    return rows


def vector_rows(vectors: Mapping[str, Any]) -> list[list[Any]]:
    stream = {row["n"]: row for row in vectors["numpy"]}
    rows = []
    for row in vectors["numpy"]:
        rows.append(
            [
                "numpy update (out=)",
                f"{row['n']:,}",
                row["steps"],
                row["update_step_us"],
                row["update_gbps"],
                "-",
                f"stream {row['stream_gbps']:.1f} GB/s",
            ]
        )
    for row in vectors["rows"]:
        head = [row["label"], f"{row['n']:,}", row["steps"]]
        if "gbps" not in row:
            rows.append([*head, "-", "-", "-", vector_failure(row)])
            continue
        share = row["gbps"] / stream[row["n"]]["stream_gbps"]
        # Below 1e5 a step is call overhead and cache, not memory traffic: no share.
        versus = f"{share:.0%} of NumPy stream" if row["n"] >= 100_000 else "-"
        rows.append([*head, row["step_us"], row["gbps"], row["final_s"] * 1e3, versus])
    return rows


def process_lines(process: Mapping[str, Any]) -> list[str]:
    if not process:
        return ["Skipped (--quick).", ""]
    lines = ["### Tracking, start-up, sweeps, memory, compile cache", ""]
    tracking = process.get("tracking", {})
    if "cost_s" in tracking:
        lines += [
            f"- MLflow tracking, `python -m runner backend=jax steps=1000`, best of "
            f"{len(tracking['on_samples_s'])}: the command returns after "
            f"{tracking['on_s']:.2f} s with tracking on (the default: logged by a background "
            f"upload) vs {tracking['off_s']:.2f} s with tracking=off "
            f"-> **{tracking['cost_s'] * 1e3:.0f} ms** per run; the run is in the store "
            f"{tracking.get('stored_after_s', math.nan):.2f} s after the command started. "
            f"In-process (tracking.background=false): {tracking.get('in_process_s', math.nan):.2f}"
            f" s -> {tracking.get('in_process_cost_s', math.nan) * 1e3:.0f} ms. First run, "
            f"creating the store: {tracking['first_run_with_store_creation_s']:.2f} s.",
            "",
        ]
    startup = [r for r in process.get("startup", []) if "run_s" in r]
    lines += table(
        ["backend", "import framework (s)", "run steps=10 (s)", "run - import (s)", "imports"],
        [
            [
                r["backend"],
                r["import_s"],
                r["run_s"],
                r["extra_s"],
                f"{', '.join(r['imports'])} (bare import: {', '.join(r['framework_imports'])})",
            ]
            for r in startup
        ],
    )
    memory = [r for r in process.get("memory", []) if "peak_bytes" in r]
    lines += table(
        [
            "compiled mode",
            "n",
            "baseline RSS (MB)",
            "peak RSS (MB)",
            "growth (MB)",
            "growth/bytes(x)",
        ],
        [
            [
                r["label"],
                f"{r['n']:,}",
                r["baseline_bytes"] / 1e6,
                r["peak_bytes"] / 1e6,
                r["growth_bytes"] / 1e6,
                f"{r['growth_in_x']:.1f}x",
            ]
            for r in memory
        ],
    )
    cache = [r for r in process.get("cache", []) if "ratio" in r]
    lines += table(
        ["compiled mode", "first compile (s)", "second, fresh process (s)", "second/first"],
        [
            [r["label"], r["first_compile_s"], r["second_compile_s"], f"{r['ratio']:.0%}"]
            for r in cache
        ],
    )
    sweep = process.get("sweep")
    if sweep and "speedup" in sweep:
        seq, par = sweep["sequential"], sweep["joblib_2"]
        lines += [
            f"- 12-run matrix sweep (`+experiment=matrix` vs `+experiment=matrix_parallel`, "
            f"best of {len(seq['wall_samples_s'])}, warm compile caches): sequential "
            f"{seq['wall_s']:.1f} s ({seq['results']} results), joblib with 2 workers "
            f"{par['wall_s']:.1f} s ({par['results']} results): **{sweep['speedup']:.2f}x**; "
            f"until the last run is in MLflow {seq['logged_s']:.1f} s vs {par['logged_s']:.1f} s "
            f"({sweep['speedup_logged']:.2f}x).",
            "",
        ]
    errors = [
        f"{k}: {v['error']}" for k, v in process.items() if isinstance(v, dict) and "error" in v
    ]
    errors += [
        r["error"]
        for k in ("startup", "memory", "cache")
        for r in process.get(k, [])
        if "error" in r
    ]
    return lines + [f"- error: {e}" for e in errors] + ([""] if errors else [])


def markdown(results: Mapping[str, Any]) -> str:
    machine, settings = results["machine"], results["settings"]
    floor = results["floor"]
    lines = [
        f"# Benchmark {results['started']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"load average {machine['load_before']} before, {machine['load_after']} after. "
        f"Best of {settings['repeats']} repeats, interleaved; float32; CPU.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}.",
        "",
        *(
            ["**Interrupted** (Ctrl-C): what follows is what was measured before it.", ""]
            if results.get("interrupted")
            else []
        ),
        "## Targets (issue 7)",
        "",
        *table(
            ["target", "subject", "measured", "verdict"],
            [[t.target, t.subject, t.measured, t.verdict] for t in all_targets(results)],
        ),
        "## Scalar quadratic: runner vs hand-written loop",
        "",
        "Native floor (numba @njit loop, x -= lr*(2*a*x + b)): "
        + ", ".join(
            f"{float(v):.2f} ns/step at {int(k):,}" for k, v in floor["ns_per_step"].items()
        )
        + f" (compile {floor['compile_s']:.2f} s).",
        "",
        *table(
            [
                "backend mode",
                "steps",
                "runner us/step",
                "hand us/step",
                "runner/hand",
                "repeat pairs",
                "runner compile (s)",
                "hand compile (s)",
                "x floor",
                "final x",
            ],
            scalar_rows(results["scalar"], floor),
        ),
        "## n-dimensional quadratic (compiled modes)",
        "",
        f"Bytes per step: {results['vectors']['bytes_model']}. us/step is the loop alone; the"
        " final state's read-back, paid once a run, is its own column.",
        "",
        *table(
            ["mode", "n", "steps", "us/step", "GB/s (model)", "final state (ms)", "vs NumPy"],
            vector_rows(results["vectors"]),
        ),
        *process_lines(results.get("process", {})),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def step_time_plot(results: Mapping[str, Any], path: Path) -> None:
    """Per-step time of every variant (runner and hand-written) on a log axis, with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(longest(results["scalar"]).values())
    labels = [f"{c['label']}\n{c['steps']:,}" for c in cells]
    where = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cells) + 2), 4.5))
    ax.bar(where - 0.2, [c["runner_step_us"] * 1e3 for c in cells], 0.4, label="runner")
    ax.bar(where + 0.2, [c["hand_step_us"] * 1e3 for c in cells], 0.4, label="hand-written")
    floor = results["floor"]["ns_per_step"]
    ax.axhline(min(floor.values()), color="k", ls="--", lw=1, label="native floor (numba)")
    ax.set_yscale("log")
    ax.set_ylabel("time per step (ns, log)")
    ax.set_xticks(where, labels, fontsize=7)
    ax.set_title("Scalar quadratic: time per step, most steps measured")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_plot(vectors: Mapping[str, Any], path: Path) -> None:
    """Time per step and achieved bandwidth against n, with NumPy's streaming bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    numpy_rows = vectors["numpy"]
    ns = np.array([r["n"] for r in numpy_rows], dtype=float)
    stream = np.array([r["stream_gbps"] for r in numpy_rows])
    left.plot(ns, [r["update_step_us"] for r in numpy_rows], "k.-", label="numpy update")
    left.plot(ns, model_bytes(1) * ns / (stream * 1e9) * 1e6, "k--", lw=1, label="bandwidth line")
    right.plot(ns, stream, "k--", lw=1, label="NumPy stream")
    right.plot(ns, [r["update_gbps"] for r in numpy_rows], "k.-", label="numpy update")
    for label in sorted({r["label"] for r in vectors["rows"]}):
        rows = [r for r in vectors["rows"] if r["label"] == label and "gbps" in r]
        if not rows:
            continue
        x = [r["n"] for r in rows]
        left.plot(x, [r["step_us"] for r in rows], "o-", label=label)
        right.plot(x, [r["gbps"] for r in rows], "o-", label=label)
    left.set(xscale="log", yscale="log", xlabel="n", ylabel="us per step (log)")
    right.set(xscale="log", yscale="log", xlabel="n", ylabel="GB/s (bytes model, log)")
    left.set_title("n-dim quadratic: time per step")
    right.set_title(f"bandwidth ({vectors['bytes_model']})", fontsize=8)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
