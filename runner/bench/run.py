"""`python -m runner.bench`: the command line, the order of sections, outputs and MLflow."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from runner.bench.cases import (
    DEFAULT_BACKENDS,
    DEFAULT_BUDGET_S,
    QUICK_BUDGET_S,
    Settings,
    load_average,
    load_text,
    quick_leaves_out,
    variants,
)
from runner.bench.logged import BENCH_EXPERIMENT, bench_target, log_to_mlflow, run_name
from runner.bench.measure import empty_vectors, floor_section, scalar_section, vector_section
from runner.bench.process import process_section
from runner.bench.report import markdown, scaling_plot, step_time_plot
from runner.bench.targets import all_targets, longest
from runner.command_line import OneLineParser, default_out_dir, out_dir_error
from runner.errors import ConfigError, MissingFrameworkError
from runner.interrupts import stopped
from runner.plugins import load_backend
from runner.protocol import Backend
from runner.provenance import git_state, machine_state, numerics_environment
from runner.tracking_store import TrackingError, check_store, in_command_flags

# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran: runner.provenance's machine_state (cpu, arch, cpu_features:
    what a run records, and what its cpu/cpu_features tags come from), the cores, Python
    and the versions of every package measured."""
    versions = {}
    for name in ("numpy", "tensorflow", "tf_keras", "torch", "jax", "optax", "numba", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return {
        **machine_state(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "load_before": load_average(),
    }


def bench_environment(loaded: Mapping[str, Backend]) -> dict[str, str]:
    """The numerics-relevant environment the measured frameworks ran under: each loaded
    backend's, as its runs record it (numerics_environment: what the user set, and what
    the backend itself set for its framework, as TF's TF_USE_LEGACY_KERAS=1), together;
    read once the backends are loaded, as runner.job reads a run's."""
    found: dict[str, str] = {}
    for backend in loaded.values():
        found |= numerics_environment(framework=backend.framework)
    return dict(sorted(found.items()))


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = OneLineParser(
        prog="python -m runner.bench",
        description="Benchmark every backend x mode against hand-written loops, a native "
        "floor and NumPy, in one process; write results.md, results.json and plots.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke version (seconds): short counts, no torch graph, no TF +legacy, no "
        "subprocess sections; its verdicts are smoke checks",
    )
    parser.add_argument("--out", type=Path, help="new output folder (default outputs/bench/<time>)")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help="comma-separated backends (default: tf,torch,jax)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of N (N >= 3; default 3)")
    parser.add_argument(
        "--max-n",
        type=whole_number,
        default=10_000_000,
        help="largest vector dimension, e.g. 1000 or 1e6 (default 1e7)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="most loop seconds per scalar cell; longer step counts are skipped "
        f"(default {DEFAULT_BUDGET_S:g}; with --quick {QUICK_BUDGET_S:g})",
    )
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-sweep", action="store_true", help="skip the matrix sweep")
    parser.add_argument("--tracking-uri", help="MLflow store (default sqlite outputs/mlflow.db)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3: best-of-N needs a few samples to beat noise")
    backends = tuple(dict.fromkeys(b for b in args.backends.split(",") if b))  # each once
    unknown = [b for b in backends if b not in DEFAULT_BACKENDS]
    if unknown or not backends:
        wrong = f"{unknown[0]!r} has no hand-written loops" if unknown else "names no backend"
        parser.error(
            f"--backends {args.backends!r}: {wrong}; choose from: {', '.join(DEFAULT_BACKENDS)}"
        )
    if args.max_n < 1:
        parser.error(f"--max-n {args.max_n} is not allowed; give a whole number >= 1")
    if args.budget is not None and not args.budget > 0:  # also refuses nan
        parser.error(f"--budget {args.budget} is not allowed; give seconds > 0")
    # --quick's own budget only where none was given: an explicit --budget is the user's
    budget = args.budget
    if budget is None:
        budget = QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S
    out = args.out or default_out_dir("bench")
    if problem := out_dir_error(out, given=args.out is not None):  # before any import
        parser.error(problem)
    return Settings(
        quick=args.quick,
        backends=backends,
        out=out,
        repeats=args.repeats,
        max_n=args.max_n,
        log=not args.no_log,
        tracking_uri=args.tracking_uri,
        sweep=not (args.no_sweep or args.quick),
        budget_s=budget,
    )


def whole_number(text: str) -> int:
    """An int, also as the help and the issue write sizes (1e7): int() refused `1e3`."""
    try:
        return int(text)
    except ValueError:
        number = float(text)  # a ValueError here is argparse's "invalid whole_number value"
        if not number.is_integer():
            raise
        return int(number)


def load_backends(settings: Settings, say: Callable[[str], None]) -> dict[str, Backend]:
    """Import each framework once, through the runner's plugin loader; time the import."""
    loaded = {}
    for name in settings.backends:
        start = time.perf_counter()
        loaded[name] = load_backend(name)
        say(f"  {name}: imported in {time.perf_counter() - start:.2f} s")
    return loaded


def run_bench(settings: Settings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every section in order; returns the results (also written to settings.out).

    Stopped by Ctrl-C once the floor is measured, it writes what was measured until then
    (marked `interrupted`) before the KeyboardInterrupt goes on: a full run is 15-20
    minutes, and its first sections are worth keeping.
    """
    git = git_state()  # the code that runs, as it starts: a commit made later is not it
    started = datetime.now().isoformat(timespec="seconds")
    machine = machine_info()
    say(f"benchmark -> {settings.out} (load average {load_text(machine['load_before'])})")
    if settings.quick:
        say(f"quick (smoke) run: it leaves out {quick_leaves_out(settings.backends)}")
    loaded = load_backends(settings, say)
    say("native floor (numba)")
    plain = asdict(settings) | {"out": str(settings.out), "dims": list(settings.dims)}
    results: dict[str, Any] = {
        "started": started,
        "git": git,
        "machine": machine,
        "environment": bench_environment(loaded),
        "settings": plain,
        "floor": floor_section(settings),
        "scalar": [],
        "vectors": empty_vectors(),
        "process": {},
    }
    try:
        say("scalar quadratic: runner vs hand-written")
        scalar_section(settings, loaded, say, results["scalar"])
        say("n-dimensional quadratic")
        vector_section(settings, loaded, say, results["vectors"])
        if not settings.quick:
            compiled = [v for v in variants(list(loaded), False) if v.compiled]
            process_section(settings, compiled, say, results["process"])
    except KeyboardInterrupt:
        results["interrupted"] = True
        raise
    finally:
        machine["load_after"] = load_average()
        write_outputs(results, settings.out)
    return results


def write_outputs(results: Mapping[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results) | {
        "targets": [asdict(t) | {"verdict": t.verdict} for t in all_targets(results)]
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    if longest(results["scalar"]):  # an interrupted run may have none yet
        step_time_plot(results, out / "step_time.png")
    if results["vectors"]["numpy"]:
        scaling_plot(results["vectors"], out / "n_scaling.png")


def stamped() -> Callable[[str], None]:
    """Progress lines with the seconds since start, flushed (the full run is long)."""
    start = time.perf_counter()
    return lambda text: print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    began = time.time()
    try:
        if settings.log:  # a store that cannot take the run is said now, not after the run
            check_store(bench_target(settings.tracking_uri))
        results = run_bench(settings, stamped())
    except (ConfigError, MissingFrameworkError, TrackingError) as exc:  # nothing measured yet
        print(f"error: {bench_wording(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (runner.interrupts)
        written = settings.out / "results.json"  # by this run, not one before it in --out
        kept = written.exists() and written.stat().st_mtime >= began
        where = f"what was measured is in {settings.out}" if kept else "nothing was measured"
        print(file=sys.stderr)  # below the progress line the stop cut
        return stopped(stop, f"{where} (not logged to MLflow)")
    print(f"\nwrote {settings.out}/results.md, results.json, step_time.png, n_scaling.png\n")
    print((settings.out / "results.md").read_text())
    if settings.log:
        try:
            run_id = log_to_mlflow(results, settings.out, settings.tracking_uri)
        except TrackingError as exc:  # the store failed during the run: the files stay
            print(
                f"error: {bench_wording(exc)}; the results are in {settings.out}", file=sys.stderr
            )
            return exc.exit_code
        print(
            f"logged to MLflow: experiment {BENCH_EXPERIMENT}, run '{run_name(results)}' ({run_id})"
        )
    return 0


def bench_wording(exc: Exception) -> str:
    """The tracking layer's advice, in this command's flags instead of the runner's."""
    return in_command_flags(str(exc), off="--no-log")
