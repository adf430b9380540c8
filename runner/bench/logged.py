"""The benchmark's MLflow run: its metrics, params and tags, all read from the results dict.

One run in experiment gradient-runner-bench, named `bench` (`bench --quick` for the smoke
version), tagged as `python -m runner` tags a run: git_commit and git_dirty from the git
state the benchmark read as it started, cpu, cpu_features and env.* from the machine and
environment it recorded (runner.tracking's git_tags and machine_tags, over results.json's
fields of the same names). Each judged target is a tag `target.<key>.<subject>`; a quick
run's counts are too short to judge one, so its verdicts are not logged as verdicts.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.bench.targets import all_targets
from runner.masking import mask_uri
from runner.tracking import KEY_LIMIT, PARAM_VALUE_LIMIT, git_tags, machine_tags, set_terminated
from runner.tracking_store import TrackingTarget, resolve_target

BENCH_EXPERIMENT = "gradient-runner-bench"


def metric_name(text: str) -> str:
    return re.sub(r"[^\w.\-/ ]", "_", text).replace(" ", "_")


def run_name(results: Mapping[str, Any]) -> str:
    """`bench`, or `bench --quick`: a smoke run is not to be taken for a full one."""
    return "bench --quick" if results["settings"].get("quick") else "bench"


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
    metrics |= process_metrics(results.get("process", {}))
    if not results["settings"].get("quick"):  # a smoke run's verdicts are not counted
        verdicts = [t.verdict for t in all_targets(results)]
        metrics["targets_met"] = float(verdicts.count("MET"))
        metrics["targets_not_met"] = float(verdicts.count("NOT MET"))
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def process_metrics(process: Mapping[str, Any]) -> dict[str, float]:
    """The fresh processes' numbers: they reached MLflow only as verdict tags, so a run's
    tracking cost or RSS growth could not be plotted against another run's."""
    metrics: dict[str, float] = {}
    tracking = process.get("tracking", {})
    for key in ("cost_s", "in_process_cost_s", "on_s", "off_s", "stored_after_s"):
        if key in tracking:
            metrics[f"tracking_{key}"] = tracking[key]
    for row in process.get("startup", []):
        if "run_s" in row:
            for key in ("run_s", "import_s", "extra_s"):
                metrics[f"startup_{key}.{row['backend']}"] = row[key]
    for row in process.get("memory", []):
        if "growth_bytes" in row:  # by n: a small --max-n's growth is not n = 1e7's
            label = metric_name(f"{row['label']}.n{row['n']}")
            metrics[f"rss_growth_bytes.{label}"] = row["growth_bytes"]
            metrics[f"rss_growth_in_x.{label}"] = row["growth_in_x"]
            metrics[f"rss_peak_bytes.{label}"] = row["peak_bytes"]
    for row in process.get("cache", []):
        if "ratio" in row:
            label = metric_name(row["label"])
            metrics[f"compile_cache_ratio.{label}"] = row["ratio"]
            metrics[f"first_compile_s.{label}"] = row["first_compile_s"]
            metrics[f"second_compile_s.{label}"] = row["second_compile_s"]
    sweep = process.get("sweep", {})
    for key in ("speedup", "speedup_logged"):
        if key in sweep:
            metrics[f"sweep_{key}"] = sweep[key]
    for name in ("sequential", "joblib_2"):
        if "wall_s" in sweep.get(name, {}):
            metrics[f"sweep_wall_s.{name}"] = sweep[name]["wall_s"]
    return metrics


def param_text(value: Any) -> str:
    """A param as a person types it: a list comma-joined (`tf,torch,jax`, not a tuple's
    repr; an empty one `none`)."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def bench_params(results: Mapping[str, Any]) -> dict[str, str]:
    """The settings, and the machine as `machine.<key>` and `versions.<package>`."""
    settings = dict(results["settings"])
    if settings.get("tracking_uri"):
        settings["tracking_uri"] = mask_uri(settings["tracking_uri"])
    machine = {k: v for k, v in results["machine"].items() if k != "versions"}
    params = {
        **settings,
        **{f"machine.{k}": v for k, v in machine.items()},
        **{f"versions.{k}": v for k, v in results["machine"].get("versions", {}).items()},
    }
    return {
        k[:KEY_LIMIT]: param_text(v)[:PARAM_VALUE_LIMIT] for k, v in params.items() if v is not None
    }


def bench_tags(results: Mapping[str, Any]) -> dict[str, str]:
    """runner.kind, the git and machine tags of a run, and each judged target's verdict
    (a target not measured has none to log)."""
    tags = {"runner.kind": "bench", **git_tags(results.get("git")), **machine_tags(results)}
    if results["settings"].get("quick"):
        return {**tags, "bench.quick": "true"}
    judged = {t.tag[:KEY_LIMIT]: t.verdict for t in all_targets(results) if t.judged}
    return {**tags, **judged}


def bench_target(uri: str | None) -> TrackingTarget:
    """The store the bench logs to: --tracking-uri, else the runner's default store."""
    return resolve_target({"uri": uri, "experiment": BENCH_EXPERIMENT}, Path.cwd())


def log_to_mlflow(results: Mapping[str, Any], out: Path, uri: str | None) -> str:
    """One run (run_name) in experiment gradient-runner-bench; returns its id."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag

    from runner.tracking import client_for, ensure_experiment, log_batched
    from runner.tracking_store import retry_locked

    target = bench_target(uri)
    client = client_for(target)
    experiment_id = ensure_experiment(client, target)
    run = retry_locked(
        lambda: client.create_run(
            experiment_id, run_name=run_name(results), tags={"runner.kind": "bench"}
        )
    )
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in bench_metrics(results).items()]
    params = [Param(k, v) for k, v in bench_params(results).items()]
    tags = [RunTag(k, v) for k, v in bench_tags(results).items()]
    log_batched(client, run_id, metrics=metrics, params=params, tags=tags)
    client.log_artifacts(run_id, str(out))
    set_terminated(client, run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run_id
