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
import re
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from runner import __version__
from runner.engine import MinimizeOutcome
from runner.problem_limits import wider_dtype
from runner.problems import compact, problem_record
from runner.protocol import Derivatives, DerivativesSpec, MinimizeSpec

RESULTS_FILE = "results.json"
MAX_JSON_VECTOR = 10_000  # larger x are summarized (x_norm, error.dist), not listed
TRAJECTORY_FILE = "trajectory.csv"


def minimize_result(
    spec: MinimizeSpec,
    outcome: MinimizeOutcome,
    run: RunIdentity,
    optimizer_used: Mapping[str, Any] | None = None,
    options_used: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json of a run; `optimizer_used` (see runner.optimizers.used_record) where
    the backend says whose defaults it ran; `options_used` (protocol.RecordsOptions) where
    it says which options the run used, in place of spec.options as asked."""
    traj = outcome.trajectory
    problem = spec.problem
    x_star, loss_star = problem.optimum()
    listed = np.size(traj.final_x) <= MAX_JSON_VECTOR
    loss = float(traj.final_loss)
    result: dict[str, Any] = {
        "task": "minimize",
        "status": _status(spec, outcome),
        **run.fields(),
        **_asked(spec),
        **({"options": json_safe(options_used)} if options_used is not None else {}),
        "steps_run": traj.stopped_at,
        "record_every": spec.record.every,
        "problem": problem_record(problem),
        **({"optimizer_used": dict(optimizer_used)} if optimizer_used is not None else {}),
        "x": as_number(traj.final_x) if listed else None,
        "loss": loss,
        "grad": as_number(traj.final_grad) if listed else None,
        "optimum": {"x": as_number(x_star) if listed else None, "loss": loss_star},
        "error": {"x": _abs_error(traj.final_x, x_star), "loss": abs(loss - loss_star)},
        "timings": {
            "compile_s": outcome.timings.compile_s,
            "run_s": outcome.timings.run_s,
            "step_us": outcome.timings.step_us,
            "steps_timed": outcome.timings.steps_timed,
            "final_s": outcome.timings.final_s,
        },
    }
    if problem.dim is not None:  # vectors: the norms a reader compares first
        result["x_norm"] = norm(traj.final_x)
        result["grad_norm"] = norm(traj.final_grad)
        result["error"]["dist"] = norm(traj.final_x, x_star)
    if result["status"] == "diverged":
        result["diverged_at"] = traj.stopped_at
    return result


def divergence_message(result: Mapping[str, Any], trajectory: Path | None = None) -> str:
    """What a diverged run says, from its results.json (and where its trajectory.csv is,
    when known): the error the command prints, and the MLflow `error` tag of its run
    whichever process logs it (the run itself, or an upload of its folder).

    `the loss became inf at step 64 of 300 (lr=1.5 is too large for this problem); the
    trajectory up to step 64 is in <run dir>/trajectory.csv`
    """
    step = result.get("diverged_at")
    if step == 0:
        text = _start_not_finite(result)
    else:
        text = f"the loss became {result.get('loss')} at step {step} of {result.get('steps')}"
        lr = (result.get("optimizer") or {}).get("lr")
        if lr is not None:
            text += f" (lr={lr} is too large for this problem)"
    if trajectory is not None:
        text += f"; the trajectory up to step {step} is in {trajectory}"
    return text


def _start_not_finite(result: Mapping[str, Any]) -> str:
    """Step 0's loss is x0's, before any update: no lr made it overflow (`problem.x0=1e20`
    in float32: x0 is finite, x0^2 is not), so the lr is not named as the cause."""
    dtype = str(result.get("dtype"))
    return (
        f"the loss at the starting point is {result.get('loss')} in {dtype}, before any "
        f"update (step 0 of {result.get('steps')}; not the lr's doing): give a problem.x0 "
        f"nearer the optimum{wider_dtype(dtype)}"
    )


def skipped_result(
    spec: MinimizeSpec | DerivativesSpec, run: RunIdentity, reason: str
) -> dict[str, Any]:
    """A combination the backend cannot express (a task it declines): on record, so a
    sweep shows the gap."""
    if isinstance(spec, MinimizeSpec):
        task, asked = "minimize", _asked(spec)
    else:
        task, asked = "derivatives", {"dtype": spec.dtype, "problem": problem_record(spec.problem)}
    return {"task": task, "status": "skipped", "reason": reason, **run.fields(), **asked}


def _asked(spec: MinimizeSpec) -> dict[str, Any]:
    """What the run was asked to do, as every minimize record (run or skipped) states it."""
    return {
        "options": json_safe(spec.options),
        "mode": spec.mode,
        "update": spec.update if spec.mode == "graph" else None,
        "dtype": spec.dtype,
        "steps": spec.steps,
        "optimizer": {"name": spec.optimizer.name, "lr": spec.optimizer.lr, **spec.optimizer.hyper},
    }


def _status(spec: MinimizeSpec, outcome: MinimizeOutcome) -> str:
    if outcome.interrupted:
        return "interrupted"
    traj = outcome.trajectory
    # the loop checks the loss before each update; the state after the last one is
    # checked here, so a run that overflows on its very last step is not "finished"
    # (the largest |x| is finite when every entry is: no n-sized mask)
    finite = np.isfinite(traj.final_loss) and np.isfinite(_abs_error(traj.final_x, 0.0))
    return "finished" if traj.stopped_at == spec.steps and finite else "diverged"


def derivatives_result(
    spec: DerivativesSpec, found: Derivatives, run: RunIdentity
) -> dict[str, Any]:
    problem = _at_run_precision(spec.problem, spec.dtype)
    at = float(problem.x0_array())
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
        "problem": problem_record(spec.problem),
        "at": at,
        **values,
        "analytic": analytic,
        "error": _nested_abs_error(values, analytic),
    }


def _at_run_precision(problem: Any, dtype: str) -> Any:
    """The scalar problem at the inputs the framework computed with: x0, a, b, c rounded
    to the run's dtype (each exact in float64). The analytic values there are what a
    correct framework returns, up to its own rounding; at the decimal inputs the error
    also counted the rounding of the inputs (8.25 at x0 = 12345.678 in float32, where
    the framework was 0.1 ulp from exact)."""
    cast = np.dtype(dtype).type
    return replace(problem, **{k: float(cast(getattr(problem, k))) for k in ("a", "b", "c", "x0")})


def device_kind(name: str) -> str:
    """`cpu` or `gpu:<index>` for a framework's own device name, so that runs of several
    frameworks on one device carry one device tag: the CPU is `/device:CPU:0` to
    TensorFlow, `cpu:0` to JAX and `cpu` to PyTorch; a GPU `/device:GPU:0`, `cuda:0`.
    A name of another kind (a plugin's TPU) is kept as it is."""
    lowered = name.lower()
    if "gpu" in lowered or "cuda" in lowered:
        index = re.search(r"(\d+)$", name)
        return f"gpu:{index.group(1) if index else 0}"
    return "cpu" if "cpu" in lowered else name


@dataclass(frozen=True)
class RunIdentity:
    """Who computed a result: the same fields head every results.json.

    run_uid names the run for life: it is the MLflow tag `run_uid` of the run that
    records it, so `python -m runner.upload` can tell which runs a store already holds.
    git (runner.provenance.git_state, read as the run started) is the code that ran:
    its git tags in MLflow come from here, whenever the run is logged. machine and
    environment (runner.provenance.machine_state, numerics_environment) are where it
    ran: the CPU and its features, the numerics-relevant environment variables set.
    """

    backend: str
    framework: str
    device_name: str  # the framework's own name for the device (backend.resolved_device)
    versions: Mapping[str, str]
    run_uid: str | None = None
    git: Mapping[str, Any] | None = None
    machine: Mapping[str, Any] | None = None
    environment: Mapping[str, str] | None = None

    def fields(self) -> dict[str, Any]:
        return {
            **({"run_uid": self.run_uid} if self.run_uid else {}),
            "backend": self.backend,
            "framework": self.framework,
            "device": device_kind(self.device_name),
            "device_name": self.device_name,
            "versions": {
                **self.versions,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "gradient_runner": __version__,
            },
            **({"git": dict(self.git)} if self.git else {}),
            **({"machine": dict(self.machine)} if self.machine is not None else {}),
            **({"environment": dict(self.environment)} if self.environment is not None else {}),
        }


def json_safe(value: Any) -> Any:
    """value as plain JSON data: a run's backend options say how it ran (jit_compile, ...),
    so they go into results.json whatever type a config or a plugin gave them."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def new_run_uid() -> str:
    return uuid.uuid4().hex


def as_number(value: Any) -> float | list[float]:
    """A JSON number for a scalar, a list for a vector: the exact value, as float64."""
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()


# Vectors are reduced in float64 a block of this many entries at a time: a whole float64
# copy of x (n = 1e7: 80 MB) and its temporaries would cost several times the run's own
# memory. A vector of one block gives the same bits as the whole-array expression.
BLOCK = 1 << 16


def _blocks(value: Any, target: Any = 0.0) -> Iterator[np.ndarray]:
    """value - target in float64, one block at a time (target: one number or a vector)."""
    value = np.ravel(np.asarray(value))
    target = np.broadcast_to(np.asarray(target, np.float64), np.shape(value))
    for start in range(0, max(value.size, 1), BLOCK):
        end = start + BLOCK
        yield value[start:end].astype(np.float64) - target[start:end]


def norm(value: Any, target: Any = 0.0) -> float:
    """||value - target||_2, computed in float64 (np.linalg.norm's sqrt of a dot product)."""
    return float(np.sqrt(sum(float(d.dot(d)) for d in _blocks(value, target))))


def _abs_error(value: Any, target: Any) -> float:
    """max |value - target| in float64 (NaN if any entry is NaN)."""
    worst = np.float64(0.0)
    for d in _blocks(value, target):
        worst = np.maximum(worst, np.max(np.abs(d), initial=0.0))
    return float(worst)


def _nested_abs_error(values: Mapping[str, Any], analytic: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _nested_abs_error(value, analytic[key])
        if isinstance(value, Mapping)
        else _abs_error(value, analytic[key])
        for key, value in values.items()
    }


def trajectory_rows(spec: MinimizeSpec, outcome: MinimizeOutcome) -> dict[str, np.ndarray]:
    """Recorded rows plus the final state: (step, x, loss, grad) for a scalar problem;
    (step, dist, loss, grad_norm) for vectors, dist being ||x - x*||.

    The recorded rows' dist is the framework's, from x* in the run's dtype; the final row's
    is taken from that x* too (not the float64 one results.json's error_dist uses), so
    that a float32 column near convergence does not jump by x*'s rounding (~8e-8 at n = 50),
    and its norms are rounded to the dtype (a float32 run's last row was float64).
    A backend that recorded the vectors themselves (rows x n: a plugin's, as its step()
    returns x) gets the norms taken here; np.append had flattened them into the columns.
    """
    traj = outcome.trajectory
    rows = recorded_rows(
        spec, {"steps": traj.steps, "x": traj.x, "loss": traj.loss, "grad": traj.grad}
    )
    if spec.problem.dim is None:
        final_x, final_grad = traj.final_x, traj.final_grad
    else:
        final_x = _norm_in_dtype(spec, traj.final_x, _x_star(spec))
        final_grad = _norm_in_dtype(spec, traj.final_grad)
    final = dict(zip(rows, (traj.stopped_at, final_x, traj.final_loss, final_grad), strict=True))
    return {name: np.append(column, final[name]) for name, column in rows.items()}


def recorded_rows(spec: MinimizeSpec, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A loop's recorded rows (Span's steps, x, loss, grad) as trajectory.csv's columns,
    without the final state: trajectory_rows', and a run's whose step raised (its final
    state is not known)."""
    xs, grads = np.asarray(rows["x"]), np.asarray(rows["grad"])
    names = ("x", "grad") if spec.problem.dim is None else ("dist", "grad_norm")
    if spec.problem.dim is not None:
        if xs.ndim == 2:
            xs = np.array([_norm_in_dtype(spec, row, _x_star(spec)) for row in xs])
        if grads.ndim == 2:
            grads = np.array([_norm_in_dtype(spec, row) for row in grads])
    return {
        "step": np.asarray(rows["steps"]),
        names[0]: xs,
        "loss": np.asarray(rows["loss"]),
        names[1]: grads,
    }


def _norm_in_dtype(spec: MinimizeSpec, value: Any, target: Any = 0.0) -> np.generic:
    """||value - target|| taken here, in float64, rounded to the run's dtype: a row the
    framework did not give stays in the column's dtype (a float32 run's last row was not)."""
    return np.dtype(spec.dtype).type(norm(value, target))


def _x_star(spec: MinimizeSpec) -> np.ndarray:
    """x* in the run's dtype, which the recorded rows' distances are taken from."""
    return np.asarray(compact(spec.problem.optimum()[0]), dtype=spec.dtype)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


JOB_FAILURE_FILE = "job_failure.json"
# What a run folder holds once its run ended, finished or not: one or the other.
RECORD_FILES = (RESULTS_FILE, JOB_FAILURE_FILE)


def record_job_failure(
    output_dir: Path,
    exc: Exception,
    git: Mapping[str, Any] | None = None,
    run_uid: str | None = None,
) -> None:
    """Leave a failure in its run folder, for its MLflow run (FAILED) and, in a sweep, the
    sweep's exit code, which is made from these.

    Hydra's launchers drop a job's return value, so the launching process reads the
    sweep folder instead; that works for every launcher, SLURM included. git: the code
    state as the job started (as results.json holds it), for the FAILED run's git tags.
    run_uid: a single run's (its background upload logs it FAILED once); a sweep job's
    is made from the sweep's id and its folder (runner.sweep_record.failure_uid).
    """
    failure = {"exit_code": getattr(exc, "exit_code", 1), "error": str(exc)}
    failure |= {"git": dict(git)} if git else {}
    failure |= {"run_uid": run_uid} if run_uid else {}
    write_json(output_dir / JOB_FAILURE_FILE, failure)


def sweep_failures(sweep_dir: Path) -> list[dict[str, Any]]:
    """The failures recorded by a sweep's jobs (divergence and skips are results, not failures)."""
    return list(job_failures(sweep_dir).values())


def job_failures(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    """Each failed job's folder and its job_failure.json, in job order: the report lists
    them, and MLflow records them, by folder (the failure names no job)."""
    paths = sorted(sweep_dir.glob(f"**/{JOB_FAILURE_FILE}"), key=lambda p: job_order(p.parent))
    return {path.parent: json.loads(path.read_text()) for path in paths}


def job_order(folder: Path) -> tuple[int, str]:
    """Hydra numbers a sweep's job folders 0_, 1_, ..., 10_: ordered by that number, so
    job 10 is not read before job 2 (a folder of another name goes last)."""
    number, _, rest = folder.name.partition("_")
    return (int(number), rest) if number.isdigit() else (1 << 62, folder.name)


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


@cache
def _umask() -> int:
    """The process's umask, read once: reading it means setting it for a moment, and a
    file another thread (an MLflow or joblib helper) created in that moment would be
    world-writable; nothing in the runner changes it later."""
    current = os.umask(0)
    os.umask(current)
    return current
