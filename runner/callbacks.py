"""Hydra callbacks: a multirun is one group in MLflow, ending with the comparison report.

on_multirun_start runs once, in the launching process, before any worker exists:
it creates the SQLite schema, the experiment and the sweep's parent run, so
parallel workers never race to create them, and leaves the parent's id in the
sweep folder where every job (any launcher, any host sharing the folder) reads it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.results import sweep_failures
from runner.tracking import (
    SWEEP_FILE,
    TrackingError,
    client_for,
    ensure_experiment,
    read_sweep,
    resolve_target,
    retry_locked,
)


class SweepTracking(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = _tracking(config)
        if not tracking.get("enabled", True):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        target = resolve_target(tracking, Path(config.hydra.runtime.cwd))
        try:
            client = client_for(target)
            experiment_id = ensure_experiment(client, target)
        except TrackingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return  # each job reports the outage itself and still writes its files
        sweep_id = sweep_dir.as_posix()
        overrides = " ".join(config.hydra.overrides.task)
        parent = retry_locked(
            lambda: client.create_run(
                experiment_id,
                run_name=f"sweep {sweep_dir.name}",
                tags={"sweep_id": sweep_id, "runner.kind": "sweep", "overrides": overrides},
            )
        )
        info = {"sweep_id": sweep_id, "parent_run_id": parent.info.run_id}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        self._close_sweep(config, sweep_dir)
        failures = sweep_failures(sweep_dir)
        if failures:  # every job ran; a script still learns that some did not succeed
            jobs = len(list(sweep_dir.glob("**/.hydra")))
            first = failures[0]
            print(
                f"error: {len(failures)} of {jobs} jobs failed; the first: {first['error']}",
                file=sys.stderr,
            )
            sys.exit(first["exit_code"])

    def _close_sweep(self, config: DictConfig, sweep_dir: Path) -> None:
        tracking = _tracking(config)
        sweep = read_sweep(sweep_dir)
        if not tracking.get("enabled", True) or sweep.parent_run_id is None:
            return
        target = resolve_target(tracking, Path(config.hydra.runtime.cwd))
        try:
            client = client_for(target)
        except TrackingError as exc:
            print(
                f"error: {exc}; the sweep's parent run stays open until "
                f"python -m runner.upload {sweep_dir} closes it",
                file=sys.stderr,
            )
            return
        status = "FINISHED"
        from runner.compare import CompareError, compare

        try:
            report = compare(
                target.uri,
                target.experiment,
                sweep_id=sweep.sweep_id,
                out_dir=sweep_dir / "compare",
                log_to_run_id=sweep.parent_run_id,
                client=client,
            )
            print(report.text)
        except CompareError as exc:  # e.g. every job failed: nothing to compare
            print(f"no comparison report: {exc}", file=sys.stderr)
        except Exception as exc:  # the sweep's runs are all recorded; say why no report
            status = "FAILED"
            print(f"error: comparison report not made: {exc}", file=sys.stderr)
        finally:
            retry_locked(lambda: client.set_terminated(sweep.parent_run_id, status))


def _tracking(config: DictConfig) -> dict[str, Any]:
    node = config.get("tracking")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}
