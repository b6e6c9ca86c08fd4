"""RECT: keep only the largest relative changes of an edit (Gu et al., EMNLP 2024, "Model Editing Harms
General Abilities of Large Language Models: Regularization to the Rescue").

Gu et al. find that the general abilities an edited model loses (reasoning, NLI, QA, summarisation)
follow from how far the edit moves the weights, and that most of a ROME/MEMIT update's entries move
their weight by a small fraction of its size while carrying little of the edit. RECT (RElative Change in
weighT) regularises the update after it is computed:

    Δ          the update of a locate-then-edit method (MEMIT by default, any registered weight edit)
    ρ_ij     = |Δ_ij| / |W_ij|                  the relative change of each entry (W: the weight now)
    M_ij     = 1  if ρ_ij is among the top-k% of ρ over the matrix, else 0
    Δ_RECT   = M ⊙ Δ                            the other entries are zeroed

per edited matrix. The kept update is sparse, not low-rank, so it is stored dense.

Reference behaviour (the authors' code, ``JasonForJoy/Model-Editing-Hurt``,
``easyeditor/models/rome/rome_main.py``: ``set_min_to_zero``): the number zeroed is
⌊n · (1 − k)⌋ of the n entries, ranked by |Δ/W| against the weight before this edit (which, in sequential
editing, carries the earlier edits); k = 20% (they zero the 80% smallest). An entry whose weight is
exactly 0 has an infinite relative change when Δ moves it (kept first) and none when Δ does not. Ties at
the cut are broken by position, so exactly n − ⌊n(1 − k)⌋ entries are kept, whatever the values.

The base method. ``base`` names any registered method whose edit is made of weight deltas (``memit``
by default, as the issue asks; ``rome``, ``emmet``, ``alphaedit``, ...). Its update is computed by its
own compute function, unapplied, on the model as it is. MEMIT's hyperparameters are RECT's own
(:class:`RECTHparams` extends them); with another base only the layer spec (``layers``, ``n_layers``)
is passed on, and ``base_hparams`` sets the rest (e.g. ``base="rome", n_layers=1,
base_hparams={"v_steps": 25}``). A base that itself wraps a base (``prune``, ``rect``) is refused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field

import torch

from locate.errors import InvalidHparamsError, MethodNotAvailableError

from ..edit import Edit, WeightDelta
from ..registry import EditMethod, Runtime, get_method, register
from ..request import InvalidRequestError, Request
from .memit import MEMITHparams


# --------------------------------------------------------------------------- a method on top of another
@dataclass
class BaseMethodHparams(MEMITHparams):
    """What a method that reworks another method's weight update needs besides its own settings:
    the base method and its hyperparameters. MEMIT's fields (inherited) are the base's when the base is
    MEMIT; for another base only ``layers``/``n_layers`` pass on and ``base_hparams`` sets the rest."""

    base: str = "memit"  # the registered weight-editing method whose update is reworked
    base_hparams: dict = field(default_factory=dict)  # that method's hyperparameters (overrides of its defaults)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.base_hparams, dict):
            raise InvalidHparamsError(f"base_hparams must be a dict, got {type(self.base_hparams).__name__}")
        try:
            m = get_method(self.base)
        except MethodNotAvailableError as e:
            raise InvalidHparamsError(f"base: {e}") from e
        if "base" in {f.name for f in dataclasses.fields(m.hparams)}:
            raise InvalidHparamsError(f"base {self.base!r} itself reworks another method's update; "
                                      "give a method that computes its own (memit, rome, emmet, alphaedit, ...)")
        if m.layers is None:
            raise InvalidHparamsError(f"base {self.base!r} edits no layers, so it has no weight update to rework")

    def base_method(self) -> EditMethod:
        return get_method(self.base)

    def make_base_hparams(self):
        """The base method's hyperparameters: the shared fields when the base's dataclass is one this one
        extends (MEMIT), else the layer spec only; ``base_hparams`` on top."""
        m = self.base_method()
        own = {f.name for f in dataclasses.fields(m.hparams)}
        if isinstance(self, m.hparams):
            passed = {n: getattr(self, n) for n in own}
        else:
            passed = {n: getattr(self, n) for n in ("layers", "n_layers") if n in own}
        return m.make_hparams({**passed, **self.base_hparams})


def base_update(lm, requests: list[Request], hp: BaseMethodHparams, rt: Runtime, who: str) -> Edit:
    """The base method's edit of ``requests`` (unapplied; the model is left as it was), checked to be
    made of weight deltas only. ``who`` names the calling method in error messages."""
    m = hp.base_method()
    if not m.batched and len(requests) != 1:
        raise InvalidRequestError(f"{who} on {m.name}: {m.name} edits one fact at a time; got {len(requests)} requests")
    e = m.compute_fn(lm, requests, hp.make_base_hparams(), rt)
    if not e.deltas or len(e.deltas) != len(e.interventions):
        raise InvalidHparamsError(f"{who} reworks weight updates; {m.name}'s edit is made of {e.kinds}")
    return e


def wrapped_edit(method: str, base: Edit, interventions: list, hp: BaseMethodHparams, timings: dict,
                 extra_hparams: dict, extra_metrics: dict) -> Edit:
    """The edit of ``method`` built from the base method's edit ``base`` with its deltas replaced."""
    return Edit(method, base.requests, interventions, base.fingerprint, model_name=base.model_name,
                layer_reason=base.layer_reason,
                hparams={**asdict(hp), "layers": base.layers, "base_record": base.hparams, **extra_hparams},
                timings={**{f"base_{k}": v for k, v in base.timings.items()}, **timings},
                loss_trace=base.loss_trace, metrics={**base.metrics, **extra_metrics}, state=dict(base.state))


# --------------------------------------------------------------------------- RECT
@dataclass
class RECTHparams(BaseMethodHparams):
    """RECT's hyperparameters: the share of entries kept, and the base method (MEMIT's, inherited)."""

    keep_fraction: float = 0.2  # k: share of each edited matrix's entries kept, by relative change (paper: 20%)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.keep_fraction <= 1.0:
            raise InvalidHparamsError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")


def relative_change(delta: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """ρ = |Δ| / |W| entrywise, float64: +inf where W = 0 and Δ ≠ 0, 0 where both are 0."""
    d, w = delta.double().abs(), W.double().abs().to(delta.device)
    rho = d / w
    return torch.where(w == 0, torch.where(d == 0, torch.zeros_like(d), torch.full_like(d, float("inf"))), rho)


def top_relative_mask(delta: torch.Tensor, W: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """M: True at the n − ⌊n(1 − k)⌋ entries of largest relative change |Δ|/|W| (ties broken by position)."""
    rho = relative_change(delta, W).flatten()
    n = rho.numel()
    n_keep = n - int(n * (1.0 - keep_fraction))
    order = torch.sort(rho, descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=rho.device)
    mask[order[:n_keep]] = True
    return mask.reshape(delta.shape)


@register("rect", RECTHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 2},
          description="RECT: a MEMIT (or other) update with only its top-k% relative changes kept (Gu et al. 2024)")
def compute_rect(lm, requests: list[Request], hp: RECTHparams, rt: Runtime) -> Edit:
    """The RECT edit of ``requests`` (not applied): the base method's update with all but the top-k% of
    each matrix's entries, ranked by |Δ|/|W|, set to zero. The model is untouched, also on failure."""
    t0 = time.perf_counter()
    base = base_update(lm, requests, hp, rt, "rect")
    t1 = time.perf_counter()
    kept, record = [], []
    with torch.no_grad():
        for d in base.deltas:
            W = lm.parameter(d.param)
            delta = d.matrix().to(W.device)
            mask = top_relative_mask(delta, W, hp.keep_fraction)
            sparse = torch.where(mask, delta, torch.zeros_like(delta))
            kept.append(WeightDelta(d.param, dense=sparse.to(W.dtype)))
            record.append({"param": d.param, "kept": int(mask.sum()), "entries": mask.numel(),
                           "norm_before": float(delta.double().norm()), "norm_after": float(sparse.double().norm())})
    return wrapped_edit("rect", base, kept, hp, {"rect_s": time.perf_counter() - t1, "total_s": time.perf_counter() - t0},
                        {}, {"rect": record})
