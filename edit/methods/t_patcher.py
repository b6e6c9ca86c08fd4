"""T-Patcher: Transformer-Patcher, one mistake worth one neuron (Huang et al., ICLR 2023).

T-Patcher keeps every weight. Each edit adds ONE trainable neuron (a *patch*) to the last FFN layer:
a key k (d_model), a bias b and a value v (d_model). For the FFN's input x at a position (the MLP's
input, ``blocks.L.mlp.hook_in``), the patch's pre-activation and its contribution are

    a(x) = x · k + b,          FFN(x) ← FFN(x) + relu(a(x)) · v                                 (1)

so a position where a(x) ≤ 0 is computed exactly as before; where no position of a batch activates
any patch the hook returns its input tensor itself and the outputs are bit-identical.

Training one patch per request, for a request with prompt p and target tokens o_1..o_m, teacher
forced on p + o; the *edit positions* J are those whose next token is a target token (p's last token
and o_1..o_(m-1)); a_j is the pre-activation there. The loss is (Section 3.2 of the paper)

    L = L_e + c_a · L_a + c_m · (L_m1 + L_m2)                                                   (2)

    L_e  = label-smoothed NLL of o (ε = 0.1), summed over target tokens / their number
    L_a  = mean of the top 5 of  exp(γ_a − a_j),  j ∈ J            (activate on the edit, γ_a = 0)
    L_m1 = mean of the top 1000 of  exp(a(x_i) − a_j + β_1)       (the edit above every memory by β_1 = 3)
    L_m2 = mean of the top 1000 of  exp(a(x_i) − β_2)             (every memory below β_2 = −3)

over memories x_i and edit positions j (T-Patcher's ``top5_exp`` activation loss and
``top1000_exp+top1000_exp`` memory loss, c_a = 1, c_m = 5). The memory is the set of FFN inputs of
other text at the patched layer: here every token of the first ``memory_size`` (40,000, T-Patcher's
``memory_size``) tokens of ``memory_corpus`` (default: the packaged WikiText-2 validation head,
``edit/data/wikitext2_valid_head.txt``; T-Patcher uses the decoder states of its task's training
split), plus the edit positions of the T-Patcher patches already applied at the same layer
(T-Patcher's ``update_memory``), so a new patch also stays off the earlier edits. The memory is
computed once per model state and layer and kept in ``Runtime.cache``; patches themselves never
change it (they act after the FFN input they read).

Initialisation (``use_init_weight``, ``amplify_v``): k = q / ‖q‖² with q the FFN input at the prompt's
last token, b = 0 (so a = 1 there), and v = v₀ ⊙ c with v₀ ~ N(0, I) (seeded by ``Runtime.seed``) and
the amplifier c = 10·1, both trained. Optimisation: Adam (lr 1e-2, weight decay 0.01), gradient norm
clipped to 5, for at most ``max_steps`` (2,000) steps. Every ``check_every`` (25) steps the edit loss
L_e is measured and a plateau schedule halves the learning rate (patience 1, relative threshold
0.05); from step ``start_check`` (100) on, when the edit takes (every target token is the
teacher-forced argmax), the memory loss is recorded, and training stops at the first such check whose
memory loss is not lower than the best one by 0.001 (T-Patcher's ``use_val`` early stop, patience 1).

How this differs from the reference code (ZeroYuHuang/Transformer-Patcher, BART-base on zsRE/FEVER):

* The activation is ReLU. The reference patches BART's FFN, whose activation (GELU) the patch shares:
  GELU(−3) ≈ −0.004, so its inactive patches still move the output slightly. ReLU makes "inactive"
  exact (and the gated FFNs of Llama/Qwen have no single activation a patch could share).
* One patch per request (the issue's design); the reference adds one neuron per wrongly predicted
  target token (at most 5), each trained to fire at its own position. Here the request's patch is
  trained to fire at all its edit positions, which a decoder-only model needs for multi-token targets.
* The memory is WikiText (or any ``memory_corpus``) instead of the task's training inputs; the
  reference's separate validation memory is the same memory here, and its batch of 8 repeats of the
  example is one row (it only repeats terms inside the top-k means).
* "The edit takes" is teacher-forced argmax on every target token; the reference compares a beam
  search generation with the target.
* The patch lives in a hook module (:class:`TPatcherNeurons`), not in enlarged weight matrices, so the
  model's weights never change and edits revert bit-exactly. ``layer=None`` is the last layer (the
  paper's placement); any other layer can be given.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit, ReadAddModule
from ..registry import Runtime, compute, register
from ..request import Request
from ..stats import DEFAULT_CORPUS, describe_corpus, token_stream

_MEMORY_BATCH = 64  # memory rows per forward


@dataclass
class TPatcherHparams:
    """T-Patcher's hyper-parameters; defaults are the reference code's (``src/utils.py``, zsRE)."""

    layer: int | None = None  # the patched FFN layer; None = the last layer (the paper's placement)
    lr: float = 1e-2  # Adam learning rate (reference: 1e-2)
    weight_decay: float = 0.01  # Adam weight decay (reference: 0.01)
    max_steps: int = 2000  # most training steps per edit (reference max_edit_step: 2000)
    check_every: int = 25  # steps between checks: lr schedule and early stop (reference: 25)
    start_check: int = 100  # first step whose check may stop training (reference start_val_epoch: 100)
    early_threshold: float = 0.001  # a memory loss lower than the best by this is an improvement (reference: 0.001)
    lr_factor: float = 0.5  # plateau schedule: lr ← lr · factor (reference: 0.5)
    lr_patience: int = 1  # plateau schedule patience, in checks (reference: 1)
    lr_threshold: float = 0.05  # plateau schedule relative threshold (reference: 0.05)
    grad_clip: float = 5.0  # gradient norm clipping (reference Trainer gradient_clip_val: 5.0)
    label_smoothing: float = 0.1  # ε of the label-smoothed edit loss L_e (reference: the BART model's 0.1)
    act_coef: float = 1.0  # c_a (reference alc: 1.0)
    act_margin: float = 0.0  # γ_a (reference act_margin_val: 0)
    act_top_k: int = 5  # L_a averages the top k terms (reference: top5_exp)
    memory_coef: float = 5.0  # c_m (reference mlc: 5)
    memory_margin1: float = 3.0  # β_1 (reference margin_val1: 3)
    memory_margin2: float = -3.0  # β_2 (reference margin_val2: −3)
    memory_top_k: int = 1000  # L_m1 and L_m2 average the top k terms (reference: top1000_exp+top1000_exp)
    memory_size: int = 40000  # memory tokens from memory_corpus (reference memory_size: 40,000)
    memory_corpus: Any = None  # None: the packaged WikiText-2 validation head; or a corpus edit.stats accepts
    memory_window: int = 16  # tokens per memory row: the corpus cut in short rows, like the reference's short task inputs
    amplify: float = 10.0  # initial value of the trained amplifier c of v = v₀ ⊙ c (reference amplify_con: 10)

    def __post_init__(self):
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral)):
            raise InvalidHparamsError(f"layer must be an int or None (the last layer), got {self.layer!r}")
        for name in ("max_steps", "check_every", "act_top_k", "memory_top_k", "memory_size", "memory_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name in ("start_check", "lr_patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise InvalidHparamsError(f"{name} must be a non-negative int, got {v!r}")
        for name, low in (("lr", "pos"), ("weight_decay", "nonneg"), ("early_threshold", "nonneg"), ("grad_clip", "pos"),
                          ("act_coef", "nonneg"), ("memory_coef", "nonneg"), ("lr_threshold", "nonneg"),
                          ("act_margin", None), ("memory_margin1", None), ("memory_margin2", None), ("amplify", None)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                    or (low == "pos" and v <= 0) or (low == "nonneg" and v < 0):
                raise InvalidHparamsError(f"{name} must be a finite{' positive' if low == 'pos' else ' non-negative' if low else ''} "
                                          f"number, got {v!r}")
        for name in ("lr_factor", "label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1 or (name == "lr_factor" and v == 0):
                raise InvalidHparamsError(f"{name} must be a number in {'(0, 1)' if name == 'lr_factor' else '[0, 1)'}, got {v!r}")


# ====================================================================== the patch
class TPatcherNeurons(ReadAddModule):
    """N added FFN neurons at one layer, Eq. (1): keys (N, d_model), biases (N,), values (N, d_model),
    read at ``in_hook`` (the FFN input) and added at ``out_hook`` (the FFN output). ``queries`` holds
    the FFN inputs at the edit positions the neurons were trained on (a later patch's memory)."""

    type_name = "t-patcher-neurons"

    def __init__(self, layer: int, in_hook: str, out_hook: str, keys: torch.Tensor, biases: torch.Tensor,
                 values: torch.Tensor, queries: torch.Tensor):
        super().__init__()
        if keys.ndim != 2 or values.shape != keys.shape or biases.shape != keys.shape[:1] or queries.ndim != 2 \
                or queries.shape[1] != keys.shape[1]:
            raise InvalidArgumentError(f"T-Patcher neurons need keys and values (N, d), biases (N,) and queries (Q, d); got "
                                       f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(biases.shape)}, {tuple(queries.shape)}")
        self.layer = int(layer)
        self.in_hook, self.out_hook = in_hook, out_hook
        for name, t in (("keys", keys), ("biases", biases), ("values", values), ("queries", queries)):
            self.register_buffer(name, t.detach().clone())

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def __repr__(self) -> str:
        return f"TPatcherNeurons(layer={self.layer}, neurons={len(self)})"

    def config(self) -> dict:
        return {"layer": self.layer, "in_hook": self.in_hook, "out_hook": self.out_hook}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "TPatcherNeurons":
        return cls(config["layer"], config["in_hook"], config["out_hook"], tensors["keys"], tensors["biases"],
                   tensors["values"], tensors["queries"])

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """a(x) = x · k + b for FFN inputs x (..., d_model): (..., N)."""
        return x.to(self.keys.dtype) @ self.keys.T + self.biases

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a = self.pre_activation(x)
        active = (a > 0).any(-1)
        if not bool(active.any()):
            return y  # the very tensor: every patch is off, the forward is bit-identical
        out = y + (torch.relu(a) @ self.values).to(y.dtype)
        return torch.where(active[..., None], out, y)


def ffn_input_hook(lm, layer: int) -> str:
    """The hook point of layer ``layer``'s FFN input (after its layer norm)."""
    return f"blocks.{lm.check_layer(layer)}.mlp.hook_in"


# ====================================================================== the memory
def _memory_state_key(lm, layer: int) -> tuple:
    """What the FFN inputs at ``layer`` depend on: the weights and every applied edit except T-Patcher
    patches at ``layer`` or later (which act after those inputs)."""
    under = [e.id for e in lm.applied_edits
             if not (e.interventions and all(isinstance(iv, TPatcherNeurons) and iv.layer >= layer for iv in e.interventions))]
    return (lm.fingerprint, tuple(under))


@torch.no_grad()
def corpus_memory(lm, layer: int, hp: TPatcherHparams, rt: Runtime) -> torch.Tensor:
    """The FFN inputs at ``layer`` of every token of the first ``memory_size`` tokens of the memory
    corpus, (M, d_model) in float32; kept in ``rt.cache``."""
    corpus = DEFAULT_CORPUS if hp.memory_corpus is None else hp.memory_corpus
    key = ("t-patcher-memory", _memory_state_key(lm, layer), layer, describe_corpus(corpus), int(hp.memory_size),
           int(hp.memory_window))
    if key in rt.cache:
        return rt.cache[key]
    tokens, _ = token_stream(lm, corpus, int(hp.memory_size))
    site = ffn_input_hook(lm, layer)
    rows = list(tokens.split(int(hp.memory_window)))
    parts = []
    for i in range(0, len(rows), _MEMORY_BATCH):
        chunk = rows[i: i + _MEMORY_BATCH]
        # equal-length rows batch without padding; a short last row runs alone
        for group in ([chunk] if len({len(r) for r in chunk}) == 1 else [[r] for r in chunk]):
            with capture(lm, site, keep=lambda s, x: x.reshape(-1, x.shape[-1]).float().clone()) as got:
                lm.bridge(torch.stack(group).to(lm.device))
            parts.append(got[site])
    memory = torch.cat(parts)
    rt.cache[key] = memory
    return memory


def _older_queries(lm, layer: int) -> list[torch.Tensor]:
    """The edit-position FFN inputs of the T-Patcher patches applied at ``layer``."""
    return [m.queries.float().to(lm.device) for e in lm.applied_edits for m in e.hook_modules
            if isinstance(m, TPatcherNeurons) and m.layer == layer]


# ====================================================================== the losses
def _top_k_exp_mean(z: torch.Tensor, k: int) -> torch.Tensor:
    """mean of the top k of exp(z) (T-Patcher's ``top{k}_exp``)."""
    z = z.reshape(-1)
    return torch.exp(torch.topk(z, min(k, z.numel())).values).mean()


def label_smoothed_nll(logp: torch.Tensor, gold: torch.Tensor, eps: float) -> torch.Tensor:
    """Σ over tokens of (1 − ε − ε_i)·(−log p_gold) + ε_i·Σ_v(−log p_v), ε_i = ε / (V − 1), divided by the
    number of tokens (the reference's fairseq-style loss); ε = 0 is the mean NLL."""
    nll = -logp.gather(-1, gold[:, None])[:, 0]
    smooth = -logp.sum(-1)
    eps_i = eps / (logp.shape[-1] - 1)
    return ((1.0 - eps - eps_i) * nll + eps_i * smooth).sum() / gold.numel()


# ====================================================================== the method
@register("t-patcher", TPatcherHparams, batched=True, layers=None,
          smoke={"max_steps": 20, "check_every": 5, "start_check": 0, "memory_size": 512},
          description="T-Patcher: one trained neuron per edit added to the last FFN, kept off on other text (Huang et al. 2023)")
def compute_t_patcher(lm, requests: list[Request], hp: TPatcherHparams, rt: Runtime) -> Edit:
    """The T-Patcher edit of ``requests`` (module docstring), not applied: one :class:`TPatcherNeurons`
    module with one neuron per request. The model's weights never change."""
    layer = lm.check_layer(lm.n_layers - 1 if hp.layer is None else hp.layer)
    reason = f"layer {layer}: {'the last layer (T-Patcher patches the last FFN)' if hp.layer is None else 'chosen by the caller'}"
    in_hook, out_hook = ffn_input_hook(lm, layer), lm.hook_mlp_out(layer)
    dtype = torch.promote_types(lm.dtype, torch.float32)
    t0 = time.perf_counter()

    # memory: corpus tokens, and the edit positions of the patches already applied here
    memory = torch.cat([corpus_memory(lm, layer, hp, rt).to(lm.device)] + _older_queries(lm, layer)).to(dtype)
    timings = {"memory_s": time.perf_counter() - t0}

    # the training rows: prompt + target, teacher forced; edit positions J_i predict the target tokens
    prompts = [lm.encode(r.rendered) for r in requests]
    targets = [lm.target_ids(r.target_new, r.rendered) for r in requests]
    batch = lm.pad([p + o for p, o in zip(prompts, targets)])
    n = len(requests)
    pos_row = torch.cat([torch.full((len(o),), i, dtype=torch.long) for i, o in enumerate(targets)]).to(lm.device)
    pos_t = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(o)) for p, o in zip(prompts, targets)]).to(lm.device)
    gold = torch.as_tensor([t for o in targets for t in o], device=lm.device)

    with torch.no_grad(), capture(lm, in_hook) as got:
        lm.forward(batch)
    x_edit = got[in_hook][pos_row, pos_t].to(dtype)  # FFN inputs at the edit positions, (|J|, d)
    first = torch.as_tensor([len(p) - 1 for p in prompts], device=lm.device)
    q = got[in_hook][torch.arange(n, device=lm.device), first].to(dtype)  # at each prompt's last token

    # initialisation: k = q / ‖q‖², b = 0, v = v₀ ⊙ c
    g = torch.Generator().manual_seed(int(rt.seed))
    keys = torch.nn.Parameter(q / q.pow(2).sum(-1, keepdim=True))
    biases = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=lm.device))
    v0 = torch.nn.Parameter(torch.randn(n, lm.d_model, generator=g, dtype=torch.float32).to(device=lm.device, dtype=dtype))
    amp = torch.nn.Parameter(torch.full((n, lm.d_model), float(hp.amplify), dtype=dtype, device=lm.device))
    params = [keys, biases, v0, amp]
    own = pos_row  # neuron i fires at the edit positions of request i

    state: dict[str, torch.Tensor] = {}

    def read(x, hook):
        state["x"] = x
        return x

    def add(y, hook):
        a = state.pop("x").to(dtype) @ keys.T + biases  # (B, T, N)
        state["a"] = a
        return y + (torch.relu(a) @ (v0 * amp)).to(y.dtype)

    def losses() -> dict[str, torch.Tensor]:
        logits = lm.forward(batch)
        logp = torch.log_softmax(logits[pos_row, pos_t].float(), -1)
        a_edit = state.pop("a")[pos_row, pos_t, own]  # a_j of each request's own neuron, (|J|,)
        his = memory @ keys.T + biases  # (M, N)
        l_e = label_smoothed_nll(logp, gold, hp.label_smoothing)
        l_a = _top_k_exp_mean(hp.act_margin - a_edit, hp.act_top_k)
        l_m1 = _top_k_exp_mean(his[:, own] - a_edit[None] + hp.memory_margin1, hp.memory_top_k)
        l_m2 = _top_k_exp_mean(his - hp.memory_margin2, hp.memory_top_k)
        takes = bool((logp.argmax(-1) == gold).all())
        return {"edit": l_e, "act": l_a, "memory": l_m1 + l_m2, "takes": takes,
                "total": l_e + hp.act_coef * l_a + hp.memory_coef * (l_m1 + l_m2)}

    trace: list[float] = []
    checks: list[dict] = []
    memory_hist: list[float] = []
    stopped_at = None
    with lm.eval_mode(), lm.hooks([(in_hook, read), (out_hook, add)]):
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=hp.lr_factor,
                                                             patience=hp.lr_patience, threshold=hp.lr_threshold)
        for step in range(hp.max_steps):
            opt.zero_grad()
            L = losses()
            if not torch.isfinite(L["total"]):
                raise EditFailedError(f"T-Patcher loss became {L['total'].item()} at step {step}; the model is unchanged")
            L["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            opt.step()
            trace.append(float(L["total"].detach()))
            if (step + 1) % hp.check_every:
                continue
            with torch.no_grad():
                V = losses()
            plateau.step(float(V["edit"]))
            checks.append({"step": step + 1, "edit_loss": float(V["edit"]), "memory_loss": float(V["memory"]),
                           "takes": V["takes"], "lr": opt.param_groups[0]["lr"]})
            if rt.callback is not None:
                rt.callback({"method": "t-patcher", **checks[-1]})
            if step >= hp.start_check and V["takes"]:
                memory_hist.append(float(V["memory"]))
                best = 0
                for i, m in enumerate(memory_hist):
                    if m < memory_hist[best] - hp.early_threshold:
                        best = i
                if best < len(memory_hist) - 1:  # no new best at this check (patience 1): stop here
                    stopped_at = step + 1
                    break
        with torch.no_grad():
            final = losses()
    values = (v0 * amp).detach()
    patch = TPatcherNeurons(layer, in_hook, out_hook, keys.detach(), biases.detach(), values, x_edit)
    if not all(bool(torch.isfinite(t).all()) for t in patch.tensors().values()):
        raise EditFailedError("T-Patcher produced non-finite neurons; the model is unchanged")
    with torch.no_grad():
        his = patch.pre_activation(memory)
        a_edit = patch.pre_activation(x_edit)[torch.arange(len(own), device=lm.device), own]
    timings["train_s"] = time.perf_counter() - t0 - timings["memory_s"]
    timings["total_s"] = time.perf_counter() - t0
    return Edit("t-patcher", list(requests), [patch], lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layer": layer, "memory_corpus": describe_corpus(hp.memory_corpus or DEFAULT_CORPUS)},
                timings=timings, loss_trace=trace,
                metrics={"steps": len(trace), "stopped_early_at": stopped_at, "checks": checks,
                         "final_edit_loss": float(final["edit"]), "final_memory_loss": float(final["memory"]),
                         "takes_in_training": final["takes"], "edit_activation_min": float(a_edit.min()),
                         "memory_activation_max": float(his.max()), "memory_size": int(memory.shape[0])})


def t_patcher(requests: Request | Sequence[Request], *, model=None, layer: int | None = None,
              runtime: Runtime | None = None, **hparams) -> Edit:
    """The T-Patcher edit of ``requests`` (one neuron each, at ``layer``, default the last), **not applied**."""
    return compute("t-patcher", requests, model=model, runtime=runtime, layer=layer, **hparams)
