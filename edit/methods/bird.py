"""BIRD: Bidirectionally Inversible Relationship moDeling (Ma, Gu, Ling, Liu & Liu 2023, "Untying the
Reversal Curse via Bidirectional Language Model Editing").

Edited models recall a new fact (s, r, o*) in the direction it was written ("The capital of France is"
→ London) but not in reverse ("London is the capital of" → France): the reversal curse. BIRD is ROME
(:mod:`edit.methods.rome`) whose v* objective also models the relation in both directions, in the
spirit of translation embeddings (s + r ≈ o): the subject's representation should sit where the new
object plus the inverse relation point, and move away from where the old object points.

Representations (per context template x_j, the final hidden state, i.e. the unembedding's input,
averaged over the phrase's tokens with the phrase placed in the template by itself):

    s_j     the subject in x_j + s, with v*'s δ added at its last token (the only term δ moves)
    r_j     the relation phrase in x_j + r,   r⁻¹_j  the inverse relation phrase in x_j + r⁻¹
    o*_j    the new object in x_j + o*,       o_j    the old object (``target_true``) in x_j + o

BIRD's term (the reference code's form, summed over the templates):

    L_BIRD = α Σ_j [ ‖s_j + r_j − o*_j‖ + ‖o*_j + r⁻¹_j − s_j‖                 forward and reverse, new object
                    − β (‖s_j + r_j − o_j‖ + ‖o_j + r⁻¹_j − s_j‖) ]           away from the old object

    δ = argmin  L_ROME(δ) + L_BIRD(δ)      (L_ROME: ROME's eq. 4, :mod:`edit.vstar`)

and then ROME's rank-one update writes v* = h_0 + δ (key, statistics and Λ exactly as ROME's, with its
``key`` option). The early stop looks at L_ROME alone, as the reference does.

Reference: the authors' BAKE repository (mjy1111/BAKE, its EasyEdit ROME with ``compute_v2``), which
this follows: α = 2·10⁻⁴ and β = 1 (its defaults), ROME's GPT-2-XL v* settings and 21 templates,
relation phrases per relation (its table maps e.g. P36 to "has capital" / "is the capital of"), the
object without its leading space. The representations are read as there (the last hidden state, after
the final norm), except that each phrase's tokens are found by character offsets in the templated
text rather than by counting the phrase's tokens from the end. The paper's text writes the term with
α and β as two separate weights; the code multiplies α into both parts, and so does this.

Inputs. r and r⁻¹ are phrases, not templates, given as the hyperparameters ``relation`` and
``inverse_relation`` (one edit is one fact, so one relation); without them BIRD refuses
(:class:`MissingRelationError`). The old object is the request's ``target_true``; without it BIRD
refuses unless ``beta=0``.

Evaluation. BAKE itself (the paper's benchmark) could not be obtained for this toolkit; the stand-in
for reversibility is zsRE's ``zsre/zsre_inverse_relation.json``, whose ``inverse question`` asks for
the subject from the new object. That file carries no relation phrases, so r and r⁻¹ must be written
per relation by the user. Departure from the reference: none in the maths; δ's optimisation is the
toolkit's batched v* (prefix cache, per-request early stop), identical in its numbers to ROME's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from locate.errors import InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit
from ..registry import Runtime, register
from ..request import InvalidRequestError, Request
from ..vstar import ExtraObjective
from .rome import SMOKE as ROME_SMOKE
from .rome import ROMEHparams, rome_edit

FINAL = "unembed.hook_in"  # the final hidden state: the unembedding's input (after the final norm)


class MissingRelationError(InvalidHparamsError):
    """BIRD needs the relation phrase r and the inverse relation phrase r⁻¹ of the fact it writes."""


class MissingOldObjectError(InvalidRequestError):
    """BIRD's β term moves away from the old object, which the request does not name."""


@dataclass
class BIRDHparams(ROMEHparams):
    """BIRD's hyperparameters: ROME's (inherited, the reference's GPT-2-XL values) plus the bidirectional
    term's weights and the relation phrases."""

    relation: str | None = None  # r, e.g. "is located in" (required; the reference's per-relation table)
    inverse_relation: str | None = None  # r⁻¹, e.g. "is the location of" (required)
    alpha: float = 2e-4  # α: weight of the bidirectional term (reference default 0.0002)
    beta: float = 1.0  # β: weight of the old-object part inside it (reference default 1)

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0:
            raise InvalidHparamsError(f"alpha and beta must be non-negative, got {self.alpha} and {self.beta}")


def _phrase_tokens(lm, template: str, phrase: str) -> tuple[list[int], list[int]]:
    """Token ids of ``template`` with ``phrase`` in its slot, and the positions of the phrase's tokens
    (every token that overlaps its characters)."""
    text = template.replace("{}", phrase)
    start = template.index("{}")
    end = start + len(phrase)
    ids, offsets = lm._char_offsets(text)
    pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not pos:
        raise InvalidRequestError(f"no token of {phrase!r} found in {text!r}")
    return ids, pos


@torch.no_grad()
def phrase_means(lm, templates: Sequence[str], phrase: str) -> torch.Tensor:
    """The final hidden state averaged over ``phrase``'s tokens, in each template, (T, d_model) float32."""
    rows, spans = zip(*(_phrase_tokens(lm, t, phrase) for t in templates))
    with capture(lm, FINAL) as got:
        lm.forward(lm.pad(rows))
    h = got[FINAL].float()
    return torch.stack([h[j, span].mean(0) for j, span in enumerate(spans)])


def bird_objective(lm, request: Request, templates: Sequence[str], hp: BIRDHparams) -> ExtraObjective:
    """L_BIRD (module docstring) as an extra term of the v* optimisation: its rows are x_j + s, δ added and
    the final state read at the subject's last token; the subject's earlier tokens and every other
    representation are constants, read on the model as it is (no δ)."""
    new_obj, old_obj = request.target_new.strip(), (request.target_true or "").strip()
    r, r_inv, o_new = (phrase_means(lm, templates, p) for p in (hp.relation, hp.inverse_relation, new_obj))
    o_old = phrase_means(lm, templates, old_obj) if hp.beta else None
    rows, spans = zip(*(_phrase_tokens(lm, t, request.subject.strip()) for t in templates))
    with torch.no_grad(), capture(lm, FINAL) as got:  # the subject's tokens before its last: no δ reaches them
        lm.forward(lm.pad(rows))
    h = got[FINAL].float()
    rest_t = torch.stack([h[j, span[:-1]].sum(0) for j, span in enumerate(spans)])
    count = [len(span) for span in spans]
    count_t = torch.tensor(count, device=lm.device, dtype=torch.float32)[:, None]

    def loss(h_last: torch.Tensor) -> torch.Tensor:
        s = (rest_t + h_last) / count_t  # (T, d_model): the subject's mean, its last token carrying δ
        term = (s + r - o_new).norm(dim=-1) + (o_new + r_inv - s).norm(dim=-1)
        if o_old is not None:
            term = term - hp.beta * ((s + r - o_old).norm(dim=-1) + (o_old + r_inv - s).norm(dim=-1))
        return hp.alpha * term.sum()[None]  # one request

    return ExtraObjective(rows=rows, positions=[span[-1] for span in spans], owners=[0] * len(rows), loss=loss)


def _check_inputs(request: Request, hp: BIRDHparams) -> None:
    missing = [n for n in ("relation", "inverse_relation") if not (getattr(hp, n) or "").strip()]
    if missing:
        raise MissingRelationError(
            f"BIRD needs the relation phrase r and the inverse relation phrase r⁻¹ of the fact (hyperparameters "
            f"'relation' and 'inverse_relation', e.g. 'is located in' / 'is the location of'); missing: {missing}")
    if hp.beta and not (request.target_true or "").strip():
        raise MissingOldObjectError(
            f"BIRD's β term moves away from the old object, but the request {request.rendered!r} has no "
            "target_true: give it one, or set beta=0")


SMOKE = {**ROME_SMOKE, "relation": "is located in", "inverse_relation": "is the location of"}


@register("bird", BIRDHparams, batched=False, layers=1, smoke=SMOKE,
          description="BIRD: ROME whose v* also models the fact's reverse direction (Ma et al. 2023)")
def compute_bird(lm, requests: list[Request], hp: BIRDHparams, rt: Runtime) -> Edit:
    """The BIRD edit of one request (not applied): ROME's update with v* optimised under L_ROME + L_BIRD.
    Refused before any work without the relation phrases (or the old object, when β > 0); if anything
    fails the model is untouched."""
    (request,) = requests
    _check_inputs(request, hp)
    # ROME's steps, with v* optimised under ROME's loss plus the bidirectional term
    e = rome_edit(lm, request, hp, rt, method="bird", extra=lambda templates: bird_objective(lm, request, templates, hp))
    e.metrics["bird_term"] = e.metrics.pop("extra_term")
    return e
