"""PNG plots shared by a run's record and the comparison report (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def convergence_plot(
    curves: Mapping[str, Mapping[str, np.ndarray]], optimum_loss: float, path: Path
) -> Path:
    """|loss - loss*| against step on a log axis, one line per run.

    The notebook's float32 loss reaches its optimum 0 exactly, which a log axis cannot
    show: exact zeros are drawn on a dotted floor a decade below the smallest nonzero
    gap, so a run that hits loss* stays visible without stretching the axis.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    gaps = {
        label: np.abs(np.asarray(columns["loss"], dtype=np.float64) - optimum_loss)
        for label, columns in curves.items()
    }
    nonzero = [g[np.isfinite(g) & (g > 0)] for g in gaps.values()]
    smallest = min((float(g.min()) for g in nonzero if g.size), default=1.0)
    floor = smallest / 10
    for label, columns in curves.items():
        ax.plot(columns["step"], np.where(gaps[label] > 0, gaps[label], floor), label=label)
    if any(np.any(g == 0) for g in gaps.values()):
        ax.axhline(floor, linestyle=":", color="grey", label="loss = loss* exactly")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("|loss - loss*| (log)")
    ax.set_title(f"Convergence (loss* = {optimum_loss:.6g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def step_time_plot(step_us: Mapping[str, float], path: Path) -> Path:
    """Per-step time in microseconds, one bar per run, log scale."""
    plt = _pyplot()
    labels = list(step_us)
    fig, ax = plt.subplots(figsize=(8, max(3, 0.35 * len(labels) + 1.5)), dpi=100)
    ax.barh(labels, [step_us[k] for k in labels])
    ax.set_xscale("log")
    ax.set_xlabel("time per step (us, log)")
    ax.set_title("Per-step time")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
