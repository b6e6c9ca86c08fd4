"""PPA: Plug-and-Play Adaptation (Lee, Han, Hwang, Lee, Park & Lee, Findings of ACL 2022,
"Plug-and-Play Adaptation for Continuously-updated QA").

PPA keeps every weight of the model. Each knowledge update (here: each call, one batch of requests)
trains one new *plug-in* LoRA module on that batch only, and a *selector* decides for each input
whether a module (and which) is plugged in. An input the selector rejects runs through the base model
unchanged, so the knowledge the model had is kept; later updates add modules without touching the
earlier ones.

**The plug-in module** (Hu et al.'s LoRA, :class:`edit.methods.lora.LoRAAdapter`, on the MLP output
projection of each adapted layer l, as ``lora`` and ``melo`` place it):

    h_l = W_l x + b_l + s · B_m A_m x          (module m selected)                               (1)
    h_l = W_l x + b_l                          (no module selected: the base model, bit-identical)

with A_m ∈ R^{r × d_mlp} ~ U(−1/√d_mlp, 1/√d_mlp), B_m = 0 at initialisation and s = α / r.

**The selector** is a nearest-neighbour test against the stored inputs of the module's update, in
the model's own representation of the input: the running mean, over the positions read so far, of the
MLP pre-activation at the key layer (MELO's key hook, :func:`edit.methods.melo.key_hook_of`), the
decoder-only stand-in for the paper's encoding of a whole question. With q_t the activation at
position t,

    q̄_t = (1/t) Σ_{t' ≤ t} q_t'                     (the input read up to t)                        (2)
    k_i = q̄ at the last token of request i's prompt (the stored inputs of the update)
    σ_m(t) = max_i  q̄_tᵀ k_i / (‖q̄_t‖ ‖k_i‖)        (cosine similarity to the nearest stored input)
    on_m(t) = [ max_{t' ≤ t} σ_m(t') ≥ τ ]                                                          (3)

(3) makes the decision for the *input*: once a position of the sequence is selected, the module stays
plugged in for the rest of it (the answer the model then writes), as the paper selects a module per
question. A stored prompt selects its module at its own last token (σ = 1). Where no position of a
batch is selected, the hooks return their input tensors themselves.

**Training** (one module per update): Adam (``lr``, ``weight_decay``) on A_m, B_m of every adapted
layer for ``steps`` full-batch steps on the teacher-forced NLL of the target tokens
(:func:`edit.methods.ft.objective_loss`, each request's mean NLL averaged over the batch), with the
selector (3) deciding where the module is on, as it will at inference (the key layer comes before
the adapted layers, so the module never changes its own selection), and the adapter's input dropped out (``lora_dropout``, seeded by ``Runtime.seed``)
while training only.

**Sequential updates.** Every call returns an edit holding one :class:`PPAModule`; applying edits in
turn plugs in one module per update, and reverting the newest edit unplugs its module (bit-exact, as
every hooked edit). Each module's selector (2)-(3) reads only its own update's keys.

Defaults: the LoRA settings are ``lora``'s (EasyEdit's LoRA files: rank 8, α 32, lr 5e-3, dropout
0.1, 70 steps), on one located layer (``layers="auto"``); τ = 0.9.

How this differs from the paper (no reference code is mirrored here; this follows the method as the
paper describes it, scaled to this toolkit's requests):

* The paper's base models are encoder-decoder QA models (T5, BART) updated with thousands of
  question-answer pairs per update; here a decoder-only LM, a request per fact, an update per call.
* Placement: the adapter sits on the MLP output projection of the located layer(s) (as ``lora`` and
  ``melo`` here), not on every attention projection of the network.
* The selector: a nearest-neighbour similarity between the input and the stored inputs of each
  update. The key is the LM's own representation of the input at the key layer (MELO's key), not a
  separate sentence encoder (the packaged all-MiniLM-L6-v2 reads text, which a hook on the model never
  sees), pooled by (2). τ = 0.9 is this toolkit's choice, not a value from the paper: on SmolLM2-135M
  at its located layer 3, a paraphrase of a stored prompt scores about 0.90, the same template with
  another subject about 0.85-0.87, an unrelated prompt about 0.65.
* Each module selects independently: where two updates' stored inputs are both within τ of an input,
  both modules are plugged in (the paper picks one module per question).
* Generation with a key/value cache (:meth:`locate.HookedLM.generate`) feeds one token per forward,
  so (2)-(3) then hold for the prompt's forward, and each new token is selected by its own query alone.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from locate import resolve_layers
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit, HookModule
from ..registry import Runtime, compute, register
from ..request import Request
from .ft import objective_loss
from .lora import LoRAAdapter, LoRAHparams, attached, frozen, init_factors, trainable
from .melo import MeloBlock, key_hook_of

_LORA = LoRAHparams()


@dataclass
class PPAHparams:
    """PPA's hyper-parameters (module docstring); the LoRA settings default to ``lora``'s (EasyEdit's)."""

    layers: Any = "auto"  # layer spec of the adapted layer(s) (locate.resolve_layers)
    key_layer: int | None = None  # layer whose MLP pre-activation is the selector's key; None: the first adapted layer
    threshold: float = 0.9  # τ of (3): the cosine similarity to a stored input that selects the module
    rank: int = _LORA.rank  # r of the plug-in module (lora: 8)
    lora_alpha: float = _LORA.lora_alpha  # α; the module's output is scaled by s = α / r (lora: 32)
    lora_dropout: float = _LORA.lora_dropout  # dropout on the module's input while training (lora: 0.1)
    lr: float = _LORA.lr  # Adam learning rate (lora: 5e-3)
    weight_decay: float = _LORA.weight_decay  # Adam weight decay (lora: 0)
    steps: int = _LORA.steps  # full-batch Adam steps on the update (lora: 70)

    def __post_init__(self):
        if self.key_layer is not None and (isinstance(self.key_layer, bool) or not isinstance(self.key_layer, numbers.Integral)):
            raise InvalidHparamsError(f"key_layer must be an int or None, got {self.key_layer!r}")
        for name in ("rank", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name, positive in (("lora_alpha", True), ("lr", True), ("weight_decay", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise InvalidHparamsError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {v!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, numbers.Real) or not 0 <= self.lora_dropout < 1:
            raise InvalidHparamsError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real) or not -1 < self.threshold < 1:
            raise InvalidHparamsError(f"threshold is a cosine similarity in (-1, 1), got {self.threshold!r}")


# ====================================================================== the selector and the module
class PPASelector(torch.nn.Module):
    """(2)-(3): the stored inputs' keys (n, d_key) of one update and the threshold τ."""

    def __init__(self, keys: torch.Tensor, threshold: float):
        super().__init__()
        if keys.ndim != 2 or not len(keys):
            raise InvalidArgumentError(f"a PPA selector needs keys (n >= 1, d_key); got {tuple(keys.shape)}")
        self.threshold = float(threshold)
        self.register_buffer("keys", keys.detach().clone())

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def similarity(self, query: torch.Tensor) -> torch.Tensor:
        """σ(t) of (3) for activations (..., seq, d_key): the cosine similarity of the running mean (2)
        to the nearest stored input."""
        q = torch.nn.functional.normalize(running_mean(query), dim=-1)
        k = torch.nn.functional.normalize(self.keys.float().to(q.device), dim=-1)
        return (q @ k.T).amax(-1)

    def select(self, query: torch.Tensor) -> torch.Tensor:
        """on(t) of (3) for activations (batch, seq, d_key) (or (seq, d_key)): selected from the first
        position whose similarity reaches τ to the end of the sequence."""
        hit = self.similarity(query) >= self.threshold
        return torch.cummax(hit.to(torch.uint8), dim=-1).values.bool()


def running_mean(x: torch.Tensor) -> torch.Tensor:
    """(2): q̄_t, the mean of x over the positions up to t (the second-to-last dimension), in float32."""
    x = x.float()
    n = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=x.dtype)
    return x.cumsum(-2) / n[:, None]


class PPAModule(HookModule):
    """One update's plug-in module: a :class:`LoRAAdapter` per adapted layer, added (1) only where its
    :class:`PPASelector` selects the input (3). The hook wiring is MELO's routed block's
    (:class:`edit.methods.melo.MeloBlock`: route at the key hook, then add each adapter's output where
    routed); the routing is PPA's."""

    type_name = "ppa-module"

    def __init__(self, key_layer: int, key_hook: str, selector: PPASelector, adapters: Sequence[LoRAAdapter]):
        super().__init__()
        if not adapters:
            raise InvalidArgumentError("a PPA module adapts at least one layer")
        self.key_layer, self.key_hook = int(key_layer), key_hook
        self.selector = selector
        self.adapters = torch.nn.ModuleList(adapters)
        self.forced: torch.Tensor | None = None  # MELO's wiring reads it; PPA always lets the selector decide
        self._on: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"PPAModule(key_layer={self.key_layer}, inputs={len(self.selector)}, tau={self.selector.threshold:g}, "
                f"layers={[a.layer for a in self.adapters]}, rank={self.adapters[0].rank})")

    def config(self) -> dict:
        return {"key_layer": self.key_layer, "key_hook": self.key_hook, "threshold": self.selector.threshold,
                "adapters": [a.config() for a in self.adapters]}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "PPAModule":
        adapters = [LoRAAdapter.from_saved(c, {"A": tensors[f"adapters.{i}.A"], "B": tensors[f"adapters.{i}.B"]})
                    for i, c in enumerate(config["adapters"])]
        return cls(config["key_layer"], config["key_hook"], PPASelector(tensors["selector.keys"], config["threshold"]), adapters)

    def route(self, query: torch.Tensor) -> torch.Tensor:
        """Where the module is plugged in, (3)."""
        return self.selector.select(query)

    # MELO's wiring (the route hook, the routed adds, their chaining at shared hook points)
    _route = MeloBlock._route
    _routed_add = MeloBlock._routed_add
    hook_fns = MeloBlock.hook_fns


# ====================================================================== the method
@register("ppa", PPAHparams, batched=True, layers=1, smoke={"steps": 10},
          description="PPA: one plug-in LoRA module per update, used only for inputs a selector matches to "
                      "the update's stored inputs (Lee et al. 2022)")
def compute_ppa(lm, requests: list[Request], hp: PPAHparams, rt: Runtime) -> Edit:
    """The PPA update of ``requests`` (module docstring), not applied: one :class:`PPAModule`. No weight changes."""
    layers, reason = resolve_layers(lm, hp.layers, 1)
    key_layer = lm.check_layer(layers[0] if hp.key_layer is None else hp.key_layer)
    if key_layer > min(layers):
        raise InvalidHparamsError(f"key_layer {key_layer} comes after the first adapted layer {min(layers)}: the "
                                  "selector must read the input before the module acts")
    dtype = torch.promote_types(lm.dtype, torch.float32)
    key_hook = key_hook_of(lm, key_layer)
    t0 = time.perf_counter()

    # the stored inputs: the running mean (2) at each prompt's last token
    prompts = [lm.encode(r.rendered) for r in requests]
    rows = torch.arange(len(prompts), device=lm.device)
    with torch.no_grad():
        pb = lm.pad(prompts)
        with capture(lm, key_hook, keep=lambda s, x: running_mean(x)[rows, pb.last]) as got:
            lm.forward(pb)
    selector = PPASelector(got[key_hook].to(dtype), hp.threshold)

    # the plug-in module (1): LoRA on every adapted layer
    g = torch.Generator().manual_seed(int(rt.seed))
    scale = hp.lora_alpha / hp.rank
    adapters = []
    for layer in layers:
        A, B = init_factors(lm.d_mlp, lm.d_model, hp.rank, lm.d_mlp, g, dtype)
        adapters.append(LoRAAdapter(layer, lm.hook_mlp_key(layer), lm.hook_mlp_out(layer), A.to(lm.device), B.to(lm.device), scale))
    module = PPAModule(key_layer, key_hook, selector, adapters).to(lm.device)
    params = [p for a in module.adapters for p in trainable(a)]
    drop_g = torch.Generator().manual_seed(int(rt.seed) + 1)
    for a in module.adapters:
        a.dropout = (float(hp.lora_dropout), drop_g)

    # training: the selector (3) decides where the module is on, as it will at inference
    train_rows = [(p, lm.target_ids(r.target_new, r.rendered)) for p, r in zip(prompts, requests)]
    trace: list[float] = []
    with lm.eval_mode(), attached(lm, [module]):
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        for step in range(hp.steps):
            opt.zero_grad()
            loss = objective_loss(lm, train_rows, "target_new")
            if not torch.isfinite(loss):
                raise EditFailedError(f"PPA loss became {loss.item()} at step {step}; the model is unchanged")
            loss.backward()
            opt.step()
            trace.append(float(loss.detach()))
            if rt.callback is not None:
                rt.callback({"method": "ppa", "step": step, "loss": trace[-1]})
        for a in module.adapters:
            a.dropout = None
        with torch.no_grad():
            final = float(objective_loss(lm, train_rows, "target_new"))
    done = PPAModule(key_layer, key_hook, PPASelector(selector.keys, hp.threshold), [frozen(a) for a in module.adapters])
    if not all(bool(torch.isfinite(t).all()) for t in done.tensors().values()):
        raise EditFailedError("PPA produced a non-finite module; the model is unchanged")
    return Edit("ppa", list(requests), [done], lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": list(layers), "key_layer": key_layer},
                timings={"total_s": time.perf_counter() - t0}, loss_trace=trace,
                metrics={"final_loss": final, "scale": scale, "n_keys": len(selector)})


def ppa(requests: Request | Sequence[Request], *, model=None, layer: Any = "auto", runtime: Runtime | None = None,
        **hparams) -> Edit:
    """The PPA update of ``requests`` on ``layer`` (a layer spec), computed and **not applied**."""
    return compute("ppa", requests, model=model, runtime=runtime, layers=layer, **hparams)
