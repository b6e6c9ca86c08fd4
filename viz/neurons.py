"""Figures for knowledge neurons: attribution of the top neurons per layer, and attribution per layer."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns


def neuron_heatmap(kn, top: int = 10, *, layers=None):
    """Two panels for a :class:`locate.KnowledgeNeurons`:

    left, a layers × top-``top`` heatmap (each layer's ``top`` largest mean attributions, sorted, the
    refined knowledge neurons marked with a dot and their index); right, the total positive
    attribution per layer as bars (knowledge-neuron layers highlighted).
    """

    maps = kn.layer_maps.float().numpy()  # (n_layers, d_mlp)
    n_layers = maps.shape[0]
    layers = list(range(n_layers)) if layers is None else list(layers)
    order = np.argsort(-maps[layers], axis=1)[:, :top]
    vals = np.take_along_axis(maps[layers], order, axis=1)
    chosen = {tuple(n) for n in kn.neurons}

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.22 * len(layers) + 1.6),
                                 gridspec_kw={"width_ratios": [3, 1.3]})
    sns.heatmap(vals, ax=ax, cmap="magma", cbar_kws={"label": "attribution (mean over prompts)"},
                yticklabels=layers, xticklabels=[f"#{i + 1}" for i in range(top)])
    for r, layer in enumerate(layers):
        for c, idx in enumerate(order[r]):
            if (layer, int(idx)) in chosen:
                ax.text(c + 0.5, r + 0.5, str(int(idx)), ha="center", va="center", fontsize=6, color="cyan")
    ax.set_xlabel("rank within layer (knowledge neurons labelled with their index)")
    ax.set_ylabel("layer")
    ax.set_title(f"Top neurons per layer for {kn.target!r} ({len(kn.prompts)} prompts)")

    per_layer = kn.per_layer.float().numpy()[layers]
    kn_layers = set(kn.layers)
    colors = ["tab:red" if l in kn_layers else "tab:gray" for l in layers]
    bx.barh(np.arange(len(layers)) + 0.5, per_layer, color=colors)
    bx.set_ylim(len(layers), 0)
    bx.set_yticks(np.arange(len(layers)) + 0.5, layers, fontsize=6)
    bx.set_xlabel("Σ positive attribution")
    bx.set_title(f"{len(kn.neurons)} knowledge neurons (red layers)")
    fig.tight_layout()
    return fig
