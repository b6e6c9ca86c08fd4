"""AlphaEdit: MEMIT with the update projected onto the null space of the preserved keys (Fang et al., ICLR 2025).

MEMIT (:mod:`edit.methods.memit`) trades the new facts against the keys of ordinary text through
λ·C₀ in its least-squares solve, so every edit still moves the values of preserved keys a little, and
the moves pile up under sequential editing. AlphaEdit removes that term and instead confines the
update to directions the preserved keys do not use.

Null-space projection (per edited layer l, computed once from the unedited model's statistics):

    C₀ = E[k kᵀ]  (edit.stats, the same statistic as MEMIT's)  =  U diag(s) Uᵀ
    P  = Û Ûᵀ,    Û = the eigenvectors of C₀ with eigenvalue  s < nullspace_threshold

so that P k₀ ≈ 0 for the keys k₀ of ordinary text.

Update (the reference code's solve, in this toolkit's row layout: K is (B, d_mlp), R is (B, d_model)):

    Step 1  z_i: as MEMIT (eq. 16), :func:`memit_targets`.
    Step 2  for l = l_1 .. L (:func:`layer_walk`, as MEMIT):
              K_l, R_l as MEMIT (eqs. 19, 20)
              Δ_lᵀ = ( P (K_lᵀK_l + K_pᵀK_p) + L2·I )⁻¹ P K_lᵀ R_l          (the paper's eq. for Δ P)
            where K_p holds the keys of the facts edited before (sequential editing).

Because (P M + L2 I)⁻¹ P = P (M P + L2 I)⁻¹, every column of Δ_lᵀ lies in the range of P: the update
leaves the outputs of preserved keys unchanged, Δ_l (I − P) = 0 (tested).

Sequential editing accumulates K_p: each AlphaEdit edit stores the keys it wrote at each layer in
``Edit.state`` (``keys_<layer>``), and a new edit reads them from the AlphaEdit edits applied to the
model before it. Reverting an edit therefore also removes its keys from K_p.

Defaults follow the reference configs (GPT-J / Llama3-8B): threshold 2e-2 (the paper's text says
1e-2; every shipped config uses 2e-2), L2 = 10, z as MEMIT's with 25 steps. Differences: the solve is
in float64 (the reference: float32), and, as for MEMIT, the window defaults to the 5 layers causal
tracing picks rather than fixed per-model layers.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass

import torch

from locate import resolve_layers
from locate.errors import InvalidHparamsError, SingularStatisticsError

from ..edit import Edit
from ..registry import Runtime, register
from ..request import Request
from ..stats import stats_for
from .memit import WindowHparams, check_conflicts, two_steps


@dataclass
class AlphaEditHparams(WindowHparams):
    """AlphaEdit's hyperparameters: MEMIT's window and z, plus the projection and the ridge term."""

    nullspace_threshold: float = 2e-2  # eigenvalues of C₀ below this span the null space (reference configs)
    threshold_relative: bool = False  # True: the threshold is a fraction of C₀'s largest eigenvalue (not the reference)
    L2: float = 10.0  # ridge term of the solve (reference: 10; EasyEdit's Llama3 config: 1)
    v_steps: int | None = 25  # z optimisation steps (reference: 25)

    def __post_init__(self):
        super().__post_init__()
        if self.nullspace_threshold <= 0 or self.L2 < 0:
            raise InvalidHparamsError("nullspace_threshold must be positive and L2 non-negative")


def null_space_projection(C: torch.Tensor, threshold: float, relative: bool = False) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C whose eigenvalues are below ``threshold`` (times the largest
    eigenvalue when ``relative``), float64."""
    s, U = torch.linalg.eigh(C.double())
    U_null = U[:, s < threshold * (float(s[-1]) if relative else 1.0)]
    return U_null @ U_null.T


def alpha_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, K_prev: torch.Tensor | None,
                 L2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = left @ right with Δᵀ = (P (KᵀK + K_pᵀK_p) + L2·I)⁻¹ P Kᵀ R: returns (Rᵀ, Yᵀ), Y = A⁻¹ P Kᵀ."""
    K, R, P = K.double(), R.double(), P.double().to(K.device)
    M = K.T @ K
    if K_prev is not None and len(K_prev):
        K_prev = K_prev.double().to(K.device)
        M = M + K_prev.T @ K_prev
    A = P @ M + L2 * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
    Y = torch.linalg.solve(A, P @ K.T)  # (d_mlp, B); A is not symmetric, so an LU solve
    if not torch.isfinite(Y).all():
        raise SingularStatisticsError("the AlphaEdit system is singular (L2 = 0 and an empty null space?)")
    return R.T.contiguous(), Y.T.contiguous()


def previous_keys(lm, layer: int) -> torch.Tensor | None:
    """K_p at ``layer``: the keys written by the AlphaEdit edits applied to the model, oldest first."""
    keys = [e.state[f"keys_{layer}"] for e in lm.applied_edits
            if getattr(e, "method", None) == "alphaedit" and f"keys_{layer}" in e.state]
    return torch.cat(keys) if keys else None


@register("alphaedit", AlphaEditHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 2,
                 "nullspace_threshold": 0.5, "threshold_relative": True},
          description="AlphaEdit: MEMIT projected onto the null space of preserved keys (Fang et al. 2025)")
def compute_alphaedit(lm, requests: list[Request], hp: AlphaEditHparams, rt: Runtime) -> Edit:
    """The AlphaEdit edit of ``requests`` (not applied); the model's weights are left as they were."""
    t0 = time.perf_counter()
    requests = check_conflicts(requests, lm)
    layers, reason = resolve_layers(lm, hp.layers, hp.n_layers)
    stats = stats_for(lm, layers, rt, n_tokens=hp.stats_tokens)
    proj = rt.cache.setdefault("alphaedit_P", {})
    P = {}
    for l in layers:  # computed once per run from the statistics, as the reference does before any edit
        key = (lm.fingerprint, l, stats[l].source, stats[l].n_tokens, hp.nullspace_threshold, hp.threshold_relative)
        if key not in proj:
            proj[key] = null_space_projection(stats[l].C, hp.nullspace_threshold, hp.threshold_relative)
        P[l] = proj[key]
        if float(torch.trace(P[l])) < 0.5:
            warnings.warn(f"AlphaEdit: no eigenvalue of C₀ at layer {l} is below the null-space threshold "
                          f"{hp.nullspace_threshold}; the projection is zero and this layer will not change "
                          "(the threshold is absolute, as in the reference; see threshold_relative)", stacklevel=2)
    timings = {"stats_s": time.perf_counter() - t0}
    deltas, per_layer, keys, loss_trace, final_losses = two_steps(
        lm, requests, layers, hp, rt, lambda l, K, R: alpha_update(K, R, P[l], previous_keys(lm, l), hp.L2), timings)
    timings["total_s"] = time.perf_counter() - t0
    return Edit("alphaedit", requests, deltas, lm.fingerprint, model_name=lm.name, layer_reason=reason,
                hparams={**asdict(hp), "layers": layers, "null_space_dim": {l: int(torch.trace(P[l]).round()) for l in layers},
                         "stats_source": {l: stats[l].source for l in layers}},
                timings=timings, loss_trace=loss_trace,
                metrics={"final_loss": final_losses, "per_layer": per_layer},
                state={f"keys_{l}": K.to(lm.dtype).cpu() for l, K in keys.items()})
