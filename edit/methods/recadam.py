"""RecAdam: fine-tuning that recalls the pretrained weights (Chen et al., EMNLP 2020, "Recall and Learn").

The edit is FT (:mod:`edit.methods.ft`: the same parameters θ, objectives, batching, stopping rule
and bit-exact restore) with Adam replaced by the RecAdam update. The paper's objective mixes the
target loss L_T with a quadratic penalty that stands in for the pretraining task (its Eq. 7):

    L(t) = λ(t) · L_T(θ) + (1 − λ(t)) · (γ/2) · Σ_i (θ_i − θ0_i)²                             (1)

    λ(t) = sigmoid(k · (t − t0)) = 1 / (1 + exp(−k (t − t0)))                                  (2)

with t the optimiser step (1, 2, ...): early on the penalty dominates and holds θ near θ0, the
pretrained (here: pre-edit) weights; past t0 the target loss takes over. The two terms are not
summed into one gradient. As with AdamW's weight decay, only ∇L_T goes through Adam's moments,
and the penalty's gradient is a plain step (the paper's Algorithm 1, its official ``RecAdam.py``):

    g_t = ∇L_T(θ_{t−1})
    m_t = β1 m_{t−1} + (1 − β1) g_t,        v_t = β2 v_{t−1} + (1 − β2) g_t²
    α_t = lr · sqrt(1 − β2^t) / (1 − β1^t)
    θ  <-  θ − α_t · λ(t) · m_t / (sqrt(v_t) + ε)                                               (3)
    θ  <-  θ − lr · (1 − λ(t)) · γ · (θ − θ0)                                                   (4)
    θ  <-  θ − lr · wd · θ                                  (decoupled weight decay, wd = 0 by default)

(4) reads θ after (3), as the official optimiser updates in place. The penalty step contracts the
distance to θ0 by the factor 1 − lr·γ·(1 − λ(t)), which must stay above −1: settings with
lr·γ ≥ 2 diverge and are refused.

**Defaults.** The official code's defaults (``run_glue_with_RecAdam.py``): sigmoid annealing,
k = 0.5, t0 = 250, γ = 5000 (``pretrain_cof``), and its BERT-base learning rate 2e-5 (lr·γ = 0.1),
Adam's β = (0.9, 0.999), ε = 1e-8. FT's parameters, layer (1), prompt-last objective, batch and
stop rule are kept (:class:`edit.methods.ft.FTHparams`). Because λ(t) ≈ 0 until t ≈ t0 − 10, the
default trains ``steps = 500`` = 2·t0 epochs: nothing moves for the first ~240 steps (the
moments accumulate ∇L_T meanwhile), the target takes over around t0, and the last ~230 steps
are Adam at full weight. This costs 20 times FT's 25 steps per edit: on SmolLM2-135M on this
2-core CPU one step took about 0.9 s (FT, 20 steps, 18 s), so about 7 to 8 minutes per edit.
A run on FT's budget scales the schedule, not the balance: ``steps=50, anneal_t0=25, lr=5e-4,
gamma=200`` keeps the paper's lr·γ = 0.1 and k, with λ crossing 1/2 halfway as at the default
(an option, not the paper's numbers).

How this differs from the reference: the paper fine-tunes the whole model for thousands of steps
with gradient clipping (max norm 1) and a linear warm-up/decay schedule; here only FT's θ is
trained, at a constant learning rate, without clipping, as FT does. The ``anneal`` option also
takes the official code's ``"linear"`` (λ(t) = min(1, t / t0)) and ``"constant"`` (λ = 1, no
penalty) schedules; ``anneal_w`` scales λ as the official ``anneal_w`` does. The λ(t) of every step
is recorded in ``Edit.metrics["anneal_lambda"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from locate.errors import InvalidHparamsError

from ..edit import Edit
from ..registry import Runtime, register
from ..request import Request
from .ft import FTHparams, check_real, fine_tune_edit

ANNEALS = ("sigmoid", "linear", "constant")


def anneal_lambda(t: int, schedule: str, k: float, t0: float, w: float = 1.0) -> float:
    """λ(t) of Eq. (2) (``"sigmoid"``), or ``min(1, t/t0)`` (``"linear"``), or 1 (``"constant"``), times ``w``."""
    if schedule == "sigmoid":
        return w / (1.0 + math.exp(-k * (t - t0))) if k * (t - t0) > -700 else 0.0  # exp overflows past ~709
    if schedule == "linear":
        return w * min(1.0, t / t0)
    if schedule == "constant":
        return w
    raise InvalidHparamsError(f"anneal must be one of {ANNEALS}, got {schedule!r}")


class RecAdam(torch.optim.Optimizer):
    """The RecAdam update, Eqs. (3) and (4) of the module docstring, for tensors whose pretrained
    values are ``anchors`` (θ0, same order and shapes). ``lambdas`` collects λ(t) of every step."""

    def __init__(self, params, anchors, *, lr: float, gamma: float, k: float, t0: float, anneal: str = "sigmoid",
                 anneal_w: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        params = list(params)
        anchors = [a.detach().clone() for a in anchors]
        if len(anchors) != len(params) or any(a.shape != p.shape for a, p in zip(anchors, params)):
            raise InvalidHparamsError("RecAdam needs one anchor θ0 of the same shape per trained tensor")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.anchors = anchors
        self.gamma, self.k, self.t0, self.anneal, self.anneal_w = gamma, k, t0, anneal, anneal_w
        self.t = 0
        self.lambdas: list[float] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        lam = anneal_lambda(self.t, self.anneal, self.k, self.t0, self.anneal_w)
        self.lambdas.append(lam)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p, p0 in zip(group["params"], self.anchors):
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                alpha = lr * math.sqrt(1 - beta2 ** self.t) / (1 - beta1 ** self.t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-alpha * lam)  # (3): the target, through Adam
                p.sub_((p - p0.to(p.dtype)) * (lr * (self.anneal_w - lam) * self.gamma))  # (4): the penalty, plain
                if wd > 0:
                    p.sub_(p * (lr * wd))
        return None


@dataclass
class RecAdamHparams(FTHparams):
    """FT's fields (layer 1, prompt-last loss, no bound) with RecAdam's update; the official
    ``run_glue_with_RecAdam.py`` defaults for the annealing and the penalty (module docstring)."""

    steps: int = 500  # epochs; 2·t0, so λ(t) reaches 1 halfway (λ ≈ 0 before t ≈ t0 − 10)
    lr: float = 2e-5  # the paper's BERT-base learning rate; lr·γ = 0.1
    gamma: float = 5000.0  # γ of Eq. (1), the official pretrain_cof
    anneal: str = "sigmoid"  # λ(t) schedule: "sigmoid" Eq. (2), "linear" min(1, t/t0), "constant" 1
    anneal_k: float = 0.5  # k of Eq. (2)
    anneal_t0: float = 250.0  # t0 of Eq. (2), in optimiser steps
    anneal_w: float = 1.0  # scale of λ(t); the penalty weighs (anneal_w − λ(t))
    adam_eps: float = 1e-8  # ε of Eq. (3)

    def __post_init__(self):
        super().__post_init__()

        def real(name, *, positive):
            check_real(self, name, positive=positive)

        real("gamma", positive=False)
        real("anneal_k", positive=False)
        real("anneal_t0", positive=self.anneal == "linear")
        real("anneal_w", positive=False)
        real("adam_eps", positive=False)
        if self.anneal not in ANNEALS:
            raise InvalidHparamsError(f"anneal must be one of {ANNEALS}, got {self.anneal!r}")
        if self.norm_constraint is not None:
            raise InvalidHparamsError("recadam's regularisation is the annealed penalty; it takes no norm_constraint")
        if self.lr * self.gamma * self.anneal_w >= 2:
            raise InvalidHparamsError(
                f"lr·gamma·anneal_w = {self.lr * self.gamma * self.anneal_w:g} ≥ 2: the penalty step (4) "
                "θ <- θ − lr·(1−λ)·γ·(θ − θ0) overshoots θ0 and diverges; lower lr or gamma")


def _recadam_optimizer(master: dict[str, torch.Tensor], hp: RecAdamHparams) -> RecAdam:
    """RecAdam over FT's trained tensors, anchored at their values before the first step (θ0)."""
    tensors = list(master.values())
    return RecAdam(tensors, tensors, lr=hp.lr, gamma=hp.gamma, k=hp.anneal_k, t0=hp.anneal_t0, anneal=hp.anneal,
                   anneal_w=hp.anneal_w, eps=hp.adam_eps, weight_decay=hp.weight_decay)


SMOKE = {"steps": 6, "anneal_t0": 2.0, "lr": 5e-4, "gamma": 200.0}  # λ crosses 1/2 at step 2 of 6


@register("recadam", RecAdamHparams, batched=True, layers=1, smoke=SMOKE,
          description="RecAdam: fine-tuning with an annealed quadratic pull toward the pre-edit weights (Chen et al. 2020)")
def compute_recadam(lm, requests: list[Request], hp: RecAdamHparams, rt: Runtime) -> Edit:
    """RecAdam edit of ``requests`` (not applied): FT's routine with the RecAdam update (module docstring)."""
    optimisers: list[RecAdam] = []

    def make(master, hparams):
        optimisers.append(_recadam_optimizer(master, hparams))
        return optimisers[-1]

    e = fine_tune_edit(lm, requests, hp, rt, "recadam", make_optimizer=make)
    e.metrics["anneal_lambda"] = list(optimisers[0].lambdas)
    return e
