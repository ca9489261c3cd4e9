"""Charts a person reads: training curves and score bars, drawn with matplotlib.

Figures are built with matplotlib's object API on its Agg canvas (no pyplot, no global
backend, no display): safe in Ray workers, threads and headless nodes. Every chart has a
title, titled axes and ticks; PNG bytes come back, to be written wherever the caller writes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

# One colour per series, in order (matplotlib's tab10 without its first blue): the training
# curve is LINE, so a test can find it by colour.
LINE = "#1f3fbf"
SERIES = [LINE, "#e07b00", "#2a9d3a", "#c0392b", "#7b4fb8", "#8c564b"]
DPI = 100


def _figure(size: tuple[int, int]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # the figure's own size: exactly `size` pixels
    return buf.getvalue()


def curve_png(steps: Sequence[float], values: Sequence[float], *, title: str, ylabel: str,
              epochs: Sequence[float] | None = None, from_zero: bool = True, log_y: bool = False,
              size: tuple[int, int] = (640, 360)) -> bytes:
    """A training curve over optimizer steps, with the epoch on a second x-axis above when
    `epochs` (the epoch at each step) is given. `from_zero`: the y-axis starts at 0, so a
    small drop reads as small (stretched from min to max, a 0.08 drop from 2.3 looked steep)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(size)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#dddddd", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    if len(steps) > 1:
        ax.plot(steps, values, color=LINE, linewidth=2)
    elif steps:
        ax.plot(steps, values, "o", color=LINE)
    if log_y:
        ax.set_yscale("log")
    elif from_zero:
        top = max(values) if values else 1.0
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
    if steps and epochs and len(epochs) == len(steps) and steps[-1] and epochs[-1]:
        per_step = epochs[-1] / steps[-1]  # the loop logs epoch = step / steps_per_epoch
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda e: e / per_step))
        top.set_xlabel("epoch")
    if not steps:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#888888")
    return _png(fig)


def bars_png(groups: dict[str, dict[str, float | None]], *, title: str, ylabel: str = "accuracy (%)",
             size: tuple[int, int] = (640, 360)) -> bytes:
    """Grouped bars of fractions in [0, 1], shown as percentages: one group per x label (an
    answer type, a metric), one bar per series in each group (a model: before, after).
    A missing value (None) leaves its bar out and says "n/a"."""
    fig = _figure(size)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 118)  # room above 100 % for the values and the legend
    ax.set_yticks(range(0, 101, 20))
    ax.grid(True, axis="y", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    labels = list(groups)
    series = list(dict.fromkeys(name for values in groups.values() for name in values))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(labels))]
        heights = [groups[label].get(name) for label in labels]
        shown = [(x, 100 * h) for x, h in zip(xs, heights) if h is not None]
        bars = ax.bar([x for x, _ in shown], [h for _, h in shown], width * 0.95, label=name,
                      color=SERIES[i % len(SERIES)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        for x, h in zip(xs, heights):
            if h is None:
                ax.text(x, 2, "n/a", ha="center", fontsize=8, color="#888888")
    ax.set_xticks(range(len(labels)), labels)
    if len(series) > 1:
        ax.legend(loc="upper left", fontsize=8, ncols=len(series))
    return _png(fig)
