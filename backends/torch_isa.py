"""Inductor's CPU vector-ISA probe, once per machine instead of once per process.

Before its first C++ kernel in a process, Inductor checks each vector ISA the CPU claims
(AVX2, AVX-512, ...): it compiles a test library (cached on disk) and loads it in a fresh
Python process, one per ISA, ~0.2 s each since torch's own libraries load with it. Here
that was 1.26 s of a 3.9 s torch graph compile whose kernels all came from the cache, in
every process (each job of a sweep, each rerun). The answer depends only on the CPU, the
C++ compiler and torch, so the first process records it beside Inductor's cache. A later
process with the same CPU, compiler and torch, where every claimed ISA passed, sets
`cpp.vec_isa_ok` (Inductor's own switch: trust the ISAs the CPU claims) instead of
probing. The first process sets it too once its probe passed, so Inductor's cache keys,
which include its config, are the same in every run. A user's TORCHINDUCTOR_VEC_ISA_OK
wins; an ISA that failed the probe keeps the probe in every process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import platform
from pathlib import Path
from typing import Any

import torch

from runner.results import atomic_write

RECORD_FILE = "runner_vec_isa_probe.json"


@functools.cache
def trust_probed_vec_isa() -> None:
    """Probe the CPU's vector ISAs once per machine (see the module docstring); the
    record is read once per process, not on every compiled program's prepare()."""
    from torch._inductor import config, cpu_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    if config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
        return  # set by the user; or a CPU whose ISAs Inductor finds otherwise
    # what valid_vec_isa_list() keeps without probing (bool(isa) would probe, and cache)
    flags = cpu_vec_isa.x86_isa_checker()
    claimed = [
        str(isa)
        for isa in cpu_vec_isa.supported_vec_isa_list
        if all(flag in flags for flag in str(isa).split())
    ]
    try:
        key = _machine_key(claimed)
    except Exception:  # no usable C++ compiler: Inductor reports that itself, as before
        return
    path = Path(cache_dir()) / RECORD_FILE
    record = _read(path)
    if record is None or record.get("key") != key:
        record = {"key": key, "passed": [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]}
        _write(path, record)
    if record["passed"] == claimed:
        config.cpp.vec_isa_ok = True


def _machine_key(claimed: list[str]) -> dict[str, Any]:
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    compiler = get_cpp_compiler()
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "claimed": claimed,
        "compiler": compiler,
        "compiler_version": get_compiler_version_info(compiler),
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write(path: Path, record: dict[str, Any]) -> None:
    """Atomically (jobs of a parallel sweep may race); a record that cannot be written
    only means the next process probes again."""
    with contextlib.suppress(OSError):
        atomic_write(path, json.dumps(record))
