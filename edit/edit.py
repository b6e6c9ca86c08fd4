"""`Edit`: a reversible, portable change to a model, whatever the editing method.

An edit is an ordered stack of *interventions* of three kinds:

* :class:`WeightDelta` — a change to any named parameter (``lm.parameter(name)``), dense or as exact
  low-rank factors ``left @ right`` (ROME's update is rank one, MEMIT's rank B);
* :class:`HookModule` — a module attached at TransformerLens hook points (a GRACE codebook, an
  adapter, an added neuron, a router). It sees the activations at its hook points and may replace
  them; where it returns its input unchanged the model computes exactly what it computed before;
* :class:`InputTransform` — text placed before every prompt the model reads (IKE's demonstrations,
  a retrieved memory).

Every prompt the toolkit runs goes through :meth:`locate.HookedLM.encode`, every forward through the
model's modules and hook points, so prediction, teacher-forced scoring, generation, tracing and every
metric see an applied edit the same way, whatever its kinds.

Reverting does not subtract a delta (floating-point addition does not undo itself exactly):
``apply`` keeps a copy of each parameter it touches and ``revert`` writes it back, removes the hooks
and the transforms, so the model returns to what it was bit for bit. The applied edits of a model
form a stack (``lm.applied_edits``): they revert in reverse order of application.

Identity. ``fingerprint`` is the fingerprint of the weights the edit was computed on and
``parents`` the ids of the edits that were applied then, oldest first. ``apply`` refuses a model
with other weights, and a model on which those parents are not applied in that order (an edit
computed on top of another means nothing without it). ``id`` is a digest of the edit's content.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from locate import resolve_model
from locate.errors import (
    CacheCorruptedError,
    EditStateError,
    FingerprintMismatchError,
    InvalidEditError,
    LocateEditError,
    NonFiniteEditError,
)

from .request import Request

_FORMAT = "locate-edit/edit/2"
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _BLOCK.match(name)
    return None if m is None else int(m.group(1))


# ====================================================================== interventions
@dataclass
class WeightDelta:
    """The change to one parameter, in the orientation :meth:`locate.HookedLM.parameter` gives it:
    either ``dense`` or ``left @ right``. ``param`` is the parameter's name; an int ``L`` is shorthand
    for ``blocks.L.mlp.out.weight``, the MLP output projection as (d_model, d_mlp)."""

    param: str | int
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None  # (d_out, r)
    right: torch.Tensor | None = None  # (r, d_in)
    kind: ClassVar[str] = "weight"

    def __post_init__(self):
        if isinstance(self.param, bool) or not isinstance(self.param, (str, numbers.Integral)):
            raise InvalidEditError(f"a WeightDelta's param is a parameter name or an int layer, got "
                                   f"{type(self.param).__name__} {self.param!r}")
        if not isinstance(self.param, str):
            self.param = f"blocks.{int(self.param)}.mlp.out.weight"
        if (self.dense is None) == (self.left is None or self.right is None):
            raise InvalidEditError("a WeightDelta is either dense or a pair of low-rank factors")
        given = {k: t for k, t in (("dense", self.dense), ("left", self.left), ("right", self.right)) if t is not None}
        for k, t in given.items():  # dense: the parameter's shape (a bias is 1-D); factors: matrices
            if not isinstance(t, torch.Tensor) or t.ndim < 1 or (k != "dense" and t.ndim != 2):
                raise InvalidEditError(f"{self.param}: {k} must be a {'' if k == 'dense' else '2-D '}tensor, got "
                                       f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if self.dense is None and self.left.shape[1] != self.right.shape[0]:
            raise InvalidEditError(f"{self.param}: low-rank factors of shapes {tuple(self.left.shape)} and "
                                   f"{tuple(self.right.shape)} do not chain (left is (d_out, r), right (r, d_in))")

    @classmethod
    def compact(cls, param: str | int, matrix: torch.Tensor, rank: int | None = None) -> "WeightDelta":
        """Store ``matrix`` densely, or as exact low-rank factors when ``rank`` is given and smaller."""
        d_out, d_in = matrix.shape
        if rank is not None and rank * (d_out + d_in) < d_out * d_in:
            U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
            return cls(param, left=(U[:, :rank] * S[:rank]).to(matrix.dtype), right=Vh[:rank].to(matrix.dtype))
        return cls(param, dense=matrix)

    def matrix(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.left @ self.right

    @property
    def name(self) -> str:
        return self.param

    @property
    def layer(self) -> int | None:
        return _layer_of(self.param)

    @property
    def rank(self) -> int | None:
        return None if self.left is None else int(self.left.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.dense.shape) if self.dense is not None else (self.left.shape[0], self.right.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.dense is not None:
            return {"dense": self.dense}
        return {"left": self.left, "right": self.right}

    def config(self) -> dict:
        return {"param": self.param}


class _Registered:
    """Hook modules and input transforms are rebuilt from a saved file by their registered type name."""

    registry: ClassVar[dict[str, type]]
    type_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("type_name"):
            cls.registry[cls.type_name] = cls

    def config(self) -> dict:
        """JSON-able settings that, with :meth:`tensors`, rebuild this object (:meth:`from_saved`)."""
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, torch.Tensor]):
        raise NotImplementedError


class HookModule(torch.nn.Module, _Registered):
    """A module attached at hook points. Subclasses set ``type_name`` and implement
    :meth:`hook_fns`: ``{hook point name: fn(activation) -> activation}``. A hook fn that returns its
    argument itself leaves the forward bit-identical; one that returns a new tensor replaces it."""

    registry: ClassVar[dict[str, type]] = {}
    kind: ClassVar[str] = "hook"

    def hook_fns(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    @property
    def hook_points(self) -> list[str]:
        return list(self.hook_fns())


class ReadAddModule(HookModule):
    """A module beside a sublayer: it reads the activation x at hook point ``in_hook`` and adds its own
    output for x at hook point ``out_hook``, at the same positions (LoRA's adapters, T-Patcher's neurons,
    CaliNET's memory). Subclasses set ``in_hook`` and ``out_hook`` and implement :meth:`add_to`. A forward
    whose two activations do not line up position for position (or that never passed ``in_hook``)
    leaves the output as it is: the very tensor, bit-identical."""

    in_hook: str
    out_hook: str
    _x: torch.Tensor | None = None  # the activation read, until the add consumes it

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The output at ``out_hook`` given the activation ``x`` read at ``in_hook`` (same positions)."""
        raise NotImplementedError

    def take_read(self) -> torch.Tensor | None:
        """The activation read at ``in_hook`` by this forward, consumed (None if none was)."""
        x, self._x = self._x, None
        return x

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return x

    def _add(self, y: torch.Tensor) -> torch.Tensor:
        x = self.take_read()
        if x is None or x.shape[:-1] != y.shape[:-1]:
            return y
        return self.add_to(x, y)

    def hook_fns(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {self.in_hook: self._read, self.out_hook: self._add}


class InputTransform(_Registered):
    """Text placed before a prompt. Subclasses set ``type_name`` and implement :meth:`prefix`."""

    registry: ClassVar[dict[str, type]] = {}
    kind: ClassVar[str] = "input"

    def prefix(self, prompt: str) -> str:
        raise NotImplementedError

    def __call__(self, prompt: str) -> str:
        return self.prefix(prompt) + prompt


class PrefixText(InputTransform):
    """The same text before every prompt (IKE's demonstrations and new fact)."""

    type_name = "prefix-text"

    def __init__(self, text: str):
        self.text = text

    def prefix(self, prompt: str) -> str:
        return self.text

    def config(self) -> dict:
        return {"text": self.text}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["text"])

    def __repr__(self) -> str:
        return f"PrefixText({len(self.text)} chars)"


Intervention = WeightDelta | HookModule | InputTransform


# ====================================================================== the edit
@dataclass(eq=False)
class Edit:
    """A reversible, portable model edit with the numbers needed to report it."""

    method: str
    requests: list[Request]
    interventions: list[Any]
    fingerprint: str
    model_name: str = ""
    layer_reason: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    loss_trace: list[Any] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    parents: list[str] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # saved with the edit (e.g. AlphaEdit's keys)
    _backup: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _handles: list | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)
    _id: str | None = field(default=None, repr=False)

    def __post_init__(self):
        for iv in self.interventions:
            if not isinstance(iv, (WeightDelta, HookModule, InputTransform)):
                raise InvalidEditError(f"an intervention is a WeightDelta, HookModule or InputTransform, not {type(iv).__name__}")

    # ------------------------------------------------------------------ views
    @property
    def deltas(self) -> list[WeightDelta]:
        return [iv for iv in self.interventions if isinstance(iv, WeightDelta)]

    @property
    def hook_modules(self) -> list[HookModule]:
        return [iv for iv in self.interventions if isinstance(iv, HookModule)]

    @property
    def input_transforms(self) -> list[InputTransform]:
        """Read by :meth:`locate.HookedLM.transform` while the edit is applied."""
        return [iv for iv in self.interventions if isinstance(iv, InputTransform)] if self.is_applied else []

    @property
    def kinds(self) -> list[str]:
        return sorted({iv.kind for iv in self.interventions})

    @property
    def layers(self) -> list[int]:
        names = [d.param for d in self.deltas] + [h for m in self.hook_modules for h in m.hook_points]
        return sorted({l for l in map(_layer_of, names) if l is not None})

    @property
    def is_applied(self) -> bool:
        return self._model is not None

    @property
    def id(self) -> str:
        """A digest of what the edit does: method, base model, parents, interventions and their tensors."""
        if self._id is None:
            h = hashlib.sha256()
            h.update(json.dumps({"method": self.method, "fingerprint": self.fingerprint, "parents": self.parents,
                                 "interventions": self._layout()}, sort_keys=True, default=str).encode())
            for _, t in sorted(self._tensors().items()):
                h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._id = h.hexdigest()[:16]
        return self._id

    def __repr__(self) -> str:
        reqs = ", ".join(f"{r.subject!r}→{r.target_new!r}" for r in self.requests[:3])
        more = f" (+{len(self.requests) - 3})" if len(self.requests) > 3 else ""
        return (f"Edit({self.method}, {'+'.join(self.kinds) or 'empty'}, layers={self.layers}, "
                f"requests=[{reqs}{more}], applied={self.is_applied})")

    # ------------------------------------------------------------------ checks
    def check_model(self, lm) -> None:
        """Refuse a model with other weights, one that lacks this edit's parents, a parameter this
        edit does not fit, or non-finite tensors. Raises before anything is changed."""
        if lm.fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"this edit was made for model {self.model_name!r} (fingerprint {self.fingerprint}); "
                f"refusing to apply it to {lm.name!r} (fingerprint {lm.fingerprint})")
        applied = [e.id for e in lm.applied_edits]
        if applied[: len(self.parents)] != self.parents:
            raise FingerprintMismatchError(
                f"this edit was computed on top of the edits {self.parents}, which are not the first edits "
                f"applied to the model (applied: {applied}); apply those first")
        for d in self.deltas:
            try:
                W = lm.parameter(d.param)
            except (KeyError, LocateEditError) as e:
                raise FingerprintMismatchError(f"the model has no parameter {d.param!r}") from e
            if tuple(W.shape) != d.shape:
                raise FingerprintMismatchError(f"delta for {d.param} has shape {d.shape}, the model's {tuple(W.shape)}")
        for m in self.hook_modules:
            missing = [h for h in m.hook_points if h not in lm.bridge.hook_dict]
            if missing:
                raise FingerprintMismatchError(f"the model has no hook point(s) {missing}")
        for name, t in self._tensors().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteEditError(f"refusing to apply {self!r}: tensor {name} is not finite")

    # ------------------------------------------------------------------ apply / revert
    @torch.no_grad()
    def apply(self, model=None) -> "Edit":
        """Add the deltas, attach the hook modules and the input transforms. Returns ``self``."""
        lm = resolve_model(model)
        if self.is_applied:
            raise EditStateError(f"{self!r} is already applied")
        self.check_model(lm)
        backup: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for d in self.deltas:
                W = lm.parameter(d.param)
                backup.setdefault(d.param, W.clone())
                W.add_(d.matrix().to(device=W.device, dtype=W.dtype))
            for name, w in backup.items():  # finite factors can still overflow in the model's dtype
                if bool(torch.isfinite(w).all()) and not bool(torch.isfinite(lm.parameter(name)).all()):
                    raise NonFiniteEditError(f"refusing to apply {self!r}: {name} would not be finite in "
                                             f"{w.dtype} once the delta is added (overflow); the model is unchanged")
            for m in self.hook_modules:
                home = _hook_device(lm, m.hook_points[0]) if m.hook_points else lm.device
                m.to(home)  # on the device of the block it hooks (the first, if its hook points span devices)
                for name, fn in m.hook_fns().items():
                    handles.append(lm.bridge.hook_dict[name].register_forward_hook(_as_forward_hook(fn, home)))
        except BaseException:
            for h in handles:
                h.remove()
            for name, w in backup.items():
                lm.parameter(name).copy_(w)
            raise
        self._backup, self._handles, self._model = backup, handles, lm
        lm.applied_edits.append(self)
        return self

    @torch.no_grad()
    def revert(self, model=None) -> "Edit":
        """Restore the parameters, detach the hooks and transforms: bit-exact. Edits revert in reverse order."""
        lm = resolve_model(model) if model is not None else self._model
        if not self.is_applied:
            raise EditStateError(f"{self!r} is not applied")
        if lm is not self._model:
            raise EditStateError("this edit was applied to a different model object")
        stack = lm.applied_edits
        if not stack or stack[-1] is not self:
            raise EditStateError("edits must be reverted in reverse order of application; "
                                 f"the last applied is {stack[-1]!r}" if stack else "no edit is applied")
        for name, w in self._backup.items():
            lm.parameter(name).copy_(w)
        for h in self._handles:
            h.remove()
        stack.pop()
        self._backup, self._handles, self._model = None, None, None
        return self

    # ------------------------------------------------------------------ persistence
    def _layout(self) -> list[dict]:
        out = []
        for iv in self.interventions:
            entry = {"kind": iv.kind, "config": iv.config()}
            if not isinstance(iv, WeightDelta):
                entry["type"] = iv.type_name
            out.append(entry)
        return out

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, iv in enumerate(self.interventions):
            for k, t in iv.tensors().items():
                out[f"{i}/{k}"] = t
        for k, t in self.state.items():
            out[f"state/{k}"] = t
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "method": self.method, "model_name": self.model_name,
            "fingerprint": self.fingerprint, "parents": self.parents, "id": self.id,
            "requests": [r.to_dict() for r in self.requests], "interventions": self._layout(),
            "layers": self.layers, "layer_reason": self.layer_reason, "hparams": self.hparams,
            "timings": self.timings, "loss_trace": self.loss_trace, "metrics": self.metrics, "created": self.created,
        }

    def save(self, path: str | Path) -> Path:
        """Write the tensors as safetensors, with the metadata (JSON) and the tensors' SHA-256 in its header."""
        path = Path(path)
        tensors = {k: t.detach().contiguous().cpu() for k, t in self._tensors().items()}
        meta = self.metadata()
        meta["sha256"] = _digest(tensors)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"locate_edit": json.dumps(meta, default=str)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> "Edit":
        """Read an edit saved with :meth:`save`; a damaged file raises :class:`CacheCorruptedError`.
        With ``model``, also refuse it unless it fits that model (:meth:`check_model`)."""
        path = Path(path)
        if not path.is_file():
            raise CacheCorruptedError(f"no edit file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["locate_edit"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CacheCorruptedError(f"{path} is not a readable locate-edit edit file: {e}") from e
        if meta.get("format") != _FORMAT:
            raise CacheCorruptedError(f"{path}: unknown edit format {meta.get('format')!r} (expected {_FORMAT})")
        if meta.get("sha256") != _digest(tensors):
            raise CacheCorruptedError(f"{path}: the tensor data does not match its checksum (the file is damaged)")
        try:
            interventions = []
            for i, entry in enumerate(meta["interventions"]):
                own = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.split("/", 1)[0] == str(i)}
                if entry["kind"] == "weight":
                    interventions.append(WeightDelta(entry["config"]["param"], **own))
                else:
                    base = HookModule if entry["kind"] == "hook" else InputTransform
                    if entry["type"] not in base.registry:
                        raise CacheCorruptedError(f"{path}: unknown {entry['kind']} type {entry['type']!r} "
                                                  "(is the method that made it installed?)")
                    interventions.append(base.registry[entry["type"]].from_saved(entry["config"], own))
            state = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("state/")}
            e = cls(meta["method"], [Request.from_dict(r) for r in meta["requests"]], interventions,
                    meta["fingerprint"], meta.get("model_name", ""), meta.get("layer_reason", ""),
                    meta.get("hparams", {}), meta.get("timings", {}), meta.get("loss_trace", []),
                    meta.get("metrics", {}), meta.get("created", ""), list(meta.get("parents", [])), state)
        except CacheCorruptedError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, LocateEditError) as err:
            raise CacheCorruptedError(f"{path}: malformed edit file ({type(err).__name__}: {err})") from err
        if e.id != meta.get("id"):
            raise CacheCorruptedError(f"{path}: the edit's content does not match its recorded id")
        if model is not None:
            e.check_model(resolve_model(model))
        return e


def _hook_device(lm, hook_name: str) -> torch.device:
    """The device whose activations a hook point sees: its block's, or the input device outside blocks."""
    layer = _layer_of(hook_name)
    return lm.device if layer is None else lm.layer_device(layer)


def _as_forward_hook(fn, home: torch.device):
    """``fn`` as a forward hook. An activation on another device than the hook module's (``home``: a
    module whose hook points span blocks on several devices) is run through ``fn`` on ``home`` and the
    result moved back; an ``fn`` that returns its argument still leaves the forward bit-identical."""
    def hook(module, inputs, output):
        if output.device == home:
            return fn(output)
        moved = output.to(home)
        version = moved._version  # bumped by any in-place change fn makes
        result = fn(moved)
        return output if result is moved and moved._version == version else result.to(output.device)
    return hook


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def applied(model, *edits: Edit):
    """``with applied(lm, e1, e2): ...`` applies the edits in order and reverts them in reverse order."""
    done = []
    try:
        for e in edits:
            done.append(e.apply(model))
        yield model
    finally:
        for e in reversed(done):
            e.revert(model)
