"""Scoring commonsense edits as MEMIT-CSK's authors do (Gupta et al. 2023, ``memit_csk_experiment/py/eval_utils_csk.py``).

A statement is judged by the model's next token after ``"<statement>:"``: its argmax, decoded, is the
prediction; anything other than ``" True"`` or ``" False"`` counts as ``"None"`` (wrong for every label).

Configuration generalisation (the edit and edit-validation sets, :func:`config_scores`), before vs after
the edits of the statements the unedited model got wrong:

    efficacy = #(wrong before, right after) / #(wrong before) × 100
    relapse  = #(right before, wrong after) / #(right before) × 100
    accuracy before / after (× 100)

Semantic generalisation (the probe set, :func:`probe_scores`), after editing the probe cases: accuracy
(× 100) of the predictions on each probe type against its label:

    affected_paraphrase, affected_neighborhood_{subject,verb,object}:  the case's label
    affected_reasoning:                                                 " True" (they are true statements)
    unaffected_neighborhood_{subject,object}:  the unedited model's own prediction (agreement, × 100)
    efficacy: the edited statements themselves, against their labels.

``affected_neighborhood`` pools the subject/verb/object neighbourhood probes (every probe statement
counts once); the authors report the three separately, which are here too. The authors also print a
weighted F1 over the three classes; only accuracy is computed here.
"""

from __future__ import annotations

from typing import Sequence

import torch

from locate import resolve_model
from locate.errors import InvalidArgumentError

from .datasets import CSK_LABELS, CSK_PROBE_TYPES, Case

NONE_LABEL = "None"
_ROWS = 32  # statements per forward
AFFECTED_NEIGHBORHOOD = ("affected_neighborhood_subject", "affected_neighborhood_verb", "affected_neighborhood_object")
UNAFFECTED = ("unaffected_neighborhood_subject", "unaffected_neighborhood_object")


@torch.no_grad()
def predict_labels(statements: Sequence[str], *, model=None) -> list[str]:
    """The model's judgement of each statement: the decoded argmax after ``"<statement>:"`` (a
    statement already ending in ":" is read as it is), ``" True"``/``" False"`` or ``"None"``."""
    lm = resolve_model(model)
    prompts = [s if s.endswith(":") else s + ":" for s in statements]
    out = []
    for i in range(0, len(prompts), _ROWS):
        logits = lm.last_logits(prompts[i: i + _ROWS])
        for tok in logits.argmax(-1).tolist():
            word = lm.tokenizer.decode([tok])
            out.append(word if word in CSK_LABELS.values() else NONE_LABEL)
    return out


def _pct(hits: int, total: int) -> float | None:
    return None if total == 0 else 100.0 * hits / total


def config_scores(labels: Sequence[str], before: Sequence[str], after: Sequence[str]) -> dict:
    """Efficacy, relapse and accuracy before/after (module docstring), in percent; ``None`` where the
    denominator is empty (e.g. efficacy when the unedited model got everything right)."""
    if not len(labels) == len(before) == len(after):
        raise InvalidArgumentError(f"labels, before and after differ in length: {len(labels)}, {len(before)}, {len(after)}")
    wrong = [i for i, (y, b) in enumerate(zip(labels, before)) if b != y]
    right = [i for i, (y, b) in enumerate(zip(labels, before)) if b == y]
    return {"efficacy": _pct(sum(after[i] == labels[i] for i in wrong), len(wrong)),
            "relapse": _pct(sum(after[i] != labels[i] for i in right), len(right)),
            "accuracy_before": _pct(len(right), len(labels)),
            "accuracy_after": _pct(sum(a == y for a, y in zip(after, labels)), len(labels)),
            "n": len(labels), "n_wrong_before": len(wrong)}


def probe_predictions(cases: Sequence[Case], *, model=None) -> dict[str, list[list[str]]]:
    """Per probe type (and ``"efficacy"``: the statements themselves), each case's predictions."""
    lm = resolve_model(model)
    out: dict[str, list[list[str]]] = {"efficacy": [[p] for p in predict_labels([c.extra["statement"] for c in cases],
                                                                                 model=lm)]}
    for t in CSK_PROBE_TYPES:
        flat = [s for c in cases for s in c.extra["probes"].get(t, [])]
        preds = iter(predict_labels(flat, model=lm))
        out[t] = [[next(preds) for _ in c.extra["probes"].get(t, [])] for c in cases]
    return out


def probe_scores(cases: Sequence[Case], after: dict[str, list[list[str]]],
                 before: dict[str, list[list[str]]] | None = None) -> dict:
    """Accuracy (percent) per probe type of the predictions ``after`` the edits (module docstring);
    the unaffected neighbourhoods need the unedited predictions ``before``."""
    scores: dict = {}
    for t, preds in after.items():
        if t in UNAFFECTED:
            if before is None:
                continue
            pairs = [(p, b) for ps, bs in zip(preds, before[t]) for p, b in zip(ps, bs)]
        else:
            gold = (lambda c: CSK_LABELS[1]) if t == "affected_reasoning" else (lambda c: c.extra["label"])
            pairs = [(p, gold(c)) for c, ps in zip(cases, preds) for p in ps]
        scores[t] = _pct(sum(p == y for p, y in pairs), len(pairs))
        scores[f"n_{t}"] = len(pairs)
    hits = total = 0
    for t in AFFECTED_NEIGHBORHOOD:
        if scores.get(t) is not None:
            hits += scores[t] * scores[f"n_{t}"] / 100.0
            total += scores[f"n_{t}"]
    scores["affected_neighborhood"] = _pct(round(hits), total)
    return scores
