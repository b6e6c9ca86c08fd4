"""MemPrompt: memory-assisted prompt editing (Madaan, Tandon, Clark & Yang, EMNLP 2022).

MemPrompt changes no weight. It keeps a growing memory of (input, feedback) pairs

    M = {(x_i, fb_i)}                                                          (the memory)

and, before the model reads an input x, looks up the stored input nearest to it

    i* = argmax_i  cos(e(x), e(x_i)),     e = a sentence encoder               (retrieval)

and, when that input is close enough, gives the model its feedback with the question:

    x'  =  combine(x, fb_i*)     if  cos(e(x), e(x_i*)) > τ                     (memory hit)
    x'  =  x                     otherwise                                      (no hit: x unchanged)

For editing, a request *is* a piece of feedback: its memory entry is the request's rendered prompt
(x_i, e.g. "The Eiffel Tower is located in the city of") with the new fact as feedback (fb_i,
``feedback.format(prompt=..., target=..., subject=...)``, by default "The Eiffel Tower is located in
the city of Rome"). Keys and queries are lower-cased and stripped before they are embedded (the
reference's key processing for its semantic memory). The edit is an input transform
(:class:`MemPromptMemory`) that :meth:`locate.HookedLM.transform` calls for every prompt the toolkit
runs; where no entry passes τ it places nothing, so out-of-memory prompts are tokenised, scored and
generated bit for bit as on the unedited model.

Defaults and the reference code (madaan/memprompt: ``src/memory/semantic_memory.py``,
``src/utils/openai_wrapper.py``):

* τ = 0.9, strict (``score > match_threshold``), over the nearest entry only (k = 1), as the
  reference's ``SemanticMatchMemory``. Its encoder was BERT fine-tuned for this task's question
  similarity (plus a 256-d tanh layer); here it is the packaged all-MiniLM-L6-v2
  (:mod:`edit.retrieval`), untuned. With that encoder the paraphrases of CounterFact (a random
  sentence before the reworded prompt) score about 0.4-0.8 against their fact's prompt, so at
  τ = 0.9 MemPrompt edits the prompts it stored and close rewordings only; a lower ``threshold``
  (e.g. 0.6) reaches more paraphrases and more unrelated prompts too.
* combine: the reference writes ``f"{x} | {fb}"``, the feedback AFTER the question, for a few-shot
  question-answering prompt. An input transform here may only place text before a prompt (a
  completion prompt such as "... in the city of" must stay last), so the feedback comes first:
  ``fb + separator + x``, with the reference's separator ``" | "`` by default.
* Only a request's own prompt enters the memory; its paraphrases (``Request.paraphrases``, which the
  harness fills from the evaluation case) do not, since they are what the evaluation asks. The
  reference adds feedback only when the model answered wrongly (and then with probability p); an
  edit always adds its requests. The reference also wraps each query in its task's few-shot prompt;
  that prompt belongs to the task, not to the memory, and is not part of the edit.
* Several requests with the same prompt in one edit: the last one's feedback is kept (the
  reference's memory is a dict).

Sequential editing (the memory grows). Each MemPrompt edit's transform holds its own entries, and a
snapshot of the entries of the MemPrompt edits applied before it (read from ``lm.applied_edits`` when
it is computed; an earlier entry with the same key as a new one is shadowed by it). At inference
every applied MemPrompt transform scores the prompt against its own entries and its snapshot and
places its feedback only if its own best entry passes τ and is strictly nearer than every earlier
entry (ties go to the older entry, as the reference's argmax). Earlier MemPrompt feedback already
placed before the prompt (``fb + separator``) is removed from the query before it is embedded, so
every transform retrieves with the prompt itself. Input transforms are called one after another and
only prefix, so an older transform cannot know that a newer one holds a nearer entry: the result is
the reference's one retrieval over the whole memory except where a newer entry is nearer than an
older one that also passes τ (the same prompt edited twice, for instance). Then both feedbacks are
placed, the newer one first, and the model reads both. Other input transforms applied before a
MemPrompt edit (IKE's prefix) are part of the query it embeds; stack them only knowingly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from locate.errors import InvalidHparamsError

from ..edit import Edit, InputTransform
from ..registry import Runtime, register
from ..request import Request
from ..retrieval import SentenceEncoder

_QUERY_CACHE = 256  # query embeddings a memory keeps (every prompt is encoded several times while it is scored)


@dataclass
class MemPromptHparams:
    """MemPrompt's hyper-parameters; defaults are the reference code's (madaan/memprompt)."""

    threshold: float = 0.9  # τ: an entry is retrieved when its cosine with the query exceeds τ (SemanticMatchMemory)
    separator: str = " | "  # between feedback and prompt (the reference joins question and feedback with " | ")
    feedback: str = "{prompt}{target}"  # an entry's feedback; fields: prompt (rendered), target (spaced), subject
    lowercase: bool = True  # keys and queries lower-cased and stripped before embedding (the reference's keys)

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1.0 <= float(self.threshold) <= 1.0:
            raise InvalidHparamsError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if not isinstance(self.separator, str):
            raise InvalidHparamsError(f"separator must be a string, got {type(self.separator).__name__}")
        if not isinstance(self.feedback, str):
            raise InvalidHparamsError(f"feedback must be a format string, got {type(self.feedback).__name__}")
        try:
            text = self.feedback.format(prompt="p", target=" t", subject="s")
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidHparamsError(f"feedback {self.feedback!r} may only use the fields {{prompt}}, {{target}} "
                                      f"and {{subject}}: {e}") from e
        if not text.strip():
            raise InvalidHparamsError(f"feedback {self.feedback!r} gives empty text")


def _space(s: str) -> str:
    return s if s.startswith(" ") else " " + s


def strip_prefixes(text: str, prefixes: Sequence[str]) -> str:
    """``text`` without the leading ``prefixes`` (any of them, repeatedly; the longest that matches
    first): the prompt inside a text that earlier memories of the same kind placed their entries before."""
    ordered = sorted((p for p in set(prefixes) if p), key=lambda p: (-len(p), p))
    stripped = True
    while stripped:
        stripped = False
        for p in ordered:
            if text.startswith(p):
                text, stripped = text[len(p):], True
                break
    return text


def memory_key(text: str, lowercase: bool = True) -> str:
    """An input as the memory compares it: lower-cased and stripped (the reference's key processing)."""
    return text.lower().strip() if lowercase else text


class MemPromptMemory(InputTransform):
    """One MemPrompt edit's memory entries (keys, their embeddings, feedback) and its snapshot of the
    entries of the MemPrompt edits applied before it (module docstring). ``prefix(prompt)`` is the
    retrieved feedback and the separator, or ``""`` when there is no hit."""

    type_name = "memprompt-memory"

    def __init__(self, keys: Sequence[str], feedbacks: Sequence[str], embeddings: torch.Tensor, *,
                 threshold: float, separator: str, lowercase: bool = True,
                 earlier_embeddings: torch.Tensor | None = None, earlier_prefixes: Sequence[str] = ()):
        self.keys, self.feedbacks = list(keys), list(feedbacks)
        self.embeddings = embeddings.float().contiguous()
        self.threshold, self.separator, self.lowercase = float(threshold), separator, bool(lowercase)
        self.earlier_embeddings = (torch.zeros(0, self.embeddings.shape[1]) if earlier_embeddings is None
                                   else earlier_embeddings.float().contiguous())
        self.earlier_prefixes = sorted(set(earlier_prefixes))
        self._encoder: SentenceEncoder | None = None
        self._seen: dict[str, tuple[int, float] | None] = {}

    # ------------------------------------------------------------------ retrieval
    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder()
        return self._encoder

    def query(self, text: str) -> str:
        """The prompt inside ``text``: the feedback that earlier MemPrompt memories placed before it removed."""
        return strip_prefixes(text, self.earlier_prefixes)

    def lookup(self, text: str) -> tuple[int, float] | None:
        """``(i, cosine)`` of the entry whose feedback goes before ``text``, or ``None`` (no hit)."""
        if text in self._seen:
            return self._seen[text]
        q = self.encoder.encode([memory_key(self.query(text), self.lowercase)])[0]
        own = self.embeddings @ q
        i = int(own.argmax())  # the first of equally near entries, as the reference's argmax
        best = float(own[i])
        earlier = float((self.earlier_embeddings @ q).max()) if len(self.earlier_embeddings) else float("-inf")
        hit = (i, best) if best > self.threshold and best > earlier else None
        if len(self._seen) >= _QUERY_CACHE:
            self._seen.pop(next(iter(self._seen)))
        self._seen[text] = hit
        return hit

    def prefix(self, prompt: str) -> str:
        hit = self.lookup(prompt)
        return "" if hit is None else self.feedbacks[hit[0]] + self.separator

    def entry_prefixes(self) -> list[str]:
        """The text this memory places before a prompt, per entry."""
        return [f + self.separator for f in self.feedbacks]

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {"keys": self.keys, "feedbacks": self.feedbacks, "threshold": self.threshold,
                "separator": self.separator, "lowercase": self.lowercase,
                "earlier_prefixes": self.earlier_prefixes}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings, "earlier_embeddings": self.earlier_embeddings}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["keys"], config["feedbacks"], tensors["embeddings"], threshold=config["threshold"],
                   separator=config["separator"], lowercase=config["lowercase"],
                   earlier_embeddings=tensors["earlier_embeddings"], earlier_prefixes=config["earlier_prefixes"])

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (f"MemPromptMemory({len(self.keys)} entries, {len(self.earlier_embeddings)} earlier, "
                f"τ={self.threshold})")


def applied_memories(lm) -> list[MemPromptMemory]:
    """The MemPrompt memories of the edits applied to ``lm``, oldest first."""
    return [t for e in lm.applied_edits for t in e.input_transforms if isinstance(t, MemPromptMemory)]


def earlier_entries(lm, new_keys: Sequence[str]) -> tuple[torch.Tensor | None, list[str]]:
    """The snapshot a new memory keeps of the applied ones: the embeddings of their entries, a later
    entry with the same key replacing an earlier one and entries with one of ``new_keys`` left out
    (shadowed), and every text they may place before a prompt."""
    latest: dict[str, torch.Tensor] = {}
    prefixes: list[str] = []
    for m in applied_memories(lm):
        for key, emb in zip(m.keys, m.embeddings):
            latest.pop(key, None)  # re-inserted last: the dict keeps the newest entry per key
            latest[key] = emb
        prefixes += m.entry_prefixes()
    shadowed = set(new_keys)
    kept = [emb for key, emb in latest.items() if key not in shadowed]
    return (torch.stack(kept) if kept else None), prefixes


@register("memprompt", MemPromptHparams, batched=True, layers=None, smoke={},
          description="MemPrompt: a growing memory of (input, feedback); the feedback of the nearest stored input "
                      "goes before the prompt (Madaan et al. 2022)")
def compute_memprompt(lm, requests: list[Request], hp: MemPromptHparams, rt: Runtime) -> Edit:
    """The MemPrompt edit of ``requests`` (not applied): one :class:`MemPromptMemory` holding an entry
    per request (its prompt as key, its new fact as feedback). No weight is touched."""
    t0 = time.perf_counter()
    entries: dict[str, str] = {}
    for r in requests:
        key = memory_key(r.rendered, hp.lowercase)
        entries.pop(key, None)
        entries[key] = hp.feedback.format(prompt=r.rendered, target=_space(r.target_new), subject=r.subject)
    keys = list(entries)
    embeddings = SentenceEncoder().encode(keys)
    earlier, prefixes = earlier_entries(lm, keys)
    memory = MemPromptMemory(keys, list(entries.values()), embeddings, threshold=hp.threshold,
                             separator=hp.separator, lowercase=hp.lowercase, earlier_embeddings=earlier,
                             earlier_prefixes=prefixes)
    return Edit(
        method="memprompt",
        requests=list(requests),
        interventions=[memory],
        fingerprint=lm.fingerprint,
        model_name=lm.name,
        hparams=asdict(hp),
        timings={"total_s": time.perf_counter() - t0},
        metrics={"memory_entries": len(keys), "earlier_entries": 0 if earlier is None else len(earlier)},
    )
