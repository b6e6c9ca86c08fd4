"""LoRA as an editor: low-rank adapters on the MLP output projection, trained on the request.

For each edited layer l, the MLP output projection (Llama's ``down_proj``, GPT-2's ``c_proj``) maps
the key x (d_mlp, ``lm.hook_mlp_key(l)``) to the MLP output W x (+ b). LoRA (Hu et al. 2022) adds a
trainable low-rank path beside the frozen W:

    h = W x + b + s · B A x,     A ∈ R^{r × d_mlp},  B ∈ R^{d_model × r},  s = α / r          (1)

Initialisation (PEFT's ``LoraConfig``, which EasyEdit uses): A ~ U(−1/√d_mlp, 1/√d_mlp) (Kaiming
uniform with a = √5) and B = 0, so the edit starts as the identity. Training: Adam (``lr``,
``weight_decay``) on every A and B for ``steps`` epochs over the requests in chunks of
``batch_size``, one step per chunk, on the teacher-forced NLL of the target tokens only (FT-M's
objective, :func:`edit.methods.ft.objective_loss` with ``"target_new"``): for a chunk,

    L = mean_i  −(1/m_i) Σ_j log P( o_ij | p_i, o_i1 .. o_i(j−1) )                              (2)

During training the adapter's input is dropped out, x ← dropout_p(x) in (1) only (PEFT's
``lora_dropout``; EasyEdit's freshly made adapter modules are in training mode), with a generator
seeded by ``Runtime.seed``. The edit itself has no dropout.

The edit is a :class:`LoRAAdapter` per layer, a :class:`edit.HookModule` that reads x at the key hook
and adds s·B A x at the MLP output hook: it stacks and reverts like every hooked edit, and no weight
of the model changes. ``merge=True`` returns the same change as a low-rank :class:`edit.WeightDelta`
per layer instead (ΔW = (s·B)(A), stored as its exact factors), which ``apply`` adds to W.

Defaults are EasyEdit's (``hparams/LoRA/*.yaml``): rank 8, α 32 (s = 4), lr 5e-3, no weight decay,
dropout 0.1, batch size 1, 70 epochs (Llama-2-7B, Llama-3-8B, Llama-3.2-3B; 60 for Qwen2.5-7B, 50
GPT-J, 30 GPT-2 XL), no early stop (EasyEdit's loss threshold is commented out).

How this differs from EasyEdit (``easyeditor/models/lora/lora_main.py``):

* Placement. EasyEdit adapts the attention's q and v projections of every layer (``target_modules:
  [q_proj, v_proj]``, ``layers: []``); here the MLP output projection of the located layers
  (``layers="auto"``: the causal-tracing peak; an int or a list for others), so that LoRA edits
  where the locate-then-edit methods do and compares with FT-M on the same parameters.
* Most of EasyEdit's LoRA files name ``lora_type: adalora``, which its pinned PEFT (0.18) refuses
  without a ``total_step`` (and, in older PEFT, trains an SVD-form adapter of rank ``init_r`` = 12
  with an orthogonality penalty, ignoring ``rank``). Only plain LoRA (its Qwen2.5 file) is implemented.
* The target's tokens are its continuation of the prompt (:meth:`locate.HookedLM.target_ids`);
  EasyEdit tokenises ``f"{prompt} {target}"``, a second space before a target that carries one.
* A batch's loss (2) averages each request's mean NLL; EasyEdit's Hugging Face loss averages all
  target tokens of the chunk (the same for its batch size of 1).
* The model's weights never change (EasyEdit wraps the model in PEFT and returns it edited).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from locate import resolve_layers
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError

from ..edit import Edit, HookModule, ReadAddModule, WeightDelta
from ..registry import Runtime, compute, register
from ..request import Request
from .ft import objective_loss


@dataclass
class LoRAHparams:
    """LoRA's hyper-parameters; defaults are EasyEdit's (``hparams/LoRA/llama-7b.yaml``, plain LoRA)."""

    layers: Any = "auto"  # layer spec (locate.resolve_layers); a list adapts each of those layers
    rank: int = 8  # r, the adapter's rank (EasyEdit: 8)
    lora_alpha: float = 32.0  # α; the adapter's output is scaled by s = α / r (EasyEdit: 32, s = 4)
    lora_dropout: float = 0.1  # dropout on the adapter's input while training (EasyEdit: 0.1)
    lr: float = 5e-3  # Adam learning rate (EasyEdit: 5e-3)
    weight_decay: float = 0.0  # Adam weight decay (EasyEdit: 0)
    steps: int = 70  # epochs over the requests (EasyEdit num_steps: 70 for the Llama files)
    batch_size: int = 1  # requests per Adam step (EasyEdit: 1)
    merge: bool = False  # False: LoRAAdapter hook modules; True: the same change as low-rank WeightDeltas

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name, positive in (("lora_alpha", True), ("lr", True), ("weight_decay", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise InvalidHparamsError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {v!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, numbers.Real) or not 0 <= self.lora_dropout < 1:
            raise InvalidHparamsError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.merge, bool):
            raise InvalidHparamsError(f"merge must be True or False, got {self.merge!r}")


# ====================================================================== the adapter
class LoRAAdapter(ReadAddModule):
    """A low-rank path s·B A beside one layer's MLP output projection, Eq. (1): reads the key x at
    ``key_hook`` and adds s·B A x to the output at ``out_hook`` at every position. ``A`` is (r, d_in),
    ``B`` (d_out, r). :meth:`delta` is the added output; a subclass may restrict where it is added
    (MELO's routed blocks)."""

    type_name = "lora-adapter"

    def __init__(self, layer: int, key_hook: str, out_hook: str, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise InvalidArgumentError(f"a LoRA adapter needs A (r, d_in) and B (d_out, r); got {tuple(A.shape)} and {tuple(B.shape)}")
        self.layer = int(layer)
        self.key_hook, self.out_hook = key_hook, out_hook
        self.scale = float(scale)
        self.register_buffer("A", A.detach().clone())
        self.register_buffer("B", B.detach().clone())
        self.dropout: tuple[float, torch.Generator] | None = None  # (p, generator) while training only

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def __repr__(self) -> str:
        return f"LoRAAdapter(layer={self.layer}, rank={self.rank}, scale={self.scale:g})"

    def config(self) -> dict:
        return {"layer": self.layer, "key_hook": self.key_hook, "out_hook": self.out_hook, "scale": self.scale}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "LoRAAdapter":
        return cls(config["layer"], config["key_hook"], config["out_hook"], tensors["A"], tensors["B"], config["scale"])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · B A x for keys x (..., d_in), in the adapter's dtype; dropout on x while training."""
        x = x.to(self.A.dtype)
        if self.dropout is not None and self.dropout[0] > 0:
            p, g = self.dropout
            keep = torch.rand(x.shape, generator=g, dtype=torch.float32).to(x.device) >= p
            x = x * keep.to(x.dtype) / (1 - p)
        return (x @ self.A.T) @ self.B.T * self.scale

    @property
    def in_hook(self) -> str:  # the keys' hook point (saved as ``key_hook``)
        return self.key_hook

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.delta(x).to(y.dtype)


def init_factors(d_in: int, d_out: int, rank: int, fan_in: int, generator: torch.Generator,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's initialisation: A ~ U(−1/√fan_in, 1/√fan_in) (Kaiming uniform, a = √5), B = 0."""
    bound = 1.0 / math.sqrt(fan_in)
    A = (torch.rand(rank, d_in, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    return A.to(dtype), torch.zeros(d_out, rank, dtype=dtype)


def trainable(module: LoRAAdapter) -> list[torch.nn.Parameter]:
    """Turn ``module``'s A and B into parameters (in place) and return them."""
    module.A = torch.nn.Parameter(module.A.detach().clone())
    module.B = torch.nn.Parameter(module.B.detach().clone())
    return [module.A, module.B]


def frozen(module: LoRAAdapter) -> LoRAAdapter:
    """A copy of ``module`` with its current A and B as plain tensors (no gradients, no dropout)."""
    return type(module).from_saved(module.config(), {k: t.detach().clone() for k, t in module.tensors().items()})


def attached(lm, modules: Sequence[HookModule]):
    """``lm.hooks`` context with every hook fn of ``modules`` (for training, outside any Edit)."""
    return lm.hooks([(name, (lambda x, hook, f=fn: f(x))) for m in modules for name, fn in m.hook_fns().items()])


def _store_dtype(lm) -> torch.dtype:
    return torch.promote_types(lm.dtype, torch.float32)


# ====================================================================== the method
@register("lora", LoRAHparams, batched=True, layers=1, smoke={"steps": 5},
          description="LoRA: low-rank adapters on the located MLP output projections, trained on the target tokens")
def compute_lora(lm, requests: list[Request], hp: LoRAHparams, rt: Runtime) -> Edit:
    """The LoRA edit of ``requests`` (module docstring), not applied: one :class:`LoRAAdapter` per
    layer, or low-rank :class:`edit.WeightDelta` s with ``merge=True``. The model's weights never change."""
    layers, reason = resolve_layers(lm, hp.layers, 1)
    dtype = _store_dtype(lm)
    g = torch.Generator().manual_seed(int(rt.seed))
    scale = hp.lora_alpha / hp.rank
    adapters = []
    for layer in layers:
        A, B = init_factors(lm.d_mlp, lm.d_model, hp.rank, lm.d_mlp, g, dtype)
        adapters.append(LoRAAdapter(layer, lm.hook_mlp_key(layer), lm.hook_mlp_out(layer), A.to(lm.device), B.to(lm.device), scale))
    params = [p for a in adapters for p in trainable(a)]
    drop_g = torch.Generator().manual_seed(int(rt.seed) + 1)
    for a in adapters:
        a.dropout = (float(hp.lora_dropout), drop_g)
    rows = [(lm.encode(r.rendered), lm.target_ids(r.target_new, r.rendered)) for r in requests]

    t0 = time.perf_counter()
    trace: list[float] = []
    with lm.eval_mode(), attached(lm, adapters):
        opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        for epoch in range(hp.steps):
            total = 0.0
            for s in range(0, len(rows), hp.batch_size):
                chunk = rows[s: s + hp.batch_size]
                opt.zero_grad()
                loss = objective_loss(lm, chunk, "target_new")  # Eq. (2)
                if not torch.isfinite(loss):
                    raise EditFailedError(f"LoRA loss became {loss.item()} in epoch {epoch}; the model is unchanged")
                loss.backward()
                opt.step()
                total += loss.item() * len(chunk)
            trace.append(total / len(rows))
            if rt.callback is not None:
                rt.callback({"method": "lora", "epoch": epoch, "loss": trace[-1]})
        for a in adapters:
            a.dropout = None
        with torch.no_grad():
            final = float(objective_loss(lm, rows, "target_new"))
    done = [frozen(a) for a in adapters]
    if not all(bool(torch.isfinite(t).all()) for a in done for t in a.tensors().values()):
        raise EditFailedError("LoRA produced non-finite adapter weights; the model is unchanged")
    if hp.merge:
        interventions = [WeightDelta(lm.weight_name(a.layer), left=(a.B * a.scale).cpu(), right=a.A.cpu()) for a in done]
    else:
        interventions = done
    return Edit("lora", list(requests), interventions, lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": list(layers)},
                timings={"total_s": time.perf_counter() - t0}, loss_trace=trace,
                metrics={"final_loss": final, "scale": scale,
                         "delta_norms": [float((a.B @ a.A).norm() * a.scale) for a in done]})


def lora(requests: Request | Sequence[Request], *, model=None, layer: Any = "auto", runtime: Runtime | None = None,
         **hparams) -> Edit:
    """The LoRA edit of ``requests`` at ``layer`` (a layer spec), computed and **not applied**."""
    return compute("lora", requests, model=model, runtime=runtime, layers=layer, **hparams)
