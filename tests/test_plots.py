"""The comparison plots: every line of a convergence plot is told apart from the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def test_convergence_lines_differ_beyond_matplotlibs_ten_colours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 12-run matrix has 12 lines; Matplotlib's cycle repeats its colours after 10."""
    from matplotlib.axes import Axes

    from runner.plots import convergence_plot

    steps = np.arange(5)
    curves = {f"run {i}": {"step": steps, "loss": 1.0 / (steps + i + 1)} for i in range(12)}
    captured: list = []
    original = Axes.plot

    def plot(self, *args, **kwargs):
        lines = original(self, *args, **kwargs)
        captured.extend(lines)
        return lines

    monkeypatch.setattr(Axes, "plot", plot)
    path = convergence_plot(curves, 0.0, tmp_path / "convergence.png")
    assert path.is_file() and path.stat().st_size > 0
    looks = [(line.get_color(), line.get_linestyle()) for line in captured]
    assert len(looks) == 12 and len(set(looks)) == 12, looks


def test_a_big_sweeps_legend_is_beside_the_curves_and_whole(tmp_path: Path) -> None:
    """52 runs: the legend went in the axes' corner, over the curves, and ran off the
    image. Beside them, the image widens to hold every entry; a few runs keep the corner."""
    from matplotlib.image import imread

    from runner.plots import convergence_plot

    steps = np.arange(5)

    def plot(runs: int) -> tuple[int, int]:
        curves = {
            f"numpy+convention=tf_legacy graph/apply float64 adam lr={i + 1}": {
                "step": steps,
                "loss": 1.0 / (steps + i + 1),
            }
            for i in range(runs)
        }
        height, width = imread(convergence_plot(curves, 0.0, tmp_path / f"{runs}.png")).shape[:2]
        return width, height

    assert plot(6) == (800, 500)  # 8 x 5 inches at 100 dpi
    width, height = plot(52)
    assert width > 1400 and height >= 480  # two columns of long labels beside the axes
