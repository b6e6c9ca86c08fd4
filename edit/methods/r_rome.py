"""r-ROME: ROME with one key throughout the update (Gupta & Anumanchipalli 2024, "Rebuilding ROME").

ROME (:mod:`edit.methods.rome`, Meng et al. 2022, eq. 2) inserts a key-value pair (k*, v*) into the
MLP output projection W of one layer:

    Ŵ = W + Λ* (C⁻¹ k*)ᵀ,       Λ* = (v* − (W k* + b)) / ((C⁻¹ k*)ᵀ k*),
    k* = 1/N Σ_j k(x_j + s)     (the key averaged over the N context templates, eq. 3)

so that Ŵ k* + b = v*. The reference implementation (``rome/compute_v.py``) builds the direction
C⁻¹k* from the averaged key but computes Λ's numerator and denominator from k = k(s), the key of the
un-prefixed prompt alone:

    Λ = (v* − (W k + b)) / ((C⁻¹ k*)ᵀ k).

Ŵ then maps k, not k*, to v*, and when k and k* point apart the denominator (C⁻¹k*)ᵀk is small and
Λ huge. Gupta et al. trace the "disabling edits" that collapse a model under sequential ROME editing
to this mismatch, and rebuild the update with k* in both places (their equation above). That is all
r-ROME changes: same layer, same v* optimisation (v* = v(s) + δ with δ optimised over the templates,
ROME eq. 4), same statistics C = E[k kᵀ], same templates.

What the code of the paper (``scalable-model-editing/rebuilding-rome``, ``enable_random_prefix_keys``,
its default) and EasyEdit's port (``easyeditor/models/r_rome``) do, checked line by line against
:func:`edit.methods.rome.compute_rome` with ``key="averaged"``:

* u = C⁻¹ k* with k* the uniform mean of the keys over all templates (the bare "{}" included), as
  ROME's ``compute_u``; both normalise u, which cancels in Λ uᵀ;
* the value they subtract is the MLP output averaged over the same templates, which is W k* + b
  because the output projection is affine; the target is the bare prompt's value plus δ (their
  ``target_init + delta``), ours ``v* = h₀ + δ`` with h₀ the bare prompt's value (edit.vstar);
* Λ's denominator is (C⁻¹k*)ᵀk*;
* the v* optimisation (rewrite prompts, the "{} is a" KL prompt read at the subject's last token,
  20 steps, lr 0.5, weight decay 0.5, clamp 4, KL 0.0625) and the templates ((5, 10), (10, 10)) are
  ROME's; so is C (``mom2_adjustment: true`` in the paper's configs; EasyEdit's R-ROME configs turn
  it off, as its ROME configs do).

So r-ROME is ROME with ``key="averaged"``, registered under its own name: same numbers, an edit
labelled ``r-rome``. Not built: the papers' other variant, ``enable_prompt_keys`` (the bare prompt's
key k used in both places, u = C⁻¹k), which rome.py has no switch for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..edit import Edit
from ..registry import Runtime, register
from ..request import Request
from .rome import SMOKE, ROMEHparams, compute_rome


@dataclass
class RROMEHparams(ROMEHparams):
    """r-ROME's hyperparameters: ROME's (the paper's GPT-2-XL/GPT-J settings, as the r-ROME code keeps
    them), with the key k* used consistently. ``key="original"`` gives back the reference ROME update
    (for ablations)."""

    key: str = "averaged"  # Λ's key: k*, the key the direction C⁻¹k* is built from (r-ROME)


@register("r-rome", RROMEHparams, batched=False, layers=1, smoke=SMOKE,
          description="r-ROME: ROME with the averaged key used consistently (Gupta & Anumanchipalli 2024)")
def compute_r_rome(lm, requests: list[Request], hp: RROMEHparams, rt: Runtime) -> Edit:
    """The r-ROME edit of one request (not applied): ROME's rank-one update with Λ computed from the
    averaged key k*, so that Ŵ k* + b = v*. The model is untouched, also when it fails."""
    e = compute_rome(lm, requests, hp, rt)
    e.method = "r-rome"
    return e
