"""Which layer stores facts? The MLP average indirect effect at the last subject token, per layer.

:func:`layer_profile` traces (MLP kind only, fast path, last subject token only) a calibration set of
facts that the model knows and averages the indirect effects. "Knows" is the reference's test (the
decoded top-1 token is the whole attribute, so a fact with a multi-token attribute is skipped; see
:mod:`locate.causal_trace`) and the noise is its default (3 x the std of known_1000's subject token
embeddings, with a warned fallback to the embedding matrix); both are options. The result is cached
on disk under ``cache_dir()/calibration/``, keyed by the model *as it is* (weights, applied edits and
library versions: :func:`locate.loading.derived_cache_key`), the facts, the settings, the known-fact
test and nu, through the toolkit's one cache mechanism (:func:`locate.loading.write_cached`: SHA-256,
atomic write, format version). An entry that is corrupted, of another format or key, or whose profile
does not have one value per layer of the model is reported (:class:`locate.loading.CacheRebuiltWarning`)
and recomputed. ROME's ``layer="auto"`` and MEMIT's ``layers="auto"`` use it.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tqdm.auto import tqdm

from ._tracing import clean_states
from .causal_trace import _check_known_match, _is_known, load_facts, noise_level, resolve_window, trace
from .errors import LayerSpecError
from .loading import CacheRebuiltWarning, cache_dir, derived_cache_key, read_cached, write_cached
from .model import resolve_model

DEFAULT_FACTS = Path(__file__).parent / "data" / "calibration_facts.json"
CACHE_FORMAT = "locate-edit/layer-profile/2"


@dataclass
class LayerProfile:
    """MLP AIE at the last subject token, one value per layer."""

    aie: np.ndarray
    n_facts: int
    source: str  # where the facts came from, and whether the profile was cached
    model: str = ""
    fingerprint: str = ""
    samples: int = 0
    trace_window: int = 0
    known_match: str = ""  # which facts counted as known
    noise_level: float = float("nan")
    noise_source: str = ""
    method: str = "fast"  # trace's method: "fast" (exact) or "attribution" (first-order estimate)

    def best_layer(self) -> int:
        return int(np.argmax(self.aie))

    def window(self, k: int) -> list[int]:
        """The contiguous ``k`` layers with the largest summed AIE; ``k`` must be in ``1..n_layers``
        (:class:`LayerSpecError` otherwise, never clamped)."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= len(self.aie):
            raise LayerSpecError(f"a window of {k!r} layers: the profile has {len(self.aie)} layers, so it must "
                                 f"be an int in 1..{len(self.aie)}")
        k = int(k)
        sums = [self.aie[i:i + k].sum() for i in range(len(self.aie) - k + 1)]
        start = int(np.argmax(sums))
        return list(range(start, start + k))

    def reason(self, layer: int | None = None) -> str:
        layer = self.best_layer() if layer is None else layer
        peak = self.best_layer()
        s = (f"MLP AIE at last subject token peaks at layer {peak} ({self.aie[peak]:.2f}) "
             f"over {self.n_facts} known facts")
        if layer != peak:
            s += f"; layer {layer} has {self.aie[layer]:.2f}"
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aie"] = [float(x) for x in self.aie]
        return d


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def layer_profile(model=None, *, facts=None, n: int | None = 15, samples: int = 3, window: int | None = None,
                  seed: int = 0, noise="auto", known_match: str = "answer", cache: bool = True,
                  progress: bool = False, method: str = "fast") -> LayerProfile:
    """MLP AIE per layer at the last subject token over known facts (see the module docstring).

    ``facts``: a list of {"prompt", "subject", "attribute"} dicts or a JSON path (default: the
    packaged calibration set). ``n``: use the first ``n`` facts; those the model does not know
    (``known_match``, as :func:`locate.causal_trace.trace_many`) are skipped. ``noise``: as
    :func:`locate.trace`, resolved once; its value is part of the cache key. ``window``: as
    :func:`locate.trace` (default: the reference's 10, or n_layers on a smaller model). ``method``: as
    :func:`locate.trace`; ``"attribution"`` averages first-order estimates (cached apart from exact profiles).
    """

    lm = resolve_model(model)
    _check_known_match(known_match)
    window = resolve_window(window, lm.n_layers)
    source = str(facts) if isinstance(facts, (str, Path)) else ("packaged calibration set" if facts is None
                                                                 else "given facts")
    fact_list = load_facts(DEFAULT_FACTS if facts is None else facts)
    if n is not None:
        fact_list = fact_list[:n]
    nl = noise_level(lm, noise)
    settings = _digest({"facts": fact_list, "samples": samples, "window": window, "seed": seed,
                        "known_match": known_match, "noise_level": nl.nu,
                        **({} if method == "fast" else {"method": method})})  # exact profiles keep their keys
    model_key = derived_cache_key(lm)  # the model as it is now: applied edits change it
    key = {"model": model_key, "settings": settings, "n_layers": lm.n_layers}
    path = cache_dir() / "calibration" / f"{model_key}-{settings[:12]}.json"
    if cache:
        cached = _read_profile(path, key, lm.n_layers)
        if cached is not None:
            return cached
    total, count = np.zeros(lm.n_layers), 0
    for f in tqdm(fact_list, desc="layer_profile", disable=not progress):
        logits, _ = clean_states(lm, lm.encode(f["prompt"]), [])
        if not _is_known(lm, f["prompt"], f["attribute"], logits, known_match):
            continue
        tr = trace(f["prompt"], f["subject"], model=lm, kinds=("mlp",), samples=samples, window=window,
                   seed=seed, noise=nl, tokens=["last_subject"], progress=False, method=method)
        total += tr.ie("mlp")[tr.token_index("last_subject")]
        count += 1
    aie = total / max(count, 1)
    prof = LayerProfile(aie=aie, n_facts=count, source=source, model=lm.name, fingerprint=lm.state_fingerprint,
                        samples=samples, trace_window=window, known_match=known_match, noise_level=nl.nu,
                        noise_source=nl.source, method=method)
    if cache:
        write_cached(path, CACHE_FORMAT, key, body=prof.to_dict())
    return prof


def _read_profile(path: Path, key: dict, n_layers: int) -> LayerProfile | None:
    """The cached profile at ``path`` if it passes the cache's checks and has ``n_layers`` finite
    values; else ``None`` (with a :class:`CacheRebuiltWarning` when a file was there and is refused)."""
    got = read_cached(path, CACHE_FORMAT, key, what="layer profile")
    if got is None:
        return None
    body, _ = got
    try:
        aie = np.asarray(body["aie"], dtype=np.float64)
        if aie.shape != (n_layers,) or not np.isfinite(aie).all():
            raise ValueError(f"its profile has {aie.size} values ({'finite' if np.isfinite(aie).all() else 'not all finite'}); "
                             f"the model has {n_layers} layers")
        prof = LayerProfile(**{**body, "aie": aie, "source": body["source"] + " (cached)"})
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"layer profile cache rejected, recomputing it: {path}: {e}", CacheRebuiltWarning, stacklevel=3)
        return None
    return prof
