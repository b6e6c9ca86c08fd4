"""Language Patch: fixing a model with natural-language patches (Murty, Manning, Lundberg & Ribeiro,
EMNLP 2022, "Fixing Model Bugs with Natural Language Patches"; code MurtyShikhar/LanguagePatching).

A patch is a sentence ``"If <condition>, then <consequence>"`` (:class:`Patch`). The paper's patched
model mixes two predictions of the model with a trained **gate** g(x, c), the probability that the
condition c applies to the input x:

    P(y | x, patch) = g(x, c) · P_interp(y | x, q) + (1 − g(x, c)) · P(y | x)              (1)

where P_interp(y | x, q) is the **interpreter**: the model reading the consequence q with the input
(the reference's prompt "patch: {q}. Input: {x}"). With several patches the reference picks the
one whose condition the gate scores highest, ĵ = argmax_j g(x, c_j), and applies (1) with it.

**The gate** (the reference: T5-large with an auxiliary yes/no decoder head reading
"patch: {c}. Input: {x}", trained on ``PATCH_DIR/feature_based_patch_data/synthetic_data_applies.json``).
Here: the packaged all-MiniLM-L6-v2 sentence encoder e(·) (:mod:`edit.retrieval`, frozen) embeds the
condition and the input separately, u = e(c), v = e(x), and a small trained head reads their pair
features (the InferSent-style [u, v, u⊙v, |u − v|])

    g(x, c) = σ(w₂ᵀ ReLU(W₁ [u; v; u⊙v; |u − v|] + b₁) + b₂)                                (2)

trained with binary cross-entropy on the paper's gating data, built as the reference builds it
(``patch_dataset.PatchApplies``): the data's (instance, condition) pairs are the positives; for each
instance a condition that does not apply to it (any other condition of the file) is a negative; each
step draws one positive and one negative per instance of a batch; the unique instances are split
80/20 (seeded) into training and held-out instances (``build_patch2examples_dict``). The head is a
trained editor (:mod:`edit.training`: cached by model fingerprint, library versions, data digest and
the hyperparameters that shape it; ``locate-edit train language-patch ...`` when missing). It does not
read the language model at all; the key still names the model, as every trained editor's does.

**The patch of a request.** A :class:`edit.Request` is a fact, not a patch. The hyperparameter
``patches`` gives one patch per request (``"If ..., then ..."``, parsed as the reference's
``dissect``); without it each request becomes ``If {condition}, then {consequence}`` with the format
strings ``condition`` (default "the input is about {subject}") and ``consequence`` (default
"{prompt}{target}": "The Eiffel Tower is located in the city of Rome").

**Departures (documented).**

* **Hard gating.** Equation (1) mixes the probabilities of two runs of the model, one on x and one
  on the consequence-conditioned input; the editor protocol's objects (a weight delta, a hook
  module, an input transform) change one run, so (1) is implemented as its hard limit: the input
  transform :class:`PatchGate` places the interpreter's prefix "patch: {q}. Input: " before x when
  g(x, c_ĵ) > ``threshold`` (0.5) and nothing otherwise. A rejected input is tokenised and run bit
  for bit as on the unedited model; the gate values of the requests' own prompts are reported in
  ``Edit.metrics["gate"]``, and :meth:`PatchGate.gate` gives g for any input, so (1) can be computed
  outside the harness from two scored runs.
* **Interpreter stand-in.** The paper fine-tunes T5 on ``synthetic_data.json`` to follow the patch's
  consequence; here the interpreter is the edited language model itself, in context, untuned.
* **Gate stand-in.** A frozen MiniLM bi-encoder with a trained MLP head (2), not a fine-tuned T5
  cross-encoder of the joint prompt. The gate is trained on the paper's sentiment-domain conditions
  ("food is described as good"); a fact request's condition ("the input is about X") lies outside
  that domain, so on fact-editing benchmarks the paper-trained gate is not expected to fire reliably.
  The override-patch data and the CheckList evaluation sets of the paper were not obtainable.
* Training data: :func:`load_training_records` reads the paper's gating file (or an EasyEdit
  CounterFact / zsRE file, whose records become subject conditions, :func:`pairs_from_records`);
  :func:`train_language_patch` takes either, or ``None`` (it then reads ``hp.train_data``); the command
  line's ``locate-edit train language-patch --data FILE`` reads FILE with :func:`load_training_records`
  (registered as the method's training loader).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from locate.errors import EditFailedError, InvalidHparamsError

from ..edit import Edit, InputTransform
from ..eval.datasets import find_data_dir
from ..registry import Runtime, register
from ..request import Request
from ..retrieval import SentenceEncoder, cached_embeddings
from ..training import (
    TrainedEditor,
    TrainedEditorMissingError,
    TrainingDataError,
    TrainingHparams,
    TrainingRecord,
    editor_dir,
    editor_key,
    key_hparams,
    load_training_data,
    toy_records,
    train_command,
    train_loop,
)

METHOD = "language-patch"
GATE_DATA = "language_patch/feature_based_patch_data/synthetic_data_applies.json"  # the paper's gating data
_EDIT_TIME = ("threshold", "interpreter_prompt", "condition", "consequence", "patches")  # not in the gate's key
_PATCH = re.compile(r"^\s*if\s+(?P<condition>.+?)\s*,\s*then\s+(?P<consequence>.+?)\s*$", re.IGNORECASE | re.DOTALL)
_QUERY_CACHE = 256


class InvalidPatchError(InvalidHparamsError):
    """A patch that is not of the form "If <condition>, then <consequence>"."""


@dataclass(frozen=True)
class Patch:
    """A natural-language patch: "If {condition}, then {consequence}"."""

    condition: str
    consequence: str

    @classmethod
    def parse(cls, text: str) -> "Patch":
        """The condition and consequence of "If <condition>, then <consequence>" (the reference's
        ``dissect``: the text before the first comma without "If", the rest without "then")."""
        m = _PATCH.match(text) if isinstance(text, str) else None
        if m is None:
            raise InvalidPatchError(f"a patch reads 'If <condition>, then <consequence>', got {text!r}")
        return cls(m["condition"], m["consequence"].rstrip("."))

    def __str__(self) -> str:
        return f"If {self.condition}, then {self.consequence}"


@dataclass
class LanguagePatchHparams(TrainingHparams):
    """Language Patch's hyperparameters. The gate's training follows the reference's data construction
    (one positive and one negative condition per instance, 80/20 split of the unique instances); its
    model is the stand-in (2) of the module docstring."""

    threshold: float = 0.5  # hard gating: the patch is applied where g(x, c) > threshold (the mixture's midpoint)
    interpreter_prompt: str = "patch: {consequence}. Input: "  # the reference's prompt style p1, before x
    condition: str = "the input is about {subject}"  # a request's condition (format fields: subject, prompt)
    consequence: str = "{prompt}{target}"  # a request's consequence (fields: prompt, target, subject)
    patches: Any = None  # one "If ..., then ..." per request, replacing condition/consequence
    hidden: int = 256  # width of the gate's head (2)
    lr: float = 1e-3  # Adam learning rate of the head
    batch_size: int = 64  # instances per step (each gives one positive and one negative pair)
    max_texts: Any = None  # use a seeded sample of this many unique instances (tests: a tiny gate)
    train_steps: int = 2000  # about 17 passes over the training instances of the paper's file (CPU: ~1 min)
    val_fraction: float = 0.2  # held-out unique instances (the reference's 80/20 split)
    eval_every: int = 250
    checkpoint_every: int = 500
    train_data: str = GATE_DATA  # the paper's gating file (relative to the data directory), or "toy" (tests)

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= float(self.threshold) < 1.0:
            raise InvalidHparamsError(f"threshold is a gate probability in [0, 1), got {self.threshold!r}")
        try:
            ok = isinstance(self.interpreter_prompt, str) and "{consequence}" in self.interpreter_prompt \
                and bool(self.interpreter_prompt.format(consequence="q"))
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise InvalidHparamsError(f"interpreter_prompt must be a format string with the one field {{consequence}}, "
                                      f"got {self.interpreter_prompt!r}")
        for name in ("condition", "consequence"):
            text = getattr(self, name)
            try:
                ok = isinstance(text, str) and text.format(subject="s", prompt="p", target=" t").strip()
            except (KeyError, IndexError, ValueError):
                ok = False
            if not ok:
                raise InvalidHparamsError(f"{name} must be a non-empty format string with the fields {{subject}}, "
                                          f"{{prompt}}, {{target}}; got {text!r}")
        if self.patches is not None:
            if isinstance(self.patches, str):
                self.patches = [self.patches]
            self.patches = [str(Patch.parse(p)) for p in self.patches]
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise InvalidHparamsError(f"hidden must be a positive int, got {self.hidden!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidHparamsError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_texts is not None and (not isinstance(self.max_texts, int) or self.max_texts < 4):
            raise InvalidHparamsError(f"max_texts must be None or an int >= 4, got {self.max_texts!r}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise InvalidHparamsError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")


def _space(t: str) -> str:
    return t if t.startswith(" ") else " " + t


def request_patch(r: Request, hp: LanguagePatchHparams) -> Patch:
    """The patch a request stands for when ``hp.patches`` is not given."""
    fields = {"subject": r.subject, "prompt": r.rendered, "target": _space(r.target_new)}
    return Patch(hp.condition.format(**fields), hp.consequence.format(**fields))


# ====================================================================== gating data
@dataclass(frozen=True)
class GateData:
    """The gate's training data in the reference's form: each instance with the conditions that apply
    to it (possibly none: then it is a negative for every condition), and every condition."""

    applies: dict[str, tuple[str, ...]]  # instance -> its conditions (sorted)
    conditions: tuple[str, ...]

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([sorted(self.applies.items()), list(self.conditions)], ensure_ascii=False).encode())
        return h.hexdigest()

    def subset(self, instances: Sequence[str]) -> "GateData":
        return GateData({x: self.applies[x] for x in instances}, self.conditions)


def gate_data_from_pairs(pairs: Sequence[tuple[str, str | None]]) -> GateData:
    """``GateData`` from (instance, condition) pairs that apply (condition ``None``: an instance no
    condition applies to). Conditions are stripped (the reference's ``patch.strip()``)."""
    applies: dict[str, set[str]] = {}
    for x, c in pairs:
        applies.setdefault(x, set())
        if c is not None and c.strip():
            applies[x].add(c.strip())
    conditions = sorted({c for cs in applies.values() for c in cs})
    if len(conditions) < 2:
        raise TrainingDataError("the gate needs at least two distinct conditions (negatives are other conditions)")
    return GateData({x: tuple(sorted(cs)) for x, cs in applies.items()}, tuple(conditions))


def load_gate_data(path: str | Path) -> GateData:
    """The paper's gating file (``synthetic_data_applies.json``: ``instances`` and ``explanations``,
    the condition that applies to each instance)."""
    p = Path(path).expanduser()
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        pairs = list(zip(d["instances"], d["explanations"], strict=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingDataError(f"{p}: not a Language Patch gating file (instances, explanations): {e}") from e
    if not pairs:
        raise TrainingDataError(f"{p}: no instances")
    return gate_data_from_pairs(pairs)


def load_training_records(path: str | Path) -> "GateData | list[TrainingRecord]":
    """What ``locate-edit train language-patch --data PATH`` trains on: the paper's gating file (a JSON
    object with ``instances`` and ``explanations``) as :class:`GateData`, or an EasyEdit CounterFact /
    zsRE file as editing records (:func:`edit.training.load_training_data`)."""
    p = Path(path).expanduser()
    try:
        head = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingDataError(f"{p}: not readable JSON ({e})") from e
    return load_gate_data(p) if isinstance(head, dict) else load_training_data(p)


def pairs_from_records(records: Sequence[TrainingRecord], condition: str) -> GateData:
    """Editing records as gating data: each record's condition (``condition`` formatted with its subject
    and prompt) applies to its prompt and paraphrases; its locality prompts are instances no condition
    applies to. (For the command line's CounterFact / zsRE files and the tests' toy set.)"""
    pairs: list[tuple[str, str | None]] = []
    for r in records:
        c = condition.format(subject=r.request.subject, prompt=r.request.rendered, target=r.request.target_new)
        pairs += [(x, c) for x in (r.request.rendered, *r.paraphrases)]
        pairs += [(x, None) for x, _ in r.locality]
    return gate_data_from_pairs(pairs)


def gate_source(hp: LanguagePatchHparams, data_dir=None) -> tuple[str, GateData]:
    """(where from, the data) of the gate's training data named by ``hp.train_data``."""
    if hp.train_data == "toy":
        return "toy", pairs_from_records(toy_records(), hp.condition)
    p = Path(hp.train_data).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = find_data_dir(data_dir) / hp.train_data
    if not p.is_file():
        raise TrainedEditorMissingError(
            f"{METHOD}: the gate's training data {p} is not there", _command(None, str(p), hp))
    return str(p), load_gate_data(p)


def _sample(data: GateData, max_texts: int | None, seed: int) -> GateData:
    if max_texts is None or max_texts >= len(data.applies):
        return data
    xs = sorted(data.applies)
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return data.subset(sorted(xs[i] for i in order[:max_texts]))


def split_instances(data: GateData, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """The reference's split: the unique instances shuffled (seeded), the first (1 − val_fraction) for
    training and the rest held out."""
    xs = sorted(data.applies)
    order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(int(seed) + 1)).tolist()
    n_train = max(1, min(len(xs) - 1, int(len(xs) * (1.0 - val_fraction))))
    return [xs[i] for i in order[:n_train]], [xs[i] for i in order[n_train:]]


# ====================================================================== the gate (2)
class GateHead(torch.nn.Module):
    """g(x, c) of (2) on sentence embeddings u = e(c), v = e(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = torch.nn.Linear(4 * dim, hidden)
        self.w2 = torch.nn.Linear(hidden, 1)

    def logit(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u, v = u.float(), v.float()
        return self.w2(torch.relu(self.w1(torch.cat([u, v, u * v, (u - v).abs()], -1)))).squeeze(-1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(u, v))


def _head_from(tensors: Mapping[str, torch.Tensor]) -> GateHead:
    head = GateHead(tensors["w1.weight"].shape[1] // 4, tensors["w1.weight"].shape[0])
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.eval()


def gate_pairs(data: GateData, instances: Sequence[str], gen: torch.Generator | None):
    """One (instance, condition, label) positive and one negative per instance (the reference's
    ``PatchApplies.get_samples``): drawn with ``gen``, or the first of each when ``gen`` is None."""
    out = []
    for x in instances:
        pos = data.applies[x]
        neg = [c for c in data.conditions if c not in pos]
        pick = (lambda n: 0) if gen is None else (lambda n: int(torch.randint(n, (1,), generator=gen)))
        if pos:
            out.append((x, pos[pick(len(pos))], 1.0))
        if neg:
            out.append((x, neg[pick(len(neg))], 0.0))
    return out


class _GateTrainer:
    def __init__(self, data: GateData, train: list[str], val: list[str], hp: LanguagePatchHparams):
        self.data, self.train_x, self.val_x, self.hp = data, train, val, hp
        self.encoder = SentenceEncoder()
        texts = sorted(set(data.applies) | set(data.conditions))
        emb = cached_embeddings(texts, self.encoder)
        self.emb = {t: emb[i] for i, t in enumerate(texts)}
        self.module = GateHead(SentenceEncoder.dim, hp.hidden)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=hp.lr)
        # the held-out pairs are fixed: every positive of each held-out instance, and one negative
        g = torch.Generator().manual_seed(int(hp.seed) + 2)
        self.val_pairs = [(x, c, 1.0) for x in val for c in data.applies[x]] + \
                         [p for p in gate_pairs(data, val, g) if p[2] == 0.0]

    def _loss(self, pairs) -> tuple[torch.Tensor, float]:
        u = torch.stack([self.emb[c] for _, c, _ in pairs])
        v = torch.stack([self.emb[x] for x, _, _ in pairs])
        y = torch.tensor([l for _, _, l in pairs])
        logit = self.module.logit(u, v)
        acc = float(((logit > 0).float() == y).float().mean())
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, y), acc

    def step(self, step: int) -> dict:
        n = len(self.train_x)
        per_epoch = max(1, n // self.hp.batch_size)
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(self.hp.seed) * 100003 + epoch)).tolist()
        batch = [self.train_x[i] for i in order[pos * self.hp.batch_size:(pos + 1) * self.hp.batch_size]]
        pairs = gate_pairs(self.data, batch, torch.Generator().manual_seed(int(self.hp.seed) * 7919 + step))
        self.module.train()
        self.opt.zero_grad()
        loss, _ = self._loss(pairs)
        loss.backward()
        self.opt.step()
        return {"loss_gate": float(loss.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.val_pairs:
            return {"edit_success": float("nan"), "locality": float("nan"), "gate_accuracy": float("nan")}
        self.module.eval()
        return evaluate_gate(self.module, self.val_pairs, self.emb)


@torch.no_grad()
def evaluate_gate(head: GateHead, pairs, emb: Mapping[str, torch.Tensor]) -> dict:
    """On labelled (instance, condition, applies) pairs: ``gate_accuracy`` (g > 0.5 agrees with the
    label), ``edit_success`` (the share of applying pairs the gate accepts) and ``locality`` (the share
    of the others it rejects)."""
    u = torch.stack([emb[c] for _, c, _ in pairs])
    v = torch.stack([emb[x] for x, _, _ in pairs])
    y = torch.tensor([l for _, _, l in pairs]).bool()
    accept = head(u, v) > 0.5
    return {"gate_accuracy": float((accept == y).float().mean()),
            "edit_success": float(accept[y].float().mean()) if bool(y.any()) else float("nan"),
            "locality": float((~accept[~y]).float().mean()) if bool((~y).any()) else float("nan")}


def _command(lm, data: str | None, hp: LanguagePatchHparams) -> str:
    if lm is None:
        return f"locate-edit train {METHOD} --data {data}"
    return train_command(METHOD, lm, data, key_hparams(hp, _EDIT_TIME), key_hparams(type(hp)(), _EDIT_TIME))


def _key(lm, data: GateData, hp: LanguagePatchHparams) -> dict:
    return editor_key(METHOD, lm, data.digest(), key_hparams(hp, _EDIT_TIME))


def train_gate(lm, data: GateData, hp: LanguagePatchHparams, *, steps: int | None = None, out=None,
               progress: bool = True, resume: bool = True) -> TrainedEditor:
    """Train the gate (2) on ``data`` (sampled to ``hp.max_texts`` instances, split 80/20) and save it
    (``out``, ``hp.editor`` or the cache folder of its key). Resumable."""
    if steps is not None:
        hp = replace(hp, train_steps=int(steps))
    full = data
    data = _sample(data, hp.max_texts, hp.seed)
    key = _key(lm, full, hp)
    where = out if out is not None else hp.editor
    directory = Path(where).expanduser() if where is not None else editor_dir(METHOD, key)
    train, val = split_instances(data, hp.val_fraction, hp.seed)
    torch.manual_seed(int(hp.seed))
    trainer = _GateTrainer(data, train, val, hp)
    curve = train_loop(METHOD, key, directory, trainer.module, trainer.opt, trainer.step, trainer.evaluate,
                       steps=int(hp.train_steps), eval_every=int(hp.eval_every),
                       checkpoint_every=int(hp.checkpoint_every), progress=progress, resume=resume)
    tensors = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    config = {"encoder": trainer.encoder.identity, "hidden": hp.hidden, "n_train": len(train), "n_val": len(val),
              "n_conditions": len(data.conditions)}
    editor = TrainedEditor(METHOD, key, config, tensors, curve)
    editor.save(directory)
    return editor


def train_language_patch(lm, records, hp: LanguagePatchHparams, *, steps: int | None = None, out=None,
                         progress: bool = True, resume: bool = True) -> TrainedEditor:
    """``locate-edit train language-patch``: train the gate. ``records``: ``None`` (read ``hp.train_data``,
    by default the paper's gating file), a :class:`GateData`, or editing records
    (:class:`edit.training.TrainingRecord`, turned into subject conditions by :func:`pairs_from_records`)."""
    if records is None:
        _, data = gate_source(hp)
    elif isinstance(records, GateData):
        data = records
    else:
        data = pairs_from_records(list(records), hp.condition)
    return train_gate(lm, data, hp, steps=steps, out=out, progress=progress, resume=resume)


def obtain_gate(lm, hp: LanguagePatchHparams, data_dir=None, progress: bool = False) -> TrainedEditor:
    """The trained gate ``hp`` asks for on ``lm``; missing: :class:`TrainedEditorMissingError` with the
    command that trains it (unless ``hp.train_if_missing``, for the tests only)."""
    source, data = gate_source(hp, data_dir)
    key = _key(lm, data, hp)
    try:
        return TrainedEditor.load(METHOD, key, hp.editor)
    except TrainedEditorMissingError:
        if not hp.train_if_missing:
            cmd = _command(lm, source, hp)
            raise TrainedEditorMissingError(
                f"{METHOD} needs a trained gate for model {lm.name!r} (fingerprint {lm.fingerprint}), these "
                f"hyperparameters and this gating data, and none is stored under {editor_dir(METHOD, key)}. "
                f"Train it (this never happens on its own) with: {cmd}", cmd) from None
    return train_gate(lm, data, hp, progress=progress)


# ====================================================================== the intervention
class PatchGate(InputTransform):
    """Hard gating of (1): the interpreter's prefix of the patch ĵ = argmax_j g(x, c_j) before x when
    g(x, c_ĵ) > threshold, nothing otherwise (a rejected input is read exactly as before)."""

    type_name = "language-patch-gate"

    def __init__(self, patches: Sequence[Patch], condition_embeddings: torch.Tensor,
                 head_tensors: Mapping[str, torch.Tensor], *, threshold: float, interpreter_prompt: str,
                 encoder_identity: str):
        self.patches = list(patches)
        self.condition_embeddings = condition_embeddings.float().contiguous()
        self.head_tensors = {k: v.detach().float().contiguous() for k, v in head_tensors.items()}
        self.threshold, self.interpreter_prompt = float(threshold), interpreter_prompt
        self.encoder_identity = encoder_identity
        self._head = _head_from(self.head_tensors)
        self._encoder: SentenceEncoder | None = None
        self._seen: dict[str, tuple[int, float]] = {}

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            enc = SentenceEncoder()
            if enc.identity != self.encoder_identity:
                raise EditFailedError("this Language Patch gate was trained with another sentence encoder "
                                      f"({self.encoder_identity[:12]}), not the installed one")
            self._encoder = enc
        return self._encoder

    @torch.no_grad()
    def gates(self, text: str) -> torch.Tensor:
        """g(x, c_j) of (2) for every patch j."""
        v = self.encoder.encode([text])[0]
        u = self.condition_embeddings
        return self._head(u, v.expand_as(u))

    def gate(self, text: str) -> tuple[int, float]:
        """(ĵ, g(x, c_ĵ)): the patch whose condition the gate scores highest, and its score."""
        if text not in self._seen:
            g = self.gates(text)
            j = int(g.argmax())
            if len(self._seen) >= _QUERY_CACHE:
                self._seen.pop(next(iter(self._seen)))
            self._seen[text] = (j, float(g[j]))
        return self._seen[text]

    def interpreter_prefix(self, j: int) -> str:
        return self.interpreter_prompt.format(consequence=self.patches[j].consequence)

    def prefix(self, prompt: str) -> str:
        j, g = self.gate(prompt)
        return self.interpreter_prefix(j) if g > self.threshold else ""

    def config(self) -> dict:
        return {"patches": [[p.condition, p.consequence] for p in self.patches], "threshold": self.threshold,
                "interpreter_prompt": self.interpreter_prompt, "encoder": self.encoder_identity,
                "head": sorted(self.head_tensors)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"conditions": self.condition_embeddings, **{f"head.{k}": v for k, v in self.head_tensors.items()}}

    @classmethod
    def from_saved(cls, config, tensors):
        head = {k: tensors[f"head.{k}"] for k in config["head"]}
        return cls([Patch(c, q) for c, q in config["patches"]], tensors["conditions"], head,
                   threshold=config["threshold"], interpreter_prompt=config["interpreter_prompt"],
                   encoder_identity=config["encoder"])

    def __repr__(self) -> str:
        return f"PatchGate({len(self.patches)} patches, threshold={self.threshold})"


# ====================================================================== the method
@register(METHOD, LanguagePatchHparams, batched=True, layers=None, train=train_language_patch,
          load_training=load_training_records,
          smoke={"train_data": "toy", "train_if_missing": True, "train_steps": 60, "batch_size": 8, "lr": 1e-2,
                 "hidden": 32, "val_fraction": 0.25, "eval_every": 30, "checkpoint_every": 30},
          description="Language Patch: 'If <condition>, then <consequence>' patches; a trained gate decides whether "
                      "the condition applies and the model then reads the consequence (Murty et al. 2022; "
                      "needs `locate-edit train language-patch`)")
def compute_language_patch(lm, requests: list[Request], hp: LanguagePatchHparams, rt: Runtime) -> Edit:
    """The Language Patch edit of ``requests``: one patch per request (``hp.patches`` or the request's
    condition and consequence) behind the trained gate, as one :class:`PatchGate` input transform. No
    weight changes; ``metrics["gate"]`` holds g of each request's own prompt under its own patch."""
    t0 = time.perf_counter()
    if hp.patches is not None and len(hp.patches) != len(requests):
        raise InvalidHparamsError(f"patches gives {len(hp.patches)} patch(es) for {len(requests)} request(s); "
                                  "give one per request")
    patches = [Patch.parse(p) for p in hp.patches] if hp.patches is not None else \
        [request_patch(r, hp) for r in requests]
    memo = ("language-patch-gate", lm.fingerprint, json.dumps(key_hparams(hp, _EDIT_TIME), sort_keys=True,
                                                               default=str), hp.train_data, str(rt.data_dir))
    if memo not in rt.cache:
        rt.cache[memo] = obtain_gate(lm, hp, rt.data_dir, progress=bool(rt.progress))
    art = rt.cache[memo]
    encoder = SentenceEncoder()
    if encoder.identity != art.config["encoder"]:
        raise EditFailedError(f"the trained Language Patch gate at {art.path} was trained with another sentence encoder")
    conds = encoder.encode([p.condition for p in patches])
    gate = PatchGate(patches, conds, art.tensors, threshold=hp.threshold,
                     interpreter_prompt=hp.interpreter_prompt, encoder_identity=art.config["encoder"])
    own = [float(gate.gates(r.rendered)[i]) for i, r in enumerate(requests)]
    return Edit(method=METHOD, requests=list(requests), interventions=[gate], fingerprint=lm.fingerprint,
                model_name=lm.name, hparams=asdict(hp), timings={"total_s": time.perf_counter() - t0},
                metrics={"gate": own, "patches": [str(p) for p in patches], "editor": str(art.path),
                         "mixture": "hard (g > threshold); see the module docstring"})
