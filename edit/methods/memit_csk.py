"""MEMIT-CSK: MEMIT at the subject, verb or object of a commonsense statement (Gupta et al. 2023,
"Editing Common Sense in Transformers", EMNLP).

A commonsense judgement is a statement and its truth value, e.g. ``"A horse rides a bicycle:" -> " False"``.
Unlike an encyclopaedic fact it has no privileged subject: the paper's causal traces find the judgement
mediated by early MLP layers at the subject, the verb *and* the object. MEMIT-CSK is MEMIT (Meng et
al. 2023, :mod:`edit.methods.memit`) with the *edit token* t ∈ {subject, verb, object} in the place of
MEMIT's subject everywhere:

    z_i   (eq. 16)  the target block-L output at the last token of t_i (and the KL term's "{} is a"
                    prompt filled with t_i, as the authors' compute_z does with request[noise_token]);
    k_i^l (eq. 19)  the MLP keys of layer l at the last token of t_i, averaged over context templates;
    Δ_l   (eq. 14)  MEMIT's per-layer solve, unchanged.

This is exactly what the authors' code does: their dataset loader replaces the chosen word of the
prompt by ``{}`` and passes that word as MEMIT's "subject". Here the request is rebound the same way
(:func:`at_edit_token`) and handed to MEMIT's own compute (imported, not copied); the edit records the
original requests. The verb and object come from ``Request.spans`` (``{"verb": ..., "object": ...}``;
:func:`edit.eval.datasets.load_csk` fills them from the SVO annotation); asking for a token a request does
not name is refused (:class:`MissingSpanError`) before any work.

Layers.  The authors search the window (its last layer and size) on the edit-validation set; their
configs edit GPT-2 layers 1-5. The toolkit's analogue is a window chosen by tracing the edit token:
:func:`edit_token_profile` traces each statement with the edit token noised
(``locate.trace(corrupt=...)``, noise 3 × the std of the embeddings of the traced words, the authors'
rule), reads the MLP indirect effect at the edit token's last row, averages it over statements, and
returns a :class:`locate.LayerProfile`; pass it as ``layers=`` (``locate.resolve_layers`` picks its
``n_layers`` window). ``layers="auto"`` stays MEMIT's (the subject-token calibration profile), so that
the harness, which pins ``"auto"`` before running, and a direct call edit the same layers.

Defaults (the authors' ``hparams/MEMIT_CSK/gpt2-xl.json`` and command line): ``edit_token="subject"``
(the command line's default; their tuned runs choose per dataset and model, e.g. ``object`` for 20Q on
GPT-2 XL), a window of 5 layers, 20 z steps at lr 0.5, weight decay 0.5, KL 0.0625, ‖δ‖ ≤ 0.75‖h‖,
λ = 20,000 on GPT-2 XL (d_mlp = 6,400), scaled to this model's d_mlp as MEMIT scales its λ
(:mod:`edit.methods.memit`): λ = 20,000 · d_mlp / 6,400. ``edit_location="last"`` only: the authors'
``first`` option (the first token of the word) is not offered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from locate import LayerProfile, resolve_model, trace
from locate.errors import InvalidHparamsError

from ..edit import Edit
from ..registry import Runtime, register
from ..request import InvalidRequestError, Request
from .memit import MEMITHparams, compute_memit

EDIT_TOKENS = ("subject", "verb", "object")
CSK_LAMBDA = 20_000.0  # the authors' mom2_update_weight for GPT-2 XL ...
CSK_D_MLP = 6_400  # ... whose MLP is this wide


class MissingSpanError(InvalidRequestError):
    """MEMIT-CSK was asked to edit at a token (verb, object) the request does not name in its spans."""


@dataclass
class MEMITCSKHparams(MEMITHparams):
    """MEMIT-CSK hyperparameters: MEMIT's (the authors' GPT-2 XL values are MEMIT's defaults), plus
    the edit token; λ's default follows the authors' 20,000 for GPT-2 XL (module docstring)."""

    edit_token: str = "subject"  # "subject" | "verb" | "object": whose last token carries z and the keys

    def __post_init__(self):
        super().__post_init__()
        if self.edit_token not in EDIT_TOKENS:
            raise InvalidHparamsError(f"edit_token must be one of {EDIT_TOKENS}, got {self.edit_token!r}")

    def lam(self, d_mlp: int) -> float:
        if self.mom2_update_weight is not None:
            return float(self.mom2_update_weight)
        return CSK_LAMBDA * d_mlp / CSK_D_MLP


def _span_text(r: Request, edit_token: str) -> str:
    if edit_token == "subject":
        return r.subject
    text = (r.spans.get(edit_token) or "").strip()
    if not text:
        raise MissingSpanError(
            f"memit-csk with edit_token={edit_token!r} needs the request to name its {edit_token} "
            f"(Request.spans[{edit_token!r}]); {r!r} has spans {r.spans!r}. edit.eval.datasets.load_csk "
            "fills them from the SVO annotation; or use edit_token='subject'")
    return text


def at_edit_token(r: Request, edit_token: str) -> Request:
    """``r`` rebound so that its ``{}`` marks the edit token: the same rendered text, with the verb or
    object as MEMIT's "subject" (the authors' loader does the same). The word is taken where it stands
    as a whole word outside the subject (the first such place), else anywhere outside the subject."""
    text = _span_text(r, edit_token)
    if edit_token == "subject":
        return r
    rendered = r.rendered
    s0 = r.prompt.index("{}")
    s1 = s0 + len(r.subject)
    found = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(text)}(?!\w)", rendered)]
    found += [m.start() for m in re.finditer(re.escape(text), rendered)]
    outside = [i for i in found if i + len(text) <= s0 or i >= s1]
    if not outside:
        raise MissingSpanError(f"the {edit_token} {text!r} of {r!r} is not in its rendered prompt outside the subject")
    i = outside[0]
    return Request(rendered[:i] + "{}" + rendered[i + len(text):], text, r.target_new, r.target_true,
                   paraphrases=r.paraphrases, spans={**r.spans, "subject": r.subject})


def edit_token_profile(requests: Sequence[Request], edit_token: str = "subject", *, model=None, samples: int = 3,
                       noise=None, window: int | None = None, seed: int = 0) -> LayerProfile:
    """The MLP indirect effect per layer at the last token of each statement's edit token, with that
    token's embeddings noised (``locate.trace(corrupt=...)``), averaged over ``requests``; the answer
    traced is the model's clean top-1 continuation of each rendered prompt. ``noise=None`` is the
    authors' rule: 3 × the std of the embeddings of the traced words (all requests' edit tokens);
    anything else is passed to :func:`locate.trace`. Pass the result as ``layers=`` to choose the
    window."""
    lm = resolve_model(model)
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("edit_token_profile needs at least one request to trace")
    words = [_span_text(r, edit_token) for r in requests]  # refuses a missing span before any tracing
    nu = words if noise is None else noise
    rows = []
    for r, w in zip(requests, words):
        tr = trace(r.rendered, r.subject, model=lm, corrupt=w, kinds=("mlp",), samples=samples, noise=nu,
                   window=window, seed=seed, tokens=["last_corrupted"], progress=False)
        rows.append(tr.ie("mlp")[tr.token_index("last_corrupted")])
    return LayerProfile(aie=np.mean(rows, axis=0), n_facts=len(rows),
                        source=f"memit-csk: traces of {len(rows)} statements with the {edit_token} noised, "
                               f"MLP effect at its last token", model=lm.name, fingerprint=lm.fingerprint,
                        samples=samples, trace_window=tr.window, noise_level=tr.noise_level,
                        noise_source=tr.noise_source)


@register("memit-csk", MEMITCSKHparams, batched=True, layers="window",
          smoke={"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 2},
          description="MEMIT-CSK: MEMIT at the subject, verb or object token of commonsense statements "
                      "(Gupta et al. 2023)")
def compute_memit_csk(lm, requests: list[Request], hp: MEMITCSKHparams, rt: Runtime) -> Edit:
    """The MEMIT edit of ``requests`` with z and the keys read at each request's edit token (the
    subject, or ``Request.spans["verb"/"object"]``), not applied. A request without the asked span is
    refused (:class:`MissingSpanError`) before any work."""
    bound = [at_edit_token(r, hp.edit_token) for r in requests]
    e = compute_memit(lm, bound, hp, rt)
    kept = set(e.requests)  # MEMIT drops exact repeats
    originals, seen = [], set()
    for r, b in zip(requests, bound):
        if b in kept and b not in seen:
            originals.append(r)
            seen.add(b)
    e.method, e.requests = "memit-csk", originals
    e.hparams["edit_prompts"] = [b.prompt for b in bound]
    return e
