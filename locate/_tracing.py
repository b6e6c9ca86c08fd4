"""Pieces shared by the reference tracing loop (:mod:`locate.causal_trace`) and its fast path
(:mod:`locate._fast_restore`): which hook holds each traced state, which layers a window restores,
and the clean run's activations."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .hooks import capture
from .model import HookedLM


def state_hook(lm: HookedLM, kind: str, layer: int) -> str:
    return {"hidden": lm.hook_resid, "mlp": lm.hook_mlp_out, "attn": lm.hook_attn_out}[kind](layer)


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored for an mlp/attn score at ``layer``: [l - w//2, l + w - w//2) clipped."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2)))


def restored_layers(kind: str, layer: int, window: int, n_layers: int) -> list[int]:
    return [layer] if kind == "hidden" else window_layers(layer, window, n_layers)


@torch.no_grad()
def clean_states(lm: HookedLM, ids: Sequence[int], hook_names: Iterable[str]) -> tuple[torch.Tensor, dict]:
    """Clean-run logits at the last position and the named activations, (T, d) each."""
    names = sorted(set(hook_names))
    x = torch.tensor([list(ids)], device=lm.device)
    if not names:
        return lm.hf_model(input_ids=x).logits[0, -1], {}
    with capture(lm, names, keep=lambda name, a: a[0].clone(), stop=False) as cache:
        logits = lm.hf_model(input_ids=x).logits[0, -1]
    return logits, dict(cache)
