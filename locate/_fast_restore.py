"""Plumbing for the fast causal trace: the same numbers as the reference loop in
:mod:`locate.causal_trace`, with far fewer floating-point operations.

What it exploits (each is exact, not an approximation):

1. Restoring a state at token ``t`` cannot change positions ``< t`` (causal attention). So every
   restoration at token ``t`` starts from the *corrupted* run's key/value cache cropped to ``t``
   positions and only runs positions ``t..T-1``.
1b. Restoring a state at layer ``l`` cannot change the blocks below ``l``. A batch whose lowest
   restored layer is ``j0`` skips blocks ``0..j0-1`` (they pass their input through untouched) and
   feeds block ``j0`` the corrupted run's residual stream, saved once (TL's ``start_at_layer`` would
   still run every block, so the fast path drives the blocks itself).
2. Tokens before the subject are identical in the clean and corrupted runs: restoring them changes
   nothing, their score is ``p_corrupted`` and no forward is run.
3. Many restorations (all kinds, all layers, all noise samples for one ``t``) share one batched
   forward; the clean run is computed once; logits are computed at the last position only.

Each row of a batch is one (restoration, noise sample) pair. Hooks on the hooked model replace, in
the rows that ask for it, the state at local position 0 (= token ``t``) by its clean value.

Memory (what would otherwise grow with the prompt):

* A batch has ``R x S`` rows (R restorations, S noise samples) but only ``S`` distinct key/value
  prefixes. The rows share the corrupted run's ``S`` prefixes (:class:`SharedPrefixLayer`): nothing
  is copied per row and kept; each layer joins its prefix to the new tokens' keys/values for the
  moment its attention runs, and drops the join afterwards. This changes no number.
* A batch holds at most ``BATCH_TOKENS`` row-positions (rows x prompt length) and ``ATTENTION_CELLS``
  attention scores per head (rows x new tokens x prompt length), so long prompts run fewer rows per
  forward (never fewer than one restoration's S samples). Prompts of up to 256 tokens are batched
  as before.
* The clean and corrupted runs over the whole prompt run in chunks of positions through a key/value
  cache (:func:`locate._tracing.chunked_run`) once rows x prompt length exceeds ``PREFILL_TOKENS``,
  so no (rows, heads, T, T) attention matrix is built; their activations are kept from the first
  subject token on only (restorations start there).

Batching and chunking change how the floating-point sums are grouped, not what is computed: the
scores agree with the reference loop to float32 rounding, as for short prompts.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ._tracing import chunked_run, clean_states, restored_layers, state_hook
from .model import HookedLM

BATCH_TOKENS = 256 * 256  # at most this many row-positions (rows x prompt length) per forward
ATTENTION_CELLS = 256 ** 3  # at most this many attention scores per head (rows x new tokens x prompt length)


@torch.no_grad()
def corrupted_run(lm: HookedLM, ids: Sequence[int], span: tuple[int, int], noise: torch.Tensor):
    """The noisy runs (one per sample): last-position logits, the key/value cache (per layer, (S, heads,
    T, head_dim)) and every block's input from the first subject token on (the residual stream,
    (S, T - s0, d) per layer: restorations start at a token >= s0). Long prompts run in chunks."""
    s0, s1 = span
    x = torch.tensor([list(ids)] * noise.shape[0], device=lm.device)

    def add_noise(h, hook, start):  # h holds positions start.. of this chunk
        lo, hi = max(s0, start), min(s1, start + h.shape[1])
        if lo >= hi:
            return h
        h = h.clone()
        h[:, lo - start:hi - start] += noise[:, lo - s0:hi - s0].to(h.dtype).to(h.device)
        return h

    sites = {lm.hook_resid_pre(j): j for j in range(lm.n_layers)}
    logits, cache, got = chunked_run(lm, x, sites=list(sites), keep_from=s0, hooks=[(lm.hook_embed, add_noise)])
    # padded positions are never used here, but keep the cache finite as prefix_cache does
    kv = [(torch.nan_to_num(layer.keys), torch.nan_to_num(layer.values)) for layer in cache.layers]
    resid_in = {sites[name]: h for name, h in got.items()}
    return logits, kv, resid_in


class SharedPrefixLayer(DynamicLayer):
    """One layer's key/value prefix (positions ``< t`` of the corrupted run), shared by all rows.

    It holds the ``S`` distinct prefixes, (S, heads, t, head_dim), once. A batch's rows are ordered
    ``r * S + s`` (restoration r, noise sample s), so row ``b`` continues prefix ``b mod S``.
    :meth:`update` returns, for the attention of this layer only, every row's prefix followed by its
    new keys/values, written into one fresh tensor by broadcasting (no per-row copy of the prefix is
    made first, and nothing is stored: the batch's forward runs once, so no later step reads it)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @staticmethod
    def _join(prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        S, H, t, D = prefix.shape
        B, _, n, _ = new.shape
        out = new.new_empty(B, H, t + n, D)
        out.view(B // S, S, H, t + n, D)[:, :, :, :t] = prefix  # every restoration: its sample's prefix
        out[:, :, t:] = new
        return out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._join(self.keys, key_states), self._join(self.values, value_states)


def shared_prefix_cache(kv, t: int) -> DynamicCache:
    """A cache whose layers continue the corrupted run's positions ``< t``, shared by a batch's rows
    (see :class:`SharedPrefixLayer`); ``kv``: per-layer (keys, values), (S, heads, T, head_dim)."""
    cache = DynamicCache()
    cache.layers = [SharedPrefixLayer(k[:, :, :t], v[:, :, :t]) for k, v in kv]
    return cache


def rows_per_batch(batch_size: int, n_tokens: int, samples: int, batch_tokens: int = BATCH_TOKENS,
                   new_tokens: int = 1, attention_cells: int = ATTENTION_CELLS) -> int:
    """Rows per forward: ``batch_size``, fewer for long prompts so that rows x prompt length stays
    within ``batch_tokens`` and rows x ``new_tokens`` x prompt length (the attention scores per head)
    within ``attention_cells``; never fewer than one restoration's ``samples`` rows. Prompts of up to
    256 tokens keep ``batch_size`` (<= 256) rows."""
    T, n = max(1, n_tokens), max(1, new_tokens)
    return max(samples, min(batch_size, batch_tokens // T, attention_cells // (n * T)))


def _chunks(restorations, window: int, L: int, samples: int, batch_size: int) -> list[list]:
    """Split restorations (sorted by lowest restored layer) into forwards of at most ``batch_size`` rows.
    A batch runs from its lowest restored layer, so a new batch starts where that layer changes, once
    the current one has at least a quarter of ``batch_size`` rows (smaller batches waste the CPU)."""
    per_batch = max(1, batch_size // samples)
    min_rows = max(1, per_batch // 4)
    chunks, cur, cur_j0 = [], [], None
    for kl in restorations:
        j0 = restored_layers(*kl, window, L)[0]
        if cur and (len(cur) >= per_batch or (j0 != cur_j0 and len(cur) >= min_rows)):
            chunks.append(cur)
            cur = []
        if not cur:
            cur_j0 = j0
        cur.append(kl)
    return chunks + [cur] if cur else chunks


@torch.no_grad()
def fast_scores(lm: HookedLM, ids: Sequence[int], span: tuple[int, int], noise: torch.Tensor, answer_id: int,
                kinds: Sequence[str], window: int, *, tokens: Sequence[int] | None = None,
                batch_size: int = 256, batch_tokens: int = BATCH_TOKENS, progress: bool = False):
    """(p_corrupted, {kind: scores (T, L)}, timing) -- equal to the reference loop's numbers.
    ``tokens``: compute only these token rows (the others are NaN), e.g. the last subject token.
    ``batch_size`` rows per forward, fewer when rows x prompt length would exceed ``batch_tokens``."""
    t_start = time.perf_counter()
    L, T = lm.n_layers, len(ids)
    s0, s1 = span
    S = noise.shape[0]
    noise = noise.to(lm.device)  # added at the embeddings, on the input device
    names = {state_hook(lm, k, l) for k in kinds for l in range(L)}
    _, clean = clean_states(lm, ids, names, keep_from=s0)  # clean[name][t - s0]: restorations start at s0
    logits, kv, resid_in = corrupted_run(lm, ids, span, noise)  # resid_in[j][:, t - s0]
    p_corrupted = float(logits.float().softmax(-1)[:, answer_id].mean())
    scores = {k: np.full((T, L), p_corrupted) for k in kinds}  # tokens before the subject: no effect
    todo = range(s0, T)
    if tokens is not None:
        for k in kinds:
            scores[k][[t for t in range(T) if t not in set(tokens)]] = np.nan
            scores[k][[t for t in tokens if t < s0]] = p_corrupted
        todo = sorted(t for t in set(tokens) if t >= s0)

    # sorted by lowest restored layer, so a batch can skip the blocks below its lowest one
    restorations = sorted(((k, l) for k in kinds for l in range(L)), key=lambda kl: restored_layers(*kl, window, L)[0])
    work = [(t, chunk) for t in todo for chunk in
            _chunks(restorations, window, L, S, rows_per_batch(batch_size, T, S, batch_tokens, T - t))]
    ids_t = torch.tensor(list(ids), device=lm.device)
    for t, chunk in tqdm(work, desc="trace (fast)", disable=not progress, leave=False):
        R = len(chunk)
        sample_idx = torch.arange(S, device=lm.device).repeat(R)  # row r*S + s -> sample s
        # rows to patch per hook name
        rows: dict[str, list[int]] = {}
        for r, (kind, l) in enumerate(chunk):
            for j in restored_layers(kind, l, window, L):
                rows.setdefault(state_hook(lm, kind, j), []).extend(range(r * S, (r + 1) * S))
        rows_t = {n: torch.tensor(v, device=lm.device) for n, v in rows.items()}

        def patcher(name, t=t, rows_t=rows_t):
            def patch(h, hook):  # h on its block's device (blocks may sit on several devices)
                h[rows_t[name].to(h.device), 0] = clean[name][t - s0].to(device=h.device, dtype=h.dtype)
                return h
            return patch

        hooks = [(n, patcher(n)) for n in rows_t]
        j0 = min(restored_layers(kind, l, window, L)[0] for kind, l in chunk)
        # blocks below j0 are the corrupted run's: skip them and feed block j0 its saved input
        # (j0 = 0: the embedding noise of the subject tokens still to run is added instead)
        start = lm.start_at_block(j0, resid_in[j0][sample_idx.to(resid_in[j0].device), t - s0:]) if j0 > 0 else contextlib.nullcontext()
        if j0 == 0 and t < s1:
            eps = noise[sample_idx][:, t - s0:].to(lm.device)

            def add_noise(h, hook):
                h = h.clone()
                h[:, : s1 - t] += eps.to(h.dtype)
                return h

            hooks.insert(0, (lm.hook_embed, add_noise))
        x = ids_t[t:].expand(R * S, -1)
        cache = shared_prefix_cache(kv, t) if t > 0 else None
        with lm.hooks(hooks), start:
            out = lm.hf_model(input_ids=x, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        p = out.logits[:, -1].float().softmax(-1)[:, answer_id].view(R, S).mean(1)
        for r, (kind, l) in enumerate(chunk):
            scores[kind][t, l] = float(p[r])
    seconds = time.perf_counter() - t_start
    return p_corrupted, scores, {"fast_total": seconds}
