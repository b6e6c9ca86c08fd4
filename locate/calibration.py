"""Which layer stores facts? The MLP average indirect effect at the last subject token, per layer.

:func:`layer_profile` traces (MLP kind only, fast path, last subject token only) a calibration set of
facts that the model knows and averages the indirect effects. "Knows" is the reference's test (the
decoded top-1 token is the whole attribute, so a fact with a multi-token attribute is skipped; see
:mod:`locate.causal_trace`) and the noise is its default (3 x the std of known_1000's subject token
embeddings, with a warned fallback to the embedding matrix); both are options. The result is cached
on disk per model fingerprint and library versions (:func:`locate.loading.derived_cache_key`), the
facts, the settings, the known-fact test and nu, under ``cache_dir()/calibration/`` with a SHA-256 of
its content; a corrupted file is detected, reported and recomputed. ROME's ``layer="auto"`` and
MEMIT's ``layers="auto"`` use it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tqdm.auto import tqdm

from ._tracing import clean_states
from .causal_trace import _check_known_match, _is_known, load_facts, noise_level, trace
from .loading import cache_dir, derived_cache_key
from .model import resolve_model

DEFAULT_FACTS = Path(__file__).parent / "data" / "calibration_facts.json"


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

    def best_layer(self) -> int:
        return int(np.argmax(self.aie))

    def window(self, k: int) -> list[int]:
        """The contiguous ``k`` layers with the largest summed AIE."""
        k = max(1, min(int(k), len(self.aie)))
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


def layer_profile(model=None, *, facts=None, n: int | None = 15, samples: int = 3, window: int = 10,
                  seed: int = 0, noise="auto", known_match: str = "answer", cache: bool = True,
                  progress: bool = False) -> LayerProfile:
    """MLP AIE per layer at the last subject token over known facts (see the module docstring).

    ``facts``: a list of {"prompt", "subject", "attribute"} dicts or a JSON path (default: the
    packaged calibration set). ``n``: use the first ``n`` facts; those the model does not know
    (``known_match``, as :func:`locate.causal_trace.trace_many`) are skipped. ``noise``: as
    :func:`locate.trace`, resolved once; its value is part of the cache key.
    """

    lm = resolve_model(model)
    _check_known_match(known_match)
    source = str(facts) if isinstance(facts, (str, Path)) else ("packaged calibration set" if facts is None
                                                                 else "given facts")
    fact_list = load_facts(DEFAULT_FACTS if facts is None else facts)
    if n is not None:
        fact_list = fact_list[:n]
    nl = noise_level(lm, noise)
    key = _digest({"facts": fact_list, "samples": samples, "window": window, "seed": seed,
                   "known_match": known_match, "noise_level": nl.nu})[:12]
    path = cache_dir() / "calibration" / f"{derived_cache_key(lm)}-{key}.json"
    if cache and path.is_file():
        try:
            d = json.loads(path.read_text())
            body = d["profile"]
            if d["sha256"] != _digest(body):
                raise ValueError("checksum mismatch")
            body["aie"] = np.asarray(body["aie"])
            body["source"] = body["source"] + " (cached)"
            return LayerProfile(**body)
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(f"calibration cache {path} is corrupted ({e}); recomputing it", stacklevel=2)
    total, count = np.zeros(lm.n_layers), 0
    for f in tqdm(fact_list, desc="layer_profile", disable=not progress):
        logits, _ = clean_states(lm, lm.encode(f["prompt"]), [])
        if not _is_known(lm, f["prompt"], f["attribute"], logits, known_match):
            continue
        tr = trace(f["prompt"], f["subject"], model=lm, kinds=("mlp",), samples=samples, window=window,
                   seed=seed, noise=nl, tokens=["last_subject"])
        total += tr.ie("mlp")[tr.token_index("last_subject")]
        count += 1
    aie = total / max(count, 1)
    prof = LayerProfile(aie=aie, n_facts=count, source=source, model=lm.name, fingerprint=lm.fingerprint,
                        samples=samples, trace_window=window, known_match=known_match, noise_level=nl.nu,
                        noise_source=nl.source)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = prof.to_dict()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sha256": _digest(body), "profile": body}))
        tmp.replace(path)
    return prof
