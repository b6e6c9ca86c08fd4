"""FT-L: constrained fine-tuning of one MLP output projection (the baseline of ROME §4, "FT+L").

Minimise the teacher-forced negative log-likelihood of the new targets,

    L(W) = mean_i  -(1/|o*_i|) sum_j log P_W( o*_{i,j} | p_i, o*_{i,<j} ),

by Adam on the weight W of one layer's MLP output projection only, and after every step project W
back into the L-infinity ball around the original weights (Zhu et al. 2020's constraint, as ROME's
FT-L uses it):

    W  <-  clamp(W, W0 - eps, W0 + eps)          i.e. ||W - W0||_inf <= eps.

Defaults follow the ROME code's FT-L setting for GPT-2 XL (25 steps, lr 5e-4, eps 5e-4, stop once
the loss is below 1e-2). One difference: we score every token of a multi-token target (teacher
forcing); the ROME code's FT loss reads all target tokens at the prompt's last position.
The model is left exactly as it was; the change is returned as an :class:`edit.Edit`. Registered as
``ft-l``; ``norm_constraint=None`` is unconstrained fine-tuning of the same layer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from locate import resolve_layers
from locate.errors import EditFailedError

from ..edit import Edit, WeightDelta
from ..registry import Runtime, compute, register
from ..request import Request


@dataclass
class FTLHparams:
    """FT-L as ROME's code runs it for GPT-2 XL."""

    layers: Any = "auto"  # layer spec (one layer); "auto" = the peak of the tracing calibration
    steps: int = 25  # Adam steps
    lr: float = 5e-4  # learning rate
    norm_constraint: float | None = 5e-4  # ε of the L∞ ball around W0 (absolute); None = unconstrained
    weight_decay: float = 0.0  # Adam weight decay
    stop_loss: float = 1e-2  # stop once the mean NLL is below this


@register("ft-l", FTLHparams, batched=True, layers=1, smoke={"steps": 3},
          description="FT-L: fine-tune one MLP output projection under an L-inf bound (ROME's baseline)")
def compute_ft(lm, requests: list[Request], hp: FTLHparams, rt: Runtime) -> Edit:
    """FT-L edit of ``requests`` (not applied); the model's weights are restored bit-exactly."""
    (layer,), reason = resolve_layers(lm, hp.layers, 1)
    rows = [(lm.encode(r.rendered), lm.target_ids(r.target_new, r.rendered)) for r in requests]
    batch = lm.pad([p + t for p, t in rows])

    module = lm.mlp_out_module(layer)
    weight = module.weight  # the Parameter (GPT-2 Conv1D stores it transposed; clamping is elementwise)
    w0 = weight.detach().clone()
    w0_oriented = lm.mlp_out_weight(layer).clone()
    t0 = time.perf_counter()
    trace = []
    eps = hp.norm_constraint
    try:
        with lm.eval_mode():
            weight.requires_grad_(True)
            opt = torch.optim.Adam([weight], lr=hp.lr, weight_decay=hp.weight_decay)
            for _ in range(hp.steps):
                opt.zero_grad()
                logits = lm.forward(batch)
                losses = []
                for b, (p, t) in enumerate(rows):
                    lp = torch.log_softmax(logits[b, len(p) - 1: len(p) - 1 + len(t)].float(), -1)
                    losses.append(-lp[torch.arange(len(t)), torch.as_tensor(t, device=lp.device)].mean())
                loss = torch.stack(losses).mean()
                if not torch.isfinite(loss):
                    raise EditFailedError(f"FT-L loss became {loss.item()}")
                trace.append(loss.item())
                if loss.item() < hp.stop_loss:
                    break
                loss.backward()
                opt.step()
                if eps is not None:  # project back into the L∞ ball: ‖W − W0‖∞ ≤ ε
                    with torch.no_grad():
                        weight.copy_(torch.maximum(torch.minimum(weight, w0 + eps), w0 - eps))
            weight.requires_grad_(False)
        delta = (lm.mlp_out_weight(layer) - w0_oriented).detach().clone()
    finally:
        with torch.no_grad():
            weight.copy_(w0)  # bit-exact restore, success or failure
        weight.grad = None
    return Edit("ft-l", requests, [WeightDelta(layer, dense=delta)], lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": [layer]}, timings={"total_s": time.perf_counter() - t0},
                loss_trace=trace)


def fine_tune(requests: Request | Sequence[Request], *, model=None, layer: Any = "auto", **hparams) -> Edit:
    """FT-L edit of ``requests`` at ``layer`` (unapplied). ``norm_constraint=None`` gives unconstrained FT."""
    return compute("ft-l", requests, model=model, layers=layer, **hparams)


ft = fine_tune
