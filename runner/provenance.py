"""Which code ran a run (the runner's git commit, and whether its checkout was dirty),
and where (the CPU and its numerics-relevant features, the numerics-relevant
environment variables that were set).

Read once, as the run starts (runner.cli), and kept in the run's record (results.json,
or a sweep job's job_failure.json, under `git`): whoever logs the run to MLflow tags
it from there. Read when the run was logged instead (a background upload seconds
later, a sweep's logger minutes later), the tags named the checkout as it was then: a
commit made meanwhile was tagged as the code that ran.

machine_state and numerics_environment are what moves a float32 result by an ulp on
another machine with the same code: FMA/AVX2/AVX-512 decide whether a framework fuses
x - lr*g into one multiply-add, and XLA_FLAGS, TF_ENABLE_ONEDNN_OPTS, thread counts
and the like change which kernels run and in what order they reduce. runner.job reads
them as it builds the run's RunIdentity (after the backend is loaded: a framework's
module may set a default, as backends/tf.py does TF_USE_LEGACY_KERAS).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from runner.masking import is_secret_key, mask_text

_COMMIT_LINE = "# branch.oid "  # `git status --porcelain=v2 --branch`: the HEAD commit


def git_state() -> dict[str, Any] | None:
    """{"commit": the HEAD of the runner's own checkout, "dirty": whether tracked files
    differ from it}, whatever folder the command was typed in: the code that made the
    numbers. None for an installed copy outside git (or a repository with no commit yet).

    One `git status` answers both (it was two processes, rev-parse and status): the run
    pays for a single short subprocess."""
    lines = _git("status", "--porcelain=v2", "--branch", "--untracked-files=no").splitlines()
    heads = [line.removeprefix(_COMMIT_LINE) for line in lines if line.startswith(_COMMIT_LINE)]
    if not heads or heads[0] == "(initial)":
        return None
    return {"commit": heads[0], "dirty": any(not line.startswith("#") for line in lines)}


# The CPU features that change float results, as /proc/cpuinfo names them: fused
# multiply-add and the vector widths and types kernels dispatch on (x86 `flags`; ARM
# `Features`, where asimd is 64-bit NEON).
CPU_FEATURES = (
    "fma",
    "f16c",
    "avx",
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "neon",
    "asimd",
    "asimdhp",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)
_CPUINFO = Path("/proc/cpuinfo")
_MODEL_KEYS = ("model name", "hardware", "cpu model", "processor")  # x86, then ARM and others
_FEATURE_KEYS = ("flags", "features")

# Environment variables that change numerics: the frameworks' and XLA's own settings
# (XLA_FLAGS, TF_ENABLE_ONEDNN_OPTS, TF_DETERMINISTIC_OPS, JAX_ENABLE_X64,
# JAX_DEFAULT_MATMUL_PRECISION, TORCH_*, TORCHINDUCTOR_*, ...), the math libraries'
# threading and ISA limits (OMP_NUM_THREADS, MKL_*, ONEDNN_MAX_CPU_ISA,
# NPY_DISABLE_CPU_FEATURES, ...), and the GPU's TF32 and cuBLAS settings.
ENV_PREFIXES = (
    "TF_",
    "XLA_",
    "JAX_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "OMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "ONEDNN_",
    "DNNL_",
    "NPY_",
    "CUBLAS_",
)
ENV_NAMES = ("NVIDIA_TF32_OVERRIDE",)
# ... less those that only say where files go or how much is logged (the compile
# caches the runner itself points to outputs/cache/, TF_CPP_MIN_LOG_LEVEL).
_ENV_NOT_NUMERICS = frozenset({"CACHE", "LOG", "VLOG", "DIR", "PATH", "FILE", "HOME"})


@cache
def machine_state() -> dict[str, Any]:
    """{"cpu": its model, "arch": platform.machine(), "cpu_features": those of
    CPU_FEATURES it has, in that order}. On Linux from the first processor's block of
    /proc/cpuinfo (read no further: a many-core machine's whole file costs milliseconds);
    elsewhere the model is platform.processor()'s and cpu_features is None (unknown, not
    none). No subprocess; read once per process."""
    fields = _first_cpu_block()
    model = next((fields[k] for k in _MODEL_KEYS if fields.get(k, "").strip(" 0123456789")), "")
    flags = next((fields[k] for k in _FEATURE_KEYS if k in fields), None)
    present = None if flags is None else set(flags.split())
    return {
        "cpu": model or platform.processor() or platform.machine() or "unknown",
        "arch": platform.machine(),
        "cpu_features": None if present is None else [f for f in CPU_FEATURES if f in present],
    }


def _first_cpu_block() -> dict[str, str]:
    """`key: value` lines of /proc/cpuinfo up to its first blank line, keys lowercased;
    {} where there is no such file."""
    fields: dict[str, str] = {}
    try:
        with _CPUINFO.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        return {}
    return fields


# Variables a backend set for its own framework (backend_default), by name: the framework.
_SET_BY_BACKEND: dict[str, str] = {}


def backend_default(framework: str, name: str, value: str) -> None:
    """os.environ.setdefault, noted as this framework's: a sweep's worker runs jobs of
    every backend in one process, where the TF backend's TF_USE_LEGACY_KERAS=1 stayed
    set, and torch, JAX and NumPy jobs after it recorded it (a single run of theirs did
    not): a run records the variables backends set only where its framework is theirs."""
    if name not in os.environ:
        os.environ[name] = value
        _SET_BY_BACKEND[name] = framework


def environment_as_given() -> dict[str, str]:
    """os.environ less what backends set in this process (backend_default): what a child
    process should start from, as a user's command would (the benchmark's fresh-process
    runs: a JAX run, or a bare `import tensorflow`, started after the TF backend loaded
    here inherited its TF_USE_LEGACY_KERAS=1)."""
    return {k: v for k, v in os.environ.items() if k not in _SET_BY_BACKEND}


def numerics_environment(
    environ: Mapping[str, str] | None = None, framework: str | None = None
) -> dict[str, str]:
    """The numerics-relevant environment variables that are set (ENV_PREFIXES, ENV_NAMES,
    less _ENV_NOT_NUMERICS), sorted by name, less those another framework's backend set
    (backend_default); a secret-looking name's value is "***" (runner.masking), and any
    value has its credentials masked."""
    environ = os.environ if environ is None else environ
    found = {}
    for name, value in environ.items():
        if not (name.startswith(ENV_PREFIXES) or name in ENV_NAMES):
            continue
        if _SET_BY_BACKEND.get(name, framework) != framework:
            continue
        if _ENV_NOT_NUMERICS & set(re.split(r"_+", name.upper())):
            continue
        found[name] = "***" if is_secret_key(name) else mask_text(value)
    return dict(sorted(found.items()))


def _git(*args: str) -> str:
    """`git ARGS` in the runner's own checkout: its output, "" where git cannot answer.

    GIT_OPTIONAL_LOCKS=0: `git status` would otherwise refresh the index under its lock,
    and a `git commit` the user types while a run starts would then fail on index.lock."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
            capture_output=True,
            text=True,
            errors="replace",  # a file name that is not UTF-8 is still a changed file
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
