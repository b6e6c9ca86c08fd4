"""Two primitives every algorithm builds on: capture activations, and continue from a key/value cache.

``capture`` is the one way to read activations at TransformerLens hook points (in the spirit of
baukit's ``Trace``)::

    with capture(lm, [lm.hook_mlp_key(3), lm.hook_resid(5)]) as got:
        lm.forward(batch)
    got[lm.hook_mlp_key(3)]          # (B, T, d_mlp)

By default the forward stops as soon as every requested site has been seen (nothing later is
computed); ``keep`` decides what is stored (a slice, a running sum) so large activations need not be
kept whole. ``StopForward`` is raised inside the forward and swallowed by the context manager.

``prefix_cache`` runs a prompt prefix once and returns its keys/values; ``as_cache`` turns those
(possibly expanded or cropped) back into a ``DynamicCache`` to continue from. Causal tracing, the
knowledge-neuron attribution and the v*/z optimisation all use this pair.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache

from .errors import InvalidArgumentError


class StopForward(Exception):
    """Raised from a hook once everything needed has been captured; the rest of the pass is skipped."""


@contextlib.contextmanager
def capture(lm, sites: Sequence[str] | str, *, keep: Callable[[str, torch.Tensor], Any] | None = None,
            stop: bool = True, detach: bool = True):
    """Record the activation at each hook point in ``sites`` during the forwards run inside the block.

    ``keep(site, x)`` maps an activation to what is stored (default: ``x`` itself, detached unless
    ``detach=False``); return ``None`` to store nothing (e.g. when ``keep`` accumulates elsewhere).
    With ``stop``, the forward pass ends once every site has fired (the model's output is then not
    computed). Yields the dict ``{site: kept value}``.
    """
    sites = [sites] if isinstance(sites, str) else list(sites)
    if not sites:
        raise InvalidArgumentError("capture needs at least one hook point")
    got: dict[str, Any] = {}
    seen: set[str] = set()

    def make(site):
        def hook(x, hook):
            y = x.detach() if detach else x
            kept = keep(site, y) if keep is not None else y
            if kept is not None:
                got[site] = kept
            seen.add(site)
            if stop and len(seen) == len(sites):
                raise StopForward
            return x
        return hook

    try:
        with lm.hooks([(s, make(s)) for s in sites]):
            yield got
    except StopForward:
        pass


@torch.no_grad()
def capture_at(lm, rows: Sequence[Sequence[int]], positions: Sequence[int], site: str) -> torch.Tensor:
    """The activation at ``site`` for each token row at its position, (len(rows), width); the forward
    stops at that hook point."""
    batch = lm.pad(rows)
    idx = torch.arange(len(rows))
    pos = torch.as_tensor(list(positions))
    # x sits on the device of the block that made it (a model may be spread over several)
    with capture(lm, site, keep=lambda s, x: x[idx.to(x.device), pos.to(x.device)].clone()) as got:
        lm.forward(batch)
    return got[site]


def prefix_cache(lm, ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, hooks=()) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``ids`` (B, P) once, with ``hooks`` active, keeping the key/value cache.

    Returns the model output (logits of the last position only) and the cache as a list of per-layer
    ``(keys, values)``, each (B, heads, P, head_dim). Padded positions are masked, but a fully masked
    query can leave NaN in their keys/values and 0 · NaN is NaN, so they are made finite."""
    cache = DynamicCache()
    with lm.hooks(list(hooks)):
        out = lm.hf_model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
    kv = [(torch.nan_to_num(layer.keys), torch.nan_to_num(layer.values)) for layer in cache.layers]
    return out, kv


def as_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> DynamicCache | None:
    """A fresh ``DynamicCache`` holding ``kv`` (per-layer keys and values), to continue a forward from."""
    if not kv:
        return None
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in kv])
