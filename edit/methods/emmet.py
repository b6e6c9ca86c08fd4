"""EMMET: batched ROME, with equality constraints, in closed form (Gupta, Sajnani & Anumanchipalli 2024,
"A Unified Framework for Model Editing").

ROME and MEMIT optimise the same preservation-memorisation objective for the MLP output projection W
of a layer: change the values of the keys of ordinary text (K₀, statistics C₀ = E[k kᵀ]) as little as
possible while writing the new facts (keys k_i, wanted value changes r_i). MEMIT writes the facts in
the least-squares sense (λ‖Δ K₀‖² + Σ‖Δ k_i − r_i‖², :mod:`edit.methods.memit`, eq. 14); ROME writes one
fact exactly (an equality constraint). EMMET writes a batch exactly:

    Δ̂ = argmin_Δ  tr(Δ C Δᵀ)    subject to   Δ k_i = r_i  for every request i        (EMMET objective)

    Δ̂ = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹        (the paper's closed form; K = [k_1 … k_B] and R = [r_1 … r_B] as columns)

For B = 1 this is ROME's update, Λ (C⁻¹k)ᵀ with Λ = r / (kᵀC⁻¹k). In this toolkit's row layout
(K is (B, d_mlp), R is (B, d_model)) and with the reference code's two regularisers:

    C   = λ C₀ + μ I                        (λ ``mom2_update_weight``, μ ``update_norm_lambda``)
    Y   = C⁻¹ Kᵀ                            (d_mlp × B; one Cholesky factorisation of C, no inverse)
    D   = K Y + ε I                         (B × B = Kᵀ C⁻¹ K in the paper's layout; ε ``emmet_lambda``)
    Δ   = Rᵀ D⁻¹ Yᵀ                         stored as the factors (Rᵀ, D⁻¹ Yᵀ): rank ≤ B

With ε = 0, Δ Kᵀ = Rᵀ D⁻¹ (K Y) = Rᵀ: every constraint holds to rounding. ε > 0 is the reference's
guard against an ill-conditioned D (near-duplicate keys in a large batch); it trades exactness for
stability, the more the larger ε is against kᵀ C⁻¹ k (about d_mlp / λ for a typical key). If D cannot
be factorised the reference falls back to a pseudo-inverse, and so does this code (recorded in the
per-layer metrics).

Where the update goes follows the reference code (EasyEdit's ``easyeditor/models/emmet``, which ports
the authors' ``unified-model-editing``): MEMIT's two steps with EMMET's solve in place of eq. 14.
z_i is optimised at the last edited layer (MEMIT eq. 16, :func:`edit.methods.memit.memit_targets`),
the keys are averaged over MEMIT's templates (bare prompt, then 5 prefixes of 10 tokens, grouped as
``compute_ks``), and over a window each layer writes its share R_l = (z − h^L)/(L − l + 1) of what is
still missing (:func:`edit.methods.memit.layer_walk`). The papers' configs edit one layer (GPT-2-XL 17,
GPT-J/Llama 5), so the window defaults to one layer (``n_layers = 1``), the one causal tracing picks.

Defaults. λ: the authors' configs use 1 for GPT-J and Llama-2-7B and 1,000 for GPT-2-XL; EasyEdit's
use 10,000 (GPT-2-XL) and 100,000 (GPT-J, Llama). C₀ here is the mean second moment, as in both
references, so the numbers mean the same; only ε's weight depends on λ (D scales as 1/λ). We take
the authors' Llama/GPT-J value, λ = 1, under which ε = 0.1 is negligible against kᵀC⁻¹k ≈ d_mlp and
each request's value lands within about 0.03% of its target on the tiny test models
(``mom2_update_weight`` sets EasyEdit's; at λ = 10⁴ the same batch stops ~65% short). ε = 0.1 and
μ = 0 are both references'. EasyEdit adds ε for every batch; the authors' code only when B > 1
(``regularise_single=False``). The solve is float64, as in both.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from locate import resolve_layers
from locate.errors import InvalidHparamsError, SingularStatisticsError

from ..edit import Edit
from ..registry import Runtime, register
from ..request import Request
from ..stats import stats_for
from .memit import WindowHparams, check_conflicts, two_steps


_COND_MAX_B = 4096  # batches up to this size get D's condition number in the per-layer metrics


@dataclass
class EMMETHparams(WindowHparams):
    """EMMET's hyperparameters: MEMIT's window, statistics, templates and z (inherited), the reference
    code's regularisers, and one layer by default as in the papers' configs."""

    n_layers: int = 1  # layers edited when ``layers`` is "auto"/a trace/a profile (the papers' configs: one)
    mom2_update_weight: float = 1.0  # λ: C = λ C₀ (authors' GPT-J/Llama-2 configs: 1; EasyEdit: 1e4-1e5)
    update_norm_lambda: float = 0.0  # μ: C = λ C₀ + μ I, a pull towards small ‖Δ‖ (both references: 0)
    emmet_lambda: float = 0.1  # ε: D = Kᵀ C⁻¹ K + ε I against an ill-conditioned D (both references: 0.1)
    regularise_single: bool = True  # add ε also for a batch of one (EasyEdit); False: only when B > 1 (authors)

    def __post_init__(self):
        super().__post_init__()
        if not self.mom2_update_weight > 0:
            raise InvalidHparamsError(f"mom2_update_weight (λ) must be positive, got {self.mom2_update_weight}")
        if self.update_norm_lambda < 0 or self.emmet_lambda < 0:
            raise InvalidHparamsError("update_norm_lambda and emmet_lambda must be non-negative, got "
                                      f"{self.update_norm_lambda} and {self.emmet_lambda}")


def emmet_update(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float, mu: float = 0.0,
                 eps: float = 0.0, record: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = Rᵀ (K C⁻¹ Kᵀ + ε I)⁻¹ K C⁻¹ with C = λ C₀ + μ I, as factors ``(left, right)``, Δ = left @ right.

    ``K``: (B, d_mlp) keys, ``R``: (B, d_model) wanted value changes, ``C0``: (d_mlp, d_mlp) = E[k kᵀ].
    With ε = 0, Δ k_i = r_i for every i. Float64; returns (Rᵀ, D⁻¹ Yᵀ) of shapes (d_model, B), (B, d_mlp).
    ``record`` (a dict) receives D's condition number (B ≤ 4,096) and whether the pseudo-inverse was needed."""
    K, R, C0 = K.double(), R.double(), C0.double().to(K.device)
    C = lam * C0
    if mu:
        C = C + mu * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    Lc, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        raise SingularStatisticsError(
            f"λC₀ + μI is not positive definite (Cholesky failed at column {int(info)}); the key statistics are "
            "degenerate: recompute them with more corpus tokens, or set update_norm_lambda > 0")
    Y = torch.cholesky_solve(K.T, Lc)  # (d_mlp, B) = C⁻¹ Kᵀ
    D = K @ Y  # (B, B) = Kᵀ C⁻¹ K in the paper's column layout
    if eps:
        D = D + eps * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)
    D = (D + D.T) / 2  # symmetric in exact arithmetic
    LD, info = torch.linalg.cholesky_ex(D)
    pseudo = int(info) != 0  # D singular (e.g. two requests with the same key and ε = 0): the reference's pinv
    right = (torch.linalg.pinv(D, hermitian=True) @ Y.T) if pseudo else torch.cholesky_solve(Y.T, LD)
    if record is not None:  # D's condition number (its eigenvalues: O(B³), skipped for very large batches)
        ev = torch.linalg.eigvalsh(D) if D.shape[0] <= _COND_MAX_B else None
        record["D_condition"] = None if ev is None else float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf")
        record["pseudo_inverse"] = pseudo
    if not torch.isfinite(right).all():
        raise SingularStatisticsError("the EMMET system Kᵀ C⁻¹ K is singular and has no finite solution")
    return R.T.contiguous(), right.contiguous()


@register("emmet", EMMETHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024},
          description="EMMET: batched ROME with equality constraints, closed form (Gupta et al. 2024)")
def compute_emmet(lm, requests: list[Request], hp: EMMETHparams, rt: Runtime) -> Edit:
    """The EMMET edit writing all ``requests`` exactly (Δ k_i = r_i at each edited layer; not applied).
    The model's weights are identical before and after the call, also when it fails midway."""
    t0 = time.perf_counter()
    requests = check_conflicts(requests, lm)
    layers, reason = resolve_layers(lm, hp.layers, hp.n_layers)
    stats = stats_for(lm, layers, rt, n_tokens=hp.stats_tokens)
    timings = {"stats_s": time.perf_counter() - t0}
    eps = hp.emmet_lambda if (len(requests) > 1 or hp.regularise_single) else 0.0
    solves: dict[int, dict] = {}

    def solve(l, K, R):
        solves[l] = {}
        return emmet_update(K, R, stats[l].C, hp.mom2_update_weight, hp.update_norm_lambda, eps, solves[l])

    deltas, per_layer, _, loss_trace, final_losses = two_steps(lm, requests, layers, hp, rt, solve, timings)
    for rec in per_layer:
        rec.update(solves[rec["layer"]])
    timings["total_s"] = time.perf_counter() - t0
    record = {**asdict(hp), "layers": layers, "emmet_lambda_used": eps,
              "stats_source": {l: stats[l].source for l in layers}, "stats_n_tokens": {l: stats[l].n_tokens for l in layers}}
    return Edit("emmet", requests, deltas, lm.fingerprint, model_name=lm.name, layer_reason=reason,
                hparams=record, timings=timings, loss_trace=loss_trace,
                metrics={"final_loss": final_losses, "per_layer": per_layer})
