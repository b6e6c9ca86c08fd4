"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

Three kinds of run on one prompt:

* the **clean** run, whose top-1 next token is the answer ``o`` (unless ``target=`` is given);
  ``p_clean = P[o]``;
* **corrupted** runs: the subject's input embeddings get noise, ``h_i^(0) <- h_i^(0) + eps`` for
  every subject token ``i``, ``eps ~ N(0, nu^2)`` (or ``U(-nu, nu)``), ``samples`` seeded draws;
  ``p_corrupted = P_*[o]``, averaged over the draws;
* **corrupted-with-restoration** runs: the clean value of one state (token ``t``, layer ``l``) is
  put back into the corrupted run; ``score(t, l) = P_{*, clean h_t^(l)}[o]``, averaged over the same
  draws.

Total effect ``TE = p_clean - p_corrupted``; indirect effect ``IE(t, l) = score(t, l) - p_corrupted``.

Kinds of state (what is restored at layer ``l``):

* ``"hidden"``: the residual stream *after* block ``l`` (the block output, as the reference code's
  ``transformer.h.{l}``). Layers run 0..n_layers-1, as in the reference's grid, which has no
  embedding column either (restoring the embeddings themselves is available through
  :func:`restored_probability` with ``lm.hook_embed``).
* ``"mlp"`` / ``"attn"``: the MLP / attention output of every layer in the **window**
  ``[l - w//2, l + w - w//2)`` clipped to ``[0, n_layers)``, as ``trace_important_window`` in the
  paper's code. ``w`` is the reference's 10 by default (``n_layers`` on a model with fewer than 10
  layers, e.g. a tiny test model); a ``window`` given larger than ``n_layers`` is refused, since every
  score would then restore (almost) every layer.

Noise level ``nu`` (``noise=``), as the paper's code's default rule ``s3``:

    nu = 3 * std( E[i, j] : i a token of a known_1000 subject, j < d_model )

where ``E`` is the input embedding matrix and each subject is tokenized on its own.

``"auto"`` (default) is that rule over the subjects of ``known_1000/known_1000.json``, looked up in
the data directory (``$LOCATE_EDIT_DATA``, ``./shared/data``, ``../shared/data``, the ``shared/data``
beside this checkout); the std is computed once per model (:func:`locate.loading.derived_cache_key`)
and cached under ``cache_dir()/noise/``. Where no known_1000 file is found it falls back, with a
:class:`NoiseFallbackWarning`, to the embedding-matrix std. Options: ``"embedding_matrix"`` = 3 x the
std of all token-embedding entries; a path to a facts JSON file or a list of subject strings = the
same rule over those subjects; a number = that ``nu``; a :class:`NoiseLevel` = as given. The result
records which was used in ``noise_source``.

Which facts the model "knows" (:func:`trace_many`, :func:`locate.layer_profile`): as the reference's
``calculate_hidden_flow(expect=...)``, the clean top-1 next token, decoded and stripped of
whitespace, must equal the whole attribute string. An attribute of several tokens can therefore never
match (the one decoded token is only its start) and such a fact is skipped. ``known_match=
"first_token"`` is the looser option: the top-1 id equals the attribute's first token.

:func:`trace` uses the fast path (:mod:`locate._fast_restore`); ``method="loop"`` runs the plain
per-(token, layer) loop below, one hooked forward per restoration, kept as the semantic reference.
``method="attribution"`` does not restore anything: it estimates every score to first order from one
clean run and one corrupted forward + backward (:mod:`locate.attribution`, where its failure modes
are listed); it is a fast first pass, not the reference.
The fast path's memory stays flat as the prompt grows (its batches share the corrupted run's
key/value prefix); a prompt longer than ``PROGRESS_MIN_TOKENS`` tokens shows a progress bar unless
``progress=False``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import data_dir_candidates, read_json, write_json
from .errors import DataFileNotFoundError, LocateEditError, LocateEditWarning, SubjectNotFoundError, TokenNotInVocabularyError
from ._fast_restore import fast_scores
from .attribution import ATTRIBUTION_METHODS, attribution_scores
from ._tracing import clean_states, restored_layers, state_hook, window_layers  # noqa: F401  (re-exported)
from .loading import cache_dir, derived_cache_key, read_cached, write_cached
from .model import HookedLM, resolve_model

KINDS = ("hidden", "mlp", "attn")
TOKEN_GROUPS = ("first subject token", "middle subject tokens", "last subject token",
                "first subsequent token", "further tokens", "last token")
KNOWN_MATCHES = ("answer", "first_token")  # see the module docstring; "answer" is the reference's
POOLINGS = ("rows", "facts")  # see average_indirect_effects; "rows" is the reference notebook's
KNOWN_FACTS_FILE = Path("known_1000") / "known_1000.json"  # inside a data directory
NOISE_FACTOR = 3.0  # the reference's "s3": nu = 3 x the embedding std
DEFAULT_WINDOW = 10  # the reference's window (trace_important_window's default)
TRACE_METHODS = ("fast", "loop") + ATTRIBUTION_METHODS  # exact (default), exact reference loop, estimates
PROGRESS_MIN_TOKENS = 256  # trace shows a progress bar by default for prompts longer than this
NOISE_CACHE_FORMAT = "locate-edit/noise-std/1"


class TraceError(LocateEditError, ValueError):
    """Bad arguments to a causal trace (unknown kind, window outside 1..n_layers, samples < 1, a token
    index outside the prompt or an unknown token name...)."""


def token_names(span: tuple[int, int], n_tokens: int, corrupted: tuple[int, int] | None = None) -> dict[str, int]:
    """The named token rows of a prompt of ``n_tokens`` tokens whose subject is ``span``; with a
    ``corrupted`` span (``trace(corrupt=...)``) also ``first_corrupted`` and ``last_corrupted``."""
    named = {"first_subject": span[0], "last_subject": span[1] - 1, "first_subsequent": span[1],
             "last": n_tokens - 1}
    if corrupted is not None:
        named.update(first_corrupted=corrupted[0], last_corrupted=corrupted[1] - 1)
    return named


def check_token(token, span: tuple[int, int], n_tokens: int, corrupted: tuple[int, int] | None = None) -> int:
    """The row index of ``token`` (an index in ``0..n_tokens-1`` or a name of :func:`token_names`), or
    :class:`TraceError` naming the valid range and names. A negative index is refused rather than read
    from the end: -1 would be the last row, not "before the subject"."""
    named = token_names(span, n_tokens, corrupted)
    if isinstance(token, str):
        if token not in named:
            raise TraceError(f"unknown token name {token!r}; the names are {sorted(named)}")
        if named[token] >= n_tokens:  # "first_subsequent" of a prompt that ends with the subject
            raise TraceError(f"token {token!r} does not exist: the subject ends the prompt "
                             f"({n_tokens} tokens)")
        return named[token]
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise TraceError(f"a token is an index (int) or one of {sorted(named)}, got {type(token).__name__} "
                         f"{token!r}")
    if not 0 <= int(token) < n_tokens:
        raise TraceError(f"token index {int(token)} is out of range: the prompt has {n_tokens} tokens, indices "
                         f"0..{n_tokens - 1} (negative indices are not accepted; use 'last' for the last token)")
    return int(token)


class NonFiniteTraceError(TraceError):
    """A trace whose probabilities came out NaN or infinite (the noise overflowed the model's dtype, or
    the model itself outputs non-finite logits): refused rather than returned."""


class NoiseFallbackWarning(LocateEditWarning):
    """``noise="auto"`` found no known_1000 subjects and used the embedding-matrix std instead."""


# ====================================================================== the result
@dataclass
class CausalTrace:
    """One traced fact. ``scores[kind][t, l]`` = P(answer) with state (t, l) restored."""

    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    answer_id: int
    answer: str
    p_clean: float
    p_corrupted: float
    scores: dict[str, np.ndarray]
    kinds: tuple[str, ...]
    window: int
    samples: int
    seed: int
    noise_level: float
    noise_kind: str  # "gaussian" | "uniform"
    noise_source: str  # how nu was chosen
    model: str = ""
    fingerprint: str = ""
    method: str = "fast"
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    corrupted_range: tuple[int, int] | None = None  # the noised span when trace(corrupt=...) named one

    @property
    def te(self) -> float:
        """Total effect p_clean - p_corrupted."""
        return self.p_clean - self.p_corrupted

    def ie(self, kind: str = "mlp") -> np.ndarray:
        """Indirect effects score - p_corrupted, shape (tokens, layers)."""
        return self.scores[kind] - self.p_corrupted

    def argmax(self, kind: str = "mlp") -> tuple[int, int]:
        """(token, layer) of the largest score for ``kind``."""
        s = self.scores[kind]
        t, l = np.unravel_index(int(np.nanargmax(s)), s.shape)
        return int(t), int(l)

    def token_index(self, token: str | int) -> int:
        """The row of ``token``: an index ``0..len(tokens)-1`` or a name (see :func:`check_token`)."""
        return check_token(token, self.subject_range, len(self.tokens), self.corrupted_range)

    def best_layer(self, kind: str = "mlp", token: str | int = "last_subject") -> int:
        """The layer with the largest indirect effect of ``kind`` at ``token``."""
        if kind not in self.scores:
            raise TraceError(f"kind {kind!r} was not traced (traced: {list(self.scores)})")
        return int(np.nanargmax(self.scores[kind][self.token_index(token)]))

    def summary(self) -> str:
        lines = [f"{self.prompt!r} -> {self.answer!r}   subject {self.subject!r} = tokens "
                 f"{self.subject_range[0]}..{self.subject_range[1] - 1}",
                 f"p_clean {self.p_clean:.4f}   p_corrupted {self.p_corrupted:.4f}   TE {self.te:.4f}   "
                 f"(noise {self.noise_kind} nu={self.noise_level:.4f} [{self.noise_source}], {self.samples} samples, "
                 f"window {self.window}, {self.method} path, {self.seconds:.1f} s)"]
        for kind in self.kinds:
            t, l = self.argmax(kind)
            lines.append(f"  {kind:6s}: max IE {self.scores[kind][t, l] - self.p_corrupted:+.4f} at token {t} "
                         f"{self.tokens[t]!r}, layer {l};  best layer at last subject token: "
                         f"{self.best_layer(kind)}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = {k: v.tolist() for k, v in self.scores.items()}
        d["subject_range"] = list(self.subject_range)
        d["kinds"] = list(self.kinds)
        if self.corrupted_range is None:
            del d["corrupted_range"]  # records of subject traces stay as they were
        else:
            d["corrupted_range"] = list(self.corrupted_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CausalTrace":
        d = dict(d)
        d["scores"] = {k: np.asarray(v, dtype=np.float64) for k, v in d["scores"].items()}
        d["subject_range"] = tuple(d["subject_range"])
        d["kinds"] = tuple(d["kinds"])
        if d.get("corrupted_range") is not None:
            d["corrupted_range"] = tuple(d["corrupted_range"])
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "CausalTrace":
        return cls.from_dict(read_json(path, "causal trace"))


# ====================================================================== noise
class NoiseLevel(NamedTuple):
    """``nu`` and a description of where it came from (stored as ``CausalTrace.noise_source``)."""

    nu: float
    source: str


def embedding_std(lm: HookedLM, subjects: Sequence[str] | None = None) -> float:
    """Standard deviation of token-embedding entries: over the whole embedding matrix, or over the
    embedding rows of the tokens of ``subjects`` (each subject tokenized alone, no special tokens;
    the paper's ``collect_embedding_std``)."""
    emb = lm.hf_model.get_input_embeddings().weight.detach()
    if subjects is None:
        return float(emb.float().std())
    ids = [i for s in subjects for i in lm.tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise TraceError("noise: the list of subjects tokenizes to nothing")
    return float(emb[torch.as_tensor(ids)].float().std())


def find_known_facts() -> Path | None:
    """The first ``known_1000/known_1000.json`` under :func:`data_dir_candidates`, or None."""
    for d in data_dir_candidates():
        if (d / KNOWN_FACTS_FILE).is_file():
            return d / KNOWN_FACTS_FILE
    return None


def subjects_embedding_std(lm: HookedLM, facts_file: str | Path, *, cache: bool = True) -> tuple[float, int]:
    """(std of the token embeddings of the subjects in ``facts_file``, number of subjects).

    Cached per model as it is (:func:`locate.loading.derived_cache_key`, applied edits included) and
    file content under ``cache_dir()/noise/``, through the toolkit's one cache mechanism
    (:func:`locate.loading.write_cached`: key, SHA-256, atomic write, format version); an entry that
    fails its check is reported (:class:`locate.loading.CacheRebuiltWarning`) and recomputed."""
    path = Path(facts_file)
    if not path.is_file():
        raise TraceError(f"noise: facts file not found: {path}")
    raw = path.read_bytes()
    facts_sha = hashlib.sha256(raw).hexdigest()
    model_key = derived_cache_key(lm)
    entry = cache_dir() / "noise" / f"{model_key}-{facts_sha[:12]}.json"
    key = {"model": model_key, "facts_sha256": facts_sha}
    if cache:
        got = read_cached(entry, NOISE_CACHE_FORMAT, key, what="noise")
        if got is not None:
            body, _ = got
            return float(body["std"]), int(body["n_subjects"])
    try:
        subjects = [f["subject"] for f in json.loads(raw)]
    except (ValueError, TypeError, KeyError) as e:
        raise TraceError(f"{path}: not a JSON list of facts with a 'subject' ({e})") from e
    body = {"std": embedding_std(lm, subjects), "n_subjects": len(subjects)}
    if cache:
        write_cached(entry, NOISE_CACHE_FORMAT, key, body=body)
    return body["std"], body["n_subjects"]


def noise_level(lm: HookedLM, noise="auto") -> NoiseLevel:
    """``nu`` and where it came from; ``noise`` as in the module docstring. Anything else (``None``, a
    negative or non-finite number, a list holding non-strings) raises :class:`TraceError`."""
    if isinstance(noise, NoiseLevel):
        if not _finite_level(noise.nu):
            raise TraceError(f"noise level must be a finite number >= 0, got {noise.nu!r}")
        return noise
    if isinstance(noise, numbers.Real) and not isinstance(noise, bool):
        if not _finite_level(noise):
            raise TraceError(f"noise level must be a finite number >= 0, got {noise}")
        return NoiseLevel(float(noise), "given")
    matrix = f"{NOISE_FACTOR:g} x std of the token-embedding matrix"
    if isinstance(noise, str) and noise == "embedding_matrix":
        return NoiseLevel(NOISE_FACTOR * embedding_std(lm), matrix)
    if isinstance(noise, str) and noise == "auto":
        found = find_known_facts()
        if found is None:
            where = ", ".join(str(d / KNOWN_FACTS_FILE) for d in data_dir_candidates())
            warnings.warn(f"noise='auto': no known_1000 subjects found (looked for {where}); using {matrix} "
                          "instead of the reference's subject-embedding std. Set LOCATE_EDIT_DATA, or pass "
                          "noise='embedding_matrix' to choose this on purpose.", NoiseFallbackWarning, stacklevel=2)
            return NoiseLevel(NOISE_FACTOR * embedding_std(lm), f"{matrix} (fallback: known_1000 not found)")
        noise = found
    elif isinstance(noise, str) and not Path(noise).suffix == ".json":
        raise TraceError(f"noise={noise!r}: use 'auto', 'embedding_matrix', a number, a facts JSON file "
                         "or a list of subjects")
    if isinstance(noise, (str, Path)):
        std, n = subjects_embedding_std(lm, noise)
        return NoiseLevel(NOISE_FACTOR * std, f"{NOISE_FACTOR:g} x std of the token embeddings of the {n} "
                                              f"subjects of {Path(noise).name}")
    if not isinstance(noise, (list, tuple)) or not all(isinstance(x, str) for x in noise):
        raise TraceError(f"noise={noise!r}: use 'auto', 'embedding_matrix', a number, a facts JSON file "
                         "or a list of subject strings")
    subjects = list(noise)
    return NoiseLevel(NOISE_FACTOR * embedding_std(lm, subjects),
                      f"{NOISE_FACTOR:g} x std of the token embeddings of {len(subjects)} given subjects")


def _finite_level(nu) -> bool:
    return isinstance(nu, numbers.Real) and not isinstance(nu, bool) and math.isfinite(nu) and nu >= 0


def draw_noise(samples: int, n_tokens: int, d_model: int, level: float, *, seed: int,
               uniform: bool = False) -> torch.Tensor:
    """The noise added to the subject embeddings, (samples, n_subject_tokens, d_model), seeded.
    The same draw is used for the corrupted run and for every restoration."""
    g = torch.Generator().manual_seed(seed)
    if uniform:
        base = torch.rand(samples, n_tokens, d_model, generator=g, dtype=torch.float64) * 2 - 1
    else:
        base = torch.randn(samples, n_tokens, d_model, generator=g, dtype=torch.float64)
    return (level * base).float()


# ====================================================================== the reference loop
@torch.no_grad()
def restored_probability(lm: HookedLM, ids: Sequence[int], span: tuple[int, int], noise: torch.Tensor,
                         answer_id: int, restore: Sequence[tuple[str, int]] = (),
                         clean: dict | None = None) -> float:
    """One reference run (the paper's ``trace_with_patch``): P(answer) at the last position, averaged
    over the noisy rows, with the subject embeddings noised and each (hook name, token) in
    ``restore`` set back to its clean value. ``restore=()`` gives p_corrupted."""
    s0, s1 = span
    samples = noise.shape[0]
    names = {n for n, _ in restore}
    if clean is None:
        _, clean = clean_states(lm, ids, names)
    by_name: dict[str, list[int]] = {}
    for n, t in restore:
        by_name.setdefault(n, []).append(t)

    def add_noise(x, hook):
        x = x.clone()
        x[:, s0:s1] += noise.to(x.dtype).to(x.device)
        return x

    def patcher(name):
        def patch(x, hook):
            x = x.clone()
            for t in by_name[name]:
                x[:, t] = clean[name][t]
            return x
        return patch

    # embeddings first: a restore on the embedding hook must win over the noise
    hooks = [(lm.hook_embed, add_noise)] + [(n, patcher(n)) for n in by_name]
    x = torch.tensor([list(ids)] * samples, device=lm.device)
    with lm.hooks(hooks):
        logits = lm.hf_model(input_ids=x, logits_to_keep=1).logits[:, -1]
    return float(logits.float().softmax(-1)[:, answer_id].mean())


def loop_scores(lm: HookedLM, ids: Sequence[int], span: tuple[int, int], noise: torch.Tensor,
                answer_id: int, kind: str, window: int, *, progress: bool = False) -> np.ndarray:
    """The reference algorithm: one hooked forward per (token, layer). Slow; kept for checking."""
    L, T = lm.n_layers, len(ids)
    _, clean = clean_states(lm, ids, [state_hook(lm, kind, l) for l in range(L)])
    out = np.zeros((T, L))
    for t, l in tqdm([(t, l) for t in range(T) for l in range(L)], desc=f"trace {kind} (loop)",
                     disable=not progress, leave=False):
        restore = [(state_hook(lm, kind, j), t) for j in restored_layers(kind, l, window, L)]
        out[t, l] = restored_probability(lm, ids, span, noise, answer_id, restore, clean)
    return out


# ====================================================================== trace
def resolve_answer(lm: HookedLM, prompt: str, target, clean_logits: torch.Tensor) -> int:
    if target is None:
        return int(clean_logits.argmax())
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < lm.n_vocab:
            raise TokenNotInVocabularyError(f"target token id {target} is outside the vocabulary (0..{lm.n_vocab - 1})")
        return int(target)
    if not isinstance(target, str):
        raise TraceError(f"target must be None, a token id or a one-token string, got {type(target).__name__} "
                         f"{target!r}")
    ids = lm.target_ids(target, prompt)
    unk = getattr(lm.tokenizer, "unk_token_id", None)
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise TokenNotInVocabularyError(
            f"target {target!r} is not a single token of the vocabulary (it tokenizes to {pieces}); "
            "causal tracing measures the probability of one next token: pass its first token, e.g. "
            f"{pieces[0]!r}")
    return ids[0]


def _check_args(kinds, samples, window, n_layers: int) -> tuple[tuple[str, ...], int]:
    """(kinds, window): checked, the window resolved (``None``: the reference's 10, or ``n_layers`` when
    the model has fewer layers; a window given larger than ``n_layers`` is refused)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    try:
        kinds = tuple(dict.fromkeys(kinds))  # in order, without repeats
    except TypeError as e:  # None, a number, unhashable items
        raise TraceError(f"kinds must be a kind name or a sequence of them, from {KINDS}; got {kinds!r}") from e
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise TraceError(f"unknown kinds {bad}; choose from {KINDS}")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise TraceError(f"samples must be an int >= 1, got {samples!r}")
    return kinds, resolve_window(window, n_layers)


def resolve_window(window: int | None, n_layers: int) -> int:
    """The mlp/attn restoration window: ``None`` gives the reference's 10 (``n_layers`` on a model with
    fewer layers); a given window must be an int in ``1..n_layers`` (:class:`TraceError` otherwise; a
    larger one would restore nearly every layer at every column, silently flattening the trace)."""
    if window is None:
        return min(DEFAULT_WINDOW, n_layers)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 1 <= window <= n_layers:
        raise TraceError(f"window must be an int in 1..{n_layers} (the model's number of layers), got {window!r}")
    return int(window)


def trace(prompt: str, subject: str, *, model: HookedLM | None = None, target=None,
          kinds: Sequence[str] = KINDS, samples: int = 10, noise="auto", uniform_noise: bool = False,
          window: int | None = None, seed: int = 0, method: str = "fast", batch_size: int = 256,
          tokens: Sequence[int | str] | None = None, progress: bool | None = None,
          corrupt: str | None = None) -> CausalTrace:
    """Causally trace ``prompt``'s answer through ``subject`` (see the module docstring).

    ``target``: an answer token (string of one token, or an id) instead of the clean top-1.
    ``noise``: ``"auto"`` (the reference's 3 x std of known_1000's subject embeddings, cached),
    ``"embedding_matrix"``, a facts JSON path, a list of subjects, a number or a :class:`NoiseLevel`.
    ``method``: ``"fast"`` (default) or ``"loop"`` (the per-(token, layer) reference, same numbers), or
    ``"attribution"``: a first-order estimate of every score from one corrupted forward + backward
    (:mod:`locate.attribution`; much faster, approximate: read its docstring before trusting it).
    ``window``: layers restored together for mlp/attn (default: the reference's 10, or ``n_layers``
    when the model has fewer; at most ``n_layers``).
    ``batch_size``: rows per forward in the fast path (restorations x samples); long prompts use
    fewer rows per forward, so memory does not grow with the prompt. Attribution: noise samples per
    forward + backward.
    ``tokens``: trace only these token rows (indices ``0..n_tokens-1`` or the names
    ``"first_subject"``, ``"last_subject"``, ``"first_subsequent"``, ``"last"``); the other rows of
    ``scores`` are NaN. A negative or out-of-range index or an unknown name raises
    :class:`TraceError`. Fast and attribution paths only.
    ``progress``: a progress bar; ``None`` (default) shows one for prompts longer than
    ``PROGRESS_MIN_TOKENS`` (256) tokens.
    ``corrupt``: a substring of ``prompt`` whose tokens get the noise instead of the subject's (e.g.
    the verb or object, as MEMIT-CSK traces them); ``None`` (default) noises the subject. Its span is
    recorded as ``corrupted_range`` and its rows are named ``"first_corrupted"``/``"last_corrupted"``
    (for ``tokens=`` and :meth:`CausalTrace.token_index`); the subject still names the subject rows.
    """

    lm = resolve_model(model)
    kinds, window = _check_args(kinds, samples, window, lm.n_layers)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise TraceError(f"seed must be an int in 0..2**63-1, got {seed!r}")
    samples, seed = int(samples), int(seed)  # numpy integers would not survive the JSON round trip
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise TraceError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if method not in TRACE_METHODS:
        raise TraceError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    if tokens is not None and method == "loop":
        raise TraceError("tokens= (a subset of rows) needs the fast or the attribution path")
    if not isinstance(prompt, str) or not isinstance(subject, str):
        raise TraceError(f"prompt and subject must be strings, got {type(prompt).__name__} and "
                         f"{type(subject).__name__}")
    span = lm.subject_span(prompt, subject)  # raises SubjectNotFoundError
    if corrupt is not None and not isinstance(corrupt, str):
        raise TraceError(f"corrupt must be a substring of the prompt (str) or None, got {type(corrupt).__name__}")
    corrupted = None if corrupt is None else tuple(lm.subject_span(prompt, corrupt))
    noised = span if corrupted is None else corrupted  # the tokens that get the noise
    ids = lm.encode(prompt)
    rows = None
    if tokens is not None:
        if isinstance(tokens, (str, int, np.integer)):
            tokens = [tokens]
        rows = [check_token(t, span, len(ids), corrupted) for t in tokens]
        if not rows:
            raise TraceError("tokens= is empty: name at least one token row to trace (or pass None for all)")
    if progress is None:
        progress = len(ids) > PROGRESS_MIN_TOKENS
    level, source = noise_level(lm, noise)
    t0 = time.perf_counter()
    clean_logits, _ = clean_states(lm, ids, [])
    answer_id = resolve_answer(lm, prompt, target, clean_logits)
    p_clean = float(clean_logits.float().softmax(-1)[answer_id])
    eps = draw_noise(samples, noised[1] - noised[0], lm.d_model, level, seed=seed, uniform=uniform_noise)
    if not bool(torch.isfinite(eps.to(lm.dtype)).all()):
        raise TraceError(f"noise level {level:g} overflows the model's {lm.dtype}: the corrupted embeddings "
                         "would not be finite")
    timing = {}
    if method == "loop":
        p_corrupted = restored_probability(lm, ids, noised, eps, answer_id, (), {})
        scores = {}
        for kind in kinds:
            tk = time.perf_counter()
            scores[kind] = loop_scores(lm, ids, noised, eps, answer_id, kind, window, progress=progress)
            timing[kind] = time.perf_counter() - tk
    elif method in ATTRIBUTION_METHODS:
        p_corrupted, scores, timing = attribution_scores(lm, ids, noised, eps, answer_id, kinds, window, tokens=rows,
                                                         batch_size=batch_size)
    else:
        p_corrupted, scores, timing = fast_scores(lm, ids, noised, eps, answer_id, kinds, window, tokens=rows,
                                                  batch_size=batch_size, progress=progress)
    traced = list(range(len(ids))) if rows is None else rows
    if not all(math.isfinite(p) for p in (p_clean, p_corrupted)) or \
            not all(np.isfinite(scores[k][traced]).all() for k in kinds):
        raise NonFiniteTraceError(
            f"the trace of {prompt!r} gave non-finite probabilities (p_clean {p_clean}, p_corrupted {p_corrupted}, "
            f"noise level {level:g}): the model's outputs overflow (a noise level too large for {lm.dtype}, or "
            "non-finite weights); nothing is returned rather than NaN scores")
    return CausalTrace(
        prompt=prompt, subject=subject, tokens=lm.token_labels(prompt), subject_range=tuple(span),
        answer_id=answer_id, answer=lm.tokenizer.decode([answer_id]), p_clean=p_clean,
        p_corrupted=p_corrupted, scores=scores, kinds=kinds, window=window, samples=samples, seed=seed,
        noise_level=level, noise_kind="uniform" if uniform_noise else "gaussian", noise_source=source,
        model=lm.name, fingerprint=lm.state_fingerprint, method=method, seconds=time.perf_counter() - t0,
        timing=timing, corrupted_range=corrupted)


# ====================================================================== average indirect effects
def token_groups(span: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """The six token groups of the paper's Figure 2, as the reference notebook forms them (a group
    may be empty for a given prompt). A single-token subject is both first and last subject token;
    the token right after the subject is the "first subsequent token" even when it is also the last
    token (then it is in both groups)."""
    s0, s1 = span
    last = n_tokens - 1
    return {
        "first subject token": [s0],
        "middle subject tokens": list(range(s0 + 1, s1 - 1)),
        "last subject token": [s1 - 1],
        "first subsequent token": [s1] if s1 <= last else [],
        "further tokens": list(range(s1 + 1, last)),
        "last token": [last],
    }


@dataclass
class AIEResult:
    """Average indirect effect per token group and layer, over the facts the model knows."""

    aie: dict[str, dict[str, list[float]]]  # kind -> group -> per-layer AIE
    counts: dict[str, int]  # group -> facts that have that group
    n_facts: int  # facts traced (known by the model)
    n_skipped: int  # facts the model does not know (or whose subject is not in the prompt)
    avg_te: float
    kinds: tuple[str, ...]
    n_layers: int
    model: str = ""
    rows: dict[str, int] = field(default_factory=dict)  # group -> token rows pooled over the facts
    pool: str = "facts"  # how the groups were averaged (files saved before this field: per fact)
    known_match: str = ""  # which facts counted as known
    noise_level: float = float("nan")
    noise_source: str = ""

    def array(self, kind: str = "mlp") -> np.ndarray:
        """(6 groups, n_layers), NaN for a group no fact has."""
        return np.array([self.aie[kind][g] if self.counts[g] else [np.nan] * self.n_layers for g in TOKEN_GROUPS])

    def save(self, path: str | Path) -> Path:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return write_json(path, d, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "AIEResult":
        d = read_json(path, "AIE result")
        d["kinds"] = tuple(d["kinds"])
        return cls(**d)


def _check_known_match(known_match: str) -> str:
    if known_match not in KNOWN_MATCHES:
        raise TraceError(f"known_match must be one of {KNOWN_MATCHES}, got {known_match!r}")
    return known_match


def _is_known(lm: HookedLM, prompt: str, attribute: str, logits: torch.Tensor, known_match: str = "answer") -> bool:
    """Does the model 'know' the fact? ``logits``: the clean next-token logits after ``prompt``.

    ``"answer"`` (the reference): decode(argmax logits).strip() == attribute.strip(), i.e. the single
    top-1 token spells the whole attribute; a multi-token attribute never matches.
    ``"first_token"``: argmax logits == the first token of " " + attribute."""
    top = int(logits.argmax())
    if _check_known_match(known_match) == "answer":
        return lm.tokenizer.decode([top]).strip() == attribute.strip()
    return top == lm.target_ids(" " + attribute.strip(), prompt)[0]


def load_facts(facts) -> list[dict]:
    """A list of {"prompt", "subject", "attribute"} dicts, or a path to a JSON file of them."""
    if isinstance(facts, (str, Path)):
        path = Path(facts)
        if not path.is_file():
            raise DataFileNotFoundError(f"facts file not found: {path}")
        facts = json.loads(path.read_text())
    facts = list(facts)
    for f in facts:
        missing = {"prompt", "subject", "attribute"} - set(f)
        if missing:
            raise TraceError(f"fact {f!r} lacks {sorted(missing)} (known_1000 shape: prompt, subject, attribute)")
    return facts


def trace_many(facts, *, model: HookedLM | None = None, n: int | None = None, kinds: Sequence[str] = KINDS,
               samples: int = 10, noise="auto", uniform_noise: bool = False, window: int | None = None, seed: int = 0,
               results: str | Path | None = None, batch_size: int = 256, known_match: str = "answer",
               pool: str = "rows", progress: bool = True, method: str = "fast") -> AIEResult:
    """Trace each known fact and average the indirect effects per token group (paper Figure 2).

    Facts the model does not know (``known_match``, see :func:`_is_known`; default: the decoded top-1
    token is the whole attribute) are skipped. ``noise`` is resolved once (see :func:`noise_level`) and
    used for every fact. ``pool``: see :func:`average_indirect_effects`. With ``results=`` (a JSONL
    path) each trace is appended as it finishes and facts already there with the same settings are
    not traced again, so an interrupted run resumes; a record made with other settings (or before
    they were recorded) is redone. ``method``: as :func:`trace` (``"attribution"`` averages the
    first-order estimates; its records are kept apart from exact ones, which keep their old settings).
    """

    lm = resolve_model(model)
    kinds, window = _check_args(kinds, samples, window, lm.n_layers)
    samples = int(samples)
    if method not in TRACE_METHODS:
        raise TraceError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    _check_known_match(known_match)
    _check_pool(pool)
    facts = load_facts(facts)[:n] if n is not None else load_facts(facts)
    nl = noise_level(lm, noise)
    settings = {"known_match": known_match, "noise_level": nl.nu, "uniform_noise": uniform_noise,
                "samples": samples, "window": window, "seed": seed, "kinds": list(kinds)}
    if method in ATTRIBUTION_METHODS:  # exact records (fast and loop agree) keep the settings they were saved with
        settings["method"] = method
    done: dict[str, dict] = {}
    path = Path(results) if results is not None else None
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            if rec.get("settings") == settings:
                done[rec["key"]] = rec
    traced: list[CausalTrace] = []
    skipped = 0
    for f in tqdm(facts, desc="trace_many", disable=not progress):
        key = f"{f['prompt']}||{f['subject']}||{f['attribute']}"
        if key in done:
            rec = done[key]
            if rec.get("known"):
                traced.append(CausalTrace.from_dict(rec["trace"]))
            else:
                skipped += 1
            continue
        try:
            logits, _ = clean_states(lm, lm.encode(f["prompt"]), [])
            known = _is_known(lm, f["prompt"], f["attribute"], logits, known_match)
            tr = None
            if known:
                tr = trace(f["prompt"], f["subject"], model=lm, kinds=kinds, samples=samples, noise=nl,
                           uniform_noise=uniform_noise, window=window, seed=seed, batch_size=batch_size,
                           progress=False, method=method)
        except SubjectNotFoundError:
            known, tr = False, None
        if known:
            traced.append(tr)
        else:
            skipped += 1
        if path is not None:
            with path.open("a") as fh:
                fh.write(json.dumps({"key": key, "settings": settings, "known": known,
                                     "trace": tr.to_dict() if tr else None}) + "\n")
    res = average_indirect_effects(traced, kinds, lm.n_layers, n_skipped=skipped, model=lm.name, pool=pool)
    res.known_match, res.noise_level, res.noise_source = known_match, nl.nu, nl.source
    return res


def _check_pool(pool: str) -> str:
    if pool not in POOLINGS:
        raise TraceError(f"pool must be one of {POOLINGS}, got {pool!r}")
    return pool


def average_indirect_effects(traces: Sequence[CausalTrace], kinds: Sequence[str], n_layers: int, *,
                             n_skipped: int = 0, model: str = "", pool: str = "rows") -> AIEResult:
    """Average indirect effect per token group g and layer l over the traced (known) facts F.

    ``pool="rows"`` (the reference notebook): every token row of g in every fact is one sample,

        AIE_g(l) = mean_{(f, t) : f in F, t in g(f)} score_f[t, l]  -  mean_{f in F} p_corrupted(f),

    so a fact with three middle subject tokens weighs three times one with one, and the corrupted
    baseline is the mean over all traced facts. ``pool="facts"``: a fact's rows are averaged first,
    AIE_g(l) = mean_{f : g(f) nonempty} mean_{t in g(f)} (score_f[t, l] - p_corrupted(f)).
    The two agree for the one-row groups (first/last subject token, last token) and differ for the
    middle subject tokens and further tokens (and for the first subsequent token when some facts
    lack it)."""
    _check_pool(pool)
    counts = {g: 0 for g in TOKEN_GROUPS}
    rows = {g: 0 for g in TOKEN_GROUPS}
    picked: dict[str, dict[str, list[np.ndarray]]] = {k: {g: [] for g in TOKEN_GROUPS} for k in kinds}
    for tr in traces:
        for g, toks in token_groups(tr.subject_range, len(tr.tokens)).items():
            if not toks:
                continue
            counts[g] += 1
            rows[g] += len(toks)
            for k in kinds:
                if pool == "rows":
                    picked[k][g].append(tr.scores[k][toks])  # (rows, layers)
                else:
                    picked[k][g].append(tr.ie(k)[toks].mean(0, keepdims=True))  # (1, layers)
    p_corrupted = float(np.mean([t.p_corrupted for t in traces])) if traces else float("nan")
    aie = {}
    for k in kinds:
        aie[k] = {}
        for g in TOKEN_GROUPS:
            if not picked[k][g]:
                aie[k][g] = [0.0] * n_layers
                continue
            mean = np.concatenate(picked[k][g]).mean(0)
            aie[k][g] = (mean - p_corrupted if pool == "rows" else mean).tolist()
    avg_te = float(np.mean([t.te for t in traces])) if traces else float("nan")
    return AIEResult(aie=aie, counts=counts, n_facts=len(traces), n_skipped=n_skipped, avg_te=avg_te,
                     kinds=tuple(kinds), n_layers=n_layers, model=model, rows=rows, pool=pool)
