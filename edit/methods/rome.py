"""ROME: Rank-One Model Editing (Meng, Bau, Andonian & Belinkov, NeurIPS 2022, §3).

The MLP output projection W of layer l (``lm.mlp_out_weight(l)``, value = W k + b) is read as a
linear associative memory. To make the model say o* for (s, r) we

1. choose the key k* (§3.1, eq. 3): the MLP key at the subject's last token, averaged over the prompt
   with and without short model-written prefixes (:func:`edit.context.subject_keys`);
2. choose the value v* (§3.1, eq. 4): the MLP output at that token that makes the model predict o*,
   found by optimising δ with v* = W k + b + δ (:func:`edit.vstar.optimize_targets`, site "mlp_out");
3. insert (k*, v*) with the closed form that changes the stored associations least, weighted by the
   keys' second moment C = E[k kᵀ] (:mod:`edit.stats`) (§3.1, eq. 2):

       u  = C⁻¹ k*                          (a Cholesky solve, never an inverse)
       Λ  = (v* − (W k* + b)) / (uᵀ k*)
       W' = W + Λ uᵀ                        so that  W' k* + b = v*.

Key consistency. The reference implementation builds u from the averaged k* but computes Λ's
numerator and denominator from the key of the un-prefixed prompt alone. Then W' maps that key, not
k*, to v*, and when the two keys differ the denominator uᵀk can be tiny and Λ huge: the "disabling
edits" that collapse a model under sequential editing (r-ROME, Gupta et al. 2024). ``key="original"``
(default) reproduces the reference code; ``key="averaged"`` uses k* everywhere, as r-ROME does (then
W' k* + b = v* exactly). Either way the edit records the key Λ used as ``Edit.k_lambda``.

Everything model-dependent (which layer, module names, the layer whose output is scored) comes from
the model: the layer from causal tracing (``layers="auto"``, :func:`locate.resolve_layers` with one
layer), modules from :class:`locate.HookedLM`, and the loss is read at the model's own output.
Hyper-parameters default to the paper's GPT-2-XL / GPT-J settings (:class:`ROMEHparams`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from locate import resolve_layer
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError
from locate.hooks import capture_at

from ..context import ROME_TEMPLATE_LENGTHS, subject_keys, subject_last_token, templates_for
from ..edit import Edit, WeightDelta
from ..registry import Runtime, compute, register
from ..request import Request
from ..stats import DEFAULT_N_TOKENS, stats_for
from ..vstar import VStarHparams, optimize_targets


@dataclass
class ROMEHparams:
    """ROME's hyper-parameters; defaults are the paper's GPT-2-XL/GPT-J settings."""

    layers: Any = "auto"  # layer spec (locate.resolve_layers, one layer): "auto" = peak MLP effect of tracing
    key: str = "original"  # Λ's key: "original" (the reference code's) or "averaged" (consistent, r-ROME)
    template_lengths: tuple = ROME_TEMPLATE_LENGTHS  # (token length, count): 1 + 10 + 10 templates
    # v* (ROME §3.1 eq. 4): the paper's values, kept in one place (edit.vstar.VStarHparams)
    v_steps: int = VStarHparams.steps  # Adam steps of the δ optimisation
    v_lr: float = VStarHparams.lr  # its learning rate
    kl_factor: float = VStarHparams.kl_factor  # weight of the essence-drift KL term
    weight_decay: float = VStarHparams.weight_decay  # weight of ‖δ‖/‖h₀‖²
    clamp_norm_factor: float = VStarHparams.clamp_norm_factor  # ‖δ‖ ≤ factor · ‖h₀‖
    stop_loss: float = VStarHparams.stop_loss  # early stop once the loss is below this
    kl_position: str = VStarHparams.kl_position  # KL read at the subject's last token of "{s} is a" (reference)
    stats_tokens: int = DEFAULT_N_TOKENS  # corpus tokens for C (the paper: 100,000 Wikipedia samples; edit.stats)

    def __post_init__(self):
        if self.key not in ("averaged", "original"):
            raise InvalidHparamsError(f"key must be 'averaged' or 'original', got {self.key!r}")
        self.template_lengths = tuple(tuple(x) for x in self.template_lengths)

    def vstar(self) -> VStarHparams:
        return VStarHparams(steps=self.v_steps, lr=self.v_lr, kl_factor=self.kl_factor,
                            weight_decay=self.weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                            stop_loss=self.stop_loss, kl_position=self.kl_position)


def rank_one_update(W: torch.Tensor, b: torch.Tensor | None, k: torch.Tensor, u: torch.Tensor,
                    v_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME eq. 2 in closed form: Λ = (v* − (W k + b)) / (uᵀ k), returning (Λ, uᵀ k).
    W' = W + Λ uᵀ then satisfies W' k + b = v*. Computed in float64."""
    # on W's device: k, u and v* come from activations, which may sit on another device than this block
    W = W.double()
    k, u, v_star = (t.to(device=W.device, dtype=torch.float64) for t in (k, u, v_star))
    value = W @ k + (0 if b is None else b.double())
    denominator = u @ k
    return (v_star - value) / denominator, denominator


SMOKE = {"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024}


@register("rome", ROMEHparams, batched=False, layers=1, smoke=SMOKE,
          description="ROME: rank-one update of one MLP at the layer causal tracing finds (Meng et al. 2022)")
def compute_rome(lm, requests: list[Request], hp: ROMEHparams, rt: Runtime) -> Edit:
    """The ROME edit of one request (not applied). If anything fails the model is untouched."""
    (request,) = requests
    return rome_edit(lm, request, hp, rt)


def rome_edit(lm, request: Request, hp: ROMEHparams, rt: Runtime, *, method: str = "rome",
              extra: Callable[[list[str]], Any] | None = None) -> Edit:
    """ROME's steps (statistics, templates, k*, v*, the rank-one update) for one request, as an unapplied
    :class:`Edit` named ``method``. ``extra(templates)``, when given, returns a
    :class:`edit.vstar.ExtraObjective` added to v*'s loss (BIRD's bidirectional term); its last value is
    recorded as ``metrics["extra_term"]``. Variants of ROME call this instead of copying it."""
    layer, layer_reason = resolve_layer(lm, hp.layers)
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    # C = E[k kᵀ] at this layer (cached on disk per model, layer and corpus)
    st = stats_for(lm, [layer], rt, n_tokens=hp.stats_tokens)[layer]
    timings["stats_s"] = time.perf_counter() - t

    # context templates x_j: "{}" plus short prefixes the model writes itself
    t = time.perf_counter()
    templates = templates_for(lm, rt, hp.template_lengths)
    timings["templates_s"] = time.perf_counter() - t

    # k* (eq. 3): the key at the subject's last token, averaged over the templates
    t = time.perf_counter()
    k_star = subject_keys(lm, [request], layer, templates)[0]
    if hp.key == "original":  # the reference code's Λ uses the un-prefixed prompt's key
        ids, pos = subject_last_token(lm, "{}", request)
        k_lambda = capture_at(lm, [ids], [pos], lm.hook_mlp_key(layer))[0]
    else:
        k_lambda = k_star
    timings["key_s"] = time.perf_counter() - t

    # v* (eq. 4): optimise δ at the MLP output of this layer, subject's last token
    t = time.perf_counter()
    tv = optimize_targets(lm, [request], layer, site="mlp_out", templates=templates, hparams=hp.vstar(),
                          progress=rt.progress, extra=None if extra is None else extra(templates))
    v_star = tv.target[0]
    timings["v_star_s"] = time.perf_counter() - t

    # the rank-one update (eq. 2): u = C⁻¹k*, Λ = (v* − (W k + b)) / (uᵀ k), W' = W + Λ uᵀ
    t = time.perf_counter()
    u = st.solve(k_star)
    W = lm.mlp_out_weight(layer)
    Lam, denominator = rank_one_update(W, lm.mlp_out_bias(layer), k_lambda, u, v_star)
    left, right = Lam[:, None].to(W.dtype), u[None, :].to(device=W.device, dtype=W.dtype)  # both on W's device
    # checked after the cast to W's dtype, on the factors, their product and the edited weight (as apply adds it):
    # float64 values that are finite can overflow in float16/bfloat16 at any of the three
    if not (torch.isfinite(left).all() and torch.isfinite(right).all() and torch.isfinite(W + left @ right).all()):
        raise EditFailedError(f"{method} update is not finite in {W.dtype} (uᵀk = {float(denominator):.3g}); "
                              "the model is unchanged")
    timings["update_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    e = Edit(
        method=method,
        requests=[request],
        interventions=[WeightDelta(layer, left=left, right=right)],
        fingerprint=lm.fingerprint,
        model_name=lm.name,
        layer_reason=layer_reason,
        hparams={**asdict(hp), "layers": [layer], "site": "mlp_out", "stats_source": st.source,
                 "stats_tokens": st.n_tokens, "n_templates": len(templates)},
        timings=timings,
        loss_trace=[row[0] for row in tv.loss_trace],
        metrics={"v_star_final_loss": tv.final_loss[0], "v_star_final_nll": tv.final_nll[0],
                 "v_star_steps": tv.steps, "delta_norm": float(tv.delta[0].norm()),
                 "value_norm": float(tv.initial[0].norm()), "denominator": float(denominator),
                 "update_norm": float(Lam.norm() * u.norm()),
                 **({} if extra is None else {"extra_term": tv.final_extra[0]})},
    )
    e.k_star, e.v_star, e.k_lambda = k_star.detach(), v_star.detach(), k_lambda.detach()
    return e


def rome(request: Request, *, model=None, layer: Any = "auto", stats=None, corpus=None, progress: bool = False,
         hparams: ROMEHparams | None = None, **overrides) -> Edit:
    """The ROME edit of one fact, computed and **not applied** (``.apply()`` it, or ``edit.applied``).

    ``layer``: a layer spec (``"auto"``, an int, a trace, a profile). ``stats``: a :class:`KeyStats`
    (or ``{layer: KeyStats}``) for the edited layer; ``None`` computes (or reads from the cache) the key
    statistics over ``corpus``. Keyword ``overrides`` set :class:`ROMEHparams` fields."""
    if not isinstance(request, Request):
        raise InvalidArgumentError("rome edits one Request; use edit.memit (or edit.write) for many")
    if stats is not None and not isinstance(stats, dict):
        stats = {stats.layer: stats}
    return compute("rome", [request], model=model, hparams=hparams, runtime=Runtime(corpus=corpus, stats=stats, progress=progress),
                   **{"layers": layer, **overrides})
