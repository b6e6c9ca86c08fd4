"""SERAC: Semi-parametric Editing with a Retrieval-Augmented Counterfactual model (Mitchell et al.,
ICML 2022, "Memory-Based Model Editing at Scale").

SERAC never changes the base model. An edit is stored in an **edit memory**; a trained **scope
classifier** decides whether an input is about a stored edit; an input in scope is answered by a
**counterfactual model** that reads the edit before the input; every other input goes to the base
model untouched. SERAC edits with trained parts (see :mod:`edit.training`; train them first with
``locate-edit train serac --data .../counterfact-train.json``; an edit without them fails with that
command).

**Memory.** Each request z_e = (x_e, y_e) is stored as the edit text c_e = "x_e y_e " (the rendered
prompt, the new target and a space: the reference's cache context for decoder models) and the
classifier key x_e (the prompt without the target, as the reference's classifier input).

**Scope classifier** (the embedding variant of the paper; EasyEdit's default ``cross_attend: False``):
with e(·) the packaged all-MiniLM-L6-v2 sentence embedding (:mod:`edit.retrieval`, the retriever of
IKE, kept frozen) and a trained linear map P (identity-initialised) and scale s > 0,

    d(x, x_e) = ‖P e(x) − P e(x_e)‖²,      p(in scope | x, z_e) = exp(−s · d(x, x_e))          (1)

(the reference's squared Euclidean distance and log-similarity −s·d). The input is routed to the
edit ê = argmax_e p(in scope | x, z_e) when that probability exceeds 0.5 (the reference's threshold).
The classifier is trained with binary cross-entropy: positives are (request, its own prompt) and
(request, a paraphrase); negatives (request, another record's paraphrase) and (request, a locality
prompt).

**Counterfactual model** h_ψ: the base model with trained low-rank adapters (LoRA, rank ``cf_rank``)
on the MLP output projection of every block, reading "c_ê x" (the edit text before the input),

    p_edit(y | x) = h_ψ(y | c_ê x)   if x is in scope,      p_base(y | x) otherwise              (2)

trained with the NLL of y_e given c_e x for x in the record's prompt and paraphrases (the paper's
objective for the counterfactual model).

**Routing inside the protocol.** The edit is two interventions: a :class:`SERACRouter` input
transform runs (1) on each prompt and, in scope, places c_ê before it; a :class:`SERACAdapter` hook
module holds ψ and applies it only to the rows of a batch whose token embeddings begin with the
embeddings of one of its stored edit texts (compared exactly). An out-of-scope prompt gets no prefix
and no adapter: its outputs are bit-identical to the base model's (the hook returns its input
tensor itself when no row of the batch is routed; otherwise the routed rows alone are changed).

How this differs from the paper and the reference (EasyEdit ``trainer/algs/SERAC.py``):

* **Scaled down for a 2-core CPU**: the classifier's encoder is the packaged all-MiniLM-L6-v2, frozen,
  with a trained linear head P and scale s (the reference fine-tunes a DistilBERT encoder); the
  counterfactual model is the base model plus LoRA adapters (rank 8) on the MLP output projections
  (the reference fine-tunes a separate smaller model of the family, e.g. llama-160m for Llama-2-7B,
  or the whole model), trained for 250 steps of 10 records (the reference: up to 100,000 with early
  stopping; one record costs about 1.25 s on SmolLM2-135M with one free core, so about 55 minutes,
  plus a few minutes to embed the training file's prompts once).
* **Hard routing at inference** (the paper's decision rule). EasyEdit's forward mixes the two
  models' probabilities weighted by the classifier's score (``soft_weighting``/unsupervised training),
  which would change out-of-scope outputs a little; that mixture is not implemented.
* The classifier and the counterfactual model are trained with their own losses (the paper's);
  EasyEdit trains them through the mixed output.
* A row is recognised as routed by its leading token embeddings; a user prompt that itself begins with
  a stored edit text word for word is treated as routed. Teacher-forced scoring (every metric) runs
  whole sequences and sees the counterfactual model at every position; greedy generation with a
  key/value cache (:meth:`locate.HookedLM.generate`) feeds one new token per step, so the adapters act
  on the prompt (and the first generated token) and later tokens are read by the base model with
  the edit text still in its context.
* Each SERAC edit holds its own memory. Applied in sequence, the newer edit's router classifies the
  prompt as the older edits' transforms left it (with an older edit text in front when that one
  routed it); editing many facts at once is one batched call, whose memory holds them all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from locate.errors import EditFailedError, InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit, HookModule, InputTransform
from ..registry import Runtime, compute, register
from ..request import Request
from ..retrieval import SentenceEncoder, cached_embeddings
from ..training import (
    TrainingHparams,
    training_source,
    EditorTrainer,
    TrainedEditor,
    TrainingRecord,
    batch_at,
    obtain,
    run_training,
)

THRESHOLD = 0.5  # in scope when p(in scope) > 0.5 (the reference's)


@dataclass
class SERACHparams(TrainingHparams):
    """SERAC's hyperparameters (EasyEdit ``hparams/TRAINING/SERAC/llama-7b.yaml`` where they carry over;
    the scaled-down parts are noted)."""

    cf_rank: int = 8  # rank of the counterfactual model's LoRA adapters (scaled down: the reference fine-tunes a model)
    cf_lr: float = 5e-4  # Adam learning rate of the adapters (EasyEdit lr: 1e-5 over up to 100k steps; raised for 250)
    cls_lr: float = 1e-3  # Adam learning rate of the classifier head P and scale s
    init_scale: float = 1.155  # initial s: in scope above cosine 0.7 of the raw embeddings (exp(-s·0.6) = 0.5)
    batch_size: int = 10  # records per step (EasyEdit: batch_size 10)

    def __post_init__(self):
        if not isinstance(self.cf_rank, int) or self.cf_rank < 1:
            raise InvalidHparamsError(f"cf_rank must be a positive int, got {self.cf_rank!r}")
        if not self.init_scale > 0:
            raise InvalidHparamsError(f"init_scale must be positive, got {self.init_scale!r}")
        if self.batch_size < 2:
            raise InvalidHparamsError("batch_size must be at least 2 (negatives come from other records)")


def edit_text(r: Request) -> str:
    """c_e: the edit as the counterfactual model reads it before an input."""
    return f"{r.rendered}{r.target_new} "


# ====================================================================== trained parts
class ScopeHead(torch.nn.Module):
    """P and s of (1)."""

    def __init__(self, dim: int, init_scale: float):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.eye(dim))
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(init_scale)))

    def log_prob(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """log p(in scope) of (1) for every (query, key): (Q, K)."""
        q, k = queries.float() @ self.proj.T, keys.float() @ self.proj.T
        d = ((q[:, None] - k[None]) ** 2).sum(-1)
        return -self.log_scale.exp() * d


class CounterfactualAdapters(torch.nn.Module):
    """ψ: a LoRA pair (A: d_mlp → r, B: r → d_model, B zero-initialised) on each block's MLP output."""

    def __init__(self, n_layers: int, d_mlp: int, d_model: int, rank: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(n_layers, d_mlp, rank) / math.sqrt(d_mlp))
        self.b = torch.nn.Parameter(torch.zeros(n_layers, rank, d_model))

    def delta(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.a[layer]) @ self.b[layer]


class SERACEditor(torch.nn.Module):
    def __init__(self, n_layers: int, d_mlp: int, d_model: int, hp: SERACHparams):
        super().__init__()
        self.head = ScopeHead(SentenceEncoder.dim, hp.init_scale)
        self.cf = CounterfactualAdapters(n_layers, d_mlp, d_model, hp.cf_rank)


def _d_mlp(lm) -> int:
    mod = lm.mlp_out_module(0)
    return int(mod.weight.shape[0]) if type(mod).__name__ == "Conv1D" else int(mod.weight.shape[1])


def _mlp_hooks(lm, cf: CounterfactualAdapters, rows: Callable[[], torch.Tensor | None]) -> list[tuple[str, Callable]]:
    """Hooks adding the adapters' output to the MLP output of the rows ``rows()`` names (all rows when it
    returns a full mask; none, with the input tensor returned itself, when it returns None)."""
    keys: dict[int, torch.Tensor] = {}
    hooks = []
    for l in range(lm.n_layers):
        def read(x, hook, l=l):
            keys[l] = x
            return x

        def add(y, hook, l=l):
            mask = rows()
            if mask is None or l not in keys:
                return y
            out = y.clone()
            out[mask] = y[mask] + cf.delta(l, keys[l][mask]).to(y.dtype)
            return out

        hooks += [(lm.hook_mlp_key(l), read), (lm.hook_mlp_out(l), add)]
    return hooks


# ====================================================================== the interventions
class SERACRouter(InputTransform):
    """(1): places the edit text of the nearest in-scope stored edit before a prompt; nothing otherwise."""

    type_name = "serac-router"

    def __init__(self, texts: Sequence[str], keys: torch.Tensor, proj: torch.Tensor, log_scale: torch.Tensor,
                 encoder_identity: str):
        self.texts = list(texts)
        self.keys, self.proj, self.log_scale = keys.float(), proj.float(), log_scale.float().reshape(())
        self.encoder_identity = encoder_identity
        self._encoder: SentenceEncoder | None = None

    def scores(self, prompt: str) -> torch.Tensor:
        """p(in scope | prompt, z_e) for every stored edit."""
        if self._encoder is None:
            self._encoder = SentenceEncoder()
            if self._encoder.identity != self.encoder_identity:
                raise EditFailedError("this SERAC edit was trained with another sentence encoder "
                                      f"({self.encoder_identity[:12]}), not the installed one")
        head = ScopeHead(self.keys.shape[1], 1.0)
        with torch.no_grad():
            head.proj.copy_(self.proj)
            head.log_scale.copy_(self.log_scale)
            return head.log_prob(self._encoder.encode([prompt]), self.keys)[0].exp()

    def prefix(self, prompt: str) -> str:
        p = self.scores(prompt)
        best = int(p.argmax())
        return self.texts[best] if float(p[best]) > THRESHOLD else ""

    def config(self) -> dict:
        return {"texts": self.texts, "encoder": self.encoder_identity}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "proj": self.proj, "log_scale": self.log_scale}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["texts"], tensors["keys"], tensors["proj"], tensors["log_scale"], config["encoder"])

    def __repr__(self) -> str:
        return f"SERACRouter({len(self.texts)} edits)"


class SERACAdapter(HookModule):
    """(2): the counterfactual model's adapters, applied to the rows that begin with a stored edit text.
    ``prefixes``: each edit text's token embeddings (as the model's embedding hook gives them)."""

    type_name = "serac-adapter"

    def __init__(self, n_layers: int, embed_hook: str, key_hooks: Sequence[str], out_hooks: Sequence[str],
                 a: torch.Tensor, b: torch.Tensor, prefixes: Sequence[torch.Tensor]):
        super().__init__()
        self.n_layers, self.embed_hook = int(n_layers), embed_hook
        self.key_hooks, self.out_hooks = list(key_hooks), list(out_hooks)
        self.register_buffer("a", a.detach().clone())
        self.register_buffer("b", b.detach().clone())
        self.n_prefixes = len(prefixes)
        for i, p in enumerate(prefixes):
            self.register_buffer(f"prefix_{i}", p.detach().clone())
        self._rows: torch.Tensor | None = None
        self._keys: dict[int, torch.Tensor] = {}

    def _route(self, emb: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
        for i in range(self.n_prefixes):
            p = getattr(self, f"prefix_{i}").to(device=emb.device, dtype=emb.dtype)
            if emb.shape[1] >= p.shape[0]:
                rows |= (emb[:, : p.shape[0]] == p).flatten(1).all(-1)
        self._rows = rows if bool(rows.any()) else None
        self._keys = {}
        return emb

    def _reader(self, l: int):
        def read(x):
            if self._rows is not None:
                self._keys[l] = x
            return x
        return read

    def _adder(self, l: int):
        def add(y):
            if self._rows is None or l not in self._keys or self._rows.shape[0] != y.shape[0]:
                return y  # the very tensor: out-of-scope rows are bit-identical
            x = self._keys.pop(l)
            out = y.clone()
            m = self._rows
            out[m] = y[m] + ((x[m].float() @ self.a[l].float()) @ self.b[l].float()).to(y.dtype)
            return out
        return add

    def hook_fns(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        fns: dict[str, Callable] = {self.embed_hook: self._route}
        for l in range(self.n_layers):
            fns[self.key_hooks[l]] = self._reader(l)
            fns[self.out_hooks[l]] = self._adder(l)
        return fns

    def config(self) -> dict:
        return {"n_layers": self.n_layers, "embed_hook": self.embed_hook, "key_hooks": self.key_hooks,
                "out_hooks": self.out_hooks, "n_prefixes": self.n_prefixes}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["n_layers"], config["embed_hook"], config["key_hooks"], config["out_hooks"], tensors["a"],
                   tensors["b"], [tensors[f"prefix_{i}"] for i in range(config["n_prefixes"])])


# ====================================================================== training
def _nll_rows(lm, contexts: list[str], questions: list[str], targets: list[str]):
    prompts = [lm.encode(c + q, raw=True) for c, q in zip(contexts, questions)]
    tgt = [lm.target_ids(t, c + q) for c, q, t in zip(contexts, questions, targets)]
    batch = lm.pad([p + t for p, t in zip(prompts, tgt)])
    rows = torch.cat([torch.full((len(t),), b, dtype=torch.long) for b, t in enumerate(tgt)]).to(lm.device)
    pos = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(t)) for p, t in zip(prompts, tgt)]).to(lm.device)
    gold = torch.as_tensor([i for t in tgt for i in t], device=lm.device)
    return batch, rows, pos, gold


class _SERACTrainer(EditorTrainer):
    def __init__(self, lm, train: list[TrainingRecord], val: list[TrainingRecord], hp: SERACHparams):
        self.lm, self.train_records, self.val, self.hp = lm, train, val, hp
        self.module = SERACEditor(lm.n_layers, _d_mlp(lm), lm.d_model, hp).to(lm.device)
        self.opt = torch.optim.Adam([{"params": self.module.head.parameters(), "lr": hp.cls_lr},
                                     {"params": self.module.cf.parameters(), "lr": hp.cf_lr}])
        self.encoder = SentenceEncoder()
        recs = train + val
        texts = sorted({t for r in recs for t in [r.request.rendered, *r.paraphrases, *(p for p, _ in r.locality)]})
        emb = cached_embeddings(texts, self.encoder)
        self.emb = {t: emb[i] for i, t in enumerate(texts)}

    def _questions(self, r: TrainingRecord) -> list[str]:
        return [r.request.rendered, *r.paraphrases]

    def _cls_loss(self, recs: list[TrainingRecord]) -> torch.Tensor:
        keys = torch.stack([self.emb[r.request.rendered] for r in recs]).to(self.lm.device)
        pos_q, pos_k, neg_q, neg_k = [], [], [], []
        for i, r in enumerate(recs):
            for q in self._questions(r):
                pos_q.append(self.emb[q]), pos_k.append(i)
            other = self._questions(recs[(i + 1) % len(recs)])
            for q in [other[-1], *(p for p, _ in r.locality)]:  # another record's paraphrase (or prompt)
                neg_q.append(self.emb[q]), neg_k.append(i)
        head = self.module.head
        lp = head.log_prob(torch.stack(pos_q).to(keys.device), keys)[torch.arange(len(pos_k)), pos_k]
        ln = head.log_prob(torch.stack(neg_q).to(keys.device), keys)[torch.arange(len(neg_k)), neg_k]
        # BCE with p = exp(lp): −log p on positives, −log(1 − p) on negatives
        return (-lp.sum() - torch.log1p(-ln.exp().clamp(max=1 - 1e-6)).sum()) / (len(lp) + len(ln))

    def _cf_loss(self, recs: list[TrainingRecord]) -> tuple[torch.Tensor, float]:
        lm = self.lm
        ctx, qs, tg = [], [], []
        for r in recs:
            for q in self._questions(r):
                ctx.append(edit_text(r.request)), qs.append(q), tg.append(r.request.target_new)
        batch, rows, pos, gold = _nll_rows(lm, ctx, qs, tg)
        with lm.eval_mode(), lm.hooks(_mlp_hooks(lm, self.module.cf, lambda: slice(None))):
            logits = lm.forward(batch)
        logp = torch.log_softmax(logits[rows, pos].float(), -1)
        acc = float((logp.argmax(-1) == gold).float().mean())
        return -logp.gather(1, gold[:, None]).mean(), acc

    def step(self, step: int) -> dict:
        self.module.train()
        idx = batch_at(len(self.train_records), step, self.hp.batch_size, self.hp.seed)
        recs = [self.train_records[i] for i in idx]
        self.opt.zero_grad()
        l_cls = self._cls_loss(recs)
        l_cf, _ = self._cf_loss(recs)
        (l_cls + l_cf).backward()
        self.opt.step()
        return {"loss_cls": float(l_cls.detach()), "loss_cf": float(l_cf.detach())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.val:
            return {"edit_success": float("nan"), "locality": float("nan")}
        recs, head = self.val, self.module.head
        dev = head.proj.device
        keys = torch.stack([self.emb[r.request.rendered] for r in recs]).to(dev)
        ok, loc = [], []
        for i, r in enumerate(recs):
            q = (list(r.paraphrases) or [r.request.rendered])[0]
            p = head.log_prob(self.emb[q][None].to(dev), keys)[0].exp()
            routed = int(p.argmax()) == i and float(p[i]) > THRESHOLD
            _, acc = self._cf_loss([TrainingRecord(r.request, (q,) if q != r.request.rendered else ())]) if routed else (None, 0.0)
            ok.append(float(routed) * acc)
            for lp, _ in r.locality:
                loc.append(float(float(head.log_prob(self.emb[lp][None].to(dev), keys)[0].exp().max()) <= THRESHOLD))
        return {"edit_success": sum(ok) / len(ok), "locality": sum(loc) / max(1, len(loc))}

    def config(self) -> dict:
        return {"encoder": self.encoder.identity, "n_layers": self.lm.n_layers, "d_mlp": _d_mlp(self.lm),
                "d_model": self.lm.d_model}


def train_serac(lm, records: list[TrainingRecord], hp: SERACHparams, *, steps: int | None = None, out=None,
                progress: bool = True, resume: bool = True) -> TrainedEditor:
    """Train SERAC's scope classifier head and counterfactual adapters for ``lm`` on ``records`` and save
    them (``out``, ``hp.editor`` or the cache). Resumes from a checkpoint of the same key."""
    return run_training("serac", lm, records, hp, _SERACTrainer, steps=steps, out=out, progress=progress, resume=resume)


# ====================================================================== the method
@register("serac", SERACHparams, batched=True, layers=None, train=train_serac,
          smoke={"train_data": "toy", "train_if_missing": True, "train_steps": 4, "batch_size": 4,
                 "cf_lr": 1e-2, "eval_every": 2, "checkpoint_every": 2},
          description="SERAC: edit memory, a trained scope classifier and a counterfactual model; out-of-scope "
                      "inputs go to the untouched model (Mitchell et al. 2022; needs `locate-edit train serac`)")
def compute_serac(lm, requests: list[Request], hp: SERACHparams, rt: Runtime) -> Edit:
    """The SERAC edit of ``requests``: their edit texts and classifier keys in a memory (a router input
    transform) and the trained counterfactual adapters (a hook module). No weight of the model changes."""
    t0 = time.perf_counter()
    memo = ("serac-editor", lm.fingerprint, json.dumps(asdict(hp), sort_keys=True, default=str), str(rt.data_dir))
    if memo not in rt.cache:  # the edits of one run load (and digest the training file) once
        path, records = training_source(hp.train_data, rt.data_dir if rt is not None else None)
        rt.cache[memo] = obtain("serac", lm, hp, data_path=path, records=records, train_fn=train_serac,
                                progress=bool(rt.progress))
    art = rt.cache[memo]
    cfg = art.config
    if (cfg["n_layers"], cfg["d_mlp"], cfg["d_model"]) != (lm.n_layers, _d_mlp(lm), lm.d_model):
        raise EditFailedError(f"the trained SERAC editor at {art.path} has another shape than {lm.name}")
    encoder = SentenceEncoder()
    if encoder.identity != cfg["encoder"]:
        raise EditFailedError(f"the trained SERAC editor at {art.path} was trained with another sentence encoder")
    texts = [edit_text(r) for r in requests]
    keys = cached_embeddings([r.rendered for r in requests], encoder)
    # each edit text's token embeddings as the embedding hook sees them (without the boundary token,
    # which can merge with the input that follows)
    prefixes = []
    for t, r in zip(texts, requests):
        ids = lm.encode(t.rstrip(), raw=True)
        probe = lm.encode(t + r.rendered, raw=True)
        n = len(ids) if probe[: len(ids)] == ids else len(ids) - 1
        batch = lm.pad([ids[:max(n, 1)]])
        with torch.no_grad(), capture(lm, [lm.hook_embed], keep=lambda s, x: x[0].clone()) as got:
            lm.forward(batch)
        prefixes.append(got[lm.hook_embed])
    router = SERACRouter(texts, keys, art.tensors["head.proj"], art.tensors["head.log_scale"], cfg["encoder"])
    adapter = SERACAdapter(lm.n_layers, lm.hook_embed, [lm.hook_mlp_key(l) for l in range(lm.n_layers)],
                           [lm.hook_mlp_out(l) for l in range(lm.n_layers)], art.tensors["cf.a"], art.tensors["cf.b"],
                           prefixes)
    return Edit(method="serac", requests=list(requests), interventions=[adapter, router], fingerprint=lm.fingerprint,
                model_name=lm.name, hparams=asdict(hp), timings={"total_s": time.perf_counter() - t0},
                metrics={"editor": str(art.path), "scale": float(art.tensors["head.log_scale"].exp())})


def serac(requests: Request | list[Request], *, model=None, runtime: Runtime | None = None, **hparams) -> Edit:
    """The SERAC edit of ``requests`` (computed and **not applied**)."""
    return compute("serac", requests, model=model, runtime=runtime, **hparams)
