"""WISE: a routed side memory beside one FFN value matrix (Wang et al., NeurIPS 2024).

WISE keeps every weight of the model. At one layer l it keeps a *side memory* W_v' — a copy of the
MLP output projection W_v (Llama's ``down_proj``, GPT-2's ``c_proj``; the FFN "value" matrix) — and
edits only the copy. With a = the FFN's key (``lm.hook_mlp_key(l)``, the input of W_v) and
y = W_v a + b the main memory's output, the side memory's output is

    y' = W_v' a + b = y + Δ a,            Δ = W_v' − W_v                                         (1)

**Routing activation.** Per input sequence x with tokens t, the activation score of a side memory is

    Δ_act(x) = mean_t ‖ φ(y'_t) − φ(y_t) ‖₂       (max_t instead of the mean beyond 100 tokens)      (2)

with φ the model's MLP activation function (EasyEdit's ``euc``: it applies the model's ``hidden_act``
to both outputs before the distance). ``routing="paper"`` drops φ: Δ_act = mean_t ‖Δ a_t‖₂, the
paper's ‖A(x)·(W_v' − W_v)‖. A side memory is used for x only if Δ_act(x) reaches its threshold

    ε = act_ratio · min_e Δ_act(edit e)                                                           (3)

the smallest in-scope activation recorded while training the memory's edits (EasyEdit's
``EditingMeanAct.min_act``), scaled by ``act_ratio``. Otherwise the main memory's output y is
returned — the *very tensor*: for such inputs the forward is bit-identical to the base model.

**Training one edit** (EasyEdit's ``WISE.edit``; one request at a time). The rows are the request's
prompt + target under each context template (the bare prompt and ``context_lengths`` generated
prefixes), plus one out-of-scope row (EasyEdit's ``loc_prompt``; here a ``loc_window``-token window
of ``loc_corpus``). During training every row goes through the side memory. The loss is

    L = L_edit + L_a,  L_edit = mean over template rows of the target tokens' mean NLL            (4)
    L_a = [Δ_out − Δ_in + γ]₊ + [Δ_out − α]₊ + [β − Δ_in]₊                                          (5)

with Δ_in the activation (2) of each template row and Δ_out that of the out-of-scope row; each
bracket is the mean of its positive entries (0 if none); (α, β, γ) = ``act_margin``. Only Δ learns:
plain SGD (``edit_lr``, ``weight_decay`` on W_v' = W_v + Δ) whose gradient is multiplied by the
shard's random mask M (below), and after each step Δ is clipped to [−c, c] elementwise
(``norm_constraint`` c: W_v' stays within c of W_v). Training stops after ``n_iter`` steps, or
earlier once the loss is ≤ 0.02 and changed by ≤ 1e-4 (EasyEdit's ``EarlyStopMeter``). The
request's in-scope activation (the template rows' mean Δ_act, from the last forward) enters (3).

**Knowledge sharding and merging.** Edits are grouped in shards of ``shard_size`` consecutive edits
(EasyEdit ``save_freq``). Each shard trains a fresh Δ (from 0) inside its own random subspace: a mask
M with each entry 1 with probability ``mask_ratio``, drawn anew for every shard, so a shard only
ever changes the masked entries of the side memory. A full shard is saved as a memory with its own
threshold (3). Every ``merge_freq`` edits the last ``merge_freq / shard_size`` memories are merged
into one with TIES (EasyEdit's ``merge_alg: ties``: ``GTA('magnitude', 'sum', normalize=True)``):

    τ_i = trim_ρ(Δ_i)                (keep the ⌊ρ·n⌋ entries of largest |·|, ρ = ``densities``)
    s   = sign(Σ_i w_i τ_i)          (majority sign, ≥ 0 counts as +, w_i = ``weights`` / k)
    Δ   = Σ_i w_i τ_i [sign τ_i = s] / Σ_i w_i [sign τ_i = s]      (0/0 := 0)                     (6)

and the merged memory's threshold uses the smallest activation of its shards. At inference
(EasyEdit's ``retrieve: True``) the in-progress shard (if any) is used when its Δ_act reaches its
threshold; then each saved memory, oldest first, takes over when its Δ_act is both above its own
threshold and above the best score so far; if none does, the main memory.

Defaults are EasyEdit's ``hparams/WISE/llama-7b.yaml``: ``mask_ratio`` 0.2, ``edit_lr`` 1.0,
``n_iter`` 70, ``norm_constraint`` 1.0, ``act_margin`` (α, β, γ) = (5, 20, 10), ``act_ratio`` 0.88,
``save_freq`` 500, ``merge_freq`` 1000, TIES with density 0.53 and weight 1.0, SGD weight decay 1e-5,
context templates ``[[5, 5], [10, 5]]``. The layer (``layers=None``) is that file's
``model.layers[27]`` of Llama-2-7B's 32 scaled to the model's depth: ⌊n_layers · 27/32⌋ (25 of
SmolLM2-135M's 30; the last layer of a 2-layer test model).

How this differs from the reference (EasyEdit ``easyeditor/models/wise``):

* One WISE call is one :class:`WiseMemory` hook module holding the memories of its own requests
  (batched: its requests are edited one after another, sharded and merged as above). A later WISE
  call at the same layer does not continue the earlier side memory: it makes new memories, stacked
  as hooks (it sees the earlier memories' outputs as its main memory), and reads the shards of the
  WISE memories already applied there (:func:`older_shards`) only so that its masks are new random
  subspaces rather than the same ones again. EasyEdit continues one side memory across calls and
  merges across them; here the sharding and the merge happen within one call.
* The out-of-scope row is a window of a text corpus (default the packaged WikiText-2 head), not the
  dataset's locality prompt; the context templates are the library's sampled ones
  (:func:`edit.context.context_templates`), EasyEdit's are beam-searched.
* The routing (2) is per sequence of a batch; EasyEdit reads one score for the whole batch (``.item()``,
  batch size 1 in its evaluation). Padding positions are left out of the means (EasyEdit averages over
  them, with ``act_mask`` only for prompts that contain their locality prompt, which is not built).
  A forward with a key-value cache routes each new chunk of tokens on its own.
* Weight decay acts on the masked entries only (``decay_outside_mask=False``): EasyEdit's SGD decays
  every entry of W_v' by ``edit_lr · weight_decay`` per step, outside the shard's subspace too;
  ``decay_outside_mask=True`` does that.
* L_edit is each template row's mean NLL of its target tokens; EasyEdit divides the summed NLL by a
  count that also covers the last prompt token(s) and the padding of the row.
* The side memory's output is y + Δ a (1) rather than a fresh W_v' a + b: equal in exact arithmetic.
* The merge is TIES only (EasyEdit also offers slerp, linear, DARE); the replay of past edits
  (``replay``, off in every EasyEdit file) is not built.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from transformers.activations import ACT2FN

from locate import resolve_layers
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError

from ..context import context_templates
from ..edit import Edit, HookModule
from ..registry import Runtime, compute, register
from ..request import Request
from ..stats import DEFAULT_CORPUS, describe_corpus, token_stream

ROUTINGS = ("activation", "paper")
LONG_SEQUENCE = 100  # beyond this many tokens the routing score is the largest token score (EasyEdit)
REFERENCE_LAYER = (27, 32)  # EasyEdit's llama-7b.yaml: model.layers[27] of 32


@dataclass
class WISEHparams:
    """WISE's hyper-parameters; defaults are EasyEdit's ``hparams/WISE/llama-7b.yaml``."""

    layers: Any = None  # None: ⌊n_layers·27/32⌋ (EasyEdit's layer 27 of 32); else a layer spec naming one layer
    mask_ratio: float = 0.2  # share of the side memory's entries in one shard's random subspace (mask_ratio)
    edit_lr: float = 1.0  # SGD learning rate (edit_lr)
    n_iter: int = 70  # SGD steps per edit at most (n_iter)
    norm_constraint: float | None = 1.0  # |W_v' − W_v| ≤ c elementwise after each step; None: no clip
    act_margin: tuple = (5.0, 20.0, 10.0)  # (α, β, γ) of the margin loss (5) (act_margin)
    act_ratio: float = 0.88  # threshold ε = act_ratio · smallest in-scope activation (act_ratio)
    shard_size: int = 500  # edits per shard / random subspace (save_freq)
    merge_freq: int = 1000  # every merge_freq edits the last merge_freq/shard_size memories are TIES-merged
    densities: float = 0.53  # TIES trim density ρ (densities)
    weights: float = 1.0  # TIES weight, shared by the merged memories (weights)
    weight_decay: float = 1e-5  # SGD weight decay on W_v' (EasyEdit's optimiser)
    decay_outside_mask: bool = False  # True: decay every entry, as EasyEdit's SGD does (leaves the subspace)
    routing: str = "activation"  # "activation": φ on both outputs, Eq. (2) (EasyEdit); "paper": ‖Δ a‖
    context_lengths: tuple = ((5, 5), (10, 5))  # generated prefixes (token length, count); () for the bare prompt
    loc_corpus: Any = None  # out-of-scope text (None: the packaged WikiText-2 validation head)
    loc_window: int = 16  # tokens of the out-of-scope row

    def __post_init__(self):
        for name in ("n_iter", "shard_size", "merge_freq", "loc_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        if self.merge_freq % self.shard_size:
            raise InvalidHparamsError(f"merge_freq ({self.merge_freq}) must be a multiple of shard_size ({self.shard_size})")
        for name, lo, hi in (("mask_ratio", 0.0, 1.0), ("densities", 0.0, 1.0), ("act_ratio", 0.0, math.inf)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo < v <= hi or not math.isfinite(v):
                raise InvalidHparamsError(f"{name} must be a finite number in ({lo}, {hi}], got {v!r}")
        for name in ("edit_lr", "weights"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise InvalidHparamsError(f"{name} must be a finite positive number, got {v!r}")
        for name in ("weight_decay", "norm_constraint"):
            v = getattr(self, name)
            if v is None and name == "norm_constraint":
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise InvalidHparamsError(f"{name} must be a finite non-negative number, got {v!r}")
        try:
            margin = tuple(float(x) for x in self.act_margin)
        except (TypeError, ValueError) as e:
            raise InvalidHparamsError(f"act_margin must be three numbers (α, β, γ), got {self.act_margin!r}") from e
        if len(margin) != 3 or not all(math.isfinite(x) for x in margin):
            raise InvalidHparamsError(f"act_margin must be three finite numbers (α, β, γ), got {self.act_margin!r}")
        self.act_margin = margin
        if self.routing not in ROUTINGS:
            raise InvalidHparamsError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not isinstance(self.decay_outside_mask, bool):
            raise InvalidHparamsError(f"decay_outside_mask must be True or False, got {self.decay_outside_mask!r}")
        try:
            self.context_lengths = tuple((int(a), int(b)) for a, b in self.context_lengths)
        except (TypeError, ValueError) as e:
            raise InvalidHparamsError(f"context_lengths must be (token length, count) pairs, got {self.context_lengths!r}") from e


# ====================================================================== the routed side memory
def activation_name(lm) -> str:
    """φ of Eq. (2): the name (``ACT2FN``) of the model's MLP activation (its config's ``hidden_act``)."""
    cfg = lm.hf_model.config
    name = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
    if name not in ACT2FN:
        raise InvalidArgumentError(f"{lm.name}: unknown MLP activation {name!r}; use routing='paper'")
    return name


def token_scores(y: torch.Tensor, y_side: torch.Tensor, act: str | None) -> torch.Tensor:
    """‖φ(y') − φ(y)‖₂ per token (φ = ``ACT2FN[act]``; the identity for ``None``), (..., T)."""
    if act is not None:
        phi = ACT2FN[act]
        y, y_side = phi(y), phi(y_side)
    return torch.linalg.vector_norm(y_side - y, dim=-1)


def sequence_scores(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (2) per row of (B, T) token scores: the mean over (real) tokens, the max beyond 100 tokens."""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    n = mask.sum(-1)
    mean = (scores * mask).sum(-1) / n.clamp(min=1)
    top = scores.masked_fill(~mask, -math.inf).amax(-1)
    return torch.where(n > LONG_SEQUENCE, top, mean)


class WiseMemory(HookModule):
    """WISE's side memories at one layer: ``deltas`` (M, d_model, d_mlp), Δ_i = W_v'_i − W_v, and
    ``thresholds`` (M,), Eq. (3). If ``current``, the last one is the in-progress shard (EasyEdit's
    ``new_weight``), the others saved or merged memories, oldest first. Reads the key a at
    ``key_hook``; at ``out_hook`` returns y where routing says main memory (the same tensor when it
    does for every row), y + Δ_i a where it picks memory i."""

    type_name = "wise-memory"

    def __init__(self, layer: int, key_hook: str, out_hook: str, deltas: torch.Tensor, thresholds: torch.Tensor,
                 act: str | None, current: bool, n_shards: int):
        super().__init__()
        if deltas.ndim != 3 or thresholds.shape != deltas.shape[:1]:
            raise InvalidArgumentError(f"WISE memories need deltas (M, d_out, d_in) and thresholds (M,); got "
                                       f"{tuple(deltas.shape)} and {tuple(thresholds.shape)}")
        self.layer, self.key_hook, self.out_hook = int(layer), key_hook, out_hook
        self.act, self.current, self.n_shards = act, bool(current), int(n_shards)
        self.register_buffer("deltas", deltas.detach().clone())
        self.register_buffer("thresholds", thresholds.detach().clone())
        self._a: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"WiseMemory(layer={self.layer}, memories={self.deltas.shape[0]}, shards={self.n_shards}, "
                f"current={self.current})")

    def config(self) -> dict:
        return {"layer": self.layer, "key_hook": self.key_hook, "out_hook": self.out_hook, "act": self.act,
                "current": self.current, "n_shards": self.n_shards}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "WiseMemory":
        return cls(config["layer"], config["key_hook"], config["out_hook"], tensors["deltas"], tensors["thresholds"],
                   config["act"], config["current"], config["n_shards"])

    # ------------------------------------------------------------------ routing
    @torch.no_grad()
    def route(self, a: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For keys a (B, T, d_mlp) and main outputs y (B, T, d_model): ``(choice, scores)``, the memory
        each row uses (−1: the main memory) and every memory's score (2), (B,) and (B, M)."""
        if a.ndim == 2:
            a, y = a[None], y[None]
        y32 = y.to(self.deltas.dtype)
        scores = torch.stack([sequence_scores(token_scores(y32, y32 + a.to(d.dtype) @ d.T, self.act))
                              for d in self.deltas], -1)  # (B, M)
        thr = self.thresholds.to(scores.dtype)
        choice = torch.full(scores.shape[:1], -1, dtype=torch.long, device=scores.device)
        older = range(scores.shape[1])
        if self.current:  # the in-progress shard: used at or above its threshold; its score is the bar
            cur = scores.shape[1] - 1
            best = scores[:, cur].clone()
            choice[best >= thr[cur]] = cur
            older = range(cur)
        else:  # a fresh (zero) side memory scores 0
            best = torch.zeros_like(scores[:, 0])
        for i in older:  # saved memories, oldest first: above their own threshold and the best so far
            take = (scores[:, i] > best) & (scores[:, i] > thr[i])
            choice[take] = i
            best = torch.where(take, scores[:, i], best)
        return choice, scores

    def _read(self, a: torch.Tensor) -> torch.Tensor:
        self._a = a
        return a

    def _write(self, y: torch.Tensor) -> torch.Tensor:
        a, self._a = self._a, None
        if a is None or a.shape[:-1] != y.shape[:-1] or self.deltas.shape[0] == 0:
            return y
        flat = y.ndim == 2
        a3, y3 = (a[None], y[None]) if flat else (a, y)
        choice, _ = self.route(a3, y3)
        if not bool((choice >= 0).any()):
            return y  # every row on the main memory: the very tensor, bit-identical
        out = y3.clone()
        for i in choice[choice >= 0].unique().tolist():
            rows = choice == i
            d = self.deltas[i]
            side = y3[rows].to(d.dtype) + a3[rows].to(d.dtype) @ d.T  # Eq. (1)
            out[rows] = side.to(y.dtype)
        return out[0] if flat else out

    def hook_fns(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {self.key_hook: self._read, self.out_hook: self._write}


# ====================================================================== pieces of the method
def wise_layer(lm, spec: Any) -> tuple[int, str]:
    """The edited layer: ``None`` scales EasyEdit's layer 27 of 32 to the model's depth; else a layer spec."""
    if spec is None:
        num, den = REFERENCE_LAYER
        layer = lm.check_layer(min(lm.n_layers - 1, lm.n_layers * num // den))
        return layer, f"layer {layer}: EasyEdit's WISE layer {num} of {den} scaled to {lm.n_layers} layers"
    layers, reason = resolve_layers(lm, spec, 1)
    if len(layers) != 1:
        raise InvalidHparamsError(f"WISE edits one layer; the spec {spec!r} names {layers}")
    return layers[0], reason


def shard_mask(shape: Sequence[int], ratio: float, seed: int, index: int) -> torch.Tensor:
    """The random subspace of shard ``index``: a bool mask, each entry True with probability ``ratio``."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.rand(tuple(shape), generator=g) < ratio


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Eq. (6): TIES-merging of task vectors (trim to ``density`` by magnitude, elect the sign of the
    weighted sum, average the weighted entries that agree with it)."""
    trimmed = []
    for d in deltas:
        k = int(density * d.numel())
        if density >= 1:
            trimmed.append(d)
            continue
        if k < 1:
            raise InvalidHparamsError(f"densities {density} keeps no entry of a {d.numel()}-entry memory")
        keep = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
        keep[d.abs().reshape(-1).float().topk(k).indices] = True
        trimmed.append(d * keep.view_as(d))
    tau = torch.stack(trimmed)
    w = torch.as_tensor(list(weights), dtype=tau.dtype, device=tau.device).view(-1, *([1] * (tau.ndim - 1)))
    weighted = tau * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(tau.dtype)
    agree = (tau.sign() == elected).to(tau.dtype)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def older_shards(lm, out_hook: str) -> int:
    """How many shards the WISE memories already applied at ``out_hook`` used (their masks' indices)."""
    return sum(m.n_shards for e in lm.applied_edits for m in e.hook_modules
               if isinstance(m, WiseMemory) and m.out_hook == out_hook)


def out_of_scope_rows(lm, hp: WISEHparams, n: int, rt: Runtime) -> list[list[int]]:
    """``n`` rows of ``loc_window`` tokens of the out-of-scope corpus (consecutive windows, cycled)."""
    corpus = DEFAULT_CORPUS if hp.loc_corpus is None else hp.loc_corpus
    key = ("wise-loc", describe_corpus(corpus), int(hp.loc_window), int(n))
    if key not in rt.cache:
        tokens, _ = token_stream(lm, corpus, int(hp.loc_window) * n)
        windows = [w.tolist() for w in tokens.split(int(hp.loc_window)) if len(w)]
        rt.cache[key] = [windows[i % len(windows)] for i in range(n)]
    return rt.cache[key]


class _EarlyStop:
    """EasyEdit's ``EarlyStopMeter``: stop once the last loss is ≤ 0.02 and moved by ≤ 1e-4."""

    def __init__(self):
        self.pre, self.val = 0.0, 1e9

    def update(self, v: float) -> None:
        self.pre, self.val = self.val, v

    def stop(self) -> bool:
        return abs(self.val - self.pre) <= 1e-4 and self.val <= 0.02


def _positive_mean(x: torch.Tensor) -> torch.Tensor:
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())


def margin_loss(d_in: torch.Tensor, d_out: torch.Tensor, margin: tuple[float, float, float]) -> torch.Tensor:
    """Eq. (5) for in-scope activations ``d_in`` (R,) and the out-of-scope one ``d_out`` (scalar)."""
    alpha, beta, gamma = margin
    return (_positive_mean(d_out - d_in + gamma) + _positive_mean((d_out - alpha).reshape(1))
            + _positive_mean(beta - d_in))


# ====================================================================== the method
@register("wise", WISEHparams, batched=True, layers=None,
          smoke={"n_iter": 10, "context_lengths": (), "shard_size": 1, "merge_freq": 2},
          description="WISE: a side copy of one FFN value matrix, edited in random-mask shards and routed by its activation (Wang et al. 2024)")
def compute_wise(lm, requests: list[Request], hp: WISEHparams, rt: Runtime) -> Edit:
    """The WISE edit of ``requests`` (module docstring), not applied: one :class:`WiseMemory`. No weight changes."""
    layer, reason = wise_layer(lm, hp.layers)
    act = None if hp.routing == "paper" else activation_name(lm)  # an unknown one is refused before any work
    key_hook, out_hook = lm.hook_mlp_key(layer), lm.hook_mlp_out(layer)
    W = lm.mlp_out_weight(layer).detach().float()  # (d_model, d_mlp), W_v
    templates = ["{}"] if not hp.context_lengths else context_templates(lm, seed=int(rt.seed), lengths=hp.context_lengths)
    loc_rows = out_of_scope_rows(lm, hp, len(requests), rt)
    first_shard = older_shards(lm, out_hook)
    t0 = time.perf_counter()

    # the training hook: every row through the side memory W_v + Δ, Eq. (1); keeps y and y'
    delta = torch.zeros_like(W, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def read(a, hook):
        seen["a"] = a
        return a

    def side(y, hook):
        seen["y"] = y.float()
        seen["y_side"] = seen["y"] + seen.pop("a").float() @ delta.T
        return seen["y_side"].to(y.dtype)

    memories: list[tuple[torch.Tensor, float]] = []  # saved / merged: (Δ, smallest in-scope activation)
    cur_min, mask, n_shards = math.inf, None, 0
    per_request, trace = [], []
    merge_num = hp.merge_freq // hp.shard_size
    with lm.eval_mode(), lm.hooks([(key_hook, read), (out_hook, side)]):
        for count, r in enumerate(requests):
            if count % hp.shard_size == 0:  # a new shard: a fresh random subspace
                mask = shard_mask(W.shape, hp.mask_ratio, rt.seed, first_shard + n_shards).to(W.device)
                n_shards += 1
            prompts = [lm.encode(t.format(r.rendered)) for t in templates]
            targets = [lm.target_ids(r.target_new, t.format(r.rendered)) for t in templates]
            rows = [p + o for p, o in zip(prompts, targets)] + [loc_rows[count]]
            batch = lm.pad(rows)
            real = batch.attention_mask.bool().to(lm.device)
            n_t = len(templates)
            stopper, recorded, losses = _EarlyStop(), None, []
            for it in range(hp.n_iter):
                logits = lm.forward(batch)
                nll = []
                for i, (p, o) in enumerate(zip(prompts, targets)):  # Eq. (4)
                    lp = torch.log_softmax(logits[i, len(p) - 1: len(p) - 1 + len(o)].float(), -1)
                    nll.append(-lp[torch.arange(len(o), device=lp.device), torch.as_tensor(o, device=lp.device)].mean())
                act_scores = sequence_scores(token_scores(seen["y"], seen["y_side"], act), real)  # Eq. (2) per row
                loss = torch.stack(nll).mean() + margin_loss(act_scores[:n_t], act_scores[n_t], hp.act_margin)
                if not torch.isfinite(loss):
                    raise EditFailedError(f"WISE loss became {loss.item()} at iteration {it}; the model is unchanged")
                if stopper.stop() or it == hp.n_iter - 1:  # the activation this edit leaves, for Eq. (3)
                    recorded = float(act_scores[:n_t].detach().mean())
                    if stopper.stop():
                        break
                grad, = torch.autograd.grad(loss, delta)
                with torch.no_grad():  # masked SGD with weight decay on W_v' = W_v + Δ, then the clip
                    step = grad * mask + hp.weight_decay * (W + delta) * (1 if hp.decay_outside_mask else mask)
                    delta -= hp.edit_lr * step
                    if hp.norm_constraint is not None:
                        delta.clamp_(-hp.norm_constraint, hp.norm_constraint)
                losses.append(float(loss.detach()))
                stopper.update(losses[-1])
            cur_min = min(cur_min, recorded)
            per_request.append({"in_scope_activation": recorded, "iterations": len(losses),
                                "final_loss": losses[-1] if losses else float(loss.detach())})
            trace.append(losses)
            if rt.callback is not None:
                rt.callback({"method": "wise", "request": count, "loss": per_request[-1]["final_loss"]})
            if (count + 1) % hp.shard_size == 0:  # a full shard becomes a memory; the next starts from W_v
                memories.append((delta.detach().clone(), cur_min))
                with torch.no_grad():
                    delta.zero_()
                cur_min = math.inf
            if (count + 1) % hp.merge_freq == 0:  # Eq. (6) over the last merge_num memories
                group = memories[-merge_num:]
                del memories[-merge_num:]
                merged = ties_merge([d for d, _ in group], [hp.weights / merge_num] * merge_num, hp.densities)
                memories.append((merged, min(m for _, m in group)))

    current = len(requests) % hp.shard_size != 0
    if current:
        memories.append((delta.detach().clone(), cur_min))
    deltas = torch.stack([d for d, _ in memories])
    thresholds = torch.tensor([m * hp.act_ratio for _, m in memories], dtype=torch.float64)
    if not bool(torch.isfinite(deltas).all()):
        raise EditFailedError("WISE produced a non-finite side memory; the model is unchanged")
    module = WiseMemory(layer, key_hook, out_hook, deltas, thresholds, act, current, n_shards)
    return Edit("wise", list(requests), [module], lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": [layer], "loc_corpus": describe_corpus(hp.loc_corpus or DEFAULT_CORPUS)},
                timings={"total_s": time.perf_counter() - t0}, loss_trace=trace,
                metrics={"per_request": per_request, "thresholds": thresholds.tolist(), "n_memories": len(memories),
                         "n_shards": n_shards, "first_shard": first_shard, "current_shard": current,
                         "delta_nonzero": [int((d != 0).sum()) for d, _ in memories]})


def wise(requests: Request | Sequence[Request], *, model=None, layer: Any = None, runtime: Runtime | None = None,
         **hparams) -> Edit:
    """The WISE edit of ``requests`` at ``layer`` (None: the depth-scaled reference layer), **not applied**."""
    return compute("wise", requests, model=model, runtime=runtime, layers=layer, **hparams)
