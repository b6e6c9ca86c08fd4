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
edits" that collapse a model under sequential editing (r-ROME, Gupta et al. 2024). ``key="averaged"``
(default) uses k* everywhere, as r-ROME does; ``key="original"`` reproduces the reference code.

Everything model-dependent (which layer, module names, the layer whose output is scored) comes from
the model: the layer from causal tracing (``layer="auto"``), modules from :class:`locate.HookedLM`,
and the loss is read at the model's own output. Hyper-parameters default to the paper's GPT-2-XL /
GPT-J settings (:class:`ROMEHparams`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from locate import resolve_model
from locate.causal_trace import CausalTrace
from locate.errors import EditFailedError

from .context import ROME_TEMPLATE_LENGTHS, capture_at, context_templates, subject_keys, subject_last_token
from .edit import Edit, WeightDelta
from .request import Request
from .stats import DEFAULT_N_TOKENS, KeyStats, key_second_moments
from .vstar import VStarHparams, optimize_targets


@dataclass
class ROMEHparams:
    """ROME's hyper-parameters; defaults are the paper's GPT-2-XL/GPT-J settings."""

    key: str = "averaged"  # "averaged" (consistent, r-ROME) or "original" (the reference code)
    template_lengths: tuple = ROME_TEMPLATE_LENGTHS  # (token length, count): 1 + 10 + 10 templates
    template_seed: int = 0
    # v* (ROME §3.1 eq. 4): the paper's values, kept in one place (edit.vstar.VStarHparams)
    v_steps: int = VStarHparams.steps
    v_lr: float = VStarHparams.lr
    kl_factor: float = VStarHparams.kl_factor
    weight_decay: float = VStarHparams.weight_decay
    clamp_norm_factor: float = VStarHparams.clamp_norm_factor
    stop_loss: float = VStarHparams.stop_loss
    stats_tokens: int = DEFAULT_N_TOKENS  # the paper: 100,000 Wikipedia samples (see edit.stats)

    def __post_init__(self):
        if self.key not in ("averaged", "original"):
            raise ValueError(f"key must be 'averaged' or 'original', got {self.key!r}")
        self.template_lengths = tuple(tuple(x) for x in self.template_lengths)

    def vstar(self) -> VStarHparams:
        return VStarHparams(steps=self.v_steps, lr=self.v_lr, kl_factor=self.kl_factor,
                            weight_decay=self.weight_decay, clamp_norm_factor=self.clamp_norm_factor,
                            stop_loss=self.stop_loss)


def resolve_layer(lm, layer) -> tuple[int, str]:
    """The layer to edit and why: ``"auto"`` (causal tracing over this model's calibration facts),
    an int, or a causal-tracing result with ``best_layer("mlp", "last_subject")``."""
    if isinstance(layer, str):
        if layer != "auto":
            raise ValueError(f"layer must be 'auto', an int or a CausalTrace, got {layer!r}")
        from locate import layer_profile

        profile = layer_profile(lm)
        best = lm.check_layer(int(profile.best_layer()))
        return best, f"layer {best}: {profile.reason(best)}"
    if isinstance(layer, CausalTrace):
        best = lm.check_layer(int(layer.best_layer("mlp", "last_subject")))
        return best, f"layer {best}: peak MLP indirect effect at the last subject token of the given trace"
    return lm.check_layer(layer), f"layer {layer}: chosen by the caller"


def _stats_for(lm, layer: int, stats, corpus, n_tokens: int, progress: bool) -> KeyStats:
    if stats is None:
        return key_second_moments(lm, [layer], corpus=corpus, n_tokens=n_tokens, progress=progress)[layer]
    if isinstance(stats, dict):
        if layer not in stats:
            raise ValueError(f"stats has layers {sorted(stats)}, not the edited layer {layer}")
        stats = stats[layer]
    if not isinstance(stats, KeyStats) or stats.layer != layer:
        raise ValueError(f"stats must be a KeyStats of layer {layer} (or a dict of them)")
    if tuple(stats.C.shape) != (lm.d_mlp, lm.d_mlp):
        raise ValueError(f"stats C has shape {tuple(stats.C.shape)}, the model's keys are {lm.d_mlp} wide")
    return stats


def rank_one_update(W: torch.Tensor, b: torch.Tensor | None, k: torch.Tensor, u: torch.Tensor,
                    v_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME eq. 2 in closed form: Λ = (v* − (W k + b)) / (uᵀ k), returning (Λ, uᵀ k).
    W' = W + Λ uᵀ then satisfies W' k + b = v*. Computed in float64."""
    W, k, u, v_star = W.double(), k.double(), u.double(), v_star.double()
    value = W @ k + (0 if b is None else b.double())
    denominator = u @ k
    return (v_star - value) / denominator, denominator


def rome(request: Request, *, model=None, layer: Any = "auto", stats=None, corpus=None, apply: bool = True,
         progress: bool = True, hparams: ROMEHparams | None = None, **overrides) -> Edit:
    """Edit one fact with ROME and (by default) apply it. Returns the :class:`Edit`.

    ``stats``: a :class:`KeyStats` (or ``{layer: KeyStats}``) for the edited layer; ``None`` computes
    (or reads from the cache) the key statistics over ``corpus`` (see :func:`key_second_moments`).
    Keyword ``overrides`` set :class:`ROMEHparams` fields, e.g. ``key="original"``, ``v_steps=25``.
    If anything fails (NaN loss, singular statistics, interrupt) the model is left untouched.
    """
    lm = resolve_model(model)
    if not isinstance(request, Request):
        raise TypeError("rome edits one Request; use edit.memit (or apply several ROME edits in turn) for many")
    hp = hparams or ROMEHparams()
    if overrides:
        hp = ROMEHparams(**{**asdict(hp), **overrides})
    request.check(lm)
    layer, layer_reason = resolve_layer(lm, layer)
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    # C = E[k kᵀ] at this layer (cached on disk per model, layer and corpus)
    st = _stats_for(lm, layer, stats, corpus, hp.stats_tokens, progress)
    timings["stats_s"] = time.perf_counter() - t

    # context templates x_j: "{}" plus short prefixes the model writes itself
    t = time.perf_counter()
    templates = context_templates(lm, seed=hp.template_seed, lengths=hp.template_lengths)
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
                          progress=progress)
    v_star = tv.target[0]
    timings["v_star_s"] = time.perf_counter() - t

    # the rank-one update (eq. 2): u = C⁻¹k*, Λ = (v* − (W k + b)) / (uᵀ k), W' = W + Λ uᵀ
    t = time.perf_counter()
    u = st.solve(k_star)
    W = lm.mlp_out_weight(layer)
    Lam, denominator = rank_one_update(W, lm.mlp_out_bias(layer), k_lambda, u, v_star)
    if not (torch.isfinite(Lam).all() and torch.isfinite(u).all()):
        raise EditFailedError(f"ROME update is not finite (uᵀk = {float(denominator):.3g}); the model is unchanged")
    delta = WeightDelta(layer, left=Lam[:, None].to(W.dtype), right=u[None, :].to(W.dtype))
    timings["update_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    e = Edit(
        method="rome",
        requests=[request],
        deltas=[delta],
        fingerprint=lm.fingerprint,
        model_name=lm.name,
        layer_reason=layer_reason,
        hparams={**asdict(hp), "layer": layer, "site": "mlp_out", "stats_source": st.source,
                 "stats_tokens": st.n_tokens, "n_templates": len(templates)},
        timings=timings,
        loss_trace=[row[0] for row in tv.loss_trace],
        metrics={"v_star_final_loss": tv.final_loss[0], "v_star_final_nll": tv.final_nll[0],
                 "v_star_steps": tv.steps, "delta_norm": float(tv.delta[0].norm()),
                 "value_norm": float(tv.initial[0].norm()), "denominator": float(denominator),
                 "update_norm": float(Lam.norm() * u.norm())},
    )
    e.k_star, e.v_star, e.k_lambda = k_star.detach(), v_star.detach(), k_lambda.detach()
    return e.apply(lm) if apply else e
