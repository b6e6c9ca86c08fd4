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
        K_l         the MLP keys k_i^l at the subject's last token, averaged over context templates (eq. 19)
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
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from locate import resolve_model
from locate.causal_trace import CausalTrace
from locate.errors import EditFailedError, FingerprintMismatchError, SingularStatisticsError

from .edit import Edit, WeightDelta
from .request import InvalidRequestError, Request

PAPER_LAMBDA = 15_000.0  # MEMIT's mom2_update_weight for GPT-J ...
PAPER_D_MLP = 16_384  # ... whose MLP is this wide


class ConflictingRequestsError(InvalidRequestError):
    """Two requests ask the same subject and prompt for different targets."""


@dataclass
class MEMITHparams:
    """MEMIT hyperparameters. The ``v_*`` ones configure the z optimisation (step 1) and are passed to
    :func:`edit.vstar.optimize_targets`; the rest are MEMIT's own."""

    n_layers: int = 5  # size of the critical window when layers="auto" (the paper: 5-6 layers on GPT-J)
    mom2_update_weight: float | None = None  # λ; None = 15,000 · d_mlp / 16,384 (see the module docstring)
    chunk_size: int = 16  # requests per batched z optimisation (keys and h^L go 4× wider: no logits there)
    # statistics (used when ``stats`` is not given)
    corpus: Any = None
    n_tokens: int | None = None
    # context templates: MEMIT's code uses "{}" plus 5 sampled prefixes of 10 tokens (ROME used 20)
    template_lengths: tuple = ((10, 5),)
    # step 1, z optimisation (edit.vstar.VStarHparams; None = its ROME default). MEMIT's GPT-J setting
    # clamps ‖δ‖ to 0.75‖h‖ (the residual stream is much larger than an MLP output, ROME's site).
    v_steps: int | None = None
    v_lr: float | None = None
    v_weight_decay: float | None = None
    v_stop_loss: float | None = None
    clamp_norm_factor: float = 0.75
    kl_factor: float | None = None
    seed: int = 0
    progress: bool = True

    def lam(self, d_mlp: int) -> float:
        if self.mom2_update_weight is not None:
            return float(self.mom2_update_weight)
        return PAPER_LAMBDA * d_mlp / PAPER_D_MLP

    @classmethod
    def from_kwargs(cls, **kw) -> "MEMITHparams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown MEMIT hyperparameter(s) {unknown}; known: {sorted(names)}")
        return cls(**kw)

    def vstar_kwargs(self) -> dict:
        names = {"v_steps": "steps", "v_lr": "lr", "v_weight_decay": "weight_decay", "v_stop_loss": "stop_loss",
                 "clamp_norm_factor": "clamp_norm_factor", "kl_factor": "kl_factor"}
        return {v: getattr(self, k) for k, v in names.items() if getattr(self, k) is not None}


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


# --------------------------------------------------------------------------- inputs
def check_requests(requests: Request | Sequence[Request], lm) -> list[Request]:
    """Validate every request (before anything touches the model), refuse conflicts, drop exact repeats."""
    if isinstance(requests, Request):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("no requests given")
    by_key: dict[tuple[str, str], list[Request]] = defaultdict(list)
    unique: list[Request] = []
    for r in requests:
        if not isinstance(r, Request):
            raise InvalidRequestError(f"expected edit.Request, got {type(r).__name__}: {r!r}")
        r.check(lm)
        same = by_key[(r.prompt, r.subject)]
        if any(o.target_new == r.target_new for o in same):
            continue
        same.append(r)
        unique.append(r)
    conflicts = [v for v in by_key.values() if len(v) > 1]
    if conflicts:
        lines = [f"  {v[0].rendered!r} -> " + " vs ".join(repr(o.target_new) for o in v) for v in conflicts[:10]]
        more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
        raise ConflictingRequestsError(
            f"{len(conflicts)} subject/prompt pair(s) are asked for two or more different targets:\n"
            + "\n".join(lines) + more)
    return unique


def resolve_layers(lm, layers, n_layers: int = 5) -> tuple[list[int], str]:
    """The critical layers and a sentence saying why: an explicit list, ``"auto"`` (the window of
    highest MLP indirect effect at the last subject token, from the tracing calibration), or a
    causal-tracing result / layer profile with a ``window(k)`` method."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (list, tuple, range)):
        out = [lm.check_layer(l) for l in layers]
        if not out:
            raise ValueError("layers is empty")
        if len(set(out)) != len(out):
            raise ValueError(f"layers {out} has repeats")
        return sorted(out), f"layers {sorted(out)} given explicitly"
    from locate.calibration import LayerProfile, layer_profile

    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layers must be 'auto', a list of ints or a causal trace, not {layers!r}")
        profile, where = layer_profile(lm), "the calibration facts"
    elif isinstance(layers, LayerProfile):
        profile, where = layers, "the given layer profile"
    elif isinstance(layers, CausalTrace):  # its MLP row at the last subject token
        profile = LayerProfile(aie=layers.ie("mlp")[layers.token_index("last_subject")], n_facts=1, source="trace")
        where = "the given trace"
    else:
        raise TypeError(f"layers must be 'auto', a list of ints, a LayerProfile or a CausalTrace, not {type(layers).__name__}")
    out = [lm.check_layer(int(l)) for l in profile.window(n_layers)]
    return out, (f"layers {out}: the {n_layers} contiguous layers with the largest MLP indirect effect at the last "
                 f"subject token, from {where}")


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i: i + n]


def subject_residuals(lm, requests: Sequence[Request], layer: int, *, chunk_size: int = 32) -> torch.Tensor:
    """h^layer: the block output at each rendered prompt's last subject token, (B, d_model), float64."""
    from .context import capture_at, subject_last_token

    out = []
    for chunk in _chunks(list(requests), chunk_size):
        rows, pos = zip(*(subject_last_token(lm, "{}", r) for r in chunk))
        out.append(capture_at(lm, rows, pos, lm.hook_resid(layer)).double())
    return torch.cat(out)


# --------------------------------------------------------------------------- MEMIT
def memit(requests: Request | Sequence[Request], *, model=None, layers="auto", stats: dict | None = None,
          callback: Callable[[dict], None] | None = None, **hparams) -> Edit:
    """Compute the MEMIT edit writing all ``requests`` into the critical ``layers``; returns an
    :class:`Edit` that is NOT applied (``.apply()`` it, or use :func:`edit.applied`).

    ``layers``: ``"auto"`` (window of ``n_layers`` layers from the tracing calibration), a list of
    layer indices, or a causal trace / layer profile. ``stats``: ``{layer: KeyStats}`` from
    :func:`edit.stats.key_second_moments` (computed and cached when missing). Other keyword arguments
    are :class:`MEMITHparams`. The model's weights are identical before and after the call, also when
    it fails midway (the weights written during the layer walk are restored on any exception).
    """
    from .context import context_templates, subject_keys
    from .stats import key_second_moments
    from .vstar import optimize_targets

    t0 = time.perf_counter()
    lm = resolve_model(model)
    hp = MEMITHparams.from_kwargs(**hparams)
    if hp.chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    requests = check_requests(requests, lm)
    layers, reason = resolve_layers(lm, layers, hp.n_layers)
    lam = hp.lam(lm.d_mlp)
    if lam < 0:
        raise ValueError(f"mom2_update_weight must be non-negative, got {lam}")

    stats = dict(stats or {})
    for l, st in stats.items():
        if tuple(st.C.shape) != (lm.d_mlp, lm.d_mlp):
            raise FingerprintMismatchError(f"key statistics for layer {l} are {tuple(st.C.shape)}, the model's "
                                           f"keys are {lm.d_mlp} wide: they were made for another model")
    missing = [l for l in layers if l not in stats]
    timings: dict[str, float] = {}
    if missing:
        kw = {"corpus": hp.corpus}
        if hp.n_tokens is not None:
            kw["n_tokens"] = hp.n_tokens
        stats.update(key_second_moments(lm, missing, progress=hp.progress, **kw))
    timings["stats_s"] = time.perf_counter() - t0

    L = layers[-1]
    templates = context_templates(lm, seed=hp.seed, lengths=tuple(tuple(x) for x in hp.template_lengths))
    B = len(requests)

    # Step 1: target block-L outputs z_i, optimised chunk by chunk (independent δ's, summed losses).
    t1 = time.perf_counter()
    zs, loss_trace, final_losses = [], [], []
    for chunk in tqdm(list(_chunks(requests, hp.chunk_size)), desc=f"MEMIT z at layer {L}", unit="chunk",
                      disable=not hp.progress or B <= hp.chunk_size):
        tv = optimize_targets(lm, chunk, L, site="resid", templates=templates, **hp.vstar_kwargs())
        zs.append(tv.target.detach().double())
        loss_trace.append(tv.loss_trace)  # per chunk: per step, the per-request losses
        final_losses += tv.final_loss
    z = torch.cat(zs)
    if not torch.isfinite(z).all():
        raise EditFailedError("the z optimisation produced non-finite targets; the model was not changed")
    timings["z_s"] = time.perf_counter() - t1

    # Step 2: walk the critical layers, each on the model carrying the updates so far.
    t2 = time.perf_counter()
    backup = {l: lm.mlp_out_weight(l).clone() for l in layers}
    deltas: list[WeightDelta] = []
    per_layer: list[dict] = []
    try:
        with torch.no_grad():
            for i, l in enumerate(tqdm(layers, desc="MEMIT layers", unit="layer", disable=not hp.progress)):
                h = subject_residuals(lm, requests, L, chunk_size=4 * hp.chunk_size)
                R = (z - h) / (len(layers) - i)  # eq. 20: this layer's share of what is still missing
                K = torch.cat([subject_keys(lm, c, l, templates).double()
                               for c in _chunks(requests, 4 * hp.chunk_size)])  # eq. 19
                left, right = layer_update(K, R, stats[l].C, lam)  # eq. 14
                d = _delta(l, left, right, lm.dtype)
                M = d.matrix()
                if not torch.isfinite(M).all():
                    raise EditFailedError(f"the MEMIT update at layer {l} is not finite")
                W = lm.mlp_out_weight(l)
                W.add_(M.to(device=W.device, dtype=W.dtype))
                deltas.append(d)
                rec = {"layer": l, "residual_norm": float(R.norm(dim=1).mean()),
                       "key_norm": float(K.norm(dim=1).mean()), "delta_norm": float(M.double().norm())}
                per_layer.append(rec)
                if callback is not None:
                    callback(rec)
    finally:
        for l, w in backup.items():
            lm.mlp_out_weight(l).copy_(w)
    timings["update_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    hp_record = {k: v for k, v in asdict(hp).items() if k not in ("corpus", "progress")}
    hp_record.update(lambda_=lam, layers=layers, corpus=str(hp.corpus) if hp.corpus is not None else None,
                     stats_source={l: stats[l].source for l in layers},
                     stats_n_tokens={l: stats[l].n_tokens for l in layers})
    return Edit("memit", requests, deltas, lm.fingerprint, model_name=lm.name, layer_reason=reason,
                hparams=hp_record, timings=timings, loss_trace=loss_trace,
                metrics={"final_loss": final_losses, "per_layer": per_layer})


# --------------------------------------------------------------------------- command line
def load_requests(path) -> list[Request]:
    """Requests from a JSON file: a list of ``{"prompt": "{} is in", "subject": ..., "target_new": ...}``
    objects (``target_true`` optional), or CounterFact records (``requested_rewrite``)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"requests file not found: {path}")
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = [data]
    out = []
    for i, d in enumerate(data):
        if "requested_rewrite" in d:
            from .datasets import _counterfact_record

            out.append(_counterfact_record(d).request)
        elif {"prompt", "subject", "target_new"} <= set(d):
            t = d["target_new"]["str"] if isinstance(d["target_new"], dict) else d["target_new"]
            out.append(Request(d["prompt"], d["subject"], t if t.startswith(" ") else " " + t, d.get("target_true")))
        else:
            raise InvalidRequestError(f"{path}, item {i}: needs prompt, subject and target_new (or requested_rewrite)")
    return out


def cli_memit(args, lm) -> Edit:
    """The ``locate-edit edit --method memit --requests file.json`` branch (see :mod:`edit.cli`): compute
    the edit, print the rewrite prompts' top token before and after, save it with ``--save``."""
    from .cli import default_corpus

    if args.method != "memit":
        raise InvalidRequestError("--requests needs --method memit (ROME edits one fact per call)")
    requests = load_requests(args.requests)
    layers = args.layers or ("auto" if args.layer == "auto" else [args.layer])
    e = memit(requests, model=lm, layers=layers, corpus=args.corpus or default_corpus(),
              n_tokens=args.stats_tokens, progress=not args.quiet)
    print(f"MEMIT: {len(e.requests)} request(s) into layers {e.layers} ({e.layer_reason}); "
          f"λ = {e.hparams['lambda_']:.4g}; {e.timings['total_s']:.1f} s")
    before = [lm.predict(r.rendered, 1)[0].token for r in e.requests]
    e.apply(lm)
    try:
        after = [lm.predict(r.rendered, 1)[0].token for r in e.requests]
    finally:
        e.revert(lm)
    for r, b, a in zip(e.requests, before, after):
        print(f"  {r.rendered!r}: {b!r} -> {a!r}  (target {r.target_new!r})")
    if args.save:
        print(f"saved to {e.save(args.save)}")
    return e
