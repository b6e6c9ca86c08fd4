"""The editor protocol: how an editing method declares itself, and the one way everything calls it.

A method is one file under ``edit/methods/``. It defines a hyperparameter dataclass (the paper's
defaults, each field documented) and a function that computes an :class:`edit.Edit` **without
applying it**, and registers the pair with :func:`register`::

    @dataclass
    class ROMEHparams:
        layers: Any = "auto"          # a layer spec (locate.resolve_layers), one layer
        v_steps: int = 20             # ...

    @register("rome", ROMEHparams, batched=False, layers=1,
              description="ROME: rank-one update of one MLP (Meng et al. 2022)")
    def compute_rome(lm, requests, hp: ROMEHparams, rt: Runtime) -> Edit: ...

The harness (``edit.eval``), sequential editing, the layer sweep, the command line and the bench
scripts only ever go through :func:`get_method`, :func:`compute` and :func:`write`; nothing outside a
method's own file branches on its name.

``layers`` says how many layers the method edits: ``None`` (it chooses none, e.g. IKE), an int ``n``
(a layer spec resolves to ``n`` layers; ROME is 1), or ``"window"`` (``n`` is the hyperparameter
``n_layers``, MEMIT). The spec lives in the hyperparameter ``layers`` and is resolved by
:func:`locate.resolve_layers`, the one place that turns ``"auto"``, ints, lists, profiles and traces
into layers.

Run-time knobs that are not hyperparameters (the statistics corpus, progress bars, the seed, caches
shared between the edits of one run) travel in a :class:`Runtime`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from locate import resolve_layers, resolve_model
from locate.errors import InvalidHparamsError, MethodNotAvailableError

from .edit import Edit
from .request import InvalidRequestError, Request


@dataclass
class Runtime:
    """What a method may use besides its hyperparameters.

    ``corpus``: text for key statistics (``None``: the packaged WikiText-2 head; a path, an iterable of
    strings, ``"hf:..."`` or ``"model-samples"``; see :mod:`edit.stats`); ``stats``: precomputed ``{layer: KeyStats}``;
    ``progress``: show progress bars; ``seed``: for anything sampled; ``cache``: a dict a method may
    fill with things worth keeping across the edits of one run (projections, retrieval indices);
    ``data_dir``: where datasets live (IKE's demonstration pool); ``callback``: progress records."""

    corpus: Any = None
    stats: dict | None = None
    progress: bool = False
    seed: int = 0
    cache: dict = field(default_factory=dict)
    data_dir: Any = None
    callback: Callable[[dict], None] | None = None  # called with a progress record (e.g. MEMIT's per layer)


@dataclass(frozen=True)
class EditMethod:
    """A registered editing method (see the module docstring)."""

    name: str
    hparams: type
    compute_fn: Callable[..., Edit]
    batched: bool
    layers: int | str | None
    description: str
    smoke: dict  # cheap hyperparameters for tests on tiny models (few optimisation steps)
    module: str

    def make_hparams(self, overrides: dict | None = None, base: Any = None):
        """The hyperparameter dataclass with ``overrides``; an unknown name is refused with the list."""
        overrides = dict(overrides or {})
        names = {f.name for f in dataclasses.fields(self.hparams)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidHparamsError(f"{self.name} has no hyperparameter(s) {unknown}; it has {sorted(names)}")
        base = base if base is not None else self.hparams()
        try:
            return dataclasses.replace(base, **overrides)
        except (TypeError, ValueError) as e:
            raise InvalidHparamsError(f"{self.name}: {e}") from e

    def n_layers(self, hp) -> int | None:
        if self.layers is None:
            return None
        return int(getattr(hp, "n_layers")) if self.layers == "window" else int(self.layers)

    def resolve_layers(self, lm, hp) -> tuple[list[int] | None, str]:
        """The layers this method edits under ``hp`` (its ``layers`` spec resolved), and why."""
        if self.layers is None:
            return None, ""
        return resolve_layers(lm, getattr(hp, "layers"), self.n_layers(hp))

    def pin(self, lm, hp):
        """``hp`` with its layer spec replaced by the layers it resolves to now, and the reason. A run's
        settings then name the layers it edits, so resuming after ``"auto"`` would pick other layers
        fails instead of mixing layers in one table."""
        layers, reason = self.resolve_layers(lm, hp)
        if layers is None:
            return hp, reason
        return dataclasses.replace(hp, layers=list(layers)), reason


_REGISTRY: dict[str, EditMethod] = {}


def register(name: str, hparams: type, *, batched: bool, layers: int | str | None, description: str,
             smoke: dict | None = None) -> Callable:
    """Decorator: register ``fn(lm, requests, hp, rt) -> Edit`` (unapplied) as method ``name``."""
    if name != name.lower() or not name:
        raise ValueError(f"method names are lower case, got {name!r}")
    if not dataclasses.is_dataclass(hparams):
        raise TypeError(f"{name}: hparams must be a dataclass")
    if layers is not None and "layers" not in {f.name for f in dataclasses.fields(hparams)}:
        raise TypeError(f"{name}: a method that edits layers has a 'layers' hyperparameter")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].module != fn.__module__:
            raise ValueError(f"editing method {name!r} is already registered by {_REGISTRY[name].module}")
        _REGISTRY[name] = EditMethod(name, hparams, fn, batched, layers, description, dict(smoke or {}), fn.__module__)
        return fn
    return deco


def methods() -> dict[str, str]:
    """The registered method names, each with its one-line description."""
    return {n: m.description for n, m in sorted(_REGISTRY.items())}


def get_method(name: str | EditMethod) -> EditMethod:
    if isinstance(name, EditMethod):
        return name
    if name not in _REGISTRY:
        raise MethodNotAvailableError(f"unknown editing method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def check_requests(requests: Request | Sequence[Request], lm) -> list[Request]:
    """A non-empty list of valid requests (each checked against the model before any work)."""
    if isinstance(requests, Request):
        requests = [requests]
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("no requests given")
    for r in requests:
        if not isinstance(r, Request):
            raise InvalidRequestError(f"expected edit.Request, got {type(r).__name__}: {r!r}")
        r.check(lm)
    return requests


def compute(method: str | EditMethod, requests: Request | Sequence[Request], *, model=None, hparams=None,
            runtime: Runtime | None = None, **overrides) -> Edit:
    """Compute (never apply) the edit of ``method`` writing ``requests`` on the model as it is now.

    ``hparams``: the method's dataclass (or a dict of overrides); keyword ``overrides`` set fields
    too. A single-fact method (``batched=False``) takes exactly one request. The model's weights are
    the same before and after the call, also when it fails."""
    m = get_method(method)
    lm = resolve_model(model)
    if isinstance(hparams, dict):
        overrides = {**hparams, **overrides}
        hparams = None
    if hparams is not None and not isinstance(hparams, m.hparams):
        raise InvalidHparamsError(f"{m.name} takes {m.hparams.__name__}, not {type(hparams).__name__}")
    hp = m.make_hparams(overrides, base=hparams)
    requests = check_requests(requests, lm)
    if not m.batched and len(requests) != 1:
        raise InvalidRequestError(f"{m.name} edits one fact at a time; got {len(requests)} requests "
                                  "(use edit.write or sequential editing to apply several in turn)")
    rt = runtime or Runtime()
    e = m.compute_fn(lm, requests, hp, rt)
    if not isinstance(e, Edit) or e.is_applied:
        raise TypeError(f"{m.name} must return an unapplied Edit")
    e.parents = [x.id for x in lm.applied_edits]
    e._id = None
    return e


def write(method: str | EditMethod, requests: Sequence[Request], *, model=None, hparams=None,
          runtime: Runtime | None = None) -> list[Edit]:
    """Compute *and apply* the edits writing ``requests``: one edit for a batched method, one per
    request otherwise (each computed on the model carrying the previous ones). Returns them in order
    of application (revert in reverse). On failure the edits applied so far are reverted."""
    m = get_method(method)
    lm = resolve_model(model)
    groups = [list(requests)] if m.batched else [[r] for r in requests]
    done: list[Edit] = []
    try:
        for g in groups:
            done.append(compute(m, g, model=lm, hparams=hparams, runtime=runtime).apply(lm))
    except BaseException:
        for e in reversed(done):
            e.revert(lm)
        raise
    return done
