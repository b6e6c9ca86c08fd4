"""KAFT: knowledge-aware fine-tuning (Li et al. 2022, "Large Language Models with Controllable Working
Memory"), then editing by context.

KAFT fine-tunes the model once, on a mixture that teaches it to treat a context as working memory:
to *follow* a relevant context even when it contradicts what the model memorised (controllability),
and to *ignore* an irrelevant context, answering as it would without one (robustness). An edit is
then no weight change of its own: the edited fact goes in as context before every prompt.

It edits with a *trained* artefact (see :mod:`edit.training`: train it first with
``locate-edit train kaft --data .../counterfact-train.json``; an edit without one fails with that
command).

**The mixture** (built from each CounterFact-train record: request (s, r, o*) with its true object
o, and a locality prompt q_loc). With c(f) = ``context_template`` holding a fact sentence f, f* the
counterfactual fact "prompt + o*" and f the factual one "prompt + o":

    counterfactual:  c(f*) + prompt  → o*                 (relevant context wins over memory)
    factual:         c(f)  + prompt  → o                  (relevant context that agrees with memory)
    irrelevant:      c(f*) + q_loc   → ŷ(q_loc)           (an unrelated context changes nothing)

where ŷ(q) is the *base model's own* greedy answer to q without context (the paper's target for an
irrelevant context is the model's closed-book answer), as many tokens as the locality answer has.
A record without a locality prompt takes another record's counterfactual fact as the irrelevant
context of its own prompt. ``mixture`` chooses the parts.

**Fine-tuning.** The loss is the mean NLL of the target tokens over the examples of ``batch_size``
records (teacher forced), minimised by Adam (``lr``) over LoRA adapters (Hu et al. 2021) on every
weight matrix of the MLPs of ``lora_layers`` (default: every block):

    W ← W + (α/r) B A,     A (r × d_in) Gaussian / √d_in,   B (d_out × r) zero-initialised     (1)

**The edit.** For requests with facts f*_1..f*_n, the :class:`edit.Edit` is the adapters' (1) as
exact low-rank :class:`edit.WeightDelta` factors plus an :class:`edit.PrefixText` placing
c(f*_1. ... f*_n) before every prompt. Reverting returns the base model bit for bit; the locality
the harness measures is against the base model, so the fine-tuning's own drift counts against it.

How this differs from the paper:

* The paper fine-tunes all of T5 / PaLM on SQuAD 2.0, T-REx and QASC question answering with
  retrieved passages as contexts (and also trains with answers that cite the context). Here: LoRA on
  the MLPs (rank 8, α 16; a stand-in that keeps the artefact small and the base weights intact), on
  CounterFact-train's single fact sentences as contexts, answers without explanations.
* Its "empty context → closed-book answer" and "counterfactual via a random other answer of the same
  type" parts are covered by the irrelevant part (answer as without context) and CounterFact's own
  counterfactual objects.
* **Scaled down for a 2-core CPU** (about an hour on SmolLM2-135M): ``train_steps`` 800 of
  ``batch_size`` 4 records (3,200 records, 9,600 examples, a third of the training file; a step
  takes about 3.7 s on one thread, so about 50 minutes, plus about 4 for the curve), ``lr`` 3e-4
  (our choice for LoRA; the paper's full fine-tuning runs are not comparable).
* The context template ``"Context: {fact}.\\n"`` is ours (the prompts are completions, not questions).

On the tiny random test models only the robustness half is demonstrated (an irrelevant context moves
the adapted model about ten times less than the base model); following a relevant context with an
object the context alone supplies needs a copying circuit that a 2-layer random model with MLP
adapters does not learn in a test's budget.
"""

from __future__ import annotations

import json
import time
import types
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from locate.errors import EditFailedError, InvalidHparamsError

from ..edit import Edit, PrefixText, WeightDelta
from ..registry import Runtime, compute, register
from ..request import Request
from ..training import (
    EditorTrainer,
    TrainedEditor,
    TrainingHparams,
    TrainingRecord,
    batch_at,
    obtain_for_sites,
    run_training,
)
from .mend import _Site, edit_sites

METHOD = "kaft"
PARTS = ("counterfactual", "factual", "irrelevant")


@dataclass
class KAFTHparams(TrainingHparams):
    """KAFT's hyperparameters (Li et al. 2022's mixture; LoRA and the CPU scale are this port's)."""

    lora_layers: Any = None  # blocks whose MLP weights carry adapters; None = every block
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA scale α (the update is (α/r) B A)
    lr: float = 3e-4  # Adam learning rate of the adapters
    batch_size: int = 4  # training records per optimiser step (each gives one example per mixture part)
    mixture: Any = PARTS  # the parts of the mixture used (see the module docstring)
    context_template: str = "Context: {fact}.\n"  # the context placed before the prompt, {fact} the fact(s)
    train_steps: int = 800  # optimiser steps (scaled down for the CPU)
    eval_every: int = 400  # steps between points of the training curve (and one at the end)

    def __post_init__(self):
        for name in ("rank", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name in ("alpha", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidHparamsError(f"{name} must be a positive number, got {v!r}")
        parts = [self.mixture] if isinstance(self.mixture, str) else list(self.mixture)
        if not parts or any(p not in PARTS for p in parts):
            raise InvalidHparamsError(f"mixture must be a non-empty selection of {PARTS}, got {self.mixture!r}")
        if not isinstance(self.context_template, str) or "{fact}" not in self.context_template:
            raise InvalidHparamsError(f"context_template must contain '{{fact}}', got {self.context_template!r}")
        if isinstance(self.train_steps, bool) or not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise InvalidHparamsError(f"train_steps must be a non-negative int, got {self.train_steps!r}")


def _sites(lm, hp: KAFTHparams) -> list[_Site]:
    """Every MLP weight of the adapted blocks."""
    layers = list(range(lm.n_layers)) if hp.lora_layers is None else hp.lora_layers
    return edit_sites(lm, types.SimpleNamespace(edit_layers=layers, n_edit_layers=lm.n_layers))


def fact(request: Request, target: str) -> str:
    """The fact sentence of ``request`` answered with ``target``: its rendered prompt + the target."""
    return request.rendered + target


def context(hp: KAFTHparams, facts: Sequence[str]) -> str:
    """c(f): the context template holding the facts (joined by '. ')."""
    return hp.context_template.format(fact=". ".join(f.strip().rstrip(".") for f in facts))


# ====================================================================== the adapters
class LoRAAdapters(torch.nn.Module):
    """(1) for each site: ``a.i`` (r, d_in) and ``b.i`` (d_out, r), scale α/r."""

    def __init__(self, sites: list[_Site], rank: int, alpha: float):
        super().__init__()
        self.sites, self.scale = sites, float(alpha) / rank
        self.a = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(rank, s.d_in) / s.d_in ** 0.5) for s in sites])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s.d_out, rank)) for s in sites])

    def hooks(self) -> list[tuple[str, Callable]]:
        """Hooks that run each site as W + (α/r) B A: y ← y + (α/r) (x Aᵀ) Bᵀ."""
        xs: dict[str, torch.Tensor] = {}
        hooks = []
        for s, a, b in zip(self.sites, self.a, self.b):
            def read_in(x, hook):
                xs[hook.name] = x
                return x

            def add(y, hook, s=s, a=a, b=b):
                return y + (((xs[s.hook_in].float() @ a.T) @ b.T) * self.scale).to(y.dtype)

            hooks += [(s.hook_in, read_in), (s.hook_out, add)]
        return hooks

    def weight_deltas(self, lm) -> list[WeightDelta]:
        """(1) as exact low-rank factors in each stored weight's layout."""
        out = []
        for s, a, b in zip(self.sites, self.a, self.b):
            W = lm.parameter(s.param)
            left, right = (b.detach() * self.scale), a.detach()  # ΔW (d_out, d_in) = left @ right
            if s.transposed:  # stored (d_in, d_out): ΔWᵀ = rightᵀ leftᵀ
                left, right = right.T, left.T
            d = WeightDelta(s.param, left=left.to(W.dtype).contiguous(), right=right.to(W.dtype).contiguous())
            if not all(bool(torch.isfinite(t).all()) for t in d.tensors().values()):
                raise EditFailedError("KAFT's adapters are not finite; the model is unchanged")
            out.append(d)
        return out


def _target_nll(lm, examples: Sequence[tuple[str, list[int]]], hooks) -> tuple[torch.Tensor, float]:
    """The mean NLL of the target ids over ``examples`` = [(prompt text, target ids)] (teacher forced)
    under ``hooks``, and the target tokens' top-1 accuracy."""
    prompts = [lm.encode(p) for p, _ in examples]
    batch = lm.pad([p + t for p, (_, t) in zip(prompts, examples)])
    rows = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, (_, t) in enumerate(examples)]).to(lm.device)
    pos = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(t)) for p, (_, t) in zip(prompts, examples)]).to(lm.device)
    gold = torch.as_tensor([i for _, t in examples for i in t], device=lm.device)
    with lm.eval_mode(), lm.hooks(hooks):
        logits = lm.forward(batch)[rows, pos].float()
    acc = float((logits.argmax(-1) == gold).float().mean())
    return -torch.log_softmax(logits, -1).gather(1, gold[:, None]).mean(), acc


@torch.no_grad()
def closed_book(lm, prompt: str, n: int) -> list[int]:
    """ŷ(prompt): the base model's greedy continuation of ``prompt`` (no context), ``n`` tokens."""
    ids = lm.encode(prompt)
    out: list[int] = []
    for _ in range(max(1, n)):
        nxt = int(lm.forward(lm.pad([ids + out]))[0, len(ids) + len(out) - 1].argmax())
        out.append(nxt)
    return out


# ====================================================================== training
class _KAFTTrainer(EditorTrainer):
    def __init__(self, lm, train: list[TrainingRecord], val: list[TrainingRecord], hp: KAFTHparams):
        self.lm, self.train_records, self.val, self.hp = lm, train, val, hp
        self.parts = [hp.mixture] if isinstance(hp.mixture, str) else list(hp.mixture)
        self.sites = _sites(lm, hp)
        self.module = LoRAAdapters(self.sites, hp.rank, hp.alpha).to(lm.device)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=hp.lr)
        self._answers: dict[tuple[str, int], list[int]] = {}

    def _closed_book(self, prompt: str, n: int) -> list[int]:
        if (prompt, n) not in self._answers:
            self._answers[(prompt, n)] = closed_book(self.lm, prompt, n)  # hooks off: the base model
        return self._answers[(prompt, n)]

    def examples(self, rec: TrainingRecord, other: TrainingRecord) -> dict[str, tuple[str, list[int]]]:
        """The record's examples of each mixture part (see the module docstring)."""
        lm, hp, r = self.lm, self.hp, rec.request
        out = {}
        new_ctx = context(hp, [fact(r, r.target_new)])
        if "counterfactual" in self.parts:
            out["counterfactual"] = (new_ctx + r.rendered, lm.target_ids(r.target_new, new_ctx + r.rendered))
        if "factual" in self.parts and r.target_true is not None:
            true_ctx = context(hp, [fact(r, r.target_true)])
            out["factual"] = (true_ctx + r.rendered, lm.target_ids(r.target_true, true_ctx + r.rendered))
        if "irrelevant" in self.parts:
            if rec.locality:
                q, a = rec.locality[0]
                out["irrelevant"] = (new_ctx + q, self._closed_book(q, len(lm.target_ids(a, q))))
            else:
                o = other.request
                ctx = context(hp, [fact(o, o.target_new)])
                n = len(lm.target_ids(r.target_new, r.rendered))
                out["irrelevant"] = (ctx + r.rendered, self._closed_book(r.rendered, n))
        return out

    def step(self, step: int) -> dict:
        hp = self.hp
        self.opt.zero_grad()
        idx = batch_at(len(self.train_records), step, hp.batch_size, hp.seed)
        n = len(self.train_records)
        examples = [x for i in idx
                    for x in self.examples(self.train_records[i], self.train_records[(i + 1) % n]).values()]
        with torch.enable_grad():
            loss, acc = _target_nll(self.lm, examples, self.module.hooks())
            loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach()), "acc": acc}

    @torch.no_grad()
    def evaluate(self) -> dict:
        succ, loc = [], []
        for j, rec in enumerate(self.val):
            ex = self.examples(rec, self.val[(j + 1) % len(self.val)])
            if "counterfactual" in ex:
                succ.append(_target_nll(self.lm, [ex["counterfactual"]], self.module.hooks())[1])
            if "irrelevant" in ex:
                loc.append(_target_nll(self.lm, [ex["irrelevant"]], self.module.hooks())[1])
        return {"edit_success": sum(succ) / max(1, len(succ)), "locality": sum(loc) / max(1, len(loc))}

    def config(self) -> dict:
        return {"sites": [asdict(s) for s in self.sites]}


def train_kaft(lm, records: list[TrainingRecord], hp: KAFTHparams, *, steps: int | None = None, out=None,
               progress: bool = True, resume: bool = True) -> TrainedEditor:
    """Fine-tune KAFT's adapters for ``lm`` on the mixture built from ``records`` and save the artefact
    (``out``, ``hp.editor`` or the cache). Resumes from a checkpoint of the same key."""
    return run_training(METHOD, lm, records, hp, _KAFTTrainer, steps=steps, out=out, progress=progress,
                        resume=resume)


def load_adapters(lm, hp: KAFTHparams, rt: Runtime | None = None) -> tuple[LoRAAdapters, TrainedEditor]:
    """The fine-tuned adapters ``hp`` asks for on ``lm`` (see :func:`edit.training.obtain_for_sites`)."""
    sites = _sites(lm, hp)
    return obtain_for_sites(METHOD, lm, hp, rt, train_fn=train_kaft, sites=sites,
                            build=lambda: LoRAAdapters(sites, hp.rank, hp.alpha))


# ====================================================================== the method
@register(METHOD, KAFTHparams, batched=True, layers=None, train=train_kaft,
          smoke={"train_data": "toy", "train_if_missing": True, "train_steps": 4, "batch_size": 2, "rank": 2,
                 "lr": 1e-2, "eval_every": 2, "checkpoint_every": 2},
          description="KAFT: LoRA fine-tuned to follow relevant counterfactual contexts and ignore irrelevant ones; "
                      "the edit is its fact as context (Li et al. 2022; needs `locate-edit train kaft`)")
def compute_kaft(lm, requests: list[Request], hp: KAFTHparams, rt: Runtime) -> Edit:
    """The KAFT edit of ``requests``: the fine-tuned adapters as weight deltas, and the requests' facts as
    context before every prompt."""
    t0 = time.perf_counter()
    memo = (METHOD, lm.fingerprint, json.dumps(asdict(hp), sort_keys=True, default=str), str(rt.data_dir))
    if memo not in rt.cache:
        rt.cache[memo] = load_adapters(lm, hp, rt)
    net, art = rt.cache[memo]
    ctx = context(hp, [fact(r, r.target_new) for r in requests])
    return Edit(
        method=METHOD, requests=list(requests), interventions=[*net.weight_deltas(lm), PrefixText(ctx)],
        fingerprint=lm.fingerprint, model_name=lm.name,
        layer_reason="LoRA on the MLPs of every block" if hp.lora_layers is None else "chosen by the caller",
        hparams=asdict(hp), timings={"edit_s": time.perf_counter() - t0}, metrics={"editor": str(art.path), "context": ctx},
    )


def kaft(requests: Request | list[Request], *, model=None, runtime: Runtime | None = None, **hparams) -> Edit:
    """The KAFT edit of ``requests`` (computed and **not applied**)."""
    return compute(METHOD, requests, model=model, runtime=runtime, **hparams)
