"""Pieces shared by the reference tracing loop (:mod:`locate.causal_trace`) and its fast path
(:mod:`locate._fast_restore`): which hook holds each traced state, which layers a window restores,
and the clean run's activations."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Sequence

import torch
from transformers import DynamicCache

from .hooks import capture
from .model import HookedLM

PREFILL_TOKENS = 1024  # rows x positions per forward of a full-prompt run (clean, corrupted)


def state_hook(lm: HookedLM, kind: str, layer: int) -> str:
    return {"hidden": lm.hook_resid, "mlp": lm.hook_mlp_out, "attn": lm.hook_attn_out}[kind](layer)


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored for an mlp/attn score at ``layer``: [l - w//2, l + w - w//2) clipped."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2)))


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> list[int]:
    return [layer] if kind == "hidden" else window_layers(layer, window, n_layers)


@torch.no_grad()
def chunked_run(lm: HookedLM, x: torch.Tensor, *, sites: Iterable[str] = (), keep_from: int = 0, hooks=(),
                chunk_tokens: int | None = None):
    """Run the token rows ``x`` (B, T) once, in chunks of positions continued through a key/value cache
    when ``B x T`` exceeds ``chunk_tokens`` (default ``PREFILL_TOKENS``; attention then never holds a
    (B, heads, T, T) matrix), and
    return ``(last-position logits (B, V), the cache, {site: activation (B, T - keep_from, d)})``.

    ``hooks``: ``(name, fn(h, hook, start))`` pairs, ``start`` being the chunk's first position, so a
    hook can act on absolute positions. Prompts that fit one chunk run exactly as one forward."""
    B, T = x.shape
    step = max(1, (PREFILL_TOKENS if chunk_tokens is None else chunk_tokens) // B)
    cache = DynamicCache()
    kept: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    out = None
    for a in range(0, T, step):
        b = min(T, a + step)

        def keeper(name, h, a=a):
            lo = max(0, keep_from - a)
            if lo < h.shape[1]:
                kept[name].append(h[:, lo:].clone())

        bound = [(name, functools.partial(fn, start=a)) for name, fn in hooks]
        with lm.hooks(bound), (capture(lm, list(kept), keep=keeper, stop=False) if kept else contextlib.nullcontext()):
            out = lm.hf_model(input_ids=x[:, a:b], past_key_values=cache, use_cache=True, logits_to_keep=1)
    acts = {name: torch.cat(parts, 1) if parts else x.new_zeros(0) for name, parts in kept.items()}
    return out.logits[:, -1], cache, acts


@torch.no_grad()
def clean_states(lm: HookedLM, ids: Sequence[int], hook_names: Iterable[str], *,
                 keep_from: int = 0) -> tuple[torch.Tensor, dict]:
    """Clean-run logits at the last position and the named activations, (T - keep_from, d) each (row
    ``i`` is position ``keep_from + i``). Only the last position's logits are computed, and a long
    prompt runs in chunks (:func:`chunked_run`), so memory grows linearly with the prompt."""
    names = sorted(set(hook_names))
    x = torch.tensor([list(ids)], device=lm.device)
    logits, _, acts = chunked_run(lm, x, sites=names, keep_from=keep_from)
    return logits[0], {name: a[0] for name, a in acts.items()}
