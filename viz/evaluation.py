"""Figures for evaluation runs: a method comparison, metrics against batch size, against the number
of sequential edits, and against the edited layer (next to the causal-tracing AIE)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

LABELS = {"es": "Efficacy (ES)", "ps": "Paraphrase (PS)", "ns": "Neighborhood (NS)", "score": "Score S",
          "rewrite_acc": "Reliability (acc)", "paraphrase_acc": "Generality (acc)", "locality": "Locality",
          "portability": "Portability"}
DEFAULT_KEYS = ("es", "ps", "ns", "score")


def _keys(aggs: Sequence[dict], keys) -> list[str]:
    return [k for k in keys if any(k in a for a in aggs)]


def plot_methods(results: Sequence, keys: Sequence[str] = DEFAULT_KEYS + ("rewrite_acc", "paraphrase_acc", "locality", "portability"), ax=None):
    """Grouped bars: one group per metric, one bar per run (``edit.Results``)."""
    keys = _keys([r.aggregates for r in results], keys)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 + 1.1 * len(keys), 3.2))
    w = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        vals = [100 * r.aggregates.get(k, np.nan) for k in keys]
        ax.bar(np.arange(len(keys)) + (i - (len(results) - 1) / 2) * w, vals, w, label=r.method)
    ax.set_xticks(range(len(keys)), [LABELS.get(k, k) for k in keys], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    n = results[0].aggregates.get("n_cases") if results else 0
    ax.set_title(f"{results[0].dataset if results else ''}: {n} cases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_batch_sizes(results: Sequence, keys: Sequence[str] = DEFAULT_KEYS, ax=None):
    """Metrics against the number of facts written at once (batch-mode runs of one method)."""
    runs = sorted(results, key=lambda r: r.settings["batch_size"])
    sizes = [r.settings["batch_size"] for r in runs]
    keys = _keys([r.aggregates for r in runs], keys)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 3.2))
    for k in keys:
        ax.plot(sizes, [100 * r.aggregates.get(k, np.nan) for r in runs], marker="o", label=LABELS.get(k, k))
    ax.set_xscale("log")
    ax.set_xlabel("edits per batch")
    ax.set_ylabel("%")
    ax.set_title(f"{runs[0].method}: metrics vs batch size" if runs else "")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sequential(results, keys: Sequence[str] = DEFAULT_KEYS, ax=None):
    """Metrics over the cases edited so far, against the number of sequential edits (one run or
    several, e.g. one per method)."""
    runs = [results] if hasattr(results, "curve") else list(results)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.5, 3.2))
    styles = ["-", "--", ":", "-."]
    for j, r in enumerate(runs):
        ns = sorted(r.curve)
        for k in _keys([r.curve[n] for n in ns], keys):
            lab = LABELS.get(k, k) + (f" ({r.method})" if len(runs) > 1 else "")
            ax.plot(ns, [100 * r.curve[n].get(k, np.nan) for n in ns], styles[j % 4], marker="o", label=lab)
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("%")
    ax.set_title("sequential editing" + (f": {runs[0].method}" if len(runs) == 1 else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sequential_curves(curves: dict, keys: Sequence[str] = ("es", "ps", "ns"), extra: str = "perplexity"):
    """Sequential editing, several methods: ``curves`` maps a method to its checkpoint rows (dicts with
    ``n_edits``, the metrics and ``extra``, e.g. bench/sequential_bench.py's ``curve.jsonl``). Left: the
    metrics over every edit so far; right: ``extra`` (general ability) against the number of edits."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    styles = ["-", "--", ":", "-."]
    for j, (method, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["n_edits"])
        scored = [r for r in rows if r["n_edits"] > 0]
        for k in keys:
            ax.plot([r["n_edits"] for r in scored], [100 * r.get(k, np.nan) for r in scored], styles[j % 4],
                    marker="o", label=f"{LABELS.get(k, k)} ({method})")
        bx.plot([r["n_edits"] for r in rows], [r.get(extra, np.nan) for r in rows], styles[j % 4], marker="o",
                label=method)
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("% (over all edits so far)")
    ax.legend(fontsize=6)
    bx.set_xlabel("number of sequential edits")
    bx.set_ylabel(extra)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_corpus_size(points: dict, keys: Sequence[str] = ("es", "ps", "ns")):
    """Edit metrics against the number of corpus tokens behind the key statistics. ``points`` maps
    (method, corpus label) to (tokens, aggregates); labels that are not a plain count or "all" (e.g. model
    samples) are drawn as separate markers at their token count."""
    methods = sorted({m for m, _ in points})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.2), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        wiki = sorted((n, agg) for (mm, label), (n, agg) in points.items()
                      if mm == m and (label == "all" or label.isdigit()))
        other = [(label, n, agg) for (mm, label), (n, agg) in points.items()
                 if mm == m and not (label == "all" or label.isdigit())]
        for j, k in enumerate(keys):
            ax.plot([n for n, _ in wiki], [100 * a.get(k, np.nan) for _, a in wiki], marker="o", color=f"C{j}",
                    label=f"{LABELS.get(k, k)}, WikiText-2")
            for label, n, agg in other:
                ax.plot([n], [100 * agg.get(k, np.nan)], marker="x", markersize=9, color=f"C{j}", linestyle="none",
                        label=f"{LABELS.get(k, k)}, {label}")
        ax.set_xscale("log")
        ax.set_xlabel("corpus tokens for the key statistics")
        ax.set_title(m)
    axes[0, 0].set_ylabel("%")
    axes[0, -1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_layer_sweep(sweep, keys: Sequence[str] = ("es", "ps", "ns")):
    """Top: metrics against the edited layer. Bottom: the MLP AIE from causal tracing, with the
    correlations in the title (Hase et al.'s "does localization inform editing?")."""
    has_aie = sweep.aie is not None
    fig, axes = plt.subplots(2 if has_aie else 1, 1, figsize=(6, 5 if has_aie else 3), sharex=True, squeeze=False)
    ax = axes[0, 0]
    bands = (getattr(sweep, "intervals", None) or {}).get("metrics", {})
    for k in [k for k in keys if k in sweep.metrics]:
        line, = ax.plot(sweep.layers, [100 * v for v in sweep.metrics[k]], marker="o", ms=3, label=LABELS.get(k, k))
        if k in bands:  # case-bootstrap percentile interval of the per-layer mean
            lo, hi = (100 * np.asarray(b, dtype=float) for b in zip(*bands[k]))
            ax.fill_between(sweep.layers, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_ylabel("%" + (f" (bands: {100 * sweep.intervals['level']:g}% bootstrap CI)" if bands else ""))
    ax.set_title(f"{sweep.method} at each layer, {sweep.n_cases} cases")
    ax.legend(fontsize=8)
    if has_aie:
        ax2 = axes[1, 0]
        ax2.bar(range(len(sweep.aie)), sweep.aie, color="tab:purple")
        ax2.set_ylabel("MLP AIE")
        corr = "; ".join(f"{k.upper()} r={c['pearson']:+.2f} ρ={c['spearman']:+.2f}" for k, c in sweep.correlations.items()
                         if k in keys)
        ax2.set_title(f"causal tracing ({corr})", fontsize=9)
        ax2.set_xlabel("layer")
    else:
        ax.set_xlabel("layer")
    fig.tight_layout()
    return fig


def plot_tracing_vs_editing(sweep, outcome: str = "rewrite_score", ax=None):
    """One point per (case, layer): the case's tracing effect at that layer against its edit success
    there, coloured by layer (Hase et al.'s case-level view). Needs a sweep run with ``aie="cases"``."""
    if not getattr(sweep, "points", None) or outcome not in sweep.points:
        raise ValueError(f"the sweep has no case-level points for {outcome!r}: run layer_sweep with aie='cases'")
    pts = np.asarray(sweep.points[outcome], dtype=float)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.6))
    sc = ax.scatter(pts[:, 1], pts[:, 2], c=pts[:, 0], cmap="viridis", s=10, alpha=0.7)
    fig.colorbar(sc, ax=ax, label="edited layer")
    r = sweep.regression.get(outcome, {})
    ax.set_xlabel("tracing effect at the edited layer (MLP IE, last subject token)")
    ax.set_ylabel({"rewrite_score": "rewrite score", "em": "efficacy magnitude", "pm": "paraphrase magnitude",
                   "nm": "neighborhood magnitude"}.get(outcome, outcome))
    if r:
        ax.set_title(f"R² layer {r['r2_layer']:.2f}, tracing {r['r2_trace']:.2f}, both {r['r2_both']:.2f} "
                     f"(added {r['delta_r2']:+.3f})", fontsize=9)
    fig.tight_layout()
    return fig
