"""Evaluation datasets: each record becomes one :class:`Case`, i.e. the edit request(s) plus the
prompts that evaluate them.

=========================  ====================================================================
loader                     file(s) and schema
=========================  ====================================================================
:func:`load_counterfact`   ``counterfact/counterfact_dev_800.json`` (ROME schema: requested_rewrite,
                           paraphrase / neighborhood / attribute / generation prompts); the EasyEdit
                           ``easyedit_rome_format/*.json`` files add ``portability`` (used when present)
:func:`load_counterfact_easyedit`  ``counterfact/easyedit_format/*.json`` (simplified: one rephrase and one
                           locality prompt per case)
:func:`load_zsre`          ``zsre/zsre_dev_800.json`` (src, alt, answers, rephrase, loc, loc_ans, portability)
:func:`load_mquake`        ``mquake/*.json`` (several requested rewrites per case, multi-hop questions)
:func:`load_known`         ``known_1000/known_1000.json`` (facts the model knows; for tracing, no counterfactual)
:func:`load_piqa`          ``locality/piqa_valid.jsonl`` + ``piqa_valid-labels.lst`` (general ability, not edits)
=========================  ====================================================================

Conventions. Targets carry a leading space (``" Paris"``), as the ROME code writes them before
tokenizing; the prompt never ends in a space. zsRE follows EasyEdit and the knowledge-editing survey:
the edit writes ``alt`` and ``answers[0]`` is the fact it replaces (the ROME code's own zsRE loader used
``answers[0]`` as the new target; pass ``target_field="answers"`` for that).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from locate._io import data_dir_candidates
from locate.errors import InvalidArgumentError, LocateEditError

from ..request import Request


class DatasetError(LocateEditError, ValueError):
    """A dataset file is missing or does not have the schema its loader expects."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset file does not exist (the message names it)."""


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer(s) we check the model against. ``answers[0]`` is the one scored."""

    prompt: str
    answers: tuple[str, ...]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class Case:
    """One evaluation case: the edit request(s) and everything used to score them.

    ``requests[0]`` is *the* request for single-fact datasets; MQuAKE cases carry several.
    CounterFact fills ``paraphrase_prompts``/``neighborhood_prompts`` (scored as P(new) vs P(true))
    and ``generation_prompts`` (fluency); zsRE and the simplified CounterFact fill ``rephrase`` and
    ``locality`` probes (scored by token accuracy); ``portability`` holds one-hop / multi-hop
    questions whose answer should change with the edit.
    """

    case_id: int | str
    dataset: str
    requests: list[Request]
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def request(self) -> Request:
        return self.requests[0]

    @property
    def rewrite_prompts(self) -> list[str]:
        return [r.rendered for r in self.requests]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["requests"] = [r.to_dict() for r in self.requests]
        return d


# --------------------------------------------------------------------------- helpers
def _space(s: str) -> str:
    s = str(s)
    return s if s.startswith(" ") else " " + s


def _read(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _need(record: dict, keys: tuple[str, ...], path: Path, i: int) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(f"{path} record {i}: missing field(s) {missing}; is this the right loader for this file?")


def _template(text: str, subject: str) -> str:
    """``text`` with the subject replaced by ``{}`` (first occurrence)."""
    i = text.find(subject)
    if i < 0:
        raise DatasetError(f"subject {subject!r} does not occur in {text!r}")
    return text[:i] + "{}" + text[i + len(subject):]


def _portability(p: Any) -> list[Probe]:
    """EasyEdit's ``portability`` field: {"New Question", "New Answer"} (one dict or a list)."""
    if not p:
        return []
    items = p if isinstance(p, list) else [p]
    out = []
    for it in items:
        q, a = it.get("New Question"), it.get("New Answer")
        if q and a:
            out.append(Probe(q, (_space(a),)))
    return out


def _first(cases: list[Case], n: int | None) -> list[Case]:
    return cases if n is None else cases[:n]


# --------------------------------------------------------------------------- CounterFact
def _counterfact_record(r: dict) -> Case:
    rw = r["requested_rewrite"]
    req = Request(rw["prompt"], rw["subject"], _space(rw["target_new"]["str"]), _space(rw["target_true"]["str"]))
    extra = {"relation_id": rw.get("relation_id"), "target_new_id": rw["target_new"].get("id"),
             "target_true_id": rw["target_true"].get("id")}
    for k in ("alternative_subject", "distracting_neighborhood_prompts", "unrelated_relation"):
        if k in r:
            extra[k] = r[k]
    return Case(r["case_id"], "counterfact", [req],
                paraphrase_prompts=list(r.get("paraphrase_prompts", [])),
                neighborhood_prompts=list(r.get("neighborhood_prompts", [])),
                attribute_prompts=list(r.get("attribute_prompts", [])),
                generation_prompts=list(r.get("generation_prompts", [])),
                portability=_portability(r.get("portability")), extra=extra)


def load_counterfact(path: str | Path, n: int | None = None) -> list[Case]:
    """CounterFact in the ROME schema (``counterfact_dev_800.json`` or an ``easyedit_rome_format`` file).

    ``n`` keeps the first ``n`` records in file order."""
    path = Path(path)
    data = _read(path, "CounterFact (ROME schema)")
    for i, r in enumerate(data[: n if n is not None else len(data)]):
        _need(r, ("case_id", "requested_rewrite"), path, i)
    return [_counterfact_record(r) for r in _first(data, n)]


def load_counterfact_easyedit(path: str | Path, n: int | None = None) -> list[Case]:
    """CounterFact in EasyEdit's simplified schema (``easyedit_format/counterfact-*.json``):
    the rewrite, one rephrase prompt and one locality prompt with its ground truth."""
    path = Path(path)
    data = _first(_read(path, "CounterFact (EasyEdit simplified schema)"), n)
    cases = []
    for i, r in enumerate(data):
        _need(r, ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt"), path, i)
        req = Request(_template(r["prompt"], r["subject"]), r["subject"], _space(r["target_new"]),
                      _space(r["ground_truth"]))
        loc = [Probe(r["locality_prompt"], (_space(r["locality_ground_truth"]),))] if r.get("locality_prompt") else []
        # CounterFact's neighbourhood prompts share the case's relation and true object; when the locality
        # answer is that object (every record of the shipped files), the prompt is one, and NS scores it.
        nbr = [r["locality_prompt"]] if loc and r["locality_ground_truth"] == r["ground_truth"] else []
        cases.append(Case(r.get("case_id", i), "counterfact_easyedit", [req], paraphrase_prompts=[r["rephrase_prompt"]],
                          neighborhood_prompts=nbr, locality=loc))
    return cases


# --------------------------------------------------------------------------- zsRE
def load_zsre(path: str | Path, n: int | None = None, *, target_field: str = "alt") -> list[Case]:
    """zsRE question answering edits (MEND's eval split as shipped by EasyEdit).

    The request is the question ``src`` with the subject as ``{}``; the target is ``alt`` (EasyEdit,
    the survey) or ``answers[0]`` (``target_field="answers"``, the ROME code). The rephrased question
    is the generality probe; ``loc`` with ``loc_ans`` the locality probe (scored as agreement with the
    unedited model); ``portability`` the one-hop question."""
    if target_field not in ("alt", "answers"):
        raise InvalidArgumentError(f"target_field must be 'alt' or 'answers', got {target_field!r}")
    path = Path(path)
    data = _first(_read(path, "zsRE"), n)
    cases = []
    for i, r in enumerate(data):
        _need(r, ("subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans"), path, i)
        new = r["alt"] if target_field == "alt" else r["answers"][0]
        true = r["answers"][0] if target_field == "alt" else None
        if true is not None and true.strip() == new.strip():
            true = None
        src = r["src"]
        prompt = _template(src, r["subject"]) if r["subject"] in src else None
        if prompt is None:  # a few questions spell the subject differently; fall back to case-insensitive
            j = src.lower().find(r["subject"].lower())
            if j < 0:
                raise DatasetError(f"{path} record {i}: subject {r['subject']!r} not in question {src!r}")
            prompt = src[:j] + "{}" + src[j + len(r["subject"]):]
            subject = src[j:j + len(r["subject"])]
        else:
            subject = r["subject"]
        req = Request(prompt, subject, _space(new), None if true is None else _space(true))
        cases.append(Case(i, "zsre", [req], paraphrase_prompts=[r["rephrase"]],
                          locality=[Probe(r["loc"], (_space(r["loc_ans"]),))],
                          portability=_portability(r.get("portability")),
                          extra={"answers": r["answers"], "pred": r.get("pred")}))
    return cases


# --------------------------------------------------------------------------- MQuAKE
def load_mquake(path: str | Path, n: int | None = None) -> list[Case]:
    """MQuAKE multi-hop cases (Zhong et al. 2023): every requested rewrite of a case becomes a request
    (they are applied together), and the three multi-hop questions, whose answer after the edits is
    ``new_answer`` (or one of ``new_answer_alias``), are the portability probes.

    ``extra`` keeps what the MQuAKE metrics (:func:`edit.eval.metrics.score_mquake`) need: the chain
    of facts after editing (``new_single_hops``: question, cloze, answer, answer_alias per hop), each
    hop's Wikidata relation (``new_hop_relations``, from ``orig.new_triples``) and, for each request,
    the index of the hop it edits (``edited_hops``, matched by the rewrite's ``question``)."""
    path = Path(path)
    data = _first(_read(path, "MQuAKE"), n)
    cases = []
    for i, r in enumerate(data):
        _need(r, ("case_id", "requested_rewrite", "questions", "new_answer"), path, i)
        reqs = [Request(rw["prompt"], rw["subject"], _space(rw["target_new"]["str"]), _space(rw["target_true"]["str"]))
                for rw in r["requested_rewrite"]]
        answers = tuple(_space(a) for a in [r["new_answer"], *r.get("new_answer_alias", [])])
        hops = list(r.get("new_single_hops", []))
        hop_questions = [h.get("question") for h in hops]
        edited = [hop_questions.index(rw["question"]) if rw.get("question") in hop_questions else None
                  for rw in r["requested_rewrite"]]
        triples = (r.get("orig") or {}).get("new_triples", [])
        relations = [t[1] for t in triples] if len(triples) == len(hops) else [None] * len(hops)
        cases.append(Case(r["case_id"], "mquake", reqs,
                          portability=[Probe(q, answers) for q in r["questions"]],
                          extra={"answer": r.get("answer"), "single_hops": r.get("single_hops", []),
                                 "new_single_hops": hops, "new_hop_relations": relations,
                                 "edited_hops": edited}))
    return cases


# --------------------------------------------------------------------------- known_1000
def load_known(path: str | Path, n: int | None = None) -> list[Case]:
    """ROME's known_1000 facts. There is no counterfactual: the request's ``target_new`` is the fact
    the model already predicts (``attribute``), which is what causal tracing needs."""
    path = Path(path)
    data = _first(_read(path, "known_1000"), n)
    cases = []
    for i, r in enumerate(data):
        _need(r, ("subject", "attribute", "prompt"), path, i)
        prompt = _template(r["prompt"], r["subject"]) if r["subject"] in r["prompt"] else r["template"]
        cases.append(Case(r.get("known_id", i), "known", [Request(prompt, r["subject"], _space(r["attribute"]))],
                          extra={"relation_id": r.get("relation_id"), "prediction": r.get("prediction")}))
    return cases


# --------------------------------------------------------------------------- PIQA (general ability)
@dataclass(frozen=True)
class ChoiceItem:
    """A two-way (or n-way) choice question: the model should prefer ``solutions[label]``."""

    goal: str
    solutions: tuple[str, ...]
    label: int


def load_piqa(path: str | Path, n: int | None = None, labels: str | Path | None = None) -> list[ChoiceItem]:
    """PIQA validation (Bisk et al. 2020) as EasyEdit ships it for the survey's "other task" locality:
    ``piqa_valid.jsonl`` (goal, sol1, sol2) and, beside it, ``piqa_valid-labels.lst`` (0 or 1 per line)."""
    path = Path(path)
    labels = Path(labels) if labels is not None else path.with_name(path.stem + "-labels.lst")
    for f in (path, labels):
        if not f.is_file():
            raise DatasetNotFoundError(f"PIQA file not found: {f}")
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labs = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
    if len(rows) != len(labs):
        raise DatasetError(f"{path} has {len(rows)} questions but {labels} has {len(labs)} labels")
    items = []
    for i, (line, lab) in enumerate(zip(rows[: n if n is not None else len(rows)], labs)):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} line {i + 1} is not JSON ({e})") from e
        _need(r, ("goal", "sol1", "sol2"), path, i)
        if lab not in ("0", "1"):
            raise DatasetError(f"{labels} line {i + 1}: label {lab!r} is not 0 or 1")
        items.append(ChoiceItem(r["goal"], (r["sol1"], r["sol2"]), int(lab)))
    return items


LOADERS = {
    "counterfact": load_counterfact,
    "counterfact_easyedit": load_counterfact_easyedit,
    "zsre": load_zsre,
    "mquake": load_mquake,
    "known": load_known,
}

# Where each dataset lives inside a data directory laid out like the project's shared/data.
DEFAULT_FILES = {
    "counterfact": "counterfact/counterfact_dev_800.json",
    "counterfact_easyedit": "counterfact/easyedit_format/counterfact-val.json",
    "zsre": "zsre/zsre_dev_800.json",
    "mquake": "mquake/MQuAKE-hard.json",
    "known": "known_1000/known_1000.json",
    "piqa": "locality/piqa_valid.jsonl",
}


def load_dataset(name: str, data_dir: str | Path, n: int | None = None, **kwargs) -> list[Case]:
    """``load_dataset("counterfact", "../shared/data", n=100)``: the named dataset from a data directory."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name](Path(data_dir) / DEFAULT_FILES[name], n, **kwargs)


def load_requests(path) -> list[Request]:
    """Requests from a JSON file: a list of ``{"prompt": "{} is in", "subject": ..., "target_new": ...}``
    objects (``target_true`` optional), or CounterFact records (``requested_rewrite``)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"requests file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not a JSON file: {e}") from e
    if isinstance(data, dict):
        data = [data]
    out = []
    for i, d in enumerate(data):
        if isinstance(d, dict) and "requested_rewrite" in d:
            out.append(_counterfact_record(d).request)
        elif isinstance(d, dict) and {"prompt", "subject", "target_new"} <= set(d):
            t = d["target_new"]["str"] if isinstance(d["target_new"], dict) else d["target_new"]
            out.append(Request(d["prompt"], d["subject"], t if t.startswith(" ") else " " + t, d.get("target_true")))
        else:
            raise DatasetError(f"{path}, item {i}: needs prompt, subject and target_new (or requested_rewrite)")
    return out


def find_data_dir(given: str | Path | None = None) -> Path:
    """``given``, else ``$LOCATE_EDIT_DATA``, else ``./shared/data``, ``../shared/data`` or the
    ``shared/data`` beside this checkout. Raises :class:`edit.eval.DatasetNotFoundError` naming where
    it looked."""
    cands = [Path(given).expanduser()] if given is not None else data_dir_candidates()
    for c in cands:
        if c.is_dir():
            return c
    raise DatasetNotFoundError(f"no data directory found (looked in {', '.join(map(str, cands))}); "
                               "pass Runtime(data_dir=...) or set LOCATE_EDIT_DATA")


# --------------------------------------------------------------------------- the survey's portability and locality files
def _question_request(r: dict) -> Request | None:
    """A zsRE-style record's request: the question ``src`` with the subject as ``{}`` (matched exactly,
    else case-insensitively), the new answer ``alt``, the old answer ``answers[0]``; None when the
    subject is not in the question (a few records name it differently)."""
    src, subject = r["src"], r["subject"]
    j = src.find(subject)
    if j < 0:
        j = src.lower().find(subject.lower())
    if j < 0:
        return None
    true = r["answers"][0] if r.get("answers") else None
    if true is not None and true.strip() == r["alt"].strip():
        true = None
    return Request(src[:j] + "{}" + src[j + len(subject):], src[j:j + len(subject)], _space(r["alt"]),
                   None if true is None else _space(true))


def load_zsre_subject_replace(path: str | Path, n: int | None = None) -> list[Case]:
    """zsRE edits with the survey's subject-replacement portability question
    (``zsre/zsre_subject_replace.json``): after writing (s, r, alt), the question about s's alias
    (``alter_subject_question``, about ``alternative_subject``) should be answered with ``alt`` too.
    The rephrased question is the generality probe; there is no locality probe in this file. Records
    whose subject is not in the question are left out (``extra["skipped"]`` of the first case counts them)."""
    path = Path(path)
    cases, skipped = [], 0
    for i, r in enumerate(_read(path, "zsRE subject replace")):
        if n is not None and len(cases) >= n:
            break
        _need(r, ("subject", "src", "alt", "answers", "rephrase", "alter_subject_question"), path, i)
        req = _question_request(r)
        if req is None:
            skipped += 1
            continue
        cases.append(Case(i, "zsre_subject_replace", [req], paraphrase_prompts=[r["rephrase"]],
                          portability=[Probe(r["alter_subject_question"], (req.target_new,))],
                          extra={"alternative_subject": r.get("alternative_subject")}))
    if cases:
        cases[0].extra["skipped"] = skipped
    return cases


def load_zsre_inverse_relation(path: str | Path, n: int | None = None) -> list[Case]:
    """zsRE edits with the survey's reversed-relation portability question
    (``zsre/zsre_inverse_relation.json``): after writing (s, r, o*), the question of the inverse
    relation about o* (field ``inverse question``) should be answered with the subject s. Records
    whose subject is not in the question are left out (``extra["skipped"]`` of the first case counts them)."""
    path = Path(path)
    cases, skipped = [], 0
    for i, r in enumerate(_read(path, "zsRE inverse relation")):
        if n is not None and len(cases) >= n:
            break
        _need(r, ("subject", "src", "alt", "answers", "rephrase", "inverse question"), path, i)
        req = _question_request(r)
        if req is None:
            skipped += 1
            continue
        cases.append(Case(i, "zsre_inverse_relation", [req], paraphrase_prompts=[r["rephrase"]],
                          portability=[Probe(r["inverse question"], (_space(req.subject),))]))
    if cases:
        cases[0].extra["skipped"] = skipped
    return cases


def load_counterfact_subject_replace(path: str | Path, n: int | None = None) -> list[Case]:
    """CounterFact (ROME schema) with the survey's subject-replacement portability
    (``easyedit_rome_format/counterfact_subject_replace.json``): the rewrite prompt about the subject's
    alias (``alternative_subject``) should be continued with ``target_new`` too. The file's other
    portability field, if any, is replaced by this probe."""
    path = Path(path)
    cases = load_counterfact(path, n)
    for i, c in enumerate(cases):
        alias = c.extra.get("alternative_subject")
        if not alias:
            raise DatasetError(f"{path} record {i}: no alternative_subject; is this the subject-replace file?")
        c.dataset = "counterfact_subject_replace"
        c.portability = [Probe(c.request.prompt.replace("{}", alias), (c.request.target_new,))]
    return cases


def load_counterfact_other_attribution(path: str | Path, n: int | None = None) -> list[Case]:
    """CounterFact (ROME schema) with the survey's "other attribution" locality
    (``easyedit_rome_format/counterfact_other_attribution.json``): a question about another attribute
    of the edited subject (``unrelated_relation``: question and object), whose answer the edit should
    leave alone. It becomes the case's locality probe (scored as agreement with the unedited model,
    and ``locality_acc`` against the object)."""
    path = Path(path)
    cases = load_counterfact(path, n)
    for i, c in enumerate(cases):
        rel = c.extra.get("unrelated_relation") or {}
        if not rel.get("question") or not rel.get("object"):
            raise DatasetError(f"{path} record {i}: no unrelated_relation question/object; "
                               "is this the other-attribution file?")
        c.dataset = "counterfact_other_attribution"
        c.locality = [Probe(rel["question"], (_space(rel["object"]),))]
    return cases


def load_counterfact_distracting_neighbor(path: str | Path, n: int | None = None) -> list[Case]:
    """CounterFact (ROME schema) with the survey's "distracting neighbour" locality
    (``easyedit_rome_format/counterfact_distracting_neighbor.json``): each neighbourhood prompt is
    preceded by the new fact ("Spike Hughes originates from Philadelphia. Max Mosley originates
    from"). These prompts replace the neighbourhood prompts (NS: P(true) > P(new) on them) and are
    also the locality probes (agreement with the unedited model on ``target_true``)."""
    path = Path(path)
    cases = load_counterfact(path, n)
    for i, c in enumerate(cases):
        prompts = list(c.extra.get("distracting_neighborhood_prompts") or [])
        if not prompts:
            raise DatasetError(f"{path} record {i}: no distracting_neighborhood_prompts; "
                               "is this the distracting-neighbour file?")
        c.dataset = "counterfact_distracting_neighbor"
        c.neighborhood_prompts = prompts
        c.locality = [Probe(p, (c.request.target_true,)) for p in prompts]
    return cases


KNOWEDIT_PORTABILITY = ("Reasoning", "Subject_Aliasing", "Logical_Generalization")
KNOWEDIT_LOCALITY = ("Relation_Specificity", "Forgetfulness")


def _knowedit_probes(block: Any, keys: tuple[str, ...]) -> tuple[list[Probe], list[str]]:
    """EasyEdit's KnowEdit ``locality``/``portability`` block ({key: [{prompt, ground_truth}]}) as
    probes and the key of each. As EasyEdit's runner does, a nested answer list is reduced to its
    first string and probes with an empty answer are dropped."""
    probes, of_key = [], []
    for key in keys:
        for item in (block or {}).get(key) or []:
            prompt, ans = item.get("prompt"), item.get("ground_truth")
            while isinstance(ans, list):
                ans = ans[0] if ans else ""
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else ""
            if not prompt or not isinstance(ans, str) or not ans.strip():
                continue
            probes.append(Probe(prompt, (_space(ans),)))
            of_key.append(key)
    return probes, of_key


def load_knowedit(path: str | Path, n: int | None = None) -> list[Case]:
    """A KnowEdit file (EasyEdit's benchmark: ``knowedit/ZsRE-test-all.json``, ``wiki_recent_train.json``,
    ``wiki_counterfact_train_cf.json``, ``wikibio_test_all.json``), read as EasyEdit's KnowEditDataset
    reads it: subject (or ``concept``), prompt (or WikiBio's ``text``), target_new (or ``labels``),
    ``ground_truth`` (the old answer, when given), ``rephrase_prompt`` (when given), and the
    ``portability`` (Reasoning, Subject_Aliasing, Logical_Generalization) and ``locality``
    (Relation_Specificity, Forgetfulness) probes, each probe's key kept in ``extra["portability_keys"]``
    / ``extra["locality_keys"]`` (EasyEdit averages within a key, then over keys). The rendered prompt
    is also the case's generation prompt (EasyEdit's fluency). Records whose subject does not occur in
    the prompt (also case-insensitively) cannot be a request and are left out; ``extra["skipped"]`` of
    the first case counts them."""
    path = Path(path)
    data = _read(path, "KnowEdit")
    cases, skipped = [], 0
    for i, r in enumerate(data):
        if n is not None and len(cases) >= n:
            break
        subject = r.get("subject", r.get("concept"))
        prompt = r.get("prompt", r.get("text"))
        target = r.get("target_new", r.get("labels"))
        if not subject or not prompt or not target:
            raise DatasetError(f"{path} record {i}: needs subject (or concept), prompt (or text) and "
                               "target_new (or labels); is this a KnowEdit file?")
        j = prompt.find(subject)
        if j < 0:
            j = prompt.lower().find(subject.lower())
        if j < 0:
            skipped += 1
            continue
        true = r.get("ground_truth")
        while isinstance(true, list):
            true = true[0] if true else None
        req = Request(prompt[:j] + "{}" + prompt[j + len(subject):], prompt[j:j + len(subject)], _space(target),
                      _space(true) if isinstance(true, str) and true.strip() and true.strip() != str(target).strip()
                      else None)
        loc, loc_keys = _knowedit_probes(r.get("locality"), KNOWEDIT_LOCALITY)
        port, port_keys = _knowedit_probes(r.get("portability"), KNOWEDIT_PORTABILITY)
        cases.append(Case(i, "knowedit", [req],
                          paraphrase_prompts=[r["rephrase_prompt"]] if r.get("rephrase_prompt") else [],
                          generation_prompts=[req.rendered], locality=loc, portability=port,
                          extra={"locality_keys": loc_keys, "portability_keys": port_keys}))
    if cases:
        cases[0].extra["skipped"] = skipped
    return cases


# --------------------------------------------------------------------------- MEMIT-CSK (PEP3k, 20Q)
CSK_LABELS = {1: " True", 0: " False"}  # the authors' next-token labels after "<statement>:"
CSK_PROBE_TYPES = ("affected_paraphrase", "affected_neighborhood_subject", "affected_neighborhood_verb",
                   "affected_neighborhood_object", "affected_reasoning", "unaffected_neighborhood_subject",
                   "unaffected_neighborhood_object")


def _word_at(text: str, word: str) -> int:
    """Where ``word`` stands as a whole word in ``text`` (first such place; any place as a fallback,
    as the authors' loader falls back to a plain replace), or -1."""
    m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text)
    return m.start() if m else text.find(word)


def _csk_request(statement: str, label: str, svo: dict) -> Request | None:
    """``"<statement>:" -> label`` with the subject as ``{}`` and the verb/object as spans; None when
    the subject is not in the statement."""
    subject = (svo.get("subject") or "").strip()
    i = _word_at(statement, subject) if subject else -1
    if i < 0:
        return None
    spans = {k: svo[k].strip() for k in ("verb", "object")
             if (svo.get(k) or "").strip() and _word_at(statement, svo[k].strip()) >= 0}
    other = CSK_LABELS[0] if label == CSK_LABELS[1] else CSK_LABELS[1]
    return Request(statement[:i] + "{}" + statement[i + len(subject):] + ":", subject, label, other, spans=spans)


def load_csk(path: str | Path, n: int | None = None) -> list[Case]:
    """A MEMIT-CSK edit or edit-validation set with its subject/verb/object annotation
    (``memit_csk/{pep3k,20q}/svo_annotated/{edit_set,edit_validation_set}.json``: prompt, label 0/1,
    subject, verb, object). Each statement becomes ``"<statement>:" -> " True"/" False"`` (its label;
    ``target_true`` the other one), the authors' prompt format, with the subject as ``{}`` and the verb
    and object in ``Request.spans``. A record whose subject is not a word of its statement is skipped
    (pep3k: 2 of 1,531; 20q: 23 of 2,505); a verb/object not found is left out of the spans.
    ``extra``: ``label`` and ``statement``."""
    path = Path(path)
    data = _read(path, "MEMIT-CSK edit set")
    cases = []
    for i, r in enumerate(data):
        _need(r, ("prompt", "label", "subject"), path, i)
        label = CSK_LABELS[int(r["label"])]
        req = _csk_request(r["prompt"], label, r)
        if req is not None:
            name = path.parent.parent.name if path.parent.name == "svo_annotated" else path.parent.name
            cases.append(Case(i, f"csk:{name}", [req], extra={"label": label, "statement": r["prompt"]}))
    return _first(cases, n)


def load_csk_probes(path: str | Path, n: int | None = None) -> list[Case]:
    """A MEMIT-CSK probe set (``memit_csk/{pep3k,20q}/probe_set.json``): each case's statement as an
    edit request (as :func:`load_csk`; ``label`` is already " True"/" False") and, in
    ``extra["probes"]``, its probe statements per type (:data:`CSK_PROBE_TYPES`): affected paraphrase,
    affected neighbourhood (subject/verb/object replaced by a near synonym: same label), affected
    reasoning (statements that are true), unaffected neighbourhood (subject/object replaced by an
    unrelated word: the label the unedited model gives them should not change)."""
    path = Path(path)
    data = _read(path, "MEMIT-CSK probe set")
    cases = []
    for i, r in enumerate(data):
        _need(r, ("prompt", "label", "subject", "verb", "object"), path, i)
        label = r["label"] if r["label"] in CSK_LABELS.values() else CSK_LABELS[int(r["label"])]
        req = _csk_request(r["prompt"], label, r)
        if req is not None:
            cases.append(Case(r.get("id", i), f"csk-probe:{path.parent.name}", [req],
                              extra={"label": label, "statement": r["prompt"],
                                     "probes": {t: list(r.get(t) or []) for t in CSK_PROBE_TYPES}}))
    return _first(cases, n)


# --------------------------------------------------------------------------- bias pairs (PCGU)

_WORD = re.compile(r"[\w'’-]+|[^\w\s]")


def _bias_pair(advantaged: str, disadvantaged: str, *, whole_rest: bool, subject: str | None = None) -> Request | None:
    """The two sentences of a bias pair as one request: the prompt is the text before the first word
    where they differ, ``target_true`` the advantaged (stereotypical) sentence's continuation from that
    word, ``target_new`` the disadvantaged one's (the rest of each sentence with ``whole_rest``, else the
    differing word alone). The subject (``{}``) is ``subject`` where it occurs in the prompt, else the
    prompt's first word. None when the sentences differ from the first word on or not at all."""
    wa, wd = list(_WORD.finditer(advantaged)), list(_WORD.finditer(disadvantaged))
    i = next((j for j, (x, y) in enumerate(zip(wa, wd)) if x.group() != y.group()), None)
    if i is None or i == 0:
        return None
    prompt = advantaged[: wa[i].start()].rstrip()
    if disadvantaged[: wd[i].start()].rstrip() != prompt:
        return None

    def rest(text: str, words: list) -> str:
        return " " + (text[words[i].start():].strip() if whole_rest else words[i].group())

    t_true, t_new = rest(advantaged, wa), rest(disadvantaged, wd)
    if t_true.strip() == t_new.strip():
        return None
    word = subject if subject and _word_at(prompt, subject) >= 0 else wa[0].group()
    at = _word_at(prompt, word)
    return Request(prompt[:at] + "{}" + prompt[at + len(word):], word, t_new, t_true)


def load_winogender_pairs(path: str | Path, n: int | None = None, *, stats: str | Path | None = None,
                          stats_column: str = "bls_pct_female") -> list[Case]:
    """WinoGender as PCGU uses it (``bias/winogender/all_sentences.tsv`` and, beside it,
    ``occupations-stats.tsv``). Each sentence's male and female versions form one pair; as in the PCGU
    reference, the gender the occupation's statistics favour is advantaged (``stats_column`` below 50:
    male advantaged, else female). The request's prompt is the sentence up to its first gendered
    pronoun; ``target_true`` is the advantaged pronoun, ``target_new`` the other (" he" / " she", " his"
    / " her", ...). ``extra``: occupation, participant, ``pct_female``, ``advantaged`` ("male"/"female")
    and both sentences."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"WinoGender sentences file not found: {path}")
    stats = Path(stats) if stats is not None else path.with_name("occupations-stats.tsv")
    if not stats.is_file():
        raise DatasetNotFoundError(f"WinoGender occupation statistics not found: {stats}")
    with open(stats, encoding="utf-8") as f:
        header, *lines = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    if "occupation" not in header or stats_column not in header:
        raise DatasetError(f"{stats}: expected columns 'occupation' and {stats_column!r}, got {header}")
    pct = {row[header.index("occupation")]: float(row[header.index(stats_column)]) for row in lines}
    groups: dict[tuple[str, str, str], dict[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    for i, row in enumerate(rows[1:], start=1):
        if len(row) != 2 or row[0].count(".") < 4:
            raise DatasetError(f"{path} line {i + 1}: expected 'occupation.participant.answer.gender.txt<TAB>sentence'")
        occupation, participant, answer, gender = row[0].split(".")[:4]
        groups.setdefault((occupation, participant, answer), {})[gender] = row[1]
    cases = []
    for (occupation, participant, answer), by_gender in groups.items():
        if "male" not in by_gender or "female" not in by_gender or occupation not in pct:
            continue
        advantaged = "male" if pct[occupation] < 50 else "female"
        other = "female" if advantaged == "male" else "male"
        req = _bias_pair(by_gender[advantaged], by_gender[other], whole_rest=False, subject=occupation)
        if req is not None:
            cases.append(Case(f"{occupation}.{participant}.{answer}", "winogender", [req],
                              extra={"occupation": occupation, "participant": participant,
                                     "pct_female": pct[occupation], "advantaged": advantaged,
                                     "advantaged_sentence": by_gender[advantaged],
                                     "disadvantaged_sentence": by_gender[other]}))
    return _first(cases, n)


def load_crows_pairs(path: str | Path, n: int | None = None, *, bias_type: str | None = None) -> list[Case]:
    """CrowS-Pairs (``bias/crows_pairs/crows_pairs_anonymized.csv``). ``sent_more`` (the sentence that
    is more stereotyping, the one the CrowS-Pairs metric counts a preference for) is advantaged:
    ``target_true`` is its continuation from the first word where the pair differs, ``target_new``
    ``sent_less``'s, the prompt the words they share before it. Pairs that differ from the first word on
    are skipped (no shared prompt for a causal model). ``bias_type`` keeps one category (e.g.
    ``"gender"``, ``"race-color"``). ``extra``: both sentences, ``direction`` (stereo/antistereo), bias type."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"CrowS-Pairs file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        records = list(csv.DictReader(f))
    cases = []
    for i, r in enumerate(records):
        _need(r, ("sent_more", "sent_less", "stereo_antistereo", "bias_type"), path, i)
        if bias_type is not None and r["bias_type"] != bias_type:
            continue
        req = _bias_pair(r["sent_more"], r["sent_less"], whole_rest=True)
        if req is not None:
            cases.append(Case(r.get("") or i, "crows_pairs", [req],
                              extra={"sent_more": r["sent_more"], "sent_less": r["sent_less"],
                                     "direction": r["stereo_antistereo"], "bias_type": r["bias_type"]}))
    return _first(cases, n)


def load_stereoset_pairs(path: str | Path, n: int | None = None) -> list[Case]:
    """EditBias's StereoSet intrasentence splits (``bias/stereoset_editbias/{dev,gender_test,race_test,
    religion_test}.json``: context with ``BLANK`` and its stereotype / anti-stereotype / unrelated
    sentences). The stereotype is advantaged: ``target_true`` is its continuation from the filled blank,
    ``target_new`` the anti-stereotype's, the prompt the context before the blank. Items whose blank is
    the first word are skipped. ``extra``: target group, bias type, the three sentences."""
    path = Path(path)
    data = _read(path, "StereoSet (EditBias split)")
    cases = []
    for i, r in enumerate(data):
        _need(r, ("context", "data", "bias_type"), path, i)
        d = r["data"]
        if not all(k in d for k in ("stereotype", "anti-stereotype")):
            raise DatasetError(f"{path} record {i}: 'data' needs 'stereotype' and 'anti-stereotype'")
        stereo, anti = d["stereotype"]["sentence"], d["anti-stereotype"]["sentence"]
        req = _bias_pair(stereo, anti, whole_rest=True, subject=r.get("target"))
        if req is not None:
            cases.append(Case(r.get("id", i), f"stereoset:{path.stem}", [req],
                              extra={"target": r.get("target"), "bias_type": r["bias_type"], "stereotype": stereo,
                                     "anti_stereotype": anti,
                                     "unrelated": (d.get("unrelated") or {}).get("sentence")}))
    return _first(cases, n)
