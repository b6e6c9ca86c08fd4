"""CaliNET: a calibration memory of extra FFN slots beside the last FFN (Dong et al., Findings of EMNLP
2022, "Calibrating Factual Knowledge in Pretrained Language Models").

CaliNET keeps every weight of the model. Beside the FFN of a layer l it adds a *calibration memory*
shaped like an FFN: n key slots K_c (d_model × n) and n value slots V_c (n × d_model). For the FFN's
input x at a position (the input of the MLP after its layer norm, ``blocks.l.mlp.hook_in``),

    FFN'(x) = FFN(x) + FFN_c(x),      FFN_c(x) = σ(x K_c) V_c                                    (1)

with σ the FFN's activation (ReLU in the paper's T5), and no biases. Only K_c and V_c are trained, on
the facts to calibrate, with the base model frozen: for requests with prompts p_i and target tokens
o_i1..o_im_i, teacher forced on p_i + o_i,

    L = − (1 / Σ_i m_i) Σ_i Σ_j log P( o_ij | p_i, o_i1 .. o_i(j−1) )                            (2)

the mean NLL over every target token of the batch (the reference's sequence-to-sequence cross entropy,
which averages the labels of a batch). A batch of requests is calibrated jointly by one memory, as the
paper calibrates its 100 or 1,000 facts at once.

Initialisation: the reference's extra ``nn.Linear`` layers keep PyTorch's default initialisation
(T5's weight initialisation does not reach them): K_c ~ U(−1/√d_model, 1/√d_model) and V_c ~
U(−1/√n, 1/√n), seeded by ``Runtime.seed``; the memory is not the identity before training.
Optimisation: Adafactor with a fixed learning rate (``scale_parameter=False, relative_step=False``,
no weight decay, constant schedule), gradient norm clipped to 1 (the Trainer's default), full batch.

Defaults, and where they come from (the reference's ``train_calinet/bash/t5_train_kb_f.sh`` with its
``run_kb_t5_freeze.py`` and ``src/trainer.py``, T5-base):

* ``layers=None``: the last layer. The reference extends decoder layer 11 of T5-base's 12 (``kb_layer``),
  the paper's "last FFN layers"; a list extends several (one memory each, all trained together);
* ``n_slots=64``: the reference's ``ex_size`` (the paper's 64 slots for 100 facts, about 0.1% extra
  parameters); scale it with the number of facts calibrated at once;
* ``lr=1e-2``: the reference's learning rate, with Adafactor as the reference's ``--adafactor True``;
* ``steps=5000``: the reference's ``max_steps``. The reference's steps are batches of 2,048 examples over
  its whole calibration set; here a step is one full-batch step over the requests. The loss of a
  single fact reaches ~0 long before; ``stop_loss`` ends training once (2) is below it (off by default,
  as in the reference, which trains for ``max_steps``).

How this differs from the reference code (dqxiu/CaliNet, T5 in PyTorch):

* Decoder-only models, teacher forced on prompt + target, instead of T5's encoder-decoder with the
  fact as a masked span; the loss is (2) on the target tokens only.
* One activation σ for every architecture (``activation``: ``"relu"``, the reference's T5-base; also
  ``"gelu"`` and ``"silu"``). The reference's gated variant (for T5's gated-GELU FFNs: two key
  matrices, one gating the other) is not implemented; Llama's and Qwen's gated FFNs get the plain
  FFN-shaped memory (1).
* The training data are the requests themselves; the reference trains on its calibration set, each
  fact in several ParaRel paraphrases (a request here has one prompt).
* Sequential edits each add their own memory of ``n_slots`` slots (the reference adds one memory
  once); a batch of requests shares one memory, as in the paper.
* The memory is a hook module (:class:`CalibrationMemory`) that reads x at the FFN input and adds
  FFN_c(x) at the FFN output, not an enlarged T5 layer, so the weights never change and reverting is
  bit-exact. Training runs the blocks from the lowest memory's layer on only (those below do not
  see the memory: their output is computed once), which gives the same numbers as full forwards.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from transformers.optimization import Adafactor

from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit, ReadAddModule
from ..registry import Runtime, compute, register
from ..request import Request
from .lora import attached
from .t_patcher import ffn_input_hook

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


@dataclass
class CaliNETHparams:
    """CaliNET's hyperparameters; defaults are the reference's (``t5_train_kb_f.sh``, T5-base, 100 facts)."""

    layers: Any = None  # None: the last layer (reference kb_layer 11 of T5-base's 12); an int or a list of layers
    n_slots: int = 64  # n, calibration slots per memory (reference ex_size: 64)
    activation: str = "relu"  # σ of (1) (reference: T5-base's ReLU); "gelu", "silu"
    lr: float = 1e-2  # Adafactor learning rate, constant (reference: 1e-2, --adafactor, constant schedule)
    steps: int = 5000  # full-batch training steps (reference max_steps: 5000)
    grad_clip: float = 1.0  # gradient norm clipping (reference: the HF Trainer's max_grad_norm 1.0)
    stop_loss: float | None = None  # stop once the loss (2) is below this (None: train all steps, as the reference)

    def __post_init__(self):
        if self.layers is not None:
            spec = [self.layers] if not isinstance(self.layers, (list, tuple)) else list(self.layers)
            if not spec or any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in spec):
                raise InvalidHparamsError(f"layers must be None (the last layer), an int or a non-empty list of ints, "
                                          f"got {self.layers!r}")
        for name in ("n_slots", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
                raise InvalidHparamsError(f"{name} must be a finite positive number, got {v!r}")
        if self.activation not in _ACTIVATIONS:
            raise InvalidHparamsError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.stop_loss is not None and (isinstance(self.stop_loss, bool) or not isinstance(self.stop_loss, numbers.Real)
                                           or not math.isfinite(self.stop_loss) or self.stop_loss < 0):
            raise InvalidHparamsError(f"stop_loss must be None or a finite non-negative number, got {self.stop_loss!r}")


# ====================================================================== the memory
class CalibrationMemory(ReadAddModule):
    """A calibration memory at one layer, Eq. (1): keys K_c (d_model, n), values V_c (n, d_model) and the
    activation σ; reads the FFN input x at ``in_hook`` and adds σ(x K_c) V_c to the FFN output at
    ``out_hook`` at every position."""

    type_name = "calinet-memory"

    def __init__(self, layer: int, in_hook: str, out_hook: str, keys: torch.Tensor, values: torch.Tensor,
                 activation: str = "relu"):
        super().__init__()
        if keys.ndim != 2 or values.ndim != 2 or keys.shape[1] != values.shape[0] or keys.shape[0] != values.shape[1]:
            raise InvalidArgumentError(f"a calibration memory needs keys (d_model, n) and values (n, d_model); got "
                                       f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if activation not in _ACTIVATIONS:
            raise InvalidArgumentError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
        self.layer = int(layer)
        self.in_hook, self.out_hook = in_hook, out_hook
        self.activation = activation
        self.register_buffer("keys", keys.detach().clone())
        self.register_buffer("values", values.detach().clone())

    @property
    def n_slots(self) -> int:
        return int(self.keys.shape[1])

    def __repr__(self) -> str:
        return f"CalibrationMemory(layer={self.layer}, slots={self.n_slots}, activation={self.activation})"

    def config(self) -> dict:
        return {"layer": self.layer, "in_hook": self.in_hook, "out_hook": self.out_hook, "activation": self.activation}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "CalibrationMemory":
        return cls(config["layer"], config["in_hook"], config["out_hook"], tensors["keys"], tensors["values"],
                   config["activation"])

    def slot_activations(self, x: torch.Tensor) -> torch.Tensor:
        """σ(x K_c) for FFN inputs x (..., d_model): (..., n), in the memory's dtype."""
        return _ACTIVATIONS[self.activation](x.to(self.keys.dtype) @ self.keys)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """FFN_c(x) = σ(x K_c) V_c, Eq. (1), in the memory's dtype."""
        return self.slot_activations(x) @ self.values

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.output(x).to(y.dtype)


def init_memory(d_model: int, n_slots: int, generator: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's ``nn.Linear`` initialisation of the reference's extra layers: K_c ~ U(±1/√d_model),
    V_c ~ U(±1/√n) (Kaiming uniform, a = √5: the bound is 1/√fan_in)."""
    keys = (torch.rand(d_model, n_slots, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(d_model)
    values = (torch.rand(n_slots, d_model, generator=generator, dtype=torch.float32) * 2 - 1) / math.sqrt(n_slots)
    return keys.to(dtype), values.to(dtype)


def _layers(lm, hp: CaliNETHparams) -> tuple[list[int], str]:
    if hp.layers is None:
        return [lm.n_layers - 1], f"layer {lm.n_layers - 1}: the last FFN (CaliNET calibrates the last FFN layers)"
    spec = [hp.layers] if not isinstance(hp.layers, (list, tuple)) else list(hp.layers)
    layers = sorted({lm.check_layer(x) for x in spec})
    return layers, f"layers {layers}: chosen by the caller"


# ====================================================================== the method
@register("calinet", CaliNETHparams, batched=True, layers=None, smoke={"steps": 40, "n_slots": 8},
          description="CaliNET: a trained memory of extra FFN key-value slots beside the last FFN, weights frozen "
                      "(Dong et al. 2022)")
def compute_calinet(lm, requests: list[Request], hp: CaliNETHparams, rt: Runtime) -> Edit:
    """The CaliNET edit of ``requests`` (module docstring), not applied: one :class:`CalibrationMemory`
    per layer, trained jointly on the batch with (2). The model's weights never change."""
    layers, reason = _layers(lm, hp)
    dtype = torch.promote_types(lm.dtype, torch.float32)
    g = torch.Generator().manual_seed(int(rt.seed))
    memories = []
    for layer in layers:
        K, V = init_memory(lm.d_model, hp.n_slots, g, dtype)
        memories.append(CalibrationMemory(layer, ffn_input_hook(lm, layer), lm.hook_mlp_out(layer), K.to(lm.device),
                                          V.to(lm.device), hp.activation))
    params = []
    for m in memories:
        m.keys = torch.nn.Parameter(m.keys.detach().clone())
        m.values = torch.nn.Parameter(m.values.detach().clone())
        params += [m.keys, m.values]

    # the training rows: prompt + target, teacher forced; (row, position, token) of every target token
    prompts = [lm.encode(r.rendered) for r in requests]
    targets = [lm.target_ids(r.target_new, r.rendered) for r in requests]
    batch = lm.pad([p + o for p, o in zip(prompts, targets)])
    rows = torch.cat([torch.full((len(o),), b, dtype=torch.long) for b, o in enumerate(targets)]).to(lm.device)
    pos = torch.cat([torch.arange(len(p) - 1, len(p) - 1 + len(o)) for p, o in zip(prompts, targets)]).to(lm.device)
    gold = torch.as_tensor([t for o in targets for t in o], device=lm.device)

    def loss_fn() -> torch.Tensor:  # (2): the mean NLL over every target token of the batch
        with capture(lm, "unembed.hook_in", detach=False) as final:
            lm.forward(batch)
        h = final["unembed.hook_in"][rows, pos]
        logits = lm.bridge.unembed(h[None])[0].to(lm.device)
        return -torch.log_softmax(logits.float(), -1).gather(1, gold[:, None]).mean()

    # blocks below the lowest memory do not see it: their output is computed once
    first = layers[0]
    t0 = time.perf_counter()
    with torch.no_grad(), capture(lm, lm.hook_resid_pre(first)) as below:
        lm.forward(batch)
    trace: list[float] = []
    stopped_at = None
    with lm.eval_mode(), lm.start_at_block(first, below[lm.hook_resid_pre(first)]), attached(lm, memories):
        opt = Adafactor(params, lr=hp.lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=0.0)
        for step in range(hp.steps):
            opt.zero_grad()
            loss = loss_fn()
            if not torch.isfinite(loss):
                raise EditFailedError(f"CaliNET loss became {loss.item()} at step {step}; the model is unchanged")
            trace.append(float(loss.detach()))
            if hp.stop_loss is not None and trace[-1] < hp.stop_loss:
                stopped_at = step
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            opt.step()
            if rt.callback is not None and (step + 1) % 100 == 0:
                rt.callback({"method": "calinet", "step": step + 1, "loss": trace[-1]})
        with torch.no_grad():
            final_loss = float(loss_fn())
    done = [CalibrationMemory(m.layer, m.in_hook, m.out_hook, m.keys.detach(), m.values.detach(), m.activation)
            for m in memories]
    if not all(bool(torch.isfinite(t).all()) for m in done for t in m.tensors().values()):
        raise EditFailedError("CaliNET produced a non-finite memory; the model is unchanged")
    return Edit("calinet", list(requests), done, lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": list(layers)},
                timings={"total_s": time.perf_counter() - t0}, loss_trace=trace,
                metrics={"steps": len(trace), "stopped_at": stopped_at, "final_loss": final_loss,
                         "n_slots": hp.n_slots, "extra_parameters": sum(2 * lm.d_model * hp.n_slots for _ in done)})


def calinet(requests: Request | Sequence[Request], *, model=None, layers: Any = None, runtime: Runtime | None = None,
            **hparams) -> Edit:
    """The CaliNET edit of ``requests`` (a memory beside the FFN of ``layers``, default the last), **not applied**."""
    return compute("calinet", requests, model=model, runtime=runtime, layers=layers, **hparams)
