"""edit.eval: scoring editing methods. Datasets → metrics → the harness (single, batch and sequential
modes, resumable results) → the layer sweep. It reaches every method through :mod:`edit.registry`."""

from .datasets import (  # noqa: F401
    LOADERS,
    Case,
    ChoiceItem,
    DatasetError,
    DatasetNotFoundError,
    Probe,
    load_counterfact,
    load_counterfact_easyedit,
    load_dataset,
    load_known,
    load_mquake,
    load_counterfact_distracting_neighbor,
    load_counterfact_other_attribution,
    load_counterfact_subject_replace,
    load_knowedit,
    load_piqa,
    load_requests,
    load_zsre,
    load_zsre_inverse_relation,
    load_zsre_subject_replace,
)
from .benchmark import AXES, BenchmarkData, BenchmarkDataWarning, benchmark, build_report, load_benchmark  # noqa: F401
from .harness import NONE, Measure, Results, evaluate, format_table  # noqa: F401
from .sequential import SequentialRun, sequential  # noqa: F401
from .sweep import LayerSweep, layer_sweep  # noqa: F401
