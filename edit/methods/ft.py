"""FT, FT-L and FT-M: fine-tuning an MLP output projection as the knowledge-editing baselines.

One routine (:func:`fine_tune_edit`), three registered variants, each with the defaults of the
reference configuration it reproduces:

======  ==============================================  =====  ===========  =============  =====
name    reference configuration                         layer  objective    ε (L∞ bound)   batch
======  ==============================================  =====  ===========  =============  =====
ft-l    ROME ``hparams/FT/gpt2-xl_constr.json``         0      prompt_last  5e-4 absolute  128
ft      ROME ``hparams/FT/gpt2-xl_unconstr.json``       1      prompt_last  none           128
ft-m    EasyEdit ``hparams/FT/llama-7b.yaml`` with      21     target_new   none           1
        ``objective_optimization: target_new``
======  ==============================================  =====  ===========  =============  =====

All three: 25 epochs of Adam, learning rate 5e-4, no weight decay, stop below a loss of 1e-2.

**Parameters.** θ = {W_out^l, b_out^l : l in layers}: every parameter of the MLP output projection of
each listed layer (GPT-2 ``c_proj``, GPT-J ``fc_out``, NeoX ``dense_4h_to_h``, Llama ``down_proj``),
the bias included where the architecture has one, as the references select parameters by the
module's name. Llama and Qwen2 have no bias there. ``include_bias=False`` trains the weight alone.
Several layers (a list) are trained jointly, as in the references.

**Objectives.** For request i with prompt p_i and target tokens o_i = (o_i1, ..., o_im):

    prompt_last  (ROME; FT and FT-L):   L_i = -(1/m) Σ_j log P_θ( o_ij | p_i )                   (1)
    target_new   (EasyEdit; FT-M):      L_i = -(1/m) Σ_j log P_θ( o_ij | p_i, o_i1 .. o_i(j-1) )   (2)

(1) reads every target token off the one next-token distribution after the prompt (no teacher
forcing); for a one-token target (1) and (2) coincide. (2) runs the model on prompt + target and
masks the loss to the target positions: the prompt's own tokens are inputs, never labels. A chunk's
loss is L = mean_i L_i.

**Loop and constraint.** For each of ``steps`` epochs, for each chunk of ``batch_size`` requests:
compute L; if L ≥ ``stop_loss`` take one Adam step on θ; then project every P in θ back into the L∞
ball around its original value P0 (Zhu et al. 2020, as ROME's FT-L does it):

    P  <-  clamp(P, P0 - ε_P, P0 + ε_P)          i.e.  ‖P - P0‖_∞ ≤ ε_P                    (3)

After the epoch, stop if the chunk losses' average (weighted by chunk size) is below ``stop_loss``.
``loss_trace`` holds those epoch averages (each measured before its chunk's step).

**Units of ε.** ``norm_constraint_units="absolute"`` (the reference): ε_P = ``norm_constraint`` for
every parameter. ROME tuned the number per model: GPT-2 medium 2e-3, large 1e-3, XL 5e-4, GPT-J 5e-5
(EasyEdit uses 5e-5 for Mistral-7B). It does not carry over: on SmolLM2-135M the RMS of layer 0's
``down_proj`` is 0.194, so 5e-4 is 0.26% of a typical entry and FT-L barely moves the model.
``norm_constraint_units="rms"`` (the recommended way to carry a bound to another model):

    ε_P = norm_constraint · RMS(P0),      RMS(P0) = ‖P0‖_F / sqrt(numel P0)                    (4)

for each trained tensor separately. Why the RMS: the clamp acts on each entry, so its natural unit is
the size of a typical entry, and under (4) the bound (3) gives exactly ‖ΔP‖_F ≤ norm_constraint ·
‖P0‖_F, a relative change that means the same thing at every width. The max-abs entry would be set
by a few outliers (on SmolLM2 the largest entry of a ``down_proj`` is 13 to 27 times its RMS, and it
varies 2x between layers whose RMS agree within 6%), so it would measure the outliers, not the
weights being clamped. A tensor that is all zeros (an untrained bias) has RMS 0 and stays
fixed under (4). The default stays absolute: it is the number the reference ran and ROME's FT-L row
came from, and no published relative value exists to default to.

How this differs from the reference code (ROME and EasyEdit ``baselines``/``models/ft/ft_main.py``):

* The target's ids are its tokens as a continuation of the prompt (:meth:`locate.HookedLM.target_ids`),
  each request's loss a mean over exactly its own target tokens. The references tokenize the target
  alone after putting a space before it (EasyEdit adds one even when it is there) and mask padded
  positions by comparing with the unknown-token id; for Llama-style tokenizers their (1) also scores
  the ``<s>`` the tokenizer puts first in the target. For GPT-2 and one-token targets this is the same.
* (2) masks by the exact prompt length; EasyEdit derives it from pad counts, correct for left padding.
* Log-probabilities are computed in at least float32. The model is left exactly as it was (weights
  restored bit-exactly, also on failure); the change is returned as an :class:`edit.Edit`.
* Each variant may take the others' options (e.g. ``ft-m`` with ``norm_constraint`` or ``ft-l`` with
  ``objective="target_new"``). ``ft-m``'s layer 21 is EasyEdit's for 32-layer Llama-2-7B; on a model
  of another depth pass a layer (its relative place is ``round(21 / 32 * n_layers)``).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from locate import resolve_layers
from locate.errors import EditFailedError, InvalidHparamsError

from ..edit import Edit, WeightDelta
from ..registry import Runtime, compute, register
from ..request import Request

OBJECTIVES = ("prompt_last", "target_new")
UNITS = ("absolute", "rms")


def check_real(hp, name: str, *, positive: bool) -> None:
    """Refuse a hyperparameter ``name`` of ``hp`` that is not a finite, non-negative (or positive) number."""
    v = getattr(hp, name)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (positive and v == 0):
        raise InvalidHparamsError(f"{name} must be a finite {'positive' if positive else 'non-negative'} "
                                  f"number, got {v!r}")

@dataclass
class _FineTuneHparams:
    """The fields every FT variant has; each variant's subclass sets its reference's defaults."""

    layers: Any = 0  # layer spec (locate.resolve_layers); a list trains those layers jointly
    steps: int = 25  # epochs over the requests (the references' num_steps)
    lr: float = 5e-4  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    norm_constraint: float | None = None  # ε of the L∞ ball (3) around the original values; None = unconstrained
    norm_constraint_units: str = "absolute"  # "absolute": ε as given; "rms": ε · RMS of each tensor, Eq. (4)
    objective: str = "prompt_last"  # "prompt_last", Eq. (1), or "target_new", Eq. (2)
    include_bias: bool = True  # also train the projection's bias where the model has one
    batch_size: int = 128  # requests per Adam step
    stop_loss: float = 1e-2  # no step on a chunk below this loss; stop after an epoch averaging below it

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")

        def real(name, *, positive):
            check_real(self, name, positive=positive)

        positive_int("steps")
        positive_int("batch_size")
        real("lr", positive=True)
        real("weight_decay", positive=False)
        real("stop_loss", positive=False)
        if self.norm_constraint is not None:
            real("norm_constraint", positive=True)
        if self.norm_constraint_units not in UNITS:
            raise InvalidHparamsError(f"norm_constraint_units must be one of {UNITS}, got {self.norm_constraint_units!r}")
        if self.objective not in OBJECTIVES:
            raise InvalidHparamsError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not isinstance(self.include_bias, bool):
            raise InvalidHparamsError(f"include_bias must be True or False, got {self.include_bias!r}")


@dataclass
class FTLHparams(_FineTuneHparams):
    """FT-L as ROME runs it for GPT-2 XL (``hparams/FT/gpt2-xl_constr.json``): layer 0, weight and
    bias, the prompt-last loss (1), an absolute L∞ bound of 5e-4 (ROME's value for GPT-2 XL; 2e-3
    for GPT-2 medium, 1e-3 large, 5e-5 GPT-J; ``norm_constraint_units="rms"`` for a relative bound)."""

    layers: Any = 0
    norm_constraint: float | None = 5e-4
    objective: str = "prompt_last"
    batch_size: int = 128


@dataclass
class FTHparams(_FineTuneHparams):
    """Unconstrained FT as ROME runs it for GPT-2 XL (``hparams/FT/gpt2-xl_unconstr.json``): layer 1,
    weight and bias, the prompt-last loss (1), no bound (ROME's GPT-J file: layer 21)."""

    layers: Any = 1
    norm_constraint: float | None = None
    objective: str = "prompt_last"
    batch_size: int = 128


@dataclass
class FTMHparams(_FineTuneHparams):
    """FT-M as EasyEdit runs it for Llama-2-7B (``hparams/FT/llama-7b.yaml`` with
    ``objective_optimization: target_new``): layer 21 of 32, the target-only teacher-forced loss (2),
    no bound, one request per step."""

    layers: Any = 21
    norm_constraint: float | None = None
    objective: str = "target_new"
    batch_size: int = 1


# ---------------------------------------------------------------------------------------- the pieces
def trained_parameters(lm, layers: Sequence[int], include_bias: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """θ: ``(canonical name, Parameter)`` of each layer's MLP output projection weight, and its bias
    where the model has one and ``include_bias``."""
    out = []
    for layer in layers:
        module = lm.mlp_out_module(layer)
        out.append((lm.weight_name(layer), module.weight))
        if include_bias and getattr(module, "bias", None) is not None:
            out.append((f"blocks.{layer}.mlp.out.bias", module.bias))
    return out


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    wide = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.log_softmax(wide, -1)


def objective_loss(lm, rows: Sequence[tuple[list[int], list[int]]], objective: str) -> torch.Tensor:
    """L = mean_i L_i over ``rows`` = ``[(prompt ids, target ids)]`` under Eq. (1) ``"prompt_last"`` or
    Eq. (2) ``"target_new"``; differentiable in the model's parameters."""
    if objective == "prompt_last":  # (1): every target token at the prompt's last position
        batch = lm.pad([p for p, _ in rows])
        logits = lm.forward(batch)
        last = _log_probs(logits[torch.arange(len(rows), device=logits.device), batch.last])  # (B, V)
        losses = [-last[i, torch.as_tensor(t, device=last.device)].mean() for i, (_, t) in enumerate(rows)]
    elif objective == "target_new":  # (2): teacher forced on prompt + target, loss on target positions only
        batch = lm.pad([p + t for p, t in rows])
        logits = lm.forward(batch)
        losses = []
        for i, (p, t) in enumerate(rows):
            lp = _log_probs(logits[i, len(p) - 1: len(p) - 1 + len(t)])  # position k predicts token k + 1
            losses.append(-lp[torch.arange(len(t), device=lp.device), torch.as_tensor(t, device=lp.device)].mean())
    else:
        raise InvalidHparamsError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return torch.stack(losses).mean()


def constraint_radii(params: Sequence[tuple[str, torch.Tensor]], norm_constraint: float | None,
                     units: str) -> dict[str, float | None]:
    """ε_P of Eq. (3) for each parameter: ``norm_constraint`` itself, or Eq. (4) ``norm_constraint · RMS(P0)``."""
    if norm_constraint is None:
        return {name: None for name, _ in params}
    if units == "absolute":
        return {name: float(norm_constraint) for name, _ in params}
    if units == "rms":
        return {name: float(norm_constraint) * float(p.detach().double().pow(2).mean().sqrt()) for name, p in params}
    raise InvalidHparamsError(f"norm_constraint_units must be one of {UNITS}, got {units!r}")


def _chunks(items: list, n: int) -> list[list]:
    return [items[i: i + n] for i in range(0, len(items), n)]


# ---------------------------------------------------------------------------------------- the routine
def adam_optimizer(master: dict[str, torch.Tensor], hp: _FineTuneHparams) -> torch.optim.Optimizer:
    """FT's optimiser: Adam over the trained tensors, ``hp.lr`` and ``hp.weight_decay``."""
    return torch.optim.Adam(list(master.values()), lr=hp.lr, weight_decay=hp.weight_decay)


def fine_tune_edit(lm, requests: list[Request], hp: _FineTuneHparams, rt: Runtime, method: str,
                   make_optimizer=adam_optimizer) -> Edit:
    """The shared FT routine (module docstring): train θ on ``hp.objective`` under the bound (3) and
    return the change as an unapplied :class:`edit.Edit` named ``method``; the model is restored bit-exactly.

    ``make_optimizer(master, hp)``: the optimiser over ``master`` (``{name: tensor trained}``, float32
    copies for half-precision weights), built once before the first step; Adam (:func:`adam_optimizer`)
    for FT, another rule for methods that change only the update (RecAdam)."""
    layers, reason = resolve_layers(lm, hp.layers, 1)
    rows = [(lm.encode(r.rendered), lm.target_ids(r.target_new, r.rendered)) for r in requests]
    params = trained_parameters(lm, layers, hp.include_bias)
    start = {name: p.detach().clone() for name, p in params}  # P0 as stored (bit-exact restore, Eq. 3's centre)
    start_canonical = {name: lm.parameter(name).clone() for name, _ in params}  # P0 as the Edit names it
    radii = constraint_radii(params, hp.norm_constraint, hp.norm_constraint_units)
    t0 = time.perf_counter()
    trace: list[float] = []
    try:
        with lm.eval_mode():
            for _, p in params:
                p.requires_grad_(True)
            # Half-precision weights (fp16/bf16) train through float32 master copies (mixed precision):
            # Adam's second moment and ε underflow in fp16. Float32/64 weights are trained in place.
            master = {name: (p if p.dtype in (torch.float32, torch.float64) else
                             p.detach().float().clone().requires_grad_(True)) for name, p in params}
            opt = make_optimizer(master, hp)
            for epoch in range(hp.steps):
                total, count = 0.0, 0
                for chunk in _chunks(rows, hp.batch_size):
                    opt.zero_grad()
                    loss = objective_loss(lm, chunk, hp.objective)
                    if not torch.isfinite(loss):
                        raise EditFailedError(f"{method} loss became {loss.item()} in epoch {epoch}")
                    total, count = total + loss.item() * len(chunk), count + len(chunk)
                    if loss.item() >= hp.stop_loss:
                        loss.backward()
                        for name, p in params:
                            if master[name] is not p:
                                master[name].grad = p.grad.float()
                                p.grad = None
                        opt.step()
                    with torch.no_grad():  # (3): back into the L∞ ball around P0
                        for name, p in params:
                            m = master[name]
                            if radii[name] is not None:
                                m.copy_(torch.clamp(m, start[name].to(m.dtype) - radii[name],
                                                    start[name].to(m.dtype) + radii[name]))
                            if m is not p:
                                p.copy_(m.to(p.dtype))
                trace.append(total / count)
                if rt.callback is not None:
                    rt.callback({"method": method, "epoch": epoch, "loss": trace[-1]})
                if trace[-1] < hp.stop_loss:
                    break
        deltas = [WeightDelta(name, dense=(lm.parameter(name) - start_canonical[name]).detach().clone())
                  for name, _ in params]
    finally:
        with torch.no_grad():
            for name, p in params:
                p.copy_(start[name])  # bit-exact restore, success or failure
                p.grad = None
    return Edit(method, requests, deltas, lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": list(layers), "norm_bound": radii},
                timings={"total_s": time.perf_counter() - t0}, loss_trace=trace)


# ---------------------------------------------------------------------------------------- the variants
SMOKE = {"steps": 3}


@register("ft-l", FTLHparams, batched=True, layers=1, smoke=SMOKE,
          description="FT-L: fine-tune layer 0's MLP output projection under an L-inf bound (ROME's baseline)")
def compute_ft_l(lm, requests: list[Request], hp: FTLHparams, rt: Runtime) -> Edit:
    """FT-L edit of ``requests`` (not applied): :func:`fine_tune_edit` with :class:`FTLHparams`."""
    return fine_tune_edit(lm, requests, hp, rt, "ft-l")


@register("ft", FTHparams, batched=True, layers=1, smoke=SMOKE,
          description="FT: unconstrained fine-tuning of one MLP output projection (ROME's baseline)")
def compute_ft(lm, requests: list[Request], hp: FTHparams, rt: Runtime) -> Edit:
    """Unconstrained FT edit of ``requests`` (not applied): :func:`fine_tune_edit` with :class:`FTHparams`."""
    return fine_tune_edit(lm, requests, hp, rt, "ft")


@register("ft-m", FTMHparams, batched=True, layers=1, smoke=SMOKE,
          description="FT-M: fine-tune one MLP output projection on the target tokens only (EasyEdit)")
def compute_ft_m(lm, requests: list[Request], hp: FTMHparams, rt: Runtime) -> Edit:
    """FT-M edit of ``requests`` (not applied): :func:`fine_tune_edit` with :class:`FTMHparams`."""
    return fine_tune_edit(lm, requests, hp, rt, "ft-m")


def fine_tune(requests: Request | Sequence[Request], *, model=None, method: str = "ft-l", layer: Any = None,
              **hparams) -> Edit:
    """The ``method`` (``"ft-l"``, ``"ft"`` or ``"ft-m"``) edit of ``requests`` (unapplied), at ``layer``
    (default: the variant's reference layer), with any other hyperparameters as keywords."""
    if layer is not None:
        hparams["layers"] = layer
    return compute(method, requests, model=model, **hparams)


ft = fine_tune
