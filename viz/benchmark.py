"""Figures of a survey benchmark (:func:`edit.benchmark`), drawn from its results directory read back
by :func:`edit.eval.load_benchmark`: metrics against batch size, against the number of sequential
edits, time and memory per method, and a bar summary per method."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

CURVE_METRICS = (("score", "S (ES, PS, NS)"), ("rewrite_acc", "Rel. (acc)"), ("paraphrase_acc", "Gen. (acc)"),
                 ("locality", "Loc."), ("perplexity", "WikiText-2 PPL"), ("piqa", "PIQA acc."))
PERCENT = {"score", "rewrite_acc", "paraphrase_acc", "locality", "piqa", "es", "ps", "ns"}


def plot_curves(curves: dict, metrics: Sequence[tuple[str, str]] = CURVE_METRICS, *, xlabel: str, title: str = ""):
    """One panel per metric, one line per method: ``curves[method][x][metric]`` (``x`` a batch size or a
    number of edits; a method or point without the metric is left out)."""
    metrics = [(k, lab) for k, lab in metrics if any(k in pt for c in curves.values() for pt in c.values())]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(3.2 * max(1, len(metrics)), 3.0), squeeze=False)
    for ax, (k, lab) in zip(axes[0], metrics):
        for method, c in curves.items():
            xs = sorted(x for x in c if k in c[x])
            if xs:
                scale = 100 if k in PERCENT else 1
                ax.plot([max(x, 0.5) for x in xs], [scale * c[x][k] for x in xs], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(lab, fontsize=9)
    if metrics:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_cost(cost: dict):
    """Seconds and peak MB per edit, one bar per method (``cost[method]`` = {edit_seconds, peak_memory_mb})."""
    methods = list(cost)
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.9 * len(methods) * 2, 3.0))
    for ax, (k, lab) in zip(axes, (("edit_seconds", "seconds per edit"), ("peak_memory_mb", "peak MB per edit"))):
        ax.bar(range(len(methods)), [cost[m].get(k, np.nan) for m in methods])
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(lab, fontsize=9)
    fig.tight_layout()
    return fig


def plot_summary(summary: dict):
    """Grouped bars: one group per column of the benchmark's tables (percentages), one bar per method."""
    methods = list(summary)
    cols = list(dict.fromkeys(c for m in methods for c in summary[m]))
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * max(1, len(cols)), 3.4))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(cols)) + (i - (len(methods) - 1) / 2) * w,
               [100 * summary[m].get(c, np.nan) for c in cols], w, label=m)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def benchmark_figures(data, folder: str | Path | None = None) -> dict[str, object]:
    """Every figure the benchmark's data supports (``data``: :class:`edit.eval.BenchmarkData`), saved as
    ``summary.png``, ``cost.png``, ``batch.png`` and ``sequential.png`` under ``folder`` (default
    ``<results>/figures``, where :func:`edit.eval.build_report` links them). Returns name -> figure."""
    folder = Path(folder) if folder is not None else Path(data.out) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    figs = {}
    summary = data.summary()
    if any(summary.values()):
        figs["summary.png"] = plot_summary(summary)
    cost = data.cost()
    if any(cost.values()):
        figs["cost.png"] = plot_cost(cost)
    batch = data.batch_curves()
    if any(batch.values()):
        figs["batch.png"] = plot_curves(batch, xlabel="edits per batch", title="Batch editing")
    seq = data.sequential_curves()
    if any(seq.values()):
        figs["sequential.png"] = plot_curves(seq, xlabel="sequential edits (0 plotted at 0.5)",
                                             title="Sequential editing")
    for name, fig in figs.items():
        fig.savefig(folder / name, dpi=110)
    return figs
