"""edit: change a fact where `locate` found it, by any registered editing method, and evaluate it.

Layers, bottom up: ``request`` and ``edit`` (the reversible :class:`Edit`) → ``registry`` (the editor
protocol) → the shared machinery of the locate-then-edit family (``stats``, ``context``, ``vstar``,
``retrieval``) → ``methods/`` (one file per method; importing it registers them) → ``eval/`` (datasets,
metrics, harness, sequential editing, layer sweep).
"""

from .request import InvalidRequestError, Request  # noqa: F401
from .edit import Edit, HookModule, InputTransform, PrefixText, ReadAddModule, WeightDelta, applied  # noqa: F401
from locate.errors import EditStateError, InvalidHparamsError, LayerSpecError, MethodNotAvailableError  # noqa: F401
from . import registry
from .registry import EditMethod, Runtime, compute, get_method, methods, register, write  # noqa: F401
from .stats import KeyStats, key_second_moments  # noqa: F401
from .context import context_templates, subject_keys  # noqa: F401
from .vstar import TargetVectors, VStarHparams, optimize_targets  # noqa: F401
from . import methods as _methods  # noqa: F401  (registers every method)
from .methods.rome import ROMEHparams, rome  # noqa: F401
from .methods.memit import ConflictingRequestsError, MEMITHparams, memit  # noqa: F401
from .methods.ft import FTLHparams, fine_tune, ft  # noqa: F401
from .methods.kn import kn_erase, kn_update  # noqa: F401
from .methods.alphaedit import AlphaEditHparams  # noqa: F401
from .methods.grace import GRACEHparams, grace, grace_without  # noqa: F401
from .methods.ike import IKEHparams  # noqa: F401
from .eval import (  # noqa: F401
    Case,
    DatasetError,
    DatasetNotFoundError,
    Probe,
    Results,
    SequentialRun,
    benchmark,
    evaluate,
    format_table,
    layer_sweep,
    load_counterfact,
    load_counterfact_easyedit,
    load_dataset,
    load_known,
    load_mquake,
    load_requests,
    load_zsre,
    sequential,
)
methods = registry.methods  # noqa: E305  (the subpackage edit.methods is imported above; the name means the function)
