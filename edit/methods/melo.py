"""MELO: dynamic LoRA blocks indexed by a vector database of edit keys (Yu et al., AAAI 2024).

MELO keeps every weight. Each edit trains one small LoRA *block* (rank r_b) on the MLP output
projections of the edited layers, and stores in a vector database the *keys* of its requests (the
query at the key layer) with a radius, as in GRACE. At inference, for every position t with query q_t
(the MLP pre-activation of the key layer, ``blocks.K.mlp.hook_pre``; GPT-2's ``c_fc`` output, as in
MELO), the nearest key i is looked up (Euclidean); if ‖q_t − k_i‖ ≤ ε_i the block of that key is
active at t on every edited layer l:

    h_l = W_l x + b_l + s · B_b A_b x       (block b active at t)
    h_l = W_l x + b_l                        (no key within its radius: the base model, bit-identical)

Where no position of a batch is in any ball the hooks return their input tensors themselves.

Keys and radii follow GRACE's codebook rules (:func:`edit.methods.grace.build_entries`, with
ε_init = ``init_radius``): a new key out of reach of the others gets ε_init; a key near one of
another label splits the distance (d/2); a key near one of the same label widens that ball
(``expand="moving_average"``: MELO's ``moving_avg``, the older key also moves half way; or
``"coverage"``). All the entries of one edit point to its one block, as in MELO, where each edit
(batch) gets the next free block.

Block parameters (MELO's ``peft_egg`` MELO layers): the whole LoRA has rank r = ``num_block``·r_b and
α = r; a block is r_b of its ranks, scaled by √(r/r_b) on each factor, so its output scale is
s = (α/r)·(r/r_b) = ``num_block`` (350 with MELO's defaults); A_b is initialised U(−1/√r, 1/√r)
(Kaiming uniform over the whole rank, fan-in r), B_b = 0. Training: Adam (``edit_lr`` 1e-3) with a
step schedule (×0.5 every 20 iterations) for ``n_iter`` (50) iterations on the target tokens'
teacher-forced NLL, with the block forced on at each request's key position.

Defaults are EasyEdit's ``hparams/MELO/gpt2-xl.yaml``: r_b = 2, 350 blocks, init_radius 0.5,
moving-average expansion, 50 iterations, lr 1e-3, two adapted layers (``layers`` resolves a window of
2; MELO adapts layers 36 and 37 of GPT-2 XL's 48) keyed at the layer before them (35).

How this differs from the reference (EasyEdit ``easyeditor/models/melo``):

* The blocks adapt the MLP *output* projections (the :class:`edit.methods.lora.LoRAAdapter` of
  ``lora``); MELO adapts the MLP input projections (``c_fc``).
* ``key_layer=None`` keys at the first adapted layer's own MLP (its pre-activation is computed before
  the adapted output projection); pass ``key_layer`` = first layer − 1 for MELO's placement.
* Routing is per position, like GRACE here: the key is the prompt's last token, and the block acts at
  every position whose query is in a ball. MELO routes a whole sequence by the query at its last
  position (the last token of prompt + target during the edit) and applies the block to all of it.
* One MELO call makes one edit (one block) with its own keys; a later edit reads the keys of the
  MELO blocks already applied at the same key layer for the radius rules, but leaves them as they are
  (GRACE's rules against older codebooks). Blocks of different edits route independently, so where
  their balls overlap both are active; MELO shrinks the older cluster instead and keeps one active.
* MELO merges a same-label key into its cluster (centre = mean of the cluster's keys, radius = the
  largest distance, at least ε_init) and forgets keys a split leaves outside; here GRACE's update.
* The training loss averages each request's mean NLL (MELO: the mean over the batch's target tokens,
  the same for one request); MELO edits one request at a time.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from locate import resolve_layers
from locate.errors import EditFailedError, InvalidArgumentError, InvalidHparamsError
from locate.hooks import capture

from ..edit import Edit, HookModule
from ..registry import Runtime, compute, register
from ..request import Request
from .ft import objective_loss
from .grace import GRACEHparams, GraceCodebook, build_entries
from .lora import LoRAAdapter, attached, init_factors

EXPANDS = ("moving_average", "coverage")


@dataclass
class MELOHparams:
    """MELO's hyper-parameters; defaults are EasyEdit's ``hparams/MELO/gpt2-xl.yaml``."""

    layers: Any = "auto"  # layer spec of the adapted layers (a window of 2 for "auto"; MELO: 36, 37 of 48)
    key_layer: int | None = None  # layer whose MLP pre-activation is the key; None: the first adapted layer (MELO: 35)
    rank_per_block: int = 2  # r_b, ranks of one edit's block (MELO num_rank_per_block: 2)
    num_block: int = 350  # blocks of the whole LoRA: r = num_block · r_b, block scale s = num_block (MELO: 350)
    init_radius: float = 0.5  # ε_init of a new key, absolute, in key units (MELO init_radius: 0.5)
    expand: str = "moving_average"  # same-label key within reach: "moving_average" (MELO moving_avg) or "coverage"
    n_iter: int = 50  # Adam iterations training the block (MELO num_iter: 50)
    edit_lr: float = 1e-3  # Adam learning rate (MELO edit_lr: 1e-3)
    lr_step: int = 20  # the learning rate is multiplied by lr_gamma every lr_step iterations (MELO: 20)
    lr_gamma: float = 0.5  # (MELO: 0.5)

    def __post_init__(self):
        if self.key_layer is not None and (isinstance(self.key_layer, bool) or not isinstance(self.key_layer, numbers.Integral)):
            raise InvalidHparamsError(f"key_layer must be an int or None, got {self.key_layer!r}")
        for name in ("rank_per_block", "num_block", "n_iter", "lr_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidHparamsError(f"{name} must be a positive int, got {v!r}")
        for name, positive in (("init_radius", False), ("edit_lr", True), ("lr_gamma", True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise InvalidHparamsError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {v!r}")
        if self.expand not in EXPANDS:
            raise InvalidHparamsError(f"expand must be one of {EXPANDS}, got {self.expand!r}")


# ====================================================================== the routed block
class MeloBlock(HookModule):
    """One edit's LoRA block on several layers (:class:`LoRAAdapter` s), active only at positions whose
    query at ``key_hook`` lies within the radius of one of the edit's keys (``router``, a GRACE
    codebook holding keys, radii and labels; its values are empty)."""

    type_name = "melo-block"

    def __init__(self, key_layer: int, key_hook: str, router: GraceCodebook, adapters: Sequence[LoRAAdapter]):
        super().__init__()
        if not adapters:
            raise InvalidArgumentError("a MELO block adapts at least one layer")
        self.key_layer, self.key_hook = int(key_layer), key_hook
        self.router = router
        self.adapters = torch.nn.ModuleList(adapters)
        self.forced: torch.Tensor | None = None  # while training: the positions where the block is on
        self._on: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"MeloBlock(key_layer={self.key_layer}, keys={len(self.router)}, layers={[a.layer for a in self.adapters]}, "
                f"rank={self.adapters[0].rank})")

    def config(self) -> dict:
        return {"key_layer": self.key_layer, "key_hook": self.key_hook, "labels": list(self.router.labels),
                "adapters": [a.config() for a in self.adapters]}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "MeloBlock":
        router = GraceCodebook(config["key_layer"], config["key_hook"], config["key_hook"], tensors["router.keys"],
                               tensors["router.values"], tensors["router.radii"], config["labels"])
        adapters = [LoRAAdapter.from_saved(c, {"A": tensors[f"adapters.{i}.A"], "B": tensors[f"adapters.{i}.B"]})
                    for i, c in enumerate(config["adapters"])]
        return cls(config["key_layer"], config["key_hook"], router, adapters)

    # ------------------------------------------------------------------ hooks
    def route(self, query: torch.Tensor) -> torch.Tensor:
        """Whether the block is active at each position of ``query`` (..., d_key)."""
        return self.router.lookup(query)[0]

    def _route(self, q: torch.Tensor) -> torch.Tensor:
        self._on = self.forced if self.forced is not None else self.route(q)
        return q

    def _routed_add(self, adapter: LoRAAdapter) -> Callable[[torch.Tensor], torch.Tensor]:
        def add(y: torch.Tensor) -> torch.Tensor:
            x = adapter.take_read()
            on = self._on
            if x is None or on is None or on.shape != y.shape[:-1] or not bool(on.any()):
                return y  # not an edit here: the very tensor, bit-identical
            return torch.where(on[..., None], y + adapter.delta(x).to(y.dtype), y)
        return add

    def hook_fns(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        fns: dict[str, list[Callable]] = {self.key_hook: [self._route]}
        for a in self.adapters:
            fns.setdefault(a.key_hook, []).append(a._read)
            fns.setdefault(a.out_hook, []).append(self._routed_add(a))

        def chain(fs):
            def run(x):
                for f in fs:
                    x = f(x)
                return x
            return run
        return {name: (fs[0] if len(fs) == 1 else chain(fs)) for name, fs in fns.items()}


def key_hook_of(lm, layer: int) -> str:
    """MELO's key: the MLP pre-activation of ``layer`` (GPT-2's ``c_fc`` output)."""
    return f"blocks.{lm.check_layer(layer)}.mlp.hook_pre"


def _older_keys(lm, key_hook: str) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Keys, radii and labels of the MELO blocks already applied with the same key hook, oldest first."""
    keys, radii, labels = [], [], []
    for e in lm.applied_edits:
        for m in e.hook_modules:
            if isinstance(m, MeloBlock) and m.key_hook == key_hook and len(m.router):
                keys.append(m.router.keys.to(device=lm.device, dtype=torch.float64))
                radii.append(m.router.radii.to(device=lm.device, dtype=torch.float64))
                labels += m.router.labels
    if not keys:
        return None, None, []
    return torch.cat(keys), torch.cat(radii), labels


# ====================================================================== the method
@register("melo", MELOHparams, batched=True, layers=2, smoke={"n_iter": 5},
          description="MELO: a LoRA block per edit, active only where the input's key is near the edit's (Yu et al. 2024)")
def compute_melo(lm, requests: list[Request], hp: MELOHparams, rt: Runtime) -> Edit:
    """The MELO edit of ``requests`` (module docstring), not applied: one :class:`MeloBlock`. No weight changes."""
    layers, reason = resolve_layers(lm, hp.layers, 2)
    key_layer = lm.check_layer(layers[0] if hp.key_layer is None else hp.key_layer)
    if key_layer > layers[0]:
        raise InvalidHparamsError(f"key_layer {key_layer} comes after the first adapted layer {layers[0]}: the key "
                                  "must be read before the block acts")
    dtype = torch.promote_types(lm.dtype, torch.float32)
    key_hook = key_hook_of(lm, key_layer)
    t0 = time.perf_counter()

    # keys: the query at each prompt's last token; the radius rules against this edit's and older keys
    prompts = [lm.encode(r.rendered) for r in requests]
    rows = torch.arange(len(prompts), device=lm.device)
    with torch.no_grad():
        pb = lm.pad(prompts)
        with capture(lm, key_hook, keep=lambda s, x: x[rows, pb.last].clone()) as got:
            lm.forward(pb)
    older = _older_keys(lm, key_hook)
    book = build_entries(got[key_hook], [r.target_new for r in requests],
                         GRACEHparams(eps=hp.init_radius, eps_expand=hp.expand), older=older)
    n = len(book["labels"])
    router = GraceCodebook(key_layer, key_hook, key_hook, book["keys"].to(dtype), torch.zeros(n, 0, dtype=dtype),
                           book["radii"].to(dtype), book["labels"])

    # the block: r_b ranks of a rank-(num_block · r_b) LoRA with α = r; scale s = num_block
    total_rank = hp.num_block * hp.rank_per_block
    scale = float(hp.num_block)
    g = torch.Generator().manual_seed(int(rt.seed))
    adapters = []
    for layer in layers:
        A, B = init_factors(lm.d_mlp, lm.d_model, hp.rank_per_block, total_rank, g, dtype)
        adapters.append(LoRAAdapter(layer, lm.hook_mlp_key(layer), lm.hook_mlp_out(layer), A.to(lm.device), B.to(lm.device), scale))
    block = MeloBlock(key_layer, key_hook, router, adapters).to(lm.device)
    params = []
    for a in block.adapters:
        a.A = torch.nn.Parameter(a.A.detach().clone())
        a.B = torch.nn.Parameter(a.B.detach().clone())
        params += [a.A, a.B]

    # training: the block forced on at each request's key position (prompt's last token)
    train_rows = [(p, lm.target_ids(r.target_new, r.rendered)) for p, r in zip(prompts, requests)]
    tb = lm.pad([p + o for p, o in train_rows])
    forced = torch.zeros(tb.ids.shape, dtype=torch.bool, device=lm.device)
    forced[rows, torch.as_tensor([len(p) - 1 for p in prompts], device=lm.device)] = True
    block.forced = forced
    trace: list[float] = []
    with lm.eval_mode(), attached(lm, [block]):
        opt = torch.optim.Adam(params, lr=hp.edit_lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.lr_step, gamma=hp.lr_gamma)
        for it in range(hp.n_iter):
            opt.zero_grad()
            loss = objective_loss(lm, train_rows, "target_new")
            if not torch.isfinite(loss):
                raise EditFailedError(f"MELO loss became {loss.item()} at iteration {it}; the model is unchanged")
            loss.backward()
            opt.step()
            sched.step()
            trace.append(float(loss.detach()))
            if rt.callback is not None:
                rt.callback({"method": "melo", "iteration": it, "loss": trace[-1]})
        with torch.no_grad():
            final = float(objective_loss(lm, train_rows, "target_new"))
    done = MeloBlock.from_saved(block.config(), {k: t.detach().clone() for k, t in block.tensors().items()})
    if not all(bool(torch.isfinite(t).all()) for t in done.tensors().values()):
        raise EditFailedError("MELO produced a non-finite block; the model is unchanged")
    return Edit("melo", list(requests), [done], lm.fingerprint, lm.name, reason,
                hparams={**asdict(hp), "layers": list(layers), "key_layer": key_layer},
                timings={"total_s": time.perf_counter() - t0}, loss_trace=trace,
                metrics={"final_loss": final, "scale": scale, "n_keys": n, "radii": router.radii.tolist(),
                         "events": book["events"], "entry_of_request": book["entry_of"], "n_older_keys": len(older[2])})


def melo(requests: Request | Sequence[Request], *, model=None, layer: Any = "auto", runtime: Runtime | None = None,
         **hparams) -> Edit:
    """The MELO edit of ``requests`` on ``layer`` (a layer spec), computed and **not applied**."""
    return compute("melo", requests, model=model, runtime=runtime, layers=layer, **hparams)
