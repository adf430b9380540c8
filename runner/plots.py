"""PNG plots shared by a run's record and the comparison report (matplotlib, no display)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def preload_while_waiting() -> None:
    """Import matplotlib in a background thread.

    For a launcher whose jobs run in other processes (joblib, submitit): it only waits
    for them, then draws the sweep's report, and importing matplotlib is most of that
    (~0.55 s of ~0.8 s here). The thread keeps normal priority: at niceness 19 it held
    the GIL and import locks while busy cores left it no time, and the launcher's own
    thread waited on it (a 2-job submitit sweep beside two busy loops: 27-28 s niced
    against 6.4-6.8 s without the preload; unniced 9.6-11.1 s against 10.0-10.7 s).
    """
    import threading

    def load() -> None:
        with contextlib.suppress(Exception):  # the report will say what is wrong
            import matplotlib.backends.backend_agg
            import matplotlib.figure
            import matplotlib.ticker  # noqa: F401

    threading.Thread(target=load, name="preload-matplotlib", daemon=True).start()


def _figure(width: float, height: float) -> Any:
    """A figure drawn by Agg, without pyplot (no GUI backend, no global figure list).

    matplotlib is imported here, on the first plot: a run that is not plotted (or is
    plotted by a background upload) never pays for it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plain_log_labels(axis: Any) -> None:
    """Log-axis tick labels as text (`1e-05`), not mathtext (10^-5): mathtext's first
    parse costs ~0.15 s. Minor ticks are labelled when the axis spans few decades."""
    from matplotlib.ticker import LogFormatter

    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False))


LINE_STYLES = ("-", "--", "-.", ":")
LEGEND_INSIDE = 12  # entries the axes hold in a corner; more go beside them, in columns
LEGEND_ROWS = 32  # entries per column beside the axes (x-small type on a 5-inch figure)


def convergence_plot(
    curves: Mapping[str, Mapping[str, np.ndarray]], optimum_loss: float, path: Path
) -> Path:
    """|loss - loss*| against step on a log axis, one line per run.

    The notebook's float32 loss reaches its optimum 0 exactly, which a log axis cannot
    show: exact zeros are drawn on a dotted floor a decade below the smallest nonzero
    gap, so a run that hits loss* stays visible without stretching the axis.
    """
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    gaps = {
        label: np.abs(np.asarray(columns["loss"], dtype=np.float64) - optimum_loss)
        for label, columns in curves.items()
    }
    nonzero = [g[np.isfinite(g) & (g > 0)] for g in gaps.values()]
    smallest = min((float(g.min()) for g in nonzero if g.size), default=1.0)
    floor = smallest / 10
    for i, (label, columns) in enumerate(curves.items()):
        # Matplotlib's cycle has 10 colours: the 11th line on would repeat one exactly, so
        # each next ten lines take the next dash style (a 12-run matrix has 12 lines).
        style = {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i // 10 % len(LINE_STYLES)]}
        ax.plot(
            columns["step"], np.where(gaps[label] > 0, gaps[label], floor), label=label, **style
        )
    if any(np.any(g == 0) for g in gaps.values()):
        ax.axhline(floor, linestyle=":", color="grey", label="loss = loss* exactly")
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("|loss - loss*| (log)")
    ax.set_title(f"Convergence (loss* = {optimum_loss:.6g})")
    ax.grid(True, which="both", alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93)  # no tight_layout pass
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = len(ax.get_legend_handles_labels()[1])
    if entries <= LEGEND_INSIDE:  # curves fall from the top left: the legend goes top right
        ax.legend(fontsize="small", loc="upper right")
        fig.savefig(path)
        return path
    # A big sweep's legend would cover the curves and run off the figure: beside the
    # axes, in columns, the image widened to hold it (a measuring pass, for these only).
    columns = -(-entries // LEGEND_ROWS)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), ncol=columns)
    fig.savefig(path, bbox_inches="tight")
    return path


def step_time_plot(step_us: Mapping[str, float], path: Path) -> Path:
    """Per-step time in microseconds, one bar per run, log scale."""
    labels = list(step_us)
    fig = _figure(8, max(3, 0.35 * len(labels) + 1.5))
    ax = fig.add_subplot()
    ax.barh(labels, [step_us[k] for k in labels])
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel("time per step (us, log)")
    ax.set_title("Per-step time")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()  # the bar labels' width varies: measured, once per report
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
