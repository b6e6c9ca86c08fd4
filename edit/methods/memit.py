"""MEMIT: write many facts at once, spread over a range of MLP layers (Meng et al. 2023, Alg. 1).

Notation (the paper's, with rows for requests: K is (B, d_mlp), R is (B, d_model)):

    requests i = 1..B, each "(subject s_i, prompt p_i) -> target o_i"
    critical layers  𝓡 = {l_1 < ... < L}   (contiguous window where the MLP matters, §3 / §4.1)

Step 1 (eq. 16).  For every request find a target hidden state z_i for the residual stream (the
    block output) at the LAST critical layer L, at the subject's last token:
        z_i = h_i^L + δ_i,   δ_i = argmin  -log P[o_i | prefix_j ⊕ p_i(s_i), h_i^L += δ_i]  (+ KL, weight decay),
    with ‖δ_i‖ clamped. The δ's of a batch are optimised together (independent δ per request,
    summed losses, batched forwards) by :func:`edit.vstar.optimize_targets`, shared with ROME.

Step 2 (Alg. 1, lines 7-14).  Walk l = l_1 .. L in order, on the model that already carries the
    updates made at the earlier layers:
        h_i^L       the current block-L output at the subject's last token         (recomputed per layer)
        K_l         the MLP keys k_i^l at the subject's last token, averaged over context templates (eq. 19;
                    by default within each template group first, then across groups, as the reference's
                    compute_ks: ``key_average``)
        R_l         = (z_i − h_i^L) / (L − l + 1)                                   (eq. 20)
        Δ_l         = R_lᵀ K_l (λ C_l + K_lᵀ K_l)⁻¹        [paper: R Kᵀ (C₀ + K Kᵀ)⁻¹, eq. 14]
        W_l        ←  W_l + Δ_l
    Δ_l is the minimiser of the least-squares objective (eq. 13 around W_l)
        λ·tr(Δ C_l Δᵀ) + Σ_i ‖Δ k_i − r_i‖²,
    i.e. "move each new key's value by its share of the residual while changing the values of the
    keys seen in ordinary text as little as possible". We form A = λ C_l + K_lᵀ K_l (d_mlp × d_mlp,
    symmetric positive definite), factor it once by Cholesky and solve A X = K_lᵀ; then
    Δ_l = R_lᵀ Xᵀ. No matrix is ever inverted. Δ_l has rank ≤ B, so it is stored as the exact factors
    (R_lᵀ, Xᵀ) when B (d_model + d_mlp) < d_model · d_mlp, densely otherwise.

    For a contiguous window L − l + 1 is the number of critical layers not yet updated; for an
    explicit non-contiguous list we use that count (as the reference implementation does).

What λ (``mom2_update_weight``) means here.  C_l is the *mean* E[k kᵀ] over corpus tokens
(:func:`edit.stats.key_second_moments`), not the sum K₀K₀ᵀ over n stored keys. The paper's C₀ = K₀K₀ᵀ
≈ n·E[kkᵀ], so λ plays the role of n: the number of typical corpus keys whose values the update must
preserve, weighed against the B new keys (each counted once). The paper's 15,000 for GPT-J is in
these same units (its code also multiplies the mean second moment). How far one layer moves a new
key's value is s/(1+s) with s = kᵀ(λC)⁻¹k, and for a typical key E[kᵀC⁻¹k] = d_mlp; so what λ does
depends on d_mlp: GPT-J (d_mlp = 16,384) with λ = 15,000 has s ≈ 1. The same balance on SmolLM2
(d_mlp = 1,536) is λ ≈ 15,000 · 1,536 / 16,384 ≈ 1,400. ``MEMITHparams.mom2_update_weight=None``
(the default) uses exactly this rule, λ = 15,000 · d_mlp / 16,384; pass a number to override it.

Pieces for the methods that extend MEMIT (AlphaEdit, ...): :func:`memit_targets` (step 1),
:func:`layer_walk` (step 2, with the per-layer solve passed in) and :func:`check_conflicts`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from locate import capture_at, resolve_layers
from locate.errors import EditFailedError, InvalidHparamsError, SingularStatisticsError

from ..context import subject_keys, subject_last_token, template_groups, templates_for
from ..edit import Edit, WeightDelta
from ..registry import Runtime, compute, register
from ..request import InvalidRequestError, Request
from ..stats import DEFAULT_N_TOKENS, stats_for
from ..vstar import optimize_targets

PAPER_LAMBDA = 15_000.0  # MEMIT's mom2_update_weight for GPT-J ...
PAPER_D_MLP = 16_384  # ... whose MLP is this wide


class ConflictingRequestsError(InvalidRequestError):
    """Two requests render the same prompt text but ask for different targets."""


@dataclass
class WindowHparams:
    """What MEMIT and the methods built on its two steps share: the critical window, the statistics,
    the templates and the z optimisation (step 1, :func:`edit.vstar.optimize_targets`, the ``v_*``)."""

    layers: Any = "auto"  # layer spec (locate.resolve_layers); "auto" = the n_layers window of largest MLP effect
    n_layers: int = 5  # size of the critical window when layers is "auto", a trace or a profile (paper: 5-6)
    chunk_size: int = 16  # requests per batched z optimisation (keys and h^L go 4× wider: no logits there)
    stats_tokens: int = DEFAULT_N_TOKENS  # corpus tokens for each C_l (edit.stats)
    # context templates: MEMIT's code uses "{}" plus 5 sampled prefixes of 10 tokens (ROME used 20)
    template_lengths: tuple = ((10, 5),)
    # step 1, z optimisation (edit.vstar.VStarHparams; None = its ROME default). MEMIT's GPT-J setting
    # clamps ‖δ‖ to 0.75‖h‖ (the residual stream is much larger than an MLP output, ROME's site).
    v_steps: int | None = None  # Adam steps (None: 20)
    v_lr: float | None = None  # learning rate (None: 0.5)
    v_weight_decay: float | None = None  # weight of ‖δ‖/‖h₀‖² (None: 0.5)
    v_stop_loss: float | None = None  # early-stop loss (None: 5e-2)
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor · ‖h₀‖
    kl_factor: float | None = None  # essence-drift KL weight (None: 0.0625)
    kl_position: str | None = None  # where the KL is read (None: the subject's last token, as the reference)
    # k_i^l: "grouped" averages the keys within each template group ("{}", then each sampled length) and then
    # across groups, as memit/compute_ks.py does (the bare prompt weighs 1/2); "uniform" averages all templates
    # alike, the plain reading of eq. 19 (the bare prompt weighs 1/6)
    key_average: str = "grouped"

    def __post_init__(self):
        if self.chunk_size < 1:
            raise InvalidHparamsError("chunk_size must be at least 1")
        if self.key_average not in ("grouped", "uniform"):
            raise InvalidHparamsError(f"key_average must be 'grouped' or 'uniform', got {self.key_average!r}")
        self.template_lengths = tuple(tuple(x) for x in self.template_lengths)

    def vstar_kwargs(self) -> dict:
        names = {"v_steps": "steps", "v_lr": "lr", "v_weight_decay": "weight_decay", "v_stop_loss": "stop_loss",
                 "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor", "kl_position": "kl_position"}
        return {v: getattr(self, k) for k, v in names.items() if getattr(self, k) is not None}


@dataclass
class MEMITHparams(WindowHparams):
    """MEMIT hyperparameters (the paper's GPT-J settings, scaled as the module docstring says)."""

    mom2_update_weight: float | None = None  # λ; None = 15,000 · d_mlp / 16,384 (see the module docstring)

    def __post_init__(self):
        super().__post_init__()
        if self.mom2_update_weight is not None and self.mom2_update_weight < 0:
            raise InvalidHparamsError(f"mom2_update_weight must be non-negative, got {self.mom2_update_weight}")

    def lam(self, d_mlp: int) -> float:
        if self.mom2_update_weight is not None:
            return float(self.mom2_update_weight)
        return PAPER_LAMBDA * d_mlp / PAPER_D_MLP


# --------------------------------------------------------------------------- the update (eq. 14)
def layer_update(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ = Rᵀ K (λ C + Kᵀ K)⁻¹ as factors ``(left, right)`` with Δ = left @ right.

    ``K``: (B, d_mlp) new keys, ``R``: (B, d_model) residuals, ``C``: (d_mlp, d_mlp) = E[k kᵀ].
    Minimises λ·tr(Δ C Δᵀ) + ‖Δ Kᵀ − Rᵀ‖²_F. Computed in float64 with one Cholesky factorisation of
    A = λ C + Kᵀ K and a triangular solve for X = A⁻¹ Kᵀ; returns (Rᵀ, Xᵀ), shapes (d_model, B), (B, d_mlp).
    """
    K, R, C = K.double(), R.double(), C.double().to(K.device)
    A = lam * C + K.T @ K  # (d_mlp, d_mlp), SPD when C is (or when λ = 0 and K has full column rank)
    Lc, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise SingularStatisticsError(
            f"λC + KᵀK is not positive definite (Cholesky failed at column {int(info)}); "
            "the key statistics are degenerate: recompute them with more corpus tokens")
    X = torch.cholesky_solve(K.T, Lc)  # (d_mlp, B) = A⁻¹ Kᵀ
    return R.T.contiguous(), X.T.contiguous()


def _delta(layer: int, left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> WeightDelta:
    """The exact rank-B factors when they are smaller than the dense matrix."""
    (d_out, b), d_in = left.shape, right.shape[1]
    if b * (d_out + d_in) < d_out * d_in:
        return WeightDelta(layer, left=left.to(dtype), right=right.to(dtype))
    return WeightDelta(layer, dense=(left @ right).to(dtype))


def delta_factors(layer: int, left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> WeightDelta:
    """The exact rank-B factors when they are smaller than the dense matrix."""
    (d_out, b), d_in = left.shape, right.shape[1]
    if b * (d_out + d_in) < d_out * d_in:
        return WeightDelta(layer, left=left.to(dtype), right=right.to(dtype))
    return WeightDelta(layer, dense=(left @ right).to(dtype))


# --------------------------------------------------------------------------- inputs
def _prompt_text(r: Request) -> str:
    """The text the model reads for ``r``: its rendered prompt, whitespace runs collapsed and the ends
    stripped, so "The {}" + "Eiffel Tower" and "{}" + "The Eiffel Tower" are the same prompt."""
    return " ".join(r.rendered.split())


def check_conflicts(requests: Sequence[Request], lm) -> list[Request]:
    """Refuse two requests that render the same prompt text (whatever part of it each calls the subject,
    and up to whitespace) but ask for different targets; drop exact repeats (same text, same target).

    Comparing ``(prompt, subject)`` pairs instead would let ``("The {} is in", "Eiffel Tower", " Rome")``
    and ``("{} is in", "The Eiffel Tower", " Paris")`` into one edit: both ask the model to continue the
    same words, and the least-squares update of eq. 14 would split the difference between them."""
    by_text: dict[str, list[Request]] = defaultdict(list)
    unique: list[Request] = []
    for r in requests:
        same = by_text[_prompt_text(r)]
        if any(o.target_new == r.target_new for o in same):
            continue
        same.append(r)
        unique.append(r)
    conflicts = [v for v in by_text.values() if len(v) > 1]
    if conflicts:
        lines = [f"  {v[0].rendered!r} -> " + " vs ".join(repr(o.target_new) for o in v) for v in conflicts[:10]]
        more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise ConflictingRequestsError(
            f"{len(conflicts)} prompt(s) are asked for two or more different targets:\n" + "\n".join(lines) + more)
    return unique


def chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i: i + n]


def subject_states(lm, requests: Sequence[Request], hook: str, *, chunk_size: int = 32) -> torch.Tensor:
    """The activation at ``hook`` at each rendered prompt's last subject token, (B, d_model), float64."""
    out = []
    for chunk in chunks(list(requests), chunk_size):
        rows, pos = zip(*(subject_last_token(lm, "{}", r) for r in chunk))
        out.append(capture_at(lm, rows, pos, hook).double())
    return torch.cat(out)


def subject_residuals(lm, requests: Sequence[Request], layer: int, *, chunk_size: int = 32) -> torch.Tensor:
    """h^layer: the block output at each rendered prompt's last subject token, (B, d_model), float64."""
    return subject_states(lm, requests, lm.hook_resid(layer), chunk_size=chunk_size)


# --------------------------------------------------------------------------- the two steps
def memit_targets(lm, requests: Sequence[Request], L: int, templates: Sequence[str], hp: WindowHparams,
                  rt: Runtime) -> tuple[torch.Tensor, list, list[float]]:
    """Step 1 (eq. 16): the target block-L outputs z_i, (B, d_model) float64, optimised chunk by chunk
    (independent δ's, summed losses); also the loss trace per chunk and each request's final loss."""
    zs, loss_trace, final_losses = [], [], []
    for chunk in tqdm(list(chunks(list(requests), hp.chunk_size)), desc=f"z at layer {L}", unit="chunk",
                      disable=not rt.progress or len(requests) <= hp.chunk_size):
        tv = optimize_targets(lm, chunk, L, site="resid", templates=templates, **hp.vstar_kwargs())
        zs.append(tv.target.detach().double())
        loss_trace.append(tv.loss_trace)  # per chunk: per step, the per-request losses
        final_losses += tv.final_loss
    z = torch.cat(zs)
    if not torch.isfinite(z).all():
        raise EditFailedError("the z optimisation produced non-finite targets; the model was not changed")
    return z, loss_trace, final_losses


Solve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def layer_walk(lm, requests: Sequence[Request], layers: Sequence[int], z: torch.Tensor, templates: Sequence[str],
               solve: Solve, *, chunk_size: int = 16, rt: Runtime | None = None,
               key_groups: Sequence[int] | None = None) -> tuple[list[WeightDelta], list[dict], dict]:
    """Step 2 (Alg. 1, lines 7-14): for l = l_1 .. L, on the model carrying the updates so far, the keys
    K_l (eq. 19) and residuals R_l = (z − h^L)/(L − l + 1) (eq. 20), then ``solve(l, K, R) -> (left,
    right)`` with Δ_l = left @ right, added to W_l. Returns the deltas, a record per layer and the keys
    ``{layer: K_l}``. ``key_groups``: how K_l averages the templates (:func:`edit.context.subject_keys`).
    The model's weights are restored on the way out, success or failure."""
    rt = rt or Runtime()
    L = layers[-1]
    backup = {l: lm.mlp_out_weight(l).clone() for l in layers}
    deltas: list[WeightDelta] = []
    per_layer: list[dict] = []
    keys: dict[int, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for i, l in enumerate(tqdm(layers, desc="layers", unit="layer", disable=not rt.progress)):
                h = subject_residuals(lm, requests, L, chunk_size=4 * chunk_size)
                R = (z - h) / (len(layers) - i)  # eq. 20: this layer's share of what is still missing
                K = torch.cat([subject_keys(lm, c, l, templates, key_groups).double()
                               for c in chunks(list(requests), 4 * chunk_size)])  # eq. 19
                left, right = solve(l, K, R)
                d = delta_factors(l, left, right, lm.dtype)
                M = d.matrix()
                if not torch.isfinite(M).all():
                    raise EditFailedError(f"the update at layer {l} is not finite in {lm.dtype}")
                W = lm.mlp_out_weight(l)
                W.add_(M.to(device=W.device, dtype=W.dtype))
                deltas.append(d)
                keys[l] = K
                rec = {"layer": l, "residual_norm": float(R.norm(dim=1).mean()),
                       "key_norm": float(K.norm(dim=1).mean()), "delta_norm": float(M.double().norm())}
                per_layer.append(rec)
                if rt.callback is not None:
                    rt.callback(rec)
    finally:
        for l, w in backup.items():
            lm.mlp_out_weight(l).copy_(w)
    return deltas, per_layer, keys


def two_steps(lm, requests: Sequence[Request], layers: Sequence[int], hp: WindowHparams, rt: Runtime, solve: Solve,
              timings: dict) -> tuple[list[WeightDelta], list[dict], dict, list, list[float]]:
    """Step 1 (z at the last critical layer) then step 2 (the layer walk with ``solve``), timed into
    ``timings``: what MEMIT and the methods that change only its per-layer solve share."""
    templates = templates_for(lm, rt, hp.template_lengths)
    t1 = time.perf_counter()
    z, loss_trace, final_losses = memit_targets(lm, requests, layers[-1], templates, hp, rt)
    timings["z_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    groups = template_groups(hp.template_lengths) if hp.key_average == "grouped" else None
    deltas, per_layer, keys = layer_walk(lm, requests, layers, z, templates, solve, chunk_size=hp.chunk_size, rt=rt,
                                         key_groups=groups)
    timings["update_s"] = time.perf_counter() - t2
    return deltas, per_layer, keys, loss_trace, final_losses


# --------------------------------------------------------------------------- MEMIT
@register("memit", MEMITHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 2},
          description="MEMIT: many facts at once over a window of MLP layers (Meng et al. 2023)")
def compute_memit(lm, requests: list[Request], hp: MEMITHparams, rt: Runtime) -> Edit:
    """The MEMIT edit writing all ``requests`` into the critical layers (not applied). The model's
    weights are identical before and after the call, also when it fails midway."""
    t0 = time.perf_counter()
    requests = check_conflicts(requests, lm)
    layers, reason = resolve_layers(lm, hp.layers, hp.n_layers)
    lam = hp.lam(lm.d_mlp)
    stats = stats_for(lm, layers, rt, n_tokens=hp.stats_tokens)
    timings = {"stats_s": time.perf_counter() - t0}
    deltas, per_layer, _, loss_trace, final_losses = two_steps(
        lm, requests, layers, hp, rt, lambda l, K, R: layer_update(K, R, stats[l].C, lam), timings)  # eq. 14
    timings["total_s"] = time.perf_counter() - t0
    record = {**asdict(hp), "lambda_": lam, "layers": layers,
              "stats_source": {l: stats[l].source for l in layers}, "stats_n_tokens": {l: stats[l].n_tokens for l in layers}}
    return Edit("memit", requests, deltas, lm.fingerprint, model_name=lm.name, layer_reason=reason,
                hparams=record, timings=timings, loss_trace=loss_trace,
                metrics={"final_loss": final_losses, "per_layer": per_layer})


def memit(requests: Request | Sequence[Request], *, model=None, layers="auto", stats: dict | None = None, corpus=None,
          progress: bool = False, callback: Callable[[dict], None] | None = None, **hparams) -> Edit:
    """Compute the MEMIT edit writing all ``requests`` (returns an unapplied :class:`Edit`).

    ``layers``: a layer spec (``"auto"``, a list, a trace, a profile). ``stats``: ``{layer: KeyStats}``
    (computed over ``corpus`` and cached when missing). Other keyword arguments are
    :class:`MEMITHparams`. ``callback(record)`` is called after each layer of the walk."""
    rt = Runtime(corpus=corpus, stats=stats, progress=progress, callback=callback)
    return compute("memit", requests, model=model, runtime=rt, layers=layers, **hparams)
