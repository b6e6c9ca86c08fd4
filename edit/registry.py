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

Checks :func:`compute` makes for every method. Before any work: each request is valid on the model
(:meth:`edit.Request.check`), and a target that would be glued to the prompt's last word ("of" + "Rome")
gets a :class:`locate.errors.TargetSpacingWarning`. After the method: its edit is applied, measured
and reverted (bit-exact) to record in ``Edit.metrics`` whether it takes (:func:`request_outcomes`):

* ``efficacy``: the share of requests whose ``target_new`` is the top-1 continuation of the rendered
  prompt, at every one of its tokens (teacher-forced), once the edit is applied. Below 1 an
  :class:`locate.errors.EditIneffectiveWarning` names the requests that did not take;
* ``already_predicted``: per request, whether the model already continued it with ``target_new``
  *before* the edit (the edit then changes little that matters, but still moves the weights);
* ``request_outcomes``: per request, ``p_new`` (and ``p_true``) as whole continuations and the top-1
  token, before and after.

An edit that would make a weight non-finite is refused there, before the caller ever applies it.
``Runtime(check_efficacy=False)`` skips the measurement (two forwards of the requests' prompts).
"""

from __future__ import annotations

import dataclasses
import unicodedata
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from locate import resolve_layers, resolve_model
from locate.errors import EditIneffectiveWarning, InvalidHparamsError, MethodNotAvailableError, TargetSpacingWarning

from .edit import Edit, applied
from .request import InvalidRequestError, Request


@dataclass
class Runtime:
    """What a method may use besides its hyperparameters.

    ``corpus``: text for key statistics (``None``: the packaged WikiText-2 head; a path, an iterable of
    strings, ``"hf:..."`` or ``"model-samples"``; see :mod:`edit.stats`); ``stats``: precomputed ``{layer: KeyStats}``;
    ``progress``: show progress bars; ``seed``: for anything sampled; ``cache``: a dict a method may
    fill with things worth keeping across the edits of one run (projections, retrieval indices);
    ``data_dir``: where datasets live (IKE's demonstration pool); ``callback``: progress records;
    ``check_efficacy``: measure whether each computed edit takes (see the module docstring)."""

    corpus: Any = None
    stats: dict | None = None
    progress: bool = False
    seed: int = 0
    cache: dict = field(default_factory=dict)
    data_dir: Any = None
    callback: Callable[[dict], None] | None = None  # called with a progress record (e.g. MEMIT's per layer)
    check_efficacy: bool = True  # apply, measure and revert each computed edit (Edit.metrics["efficacy"])


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
    train: Callable[..., Any] | None = None  # methods with a trained editor: fn(lm, records, hp, **kw) (edit.training)
    load_training: Callable[..., Any] | None = None  # its training file reader (None: edit.training.load_training_data)

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
             smoke: dict | None = None, train: Callable | None = None,
             load_training: Callable | None = None) -> Callable:
    """Decorator: register ``fn(lm, requests, hp, rt) -> Edit`` (unapplied) as method ``name``.

    ``train``: for a method that edits with a trained editor (MEND, SERAC), the function that trains
    it, ``train(lm, records, hp, *, steps=None, out=None, progress=True, resume=True) ->
    edit.training.TrainedEditor`` (``records``: :class:`edit.training.TrainingRecord`); ``locate-edit
    train METHOD`` calls it. ``None`` for every other method. ``load_training(path)``: what ``locate-edit
    train METHOD --data PATH`` passes to ``train`` as ``records``, for a method whose training data is
    not editing records (default: :func:`edit.training.load_training_data`)."""
    if name != name.lower() or not name:
        raise ValueError(f"method names are lower case, got {name!r}")
    if not dataclasses.is_dataclass(hparams):
        raise TypeError(f"{name}: hparams must be a dataclass")
    if layers is not None and "layers" not in {f.name for f in dataclasses.fields(hparams)}:
        raise TypeError(f"{name}: a method that edits layers has a 'layers' hyperparameter")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].module != fn.__module__:
            raise ValueError(f"editing method {name!r} is already registered by {_REGISTRY[name].module}")
        _REGISTRY[name] = EditMethod(name, hparams, fn, batched, layers, description, dict(smoke or {}), fn.__module__,
                                     train, load_training)
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


def _spaced_word_char(c: str) -> bool:
    """A letter or digit of a script that separates words by spaces (not CJK, which writes none)."""
    return c.isalnum() and unicodedata.east_asian_width(c) not in ("W", "F")


def glued_targets(requests: Sequence[Request]) -> list[Request]:
    """The requests whose ``target_new`` would be glued to the prompt's last word: no whitespace between
    them and both sides letters or digits ("...the city of" + "Rome" reads "ofRome")."""
    return [r for r in requests if r.rendered and r.target_new
            and _spaced_word_char(r.rendered[-1]) and _spaced_word_char(r.target_new[0])]


def check_requests(requests: Request | Sequence[Request], lm) -> list[Request]:
    """A non-empty list of valid requests (each checked against the model before any work). A target
    that would be glued to the prompt's last word is written as given, with a :class:`TargetSpacingWarning`."""
    if isinstance(requests, Request):
        requests = [requests]
    try:
        requests = list(requests)
    except TypeError as e:
        raise InvalidRequestError(f"expected an edit.Request or a list of them, got {type(requests).__name__}") from e
    if not requests:
        raise InvalidRequestError("no requests given")
    for r in requests:
        if not isinstance(r, Request):
            raise InvalidRequestError(f"expected edit.Request, got {type(r).__name__}: {r!r}")
        r.check(lm)
    glued = glued_targets(requests)
    if glued:
        shown = ", ".join(f"{r.rendered[-12:] + r.target_new!r}" for r in glued[:3])
        more = f" and {len(glued) - 3} more" if len(glued) > 3 else ""
        warnings.warn(f"{len(glued)} target(s) have no leading space and will be glued to the prompt's last word: "
                      f"...{shown}{more}. Targets carry their leading space, as in CounterFact (' Rome'); "
                      "if the language writes no space there, ignore this warning", TargetSpacingWarning, stacklevel=3)
    return requests


_OUTCOME_ROWS = 16  # prompts per forward when measuring outcomes (the logits are rows x tokens x vocabulary)


@torch.no_grad()
def request_outcomes(lm, requests: Sequence[Request]) -> list[dict]:
    """What the model does *now* with each request's rendered prompt: ``new_is_top1`` (``target_new`` is
    the argmax at every one of its tokens, teacher-forced), ``p_new`` (its probability as a whole
    continuation), ``p_true`` (the same for ``target_true``, ``None`` without one) and ``top1`` (the
    most likely next token)."""
    rows, meta = [], []
    for i, r in enumerate(requests):
        prompt = lm.encode(r.rendered)
        for which, target in (("new", r.target_new), ("true", r.target_true)):
            if target is not None:
                ids = lm.target_ids(target, r.rendered)
                rows.append(prompt + ids)
                meta.append((i, which, len(prompt), ids))
    out = [{"new_is_top1": False, "p_new": 0.0, "p_true": None, "top1": ""} for _ in requests]
    for s in range(0, len(rows), _OUTCOME_ROWS):
        batch = lm.pad(rows[s: s + _OUTCOME_ROWS])
        logp = lm.forward(batch).float().log_softmax(-1)
        for b, (i, which, n_prompt, ids) in enumerate(meta[s: s + _OUTCOME_ROWS]):
            pos = torch.arange(n_prompt - 1, n_prompt - 1 + len(ids), device=logp.device)
            target = torch.tensor(ids, device=logp.device)
            scores = logp[b, pos]
            out[i][f"p_{which}"] = float(scores.gather(-1, target[:, None]).sum().exp())
            if which == "new":
                out[i]["new_is_top1"] = bool((scores.argmax(-1) == target).all())
                out[i]["top1"] = lm.tokenizer.decode([int(scores[0].argmax())])
    return out


def record_efficacy(lm, e: Edit) -> Edit:
    """Apply ``e``, measure :func:`request_outcomes`, revert it (bit-exact), and record in ``e.metrics``
    ``efficacy``, ``already_predicted`` and ``request_outcomes`` (module docstring); warn
    (:class:`EditIneffectiveWarning`) when some request does not take."""
    if not e.requests:
        return e
    before = request_outcomes(lm, e.requests)
    with applied(lm, e):
        after = request_outcomes(lm, e.requests)
    outcomes = [{"took": a["new_is_top1"], "already_predicted": b["new_is_top1"],
                 "top1_before": b["top1"], "top1_after": a["top1"], "p_new_before": b["p_new"],
                 "p_new_after": a["p_new"], "p_true_before": b["p_true"], "p_true_after": a["p_true"]}
                for b, a in zip(before, after)]
    took = [o["took"] for o in outcomes]
    e.metrics["efficacy"] = sum(took) / len(took)
    e.metrics["already_predicted"] = [o["already_predicted"] for o in outcomes]
    e.metrics["request_outcomes"] = outcomes
    if not all(took):
        failed = [(r, o) for r, o in zip(e.requests, outcomes) if not o["took"]]
        shown = "; ".join(f"{r.rendered!r} -> {o['top1_after']!r}, not {r.target_new!r}" for r, o in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        warnings.warn(f"{e.method}: the edit does not take for {len(failed)} of {len(took)} request(s): {shown}{more} "
                      "(Edit.metrics['request_outcomes'] has the probabilities)", EditIneffectiveWarning, stacklevel=3)
    return e


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
    if rt.check_efficacy:
        record_efficacy(lm, e)
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
