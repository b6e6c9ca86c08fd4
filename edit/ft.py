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
The model is left exactly as it was; the change is returned as an :class:`edit.Edit`.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from locate import resolve_model
from locate.errors import EditFailedError

from .edit import Edit, WeightDelta
from .request import Request
from .rome import resolve_layer


def fine_tune(requests: Request | Sequence[Request], *, model=None, layer: int | str = "auto",
              steps: int = 25, lr: float = 5e-4, norm_constraint: float | None = 5e-4,
              weight_decay: float = 0.0, stop_loss: float = 1e-2) -> Edit:
    """FT-L edit of ``requests`` at ``layer``. ``norm_constraint=None`` gives unconstrained FT."""
    lm = resolve_model(model)
    reqs = [requests] if isinstance(requests, Request) else list(requests)
    if not reqs:
        raise ValueError("no requests to edit")
    for r in reqs:
        r.check(lm)
    layer, reason = resolve_layer(lm, layer)
    rows = [(lm.encode(r.rendered), lm.target_ids(r.target_new, r.rendered)) for r in reqs]
    batch = lm.pad([p + t for p, t in rows])

    module = lm.mlp_out_module(layer)
    weight = module.weight  # the Parameter (GPT-2 Conv1D stores it transposed; clamping is elementwise)
    w0 = weight.detach().clone()
    w0_oriented = lm.mlp_out_weight(layer).clone()
    t0 = time.perf_counter()
    trace = []
    try:
        with lm.eval_mode():
            weight.requires_grad_(True)
            opt = torch.optim.Adam([weight], lr=lr, weight_decay=weight_decay)
            for _ in range(steps):
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
                if loss.item() < stop_loss:
                    break
                loss.backward()
                opt.step()
                if norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.maximum(torch.minimum(weight, w0 + norm_constraint), w0 - norm_constraint))
            weight.requires_grad_(False)
        delta = (lm.mlp_out_weight(layer) - w0_oriented).detach().clone()
    finally:
        with torch.no_grad():
            weight.copy_(w0)  # bit-exact restore, success or failure
        weight.grad = None
    return Edit("ft", reqs, [WeightDelta(layer, dense=delta)], lm.fingerprint, lm.name, reason,
                hparams={"layer": layer, "steps": steps, "lr": lr, "norm_constraint": norm_constraint,
                         "weight_decay": weight_decay, "stop_loss": stop_loss},
                timings={"total": time.perf_counter() - t0}, loss_trace=trace)


ft = fine_tune
