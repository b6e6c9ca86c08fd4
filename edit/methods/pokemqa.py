"""PokeMQA: Programmable knowledge editing for Multi-hop Question Answering (Gu, Zhou, Han, Liu, Wang &
Wang, ACL 2024; arXiv 2312.15194; code github.com/Hengrui-Gu/PokeMQA).

PokeMQA is MeLLo's idea (:mod:`edit.methods.mello`: edited facts in a memory, a multi-hop question
decomposed by the model into subquestions) with one change: whether a subquestion conflicts with a
stored edit is NOT judged by the model (MeLLo's "Retrieved fact (does not) contradict ...") but by a
trained **scope detector**, decoupled from the decomposition. The detector has two stages
(paper §3.2; ``PokeMQA-turbo_n_edited.py``):

* **pre-detector** g₁, a dual encoder: with u = e(q) the subquestion's and v_e = e(e) each edit's
  embedding,

      p₁(q, e) = exp(−‖u − v_e‖²),      C(q) = { e ∈ M : p₁(q, e) ≥ 0.5 }                     (1)

* **conflict disambiguator** g₂, a classifier of the pair "e [SEP] q", consulted only when
  several edits pass (1):

      p₂(q, e) = P(in scope | e [SEP] q)                                                        (2)

and the decision

      |C(q)| = 0                     → no conflict
      |C(q)| = 1, C(q) = {e}         → conflict with e            (the disambiguator is not asked)
      |C(q)| > 1                     → e* = argmax_{e∈C} p₂(q, e); conflict with e* iff p₂(q, e*) ≥ 0.5

The loop (the reference script, step for step; the paper's prompt ``prompts/woKGprompt.txt``):

    text = prompt + "\\n\\nQuestion: " + question
    for round = 1 .. R (R = 5):
        the model continues the text, stopping before "Generated answer:" or a blank line;
        last line "Final answer: a"                       → a; stop
        more than 3 lines, or the last is not "Subquestion: q"  → no answer
        no conflict    → text += gen + "Generated answer"          (the model answers q itself next round)
        conflict with e → text += gen + "Generated answer: " + e + "."
    no "Final answer" within R rounds → no answer.

So where the detector says "no conflict", the model's own generated answer stands and no fact is
written; where it says "conflict", the edit is written as the generated answer. Each demonstration of
the prompt then has the model write "According to Generated answer, the entity of Subquestion is: X"
before its next subquestion.

**Stand-ins for the paper's encoders** (the references fine-tune DistilBERT, ``distilbert-base-cased``,
for both stages, 1,000 and 500 epochs on a GPU): both stages are built on the packaged
all-MiniLM-L6-v2 (:mod:`edit.retrieval`), **frozen**, with small trained heads:

* g₁: e(x) = P · MiniLM(x), P a trained 384×384 map (identity-initialised), and a trained scale s,
  p₁ = exp(−s‖P(u − v_e)‖²) (the reference: the [CLS] state of the fine-tuned DistilBERT, s = 1;
  s's initial value puts the 0.5 boundary at cosine 0.7 of the raw embeddings);
* g₂: the frozen MiniLM reads the pair text "e [SEP] q" itself (so the two sentences attend to each
  other, as in the reference's cross-encoder) and a two-layer MLP (hidden 128) scores
  [MiniLM(e [SEP] q), u ⊙ v_e, |u − v_e|] (the reference: ``AutoModelForSequenceClassification``
  on DistilBERT, the positive class's softmax).

Training (:func:`train_pokemqa`, on :mod:`edit.training`: cached by model fingerprint, library versions
and data digest; an edit without it fails with the ``locate-edit train pokemqa ...`` command). The
reference's losses: g₁ with −log p₁(q⁺, e) − mean_k log(1 − p₁(q⁻_k, e)) over 20 negative questions
per positive; g₂ with the cross-entropy of one positive and one random negative pair per positive.
Adam (lr 1e-3 for the heads; the reference 1e-5 for the whole encoder), 300 steps of 32 edits.

**Training data.** The reference trains on its ``cls-filtered.json`` (6,688 MQuAKE-CF edits with four
questions each, three written by Vicuna-13B), which covers the evaluation's edits. Here the pairs come
from MQuAKE cases the evaluation never sees: the evaluation is the FIRST 100 cases of the MQuAKE file
(``mquake/AKEW_MQuAKE-CF.json``, 354 MQuAKE-CF-3k cases), the training data every case after them
(:func:`mquake_training_dicts`; a case id of the first 100 among them is refused,
:class:`TrainingOverlapError`), and an edited fact that is also edited in one of the first 100 cases
(MQuAKE-CF-3k shares edits between cases: 11 of 236 facts) is dropped, so the detector never sees an
evaluated edit. An edit e = "t_r(s) o*" is in scope of its rewrite's question (MQuAKE's
``requested_rewrite.question``, the template question of the paper's fourth) and of its own cloze
statement t_r(s) (added here, not in the paper, so that single-hop prompts are recognised as well,
see below); the questions of the case's unedited hops are kept as hard negatives (used by the
validation curve, and by g₂'s training with ``hard_negatives=True``; the reference's negatives are
random). The pairs are written once as an EasyEdit-CounterFact-format file in the cache (one record
per (edit, question, hard negative)), which is what ``locate-edit train pokemqa --data`` reads.

Departures, besides the encoders and the data: the knowledge prompt generator (§3.3: ELQ entity linking
and Wikidata triples, the prompt ``KGprompt.txt``) is not built; this is the paper's variant without
it (``woKGprompt.txt``). The model is the edited model itself, greedy (the reference calls
gpt-3.5-turbo-instruct); the memory is the facts of the PokeMQA edits applied to the model, as MeLLo's
(:mod:`edit.methods.mello`). The detector does not depend on the model, but it is keyed by the
model's fingerprint like every trained editor here, so it is trained once per model.

**Prompts outside the loop** (a cloze prompt of a single-hop metric) go through the same detector:
the edit it decides for is placed before the prompt as ``"{fact}.\\n"`` (``plain_template``), nothing
when it decides "no conflict" (``plain_prompts=False``: never). The paper defines nothing there. With
several PokeMQA edits applied, a prompt that an earlier PokeMQA memory already prefixed gets nothing more.

The paper's prompt (MIT, Copyright (c) 2023 Hengrui-Gu) is not packaged: it is read from
``pokemqa/prompts/woKGprompt.txt`` under the data directory when an edit is computed, and kept in the
edit. ``prompt="<format-example>"`` uses :data:`FORMAT_EXAMPLE`, one demonstration of our own in the
prompt's layout (the tests' cheap settings; not the paper's prompt).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from locate.errors import EditFailedError, InvalidHparamsError
from locate.loading import cache_dir

from ..edit import Edit, InputTransform
from ..eval.datasets import DatasetNotFoundError, find_data_dir
from ..registry import Runtime, compute, register
from ..request import Request
from ..retrieval import SentenceEncoder, cached_embeddings
from ..training import (
    EditorTrainer,
    TrainedEditor,
    TrainingDataError,
    TrainingHparams,
    TrainingRecord,
    batch_at,
    obtain,
    run_training,
    toy_records,
)
from .mello import FINAL, SUBQUESTION, InvalidQuestionError, fact_sentence, greedy_until
from .memprompt import strip_prefixes

PROMPT_FILE = "pokemqa/prompts/woKGprompt.txt"
MQUAKE_FILE = "mquake/AKEW_MQuAKE-CF.json"
GENERATED = "Generated answer"
SEP = " [SEP] "  # the MiniLM tokenizer reads "[SEP]" as its separator token (the reference: tokenizer.sep_token)
FORMAT_EXAMPLE_NAME = "<format-example>"
# one demonstration of our own in the paper's layout (tests' cheap settings). Not the paper's prompt.
FORMAT_EXAMPLE = (
    "Question: In which country is the city where the author of Moby-Dick was born?\n"
    "Subquestion: Who is the author of Moby-Dick?\n"
    "Generated answer: The author of Moby-Dick is Herman Melville.\n"
    "According to Generated answer, the entity of Subquestion is: Herman Melville\n"
    "Subquestion: In which city was Herman Melville born?\n"
    "Generated answer: Herman Melville was born in New York City.\n"
    "According to Generated answer, the entity of Subquestion is: New York City\n"
    "Subquestion: Which country is New York City located in?\n"
    "Generated answer: New York City is located in the United States of America.\n"
    "According to Generated answer, the entity of Subquestion is: United States of America\n"
    "Final answer: United States of America")
EDIT_TIME = ("prompt", "question_label", "max_rounds", "max_new_tokens", "stop", "threshold", "plain_prompts",
             "plain_template")


class TrainingOverlapError(TrainingDataError):
    """PokeMQA training data that contains a case of the evaluation (the first ``eval_cases`` MQuAKE cases)."""


@dataclass
class PokeMQAHparams(TrainingHparams):
    """PokeMQA's hyperparameters: the loop's are the reference script's; the detector's training is
    scaled down (module docstring)."""

    prompt: str = PROMPT_FILE  # few-shot prompt: a file under the data dir, an absolute path, or "<format-example>"
    question_label: str = "Question: "  # the script writes "\n\nQuestion: " + question
    max_rounds: int = 5  # the script's range(5)
    max_new_tokens: int = 256  # tokens per round
    stop: tuple = ("Generated answer:", "\n\n")  # the script's stop
    threshold: float = 0.5  # of (1) and (2)
    plain_prompts: bool = True  # prompts outside the loop get the detected edit before them
    plain_template: str = "{fact}.\n"
    # ---- training of the detector
    train_data: str = MQUAKE_FILE  # an MQuAKE file (its cases after the first eval_cases), a derived file, or "toy"
    eval_cases: int = 100  # the evaluation's cases: the first eval_cases of the MQuAKE file, never trained on
    train_steps: int = 300
    batch_size: int = 32  # edits per step
    lr: float = 1e-3  # Adam, for both heads
    n_negatives: int = 20  # g1: negative questions per positive (the reference's negative_number)
    pair_negatives: int = 4  # g2: random negative pairs embedded per edit (one drawn per positive and step)
    hard_negatives: bool = False  # g2 also trains on the case's unedited-hop questions (not the reference)
    hidden: int = 128  # g2's MLP width
    init_scale: float = 1.155  # s of (1) at the start: the 0.5 boundary at raw cosine 0.7

    def __post_init__(self):
        for name in ("max_rounds", "max_new_tokens", "batch_size", "n_negatives", "pair_negatives", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.eval_cases, bool) or not isinstance(self.eval_cases, int) or self.eval_cases < 0:
            raise InvalidHparamsError(f"eval_cases must be a non-negative int, got {self.eval_cases!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not self.stop or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidHparamsError(f"stop must be one or more non-empty strings, got {self.stop!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < self.threshold < 1.0:
            raise InvalidHparamsError(f"threshold must be a probability in (0, 1), got {self.threshold!r}")
        if not self.init_scale > 0:
            raise InvalidHparamsError(f"init_scale must be positive, got {self.init_scale!r}")
        try:
            self.plain_template.format(fact="f")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise InvalidHparamsError(f"plain_template must be a format string with the one field {{fact}}, "
                                      f"got {self.plain_template!r}") from e


# ====================================================================== the scope detector
def pair_text(fact: str, question: str) -> str:
    """What g₂ reads: "e [SEP] q" (the reference: edit + sep_token + subquestion)."""
    return fact + SEP + question


class ScopeDetector(torch.nn.Module):
    """The trained heads of (1) and (2) on frozen MiniLM embeddings."""

    def __init__(self, dim: int = SentenceEncoder.dim, hidden: int = 128, init_scale: float = 1.155):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.eye(dim))  # P of (1)
        self.log_scale = torch.nn.Parameter(torch.tensor(float(init_scale)).log())  # s of (1)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3 * dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def pre_log_prob(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """log p₁ of (1) for rows u (questions) against rows v (edits), pairwise: (N,)."""
        d = (u.float() - v.float()) @ self.proj.T
        return -self.log_scale.exp() * (d ** 2).sum(-1)

    def dis_logit(self, pair: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The logit of p₂ of (2) for rows (pair embedding, question, edit): (N,)."""
        u, v = u.float(), v.float()
        return self.mlp(torch.cat([pair.float(), u * v, (u - v).abs()], -1)).squeeze(-1)


@dataclass
class Decision:
    """The detector's answer for one subquestion: ``index`` of the conflicting edit (None: no conflict),
    the candidates of (1) with p₁, and p₂ where the disambiguator was asked."""

    index: int | None
    candidates: list[int]
    p_pre: list[float]
    p_dis: list[float] = field(default_factory=list)


@torch.no_grad()
def detect(detector: ScopeDetector, encoder: SentenceEncoder, question: str, facts: Sequence[str],
           fact_embeddings: torch.Tensor, threshold: float = 0.5) -> Decision:
    """The two-stage decision of the module docstring for ``question`` against the edits ``facts``."""
    u = encoder.encode([question])
    p1 = detector.pre_log_prob(u.expand(len(facts), -1), fact_embeddings).exp()
    cand = [i for i in range(len(facts)) if float(p1[i]) >= threshold]
    pre = [float(p1[i]) for i in cand]
    if not cand:
        return Decision(None, [], [])
    if len(cand) == 1:
        return Decision(cand[0], cand, pre)
    pairs = encoder.encode([pair_text(facts[i], question) for i in cand])
    p2 = torch.sigmoid(detector.dis_logit(pairs, u.expand(len(cand), -1), fact_embeddings[cand]))
    best = int(p2.argmax())
    return Decision(cand[best] if float(p2[best]) >= threshold else None, cand, pre, p2.tolist())


def detector_from_tensors(tensors: dict[str, torch.Tensor], prefix: str = "") -> ScopeDetector:
    """A :class:`ScopeDetector` with the trained tensors ``prefix + name``."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    det = ScopeDetector(state["proj"].shape[0], state["mlp.0.weight"].shape[0])
    det.load_state_dict(state)
    return det.eval()


# ====================================================================== training data
def mquake_training_dicts(cases: Sequence[dict], eval_cases: int = 100) -> list[dict]:
    """Scope-detector training records (EasyEdit CounterFact format, one per edit, question and hard
    negative) from the MQuAKE ``cases`` after the first ``eval_cases`` (module docstring). An edit that
    one of the first ``eval_cases`` cases also edits is dropped; a training case whose id is one of
    theirs raises :class:`TrainingOverlapError`."""
    evaluated, rest = list(cases[:eval_cases]), list(cases[eval_cases:])
    try:
        overlap = sorted({c["case_id"] for c in rest} & {c["case_id"] for c in evaluated})
        eval_facts = {rw["prompt"].format(rw["subject"]) + " " + rw["target_new"]["str"]
                      for c in evaluated for rw in c["requested_rewrite"]}
    except (KeyError, TypeError) as e:
        raise TrainingDataError(f"not MQuAKE cases (missing {e})") from e
    if overlap:
        raise TrainingOverlapError(f"the training cases include {len(overlap)} case id(s) of the first {eval_cases} "
                                   f"(the evaluation's), e.g. {overlap[:5]}; refusing to train on them")
    if not rest:
        raise TrainingDataError(f"no MQuAKE case after the first {eval_cases} to train on")
    out = []
    for c in rest:
        edited_q = {rw.get("question") for rw in c["requested_rewrite"]}
        unedited = [h for h in c.get("new_single_hops", []) if h.get("question") not in edited_q]
        for rw in c["requested_rewrite"]:
            cloze = rw["prompt"].format(rw["subject"])
            if cloze + " " + rw["target_new"]["str"] in eval_facts:
                continue
            base = {"case_id": c["case_id"], "prompt": cloze, "subject": rw["subject"],
                    "target_new": rw["target_new"]["str"], "ground_truth": rw["target_true"]["str"],
                    "rephrase_prompt": rw["question"]}
            for h in unedited or [None]:
                out.append(base if h is None else {**base, "locality_prompt": h["question"],
                                                   "locality_ground_truth": h["answer"]})
    return out


def training_file(train_data: str, eval_cases: int, data_dir=None) -> tuple[str | None, list[TrainingRecord] | None]:
    """Where the detector's training records come from: ``(None, toy records)`` for ``"toy"`` (tests);
    for an MQuAKE file, the derived file of :func:`mquake_training_dicts` (written once under
    ``cache_dir()/pokemqa/``); any other file as it is (``locate-edit train`` reads it)."""
    if train_data == "toy":
        return None, toy_records()
    p = Path(train_data).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = find_data_dir(data_dir) / train_data
    if not p.is_file():
        return str(p), None  # obtain() says the data is missing, with the command
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingDataError(f"{p}: not readable JSON ({e})") from e
    if not (isinstance(data, list) and data and isinstance(data[0], dict) and "requested_rewrite" in data[0]):
        return str(p), None
    dicts = mquake_training_dicts(data, eval_cases)
    body = json.dumps(dicts, ensure_ascii=False, indent=0)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    out = cache_dir() / "pokemqa" / f"pokemqa-scope-{p.stem}-after{eval_cases}-{digest}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.replace(out)
    return str(out), None


@dataclass
class ScopeGroup:
    """One edit of the training data with the texts in its scope and its hard negatives."""

    fact: str
    positives: list[str]
    hard: list[str]


def scope_groups(records: Sequence[TrainingRecord]) -> list[ScopeGroup]:
    """The records grouped by edit e = t_r(s) o*: in scope its cloze t_r(s) and its questions
    (the records' paraphrases); hard negatives the records' locality prompts not in its scope."""
    groups: dict[str, ScopeGroup] = {}
    for r in records:
        g = groups.setdefault(fact_sentence(r.request), ScopeGroup(fact_sentence(r.request), [], []))
        for q in [r.request.rendered, *r.paraphrases]:
            if q not in g.positives:
                g.positives.append(q)
        for q, _ in r.locality:
            if q not in g.hard:
                g.hard.append(q)
    for g in groups.values():
        g.hard = [q for q in g.hard if q not in g.positives]
    return list(groups.values())


# ====================================================================== training
class _PokeMQATrainer(EditorTrainer):
    def __init__(self, lm, train: list[TrainingRecord], val: list[TrainingRecord], hp: PokeMQAHparams):
        self.hp = hp
        self.groups = scope_groups(train)
        if len(self.groups) < 2:
            raise TrainingDataError("PokeMQA's detector needs at least two distinct edits to train on")
        seen = {g.fact for g in self.groups}
        self.val = [g for g in scope_groups(val) if g.fact not in seen]
        self.encoder = SentenceEncoder()
        gen = torch.Generator().manual_seed(int(hp.seed))
        self.questions = sorted({q for g in self.groups for q in g.positives})
        qi = {q: i for i, q in enumerate(self.questions)}
        # g2's negative pairs, fixed once: random questions of other edits (+ the hard ones on request)
        self.neg_pairs: list[list[str]] = []
        for g in self.groups:
            own = set(g.positives)
            pool = [q for q in self.questions if q not in own]
            pick = torch.randperm(len(pool), generator=gen)[:hp.pair_negatives].tolist()
            self.neg_pairs.append([pool[i] for i in pick] + (g.hard if hp.hard_negatives else []))
        texts = sorted({*self.questions, *(g.fact for g in self.groups + self.val),
                        *(q for g in self.val for q in g.positives + g.hard)})
        emb = cached_embeddings(texts, self.encoder)
        self.emb = {t: emb[i] for i, t in enumerate(texts)}
        pairs = sorted({pair_text(g.fact, q) for g, negs in zip(self.groups, self.neg_pairs)
                        for q in g.positives + negs})
        pemb = cached_embeddings(pairs, self.encoder)
        self.pair_emb = {t: pemb[i] for i, t in enumerate(pairs)}
        self.q_emb = torch.stack([self.emb[q] for q in self.questions])
        self.positive_of = [torch.tensor([qi[q] for q in g.positives]) for g in self.groups]
        self.module = ScopeDetector(SentenceEncoder.dim, hp.hidden, hp.init_scale)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=hp.lr)

    def _losses(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hp
        gen = torch.Generator().manual_seed(int(hp.seed) * 7919 + step)
        idx = batch_at(len(self.groups), step, min(hp.batch_size, len(self.groups)), hp.seed)
        fv, fq, neg_q, neg_ok, pair_p, pair_n = [], [], [], [], [], []
        for gi in idx:
            g = self.groups[gi]
            v = self.emb[g.fact]
            for q in g.positives:
                fv.append(v), fq.append(self.emb[q])
                k = torch.randint(len(self.questions), (hp.n_negatives,), generator=gen)
                neg_q.append(k)
                neg_ok.append(~torch.isin(k, self.positive_of[gi]))  # a question in e's scope is no negative
                negs = self.neg_pairs[gi]
                pair_p.append(pair_text(g.fact, q))
                pair_n.append(pair_text(g.fact, negs[int(torch.randint(len(negs), (1,), generator=gen))]))
        v, u = torch.stack(fv), torch.stack(fq)
        det = self.module
        # g1: -log p1(q+, e) - mean_k log(1 - p1(q-_k, e))
        lp = det.pre_log_prob(u, v)
        k = torch.stack(neg_q)
        ln = det.pre_log_prob(self.q_emb[k].flatten(0, 1), v.repeat_interleave(hp.n_negatives, 0)).view(k.shape)
        log1m = torch.log1p(-ln.exp().clamp(max=1 - 1e-6))
        ok = torch.stack(neg_ok).float()
        l_pre = (-lp - (log1m * ok).sum(-1) / ok.sum(-1).clamp(min=1)).mean()
        # g2: cross-entropy of one positive and one negative pair per positive
        zp = det.dis_logit(torch.stack([self.pair_emb[t] for t in pair_p]), u, v)
        zn = det.dis_logit(torch.stack([self.pair_emb[t] for t in pair_n]),
                           torch.stack([self.emb[t.split(SEP, 1)[1]] for t in pair_n]), v)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        l_dis = 0.5 * (bce(zp, torch.ones_like(zp)) + bce(zn, torch.zeros_like(zn)))
        return l_pre, l_dis

    def step(self, step: int) -> dict:
        self.module.train()
        self.opt.zero_grad()
        l_pre, l_dis = self._losses(step)
        (l_pre + l_dis).backward()
        self.opt.step()
        return {"loss_pre": float(l_pre.detach()), "loss_dis": float(l_dis.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """On the held-out edits: edit success = a question in an edit's scope is detected as that edit
        (against all held-out edits); locality = a hard negative is detected as no conflict."""
        if len(self.val) < 1:
            return {"edit_success": float("nan"), "locality": float("nan")}
        self.module.eval()
        facts = [g.fact for g in self.val]
        embs = torch.stack([self.emb[f] for f in facts])
        ok, loc = [], []
        for i, g in enumerate(self.val):
            for q in g.positives:
                ok.append(float(detect(self.module, self.encoder, q, facts, embs, self.hp.threshold).index == i))
            for q in g.hard:
                loc.append(float(detect(self.module, self.encoder, q, facts, embs, self.hp.threshold).index is None))
        return {"edit_success": sum(ok) / max(1, len(ok)), "locality": sum(loc) / len(loc) if loc else float("nan")}

    def config(self) -> dict:
        return {"encoder": self.encoder.identity, "dim": SentenceEncoder.dim, "hidden": self.hp.hidden,
                "n_edits": len(self.groups)}


def train_pokemqa(lm, records: list[TrainingRecord], hp: PokeMQAHparams, *, steps: int | None = None, out=None,
                  progress: bool = True, resume: bool = True) -> TrainedEditor:
    """Train PokeMQA's scope detector (both stages) on ``records`` and save it (``out``, ``hp.editor``
    or the cache folder of its key). ``lm`` only keys the artefact: the detector never reads it."""
    return run_training("pokemqa", lm, records, hp, _PokeMQATrainer, steps=steps, out=out, progress=progress,
                        resume=resume, edit_time=EDIT_TIME)


# ====================================================================== the loop
@dataclass
class PokeMQATrace:
    """What :func:`pokemqa_answer` did: the answer (``""`` when none), each round's subquestion and
    decision, the rounds run, why it stopped and the final text."""

    answer: str
    steps: list[dict]
    rounds: int
    stopped: str  # "final answer", "no subquestion", "max rounds"
    text: str


def pokemqa_answer(lm, question: str, decide: Callable[[str], tuple[str | None, dict]], *, prompt: str,
                   question_label: str = "Question: ", max_rounds: int = 5, max_new_tokens: int = 256,
                   stop: Sequence[str] = ("Generated answer:", "\n\n"),
                   generate: Callable[[str], str] | None = None) -> PokeMQATrace:
    """Answer ``question`` with PokeMQA's loop (module docstring) on ``lm``.

    ``decide(subquestion) -> (fact or None, info)``: the scope detector's decision (None: no conflict).
    ``generate``: the text so far → its continuation, cut before a stop string, in place of greedy
    decoding on ``lm`` (tests; another decoder)."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidQuestionError(f"a PokeMQA question is a non-empty string, got {question!r}")
    gen_fn = generate if generate is not None else (lambda t: greedy_until(lm, t, max_new_tokens, stop))
    text = prompt + "\n\n" + question_label + question
    steps: list[dict] = []
    for r in range(max_rounds):
        gen = gen_fn(text)
        lines = gen.strip().split("\n")
        if lines[-1].startswith(FINAL):
            return PokeMQATrace(lines[-1][len(FINAL):], steps, r + 1, "final answer", text + gen)
        if len(lines) > 3 or not lines[-1].startswith(SUBQUESTION):
            return PokeMQATrace("", steps, r + 1, "no subquestion", text + gen)
        sub = lines[-1][len(SUBQUESTION):]
        fact, info = decide(sub)
        steps.append({"subquestion": sub, "conflict": fact is not None, "fact": fact, **info})
        text = text + gen + (GENERATED if fact is None else f"{GENERATED}: {fact}.")
    return PokeMQATrace("", steps, max_rounds, "max rounds", text)


# ====================================================================== the edit
class PokeMQAMemory(InputTransform):
    """One PokeMQA edit: its edits (facts) and their MiniLM embeddings, the trained detector, the loop's
    prompt and settings. :meth:`answer_question` is the MQuAKE scorer's hook; :meth:`prefix` the
    plain-prompt behaviour (module docstring)."""

    type_name = "pokemqa-memory"

    def __init__(self, facts: Sequence[str], embeddings: torch.Tensor, detector: dict[str, torch.Tensor], *,
                 encoder_identity: str, prompt: str, loop: dict, plain: dict, earlier_prefixes: Sequence[str] = ()):
        self.facts = list(facts)
        self.embeddings = embeddings.float().contiguous()
        self.detector_tensors = {k: v.detach().clone() for k, v in detector.items()}
        self.detector = detector_from_tensors(self.detector_tensors)
        self.encoder_identity = encoder_identity
        self.prompt, self.loop, self.plain = prompt, dict(loop), dict(plain)
        self.loop["stop"] = list(self.loop["stop"])
        self.earlier_prefixes = sorted(set(earlier_prefixes))
        self._encoder: SentenceEncoder | None = None
        self._seen: dict[str, str] = {}

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            enc = SentenceEncoder()
            if enc.identity != self.encoder_identity:
                raise EditFailedError("this PokeMQA edit's detector was trained on another sentence encoder "
                                      f"({self.encoder_identity[:12]}), not the installed one")
            self._encoder = enc
        return self._encoder

    def decide(self, question: str, facts: Sequence[str] | None = None,
               embeddings: torch.Tensor | None = None) -> tuple[str | None, dict]:
        """The detector's decision for ``question`` against this memory's edits (or ``facts``)."""
        facts = self.facts if facts is None else list(facts)
        embeddings = self.embeddings if embeddings is None else embeddings
        d = detect(self.detector, self.encoder, question, facts, embeddings, self.loop["threshold"])
        info = {"candidates": [facts[i] for i in d.candidates], "p_pre": d.p_pre, "p_dis": d.p_dis}
        return (None if d.index is None else facts[d.index]), info

    def prefix(self, prompt: str) -> str:
        if not self.plain["enabled"]:
            return ""
        if prompt not in self._seen:
            placed = strip_prefixes(prompt, self.earlier_prefixes) != prompt  # an earlier memory placed its edit
            fact = None if placed else self.decide(prompt)[0]
            if len(self._seen) >= 256:
                self._seen.pop(next(iter(self._seen)))
            self._seen[prompt] = "" if fact is None else self.plain["template"].format(fact=fact)
        return self._seen[prompt]

    def answer_question(self, lm, question: str) -> str:
        """PokeMQA's answer to ``question`` on ``lm`` (``""`` when the loop gives none), against the edits of
        every PokeMQA edit applied to ``lm``, with this memory's detector."""
        return self.trace(lm, question).answer

    def trace(self, lm, question: str, generate: Callable[[str], str] | None = None) -> PokeMQATrace:
        """The whole loop for ``question`` (see :func:`pokemqa_answer`)."""
        facts, embs = applied_facts(lm) or (self.facts, self.embeddings)
        return pokemqa_answer(lm, question, lambda q: self.decide(q, facts, embs), prompt=self.prompt,
                              question_label=self.loop["question_label"], max_rounds=self.loop["max_rounds"],
                              max_new_tokens=self.loop["max_new_tokens"], stop=self.loop["stop"], generate=generate)

    def config(self) -> dict:
        return {"facts": self.facts, "encoder": self.encoder_identity, "prompt": self.prompt, "loop": self.loop,
                "plain": self.plain, "earlier_prefixes": self.earlier_prefixes}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings, **{f"det.{k}": v for k, v in self.detector_tensors.items()}}

    @classmethod
    def from_saved(cls, config, tensors):
        det = {k[len("det."):]: v for k, v in tensors.items() if k.startswith("det.")}
        return cls(config["facts"], tensors["embeddings"], det, encoder_identity=config["encoder"],
                   prompt=config["prompt"], loop=config["loop"], plain=config["plain"],
                   earlier_prefixes=config["earlier_prefixes"])

    def __repr__(self) -> str:
        return f"PokeMQAMemory({len(self.facts)} facts)"


def applied_pokemqa(lm) -> list[PokeMQAMemory]:
    """The PokeMQA memories of the edits applied to ``lm``, oldest first."""
    return [t for e in lm.applied_edits for t in e.input_transforms if isinstance(t, PokeMQAMemory)]


def applied_facts(lm) -> tuple[list[str], torch.Tensor] | None:
    """The edits of every PokeMQA edit applied to ``lm`` (first occurrence kept) and their embeddings."""
    seen: dict[str, torch.Tensor] = {}
    for m in applied_pokemqa(lm):
        for f, e in zip(m.facts, m.embeddings):
            seen.setdefault(f, e)
    return (list(seen), torch.stack(list(seen.values()))) if seen else None


def read_prompt(prompt: str, rt: Runtime) -> str:
    """The few-shot prompt (a file under the data directory, an absolute path, or the format example)."""
    if prompt == FORMAT_EXAMPLE_NAME:
        return FORMAT_EXAMPLE
    path = Path(prompt).expanduser()
    if not path.is_absolute():
        path = find_data_dir(rt.data_dir) / path
    if not path.is_file():
        raise DatasetNotFoundError(
            f"PokeMQA prompt not found: {path}. It is the PokeMQA repository's prompts/woKGprompt.txt "
            f"(Hengrui-Gu/PokeMQA, MIT); put it at {PROMPT_FILE} under the data directory, or give the "
            "hyperparameter 'prompt' (relative to the data dir, or absolute)")
    return path.read_text(encoding="utf-8")


@register("pokemqa", PokeMQAHparams, batched=True, layers=None, train=train_pokemqa,
          smoke={"prompt": FORMAT_EXAMPLE_NAME, "max_rounds": 2, "max_new_tokens": 16, "train_data": "toy",
                 "train_if_missing": True, "train_steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2},
          description="PokeMQA: MeLLo's decomposition loop with a trained two-stage scope detector (pre-detector, "
                      "conflict disambiguator) deciding which subquestions conflict with an edit (Gu et al. 2023; "
                      "needs `locate-edit train pokemqa`)")
def compute_pokemqa(lm, requests: list[Request], hp: PokeMQAHparams, rt: Runtime) -> Edit:
    """The PokeMQA edit of ``requests`` (not applied): one :class:`PokeMQAMemory` with their edits, the
    trained detector, the prompt and the loop's settings. No weight is touched."""
    t0 = time.perf_counter()
    prompt = read_prompt(hp.prompt, rt)
    memo = ("pokemqa-detector", lm.fingerprint, json.dumps(asdict(hp), sort_keys=True, default=str), str(rt.data_dir))
    if memo not in rt.cache:
        path, records = training_file(hp.train_data, hp.eval_cases, rt.data_dir)
        rt.cache[memo] = obtain("pokemqa", lm, hp, data_path=path, records=records, train_fn=train_pokemqa,
                                edit_time=EDIT_TIME, progress=bool(rt.progress))
    art = rt.cache[memo]
    encoder = SentenceEncoder()
    if encoder.identity != art.config["encoder"]:
        raise EditFailedError(f"the trained PokeMQA detector at {art.path} was trained with another sentence encoder")
    facts = list(dict.fromkeys(fact_sentence(r) for r in requests))
    earlier = [m for m in applied_pokemqa(lm) if m.plain["enabled"]]
    mem = PokeMQAMemory(facts, encoder.encode(facts), art.tensors, encoder_identity=art.config["encoder"],
                        prompt=prompt,
                        loop={"question_label": hp.question_label, "max_rounds": hp.max_rounds,
                              "max_new_tokens": hp.max_new_tokens, "stop": list(hp.stop), "threshold": hp.threshold},
                        plain={"enabled": hp.plain_prompts, "template": hp.plain_template},
                        earlier_prefixes=[m.plain["template"].format(fact=f) for m in earlier for f in m.facts])
    mem._encoder = encoder
    return Edit(method="pokemqa", requests=list(requests), interventions=[mem], fingerprint=lm.fingerprint,
                model_name=lm.name, hparams=asdict(hp), timings={"total_s": time.perf_counter() - t0},
                metrics={"facts": facts, "detector": str(art.path)})


def pokemqa(requests: Request | list[Request], *, model=None, runtime: Runtime | None = None, **hparams) -> Edit:
    """The PokeMQA edit of ``requests`` (computed and **not applied**)."""
    return compute("pokemqa", requests, model=model, runtime=runtime, **hparams)
