"""The in-process measurements: scalar cells (runner vs hand-written), floor, vectors.

Runner and hand-written loop are interleaved repeat by repeat and each figure is the
best of N, so both see the same machine load and their ratio holds on a busy machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from runner.bench.cases import (
    BYTES_MODEL,
    Best,
    Settings,
    Variant,
    first_line,
    load_average,
    model_bytes,
    spec_for,
    variants,
    vector_failure,
    vector_steps,
)
from runner.bench.loops import hand_written, numba_floor, numpy_stream, numpy_update
from runner.engine import run_minimize
from runner.protocol import Backend


def measure_cell(backend: Backend, variant: Variant, steps: int, repeats: int) -> dict[str, Any]:
    """Runner and hand-written loop, interleaved, best of `repeats` each.

    The runner is timed exactly as a run reports itself (run_minimize's compile_s and
    step_us, prepare() paid on every repeat as every run pays it); the hand-written
    loop is built once and its timed loop run `repeats` times from x0.
    """
    spec = spec_for(variant, steps)
    hand = hand_written(variant.backend, variant.mode, steps, variant.options())
    runner_us, runner_compile, hand_us = Best(), Best(), Best()
    runner_x = hand_x = math.nan
    for _ in range(repeats):
        outcome = run_minimize(backend, spec)
        runner_us.add(outcome.timings.step_us)
        runner_compile.add(outcome.timings.compile_s)
        runner_x = float(np.asarray(outcome.trajectory.final_x))
        start = time.perf_counter()
        hand_x = hand.run()
        hand_us.add((time.perf_counter() - start) / steps * 1e6)
    return {
        "label": variant.label,
        "backend": variant.backend,
        "mode": variant.mode,
        "steps": steps,
        "runner_compile_s": runner_compile.best,
        "runner_step_us": runner_us.best,
        "hand_compile_s": hand.compile_s,
        "hand_step_us": hand_us.best,
        "ratio": runner_us.best / hand_us.best,
        "runner_x": runner_x,
        "hand_x": hand_x,
        "runner_samples_us": runner_us.samples,
        "hand_samples_us": hand_us.samples,
        "load": load_average(),
    }


def estimated_s(previous: Mapping[str, Any], steps: int, repeats: int) -> float:
    """Loop seconds the next step count would take, from the per-step times just measured.

    Compile time is left out: it does not grow with the step count, and leaving it in
    would skip torch.compile's long cells exactly where the per-step figure matters.
    """
    per_step = (previous["runner_step_us"] + previous["hand_step_us"]) * 1e-6
    return repeats * steps * per_step


def scalar_section(
    settings: Settings,
    loaded: Mapping[str, Backend],
    say: Callable[[str], None],
    cells: list[dict[str, Any]],
) -> None:
    """Every variant at its step counts, appended to `cells` as each is measured (an
    interrupted run keeps them); a count that would exceed the budget is skipped."""
    for variant in variants(list(loaded), settings.quick):
        counts = settings.compiled_steps if variant.compiled else settings.eager_steps
        previous: dict[str, Any] | None = None
        for steps in counts:
            base = {"label": variant.label, "backend": variant.backend, "mode": variant.mode}
            if previous is not None:
                need = estimated_s(previous, steps, settings.repeats)
                if need > settings.budget_s:
                    reason = f"over budget (est. {need:.0f} s > {settings.budget_s:.0f} s)"
                    cells.append({**base, "steps": steps, "skipped": reason})
                    say(f"  {variant.label:<16} {steps:>9,} steps: skipped, {reason}")
                    continue
            try:
                cell = measure_cell(loaded[variant.backend], variant, steps, settings.repeats)
            except Exception as exc:
                cells.append({**base, "steps": steps, "error": first_line(exc)})
                say(f"  {variant.label:<16} {steps:>9,} steps: error {first_line(exc)}")
                break
            cells.append(cell)
            previous = cell
            say(
                f"  {variant.label:<16} {steps:>9,} steps: runner {cell['runner_step_us']:10.3f} us"
                f"  hand {cell['hand_step_us']:10.3f} us  ratio {cell['ratio']:.3f}"
                f"  compile {cell['runner_compile_s']:.2f} s"
            )


def floor_section(settings: Settings) -> dict[str, Any]:
    """The numba loop at the compiled step counts (and 1e7), best of N (at least 5: a
    loop of nanoseconds a step is the most noise-prone figure): ns per step, and every
    sample."""
    compile_s, run = numba_floor()
    counts = sorted({*settings.compiled_steps, 10_000 if settings.quick else 10_000_000})
    per_steps: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    final_x = math.nan
    for steps in counts:
        best = Best()
        for _ in range(max(settings.repeats, 5)):
            start = time.perf_counter()
            final_x = run(steps)
            best.add((time.perf_counter() - start) / steps * 1e9)
        per_steps[str(steps)] = best.best
        samples[str(steps)] = best.samples
    return {
        "compile_s": compile_s,
        "ns_per_step": per_steps,
        "samples_ns": samples,
        "final_x": final_x,
    }


# --------------------------------------------------------------------------- vectors


def measure_vector(
    backend: Backend, variant: Variant, n: int, steps: int, repeats: int
) -> dict[str, Any]:
    """One compiled mode at dimension n: best step time and the bandwidth it implies."""
    base = {"label": variant.label, "n": n, "steps": steps}
    try:
        spec = spec_for(variant, steps, dim=n)
        reason = backend.unsupported(spec)
        if reason:
            return {**base, "unsupported": f"not yet supported: {reason}"}
        best, compile_s, final_s = Best(), Best(), Best()
        for _ in range(repeats):
            outcome = run_minimize(backend, spec)
            shape = np.shape(outcome.trajectory.final_x)
            if shape != (n,):
                return {**base, "unsupported": f"not yet supported: final x has shape {shape}"}
            best.add(outcome.timings.step_us)
            compile_s.add(outcome.timings.compile_s)
            final_s.add(outcome.timings.final_s)
    except Exception as exc:  # a failure, not a missing feature: said as the scalar cells say it
        return {**base, "error": first_line(exc)}
    seconds = best.best * 1e-6
    return {
        **base,
        "step_us": best.best,
        "compile_s": compile_s.best,
        # Once a run, not in step_us: the final state's loss, gradient and copy to the host.
        "final_s": final_s.best,
        "gbps": model_bytes(n) / seconds / 1e9,
        "samples_us": best.samples,
    }


def measure_numpy(n: int, steps: int, repeats: int) -> dict[str, Any]:
    """NumPy's in-place update step and its streaming bandwidth, at dimension n, best of
    N (at least 5), with every sample (us per step)."""
    update = numpy_update(n)
    stream_bytes, stream = numpy_stream(n)
    update(1)
    stream(1)
    update_s, stream_s = Best(), Best()
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        update(steps)
        update_s.add((time.perf_counter() - start) / steps)
        start = time.perf_counter()
        stream(steps)
        stream_s.add((time.perf_counter() - start) / steps)
    return {
        "n": n,
        "steps": steps,
        "update_step_us": update_s.best * 1e6,
        "update_gbps": model_bytes(n) / update_s.best / 1e9,
        "stream_gbps": stream_bytes / stream_s.best / 1e9,
        "update_samples_us": [s * 1e6 for s in update_s.samples],
        "stream_samples_us": [s * 1e6 for s in stream_s.samples],
    }


def empty_vectors() -> dict[str, Any]:
    return {"bytes_model": BYTES_MODEL, "rows": [], "numpy": []}


def vector_section(
    settings: Settings,
    loaded: Mapping[str, Backend],
    say: Callable[[str], None],
    vectors: dict[str, Any],
) -> None:
    """Each dimension's NumPy baseline and compiled modes, appended to `vectors` (from
    empty_vectors()) as each is measured."""
    compiled = [v for v in variants(list(loaded), settings.quick) if v.compiled]
    rows, baseline = vectors["rows"], vectors["numpy"]
    for n in settings.dims:
        steps = vector_steps(n, settings.quick)
        numpy_row = measure_numpy(n, steps, settings.repeats)
        baseline.append(numpy_row)
        say(
            f"  numpy            n={n:>10,}: update {numpy_row['update_step_us']:10.3f} us/step"
            f"  stream {numpy_row['stream_gbps']:6.1f} GB/s"
        )
        for variant in compiled:
            row = measure_vector(loaded[variant.backend], variant, n, steps, settings.repeats)
            rows.append(row)
            shown = vector_failure(row) or (
                f"{row['step_us']:10.3f} us/step  {row['gbps']:6.2f} GB/s"
            )
            say(f"  {variant.label:<16} n={n:>10,}: {shown}")
