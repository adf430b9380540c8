"""`python -m runner.bench`: the command line, the order of sections, outputs and MLflow."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from runner.bench.cases import DEFAULT_BACKENDS, Settings, load_average, variants
from runner.bench.measure import empty_vectors, floor_section, scalar_section, vector_section
from runner.bench.process import process_section
from runner.bench.report import all_targets, longest, markdown, scaling_plot, step_time_plot
from runner.command_line import OneLineParser, out_dir_error
from runner.errors import ConfigError, MissingFrameworkError
from runner.plugins import load_backend
from runner.protocol import Backend
from runner.tracking_store import (
    TrackingError,
    TrackingTarget,
    check_store,
    in_command_flags,
    resolve_target,
)


def metric_name(text: str) -> str:
    return re.sub(r"[^\w.\-/ ]", "_", text).replace(" ", "_")


def bench_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for cell in results["scalar"]:
        if "ratio" in cell:
            key = metric_name(f"{cell['label']}.{cell['steps']}")
            metrics[f"step_us.{key}"] = cell["runner_step_us"]
            metrics[f"hand_step_us.{key}"] = cell["hand_step_us"]
            metrics[f"ratio.{key}"] = cell["ratio"]
            metrics[f"compile_s.{key}"] = cell["runner_compile_s"]
    for row in results["vectors"]["rows"]:
        if "gbps" in row:
            key = metric_name(f"{row['label']}.n{row['n']}")
            metrics[f"vector_step_us.{key}"] = row["step_us"]
            metrics[f"vector_gbps.{key}"] = row["gbps"]
            metrics[f"vector_final_s.{key}"] = row["final_s"]
    for row in results["vectors"]["numpy"]:
        metrics[f"numpy_stream_gbps.n{row['n']}"] = row["stream_gbps"]
    for steps, ns in results["floor"]["ns_per_step"].items():
        metrics[f"floor_ns.{steps}"] = ns
    verdicts = [t.verdict for t in all_targets(results)]
    metrics["targets_met"] = float(verdicts.count("MET"))
    metrics["targets_not_met"] = float(verdicts.count("NOT MET"))
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


BENCH_EXPERIMENT = "gradient-runner-bench"


def bench_target(uri: str | None) -> TrackingTarget:
    """The store the bench logs to: --tracking-uri, else the runner's default store."""
    return resolve_target({"uri": uri, "experiment": BENCH_EXPERIMENT}, Path.cwd())


def log_to_mlflow(results: Mapping[str, Any], out: Path, uri: str | None) -> str:
    """One run named "bench" in experiment gradient-runner-bench; returns its id."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag

    from runner.tracking import client_for, ensure_experiment, log_batched
    from runner.tracking_store import retry_locked

    target = bench_target(uri)
    client = client_for(target)
    experiment_id = ensure_experiment(client, target)
    run = retry_locked(
        lambda: client.create_run(experiment_id, run_name="bench", tags={"runner.kind": "bench"})
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in bench_metrics(results).items()]
    settings = results["settings"]
    params = [Param(k, str(v)[:500]) for k, v in settings.items()]
    params += [Param(f"machine.{k}", str(v)[:500]) for k, v in results["machine"].items()]
    tags = [
        RunTag(metric_name(f"target.{t.subject}.{t.target}")[:250], t.verdict)
        for t in all_targets(results)
    ]
    log_batched(client, run_id, metrics=metrics, params=params, tags=tags)
    client.log_artifacts(run_id, str(out))
    retry_locked(lambda: client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED)))
    return run_id


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("numpy", "tensorflow", "tf_keras", "torch", "jax", "optax", "numba", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "load_before": load_average(),
    }


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = OneLineParser(
        prog="python -m runner.bench",
        description="Benchmark every backend x mode against hand-written loops, a native "
        "floor and NumPy, in one process; write results.md, results.json and plots.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/bench/<time>)")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help="comma-separated backends (default: tf,torch,jax)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of N (N >= 3; default 3)")
    parser.add_argument(
        "--max-n", type=int, default=10_000_000, help="largest vector dimension (default 1e7)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=120.0,
        help="most loop seconds per scalar cell; longer step counts are skipped (default 120)",
    )
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-sweep", action="store_true", help="skip the matrix sweep")
    parser.add_argument("--tracking-uri", help="MLflow store (default sqlite outputs/mlflow.db)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3: best-of-N needs a few samples to beat noise")
    backends = tuple(b for b in args.backends.split(",") if b)
    unknown = [b for b in backends if b not in DEFAULT_BACKENDS]
    if unknown or not backends:
        wrong = f"{unknown[0]!r} has no hand-written loops" if unknown else "names no backend"
        parser.error(
            f"--backends {args.backends!r}: {wrong}; choose from: {', '.join(DEFAULT_BACKENDS)}"
        )
    if args.max_n < 1:
        parser.error(f"--max-n {args.max_n} is not allowed; give a whole number >= 1")
    if not args.budget > 0:  # also refuses nan
        parser.error(f"--budget {args.budget} is not allowed; give seconds > 0")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = args.out or Path("outputs") / "bench" / stamp
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
        budget_s=5.0 if args.quick else args.budget,
    )


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
    started = datetime.now().isoformat(timespec="seconds")
    machine = machine_info()
    say(f"benchmark -> {settings.out} (load {machine['load_before']})")
    loaded = load_backends(settings, say)
    say("native floor (numba)")
    plain = asdict(settings) | {"out": str(settings.out), "dims": list(settings.dims)}
    results: dict[str, Any] = {
        "started": started,
        "machine": machine,
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
    except KeyboardInterrupt:
        written = settings.out / "results.json"  # by this run, not one before it in --out
        kept = written.exists() and written.stat().st_mtime >= began
        where = f"what was measured is in {settings.out}" if kept else "nothing was measured"
        print(f"\ninterrupted: {where} (not logged to MLflow)", file=sys.stderr)
        return 130
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
        print(f"logged to MLflow: experiment {BENCH_EXPERIMENT}, run 'bench' ({run_id})")
    return 0


def bench_wording(exc: Exception) -> str:
    """The tracking layer's advice, in this command's flags instead of the runner's."""
    return in_command_flags(str(exc), off="--no-log")
