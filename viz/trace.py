"""Figures for causal traces: the paper's heatmaps (Meng et al. 2022, Fig. 1) and AIE plots (Fig. 2)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager, rcParams

from locate.causal_trace import TOKEN_GROUPS

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"hidden": "single restored layer", "mlp": "restored MLP", "attn": "restored attention"}
# fonts with CJK glyphs, used as fallbacks for token labels when one is installed
CJK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans",
             "WenQuanYi Zen Hei", "Droid Sans Fallback", "IPAGothic", "Microsoft YaHei", "MS Gothic",
             "Hiragino Sans", "Arial Unicode MS")


def token_label_fonts() -> list[str]:
    """The font families for token labels: matplotlib's default sans-serif, then any installed CJK font
    (matplotlib falls back glyph by glyph along the list), so CJK tokens are drawn where a font has them."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return list(rcParams["font.sans-serif"][:1]) + [f for f in CJK_FONTS if f in installed]


def token_labels(trace) -> list[str]:
    """One y-axis label per token row: the token as :meth:`locate.HookedLM.token_labels` shows it (a
    byte-level piece of a CJK character or emoji as that character, with "…" where it continues into
    the next or previous token, not as U+FFFD), quoted; subject tokens starred."""
    s0, s1 = trace.subject_range
    return [f"{t!r}*" if s0 <= i < s1 else repr(t) for i, t in enumerate(trace.tokens)]


def trace_heatmap(trace, kind: str = "hidden", *, ax=None, save: str | None = None):
    """Tokens on the y axis (subject tokens starred), layers on x, colour = p(answer)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 0.32 * len(trace.tokens) + 1.4))
    fig = ax.figure
    scores = trace.scores[kind]
    im = ax.pcolormesh(scores, cmap=CMAPS.get(kind, "viridis"), vmin=trace.p_corrupted)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(trace.tokens)) + 0.5)
    ax.set_yticklabels(token_labels(trace), fontsize=8, fontfamily=token_label_fonts())
    ax.set_xticks(np.arange(0, scores.shape[1], 5) + 0.5)
    ax.set_xticklabels(range(0, scores.shape[1], 5))
    win = "" if kind == "hidden" else f" (window {trace.window})"
    ax.set_title(f"Impact of {TITLES.get(kind, kind)}{win}", fontsize=9)
    ax.set_xlabel(f"layer ({kind})")
    cb = fig.colorbar(im, ax=ax)
    cb.ax.set_title(f"p({trace.answer.strip()})", fontsize=8)
    if save:
        fig.savefig(save, bbox_inches="tight")
    return fig


def trace_heatmaps(trace, *, save: str | None = None):
    """One heatmap per traced kind, side by side. Saves to PNG/PDF/SVG by extension."""
    kinds = list(trace.kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.4 * len(kinds), 0.32 * len(trace.tokens) + 1.6),
                             squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        trace_heatmap(trace, kind, ax=ax)
    fig.suptitle(f"{trace.prompt!r} -> {trace.answer!r}", fontsize=10)
    fig.tight_layout()
    if save:
        fig.savefig(save, bbox_inches="tight")
    return fig


def aie_plot(result, *, style: str = "heatmap", save: str | None = None):
    """AIE per token group and layer for each kind (an :class:`locate.causal_trace.AIEResult`, whose
    rows are pooled over facts as the reference notebook does; see
    :func:`locate.causal_trace.average_indirect_effects`).

    As the reference's summary heatmaps, ``style="heatmap"`` shows max(AIE, 0) from 0 up to the
    largest AIE of the hidden-state kind (of each kind's own when hidden states were not traced), so
    the three panels share a scale; ``style="lines"`` plots the signed AIE."""

    kinds = list(result.kinds)
    top = np.nanmax(result.array("hidden")) if "hidden" in kinds and result.n_facts else None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        a = result.array(kind)
        if style == "heatmap":
            a = np.clip(a, 0, None)
            vmax = top if top is not None and top > 0 else None
            im = ax.pcolormesh(a, cmap=CMAPS.get(kind, "viridis"), vmin=0.0, vmax=vmax)
            ax.invert_yaxis()
            ax.set_yticks(np.arange(len(TOKEN_GROUPS)) + 0.5)
            ax.set_yticklabels(TOKEN_GROUPS, fontsize=8)
            fig.colorbar(im, ax=ax).ax.set_title("AIE", fontsize=8)
        else:
            for g, row in zip(TOKEN_GROUPS, a):
                ax.plot(row, label=g)
            ax.set_ylabel("AIE")
            ax.legend(fontsize=6)
        ax.set_xlabel(f"layer ({kind})")
        ax.set_title(f"AIE of {kind} over {result.n_facts} facts", fontsize=9)
    fig.tight_layout()
    if save:
        fig.savefig(save, bbox_inches="tight")
    return fig
