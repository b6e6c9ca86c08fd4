"""PRUNE: restrain the large singular values of the accumulated sequential edit (Ma et al., ICLR 2025,
"Perturbation-Restrained Sequential Model Editing").

Ma et al. bound how far an edited matrix Ŵ = W + ΔW can move the outputs of the keys it stored before
by the condition number of Ŵ, and observe that under sequential editing the accumulated update ΔW
grows singular values far above W's own, so the condition number (and the damage to general
abilities) grows with the number of edits. PRUNE (Perturbation Restraint on Upper bouNd for Editing)
keeps ΔW's directions and shrinks only its singular values that exceed W's largest:

    ΔW = U Σ̄ Vᵀ,   σ̄_i its singular values,   σ_max = ‖W‖₂  (the largest singular value of the unedited W)
    F(σ̄) = log_α(σ̄) − log_α(σ_max) + σ_max     if σ̄ > σ_max,   σ̄ otherwise          (the paper's F)
    ΔW_PRUNE = U F(Σ̄) Vᵀ

so a singular value that would exceed σ_max by a factor c exceeds it by log_α(c) only. F lowers every
σ̄ > σ_max when σ_max ≥ 1/ln α (real weights: σ_max of SmolLM2's MLP output projections is 14-35); below
that (tiny random models) it raises those just above σ_max, as the paper's formula does, with a warning.

Sequential editing here. The n-th PRUNE edit on a layer finds the model carrying
A = Σ (this method's earlier edits at that matrix), which is already restrained; it computes the base
method's update Δ on the model as it is, restrains the new accumulated edit and writes the difference:

    A_n = F(A_{n−1} + Δ_n),       the edit's delta  D_n = A_n − A_{n−1}

D_n = Δ_n + U_k diag(F(σ̄_k) − σ̄_k) V_kᵀ over the k compressed singular values, so it is stored as exact
low-rank factors when Δ_n is (rank ≤ rank Δ_n + k). σ_max is that of W₀ = W − A_{n−1}, the weight without
this method's edits (edits of other methods applied before count as part of W₀). Reverting a PRUNE
edit removes its D_n, and the next edit restrains from what is left. A is read from the PRUNE edits
applied to the model (``lm.applied_edits``), as AlphaEdit reads its earlier keys.

Reference code (``mjy1111/PRUNE``, ``easyeditor/editors/bi_editor_loadw.py``: ``func_log``, ``func_logn``,
``func_linear``): F as above with α = e (``reduce_type=log``, the README's example; ``log2``, ``log1_5``,
``log1_2`` are α = 2, 1.5, 1.2: ``alpha``) or F(σ̄) = (σ̄ + σ_max)/2 (``linear``: ``restraint="linear"``),
applied to every singular value ≥ σ_max of ΔW = W_n − W₀, σ_max from W₀'s SVD. It keeps the
numerical rank of ΔW (the same matrix up to rounding). Difference: the reference makes its n edits
unrestrained and restrains their sum once, before evaluation, so every edit is computed on an
unrestrained model; here each edit is restrained when it is computed, so the model held after any
number of edits is restrained and the next update is computed on it (the same thing for one edit).
The base method is MEMIT by default; as in the paper, ROME and
other weight-editing methods may be given (``base``, as in :mod:`edit.methods.rect`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from locate.errors import InvalidHparamsError, LocateEditWarning

from ..edit import Edit, WeightDelta
from ..registry import Runtime, register
from ..request import Request
from .rect import BaseMethodHparams, base_update, wrapped_edit


@dataclass
class PRUNEHparams(BaseMethodHparams):
    """PRUNE's hyperparameters: the restraint function F and its base α, and the base method (MEMIT's
    fields, inherited; ``base``/``base_hparams`` for another one)."""

    restraint: str = "log"  # F: "log" (σ_max + log_α(σ̄/σ_max), the paper's) or "linear" ((σ̄ + σ_max)/2)
    alpha: float = math.e  # α, the base of the logarithm (reference: e; also 2, 1.5, 1.2)

    def __post_init__(self):
        super().__post_init__()
        if self.restraint not in ("log", "linear"):
            raise InvalidHparamsError(f"restraint must be 'log' or 'linear', got {self.restraint!r}")
        if not self.alpha > 1:
            raise InvalidHparamsError(f"alpha (the logarithm's base) must be greater than 1, got {self.alpha}")


def restrain(s: torch.Tensor, sigma_max: float, restraint: str = "log", alpha: float = math.e) -> torch.Tensor:
    """F applied to the singular values ``s``: those above ``sigma_max`` become σ_max + log_α(σ̄/σ_max)
    ("log") or (σ̄ + σ_max)/2 ("linear"); the others are returned unchanged."""
    big = s > sigma_max
    if restraint == "log":
        squeezed = sigma_max + torch.log(s.clamp_min(sigma_max) / sigma_max) / math.log(alpha)
    else:
        squeezed = (s + sigma_max) / 2
    return torch.where(big, squeezed, s)


def accumulated(lm, param: str) -> torch.Tensor | None:
    """A: the sum of the deltas at ``param`` of the PRUNE edits applied to the model, float64."""
    A = None
    for e in lm.applied_edits:
        if getattr(e, "method", None) == "prune":
            for d in e.deltas:
                if d.param == param:
                    A = d.matrix().double() if A is None else A + d.matrix().double().to(A.device)
    return A


def largest_singular_value(lm, param: str, A: torch.Tensor | None, rt: Runtime) -> float:
    """σ_max of W₀ = W − A (the weight without PRUNE's edits), cached per run for the same W₀."""
    others = tuple(e.id for e in lm.applied_edits if getattr(e, "method", None) != "prune")
    key = (lm.fingerprint, param, others)
    memo = rt.cache.setdefault("prune_sigma_max", {})
    if key not in memo:
        W0 = lm.parameter(param).detach().double()
        if A is not None:
            W0 = W0 - A.to(W0.device)
        memo[key] = float(torch.linalg.matrix_norm(W0, ord=2))
    return memo[key]


def restrained_delta(d: WeightDelta, A: torch.Tensor | None, sigma_max: float, hp: PRUNEHparams,
                     dtype: torch.dtype) -> tuple[WeightDelta, dict]:
    """D = F(A + Δ) − A for the base delta ``d`` = Δ, with a record of the spectrum before and after."""
    delta = d.matrix().double()
    total = delta if A is None else A.to(delta.device) + delta
    U, s, Vh = torch.linalg.svd(total, full_matrices=False)
    s_new = restrain(s, sigma_max, hp.restraint, hp.alpha)
    big = s > sigma_max
    rec = {"param": d.param, "sigma_max_W": sigma_max, "sigma_raw": float(s[0]), "sigma_restrained": float(s_new[0]),
           "n_compressed": int(big.sum()), "n_raised": int((s_new > s).sum())}
    if not bool(big.any()):
        return d, rec
    corr_left = U[:, big] * (s_new[big] - s[big])  # U_k diag(F(σ̄_k) − σ̄_k)
    corr_right = Vh[big]
    if d.dense is None:
        left = torch.cat([d.left.double().to(corr_left.device), corr_left], 1)
        right = torch.cat([d.right.double().to(corr_right.device), corr_right], 0)
        (d_out, r), d_in = left.shape, right.shape[1]
        if r * (d_out + d_in) < d_out * d_in:
            return WeightDelta(d.param, left=left.to(dtype), right=right.to(dtype)), rec
    return WeightDelta(d.param, dense=(delta + corr_left @ corr_right).to(dtype)), rec


@register("prune", PRUNEHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 2},
          description="PRUNE: MEMIT (or other) sequential edits with the accumulated update's large singular "
                      "values log-restrained (Ma et al. 2025)")
def compute_prune(lm, requests: list[Request], hp: PRUNEHparams, rt: Runtime) -> Edit:
    """The PRUNE edit of ``requests`` (not applied): the base method's update Δ, corrected so that the
    accumulated PRUNE edit A + Δ has its singular values above σ_max(W₀) restrained by F. The model's
    weights are untouched, also on failure."""
    t0 = time.perf_counter()
    base = base_update(lm, requests, hp, rt, "prune")
    t1 = time.perf_counter()
    out, record = [], []
    with torch.no_grad():
        for d in base.deltas:
            A = accumulated(lm, d.param)
            sigma_max = largest_singular_value(lm, d.param, A, rt)
            new, rec = restrained_delta(d, A, sigma_max, hp, lm.parameter(d.param).dtype)
            out.append(new)
            record.append(rec)
    raised = [r for r in record if r["n_raised"]]
    if raised:
        warnings.warn(f"PRUNE: σ_max(W) = {raised[0]['sigma_max_W']:.3g} at {raised[0]['param']} is below 1/ln α, "
                      f"where F = σ_max + log_α(σ/σ_max) raises the singular values just above σ_max instead of "
                      f"lowering them ({sum(r['n_raised'] for r in raised)} raised; the paper's F assumes "
                      "σ_max ≥ 1/ln α, as on real models)", LocateEditWarning, stacklevel=2)
    return wrapped_edit("prune", base, out, hp, {"prune_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0},
                        {}, {"prune": record})
