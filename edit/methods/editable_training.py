"""Editable Training (Sinitsin et al., ICLR 2020, "Editable Neural Networks"): meta-train the model so
that a few plain gradient steps make an edit without disturbing the rest of its behaviour.

Editable Training edits with a *trained* artefact (see :mod:`edit.training`: train it first with
``locate-edit train editable-training --data .../counterfact-train.json``; an edit without one fails
with that command).

**The edit operator.** Let θ be the edited parameters (the weight matrices of the MLPs of the last
``n_edit_layers`` blocks, as in the reference's ``inner_params``), η_i one learned step size per
parameter tensor θ_i, and L_e(θ; x_e, y_e) the mean NLL of a request's target tokens (teacher forced
on prompt + target). An edit is k steps of plain gradient descent, nothing else:

    θ^(0) = θ,    θ_i^(j+1) = θ_i^(j) − η_i ∇_{θ_i} L_e(θ^(j); x_e, y_e),    j = 0 .. k−1          (1)

**Meta-training** (``locate-edit train editable-training``, :func:`train_editable_training`). The
trained quantities are the meta-trained parameters θ = θ₀ + M (θ₀ the base model's, M the
*meta-delta*, zero-initialised) and the step sizes η. For a training record with request
(x_e, y_e), an equivalent input x'_e (the record's paraphrase) and a locality input x_loc, the
objective is the paper's

    L = c_base · KL( p_θ₀(· | x_loc) ‖ p_θ(· | x_loc) )                      (L_base: stay the model)
      + c_edit · L_e(θ^(k); x'_e, y_e)                                        (the edit is made)
      + c_loc  · KL( p_θ(· | x_loc) ‖ p_θ^(k)(· | x_loc) )                    (and it is local)      (2)

with the KLs averaged over the tokens of x_loc (prompt and answer), and L is differentiated
*through* the k inner steps (1) (second order: ∇_θ L_e is kept in the graph), averaged over
``batch_size`` records, Adam on M (learning rate ``lr``) and on η (``lr_lr``), the gradient clipped
to norm ``grad_clip``. L_base is the reference's ``base_loss: distill``: the KL to the frozen original
model on the locality inputs.

**The edit as weight deltas.** An :class:`edit.Edit` of Editable Training is, for each edited
parameter, the dense :class:`edit.WeightDelta`

    Δθ_i = M_i + D_i,     D_i = θ_i^(k) − θ_i   (the inner steps (1), run from θ₀ + M)                (3)

so the *base* model's weights are never replaced by the meta-trained ones: applying the edit gives
θ₀ + M + D, reverting returns θ₀ bit for bit, and every locality metric of the harness is measured
honestly against the base model (the meta-training's own drift, M, counts against the edit).

Defaults are the reference's (the MEND authors' port, ``algs/enn.py`` and ``config/alg/enn.yaml``,
``config/config.yaml`` of github.com/eric-mitchell/mend): k = ``n_edit_steps`` = 1, second order,
initial edit_lr 1e-2 per parameter tensor, Adam lr 1e-5, lr_lr 1e-3, c_edit 0.1, c_loc 1.0, c_base
1.0, gradient clip 100, the MLP weights (GPT-2 ``c_fc`` and ``c_proj``; Llama ``gate_proj``,
``up_proj``, ``down_proj``) of the last 3 blocks edited, the outer edit loss on the rephrase.

How this differs from the reference:

* **Meta-trained parameters.** The reference's outer loop (``no_grad_layers: null``) trains *every*
  parameter of the model; here M covers the edited MLP weights only (θ of (1)). Every parameter
  would make each Edit carry a dense delta of the whole model (540 MB for SmolLM2-135M in float32)
  and Adam's state for all of it; the edited weights are where (1) acts, and L_base keeps the rest equal to
  the base model anyway.
* **Scaled down for a 2-core CPU** (about an hour on SmolLM2-135M with one free core): up to
  1,000,000 iterations with early stopping, 10 edits per optimiser step → ``train_steps`` 400 of
  ``batch_size`` 5 (2,000 edits; one CounterFact edit's second-order meta-gradient takes about 1.6 s
  on one thread, so about 53 minutes, plus about 4 for the curve's two points on 100 validation
  records), and ``lr`` 1e-5 → 1e-4 (far fewer steps). Pass
  ``--hparam lr=1e-5 --hparam batch_size=10 --steps 100000`` for the reference's scale on a GPU.
* In the reference η is also in the main Adam's parameters (``self.parameters()``), so it takes an
  lr 1e-5 step besides its own lr_lr 1e-3 one; here it takes the lr_lr step only.
* The weights enter the forward as θ₀ + M + D through hooks at each linear layer's input and output
  (y ← y + x (M + D)ᵀ), not ``higher``'s functional copy of the model: the same function, with θ₀
  untouched. ``first_order=True`` detaches ∇L_e in (1) (the reference's ``enn.first_order``).
* ``edit_loss_on="request"`` measures the outer edit loss on the request itself instead of the
  paraphrase (a record without a paraphrase always uses the request).
* At edit time a batch of requests is one edit: (1) on the mean NLL over all their target tokens.
* The training curve records token accuracy of the target after the edit (``edit_success``) and the
  share of the locality answer's tokens whose top-1 prediction stays the *base* model's
  (``locality``), on a validation split of the training file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from locate.errors import EditFailedError, InvalidHparamsError

from ..edit import Edit, WeightDelta
from ..registry import Runtime, compute, register
from ..request import Request
from ..training import (
    EditorTrainer,
    TrainedEditor,
    TrainingHparams,
    TrainingRecord,
    batch_at,
    obtain_for_sites,
    run_training,
)
from .mend import _rows, _Site, _target_nll, edit_sites

METHOD = "editable-training"
EDIT_LOSS_ON = ("paraphrases", "request")


@dataclass
class EditableTrainingHparams(TrainingHparams):
    """Editable Training's hyperparameters (the MEND repository's ENN configuration, scaled down for the
    CPU where noted)."""

    edit_layers: Any = None  # blocks whose MLP weights are edited and meta-trained; None = the last n_edit_layers
    n_edit_layers: int = 3  # the reference's inner_params: the MLPs of the last 3 blocks
    n_edit_steps: int = 1  # k, inner gradient steps per edit (reference enn.n_edit_steps: 1)
    edit_lr: float = 1e-2  # initial step size η of each edited tensor (reference: 1e-2), learned
    first_order: bool = False  # detach ∇L_e in the inner steps (reference enn.first_order: False)
    lr: float = 1e-4  # Adam learning rate of the meta-delta M (reference: 1e-5 over up to 1M steps; raised for 400)
    lr_lr: float = 1e-3  # Adam learning rate of the step sizes η (reference: 1e-3)
    c_edit: float = 0.1  # weight of the edit loss (reference cedit: 0.1)
    c_loc: float = 1.0  # weight of the locality KL to the pre-edit model (reference cloc: 1.0)
    c_base: float = 1.0  # weight of the KL to the original model, L_base (reference cbase: 1.0)
    grad_clip: float = 100.0  # gradient norm clip (reference: 100)
    batch_size: int = 5  # edits per optimiser step (reference accumulate_bs: 10; scaled down for the CPU)
    edit_loss_on: str = "paraphrases"  # outer edit loss on the paraphrase (reference edit_outer) or "request"
    train_steps: int = 400  # optimiser steps (reference: up to 1,000,000 with early stopping; the CPU budget)
    eval_every: int = 200  # steps between points of the training curve (and one at the end)

    def __post_init__(self):
        if self.edit_loss_on not in EDIT_LOSS_ON:
            raise InvalidHparamsError(f"edit_loss_on must be one of {EDIT_LOSS_ON}, got {self.edit_loss_on!r}")
        for name in ("n_edit_layers", "n_edit_steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name in ("edit_lr", "lr", "lr_lr", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidHparamsError(f"{name} must be a positive number, got {v!r}")
        for name in ("c_edit", "c_loc", "c_base"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise InvalidHparamsError(f"{name} must be a non-negative number, got {v!r}")
        if not isinstance(self.first_order, bool):
            raise InvalidHparamsError(f"first_order must be True or False, got {self.first_order!r}")
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise InvalidHparamsError(f"train_steps must be a non-negative int, got {self.train_steps!r}")


# ====================================================================== the trained tensors
class MetaParameters(torch.nn.Module):
    """Every trained tensor: the meta-delta M_i (d_out, d_in) of each edited weight (``deltas``, in the
    order of the sites) and its step size η_i (``edit_lrs``)."""

    def __init__(self, sites: list[_Site], edit_lr: float):
        super().__init__()
        self.sites = sites
        self.deltas = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s.d_out, s.d_in)) for s in sites])
        self.edit_lrs = torch.nn.Parameter(torch.full((len(sites),), float(edit_lr)))


def _shifted_hooks(sites: list[_Site], shifts: list[torch.Tensor]) -> list[tuple[str, Callable]]:
    """Hooks that run each site with weight W + Δ (Δ (d_out, d_in)), differentiably in Δ: y ← y + x Δᵀ."""
    xs: dict[str, torch.Tensor] = {}
    hooks = []
    for s, shift in zip(sites, shifts):
        def read_in(x, hook):
            xs[hook.name] = x
            return x

        def add(y, hook, s=s, shift=shift):
            return y + (xs[s.hook_in].float() @ shift.T).to(y.dtype)

        hooks += [(s.hook_in, read_in), (s.hook_out, add)]
    return hooks


def _nll(lm, requests: list[Request], sites: list[_Site], shifts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """L_e under θ₀ + shifts (the mean NLL over the requests' target tokens) and its token accuracy."""
    batch, rows, pos, gold = _rows(lm, requests)
    with lm.eval_mode(), lm.hooks(_shifted_hooks(sites, shifts)):
        logits = lm.forward(batch)
    acc = float((logits[rows, pos].argmax(-1) == gold).float().mean())
    return _target_nll(logits, rows, pos, gold), acc


def inner_steps(lm, requests: list[Request], sites: list[_Site], meta: list[torch.Tensor],
                edit_lrs: torch.Tensor, k: int, *, order: str) -> list[torch.Tensor]:
    """(1) from θ₀ + ``meta``: the inner deltas D_i = θ_i^(k) − θ_i after ``k`` steps of gradient descent
    on L_e of ``requests`` with step sizes ``edit_lrs``. ``order="second"``: the D_i stay differentiable
    in ``meta`` and ``edit_lrs`` through the gradients (the reference); ``"first"``: the gradients are
    constants (D_i still depends on η_i); ``"none"``: plain tensors (an edit)."""
    inner = [torch.zeros_like(m) for m in meta]
    with torch.enable_grad():
        for _ in range(k):
            theta = [m + d for m, d in zip(meta, inner)]
            if order == "none" or not all(t.requires_grad for t in theta):
                theta = [t.detach().requires_grad_(True) for t in theta]
            loss, _ = _nll(lm, requests, sites, theta)
            grads = torch.autograd.grad(loss, theta, create_graph=order == "second", allow_unused=True)
            inner = [d - edit_lrs[i] * (torch.zeros_like(d) if g is None else g)
                     for i, (d, g) in enumerate(zip(inner, grads))]
    return [d.detach() for d in inner] if order == "none" else inner


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per token, averaged over the tokens where ``mask`` is set."""
    p, q = p_logits.float(), q_logits.float()
    kl = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1).reshape(-1)
    m = mask.reshape(-1).float()
    return (kl * m).sum() / m.sum()


# ====================================================================== training
class _EditableTrainer(EditorTrainer):
    def __init__(self, lm, train: list[TrainingRecord], val: list[TrainingRecord], hp: EditableTrainingHparams):
        self.lm, self.train_records, self.val, self.hp = lm, train, val, hp
        self.sites = edit_sites(lm, hp)
        self.module = MetaParameters(self.sites, hp.edit_lr).to(lm.device)
        self.opt = torch.optim.Adam([{"params": list(self.module.deltas), "lr": hp.lr},
                                     {"params": [self.module.edit_lrs], "lr": hp.lr_lr}])

    def _locality_batch(self, rec: TrainingRecord):
        pairs = list(rec.locality) or [("The capital of France is", " Paris")]
        return self.lm.pad([self.lm.encode(p) + self.lm.target_ids(a, p) for p, a in pairs])

    def _outer_requests(self, rec: TrainingRecord) -> list[Request]:
        """x'_e: the record's paraphrases (the reference's edit_outer), or the request itself."""
        r = rec.request
        if self.hp.edit_loss_on == "request" or not rec.paraphrases:
            return [r]
        return [Request(p.replace(r.subject, "{}", 1) if r.subject in p else "{} " + p, r.subject, r.target_new)
                for p in rec.paraphrases]

    def _losses(self, rec: TrainingRecord, train: bool) -> tuple[dict[str, torch.Tensor], dict]:
        """The three terms of (2) for one record, and the curve's measures."""
        lm, hp, sites = self.lm, self.hp, self.sites
        meta = list(self.module.deltas)
        loc = self._locality_batch(rec)
        mask = loc.attention_mask
        with torch.no_grad(), lm.eval_mode():
            original = lm.forward(loc).float()  # p_θ₀: the base model
        with torch.set_grad_enabled(train), lm.eval_mode(), lm.hooks(_shifted_hooks(sites, meta)):
            pre = lm.forward(loc).float()  # p_θ: the meta-trained model before the edit
        order = "none" if not train else ("first" if hp.first_order else "second")
        inner = inner_steps(lm, [rec.request], sites, meta, self.module.edit_lrs, hp.n_edit_steps, order=order)
        edited = [m + d for m, d in zip(meta, inner)]
        with torch.set_grad_enabled(train):
            l_edit, acc = _nll(lm, self._outer_requests(rec), sites, edited)
            with lm.eval_mode(), lm.hooks(_shifted_hooks(sites, edited)):
                post = lm.forward(loc).float()
            losses = {"base": _kl(original, pre, mask), "edit": l_edit, "loc": _kl(pre.detach(), post, mask)}
        keep = mask.reshape(-1).bool()
        info = {"acc": acc, "loc": float((post.argmax(-1) == original.argmax(-1)).reshape(-1)[keep].float().mean())}
        return losses, info

    def step(self, step: int) -> dict:
        hp = self.hp
        self.opt.zero_grad()
        idx = batch_at(len(self.train_records), step, hp.batch_size, hp.seed)
        tot = {"loss_edit": 0.0, "loss_loc": 0.0, "loss_base": 0.0}
        for i in idx:
            losses, _ = self._losses(self.train_records[i], train=True)
            total = hp.c_base * losses["base"] + hp.c_edit * losses["edit"] + hp.c_loc * losses["loc"]  # (2)
            (total / len(idx)).backward()
            for k in ("edit", "loc", "base"):
                tot[f"loss_{k}"] += float(losses[k].detach()) / len(idx)
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), hp.grad_clip)
        self.opt.step()
        return tot

    def evaluate(self) -> dict:
        accs, locs = [], []
        for rec in self.val:
            _, info = self._losses(rec, train=False)
            accs.append(info["acc"])
            locs.append(info["loc"])
        n = max(1, len(accs))
        return {"edit_success": sum(accs) / n, "locality": sum(locs) / n}

    def config(self) -> dict:
        return {"sites": [asdict(s) for s in self.sites]}


def train_editable_training(lm, records: list[TrainingRecord], hp: EditableTrainingHparams, *, steps: int | None = None,
                            out=None, progress: bool = True, resume: bool = True) -> TrainedEditor:
    """Meta-train (2) for ``lm`` on ``records`` and save the artefact (``out``, ``hp.editor`` or the cache):
    the meta-deltas M and step sizes η. Resumes from a checkpoint of the same key."""
    return run_training(METHOD, lm, records, hp, _EditableTrainer, steps=steps, out=out, progress=progress,
                        resume=resume)


def load_meta(lm, hp: EditableTrainingHparams, rt: Runtime | None = None) -> tuple[MetaParameters, TrainedEditor]:
    """The meta-trained parameters ``hp`` asks for on ``lm`` (see :func:`edit.training.obtain_for_sites`)."""
    sites = edit_sites(lm, hp)
    return obtain_for_sites(METHOD, lm, hp, rt, train_fn=train_editable_training, sites=sites,
                            build=lambda: MetaParameters(sites, hp.edit_lr))


def edit_parts(lm, requests: list[Request], net: MetaParameters, hp: EditableTrainingHparams
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(3) in its two parts, per site (d_out, d_in): the meta-deltas M and the inner-step deltas D of
    ``requests`` (k steps of (1) from the model as it is now plus M)."""
    meta = [m.detach() for m in net.deltas]
    inner = inner_steps(lm, list(requests), net.sites, meta, net.edit_lrs.detach(), hp.n_edit_steps, order="none")
    return meta, inner


def weight_deltas(lm, sites: list[_Site], shifts: list[torch.Tensor]) -> list[WeightDelta]:
    """Each site's Δ (d_out, d_in) as a dense :class:`edit.WeightDelta` in the stored weight's layout."""
    deltas = []
    for s, d in zip(sites, shifts):
        W = lm.parameter(s.param)
        dense = (d.T if s.transposed else d).to(W.dtype).contiguous()
        if not bool(torch.isfinite(dense).all()):
            raise EditFailedError("Editable Training produced a non-finite edit; the model is unchanged")
        deltas.append(WeightDelta(s.param, dense=dense))
    return deltas


# ====================================================================== the method
@register(METHOD, EditableTrainingHparams, batched=True, layers=None, train=train_editable_training,
          smoke={"train_data": "toy", "train_if_missing": True, "train_steps": 4, "batch_size": 2, "lr": 1e-3,
                 "lr_lr": 1e-2, "edit_lr": 1e-1, "eval_every": 2, "checkpoint_every": 2},
          description="Editable Training: the last 3 MLPs and per-tensor step sizes meta-trained so that one gradient "
                      "step makes an edit (Sinitsin et al. 2020; needs `locate-edit train editable-training`)")
def compute_editable_training(lm, requests: list[Request], hp: EditableTrainingHparams, rt: Runtime) -> Edit:
    """The Editable Training edit of ``requests`` (one joint edit of the batch): the meta-deltas M plus
    k gradient steps (1) taken from the model as it is now plus M, as weight deltas (3)."""
    t0 = time.perf_counter()
    memo = (METHOD, lm.fingerprint, json.dumps(asdict(hp), sort_keys=True, default=str), str(rt.data_dir))
    if memo not in rt.cache:  # the edits of one run load (and digest the training file) once
        rt.cache[memo] = load_meta(lm, hp, rt)
    net, art = rt.cache[memo]
    t1 = time.perf_counter()
    meta, inner = edit_parts(lm, list(requests), net, hp)
    deltas = weight_deltas(lm, net.sites, [m + d for m, d in zip(meta, inner)])
    return Edit(
        method=METHOD, requests=list(requests), interventions=deltas, fingerprint=lm.fingerprint, model_name=lm.name,
        layer_reason=(f"MLPs of blocks {sorted({s.layer for s in net.sites})}: the last blocks (the reference's "
                      "inner_params)") if hp.edit_layers is None else "chosen by the caller",
        hparams=asdict(hp), timings={"load_s": t1 - t0, "edit_s": time.perf_counter() - t1},
        metrics={"editor": str(art.path), "edit_lrs": net.edit_lrs.detach().tolist(),
                 "meta_delta_norm": float(sum(float(m.norm() ** 2) for m in meta) ** 0.5),
                 "inner_delta_norm": float(sum(float(d.norm() ** 2) for d in inner) ** 0.5)},
    )


def editable_training(requests: Request | list[Request], *, model=None, runtime: Runtime | None = None,
                      **hparams) -> Edit:
    """The Editable Training edit of ``requests`` (computed and **not applied**)."""
    return compute(METHOD, requests, model=model, runtime=runtime, **hparams)
