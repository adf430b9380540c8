"""Turns the measurements and their verdicts (runner.bench.targets) into a markdown
report and two plots.

Works on the plain results dict (what results.json holds), so a report can be
re-rendered from a saved run without measuring again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runner.bench.cases import (
    PROCESS_SECTIONS,
    load_text,
    model_bytes,
    quick_leaves_out,
    vector_failure,
)
from runner.bench.targets import all_targets, longest, paired_ratios

# --------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 3) -> str:
    """Three significant digits; big numbers in full with separators, never 1e+03."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table; none at all (not a header alone) when there are no rows."""
    if not rows:
        return []
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
                # two decimals: the 2x target is read here (1.13x showed as "1x")
                f"{multiple:,.2f}x" if cell["mode"] == "graph" else "-",
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
                f"{row['steps']:,}",
                row["update_step_us"],
                row["update_gbps"],
                "-",
                f"stream {row['stream_gbps']:.1f} GB/s",
            ]
        )
    for row in vectors["rows"]:
        head = [row["label"], f"{row['n']:,}", f"{row['steps']:,}"]
        if "gbps" not in row:
            rows.append([*head, "-", "-", "-", vector_failure(row)])
            continue
        share = row["gbps"] / stream[row["n"]]["stream_gbps"]
        # Below 1e5 a step is call overhead and cache, not memory traffic: no share.
        versus = f"{share:.0%} of NumPy stream" if row["n"] >= 100_000 else "-"
        rows.append([*head, row["step_us"], row["gbps"], row["final_s"] * 1e3, versus])
    return rows


def process_lines(results: Mapping[str, Any]) -> list[str]:
    """The fresh-process section, and what of it this run did not measure and why: a quick
    run skips it, an interrupted one may stop before it, --no-sweep skips the sweep (a
    bare "Skipped (--quick)." stood under an interrupted full run too)."""
    settings, process = results["settings"], results.get("process", {})
    lines = ["### Fresh processes: tracking, start-up, memory, compile cache, sweep", ""]
    if settings.get("quick"):
        return [*lines, f"Skipped (--quick): {', '.join(PROCESS_SECTIONS.values())}.", ""]
    wanted = [k for k in PROCESS_SECTIONS if k != "sweep" or settings.get("sweep", True)]
    if missing := [PROCESS_SECTIONS[k] for k in wanted if k not in process]:
        why = " (the run was interrupted by Ctrl-C first)" if results.get("interrupted") else ""
        lines += [f"Not measured{why}: {', '.join(missing)}.", ""]
    if not settings.get("sweep", True):
        lines += ["Matrix sweep skipped (--no-sweep).", ""]
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


def header_lines(results: Mapping[str, Any]) -> list[str]:
    """Which code (the commit the run started at), where (CPU, its features, the
    numerics-relevant environment) and how (repeats, budget; --quick says what it left
    out): the provenance python -m runner records for a run, here for the benchmark."""
    machine, settings = results["machine"], results["settings"]
    git = results.get("git")
    commit = "no git commit recorded"
    if git:
        commit = f"commit {git['commit'][:7]}" + (" (uncommitted changes)" if git["dirty"] else "")
    quick = settings.get("quick")
    features = machine.get("cpu_features")
    environment = results.get("environment") or {}
    repeats = settings["repeats"]
    return [
        f"# Benchmark {results['started']}, {commit}" + (", quick (smoke) run" if quick else ""),
        "",
        *(
            [
                f"Quick (smoke) run: it leaves out {quick_leaves_out(settings['backends'])}. "
                "Its counts are too short to judge a target: the verdicts below are smoke "
                "checks, not results.",
                "",
            ]
            if quick
            else []
        ),
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"load average {load_text(machine['load_before'])} before, "
        f"{load_text(machine['load_after'])} after. "
        f"CPU features: {', '.join(features or []) or 'none'}"
        + (" (unknown)" if features is None else "")
        + ". Numerics environment: "
        + (", ".join(f"{k}={v}" for k, v in environment.items()) or "none set")
        + ".",
        f"Best of {repeats} repeats, interleaved (the floor and NumPy rows: best of "
        f"{max(repeats, 5)}); at most {settings.get('budget_s', math.nan):g} s of loops per "
        "scalar cell (--budget); float32; CPU.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}.",
        "",
        *(
            ["**Interrupted** (Ctrl-C): what follows is what was measured before it.", ""]
            if results.get("interrupted")
            else []
        ),
    ]


def markdown(results: Mapping[str, Any]) -> str:
    quick = results["settings"].get("quick")
    floor = results["floor"]
    lines = [
        *header_lines(results),
        "## Targets (issue 7)" + (": smoke checks only (--quick), not verdicts" if quick else ""),
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
        *process_lines(results),
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
