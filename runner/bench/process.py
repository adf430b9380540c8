"""Costs only a fresh process shows, measured with the real CLI in subprocesses.

Start-up against the framework's import, MLflow tracking on vs off, the matrix sweep
sequential vs joblib, peak RSS of a big run, and whether a second process reuses a
persistent compilation cache. Each section fails alone: its error becomes data.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.bench.cases import FRAMEWORK_MODULE, ITEMSIZE, Best, Settings, Variant, first_line
from runner.engine import FIRST_CHUNK
from runner.provenance import environment_as_given

ROOT = Path(__file__).resolve().parent.parent.parent


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**environment_as_given(), "PYTHONPATH": str(ROOT), **(extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def timed(
    args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 900
) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of one child process, from spawn to exit."""
    start = time.perf_counter()
    proc = subprocess.run(
        list(args), cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout
    )
    return time.perf_counter() - start, proc


def runner_cli(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "runner", *overrides, "progress=false"]


def checked(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited {proc.returncode}: {' | '.join(tail)}")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"runner-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def tracking_cost(repeats: int) -> dict[str, Any]:
    """`python -m runner backend=jax steps=1000`: tracking off, on (the default: logged by
    a background upload after the command returns) and on in-process
    (tracking.background=false), interleaved, best of N each.

    The cost of tracking is what the user waits for: the command's wall time against
    tracking=off. For the background upload, also when the run is in the store: the
    upload's exit (its folder lock is free then), timed from the command's start. The
    first tracked run creates the store (schema migrations): reported on its own.
    """
    from runner.upload_process import wait_for_upload

    with scratch_dir("tracking") as cwd:
        args = ("backend=jax", "steps=1000")
        in_process = "tracking.background=false"
        first_s, proc = timed(runner_cli(*args, in_process), cwd)
        checked(proc, "tracked run (in-process, creating the store)")
        off, on, inline, stored = Best(), Best(), Best(), Best()
        for _ in range(repeats):
            wall, proc = timed(runner_cli(*args, "tracking=off"), cwd)
            checked(proc, "untracked run")
            off.add(wall)
            start = time.perf_counter()
            wall, proc = timed(runner_cli(*args), cwd)
            checked(proc, "tracked run (background upload)")
            on.add(wall)
            log = Path(proc.stdout.rsplit("its log: ", 1)[1].splitlines()[0])
            text = wait_for_upload(log.parent)
            if "uploaded 1," not in text:
                raise RuntimeError(f"background upload failed: {text.strip()[-300:]}")
            stored.add(time.perf_counter() - start)
            wall, proc = timed(runner_cli(*args, in_process), cwd)
            checked(proc, "tracked run (in-process)")
            inline.add(wall)
    return {
        "first_run_with_store_creation_s": first_s,
        "off_s": off.best,
        "on_s": on.best,
        "cost_s": on.best - off.best,
        "stored_after_s": stored.best,
        "in_process_s": inline.best,
        "in_process_cost_s": inline.best - off.best,
        "off_samples_s": off.samples,
        "on_samples_s": on.samples,
        "stored_after_samples_s": stored.samples,
        "in_process_samples_s": inline.samples,
    }


def imported_frameworks(stderr: str) -> list[str]:
    """Top-level framework packages named in `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return sorted(names & {*FRAMEWORK_MODULE.values(), "mlflow"})


def startup_cost(backend: str, repeats: int) -> dict[str, Any]:
    """A whole short run against `python -c "import <framework>"`, best of N each.

    The frameworks a run imports are compared with those the bare framework import
    pulls in by itself (TensorFlow imports JAX when it is installed), so only what the
    runner adds counts against "a run imports only its framework".
    """
    module = FRAMEWORK_MODULE[backend]
    args = (f"backend={backend}", "steps=10", "tracking=off")
    bare = [sys.executable, "-c", f"import {module}"]
    with scratch_dir("startup") as cwd:
        run_s, import_s = Best(), Best()
        for _ in range(repeats):
            wall, proc = timed(bare, cwd)
            checked(proc, f"import {module}")
            import_s.add(wall)
            wall, proc = timed(runner_cli(*args), cwd)
            checked(proc, f"backend={backend} run")
            run_s.add(wall)
        _, traced = timed([sys.executable, "-X", "importtime", "-m", "runner", *args], cwd)
        _, traced_bare = timed([sys.executable, "-X", "importtime", *bare[1:]], cwd)
    imports = imported_frameworks(traced.stderr)
    by_framework = imported_frameworks(traced_bare.stderr)
    return {
        "backend": backend,
        "import_s": import_s.best,
        "run_s": run_s.best,
        "extra_s": run_s.best - import_s.best,
        "imports": imports,
        "framework_imports": by_framework,
        "added_by_runner": sorted(set(imports) - set(by_framework)),
        "import_samples_s": import_s.samples,
        "run_samples_s": run_s.samples,
    }


SWEEPS = {"sequential": "+experiment=matrix", "joblib_2": "+experiment=matrix_parallel"}


def sweep_cost(rounds: int = 2) -> dict[str, Any]:
    """The 12-run matrix sweep, sequential vs joblib with 2 workers, alternated `rounds` times.

    A warm-up sweep fills the compile caches first (a user's second sweep; a cold
    torch.compile alone takes ~12 s). Every sweep waits for the previous one's MLflow
    logger (runner.follow) to finish, so none shares the cores with the last one's
    logging. Wall time is the command's; logged_s is until its last run is in MLflow.
    """
    from runner.upload_process import wait_for_upload

    result: dict[str, Any] = {
        name: {"wall_samples_s": [], "logged_samples_s": []} for name in SWEEPS
    }
    with scratch_dir("sweep") as cwd:
        uri = f"tracking.uri=sqlite:///{cwd / 'm.db'}"
        order = ["joblib_2"] + [name for _ in range(rounds) for name in SWEEPS]
        for index, name in enumerate(order):
            sweep_dir = cwd / f"sweep{index}"
            args = runner_cli(SWEEPS[name], "steps=1000", uri, f"hydra.sweep.dir={sweep_dir}")
            start = time.perf_counter()
            wall, proc = timed(args, cwd, timeout=3600)
            with contextlib.suppress(FileNotFoundError):
                wait_for_upload(sweep_dir, timeout_s=600)
            logged = time.perf_counter() - start
            if index == 0:
                continue  # the warm-up
            entry = result[name]
            entry["wall_samples_s"].append(wall)
            entry["logged_samples_s"].append(logged)
            entry["wall_s"] = min(entry["wall_samples_s"])
            entry["logged_s"] = min(entry["logged_samples_s"])
            entry["exit_code"] = proc.returncode
            entry["results"] = len(list(sweep_dir.glob("*/results.json")))
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                entry["error"] = " | ".join(tail)[-1500:]
    result["speedup"] = result["sequential"]["wall_s"] / result["joblib_2"]["wall_s"]
    result["speedup_logged"] = result["sequential"]["logged_s"] / result["joblib_2"]["logged_s"]
    return result


_PROBE = """
import json, resource, sys
from runner.bench.cases import spec_for, Variant
from runner.engine import run_minimize
from runner.plugins import load_backend
from runner.results import RunIdentity, minimize_result, trajectory_rows

def peak_rss():
    # VmHWM is this process's own high-water mark. ru_maxrss is not: Linux carries the
    # parent's peak over fork + exec, so a child of a big process reports the parent's.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

backend, mode, options, n, steps = json.loads(sys.argv[1])
variant = Variant(backend, mode, **options)
b = load_backend(backend)
identity = RunIdentity(backend, b.framework, "cpu", {})

def run(dim):  # the run and its record (results.json's and trajectory.csv's numbers)
    spec = spec_for(variant, steps, dim=dim)
    out = run_minimize(b, spec)
    minimize_result(spec, out, identity), trajectory_rows(spec, out)
    return out

run(1024)
base = peak_rss()
out = run(n)
peak = peak_rss()
print(json.dumps({"baseline_bytes": base, "peak_bytes": peak,
                  "shape": list(out.trajectory.final_x.shape)}))
"""


MEMORY_STEPS = FIRST_CHUNK + 50


def peak_memory(variant: Variant, n: int) -> dict[str, Any]:
    """Peak RSS of an n-dim float32 compiled run in a fresh process, against 3 x bytes(x).

    The baseline is the peak RSS after importing the framework and a small (n=1024,
    4 KB) run of the same mode, so the framework's own footprint and compile memory are
    in it: large enough to take a backend's vector code path (JAX and TF compile other
    loops for x of up to 16 entries), whose compile memory belongs in the baseline too.
    Peak RSS is the process's VmHWM (see _PROBE for why not getrusage). The run is
    MEMORY_STEPS long, so that it takes more than one chunk like any longer run: a
    program may hold more between chunks than in its first one; and its record is
    computed (results.json's norms and errors), as the CLI does.
    """
    args = json.dumps([variant.backend, variant.mode, variant.options(), n, MEMORY_STEPS])
    with scratch_dir("memory") as cwd:
        _, proc = timed([sys.executable, "-c", _PROBE, args], cwd)
    checked(proc, f"memory probe {variant.label}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    x_bytes = n * ITEMSIZE
    growth = found["peak_bytes"] - found["baseline_bytes"]
    return {
        "label": variant.label,
        "n": n,
        **found,
        "x_bytes": x_bytes,
        "growth_bytes": growth,
        "allowed_bytes": 3 * x_bytes + found["baseline_bytes"],
        "growth_in_x": growth / x_bytes,
    }


def compile_cache(variant: Variant) -> dict[str, Any]:
    """The same compiled run twice, each in a fresh process in one cwd: compile_s each.

    The cwd (and with it outputs/) is fresh, and torch Inductor's cache dir points into
    it, so the first run is cold whatever earlier runs left in /tmp; the second can
    only be faster through a cache the first one persisted.
    """
    args = [f"backend={variant.backend}", "mode=graph", "steps=1000", "tracking=off"]
    args += [f"backend.{key}=true" for key in variant.options()]
    compile_s = []
    with scratch_dir("cache") as cwd:
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cwd / "outputs" / "torchinductor")}
        for _ in range(2):
            _, proc = timed(runner_cli(*args), cwd, env)
            checked(proc, f"{variant.label} run")
            found = sorted((cwd / "outputs" / "runs").glob("*/*/results.json"))
            compile_s.append(json.loads(found[-1].read_text())["timings"]["compile_s"])
    return {
        "label": variant.label,
        "first_compile_s": compile_s[0],
        "second_compile_s": compile_s[1],
        "ratio": compile_s[1] / compile_s[0],
    }


def guarded(what: str, fn: Callable[[], Any], say: Callable[[str], None]) -> Any:
    """Run one section; a failure is recorded as data, the benchmark goes on."""
    try:
        return fn()
    except Exception as exc:
        say(f"  {what}: error {first_line(exc)}")
        return {"error": first_line(exc)}


def process_section(
    settings: Settings,
    compiled: Sequence[Variant],
    say: Callable[[str], None],
    section: dict[str, Any],
) -> None:
    """Costs only a fresh process shows, each kept in `section` once measured; all of them
    skipped by --quick."""
    repeats = settings.repeats
    say("tracking cost (jax, 1000 steps, real CLI)")
    section["tracking"] = guarded("tracking", lambda: tracking_cost(repeats), say)
    say("start-up against the framework import")
    section["startup"] = [
        guarded(b, lambda b=b: startup_cost(b, repeats), say) for b in settings.backends
    ]
    biggest = max(settings.dims)
    say(f"peak memory at n={biggest:,}")
    section["memory"] = [
        guarded(v.label, lambda v=v: peak_memory(v, biggest), say) for v in compiled
    ]
    say("persistent compilation cache")
    # TensorFlow has no persistent cache to judge: its legacy-optimizer variants add nothing.
    cached = [v for v in compiled if not v.legacy_optimizers]
    section["cache"] = [guarded(v.label, lambda v=v: compile_cache(v), say) for v in cached]
    if settings.sweep:
        say("matrix sweep: sequential vs joblib x2")
        section["sweep"] = guarded("sweep", sweep_cost, say)
