"""IKE: In-Context Knowledge Editing (Zheng, Li, Dong, Fan, Wu, Xu & Chang, EMNLP 2023).

IKE changes no weight. It writes the new fact, with demonstrations of how to use it, before every
prompt the model reads: an :class:`edit.PrefixText` intervention, which :meth:`locate.HookedLM.encode`
places before the rewrite, paraphrase, neighbourhood and generation prompts alike. That is how the
original code scores IKE: the neighbourhood prompts get the demonstrations and the new fact too, and
locality measures whether the model learned *not* to apply the fact there.

Demonstrations. Each record of a pool of CounterFact *training* records (EasyEdit's
``counterfact-train.json``: one rephrase and one locality prompt each) with new fact
``nf = prompt.format(subject)`` and target ``t`` (targets carry their leading space, ``" Rome"``)
yields one of three demonstrations::

    copy:    "New Fact: {nf}{t}\\nPrompt: {nf}{t}\\n\\n"
    update:  "New Fact: {nf}{t}\\nPrompt: {rephrase_prompt}{t}\\n\\n"
    retain:  "New Fact: {nf}{t}\\nPrompt: {locality_prompt}{locality_ground_truth}\\n\\n"

Retrieval. Every pool record is embedded once as its copy sentence ``"New Fact: {nf}{t}\\nPrompt:
{nf}{t}"`` with all-MiniLM-L6-v2 (:mod:`edit.retrieval`, cached on disk and in ``Runtime.cache``);
the query is ``"New Fact: {r}{t}\\nPrompt: {r}"`` for the request's rendered prompt ``r``; the ``k``
pool records with the largest dot product (cosine: unit vectors) become demonstrations. Their types
follow the paper's proportions copy:update:retain = 1:3:4 (4:12:16 of k = 32), shuffled with a seed
made of ``Runtime.seed`` and the request, and assigned by rank. The prefix is then::

    demonstrations + "New Fact: {r}{t}\\nPrompt: {r}{t}\\n\\n" + "New Fact: {r}{t}\\nPrompt: "

(the request's own copy demonstration, which both reference implementations append, and the new fact
as the head of every prompt).

The paper and its code (Zce1112zslx/IKE ``icl.py``) against EasyEdit (``easyeditor/models/ike``):

* k: 32 in the paper, 16 in EasyEdit's hparams. Default 32.
* order: the paper's code reverses the ranked list, so the *most similar* demonstration is *last*,
  nearest the query; EasyEdit keeps the ranked order, most similar first. ``order="paper"`` (default)
  or ``"easyedit"``.
* types: the paper's code retrieves *records* (its ``corpus_idx.txt`` lists, per test case, the
  nearest CounterFact records among those past the first 2000) and gives them 4 copy / 12 update /
  16 retain types, shuffled, with a random paraphrase or neighbourhood prompt of the record;
  EasyEdit embeds all three demonstrations of every pool record and retrieves demonstrations
  directly, so their types follow similarity. We follow the paper (record-level retrieval, fixed
  proportions; EasyEdit's pool has one rephrase and one locality prompt per record, so no random
  choice) and offer only EasyEdit's ordering. The query is the same in both.
* locality: the paper's code scores neighbourhood prompts under the full prefix as
  P(true) > P(new), CounterFact's Neighborhood Score, as this toolkit's CounterFact metrics do.
  EasyEdit's token-agreement Locality compares the edited model with the model reading the
  new-fact line without demonstrations; this toolkit's reference is the unedited model reading the
  plain prompt (``edit.eval.metrics.reference_predictions``).

Leakage. Demonstrations never come from an evaluation record: records whose ``case_id`` appears in
a ``holdout`` file (CounterFact dev, EasyEdit val and edit; the shipped ``counterfact_dev_800.json``
shares 32 case_ids with the train file) and records about the request's own subject
(``exclude_subject``) are removed from the pool; a demonstration of the very fact being edited would
hand its paraphrase and neighbourhood answers to the model.

Data. The pool and holdout files are read from ``Runtime.data_dir``, else ``$LOCATE_EDIT_DATA``, else
``./shared/data`` or ``../shared/data`` (:func:`edit.eval.datasets.find_data_dir`).

One fact per edit (``batched=False``). Applying several IKE edits concatenates their prefixes, newest
outermost: the text then holds one "New Fact: ... Prompt: " block inside another, which is not the
multi-fact prompt of any reference; stack them only knowingly.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError

from ..edit import Edit, PrefixText
from ..eval.datasets import DatasetNotFoundError, find_data_dir, load_counterfact_easyedit
from ..registry import Runtime, register
from ..request import Request
from ..retrieval import SentenceEncoder, cached_embeddings

TYPES = ("copy", "update", "retain")


@dataclass
class IKEHparams:
    """IKE's hyper-parameters; defaults are the paper's (Zheng et al. 2023, CounterFact, GPT-J)."""

    k: int = 32  # demonstrations retrieved per edit (the paper: 32; EasyEdit: 16)
    order: str = "paper"  # "paper": most similar demonstration last, nearest the query; "easyedit": most similar first
    proportions: tuple = (1, 3, 4)  # copy : update : retain demonstrations (the paper: 4 : 12 : 16 of 32)
    pool: str = "counterfact/easyedit_format/counterfact-train.json"  # demonstration pool (EasyEdit schema), under the data dir
    max_pool: int | None = None  # keep only the first n pool records (None: all, ~10k)
    # files (under the data dir) whose case_ids never serve as demonstrations (the evaluation sets); missing ones are skipped
    holdout: tuple = ("counterfact/counterfact_dev_800.json", "counterfact/easyedit_format/counterfact-val.json",
                      "counterfact/easyedit_format/counterfact-edit.json")
    exclude_subject: bool = True  # drop pool records about the request's own subject
    self_demo: bool = True  # put the request's own copy demonstration before the query (both reference codes do)

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise InvalidHparamsError(f"k must be a non-negative int, got {self.k!r}")
        if self.order not in ("paper", "easyedit"):
            raise InvalidHparamsError(f"order must be 'paper' or 'easyedit', got {self.order!r}")
        self.proportions = tuple(self.proportions)
        if len(self.proportions) != 3 or any(p < 0 for p in self.proportions) or sum(self.proportions) <= 0:
            raise InvalidHparamsError(f"proportions are three non-negative weights (copy, update, retain), got {self.proportions!r}")
        if self.max_pool is not None and (isinstance(self.max_pool, bool) or self.max_pool < 1):
            raise InvalidHparamsError(f"max_pool must be None or a positive int, got {self.max_pool!r}")
        self.holdout = tuple(self.holdout)


def _space(s: str) -> str:
    return s if s.startswith(" ") else " " + s


def fact_block(prompt: str, target: str) -> str:
    """``"New Fact: {prompt}{target}\\nPrompt: "``, the head of every IKE prompt."""
    return f"New Fact: {prompt}{_space(target)}\nPrompt: "


def demonstration(kind: str, case) -> str:
    """The ``kind`` ("copy", "update", "retain") demonstration of a pool :class:`edit.eval.Case`."""
    r = case.request
    head = fact_block(r.rendered, r.target_new)
    if kind == "copy":
        return f"{head}{r.rendered}{_space(r.target_new)}\n\n"
    if kind == "update":
        return f"{head}{case.paraphrase_prompts[0]}{_space(r.target_new)}\n\n"
    if kind == "retain":
        return f"{head}{case.locality[0].prompt}{_space(case.locality[0].answer)}\n\n"
    raise InvalidArgumentError(f"unknown demonstration type {kind!r}")


def demo_types(k: int, proportions, rng: random.Random) -> list[str]:
    """``k`` types in the given proportions (largest remainder; ties go to the earlier type), shuffled."""
    total = float(sum(proportions))
    raw = [k * p / total for p in proportions]
    counts = [int(x) for x in raw]
    for i in sorted(range(3), key=lambda i: -(raw[i] - counts[i]))[: k - sum(counts)]:
        counts[i] += 1
    types = [t for t, c in zip(TYPES, counts) for _ in range(c)]
    rng.shuffle(types)
    return types


@dataclass
class Pool:
    """The demonstration pool: the records, their copy sentences' embeddings, and where they came from."""

    cases: list
    embeddings: torch.Tensor  # (n, 384), unit rows
    path: Path
    holdout_files: list[str]
    seconds: float


def load_pool(hp: IKEHparams, rt: Runtime) -> Pool:
    """The pool of ``hp`` (memoised in ``rt.cache``; embeddings cached on disk by :mod:`edit.retrieval`)."""
    data_dir = find_data_dir(rt.data_dir)
    path = data_dir / hp.pool
    key = ("ike.pool", str(path.resolve()), hp.max_pool, hp.holdout)
    if key in rt.cache:
        return rt.cache[key]
    t = time.perf_counter()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"IKE demonstration pool not found: {path} (data directory {data_dir}, from "
            f"{'Runtime.data_dir' if rt.data_dir is not None else 'LOCATE_EDIT_DATA or the default locations'}); "
            "it is CounterFact's training split in EasyEdit's format (hyperparameter 'pool', relative to the data dir)")
    held, found = set(), []
    for rel in hp.holdout:
        f = data_dir / rel
        if f.is_file():
            held |= {str(r["case_id"]) for r in json.loads(f.read_text(encoding="utf-8")) if "case_id" in r}
            found.append(rel)
    cases = [c for c in load_counterfact_easyedit(path)
             if str(c.case_id) not in held and c.paraphrase_prompts and c.locality]
    cases = cases[: hp.max_pool]
    if not cases:
        raise EditFailedError(f"the IKE pool {path} has no usable record (after the holdout and max_pool)")
    texts = [demonstration("copy", c).rstrip("\n") for c in cases]
    pool = Pool(cases, cached_embeddings(texts, SentenceEncoder()), path, found, time.perf_counter() - t)
    rt.cache[key] = pool
    return pool


SMOKE = {"k": 4, "max_pool": 200}


@register("ike", IKEHparams, batched=False, layers=None, smoke=SMOKE,
          description="IKE: in-context editing, retrieved demonstrations and the new fact before every prompt "
                      "(Zheng et al. 2023)")
def compute_ike(lm, requests: list[Request], hp: IKEHparams, rt: Runtime) -> Edit:
    """The IKE edit of one request (not applied): a :class:`PrefixText`; the weights are never touched."""
    (request,) = requests
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    pool = load_pool(hp, rt)
    timings["pool_s"] = time.perf_counter() - t_all  # ~0 once the pool is in rt.cache

    # retrieval: the k pool records nearest the query, most similar first
    t = time.perf_counter()
    r, target = request.rendered, _space(request.target_new)
    query = fact_block(r, target) + r
    scores = pool.embeddings @ SentenceEncoder().encode([query])[0]
    if hp.exclude_subject:
        subj = request.subject.strip().casefold()
        keep = torch.tensor([c.request.subject.strip().casefold() != subj for c in pool.cases])
        scores = scores.masked_fill(~keep, float("-inf"))
    k = min(hp.k, int(torch.isfinite(scores).sum()))
    top = scores.topk(k) if k else None
    ranked = [] if top is None else top.indices.tolist()
    timings["retrieval_s"] = time.perf_counter() - t

    # demonstrations: types by rank in the paper's proportions, then the order
    rng = random.Random(f"ike:{rt.seed}:{json.dumps(request.to_dict(), sort_keys=True)}")
    types = demo_types(k, hp.proportions, rng)
    demos = [(i, kind) for i, kind in zip(ranked, types)]
    if hp.order == "paper":
        demos.reverse()
    text = "".join(demonstration(kind, pool.cases[i]) for i, kind in demos)
    if hp.self_demo:
        text += f"{fact_block(r, target)}{r}{target}\n\n"
    text += fact_block(r, target)

    n_prefix = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    n_ctx = getattr(lm.cfg, "n_ctx", None)
    if n_ctx and n_prefix + 32 > n_ctx:
        raise EditFailedError(f"the IKE prefix is {n_prefix} tokens; with the model's context of {n_ctx} that leaves "
                              "fewer than 32 for the prompt: lower k")
    timings["total_s"] = time.perf_counter() - t_all

    score_of = {i: float(s) for i, s in zip(ranked, top.values.tolist())} if top is not None else {}
    return Edit(
        method="ike",
        requests=[request],
        interventions=[PrefixText(text)],
        fingerprint=lm.fingerprint,
        model_name=lm.name,
        hparams={**asdict(hp), "pool_path": str(pool.path), "pool_size": len(pool.cases),
                 "holdout_found": pool.holdout_files},
        timings=timings,
        metrics={"demo_case_ids": [pool.cases[i].case_id for i, _ in demos],  # in prefix order
                 "demo_types": [kind for _, kind in demos],
                 "demo_scores": [score_of[i] for i, _ in demos],
                 "prefix_tokens": n_prefix, "prefix_chars": len(text), "pool_build_s": pool.seconds},
    )
