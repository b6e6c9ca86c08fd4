"""Knowledge-editing metrics, as the papers define them.

CounterFact (Meng et al. 2022, ROME §4.2), with P[x] the model's probability of continuation x:

    Efficacy Score        ES = E[ 1{ P[o*] > P[o^c] } ]   on the rewrite prompt      (o* new, o^c true)
    Efficacy Magnitude    EM = E[ P[o*] - P[o^c] ]
    Paraphrase Score      PS, PM: the same on the paraphrase prompts
    Neighborhood Score    NS = E[ 1{ P[o^c] > P[o*] } ]   on the neighborhood prompts, NM = E[ P[o^c] - P[o*] ]
    Score                 S  = HarmonicMean(ES, PS, NS)
    Fluency (generation entropy) = mean over generations of  ½ [ (2/3) H_2 + (4/3) H_3 ] = H_2/3 + 2 H_3/3,
                          H_n the entropy (bits) of the n-gram frequency distribution of one text
                          (``n_gram_entropy`` in the ROME code: the weighted terms are averaged, not
                          summed). Texts are sampled top-k 5 to 100 tokens, prompt included, and never
                          stop early: the reference generates through end-of-sequence tokens.
    Consistency (reference score): NOT AVAILABLE. It needs ROME's tf-idf vocabulary, idf vector and
                          Wikipedia attribute snippets, which we do not have; we report it as missing.

P[x] of a multi-token target is the teacher-forced product of its token probabilities, i.e.
exp(sum of log-probs) (``normalize="sum"``, the definition). The ROME code compares exp(mean
log-prob) instead (``normalize="mean"``), which can flip ES for targets of different lengths.

zsRE and the knowledge-editing survey (Yao et al. 2023): teacher-forced top-1 token accuracy of the
target on the edit prompt (Reliability) and on the rephrase (Generality); Locality is the fraction of
the locality answer's tokens on which the edited model's top-1 prediction equals the unedited
model's; Portability is the teacher-forced token accuracy of the portability answer.

MQuAKE (Zhong et al. 2023, §3.3) scores generated answers (:func:`score_mquake`): multi-hop accuracy
counts a case correct if ANY of its three questions is answered with the new answer or an alias;
edit-wise success is the fraction of all edited facts whose cloze statement the edited model completes
with the new object; instance-wise accuracy asks every fact of the post-edit chain. The teacher-forced
Portability above stays beside them as the per-question token accuracy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from locate.errors import InvalidArgumentError, LocateEditError

from ..context import normalize_generation

CONSISTENCY_NOT_AVAILABLE = "not available: needs tf-idf data we do not have"


# --------------------------------------------------------------------------- teacher forcing
@dataclass
class TeacherForced:
    """Per-token results of feeding ``prompt + target`` to the model."""

    target_ids: list[int]
    logprobs: np.ndarray  # log P(target_j | prompt, target_<j), one per target token
    argmax: np.ndarray  # the model's top-1 token at each of those positions

    @property
    def logprob(self) -> float:
        """log P(target | prompt), the teacher-forced sum."""
        return float(self.logprobs.sum())

    @property
    def mean_logprob(self) -> float:
        return float(self.logprobs.mean())

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the model's top-1 prediction."""
        return float((self.argmax == np.asarray(self.target_ids)).mean())

    @property
    def exact(self) -> bool:
        return bool((self.argmax == np.asarray(self.target_ids)).all())


@torch.no_grad()
def teacher_forced(lm, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32) -> list[TeacherForced]:
    """Teacher-force each ``target`` after its ``prompt``, in padded batches of ``batch_size``.

    Target ids are those that follow the prompt's own tokens in ``prompt + target``
    (:meth:`locate.HookedLM.target_ids`), so the leading space is tokenized as in running text.
    """
    if len(prompts) != len(targets):
        raise InvalidArgumentError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows = []
    for p, t in zip(prompts, targets):
        pid = lm.encode(p)
        rows.append((pid, lm.target_ids(t, p)))
    out: list[TeacherForced | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))  # similar lengths together
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = lm.pad([rows[i][0] + rows[i][1] for i in idx])
        logits = lm.forward(batch)
        for b, i in enumerate(idx):
            n_p, tgt = len(rows[i][0]), rows[i][1]
            # the token at position n_p + j is predicted by the logits at n_p + j - 1
            lp = torch.log_softmax(logits[b, n_p - 1: n_p - 1 + len(tgt)].float(), dim=-1)
            ids = torch.as_tensor(tgt, device=lp.device)
            out[i] = TeacherForced(list(tgt), lp[torch.arange(len(tgt)), ids].cpu().numpy(),
                                   lp.argmax(-1).cpu().numpy())
    return out  # type: ignore[return-value]


def prob(tf: TeacherForced, normalize: str = "sum") -> float:
    """P[target] from a teacher-forced pass: exp(sum log-probs), or exp(mean) as the ROME code does."""
    if normalize == "sum":
        return math.exp(tf.logprob)
    if normalize == "mean":
        return math.exp(tf.mean_logprob)
    raise InvalidArgumentError(f"normalize must be 'sum' or 'mean', got {normalize!r}")


# --------------------------------------------------------------------------- fluency
_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks. The ROME code uses NLTK's ``word_tokenize``; this regex splits
    words from punctuation the same way for ordinary text (it keeps contractions such as ``it's``
    whole, where NLTK splits ``'s``), without NLTK's data files."""
    return _WORD.findall(text)


def n_gram_entropy_one(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted n-gram entropy of one text: mean_n( w_n * H_n ), H_n in bits (ROME ``compute_n_gram_entropy``)."""
    tokens = word_tokenize(text)
    vals = []
    for n, w in zip(ns, weights):
        grams: dict[tuple, int] = {}
        for i in range(len(tokens) - n + 1):
            g = tuple(tokens[i:i + n])
            grams[g] = grams.get(g, 0) + 1
        if not grams:
            vals.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=np.float64)
        f /= f.sum()
        vals.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(vals))


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Fluency: the arithmetic mean of :func:`n_gram_entropy_one` over generations."""
    return float(np.mean([n_gram_entropy_one(t) for t in texts])) if texts else float("nan")


@torch.no_grad()
def sample_generations(lm, prompts: Sequence[str], *, max_length: int = 100, top_k: int = 5,
                       seed: int = 0, stop_at_eos: bool = False) -> list[str]:
    """Top-k sampled continuations of all ``prompts`` in one left-padded batch, as in ROME's
    ``generate_fast``: each text is prompt + continuation, ``max_length`` tokens in all, whatever the
    model samples (the reference does not stop at end-of-sequence, so an Instruct model that ends its
    answer early still contributes 100 tokens). ``stop_at_eos=True`` ends a row at its first EOS
    instead (not the reference; shorter texts have lower n-gram entropy). Special tokens are dropped
    from the text, and it is normalised as the reference normalises it (NFKD, blank lines to spaces)."""
    if not prompts:
        return []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = [lm.encode(p) for p in prompts]
    width = max(len(r) for r in rows)
    pad_id = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, so every row's next token is at the end
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = [list(r) for r in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    past, step_ids, step_pos = None, ids, pos
    eos = lm.tokenizer.eos_token_id
    for _ in range(max(0, max_length - min(len(r) for r in rows))):
        res = lm.hf_model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                          past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[:, -1].float().cpu()
        top = logits.topk(top_k, dim=-1)
        pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
        nxt = top.indices.gather(1, pick).squeeze(1)
        for i in range(len(rows)):
            if not done[i] and len(out[i]) < max_length:
                out[i].append(int(nxt[i]))
                if stop_at_eos and int(nxt[i]) == eos:
                    done[i] = True
            elif not done[i]:
                done[i] = True
        if bool(done.all()):
            break
        step_ids = nxt.unsqueeze(1).to(lm.device)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=mask.device)], 1)
    return [normalize_generation(lm.tokenizer.decode(o, skip_special_tokens=True)) for o in out]



# --------------------------------------------------------------------------- aggregation helpers
def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0, NaN if any is NaN (the S of ROME §4.2)."""
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


# --------------------------------------------------------------------------- per-case scoring
def reference_predictions(lm, case, *, batch_size: int = 32) -> dict:
    """What the *unedited* model predicts on a case's locality probes (teacher-forced top-1 tokens),
    the reference for Locality. Call it before editing."""
    tfs = teacher_forced(lm, [p.prompt for p in case.locality], [p.answer for p in case.locality],
                         batch_size=batch_size) if case.locality else []
    return {"locality_argmax": [t.argmax.tolist() for t in tfs]}


def score_case(lm, case, *, reference: dict | None = None, normalize: str = "sum", fluency: bool = True,
               gen_length: int = 100, seed: int = 0, batch_size: int = 32) -> dict:
    """Every metric a case's fields support, on the model as it is now (edited or not).

    One batched teacher-forced pass covers the rewrite, paraphrase, neighborhood, locality and
    portability probes; generation (fluency) is a second, sampled pass. Keys are absent when the
    case has no data for them (e.g. no ``target_true`` → no ES/PS/NS)."""
    pairs: list[tuple[str, str, str]] = []  # (group, prompt, target)
    for r in case.requests:
        pairs.append(("rewrite_new", r.rendered, r.target_new))
        if r.target_true:
            pairs.append(("rewrite_true", r.rendered, r.target_true))
    req = case.request
    for p in case.paraphrase_prompts:
        pairs.append(("paraphrase_new", p, req.target_new))
        if req.target_true:
            pairs.append(("paraphrase_true", p, req.target_true))
    if req.target_true:
        for p in case.neighborhood_prompts:
            pairs.append(("neighborhood_new", p, req.target_new))
            pairs.append(("neighborhood_true", p, req.target_true))
    for p in case.locality:
        pairs.append(("locality", p.prompt, p.answer))
    for k, p in enumerate(case.portability):
        for a in p.answers:
            pairs.append((f"portability_{k}", p.prompt, a))
    tfs = teacher_forced(lm, [p for _, p, _ in pairs], [t for _, _, t in pairs], batch_size=batch_size)
    groups: dict[str, list[TeacherForced]] = {}
    for (g, _, _), tf in zip(pairs, tfs):
        groups.setdefault(g, []).append(tf)

    out: dict = {}
    P = lambda tf: prob(tf, normalize)  # noqa: E731
    # Efficacy / paraphrase / neighborhood: P(new) vs P(true), per prompt, averaged within the case.
    for name, a, b, new_wins in (("es", "rewrite_new", "rewrite_true", True),
                                 ("ps", "paraphrase_new", "paraphrase_true", True),
                                 ("ns", "neighborhood_new", "neighborhood_true", False)):
        if groups.get(b):
            pn = [P(t) for t in groups[a]]
            pt = [P(t) for t in groups[b]]
            if new_wins:
                out[name] = _mean([float(x > y) for x, y in zip(pn, pt)])
                out[name[0] + "m"] = _mean([x - y for x, y in zip(pn, pt)])
            else:
                out[name] = _mean([float(y > x) for x, y in zip(pn, pt)])
                out[name[0] + "m"] = _mean([y - x for x, y in zip(pn, pt)])
    out["p_new"] = _mean([P(t) for t in groups["rewrite_new"]])
    if groups.get("rewrite_true"):
        out["p_true"] = _mean([P(t) for t in groups["rewrite_true"]])
    # Token accuracies (zsRE / survey): reliability on the edit prompt, generality on the rephrase.
    out["rewrite_acc"] = _mean([t.accuracy for t in groups["rewrite_new"]])
    if groups.get("paraphrase_new"):
        out["paraphrase_acc"] = _mean([t.accuracy for t in groups["paraphrase_new"]])
    if groups.get("locality"):
        if reference is not None:
            agree = [float((t.argmax == np.asarray(ref)).mean())
                     for t, ref in zip(groups["locality"], reference["locality_argmax"])]
            out["locality"] = _mean(agree)
        out["locality_acc"] = _mean([t.accuracy for t in groups["locality"]])  # against the dataset's answer
    if case.portability:
        per_q = [groups[f"portability_{k}"] for k in range(len(case.portability))]
        out["portability"] = _mean([q[0].accuracy for q in per_q])  # token accuracy of the main answer
        out["portability_em"] = _mean([float(any(t.exact for t in q)) for q in per_q])  # any alias exactly top-1
    if fluency and case.generation_prompts:
        texts = sample_generations(lm, case.generation_prompts, max_length=gen_length, seed=seed)
        out["fluency"] = n_gram_entropy(texts)
        out["generations"] = texts
    return out


# Metric keys averaged over cases, in the order tables show them.
METRICS = ("es", "ps", "ns", "em", "pm", "nm", "rewrite_acc", "paraphrase_acc", "locality", "locality_acc",
           "portability", "portability_em", "mquake_multihop", "mquake_question_acc", "mquake_instance",
           "fluency", "p_new", "p_true")


def aggregate(records: Sequence[dict]) -> dict:
    """Means over cases of every metric present, S = HarmonicMean(ES, PS, NS) of those means, MQuAKE's
    edit-wise success pooled over all edits (:func:`mquake_edit_wise`), and the consistency note."""
    agg: dict = {"n_cases": len(records)}
    for k in METRICS:
        vals = [r[k] for r in records if k in r and r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        if vals:
            agg[k] = float(np.mean(vals))
            agg[k + "_std"] = float(np.std(vals))
    if all(k in agg for k in ("es", "ps", "ns")):
        agg["score"] = harmonic_mean([agg["es"], agg["ps"], agg["ns"]])
    if mquake_edit_wise(records) is not None:  # pooled over edits, not averaged over cases
        agg["mquake_edit_wise"] = mquake_edit_wise(records)
    for k in ("edit_seconds", "peak_memory_mb"):
        vals = [r[k] for r in records if r.get(k) is not None]
        if vals:
            agg[k] = float(np.mean(vals))
    agg["consistency"] = CONSISTENCY_NOT_AVAILABLE
    return agg


# --------------------------------------------------------------------------- MQuAKE (generated answers)
class MQuAKEScoringError(LocateEditError, ValueError):
    """MQuAKE scoring was asked for something it cannot do (an unknown match rule, no questions)."""


# In-context demonstrations for the multi-hop questions, in the format of the MQuAKE repository's
# prompts/multihop-prompts.txt ("Q: <question> A: <answer>", one per line, single- and multi-hop
# questions mixed). These are our own facts; pass that file's text as ``few_shot`` for the paper's.
MQUAKE_FEW_SHOT = "\n".join([
    "Q: What is the capital of the country where the Eiffel Tower is located? A: Paris",
    "Q: Who wrote Hamlet? A: William Shakespeare",
    "Q: What is the official language of the country where Mount Fuji is located? A: Japanese",
    "Q: In which country is the company that produces the Volkswagen Golf headquartered? A: Germany",
    "Q: Which continent is the country whose capital is Nairobi located in? A: Africa",
    "Q: What is the currency of the country where the Acropolis is located? A: Euro",
    "Q: Which sport is Lionel Messi associated with? A: association football",
    "Q: What is the country of citizenship of the painter of Guernica? A: Spain",
])

MQUAKE_MATCH = ("exact", "casefold", "loose")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NOT_WORD = re.compile(r"[^\w\s]")


def normalize_answer(text: str, match: str = "exact") -> str:
    """An answer string as the ``match`` rule compares it.

    ``exact``: surrounding whitespace removed, nothing else (the MQuAKE repository's MeLLo code takes
    the answer line stripped and tests ``ans == new_answer or ans in new_answer_alias``). ``casefold``:
    also case-folded (EasyEdit's port of the same check lower-cases). ``loose``: SQuAD's normalisation
    (lower case, punctuation and the articles a/an/the removed, runs of whitespace collapsed)."""
    if match == "exact":
        return text.strip()
    if match == "casefold":
        return text.strip().casefold()
    if match == "loose":
        return " ".join(_ARTICLES.sub(" ", _NOT_WORD.sub(" ", text.lower())).split())
    raise MQuAKEScoringError(f"match must be one of {MQUAKE_MATCH}, got {match!r}")


def answer_line(continuation: str) -> str:
    """The model's answer to a ``Q: ... A:`` prompt: its continuation up to the first newline, stripped."""
    return continuation.split("\n", 1)[0].strip()


def answer_correct(continuation: str, answers: Sequence[str], match: str = "exact") -> bool:
    """Question rule: the answer line equals, under ``match``, the answer or one of its aliases."""
    got = normalize_answer(answer_line(continuation), match)
    return any(got == normalize_answer(a, match) for a in answers)


def cloze_recalled(continuation: str, answers: Sequence[str], match: str = "exact") -> bool:
    """Cloze rule (a statement such as "Hey Jude was performed by" has no end marker, so the model
    goes on after the object): the answer line begins, under ``match``, with the answer or an alias,
    followed by the end of the line or a character that is not a letter or digit."""
    got = normalize_answer(answer_line(continuation), match)
    for a in answers:
        want = normalize_answer(a, match)
        if want and got.startswith(want) and (len(got) == len(want) or not got[len(want)].isalnum()):
            return True
    return False


def mquake_question_prompt(question: str, few_shot: str = MQUAKE_FEW_SHOT) -> str:
    """``few_shot`` demonstrations, then ``Q: <question> A:`` on a new line."""
    return (few_shot.rstrip("\n") + "\n" if few_shot else "") + f"Q: {question} A:"


@torch.no_grad()
def greedy_generate(lm, prompts: Sequence[str], *, max_new_tokens: int = 20, stop: str | None = "\n",
                    batch_size: int = 32) -> list[str]:
    """Greedy (argmax) continuations of ``prompts``, the continuation only: at most ``max_new_tokens``
    tokens, a row ending at EOS or once its text contains ``stop`` (the text is cut before ``stop``).
    Rows are left-padded into batches of ``batch_size`` and decoded with a key/value cache."""
    if max_new_tokens < 1:
        raise MQuAKEScoringError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        out += _greedy_batch(lm, list(prompts[s:s + batch_size]), max_new_tokens, stop)
    return out


def _greedy_batch(lm, prompts: list[str], max_new_tokens: int, stop: str | None) -> list[str]:
    rows = [lm.encode(p) for p in prompts]
    width = max(len(r) for r in rows)
    pad_id = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's next token is predicted at the last column
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    step_ids, step_pos = ids, (mask.cumsum(1) - 1).clamp(min=0)
    eos = lm.tokenizer.eos_token_id
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    past = None
    for _ in range(max_new_tokens):
        res = lm.hf_model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                          past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = res.logits[:, -1].float().argmax(-1).cpu()
        for i in range(len(rows)):
            if done[i]:
                continue
            tok = int(nxt[i])
            if tok == eos:
                done[i] = True
                continue
            new[i].append(tok)
            if stop is not None and stop in lm.tokenizer.decode(new[i], skip_special_tokens=True):
                done[i] = True
        if all(done):
            break
        step_ids = nxt.unsqueeze(1).to(lm.device)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=mask.device)], 1)
    texts = [lm.tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return [t.split(stop, 1)[0] if stop is not None else t for t in texts]


def _mquake_edits_and_chain(case) -> tuple[list[tuple[str, tuple[str, ...]]], list[dict], list[int | None]]:
    """The edited facts (cloze prompt, accepted answers) of a case, the chain of facts after editing
    (``extra["new_single_hops"]``, empty when the case has none) and, per hop, the edit it is (or None)."""
    hops = list(case.extra.get("new_single_hops") or [])
    edited_hops = list(case.extra.get("edited_hops") or [None] * len(case.requests))
    edits, edit_of_hop = [], [None] * len(hops)
    for j, (r, k) in enumerate(zip(case.requests, edited_hops)):
        aliases = tuple(hops[k].get("answer_alias", [])) if k is not None else ()
        edits.append((r.rendered, (r.target_new.strip(), *aliases)))
        if k is not None:
            edit_of_hop[k] = j
    return edits, hops, edit_of_hop


def question_answerer(lm):
    """The newest intervention of the edits applied to ``lm`` that answers questions itself (it has a
    method ``answer_question(lm, question) -> str``, e.g. MeLLo's memory), or None."""
    for e in reversed(list(getattr(lm, "applied_edits", None) or ())):
        for iv in reversed(e.interventions):
            if callable(getattr(iv, "answer_question", None)):
                return iv
    return None


def score_mquake(lm, case, *, few_shot: str = MQUAKE_FEW_SHOT, match: str = "exact", max_new_tokens: int = 20,
                 relation_prompts: dict[str, str] | None = None, batch_size: int = 32, generate=None) -> dict:
    """MQuAKE's metrics on the model as it is now (Zhong et al. 2023, §3.3), from generated answers.

    With f* the edited model, a case d = (edits E_d, chain of facts after editing C*_d, three
    multi-hop questions Q_d, new answer a* with its aliases):

        multi-hop accuracy    1[ OR_{q in Q_d}  f*(q) = a* ]                       (any of the 3)
        edit-wise success     sum_{(s,r,o*) in E_d} 1[ f*(t_r(s)) = o* ]  /  |E_d|
        instance-wise         1[ AND_{(s,r,o) in C*_d}  f*(hop) = o ]              (the whole chain)

    Each multi-hop question is asked after ``few_shot`` in-context demonstrations as
    ``Q: <question> A:`` (the paper's standard prompting; :data:`MQUAKE_FEW_SHOT` are our own
    demonstrations in its format), the answer is the greedy continuation up to the first newline
    (at most ``max_new_tokens`` tokens), and it is correct if it equals ``new_answer`` or one of
    ``new_answer_alias`` under ``match`` (:func:`normalize_answer`; ``"exact"``, the reference, only
    strips whitespace). An edited fact is asked with its own cloze statement and no demonstrations, as
    in the paper; its greedy continuation must begin with ``target_new`` or an alias of that hop
    (:func:`cloze_recalled`). The chain's unedited hops are asked the same way, with their cloze
    statements, unless ``relation_prompts`` (relation id -> demonstrations, e.g. the MQuAKE
    repository's prompts/rel-prompts.json, which the paper uses) is given: then as questions after
    their relation's demonstrations, with the question rule.

    ``generate``: a function from a list of prompts to their continuations, in place of greedy
    decoding on ``lm`` (tests; another decoder). Without it, where an applied edit answers questions
    itself (:func:`question_answerer`: an intervention with ``answer_question(lm, question)``, MeLLo's
    decomposition loop), the multi-hop questions are asked through it instead of ``few_shot`` and
    greedy decoding; its answer is scored with the question rule. Returns per case ``mquake_multihop`` (0/1),
    ``mquake_question_acc`` (the fraction of the three questions answered, for comparison with the
    any-of-three rule), ``mquake_answers``, ``mquake_edits_recalled`` of ``mquake_n_edits`` (and their
    ratio ``mquake_edit_wise``), ``mquake_edit_answers`` and, when the case carries its chain,
    ``mquake_instance`` (0/1). :func:`aggregate` pools edit-wise success over all edits, as the paper
    defines it, not over cases."""
    if match not in MQUAKE_MATCH:
        raise MQuAKEScoringError(f"match must be one of {MQUAKE_MATCH}, got {match!r}")
    if not case.portability:
        raise MQuAKEScoringError(f"case {case.case_id!r} has no multi-hop questions (portability probes)")
    gen = generate if generate is not None else (
        lambda prompts: greedy_generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size))
    answerer = question_answerer(lm) if generate is None else None
    said = ([answerer.answer_question(lm, p.prompt) for p in case.portability] if answerer is not None
            else gen([mquake_question_prompt(p.prompt, few_shot) for p in case.portability]))
    right = [answer_correct(t, p.answers, match) for t, p in zip(said, case.portability)]

    edits, hops, edit_of_hop = _mquake_edits_and_chain(case)
    asked = [(k, h) for k, h in enumerate(hops) if edit_of_hop[k] is None]  # unedited hops of the chain
    rel = list(case.extra.get("new_hop_relations") or [None] * len(hops))
    as_question = [bool(relation_prompts) and rel[k] in relation_prompts for k, _ in asked]
    prompts = [p for p, _ in edits] + [mquake_question_prompt(h["question"], relation_prompts[rel[k]]) if q
                                       else h["cloze"] for (k, h), q in zip(asked, as_question)]
    texts = gen(prompts) if prompts else []
    recalled = [cloze_recalled(t, a, match) for t, (_, a) in zip(texts, edits)]
    out = {"mquake_multihop": float(any(right)), "mquake_question_acc": _mean([float(x) for x in right]),
           "mquake_answers": [answer_line(t) for t in said],
           "mquake_edits_recalled": int(sum(recalled)), "mquake_n_edits": len(edits),
           "mquake_edit_wise": _mean([float(x) for x in recalled]),
           "mquake_edit_answers": [answer_line(t) for t in texts[:len(edits)]]}
    if hops:
        hop_ok = [recalled[edit_of_hop[k]] for k in range(len(hops)) if edit_of_hop[k] is not None]
        for (k, h), q, t in zip(asked, as_question, texts[len(edits):]):
            accepted = (h["answer"], *h.get("answer_alias", []))
            hop_ok.append(answer_correct(t, accepted, match) if q else cloze_recalled(t, accepted, match))
        out["mquake_instance"] = float(all(hop_ok))
    return out


def mquake_edit_wise(records: Sequence[dict]) -> float | None:
    """Edit-wise success rate over every edit of ``records`` (MQuAKE pools the edits, so a case with
    four edits weighs four times a case with one); None when no record has MQuAKE edits."""
    n = sum(int(r.get("mquake_n_edits") or 0) for r in records)
    return sum(int(r.get("mquake_edits_recalled") or 0) for r in records) / n if n else None


# --------------------------------------------------------------------------- correlation (layer sweeps)
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank."""
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for val in np.unique(v):
        tie = v == val
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return pearson(_ranks(x), _ranks(y))


@torch.no_grad()
def choice_accuracy(lm, items, *, normalize: str = "sum", batch_size: int = 32) -> float:
    """Share of multiple-choice ``items`` (:class:`edit.eval.ChoiceItem`, e.g. PIQA) on which the model
    gives its highest likelihood to the right solution: the survey's "other task" locality when taken
    before and after an edit, and a general-ability check under sequential editing.

    The prompt is lm-evaluation-harness's PIQA format, ``"Question: {goal}\nAnswer:"`` followed by
    ``" {solution}"``. ``normalize="sum"`` compares summed log-likelihoods (lm-eval's ``acc``);
    ``"chars"`` divides each by the solution's length in characters (lm-eval's ``acc_norm``). Input
    transforms of applied edits are not placed before the question, as for :func:`perplexity`."""
    if normalize not in ("sum", "chars"):
        raise InvalidArgumentError(f"normalize must be 'sum' or 'chars', got {normalize!r}")
    if not items:
        raise InvalidArgumentError("choice_accuracy needs at least one item")
    prompts, targets = [], []
    for it in items:
        for sol in it.solutions:
            prompts.append(f"Question: {it.goal}\nAnswer:")
            targets.append(" " + sol.strip())
    tfs = iter(teacher_forced(lm, prompts, targets, batch_size=batch_size))
    right = 0
    for it in items:
        scores = []
        for sol in it.solutions:
            lp = next(tfs).logprob
            scores.append(lp / max(1, len(sol.strip())) if normalize == "chars" else lp)
        right += int(int(np.argmax(scores)) == it.label)
    return right / len(items)


@torch.no_grad()
def perplexity(lm, tokens: torch.Tensor, *, seq_len: int = 512, batch_size: int = 4) -> float:
    """Perplexity exp(mean NLL) of a token stream, cut into windows of ``seq_len`` tokens (each window
    scored on its own, no overlap), as a general-ability check on the model as it is (edits applied).
    ``tokens``: 1-D ids (e.g. :func:`edit.stats.token_stream` of WikiText-2 test). Input transforms of
    applied edits are not placed before the windows: this measures the weights and hooks."""
    windows = [w for w in tokens.reshape(-1).split(seq_len) if len(w) > 1]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = lm.pad([w.tolist() for w in windows[i: i + batch_size]])
        logp = lm.forward(batch).float().log_softmax(-1)
        tgt = batch.ids[:, 1:]
        mask = batch.attention_mask[:, 1:].bool()
        nll = -logp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / count)
