"""MeLLo: Memory-based Editing for Large Language Models (Zhong, Wu, Manning, Potts & Chen, EMNLP 2023,
the MQuAKE paper).

MeLLo changes no weight. The edited facts are kept as sentences in a memory,

    M = { t_r(s) + " " + o*  :  (s, r, o*) an edit }        e.g. "Jared Kushner is a citizen of Canada"

and a multi-hop question is answered by a loop that the paper's few-shot prompt teaches the model
(MQuAKE repository, ``prompts/MeLLo-prompt.txt``; each demonstration decomposes one question):

    for round = 1 .. R (R = 4):
        the model continues the text, stopping before "Retrieved fact:", with
            Subquestion: q_j                  (decomposition)
            Generated answer: a_j             (its tentative answer)
        or ends with "Final answer: a"        → the answer; stop
        f_j = argmax_{f in M} sim(q_j, f)    (the nearest edited fact to the subquestion)
        the text gets "Retrieved fact: f_j." and the model goes on with
            "Retrieved fact (does not) contradict(s) to generated answer, so the intermediate answer is: ..."
    no "Final answer" within R rounds, or a round whose last two lines are not a subquestion and an
    answer → no answer.

This is the reference notebook (``run_mello.ipynb``) step for step: the text starts as the prompt,
``"\\n\\nQustion: "`` (sic; :attr:`MeLLoHparams.question_label`) and the question; every round is a
greedy continuation of at most 256 tokens cut before the stop string; the answer is the last line
after "Final answer: ", the subquestion the line before the last, read only when it starts with
"Subquestion: "; the retrieved fact is appended as ``"Retrieved fact: " + f + "."``. MQuAKE counts a
case as answered when any of its three questions gives ``new_answer`` or an alias
(:func:`edit.eval.metrics.score_mquake`).

How the edit works here. A MeLLo edit holds its requests' facts (``rendered + target_new``) and their
embeddings in a :class:`MeLLoMemory`, an input transform with a :meth:`~MeLLoMemory.answer_question`
method: :func:`edit.eval.metrics.score_mquake` asks the multi-hop questions through the newest
applied intervention that answers questions itself, so MQuAKE's multi-hop accuracy is MeLLo's loop
(:func:`mello_answer`) over the facts of every MeLLo edit applied to the model (the memory grows
with sequential edits). The loop's prompts see the other applied edits as usual (weights, hooks and
other input transforms), but not the memories' plain-prompt text below.

Prompts read outside the loop (a cloze statement of an edited fact, a neighbourhood prompt) get the
loop's retrieval step without its self-check: the nearest fact, as ``"Retrieved fact: {fact}.\\n"``
before the prompt. The paper defines no behaviour there (it reports multi-hop accuracy only); this
one makes the edited facts readable to single-hop metrics and is on by default (``plain_prompts``).
Like the loop's retrieval it has no threshold, so EVERY prompt gets the nearest fact and locality
suffers; ``plain_threshold`` places it only above a cosine similarity, ``plain_prompts=False`` never
(the edit then changes only the answers of :meth:`answer_question`). With several MeLLo edits
applied, each memory places its nearest fact only when it is nearer than every fact of the MeLLo
edits applied before it (a snapshot taken when it is computed), as MemPrompt's memories do
(:mod:`edit.methods.memprompt`): one fact, except where a newer fact is nearer than an older one
that an older memory already placed.

Departures from the reference:

* Retriever: all-MiniLM-L6-v2 (:mod:`edit.retrieval`, cosine) for the reference's Contriever
  (facebook/contriever-msmarco, mean-pooled, unnormalised dot product), as every memory method here.
* Memory: the facts of the edits applied to the model. The reference notebook builds one memory
  from every edit of the dataset (all 3,000 MQuAKE-CF-3k cases) and asks each case against it, so
  other cases' facts are distractors; in this toolkit's single mode a case's memory holds its own
  edits only, which makes retrieval easier, and sequential mode grows it as the paper's larger
  batches do.
* The model: the reference calls text-davinci-003 (temperature 0, ``max_tokens=256``); here the
  edited model itself, greedy. A small model may continue past its final answer into a new
  demonstration; the reference parse then reads the new demonstration's last lines, as it would
  for davinci. ``stop`` adds stop strings (e.g. ``"\\n\\nQuestion:"``) to cut it there instead.
* The reference breaks out of a case at its first correctly answered question; here all three are
  asked, so that the per-question accuracy can be reported too (the any-of-three rule is the same).

The prompt file is MIT-licensed (Copyright (c) 2023 Princeton Natural Language Processing). It is
not packaged: it is read from the data directory (``mquake/prompts/MeLLo-prompt.txt`` under
``Runtime.data_dir``, ``$LOCATE_EDIT_DATA`` or ``shared/data``) when an edit is computed, and kept in
the edit, so a saved edit answers without the file.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from locate.errors import EditFailedError, InvalidHparamsError, LocateEditError

from ..edit import Edit, InputTransform
from ..eval.datasets import DatasetNotFoundError, find_data_dir
from ..registry import Runtime, register
from ..request import Request
from ..retrieval import SentenceEncoder
from .memprompt import strip_prefixes

PROMPT_FILE = "mquake/prompts/MeLLo-prompt.txt"
# one demonstration of our own in the prompt's layout (edit/data/README.md): the tests' cheap settings use it,
# so the suite runs where the paper's prompt was not put in the data directory. Not the paper's prompt.
FORMAT_EXAMPLE = str(Path(__file__).resolve().parents[1] / "data" / "mello_format_example.txt")
SUBQUESTION, FINAL, RETRIEVED = "Subquestion: ", "Final answer: ", "Retrieved fact: "
_QUERY_CACHE = 256  # plain prompts whose retrieval a memory remembers (a prompt is encoded several times when scored)


class MeLLoContextError(EditFailedError):
    """The MeLLo prompt does not fit the model's context."""


class InvalidQuestionError(LocateEditError, ValueError):
    """MeLLo was asked something that is not a question string."""


@dataclass
class MeLLoHparams:
    """MeLLo's hyper-parameters; defaults are the reference notebook's (princeton-nlp/MQuAKE run_mello.ipynb)."""

    prompt: str = PROMPT_FILE  # the few-shot prompt: a file under the data dir (or an absolute path)
    question_label: str = "Qustion: "  # sic: the notebook writes "\n\nQustion: " + question ("Question: " as the demos)
    max_rounds: int = 4  # generation rounds per question (the notebook's range(4))
    max_new_tokens: int = 256  # tokens per round (the notebook's max_tokens)
    stop: tuple = ("Retrieved fact:",)  # a round ends before the first of these (the notebook's stop)
    plain_prompts: bool = True  # prompts outside the loop get the nearest fact before them (module docstring)
    plain_threshold: float | None = None  # ... only above this cosine (None: always, like the loop's retrieval)
    plain_template: str = "Retrieved fact: {fact}.\n"  # how that fact is written before a prompt

    def __post_init__(self):
        for name in ("max_rounds", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not self.stop or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidHparamsError(f"stop must be one or more non-empty strings, got {self.stop!r}")
        if not isinstance(self.question_label, str):
            raise InvalidHparamsError(f"question_label must be a string, got {self.question_label!r}")
        if self.plain_threshold is not None and (isinstance(self.plain_threshold, bool) or not
                                                 isinstance(self.plain_threshold, (int, float))
                                                 or not -1.0 <= self.plain_threshold <= 1.0):
            raise InvalidHparamsError(f"plain_threshold is None or a cosine in [-1, 1], got {self.plain_threshold!r}")
        try:
            self.plain_template.format(fact="f")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise InvalidHparamsError(f"plain_template must be a format string with the one field {{fact}}, "
                                      f"got {self.plain_template!r}") from e


def _space(s: str) -> str:
    return s if s.startswith(" ") else " " + s


def fact_sentence(r: Request) -> str:
    """An edit as the memory stores it: ``t_r(s) o*`` (the notebook's ``f'{prompt.format(subject)} {target}'``)."""
    return r.rendered + _space(r.target_new.strip())


# ====================================================================== the memory
@dataclass
class FactMemory:
    """Edited facts and their unit embeddings; :meth:`retrieve` gives the nearest one to a query."""

    facts: list[str]
    embeddings: torch.Tensor  # (n, 384)
    encoder: SentenceEncoder | None = field(default=None, repr=False)

    @classmethod
    def of(cls, facts: Sequence[str], encoder: SentenceEncoder | None = None) -> "FactMemory":
        """A memory of ``facts`` (duplicates kept once, first occurrence), embedded now."""
        facts = list(dict.fromkeys(facts))
        if not facts:
            raise InvalidHparamsError("a MeLLo memory needs at least one fact")
        encoder = encoder or SentenceEncoder()
        return cls(facts, encoder.encode(facts), encoder)

    def embed(self, query: str) -> torch.Tensor:
        """The unit embedding of ``query`` (the encoder is made on first use)."""
        if self.encoder is None:
            self.encoder = SentenceEncoder()
        return self.encoder.encode([query])[0]

    def scores(self, query: str) -> torch.Tensor:
        """The cosine of every fact with ``query``."""
        return self.embeddings @ self.embed(query)

    def retrieve(self, query: str) -> tuple[str, float]:
        """The nearest fact to ``query`` and its cosine (k = 1, no threshold, as the reference)."""
        s = self.scores(query)
        i = int(s.argmax())
        return self.facts[i], float(s[i])


class MeLLoMemory(InputTransform):
    """One MeLLo edit: its facts and embeddings, the loop's prompt and settings, and the plain-prompt
    behaviour (module docstring). :meth:`answer_question` is the hook the MQuAKE scorer calls."""

    type_name = "mello-memory"

    def __init__(self, facts: Sequence[str], embeddings: torch.Tensor, *, prompt: str, loop: dict,
                 plain: dict, earlier_embeddings: torch.Tensor | None = None, earlier_prefixes: Sequence[str] = ()):
        self.memory = FactMemory(list(facts), embeddings.float().contiguous())
        self.prompt, self.loop, self.plain = prompt, dict(loop), dict(plain)
        self.loop["stop"] = list(self.loop["stop"])
        self.earlier_embeddings = (torch.zeros(0, self.memory.embeddings.shape[1]) if earlier_embeddings is None
                                   else earlier_embeddings.float().contiguous())
        self.earlier_prefixes = sorted(set(earlier_prefixes))
        self._seen: dict[str, str] = {}

    @property
    def facts(self) -> list[str]:
        return self.memory.facts

    def fact_prefixes(self) -> list[str]:
        return [self.plain["template"].format(fact=f) for f in self.facts]

    # ------------------------------------------------------------------ prompts outside the loop
    def prefix(self, prompt: str) -> str:
        if not self.plain["enabled"]:
            return ""
        if prompt not in self._seen:
            q = self.memory.embed(strip_prefixes(prompt, self.earlier_prefixes))
            own = self.memory.embeddings @ q
            i = int(own.argmax())
            earlier = float((self.earlier_embeddings @ q).max()) if len(self.earlier_embeddings) else float("-inf")
            tau = self.plain["threshold"]
            hit = float(own[i]) > earlier and (tau is None or float(own[i]) > tau)
            if len(self._seen) >= _QUERY_CACHE:
                self._seen.pop(next(iter(self._seen)))
            self._seen[prompt] = self.fact_prefixes()[i] if hit else ""
        return self._seen[prompt]

    # ------------------------------------------------------------------ the loop
    def answer_question(self, lm, question: str) -> str:
        """MeLLo's answer to ``question`` on ``lm`` (the final answer, ``""`` when the loop gives none),
        with the facts of every MeLLo edit applied to ``lm``. The MQuAKE scorer's hook."""
        return mello_answer(lm, question, applied_memory(lm) or self.memory, prompt=self.prompt,
                            question_label=self.loop["question_label"], max_rounds=self.loop["max_rounds"],
                            max_new_tokens=self.loop["max_new_tokens"], stop=self.loop["stop"]).answer

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {"facts": self.facts, "prompt": self.prompt, "loop": self.loop, "plain": self.plain,
                "earlier_prefixes": self.earlier_prefixes}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.memory.embeddings, "earlier_embeddings": self.earlier_embeddings}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["facts"], tensors["embeddings"], prompt=config["prompt"], loop=config["loop"],
                   plain=config["plain"], earlier_embeddings=tensors["earlier_embeddings"],
                   earlier_prefixes=config["earlier_prefixes"])

    def __repr__(self) -> str:
        return f"MeLLoMemory({len(self.facts)} facts, {len(self.earlier_embeddings)} earlier)"


def applied_memories(lm) -> list[MeLLoMemory]:
    """The MeLLo memories of the edits applied to ``lm``, oldest first."""
    return [t for e in lm.applied_edits for t in e.input_transforms if isinstance(t, MeLLoMemory)]


def applied_memory(lm) -> FactMemory | None:
    """One memory of the facts of every MeLLo edit applied to ``lm`` (None when there is none)."""
    mems = applied_memories(lm)
    if not mems:
        return None
    seen: dict[str, torch.Tensor] = {}
    for m in mems:
        for f, emb in zip(m.facts, m.memory.embeddings):
            seen.setdefault(f, emb)
    return FactMemory(list(seen), torch.stack(list(seen.values())), mems[-1].memory.encoder)


# ====================================================================== the loop
@dataclass
class MeLLoTrace:
    """What :func:`mello_answer` did: the answer (``""`` when none), each round's subquestion and
    retrieved fact (with its cosine), the rounds run, why it stopped and the final text."""

    answer: str
    steps: list[dict]
    rounds: int
    stopped: str  # "final answer", "no subquestion", "max rounds"
    text: str


def loop_ids(lm, text: str) -> list[int]:
    """Tokens of ``text`` under the applied edits' input transforms, except the plain-prompt text of the
    memories that answer questions themselves (MeLLo's, PokeMQA's: the loop puts its facts in the text
    itself)."""
    for e in lm.applied_edits:
        for t in e.input_transforms:
            if not callable(getattr(t, "answer_question", None)):
                text = t(text)
    return lm.encode(text, raw=True)


@torch.no_grad()
def greedy_until(lm, text: str, max_new_tokens: int, stop: Sequence[str]) -> str:
    """The greedy continuation of ``text`` on ``lm``, cut before the first stop string (which is not
    returned, as an API stop sequence), at EOS or after ``max_new_tokens`` tokens (fewer where the
    model's context ends)."""
    ids = loop_ids(lm, text)
    n_ctx = getattr(lm.cfg, "n_ctx", None)
    if n_ctx and len(ids) >= n_ctx:
        raise MeLLoContextError(f"the MeLLo text is {len(ids)} tokens, the model's context {n_ctx}: no room to "
                                "generate (a shorter prompt, or a model with a longer context)")
    budget = min(max_new_tokens, n_ctx - len(ids)) if n_ctx else max_new_tokens
    step, past, out = torch.tensor([ids], device=lm.device), None, []
    eos = lm.tokenizer.eos_token_id
    for _ in range(budget):
        res = lm.hf_model(input_ids=step, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        said = lm.tokenizer.decode(out, skip_special_tokens=True)
        cut = [said.index(s) for s in stop if s in said]
        if cut:
            return said[:min(cut)]
        step = torch.tensor([[nxt]], device=lm.device)
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def mello_answer(lm, question: str, memory: FactMemory, *, prompt: str, question_label: str = "Qustion: ",
                 max_rounds: int = 4, max_new_tokens: int = 256, stop: Sequence[str] = ("Retrieved fact:",),
                 generate: Callable[[str], str] | None = None) -> MeLLoTrace:
    """Answer ``question`` with MeLLo's loop (module docstring) on ``lm`` against ``memory``.

    ``generate``: a function from the text so far to its continuation (cut before a stop string), in
    place of :func:`greedy_until` on ``lm`` (tests; another decoder)."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidQuestionError(f"a MeLLo question is a non-empty string, got {question!r}")
    gen_fn = generate if generate is not None else (lambda t: greedy_until(lm, t, max_new_tokens, stop))
    text = prompt + "\n\n" + question_label + question
    steps: list[dict] = []
    for r in range(max_rounds):
        gen = gen_fn(text)
        lines = gen.strip().split("\n")
        if lines[-1].startswith(FINAL):
            return MeLLoTrace(lines[-1][len(FINAL):], steps, r + 1, "final answer", text + gen)
        if len(lines) < 2 or not lines[-2].startswith(SUBQUESTION):
            return MeLLoTrace("", steps, r + 1, "no subquestion", text + gen)
        sub = lines[-2][len(SUBQUESTION):]
        fact, score = memory.retrieve(sub)
        steps.append({"subquestion": sub, "generated": lines[-1], "fact": fact, "score": score})
        text = text + gen + RETRIEVED + fact + "."
    return MeLLoTrace("", steps, max_rounds, "max rounds", text)


# ====================================================================== the method
def read_prompt(hp: MeLLoHparams, rt: Runtime) -> str:
    """The few-shot prompt of ``hp`` (a file under the data directory, or an absolute path)."""
    path = Path(hp.prompt).expanduser()
    if not path.is_absolute():
        path = find_data_dir(rt.data_dir) / path
    if not path.is_file():
        raise DatasetNotFoundError(
            f"MeLLo prompt not found: {path}. It is the MQuAKE repository's prompts/MeLLo-prompt.txt "
            f"(princeton-nlp/MQuAKE, MIT); put it at {PROMPT_FILE} under the data directory, or give the "
            "hyperparameter 'prompt' (relative to the data dir, or absolute)")
    return path.read_text(encoding="utf-8")


@register("mello", MeLLoHparams, batched=True, layers=None, smoke={"max_rounds": 2, "max_new_tokens": 16, "prompt": FORMAT_EXAMPLE},
          description="MeLLo: edited facts in a memory; multi-hop questions decomposed by the model and each "
                      "subquestion checked against the nearest edited fact (Zhong et al. 2023)")
def compute_mello(lm, requests: list[Request], hp: MeLLoHparams, rt: Runtime) -> Edit:
    """The MeLLo edit of ``requests`` (not applied): one :class:`MeLLoMemory` holding their facts, the
    few-shot prompt and the loop's settings. No weight is touched."""
    t0 = time.perf_counter()
    prompt = read_prompt(hp, rt)
    memory = FactMemory.of([fact_sentence(r) for r in requests])
    plain = {"enabled": hp.plain_prompts, "threshold": hp.plain_threshold, "template": hp.plain_template}
    earlier = [m for m in applied_memories(lm) if m.plain["enabled"]]  # the ones that place facts before prompts
    own = set(memory.facts)
    earlier_embs = [emb for m in earlier for f, emb in zip(m.facts, m.memory.embeddings) if f not in own]
    mem = MeLLoMemory(memory.facts, memory.embeddings, prompt=prompt,
                      loop={"question_label": hp.question_label, "max_rounds": hp.max_rounds,
                            "max_new_tokens": hp.max_new_tokens, "stop": list(hp.stop)},
                      plain=plain, earlier_embeddings=torch.stack(earlier_embs) if earlier_embs else None,
                      earlier_prefixes=[p for m in earlier for p in m.fact_prefixes()])
    mem.memory.encoder = memory.encoder
    return Edit(
        method="mello",
        requests=list(requests),
        interventions=[mem],
        fingerprint=lm.fingerprint,
        model_name=lm.name,
        hparams=asdict(hp),
        timings={"total_s": time.perf_counter() - t0},
        metrics={"facts": memory.facts, "earlier_facts": len(earlier_embs)},
    )
