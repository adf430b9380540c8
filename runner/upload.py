"""`python -m runner.upload DIR...`: record in MLflow the runs whose tracking store was away.

A run always writes results.json (with its `run_uid`) and trajectory.csv, whether or
not MLflow could be reached. This command finds the run folders under the paths it is
given and logs each one that the store does not hold yet, exactly as a live run is
logged (params from .hydra/config.yaml, tags, metrics, artifacts, status), tagged
`run_uid`. A run counts as held when a run with its run_uid and a results.json
artifact exists; a half-logged one (the store went away while logging it) is
deleted and logged again. Running the command twice adds nothing.

Runs of a sweep are nested under the sweep's parent run, found by its `sweep_id`
tag or created once; a parent left RUNNING by a sweep whose store went away is
closed as FINISHED.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.results import RESULTS_FILE
from runner.tracking import (
    SWEEP_FILE,
    TrackingTarget,
    client_for,
    config_params,
    ensure_experiment,
    finish_run,
    mask_uri,
    read_sweep,
    resolve_target,
    retry_locked,
    run_tags,
    start_run,
    store_error,
)

STATUSES = {"finished": "FINISHED", "skipped": "FINISHED", "diverged": "FAILED"}
UNCOMMITTED_TAGS = ("git_commit", "mlflow.source.git.commit")  # the commit now, not the run's


@dataclass
class Outcome:
    uploaded: int = 0
    present: int = 0
    skipped: int = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner.upload",
        description="Record in MLflow the runs under PATH that the tracking store does not "
        "hold yet (their server was away, or tracking=off). Safe to repeat: a run is "
        "uploaded once, identified by the run_uid in its results.json.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or sweep/output folders")
    parser.add_argument(
        "--tracking-uri",
        help="where to record them (default: each run's own tracking.uri, or its "
        "default store outputs/mlflow.db under the folder it was started from)",
    )
    parser.add_argument("--experiment", help="experiment name (default: each run's own)")
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would be uploaded, upload nothing"
    )
    args = parser.parse_args(argv)
    import mlflow  # noqa: F401  (configures its loggers on import; quieted after)

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
    try:
        outcome = upload(args.paths, args.tracking_uri, args.experiment, dry_run=args.dry_run)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    verb = "would upload" if args.dry_run else "uploaded"
    print(
        f"{verb} {outcome.uploaded}, already recorded {outcome.present}, skipped {outcome.skipped}"
    )
    return 0


def run_dirs(paths: Iterable[Path]) -> Iterator[Path]:
    """Every folder holding a results.json, under each path, in order, once."""
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise RunnerError(f"{path} does not exist; give run folders or sweep folders")
        found = [path / RESULTS_FILE] if (path / RESULTS_FILE).is_file() else []
        found += sorted(path.rglob(RESULTS_FILE)) if path.is_dir() else []
        for results in found:
            folder = results.parent.resolve()
            if folder not in seen:
                seen.add(folder)
                yield folder


def upload(
    paths: Iterable[Path],
    tracking_uri: str | None = None,
    experiment: str | None = None,
    dry_run: bool = False,
    out: Any = None,
) -> Outcome:
    """Upload every run under `paths` that its store does not hold yet; report per run."""
    out = out or sys.stdout
    outcome = Outcome()
    stores: dict[TrackingTarget, tuple[Any, str]] = {}
    parents: dict[tuple[TrackingTarget, str], str] = {}
    for run_dir in run_dirs(paths):
        result = json.loads((run_dir / RESULTS_FILE).read_text())
        if not result.get("run_uid"):
            print(f"skipped {run_dir}: its results.json has no run_uid", file=out)
            outcome.skipped += 1
            continue
        cfg = _config(run_dir, result)
        target = _target(run_dir, cfg, tracking_uri, experiment)
        if target not in stores:
            client = client_for(target)
            stores[target] = (client, ensure_experiment(client, target))
        client, experiment_id = stores[target]
        try:
            held, stale = _existing(client, experiment_id, result["run_uid"])
            if held:
                print(f"already recorded {run_dir} (run {held})", file=out)
                outcome.present += 1
                continue
            outcome.uploaded += 1
            if dry_run:
                print(f"would upload {run_dir} to {mask_uri(target.uri)}", file=out)
                continue
            for run_id in stale:  # half-logged when the store went away: replaced
                retry_locked(lambda run_id=run_id, client=client: client.delete_run(run_id))
            sweep_id = parent = None
            if _in_sweep(run_dir):
                sweep_id = read_sweep(run_dir.parent).sweep_id
                if (target, sweep_id) not in parents:
                    parents[target, sweep_id] = _sweep_parent(
                        client, experiment_id, run_dir.parent, sweep_id
                    )
                parent = parents[target, sweep_id]
            run_id = _upload_one(client, experiment_id, run_dir, cfg, result, sweep_id, parent)
            print(f"uploaded {run_dir} as run {run_id} ({_status(result)})", file=out)
        except RunnerError:
            raise
        except Exception as exc:
            raise store_error(target.uri, exc) from None
    for (target, _), parent in parents.items():
        client = stores[target][0]
        try:
            if client.get_run(parent).info.status == "RUNNING":  # its sweep could not close it
                retry_locked(lambda client=client, parent=parent: client.set_terminated(parent))
        except Exception as exc:
            raise store_error(target.uri, exc) from None
    return outcome


def _status(result: Mapping[str, Any]) -> str:
    return STATUSES.get(result.get("status"), "KILLED")


def _config(run_dir: Path, result: Mapping[str, Any]) -> dict[str, Any]:
    """The run's resolved config from .hydra/config.yaml; a minimal one from results.json."""
    path = run_dir / ".hydra" / "config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        loaded = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]
        except Exception:
            return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]
    mode = {"name": result.get("mode"), "update": result.get("update") or "apply"}
    return {
        "backend": {"name": result.get("backend")},
        "task": result.get("task"),
        "mode": mode,
        "dtype": result.get("dtype"),
    }


def _target(
    run_dir: Path, cfg: Mapping[str, Any], uri: str | None, experiment: str | None
) -> TrackingTarget:
    tracking = dict(cfg.get("tracking") or {})
    if uri:
        tracking["uri"] = uri
    if experiment:
        tracking["experiment"] = experiment
    return resolve_target(tracking, _started_in(run_dir))


def _started_in(run_dir: Path) -> Path:
    """The folder the run's command started in (Hydra's runtime.cwd), for its default store."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", default=None)
        if cwd:
            return Path(cwd)
    return Path.cwd()


def _existing(client: Any, experiment_id: str, uid: str) -> tuple[str | None, list[str]]:
    """(a complete run with this uid, or None; the ids of incomplete ones)."""
    from mlflow.entities import ViewType

    found = retry_locked(
        lambda: client.search_runs(
            [experiment_id], f"tags.run_uid = '{uid}'", run_view_type=ViewType.ACTIVE_ONLY
        )
    )
    stale = []
    for run in found:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        if RESULTS_FILE in names and run.info.status != "RUNNING":
            return run.info.run_id, []
        stale.append(run.info.run_id)
    return None, stale


def _in_sweep(run_dir: Path) -> bool:
    parent = run_dir.parent
    return (parent / SWEEP_FILE).is_file() or (parent / "multirun.yaml").is_file()


def _sweep_parent(client: Any, experiment_id: str, sweep_dir: Path, sweep_id: str) -> str:
    """The sweep's parent run in this store: the one its sweep made, or one made once here."""
    recorded = read_sweep(sweep_dir).parent_run_id
    if recorded:
        try:
            return client.get_run(recorded).info.run_id
        except Exception:
            pass  # made in another store
    found = retry_locked(
        lambda: client.search_runs(
            [experiment_id], f"tags.sweep_id = '{sweep_id}' and tags.`runner.kind` = 'sweep'"
        )
    )
    if found:
        return found[0].info.run_id
    tags = {"sweep_id": sweep_id, "runner.kind": "sweep", "runner.uploaded": "true"}
    run = retry_locked(
        lambda: client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
    )
    return run.info.run_id


def _upload_one(
    client: Any,
    experiment_id: str,
    run_dir: Path,
    cfg: Mapping[str, Any],
    result: Mapping[str, Any],
    sweep_id: str | None,
    parent_run_id: str | None,
) -> str:
    """One run, logged as a live run is, ending with the status its results.json records."""
    from runner.cli import run_name

    tags = {
        k: v
        for k, v in run_tags(cfg, _overrides(run_dir), sweep_id).items()
        if k not in UNCOMMITTED_TAGS
    }
    tags.update({"run_uid": result["run_uid"], "runner.uploaded_from": str(run_dir)})
    config = run_dir / ".hydra" / "config.yaml"
    started = config if config.is_file() else run_dir / RESULTS_FILE
    run_id = start_run(
        client,
        experiment_id,
        run_name(cfg),
        config_params(cfg),
        tags,
        parent_run_id,
        start_time=int(started.stat().st_mtime * 1000),
    )
    status = result.get("status")
    end_tags = {}
    if status == "skipped":
        end_tags["skip_reason"] = str(result.get("reason", ""))[:5000]
    elif status == "diverged":
        end_tags["error"] = (
            f"the loss became {result.get('loss')} at step {result.get('diverged_at')} "
            f"of {result.get('steps')}"
        )
    elif status != "finished":
        end_tags["error"] = "interrupted"
    with _no_run_links():
        problem = finish_run(
            client,
            run_id,
            run_dir,
            _status(result),
            end_tags,
            end_time=int((run_dir / RESULTS_FILE).stat().st_mtime * 1000),
        )
    if problem is not None:
        raise problem
    return run_id


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(path)) or []
    return [str(o) for o in loaded]  # type: ignore[union-attr]


@contextmanager
def _no_run_links() -> Iterator[None]:
    """MLflow prints a "View run" link per run for HTTP stores; the upload prints its own."""
    name = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    before = os.environ.get(name)
    os.environ[name] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


if __name__ == "__main__":
    sys.exit(main())
