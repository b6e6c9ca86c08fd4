"""locate: where does a language model store a fact?

Entry points:

* :func:`load_model` — a :class:`HookedLM` (TransformerLens bridge + architecture-neutral helpers).
* :func:`default_model` — the embedded SmolLM2-135M-Instruct, loaded once, lazily.
* :func:`trace` — causal tracing (``method="attribution"``: its first-order estimate from one backward
  pass, :mod:`locate.attribution`); :func:`neurons` — knowledge neurons; :func:`layer_profile` and
  :func:`resolve_layers` — which layers to edit.

Layering: ``errors``/``loading`` → ``model`` (``HookedLM``) → ``hooks`` (capture, prefix caches) →
the locators (``causal_trace``, ``_fast_restore``, ``attribution``, ``calibration``, ``neurons``) → ``layers``.
Nothing in ``locate`` imports ``edit``, ``viz`` or the command line.
"""

from __future__ import annotations

from .errors import (  # noqa: F401  (re-exported)
    CacheCorruptedError,
    EditFailedError,
    EmptyTargetError,
    FingerprintMismatchError,
    IncompatibleLibraryError,
    EditStateError,
    InvalidHparamsError,
    LayerOutOfRangeError,
    LayerSpecError,
    LocateEditError,
    MethodNotAvailableError,
    ModelNotFoundError,
    SingularStatisticsError,
    SubjectNotFoundError,
    TokenNotInVocabularyError,
    UnsupportedArchitectureError,
)
from .loading import DEFAULT_MODEL, cache_dir, default_model_installed  # noqa: F401
from .model import HookedLM, TokenProb, default_model, load_model, resolve_model  # noqa: F401
from .hooks import StopForward, capture, capture_at  # noqa: F401
from .causal_trace import TRACE_METHODS, CausalTrace, trace, trace_many  # noqa: F401,E402
from .attribution import attribution_scores  # noqa: F401,E402
from .calibration import LayerProfile, layer_profile  # noqa: F401,E402
from .layers import resolve_layer, resolve_layers  # noqa: F401,E402
from .neurons import KnowledgeNeurons, amplify, neurons, suppress, verify_neurons  # noqa: F401,E402

__version__ = "0.1.0"
