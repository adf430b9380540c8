"""Results as plain data: results.json and trajectory.csv, written atomically.

MLflow, the terminal summary and the comparison report all read these dicts, so a
run that cannot reach its tracking server still leaves the same record on disk.
Floats are written as the exact binary value (repr of the float64 that holds it),
so a float32 result read back is the same float32 to the last ulp.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner import __version__
from runner.engine import MinimizeOutcome
from runner.protocol import Derivatives, DerivativesSpec, MinimizeSpec

RESULTS_FILE = "results.json"
TRAJECTORY_FILE = "trajectory.csv"


def minimize_result(
    spec: MinimizeSpec, outcome: MinimizeOutcome, run: RunIdentity
) -> dict[str, Any]:
    traj = outcome.trajectory
    x_star, loss_star = spec.problem.optimum()
    x, loss = as_number(traj.final_x), float(traj.final_loss)
    result: dict[str, Any] = {
        "task": "minimize",
        "status": _status(spec, outcome),
        **run.fields(),
        "mode": spec.mode,
        "update": spec.update if spec.mode == "graph" else None,
        "dtype": spec.dtype,
        "steps": spec.steps,
        "steps_run": traj.stopped_at,
        "record_every": spec.record.every,
        "problem": {"name": spec.problem.name, **spec.problem.coefficients, "x0": spec.problem.x0},
        "optimizer": {"name": spec.optimizer.name, "lr": spec.optimizer.lr, **spec.optimizer.hyper},
        "x": x,
        "loss": loss,
        "grad": as_number(traj.final_grad),
        "optimum": {"x": x_star, "loss": loss_star},
        "error": {"x": _abs_error(x, x_star), "loss": abs(loss - loss_star)},
        "timings": {
            "compile_s": outcome.timings.compile_s,
            "run_s": outcome.timings.run_s,
            "step_us": outcome.timings.step_us,
        },
    }
    if result["status"] == "diverged":
        result["diverged_at"] = traj.stopped_at
    return result


def skipped_result(spec: MinimizeSpec, run: RunIdentity, reason: str) -> dict[str, Any]:
    """A combination the backend cannot express: on record, so a sweep shows the gap."""
    return {
        "task": "minimize",
        "status": "skipped",
        "reason": reason,
        **run.fields(),
        "mode": spec.mode,
        "update": spec.update if spec.mode == "graph" else None,
        "dtype": spec.dtype,
        "steps": spec.steps,
        "optimizer": {"name": spec.optimizer.name, "lr": spec.optimizer.lr, **spec.optimizer.hyper},
    }


def _status(spec: MinimizeSpec, outcome: MinimizeOutcome) -> str:
    if outcome.interrupted:
        return "interrupted"
    return "finished" if outcome.trajectory.stopped_at == spec.steps else "diverged"


def derivatives_result(
    spec: DerivativesSpec, found: Derivatives, run: RunIdentity
) -> dict[str, Any]:
    problem = spec.problem
    at = problem.x0
    analytic = {
        "y": problem.loss(at, problem.coefficients),
        "dy_dx": problem.grad(at),
        "dy_dcoef": problem.grad_coefficients(at),
        "d2y_dx2": problem.second_derivative(at),
    }
    analytic["compiled"] = {"dy_dx": analytic["dy_dx"], "y": analytic["y"]}
    values = {
        "y": found.y,
        "dy_dx": found.dy_dx,
        "dy_dcoef": dict(found.dy_dcoef),
        "d2y_dx2": found.d2y_dx2,
        "compiled": {"dy_dx": found.compiled_dy_dx, "y": found.compiled_y},
    }
    return {
        "task": "derivatives",
        "status": "finished",
        **run.fields(),
        "dtype": spec.dtype,
        "problem": {"name": problem.name, **problem.coefficients, "x0": at},
        "at": at,
        **values,
        "analytic": analytic,
        "error": _nested_abs_error(values, analytic),
    }


@dataclass(frozen=True)
class RunIdentity:
    """Who computed a result: the same fields head every results.json."""

    backend: str
    framework: str
    device: str
    versions: Mapping[str, str]

    def fields(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "framework": self.framework,
            "device": self.device,
            "versions": {
                **self.versions,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "gradient_runner": __version__,
            },
        }


def as_number(value: Any) -> float | list[float]:
    """A JSON number for a scalar, a list for a vector: the exact value, as float64."""
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()


def _abs_error(value: Any, target: Any) -> float:
    return float(np.max(np.abs(np.asarray(value, np.float64) - np.asarray(target, np.float64))))


def _nested_abs_error(values: Mapping[str, Any], analytic: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _nested_abs_error(value, analytic[key])
        if isinstance(value, Mapping)
        else _abs_error(value, analytic[key])
        for key, value in values.items()
    }


def trajectory_rows(spec: MinimizeSpec, outcome: MinimizeOutcome) -> dict[str, np.ndarray]:
    """Recorded rows plus the final state, as columns (step, x, loss, grad)."""
    traj = outcome.trajectory
    return {
        "step": np.append(traj.steps, traj.stopped_at),
        "x": np.append(traj.x, traj.final_x),
        "loss": np.append(traj.loss, traj.final_loss),
        "grad": np.append(traj.grad, traj.final_grad),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def write_trajectory(path: Path, columns: Mapping[str, np.ndarray]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    names = list(columns)
    steps = columns["step"]
    values = [np.asarray(columns[name], dtype=np.float64) for name in names[1:]]
    for i, step in enumerate(steps):
        writer.writerow([int(step), *(repr(float(col[i])) for col in values)])
    atomic_write(path, buffer.getvalue())


def atomic_write(path: Path, text: str) -> None:
    """Write beside the target and rename, so a killed run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; keep the user's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
