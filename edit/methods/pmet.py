"""PMET: Precise Model Editing in a Transformer (Li, Li, Song, Yang, Ma & Yu, AAAI 2024).

MEMIT (:mod:`edit.methods.memit`) optimises a target z for the whole residual stream at the last
critical layer L and asks the MLPs of the window to write it. But the residual stream is the sum of
the attention (MHSA) and the FFN outputs, and only the FFN weights are edited; PMET's point is that
the FFN should be asked for its own part of the change only. So it optimises the hidden states of
both Transformer components ("TC hidden states") at layer L jointly, and updates the FFN weights
with the FFN part alone.

Step 1 (the joint optimisation of the TC hidden states).  For every request i, at the subject's last
    token of layer L, one δ for the attention output and one for the FFN output:

        (δ_i^a, δ_i^m) = argmin  w_i · 1/N Σ_j −log P[o_i | x_j + p_i ; a^L += δ^a, m^L += δ^m]
                                 + λ_KL · D_KL(P[· | p'_i ; edited] ‖ P[· | p'_i])
                                 + λ_wd (‖δ^a‖ / ‖a_0^L‖² + ‖δ^m‖ / ‖m_0^L‖²)
        subject to ‖δ^a‖ ≤ c ‖a_0^L‖,  ‖δ^m‖ ≤ c ‖m_0^L‖

    z_i^a = a_0^L + δ^a is optimised but not written anywhere (it shapes z^m); z_i^m = m_0^L + δ^m,
    the FFN's target. w_i is the reference code's NLL weight: 1, or 0.1 for the next step once o_i is
    already the top-1 token at every target position of every prompt; then the request also stops once
    its weighted KL term is ≤ 0.01 (:func:`edit.vstar.optimize_targets` with ``joint_sites`` and
    ``top1_nll_factor``/``top1_stop_kl``).

Step 2 (the FFN update, MEMIT's walk).  For l = l_1 .. L in order, on the model carrying the updates
    made so far (:func:`edit.methods.memit.layer_walk`, keys K_l as MEMIT's eq. 19, grouped):

        m_i^L       the current FFN output of layer L at the subject's last token (recomputed per layer)
        R_l         = (z_i^m − m_i^L) / √(L − l + 1)                 (the reference's square-root share)
        Δ_l         = R_lᵀ K_l (λ C_l + K_lᵀ K_l)⁻¹                  (MEMIT eq. 14, :func:`layer_update`)

    The residual is the FFN output's and is divided by √(number of layers left), not MEMIT's
    (number of layers left): an earlier layer's update moves m^L only through the residual stream,
    so each layer is given a larger share. Only the FFN output projections change (tested).

Reference: the authors' code (xpq-tech/PMET, ported to EasyEdit as ``easyeditor/models/pmet``), whose
``compute_zs`` and ``execute_pmet`` this follows: the δ's are added at the attention output projection
and at the FFN output projection of layer L, the z's read at the un-prefixed prompt, the keys averaged
within each template group and then across groups, the context templates MEMIT's ("{}" plus 5 of 10
tokens). Defaults are the authors' GPT-J config: six layers, 30 Adam steps at lr 0.2, clamp 0.75,
λ_KL 1, λ_wd 0.5 and λ = 6,000 for GPT-J's d_mlp = 16,384; EasyEdit's GPT-J config has λ = 15,000.
λ is scaled to the model's MLP width as MEMIT's (``mom2_update_weight=None``, module docstring of
:mod:`edit.methods.memit`). Departures: the window is the six layers causal tracing picks, not fixed
per model; the solve is float64 with a Cholesky factorisation (the reference inverts); δ's are
batched over requests (independent per request, as the reference's one-request-at-a-time loop).
Options: ``optimize_attn=False`` drops the attention δ (the FFN-only ablation), ``residual_share=
"linear"`` uses MEMIT's 1/(L − l + 1), ``top1_nll_factor=1`` and ``top1_stop_kl=None`` turn the
reference's NLL reweighting off.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from locate import resolve_layers
from locate.errors import EditFailedError, InvalidHparamsError

from ..context import template_groups, templates_for
from ..edit import Edit
from ..registry import Runtime, register
from ..request import Request
from ..stats import stats_for
from ..vstar import optimize_targets
from .memit import PAPER_D_MLP, WindowHparams, chunks, check_conflicts, layer_update, layer_walk, subject_states

PMET_GPTJ_LAMBDA = 6_000.0  # the authors' GPT-J mom2_update_weight (EasyEdit's GPT-J config: 15,000)


@dataclass
class PMETHparams(WindowHparams):
    """PMET's hyperparameters: MEMIT's window, statistics and templates, the authors' GPT-J values for
    the joint optimisation, and the FFN update's residual share."""

    n_layers: int = 6  # the authors' GPT-J window: layers 3-8 (GPT-NeoX-20B: 6-10)
    v_steps: int | None = 30  # Adam steps of the joint optimisation (authors' GPT-J: 30)
    v_lr: float | None = 0.2  # its learning rate (authors' GPT-J: 0.2)
    v_weight_decay: float | None = 0.5  # λ_wd, applied to each δ against its own ‖h_0‖² (both configs: 0.5)
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ 0.75 ‖h_0‖ for each of δ^a, δ^m (authors' GPT-J; NeoX 0.8)
    kl_factor: float | None = 1.0  # λ_KL (authors' GPT-J: 1; EasyEdit's Llama-2 config: 0.0625)
    top1_nll_factor: float = 0.1  # NLL weight once the target is top-1 everywhere (reference: 0.1; 1 = off)
    top1_stop_kl: float | None = 0.01  # then stop once λ_KL·KL ≤ this (reference: 0.01; None = off)
    optimize_attn: bool = True  # optimise the attention δ jointly (the paper); False: the FFN δ alone
    residual_share: str = "sqrt"  # R_l = r / √(L−l+1) (reference) or "linear": r / (L−l+1) (MEMIT's)
    mom2_update_weight: float | None = None  # λ; None = 6,000 · d_mlp / 16,384 (authors' GPT-J, scaled)

    def __post_init__(self):
        super().__post_init__()
        if self.residual_share not in ("sqrt", "linear"):
            raise InvalidHparamsError(f"residual_share must be 'sqrt' or 'linear', got {self.residual_share!r}")
        if self.mom2_update_weight is not None and self.mom2_update_weight < 0:
            raise InvalidHparamsError(f"mom2_update_weight must be non-negative, got {self.mom2_update_weight}")
        if self.top1_nll_factor < 0 or (self.top1_stop_kl is not None and self.top1_stop_kl < 0):
            raise InvalidHparamsError("top1_nll_factor and top1_stop_kl must be non-negative")

    def lam(self, d_mlp: int) -> float:
        if self.mom2_update_weight is not None:
            return float(self.mom2_update_weight)
        return PMET_GPTJ_LAMBDA * d_mlp / PAPER_D_MLP

    def share(self, layers_left: int) -> float:
        """The divisor of the residual at a layer with ``layers_left`` layers (itself included) to go."""
        return math.sqrt(layers_left) if self.residual_share == "sqrt" else float(layers_left)


def ffn_outputs(lm, requests: Sequence[Request], layer: int, *, chunk_size: int = 64) -> torch.Tensor:
    """m^layer: the FFN output of ``layer`` at each rendered prompt's last subject token, (B, d_model), float64."""
    return subject_states(lm, requests, lm.hook_mlp_out(layer), chunk_size=chunk_size)


def pmet_targets(lm, requests: Sequence[Request], L: int, templates: Sequence[str], hp: PMETHparams,
                 rt: Runtime) -> tuple[dict, list, list[float]]:
    """Step 1: ``{"z_m", "delta_m", "z_a", "delta_a"}``, (B, d_model) float64 each (the attention's ``None``
    without ``optimize_attn``), optimised jointly chunk by chunk; also the loss trace per chunk and each
    request's final loss."""
    z_m, d_m, z_a, d_a, loss_trace, final_losses = [], [], [], [], [], []
    joint = ("attn_out",) if hp.optimize_attn else ()
    for chunk in tqdm(list(chunks(list(requests), hp.chunk_size)), desc=f"z^m, z^a at layer {L}", unit="chunk",
                      disable=not rt.progress or len(requests) <= hp.chunk_size):
        tv = optimize_targets(lm, chunk, L, site="mlp_out", templates=templates, joint_sites=joint,
                              top1_nll_factor=hp.top1_nll_factor, top1_stop_kl=hp.top1_stop_kl, **hp.vstar_kwargs())
        z_m.append(tv.target.double())
        d_m.append(tv.delta.double())
        if hp.optimize_attn:
            z_a.append(tv.joint["attn_out"]["target"].double())
            d_a.append(tv.joint["attn_out"]["delta"].double())
        loss_trace.append(tv.loss_trace)
        final_losses += tv.final_loss
    z = {"z_m": torch.cat(z_m), "delta_m": torch.cat(d_m),
         "z_a": torch.cat(z_a) if z_a else None, "delta_a": torch.cat(d_a) if d_a else None}
    if not all(torch.isfinite(v).all() for v in z.values() if v is not None):
        raise EditFailedError("the PMET optimisation produced non-finite targets; the model was not changed")
    return z, loss_trace, final_losses


@register("pmet", PMETHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 2},
          description="PMET: attention and FFN states optimised jointly, only the FFN updated (Li et al. 2024)")
def compute_pmet(lm, requests: list[Request], hp: PMETHparams, rt: Runtime) -> Edit:
    """The PMET edit writing all ``requests`` into the FFN output projections of the critical layers
    (not applied). The model's weights are identical before and after the call, also when it fails."""
    t0 = time.perf_counter()
    requests = check_conflicts(requests, lm)
    layers, reason = resolve_layers(lm, hp.layers, hp.n_layers)
    lam = hp.lam(lm.d_mlp)
    stats = stats_for(lm, layers, rt, n_tokens=hp.stats_tokens)
    timings = {"stats_s": time.perf_counter() - t0}
    templates = templates_for(lm, rt, hp.template_lengths)
    L = layers[-1]

    t1 = time.perf_counter()
    z, loss_trace, final_losses = pmet_targets(lm, requests, L, templates, hp, rt)
    z_m = z["z_m"]
    timings["z_s"] = time.perf_counter() - t1

    solves: dict[int, dict] = {}

    def solve(l, K, _memit_R):
        # MEMIT's walk hands in its residual-stream share; PMET's is the FFN output's, with its own share
        left = len(layers) - layers.index(l)
        m = ffn_outputs(lm, requests, L, chunk_size=4 * hp.chunk_size)  # on the model carrying the updates so far
        R = (z_m - m) / hp.share(left)
        solves[l] = {"residual_norm": float(R.norm(dim=1).mean()), "share": hp.share(left)}
        return layer_update(K, R, stats[l].C, lam)  # eq. 14

    t2 = time.perf_counter()
    groups = template_groups(hp.template_lengths) if hp.key_average == "grouped" else None
    # layer_walk's own z only feeds the residual it passes to solve, which PMET replaces: zeros suffice
    deltas, per_layer, keys = layer_walk(lm, requests, layers, torch.zeros_like(z_m), templates, solve,
                                         chunk_size=hp.chunk_size, rt=rt, key_groups=groups)
    for rec in per_layer:
        rec.update(solves[rec["layer"]])
    timings["update_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    record = {**asdict(hp), "lambda_": lam, "layers": layers,
              "stats_source": {l: stats[l].source for l in layers}, "stats_n_tokens": {l: stats[l].n_tokens for l in layers}}
    e = Edit("pmet", requests, deltas, lm.fingerprint, model_name=lm.name, layer_reason=reason,
             hparams=record, timings=timings, loss_trace=loss_trace,
             metrics={"final_loss": final_losses, "per_layer": per_layer,
                      "ffn_delta_norm": [float(x) for x in z["delta_m"].norm(dim=1)],
                      "attn_delta_norm": None if z["delta_a"] is None else [float(x) for x in z["delta_a"].norm(dim=1)]})
    e.targets, e.keys = z, keys  # z^m, δ^m, z^a, δ^a and the keys K_l, for inspection (not saved)
    return e
