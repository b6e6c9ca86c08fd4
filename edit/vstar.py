"""The target vector v* (ROME §3.1 "choosing v*", eq. 4; MEMIT §4.2 eq. 16), batched over requests.

For each request i we look for a vector δ_i that, added to the hidden state at one *site* at the
subject's last token, makes the model say the new target:

    δ_i = argmin_δ  1/N Σ_j −log P[o* | x_j + p_i ; h += δ]                 (target NLL, teacher forced)
                   + λ_KL · D_KL( P[· | p'_i ; h += δ] ‖ P[· | p'_i] )      (essence drift, p' = "{s} is a")
                   + λ_wd · ‖δ‖ / ‖h_0‖²                                     (weight decay)
    subject to ‖δ‖ ≤ c · ‖h_0‖                                               (norm clamp)

where x_j are the context templates, h_0 is the current value at the site at the subject's last token
of the un-prefixed prompt, and the NLL of a multi-token target is the mean of its tokens' NLLs with the
earlier target tokens given (teacher forcing). The target value is then v*_i = h_0,i + δ_i.

The essence-drift term follows the reference code (``rome/compute_v.py``, ``memit/compute_z.py``) on
both of its choices: the divergence is KL(edited ‖ original), the order of ROME eq. 4, and the two
distributions are read at the *subject's last token* of p' (where δ is added), not after the whole of
"{s} is a". ``kl_position="prompt_last"`` reads them after "is a" instead, as eq. 4's notation
P[x | p'] suggests; the order is not an option (the reverse order was a bug of this toolkit's own).

Sites: ``"mlp_out"`` (the MLP output of layer l, ROME) or ``"resid"`` (the residual stream after
block L, MEMIT). Requests are independent: each has its own δ_i, the loss is the sum of the
per-request losses (so the gradients do not mix) and all prompts of all requests go through the
model in one batched forward per step. Optimisation is Adam; a request whose loss falls below
``stop_loss`` is frozen (early stop) and the loop ends when all are. Defaults follow the ROME paper's
GPT-2-XL/GPT-J settings (20 steps, lr 0.5, λ_KL 0.0625, λ_wd 0.5, clamp factor 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from locate import resolve_model
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError

from ._prefix import split_rows, suffix_hidden
from .context import capture_at, subject_last_token
from .request import Request

KL_PROMPT = "{} is a"


@dataclass
class VStarHparams:
    """Hyper-parameters of the v* optimisation (ROME defaults)."""

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_loss: float = 5e-2
    kl_position: str = "subject_last"  # where the KL distributions are read: reference "subject_last" | "prompt_last"


@dataclass
class TargetVectors:
    """Result of :func:`optimize_targets`, one row per request.

    ``delta`` (B, d_model): the optimised δ; ``target`` (B, d_model): v* = h_0 + δ with h_0 the current
    value at the site; ``loss_trace``: per step, the list of per-request total losses;
    ``final_loss``/``final_nll``: per request, at the last evaluated step; ``steps``: steps evaluated."""

    delta: torch.Tensor
    target: torch.Tensor
    initial: torch.Tensor
    loss_trace: list[list[float]] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)
    final_nll: list[float] = field(default_factory=list)
    steps: int = 0
    site: str = "mlp_out"
    layer: int = 0


def _site_hook(lm, site: str, layer: int) -> str:
    if site == "mlp_out":
        return lm.hook_mlp_out(layer)
    if site == "resid":
        return lm.hook_resid(layer)
    raise InvalidArgumentError(f"site must be 'mlp_out' or 'resid', got {site!r}")


def optimize_targets(model, requests: Sequence[Request], layer: int, *, site: str = "mlp_out",
                     templates: Sequence[str], hparams: VStarHparams | None = None, progress: bool = False,
                     **overrides) -> TargetVectors:
    """Optimise one δ per request at ``site`` of ``layer`` (see the module docstring).
    Keyword ``overrides`` set fields of :class:`VStarHparams`. The model's weights are not touched."""
    lm = resolve_model(model)
    hp = hparams or VStarHparams()
    if overrides:
        hp = VStarHparams(**{**hp.__dict__, **overrides})
    hook_name = _site_hook(lm, site, layer)
    requests = list(requests)
    if not requests:
        raise InvalidArgumentError("no requests")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise InvalidArgumentError("every context template must contain exactly one '{}'")
    if hp.kl_position not in ("subject_last", "prompt_last"):
        raise InvalidHparamsError(f"kl_position must be 'subject_last' or 'prompt_last', got {hp.kl_position!r}")
    B, T = len(requests), len(templates)

    # ---- the prompts: B*T rewrite rows (template + prompt + target[:-1]), then B essence rows
    rows, sub_pos, owner, tgt = [], [], [], []  # tgt: (row, first predicting position, target ids)
    bare_rows, bare_pos = [], []
    for i, r in enumerate(requests):
        r.check(lm)
        for t in templates:
            ids, s = subject_last_token(lm, t, r)
            target = lm.target_ids(r.target_new, t.replace("{}", r.rendered))
            tgt.append((len(rows), len(ids) - 1, target))
            rows.append(ids + target[:-1])
            sub_pos.append(s)
            owner.append(i)
        ids, s = subject_last_token(lm, "{}", r)
        bare_rows.append(ids)
        bare_pos.append(s)
    n_rewrite = len(rows)
    for i, r in enumerate(requests):
        essence = Request(KL_PROMPT, r.subject, r.target_new)
        ids, s = subject_last_token(lm, "{}", essence)
        rows.append(ids)
        sub_pos.append(s)
        owner.append(i)
    dev = lm.device
    # δ only acts from the subject's last token on: everything before it is run once and cached
    # (edit._prefix), and each step runs the rows from that token onwards (δ sits at local position 0)
    sb = split_rows(lm, rows, sub_pos)
    owner_idx = torch.as_tensor(owner, device=dev)
    kl_rows = torch.arange(n_rewrite, len(rows), device=dev)
    kl_read = sub_pos[n_rewrite:] if hp.kl_position == "subject_last" else [len(r) - 1 for r in rows[n_rewrite:]]
    kl_last = torch.as_tensor(kl_read, device=dev)

    # target token log-prob gather indices, and each rewrite row's token count
    g_row, g_pos, g_tok, g_owner, g_w = [], [], [], [], []
    for (row, p0, target) in tgt:
        for j, tok in enumerate(target):
            g_row.append(row)
            g_pos.append(p0 + j)
            g_tok.append(tok)
            g_owner.append(owner[row])
            g_w.append(1.0 / (len(target) * T))  # mean over target tokens, then over templates
    g_row, g_pos, g_tok, g_owner = (torch.as_tensor(x, device=dev) for x in (g_row, g_pos, g_tok, g_owner))
    g_w = torch.as_tensor(g_w, device=dev, dtype=torch.float32)
    sel_rows = torch.cat([g_row, kl_rows])  # the scored positions, local to each row's suffix
    sel_pos = sb.local(sel_rows, torch.cat([g_pos, kl_last]))

    # ---- h_0: the current value at the site, subject's last token of the un-prefixed prompt
    h0 = capture_at(lm, bare_rows, bare_pos, hook_name).float()
    h0_norm = h0.norm(dim=-1).clamp_min(1e-12)
    max_norm = hp.clamp_norm_factor * h0_norm

    delta = torch.zeros(B, lm.d_model, device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)

    def add_delta(x, hook):
        first = x[:, 0] + delta[owner_idx].to(x.dtype)
        return torch.cat([first[:, None], x[:, 1:]], 1)

    done = torch.zeros(B, dtype=torch.bool, device=dev)
    init_kl = None
    trace: list[list[float]] = []
    loss = nll = None
    bar = tqdm(range(hp.steps), desc=f"v* ({site} of layer {layer}, {B} request{'s' * (B > 1)})",
               disable=not progress, leave=False)
    with lm.eval_mode():
        for step in bar:
            opt.zero_grad()
            h = suffix_hidden(lm, sb, [(hook_name, add_delta)])
            logits = lm.bridge.unembed(h[sel_rows, sel_pos][None])[0].float()
            logp = logits[: len(g_row)].log_softmax(-1).gather(-1, g_tok[:, None]).squeeze(-1)
            nll = torch.zeros(B, device=dev).index_add(0, g_owner, -logp * g_w)
            kl_logp = logits[len(g_row):].log_softmax(-1)
            if init_kl is None:
                init_kl = kl_logp.detach().clone()
            # D_KL(P_edited ‖ P_original) = Σ_x P_edited(x) (log P_edited(x) − log P_original(x))
            kl = (kl_logp.exp() * (kl_logp - init_kl)).sum(-1)
            wd = hp.weight_decay * delta.norm(dim=-1) / h0_norm ** 2
            loss = nll + hp.kl_factor * kl + wd
            if not torch.isfinite(loss).all():
                raise EditFailedError(f"v* optimisation diverged at step {step}: loss {loss.tolist()}")
            trace.append([float(x) for x in loss.detach()])
            bar.set_postfix(loss=f"{float(loss.detach().sum()):.3f}")
            done |= loss.detach() < hp.stop_loss
            if bool(done.all()) or step == hp.steps - 1:
                break
            loss[~done].sum().backward()
            frozen = delta.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                delta[done] = frozen  # early-stopped requests keep their δ (Adam momentum would move it)
                norms = delta.norm(dim=-1, keepdim=True)
                delta.mul_(torch.where(norms > max_norm[:, None], max_norm[:, None] / norms, torch.ones_like(norms)))
    d = delta.detach()
    return TargetVectors(delta=d, target=h0 + d, initial=h0, loss_trace=trace,
                         final_loss=[float(x) for x in loss.detach()], final_nll=[float(x) for x in nll.detach()],
                         steps=len(trace), site=site, layer=layer)
