"""viz: figures for causal traces, knowledge neurons and evaluation results (matplotlib + seaborn)."""

from .evaluation import (plot_batch_sizes, plot_corpus_size, plot_layer_sweep, plot_methods, plot_sequential,  # noqa: F401
                         plot_sequential_curves, plot_tracing_vs_editing)
from .benchmark import benchmark_figures, plot_cost, plot_curves, plot_summary  # noqa: F401
from .neurons import neuron_heatmap  # noqa: F401
from .trace import aie_plot, trace_heatmap, trace_heatmaps  # noqa: F401
