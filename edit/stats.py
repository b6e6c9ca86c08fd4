"""Second-moment statistics of MLP keys: C_l = E[k kᵀ] (ROME §3.1, MEMIT eq. 11).

ROME treats the MLP output projection W of layer l as a linear associative memory that maps keys k
(the input of the projection, d_mlp wide) to values v = W k. Inserting a new (k*, v*) pair while
disturbing the stored ones as little as possible needs the uncentred covariance of the keys the
layer sees in ordinary text:

    C_l = E_x[ k_l(x) k_l(x)ᵀ ]          (expectation over the tokens x of a text corpus)

We estimate it from a corpus streamed in batches: the products of one batch are taken in the
model's float32, the running sum across batches in float64. All requested layers are collected in
one pass (one hook per layer on ``lm.hook_mlp_key(l)``); the forward pass stops after the deepest
requested layer, since nothing after it changes those keys.

Corpus sources (the result's ``source`` says which was used and how many tokens). Every entry point
(the API, ``locate-edit edit``/``eval``, the bench scripts, the layer sweep) resolves ``corpus`` here,
through :func:`resolve_corpus`, so they all agree:

* ``None`` (the default): :data:`DEFAULT_CORPUS`, the head of WikiText-2's validation split shipped
  inside the package (about 50k tokens, CC BY-SA 3.0; see ``edit/data/README.md``). It is a prefix of
  ``wiki.valid.raw``, so it gives the same statistics as that file for up to its length;
* a path to a plain-text file (paragraphs separated by blank lines, e.g. wikitext-2-raw);
* any iterable of strings;
* ``"hf:<dataset>[:<config>][:<split>]"``: a Hugging Face dataset, streamed (needs internet and the
  ``datasets`` package; the paper used Wikipedia);
* :data:`MODEL_SAMPLES` (``"model-samples"``): text sampled from the model itself (seeded), only when
  asked for by name. It is slow on a CPU (minutes for 40k tokens) and a narrower distribution than real
  text; it is never a silent fallback.

Texts are joined with blank lines into one token stream and cut into windows of ``seq_len`` tokens
(no padding, every token counts). The paper uses 100,000 Wikipedia samples (tens of millions of
tokens, on a GPU). On a 2-core CPU a 135M-parameter model runs at a few hundred to a few thousand
tokens per second, so the default here is ``DEFAULT_N_TOKENS`` tokens (about a minute cold on that
CPU for a layer in the first third of the model, see bench/rome_bench.py). That is 40 tokens per key
dimension of SmolLM2 (d_mlp=1536): enough for a well-conditioned C, noisier than the paper's estimate.
Raise ``n_tokens`` for published numbers; results are cached on disk, so the cost is paid once.

Input checks. A corpus file must be UTF-8 text: a binary or undecodable file is refused
(:class:`locate.errors.CorpusError`), never decoded with replacement characters into statistics of
garbage. C estimated from fewer tokens than the keys are wide (n_tokens < d_mlp) has rank at most
n_tokens, so it is singular: it is returned with an :class:`locate.errors.InsufficientStatisticsWarning`
but never cached, and ROME/MEMIT refuse it (:class:`locate.errors.InsufficientStatisticsError`).

Cache: ``locate.cache_dir()/stats/<derived cache key>/layer<l>-<corpus hash>-<n_tokens>-v<format>.safetensors``,
one entry of :func:`locate.loading.write_cached` (format, key, SHA-256, atomic write): the key is the
model *as it is* (``derived_cache_key``: weights, applied edits, library versions), the layer, a hash
of the corpus tokens and their count. A file that is unreadable, fails its checksum or belongs to
another key is reported (:class:`locate.loading.CacheRebuiltWarning`), recomputed and overwritten.
"""

from __future__ import annotations

import codecs
import hashlib
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from locate import capture, resolve_model
from locate.errors import (
    CorpusError,
    CorpusNotFoundError,
    FingerprintMismatchError,
    InsufficientStatisticsError,
    InsufficientStatisticsWarning,
    InvalidArgumentError,
    SingularStatisticsError,
)
from locate.loading import cache_dir, derived_cache_key, read_cached, write_cached

from .context import sample

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "wikitext2_valid_head.txt"
MODEL_SAMPLES = "model-samples"
DEFAULT_N_TOKENS = 40_000
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_TOKENS = 2048
_FORMAT = "locate-edit/key-stats/2"  # 2: the shared cache entry of locate.loading


@dataclass
class KeyStats:
    """C = E[k kᵀ] (float64, (d_mlp, d_mlp)) of one layer's MLP keys over ``n_tokens`` corpus tokens."""

    layer: int
    C: torch.Tensor
    n_tokens: int
    source: str
    corpus_hash: str
    cached: bool = False  # True when read from the disk cache

    def __repr__(self) -> str:
        return (f"KeyStats(layer={self.layer}, d_mlp={self.C.shape[0]}, n_tokens={self.n_tokens}, "
                f"source={self.source!r}, cached={self.cached})")

    def cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of C; :class:`SingularStatisticsError` if C is not positive definite."""
        L = self.__dict__.get("_chol")
        if L is None:
            check_enough_tokens(self)
            L, info = torch.linalg.cholesky_ex(self.C)
            if int(info) != 0 or not torch.isfinite(L).all():
                raise SingularStatisticsError(
                    f"key second moment of layer {self.layer} ({self.source}, {self.n_tokens} tokens) is not "
                    f"positive definite (Cholesky failed at column {int(info)}); use more corpus tokens "
                    f"(n_tokens > d_mlp = {self.C.shape[0]} at the very least) or a more varied corpus"
                )
            self.__dict__["_chol"] = L
        return L

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """x = C⁻¹ k by a Cholesky solve (never an explicit inverse). ``k``: (d_mlp,) or (d_mlp, n)."""
        L = self.cholesky()
        rhs = k.to(torch.float64).to(L.device)
        x = torch.cholesky_solve(rhs.unsqueeze(-1) if rhs.ndim == 1 else rhs, L)
        x = x.squeeze(-1) if rhs.ndim == 1 else x
        if not torch.isfinite(x).all():
            raise SingularStatisticsError(f"solving C x = k at layer {self.layer} gave non-finite values")
        return x.to(k.device)  # where k came from (C may sit elsewhere: on the CPU when read from the cache)


def check_enough_tokens(st: KeyStats) -> KeyStats:
    """Refuse (:class:`InsufficientStatisticsError`) statistics estimated from fewer tokens than the keys
    are wide: C = (1/n) Σ k kᵀ then has rank ≤ n < d_mlp and no inverse, and a Cholesky factorisation
    that happens to pass in floating point would solve with rounding noise."""
    d = int(st.C.shape[0])
    if st.n_tokens < d:
        raise InsufficientStatisticsError(
            f"key statistics of layer {st.layer} ({st.source}) come from {st.n_tokens} tokens, fewer than the "
            f"{d} dimensions of a key: their C has rank at most {st.n_tokens}, so it is singular (not positive "
            f"definite by construction). Use at least d_mlp = {d} tokens (the default is {DEFAULT_N_TOKENS:,}).")
    return st


# --------------------------------------------------------------------------- corpus sources
_SNIFF_BYTES = 1 << 16


def _refuse_binary(path: Path, text: str, where: str) -> None:
    if "\x00" in text:
        raise CorpusError(f"corpus file {path} is binary, not text (a NUL character {where}); "
                          "give a UTF-8 text file, paragraphs separated by blank lines")


def check_corpus_file(path) -> Path:
    """``path`` as a Path, refused unless it is an existing file whose start reads as UTF-8 text: missing
    (:class:`CorpusNotFoundError`), binary or undecodable (:class:`CorpusError`). The whole file is
    checked again as it is read; this look at its first 64 KiB lets a command refuse it before a model loads."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusNotFoundError(f"corpus file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < _SNIFF_BYTES)
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (undecodable byte at offset {e.start}); "
                          "give a UTF-8 text file, paragraphs separated by blank lines") from e
    _refuse_binary(path, text, "in its first 64 KiB")
    return path


def _read_text_file(path: Path) -> Iterator[str]:
    """Paragraphs of a UTF-8 text file (blank-line separated); a binary or undecodable file is refused
    (:class:`CorpusError`) where it stops being text, never decoded with replacement characters."""
    para: list[str] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                _refuse_binary(path, line, f"on line {lineno}")
                if line.strip():
                    para.append(line.rstrip("\n"))
                elif para:
                    yield "\n".join(para)
                    para = []
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus file {path} is not UTF-8 text (undecodable bytes after line {lineno}); "
                              "give a UTF-8 text file, paragraphs separated by blank lines") from e
    if para:
        yield "\n".join(para)


def _hf_texts(spec: str) -> Iterator[str]:
    parts = spec[len("hf:"):].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "train")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError(f"corpus {spec!r} needs the `datasets` package (pip install datasets) and internet") from e
    ds = datasets.load_dataset(name, config, split=split, streaming=True)  # pragma: no cover
    for row in ds:  # pragma: no cover
        yield row["text"]


def _model_texts(lm, seed: int, n_tokens: int, seq_len: int, batch: int = 8) -> Iterator[str]:
    """Last resort: text the model samples itself (top-k 50 after a few neutral start words), seeded."""

    gen = torch.Generator().manual_seed(seed)
    starts = ["The", "In", "A", "It", "This", "He", "She", "There", "On", "After", "When", "According to"]
    produced, i = 0, 0
    while produced < n_tokens:
        for text in sample(lm, starts[i % len(starts)], batch, seq_len, gen, top_k=50):
            produced += len(lm.encode(text, raw=True))
            yield text
        i += 1


def resolve_corpus(corpus):
    """The corpus a run reads: ``None`` -> :data:`DEFAULT_CORPUS`; anything else as given."""
    return DEFAULT_CORPUS if corpus is None else corpus


def describe_corpus(corpus) -> str:
    """A short description of ``corpus`` (after :func:`resolve_corpus`), for settings and records."""
    corpus = resolve_corpus(corpus)
    if isinstance(corpus, str) and corpus == MODEL_SAMPLES:
        return "model samples"
    if isinstance(corpus, (str, os.PathLike)) and Path(corpus) == DEFAULT_CORPUS:
        return f"packaged WikiText-2 validation head ({DEFAULT_CORPUS.name})"
    if isinstance(corpus, (str, os.PathLike)) and str(corpus).startswith("hf:"):
        return str(corpus)
    if isinstance(corpus, (str, os.PathLike)):
        return f"file {Path(corpus).name}"
    return "iterable of strings"


def _texts(lm, corpus, n_tokens: int, seq_len: int, seed: int) -> Iterable[str]:
    corpus = resolve_corpus(corpus)
    if isinstance(corpus, str) and corpus == MODEL_SAMPLES:
        return _model_texts(lm, seed, n_tokens, seq_len)
    if isinstance(corpus, (str, os.PathLike)):
        if str(corpus).startswith("hf:"):
            return _hf_texts(str(corpus))
        return _read_text_file(check_corpus_file(corpus))
    if isinstance(corpus, (bytes, bytearray)) or not isinstance(corpus, Iterable):
        raise CorpusError(f"corpus must be a path, an iterable of str, 'hf:<name>', {MODEL_SAMPLES!r} or None, "
                          f"not {type(corpus).__name__}")
    return corpus


def token_stream(lm, corpus, n_tokens: int, *, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The first ``n_tokens`` tokens of ``corpus`` (texts joined by blank lines) as windows
    (n_windows, seq_len), the last one shorter if needed, plus a SHA-256 of those tokens."""
    ids: list[int] = []
    sep = lm.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for text in _texts(lm, corpus, n_tokens, seq_len, seed):
        if not isinstance(text, str):
            raise CorpusError(f"corpus items must be strings, got {type(text).__name__}")
        if not text.strip():
            continue
        ids.extend(lm.encode(text, raw=True) + sep)
        if len(ids) >= n_tokens:
            break
    if not ids:
        raise CorpusError(f"corpus ({describe_corpus(corpus)}) yielded no tokens")
    if len(ids) < n_tokens:
        warnings.warn(f"corpus ({describe_corpus(corpus)}) has only {len(ids)} tokens, fewer than n_tokens={n_tokens}",
                      InsufficientStatisticsWarning, stacklevel=3)
    ids = ids[:n_tokens]
    digest = hashlib.sha256(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]
    return torch.tensor(ids, dtype=torch.long), digest


# --------------------------------------------------------------------------- cache
def stats_path(lm, layer: int, corpus_hash: str, n_tokens: int) -> Path:
    """Where the cache entry of these statistics lives. The file name carries the format version, so files
    of an older layout (left by an older install sharing the cache) are neither read nor overwritten."""
    version = _FORMAT.rsplit("/", 1)[1]
    return (cache_dir() / "stats" / derived_cache_key(lm)
            / f"layer{layer}-{corpus_hash}-{n_tokens}-v{version}.safetensors")


def _key(lm, layer, corpus_hash, n_tokens) -> dict:
    return {"model": derived_cache_key(lm), "layer": layer, "corpus_hash": corpus_hash, "n_tokens": n_tokens}


# --------------------------------------------------------------------------- the statistic
def key_second_moments(model, layers: int | Sequence[int], *, corpus=None, n_tokens: int = DEFAULT_N_TOKENS,
                       batch_tokens: int = DEFAULT_BATCH_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                       cache: bool = True, progress: bool = True, seed: int = 0) -> dict[int, KeyStats]:
    """C_l = E[k kᵀ] for every layer in ``layers``, over the first ``n_tokens`` tokens of ``corpus``,
    in one pass over the corpus. Returns ``{layer: KeyStats}``; cached layers are read from disk."""
    lm = resolve_model(model)
    if isinstance(layers, (numbers.Number, str)) or not isinstance(layers, Iterable):  # np.int64(3) is one layer
        layers = [layers]
    layers = sorted({lm.check_layer(l) for l in layers})
    if not layers:
        raise InvalidArgumentError("no layers requested")
    for name, value in (("n_tokens", n_tokens), ("batch_tokens", batch_tokens), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    n_tokens, batch_tokens, seq_len = int(n_tokens), int(batch_tokens), int(seq_len)
    seq_len = min(seq_len, batch_tokens, int(getattr(lm.cfg, "n_ctx", seq_len) or seq_len))
    described = describe_corpus(corpus)

    samples = isinstance(corpus, str) and corpus == MODEL_SAMPLES
    if samples:  # model samples: the key is the sampling recipe, checked before sampling
        corpus_hash = hashlib.sha256(f"model-samples:{lm.state_fingerprint}:{seed}:{seq_len}".encode()).hexdigest()[:16]
        tokens = None
    else:
        tokens, corpus_hash = token_stream(lm, corpus, n_tokens, seq_len=seq_len, seed=seed)
        n_tokens = int(tokens.numel())

    out: dict[int, KeyStats] = {}
    cache = cache and n_tokens >= lm.d_mlp  # statistics from fewer tokens than d_mlp are never cached (below)
    if cache:
        for l in layers:
            hit = read_cached(stats_path(lm, l, corpus_hash, n_tokens), _FORMAT, _key(lm, l, corpus_hash, n_tokens),
                              what=f"key statistics (layer {l})")
            if hit is not None:
                C = hit[1].get("C")
                if C is None or tuple(C.shape) != (lm.d_mlp, lm.d_mlp) or C.dtype != torch.float64:
                    continue  # pragma: no cover - a digest-valid entry of this format always holds C
                # same tokens, same C: the source names the corpus this call was given
                out[l] = KeyStats(l, C, n_tokens, f"{described} ({n_tokens} tokens)", corpus_hash, cached=True)
    todo = [l for l in layers if l not in out]
    if not todo:
        return out

    if tokens is None:
        tokens, _ = token_stream(lm, MODEL_SAMPLES, n_tokens, seq_len=seq_len, seed=seed)
        n_tokens = int(tokens.numel())
    if n_tokens < lm.d_mlp:
        warnings.warn(f"key statistics from {n_tokens} tokens, fewer than d_mlp = {lm.d_mlp}: C is singular "
                      "(rank <= n_tokens). It is returned but not cached, and ROME/MEMIT refuse it; use at least "
                      f"{lm.d_mlp} tokens", InsufficientStatisticsWarning, stacklevel=2)
    source = f"{described} ({n_tokens} tokens)"
    if samples:
        source = f"model samples (asked for; {n_tokens} tokens sampled from {lm.name}, seed {seed})"

    # each layer's running sum on that layer's device (a model may be spread over several), in float64
    sums = {l: torch.zeros(lm.d_mlp, lm.d_mlp, dtype=torch.float64, device=lm.layer_device(l)) for l in todo}
    windows = list(tokens.split(seq_len))
    rows_per_batch = max(1, batch_tokens // seq_len)

    def accumulate(site, k):
        total = sums[layer_of[site]]
        k = k.reshape(-1, k.shape[-1]).to(device=total.device, dtype=torch.float32)
        total.add_((k.T @ k).double())  # one batch in float32, the running sum in float64

    layer_of = {lm.hook_mlp_key(l): l for l in todo}
    bar = tqdm(total=n_tokens, desc=f"key statistics, layers {todo}", unit="tok", disable=not progress)
    with torch.no_grad():
        for i in range(0, len(windows), rows_per_batch):
            chunk = windows[i: i + rows_per_batch]
            # equal-length windows batch without padding; a short last window runs alone
            groups = [chunk] if len({len(w) for w in chunk}) == 1 else [[w] for w in chunk]
            for g in groups:
                with capture(lm, list(layer_of), keep=accumulate):  # stops after the deepest layer
                    lm.bridge(torch.stack(g).to(lm.device))
                bar.update(sum(len(w) for w in g))
    bar.close()

    for l in todo:
        C = sums[l] / n_tokens
        st = KeyStats(l, C, n_tokens, source, corpus_hash)
        if cache:
            write_cached(stats_path(lm, l, corpus_hash, n_tokens), _FORMAT, _key(lm, l, corpus_hash, n_tokens),
                         body={"source": source}, tensors={"C": C})
        out[l] = st
    return {l: out[l] for l in layers}


def stats_for(lm, layers: Sequence[int], rt, *, n_tokens: int = DEFAULT_N_TOKENS) -> dict[int, "KeyStats"]:
    """``{layer: KeyStats}`` for ``layers``, for a method running under the :class:`edit.registry.Runtime`
    ``rt``: ``rt.stats`` where they cover a layer (checked to fit the model), else the statistics this
    run already computed (``rt.cache``), else computed (or read from the disk cache) over ``rt.corpus``.

    Within one run the statistics are those of the model as the first edit found it, as in the
    reference code, where C₀ describes the unedited model's keys and is reused by every later edit of
    a sequential run (and not recomputed on the model that carries the earlier edits)."""
    out = {}
    for l, st in dict(rt.stats or {}).items():
        if not isinstance(st, KeyStats):
            raise InvalidArgumentError(f"stats[{l}] must be a KeyStats, got {type(st).__name__}")
        if tuple(st.C.shape) != (lm.d_mlp, lm.d_mlp):
            raise FingerprintMismatchError(f"key statistics for layer {l} are {tuple(st.C.shape)}, the model's "
                                           f"keys are {lm.d_mlp} wide: they were made for another model")
        if not bool(torch.isfinite(st.C).all()):
            raise SingularStatisticsError(f"key statistics for layer {l} ({st.source}) are not finite")
        out[int(l)] = check_enough_tokens(st)
    memo = rt.cache.setdefault("key_stats", {})
    corpus_tag = str(rt.corpus) if isinstance(rt.corpus, (str, os.PathLike)) or rt.corpus is None else id(rt.corpus)
    tag = (lm.fingerprint, corpus_tag, n_tokens)
    for l in layers:
        if l not in out and (tag, l) in memo:
            out[l] = memo[(tag, l)]
    missing = [l for l in layers if l not in out]
    if missing:
        got = key_second_moments(lm, missing, corpus=rt.corpus, n_tokens=n_tokens, progress=rt.progress)
        for st in got.values():
            check_enough_tokens(st)
        for l, st in got.items():
            memo[(tag, l)] = st
        out.update(got)
    return {l: out[l] for l in layers}
