"""The report's figures: a bar per arm for every metric (error bars: std over seeds), size against quality,
and the validation curves of every run."""

from __future__ import annotations

import math

from matplotlib import colormaps
from matplotlib.figure import Figure  # pyplot-free: no global backend or figure state, fine in a notebook too

from tinymusician.results.runs import CURVE_KEYS, Run
from tinymusician.results.table import Table


def arm_colors(table: Table) -> dict[str, tuple]:
    palette = colormaps["tab10"]
    return {row.arm: palette(i % 10) for i, row in enumerate(table.rows)}


def new_figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width * cols, height * rows))
    return fig, fig.subplots(rows, cols, squeeze=False)


def metric_bars(table: Table) -> Figure:
    columns = table.columns
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = new_figure(rows, cols, 3.6, 3.2)
    colors = arm_colors(table)
    arms = [row.arm for row in table.rows]
    for ax, column in zip(axes.flat, columns, strict=False):
        cells = [row.cells[column.key] for row in table.rows]
        means = [c.mean if c.n else math.nan for c in cells]  # n/a: no bar, not a bar at 0
        errors = [c.std or 0.0 for c in cells]
        ax.bar(range(len(arms)), means, yerr=errors, capsize=3, color=[colors[a] for a in arms])
        for x, cell in enumerate(cells):
            if cell.n:  # every seed as a dot, so a spread of 3 values is not hidden behind one bar
                ax.scatter([x] * cell.n, cell.values, s=8, color="black", zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        arrow = {"lower": " (lower is better)", "higher": " (higher is better)"}.get(column.better, "")
        ax.set_title(column.title + arrow, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def size_vs_quality(table: Table) -> Figure | None:
    """Model size (MB) against each quality column (FAD per embedder, CLAP), one point per arm +- std."""
    quality = [c for c in table.columns if c.key.startswith("fad_") or c.key == "clap"]
    if "size_mb" not in {c.key for c in table.columns} or not quality:
        return None
    fig, axes = new_figure(1, len(quality), 4.2, 3.6)
    colors = arm_colors(table)
    for ax, column in zip(axes.flat, quality, strict=True):
        for row in table.rows:
            size, value = row.cells["size_mb"], row.cells[column.key]
            if not (size.n and value.n):
                continue
            ax.errorbar(
                size.mean,
                value.mean,
                xerr=size.std or 0,
                yerr=value.std or 0,
                fmt="o",
                capsize=3,
                color=colors[row.arm],
                label=row.arm,
            )
        ax.set_xlabel("size MB (what the arm ships)")
        ax.set_ylabel(column.title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def validation_curves(runs: list[Run], table: Table) -> Figure | None:
    keys = [k for k in CURVE_KEYS if any(r.curves.get(k) for r in runs)]
    if not keys:
        return None
    fig, axes = new_figure(1, len(keys), 6, 4)
    colors = arm_colors(table)
    for ax, key in zip(axes.flat, keys, strict=True):
        labelled: set[str] = set()
        for run in runs:
            points = run.curves.get(key)
            if not points or run.arm not in colors:
                continue
            steps, values = zip(*points, strict=True)
            label = None if run.arm in labelled else run.arm
            labelled.add(run.arm)
            ax.plot(steps, values, color=colors[run.arm], alpha=0.8, marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figures(runs: list[Run], table: Table) -> dict[str, Figure]:
    """``{file name: figure}`` for the report (a figure with nothing to show is left out)."""
    made = {
        "metrics.png": metric_bars(table) if table.columns else None,
        "size_vs_quality.png": size_vs_quality(table),
        "curves.png": validation_curves(runs, table),
    }
    return {name: fig for name, fig in made.items() if fig is not None}
