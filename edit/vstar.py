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

Sites: ``"mlp_out"`` (the MLP output of layer l, ROME), ``"resid"`` (the residual stream after
block L, MEMIT) or ``"attn_out"`` (the attention output of block l). Requests are independent: each has its own δ_i, the loss is the sum of the
per-request losses (so the gradients do not mix) and all prompts of all requests go through the
model in one batched forward per step. Optimisation is Adam; a request whose loss falls below
``stop_loss`` is frozen (early stop) and the loop ends when all are. Defaults follow the ROME paper's
GPT-2-XL/GPT-J settings (20 steps, lr 0.5, λ_KL 0.0625, λ_wd 0.5, clamp factor 4).

Three general extensions, each off by default (then the numbers are exactly those above):

* ``joint_sites``: further sites of the same layer, each with its own δ_i^(site), optimised jointly
  with the main one (PMET optimises the attention and the MLP output together). Each δ has its own
  weight decay λ_wd ‖δ^(site)‖ / ‖h_0^(site)‖² (summed into the loss) and its own clamp
  ‖δ^(site)‖ ≤ c ‖h_0^(site)‖; the result's ``joint`` holds their δ, v* and h_0.
* ``top1_nll_factor`` / ``top1_stop_kl`` (PMET's reference code): once the target is the top-1 token
  at every target position of every prompt of a request, the next step weighs that request's NLL by
  ``top1_nll_factor`` (else by 1), and the request stops if its weighted KL term is ≤ ``top1_stop_kl``.
* ``extra``: an :class:`ExtraObjective`, a further per-request term read at the final hidden state
  (the unembedding's input) of extra prompts that carry the same δ at their subject's last token
  (BIRD's bidirectional term). It is added to the loss that is minimised, but the early-stop test
  reads the rest of the loss, as BIRD's reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

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
    top1_nll_factor: float = 1.0  # NLL weight for the next step once the target is top-1 everywhere (1: off; PMET 0.1)
    top1_stop_kl: float | None = None  # then stop once the weighted KL term is at most this (None: off; PMET 0.01)


@dataclass
class ExtraObjective:
    """A further term of the δ objective (module docstring), read at the model's final hidden state.

    ``rows``: token ids of extra prompts; ``positions``: in each row, the token where the δ of its
    ``owners`` request is added (the subject's last token), which is also where the final hidden state
    is read; ``loss(h)``: maps those final hidden states, (len(rows), d_model) float32, to one term per
    request, (B,), which is added to the loss."""

    rows: Sequence[Sequence[int]]
    positions: Sequence[int]
    owners: Sequence[int]
    loss: Callable[[torch.Tensor], torch.Tensor]


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
    joint: dict = field(default_factory=dict)  # joint site -> {"delta", "target", "initial"}, (B, d_model) each
    final_extra: list[float] = field(default_factory=list)  # per request, the extra objective's last value


def _site_hook(lm, site: str, layer: int) -> str:
    if site == "mlp_out":
        return lm.hook_mlp_out(layer)
    if site == "resid":
        return lm.hook_resid(layer)
    if site == "attn_out":
        return lm.hook_attn_out(layer)
    raise InvalidArgumentError(f"site must be 'mlp_out', 'resid' or 'attn_out', got {site!r}")


def optimize_targets(model, requests: Sequence[Request], layer: int, *, site: str = "mlp_out",
                     templates: Sequence[str], hparams: VStarHparams | None = None, progress: bool = False,
                     joint_sites: Sequence[str] = (), extra: ExtraObjective | None = None,
                     **overrides) -> TargetVectors:
    """Optimise one δ per request at ``site`` of ``layer`` (see the module docstring), jointly with one
    per request at each of ``joint_sites`` (same layer), with the ``extra`` term if given.
    Keyword ``overrides`` set fields of :class:`VStarHparams`. The model's weights are not touched."""
    lm = resolve_model(model)
    hp = hparams or VStarHparams()
    if overrides:
        hp = VStarHparams(**{**hp.__dict__, **overrides})
    sites = [site, *joint_sites]
    if len(set(sites)) != len(sites):
        raise InvalidArgumentError(f"each site may be optimised once, got {sites}")
    hook_names = [_site_hook(lm, s, layer) for s in sites]
    requests = list(requests)
    if not requests:
        raise InvalidArgumentError("no requests")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise InvalidArgumentError("every context template must contain exactly one '{}'")
    if hp.kl_position not in ("subject_last", "prompt_last"):
        raise InvalidHparamsError(f"kl_position must be 'subject_last' or 'prompt_last', got {hp.kl_position!r}")
    if hp.top1_nll_factor < 0 or (hp.top1_stop_kl is not None and hp.top1_stop_kl < 0):
        raise InvalidHparamsError("top1_nll_factor and top1_stop_kl must be non-negative")
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
    n_kl = len(rows)
    if extra is not None:
        if not (len(extra.rows) == len(extra.positions) == len(extra.owners)) or not len(extra.rows):
            raise InvalidArgumentError("the extra objective needs as many positions and owners as rows, and a row")
        if any(not 0 <= o < B for o in extra.owners):
            raise InvalidArgumentError(f"extra objective owners must be request indices below {B}")
        rows += [list(r) for r in extra.rows]
        sub_pos += list(extra.positions)
        owner += list(extra.owners)
    dev = lm.device
    # δ only acts from the subject's last token on: everything before it is run once and cached
    # (edit._prefix), and each step runs the rows from that token onwards (δ sits at local position 0)
    sb = split_rows(lm, rows, sub_pos)
    owner_idx = torch.as_tensor(owner, device=dev)
    kl_rows = torch.arange(n_rewrite, n_kl, device=dev)
    kl_read = sub_pos[n_rewrite:n_kl] if hp.kl_position == "subject_last" else [len(r) - 1 for r in rows[n_rewrite:n_kl]]
    extra_rows = torch.arange(n_kl, len(rows), device=dev)  # read at suffix-local 0, where δ is added
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
    # (one h_0, clamp radius and δ per site; the main site first)
    h0s = [capture_at(lm, bare_rows, bare_pos, hn).float() for hn in hook_names]
    h0_norms = [h.norm(dim=-1).clamp_min(1e-12) for h in h0s]
    max_norms = [hp.clamp_norm_factor * n for n in h0_norms]
    deltas = [torch.zeros(B, lm.d_model, device=dev, dtype=torch.float32, requires_grad=True) for _ in sites]
    opt = torch.optim.Adam(deltas, lr=hp.lr)

    def adder(d):
        def add_delta(x, hook):
            first = x[:, 0] + d[owner_idx].to(x.dtype)
            return torch.cat([first[:, None], x[:, 1:]], 1)
        return add_delta
    hooks = [(hn, adder(d)) for hn, d in zip(hook_names, deltas)]
    top1_rule = hp.top1_nll_factor != 1.0 or hp.top1_stop_kl is not None
    nll_weight = torch.ones(B, device=dev)

    done = torch.zeros(B, dtype=torch.bool, device=dev)
    init_kl = None
    trace: list[list[float]] = []
    loss = nll = extra_term = None
    bar = tqdm(range(hp.steps), desc=f"v* ({site} of layer {layer}, {B} request{'s' * (B > 1)})",
               disable=not progress, leave=False)
    with lm.eval_mode():
        for step in bar:
            opt.zero_grad()
            h = suffix_hidden(lm, sb, hooks)
            logits = lm.bridge.unembed(h[sel_rows, sel_pos][None])[0].float().to(dev)  # lm_head may sit on another device
            target_logits = logits[: len(g_row)]
            logp = target_logits.log_softmax(-1).gather(-1, g_tok[:, None]).squeeze(-1)
            nll = torch.zeros(B, device=dev).index_add(0, g_owner, -logp * g_w)
            kl_logp = logits[len(g_row):].log_softmax(-1)
            if init_kl is None:
                init_kl = kl_logp.detach().clone()
            # D_KL(P_edited ‖ P_original) = Σ_x P_edited(x) (log P_edited(x) − log P_original(x))
            kl = (kl_logp.exp() * (kl_logp - init_kl)).sum(-1)
            wd = sum(hp.weight_decay * d.norm(dim=-1) / n ** 2 for d, n in zip(deltas, h0_norms))
            loss = (nll_weight * nll if top1_rule else nll) + hp.kl_factor * kl + wd
            if extra is not None:  # read at the extra rows' δ position, the final hidden state
                extra_term = extra.loss(h[extra_rows, 0].float())
                stop_part, loss = loss.detach(), loss + extra_term
            else:
                stop_part = loss.detach()
            if not torch.isfinite(loss).all():
                raise EditFailedError(f"v* optimisation diverged at step {step}: loss {loss.tolist()}")
            trace.append([float(x) for x in loss.detach()])
            bar.set_postfix(loss=f"{float(loss.detach().sum()):.3f}")
            done |= stop_part < hp.stop_loss
            if top1_rule:  # the target is the argmax at every position of every prompt of the request
                wrong = (target_logits.detach().argmax(-1) != g_tok).float()
                top1 = torch.zeros(B, device=dev).index_add(0, g_owner, wrong) == 0
                if hp.top1_stop_kl is not None:
                    done |= top1 & (hp.kl_factor * kl.detach() <= hp.top1_stop_kl)
                nll_weight = torch.where(top1, hp.top1_nll_factor, 1.0).to(dev)  # for the next step
            if bool(done.all()) or step == hp.steps - 1:
                break
            loss[~done].sum().backward()
            frozen = [d.detach()[done].clone() for d in deltas]
            opt.step()
            with torch.no_grad():
                for d, keep, max_norm in zip(deltas, frozen, max_norms):
                    d[done] = keep  # early-stopped requests keep their δ (Adam momentum would move it)
                    norms = d.norm(dim=-1, keepdim=True)
                    d.mul_(torch.where(norms > max_norm[:, None], max_norm[:, None] / norms, torch.ones_like(norms)))
    ds = [d.detach() for d in deltas]
    joint = {s: {"delta": d, "target": h0 + d, "initial": h0} for s, d, h0 in zip(sites[1:], ds[1:], h0s[1:])}
    return TargetVectors(delta=ds[0], target=h0s[0] + ds[0], initial=h0s[0], loss_trace=trace,
                         final_loss=[float(x) for x in loss.detach()], final_nll=[float(x) for x in nll.detach()],
                         steps=len(trace), site=site, layer=layer, joint=joint,
                         final_extra=[] if extra_term is None else [float(x) for x in extra_term.detach()])
