"""F-Learning: forgetting before learning (Ni et al. 2023, "Forgetting before Learning: Utilizing
Parametric Arithmetic for Knowledge Updating in Large Language Models", ACL 2024).

Fine-tuning a fact over an old one it contradicts fights the old one; F-Learning first removes the
old fact by parametric arithmetic, then learns the new one. With FT (:mod:`edit.methods.ft`) as the
fine-tuning routine, θ its trained parameters and θ0 their values now:

    Δ_old = FT(θ0; old facts) − θ0            fine-tune on (prompt, target_true)               (1)
    θ'    = θ0 − λ · Δ_old                    forget: subtract the old fact's update          (2)
    Δ_new = FT(θ'; new facts) − θ'            fine-tune on (prompt, target_new) from θ'        (3)
    Δ     = −λ · Δ_old + Δ_new                the edit: θ* = θ0 + Δ                             (4)

(1) and (3) run the same routine with the same hyperparameters, each from its own fresh Adam state;
the model is restored bit-exactly after the call, and the returned :class:`edit.Edit` holds (4),
one dense delta per trained tensor. Every request needs its ``target_true`` (the old fact): a
request without one is refused (:class:`edit.request.InvalidRequestError`) before any work.

**Defaults.** Learning is supervised fine-tuning of the answer tokens, as the paper's full
fine-tuning does: FT's layer (1), the teacher-forced target loss (``objective="target_new"``),
25 epochs of Adam at 5e-4, stop below a loss of 1e-2. λ = 1: the old fact's update is subtracted
whole, θ' = θ0 − Δ_old (plain parametric negation).

How this differs from the paper: the paper fine-tunes every weight of LLaMA-2-7B for several epochs
(or LoRA modules, and then subtracts the LoRA update); here the fine-tuned parameters are FT's MLP
output projection(s) and the old fact is learnt with the same settings as the new one. The paper's
own λ was not available to this implementation (the text could not be read here); λ = 1 is the
plain negation of Eq. (2), not a number taken from the paper, and ``forget_lambda`` sets it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import asdict, dataclass

from locate.errors import InvalidHparamsError

from ..edit import Edit, WeightDelta, applied
from ..registry import Runtime, register
from ..request import InvalidRequestError, Request
from .ft import FTHparams, fine_tune_edit


@dataclass
class FLearningHparams(FTHparams):
    """FT's fields with the teacher-forced answer loss, and λ of Eq. (2) (module docstring)."""

    objective: str = "target_new"  # supervised fine-tuning of the answer tokens, FT's Eq. (2)
    forget_lambda: float = 1.0  # λ of Eq. (2): how much of the old fact's update is subtracted

    def __post_init__(self):
        super().__post_init__()
        v = self.forget_lambda
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise InvalidHparamsError(f"forget_lambda must be a finite non-negative number, got {v!r}")


def old_fact_requests(requests: list[Request]) -> list[Request]:
    """The old facts: each request with ``target_true`` as the target; refused where one has none."""
    missing = [r for r in requests if not r.target_true]
    if missing:
        shown = "; ".join(repr(r.rendered) for r in missing[:3])
        raise InvalidRequestError(f"f-learning forgets the old fact before learning the new one and needs each "
                                  f"request's target_true; {len(missing)} request(s) have none: {shown}")
    return [dataclasses.replace(r, target_new=r.target_true, target_true=None) for r in requests]


def forgetting_edit(lm, e_old: Edit, forget_lambda: float) -> Edit:
    """Eq. (2) as an unapplied edit: −λ·Δ_old on each tensor ``e_old`` changed."""
    deltas = [WeightDelta(d.param, dense=-forget_lambda * d.dense) for d in e_old.deltas]
    return Edit("f-learning-forget", e_old.requests, deltas, lm.fingerprint, lm.name)


@register("f-learning", FLearningHparams, batched=True, layers=1, smoke={"steps": 3},
          description="F-Learning: subtract the old fact's fine-tuning update, then fine-tune the new fact (Ni et al. 2023)")
def compute_f_learning(lm, requests: list[Request], hp: FLearningHparams, rt: Runtime) -> Edit:
    """F-Learning edit of ``requests`` (not applied): Eqs. (1)-(4) of the module docstring."""
    old = old_fact_requests(requests)  # before any work: a request without target_true is refused
    t0 = time.perf_counter()
    e_old = fine_tune_edit(lm, old, hp, rt, "f-learning")  # (1)
    forget = forgetting_edit(lm, e_old, hp.forget_lambda)  # (2)
    with applied(lm, forget):
        e_new = fine_tune_edit(lm, requests, hp, rt, "f-learning")  # (3), from θ'
    new = {d.param: d.dense for d in e_new.deltas}
    deltas = [WeightDelta(f.param, dense=f.dense + new[f.param]) for f in forget.deltas]  # (4)
    return Edit("f-learning", requests, deltas, lm.fingerprint, lm.name, e_new.layer_reason,
                hparams={**asdict(hp), "layers": e_new.hparams["layers"]},
                timings={"forget_s": e_old.timings["total_s"], "learn_s": e_new.timings["total_s"],
                         "total_s": time.perf_counter() - t0},
                loss_trace=list(e_new.loss_trace), metrics={"old_fact_loss_trace": list(e_old.loss_trace)})
