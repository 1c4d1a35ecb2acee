"""Line charts of profiling and comparison results as PNG files (matplotlib, no display needed)."""

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure draws with the Agg canvas: no GUI backend involved


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]]  # line label -> (x, y) points
    log_x: bool = False
    y_from_zero: bool = False  # rates: an axis from 0 shows ratios honestly
    hlines: dict[str, float] = field(default_factory=dict)  # label -> y of a dashed reference line
    bands: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)  # label -> (x, mean, std)


def draw(panels: list[Panel], path: Path, title: str = "") -> None:
    """The panels side by side in one PNG."""
    figure = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, points in panel.series.items():
            points = sorted(points)
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=label)
        for label, points in panel.bands.items():  # a mean line in a shaded band of +- one std
            points = sorted(points)
            xs, means, stds = ([point[i] for point in points] for i in range(3))
            line, = axes.plot(xs, means, marker="o", markersize=3, label=label)
            axes.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.2, linewidth=0)
        for label, y in panel.hlines.items():
            axes.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
        ticks = sorted({point[0] for points in [*panel.series.values(), *panel.bands.values()] for point in points})
        if panel.log_x and ticks:  # (an empty panel, as of a sweep under way, keeps a linear axis)
            axes.set_xscale("log", base=2)
            axes.set_xticks(ticks, [f"{x:g}" for x in ticks])  # the measured values, not powers of two
        if panel.y_from_zero:
            axes.set_ylim(bottom=0)
        axes.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        axes.grid(True, alpha=0.3)
        if panel.series or panel.bands or panel.hlines:
            axes.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=120)
