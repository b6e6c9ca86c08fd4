"""Trained editors as artefacts: the shared machinery of the methods that must learn to edit (MEND, SERAC).

A method such as MEND needs, before it can edit anything, networks trained on editing problems that
the evaluation never sees. That training is an *artefact*, kept on disk and never made behind the
caller's back:

* **where**: ``locate.cache_dir()/editors/<method>/<key>/`` (or a folder given with ``--out`` /
  the hyperparameter ``editor``), holding ``editor.safetensors`` (the trained tensors and their
  settings, written with :func:`locate.loading.write_cached`: atomic, checksummed, keyed),
  ``training_curve.json`` (edit success and locality on the validation split against the step) and,
  while training runs, ``checkpoint.safetensors``;
* **key** (:func:`editor_key`): a digest of the base model's fingerprint, the versions of torch,
  transformers and locate-edit, the digest of the training data and the hyperparameters that shape
  the trained editor. Loading an artefact whose stored key differs is refused:
  :class:`TrainedEditorMismatchError` (a :class:`locate.errors.FingerprintMismatchError`) names the
  fields that differ, so an editor trained for one model is never used on another;
* **missing**: :class:`TrainedEditorMissingError`, whose message is the exact command that trains it
  (``locate-edit train METHOD --data PATH ...``). Nothing trains silently. The one exception is the
  hyperparameter ``train_if_missing`` of each trained method, which exists **for the test suite only**
  (the conformance suite must run every registered method on tiny random models): it is ``False`` by
  default and only the methods' cheap ``smoke`` settings turn it on;
* **training** (:func:`train_loop`): resumable (the editor's and optimiser's tensors, the step and the
  curve are checkpointed every ``checkpoint_every`` steps; a restarted run continues from the last
  checkpoint of the same key), a tqdm bar, the data order a function of the seed and the step only,
  so a resumed run sees the same batches as an uninterrupted one.

Training data (:func:`load_training_data`) is the EasyEdit CounterFact format (``prompt``,
``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``,
``locality_ground_truth``; ``counterfact/easyedit_format/counterfact-train.json``) or the zsRE format
(``src``, ``subject``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``). Files whose name marks them as
an evaluation split (``dev``, ``test``, ``eval``) are refused: the editors are evaluated on those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import transformers
from tqdm.auto import tqdm

from locate.errors import (CacheCorruptedError, DataFileNotFoundError, EditFailedError, FingerprintMismatchError,
                           InvalidArgumentError, LocateEditError)
from locate.loading import cache_dir, read_cached, verify_cached, write_cached

from .eval.datasets import find_data_dir
from .request import Request

EDITOR_FORMAT = "locate-edit/trained-editor/1"
CHECKPOINT_FORMAT = "locate-edit/trained-editor-checkpoint/1"
EDITOR_FILE = "editor.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
CURVE_FILE = "training_curve.json"
DEFAULT_TRAIN_DATA = "counterfact/easyedit_format/counterfact-train.json"  # relative to the shared data folder
_EVAL_SPLIT_MARKERS = ("dev", "test", "eval")
_NOT_IN_KEY = ("train_if_missing", "editor", "checkpoint_every", "eval_every", "train_data")  # where from, how
#              often: not what (the data enters the key as the digest of its records)


class TrainedEditorMissingError(LocateEditError, FileNotFoundError):
    """A method needs a trained editor and none is stored for this model, data and hyperparameters.
    ``command`` is the command that trains it (also the end of the message)."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


class TrainedEditorMismatchError(FingerprintMismatchError):
    """A stored trained editor was made for another model, other library versions, other data or other
    hyperparameters."""


class TrainingDataError(LocateEditError, ValueError):
    """Training data that cannot be used (unreadable, of an unknown format, or an evaluation split)."""


# ====================================================================== training data
@dataclass(frozen=True)
class TrainingRecord:
    """One editing problem: the ``request`` to write, ``paraphrases`` of its prompt (the equivalence
    neighbourhood, answered with the same target) and ``locality`` pairs (prompt, answer) that the
    edit must leave alone."""

    request: Request
    paraphrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()


def _subject_template(prompt: str, subject: str) -> str:
    """``prompt`` with its first occurrence of ``subject`` replaced by ``{}`` (a Request template); a
    prompt that does not contain the subject keeps it prepended (the zsRE questions always contain it)."""
    i = prompt.find(subject) if subject else -1
    if i < 0:
        return "{} " + prompt if prompt.find("{}") < 0 else prompt
    return prompt[:i] + "{}" + prompt[i + len(subject):]


def _space(t: str) -> str:
    return t if t.startswith(" ") else " " + t


def record_from_dict(d: dict) -> TrainingRecord:
    """A :class:`TrainingRecord` from an EasyEdit CounterFact record or a zsRE record."""
    try:
        if "src" in d:  # zsRE
            subject, prompt = d["subject"], d["src"]
            new, old = d["alt"], (d.get("answers") or [None])[0]
            para = [d["rephrase"]] if d.get("rephrase") else []
            loc = [(d["loc"], _space(d["loc_ans"]))] if d.get("loc") and d.get("loc_ans") else []
        else:  # EasyEdit CounterFact
            subject, prompt = d["subject"], d["prompt"]
            new, old = d["target_new"], d.get("ground_truth")
            para = [d["rephrase_prompt"]] if d.get("rephrase_prompt") else []
            loc = ([(d["locality_prompt"], _space(d["locality_ground_truth"]))]
                   if d.get("locality_prompt") and d.get("locality_ground_truth") else [])
    except (KeyError, TypeError) as e:
        raise TrainingDataError(f"not an EasyEdit CounterFact or zsRE record (missing {e}): {str(d)[:200]}") from e
    old = _space(old) if old and old.strip() != new.strip() else None
    req = Request(_subject_template(prompt, subject), subject, _space(new), old)
    return TrainingRecord(req, tuple(para), tuple(loc))


def load_training_data(path: str | Path, limit: int | None = None) -> list[TrainingRecord]:
    """The records of a training file (see the module docstring). An evaluation split is refused."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileNotFoundError(f"training data not found: {p}")
    if set(re.split(r"[^a-z0-9]+", p.name.lower())) & set(_EVAL_SPLIT_MARKERS):
        raise TrainingDataError(f"{p.name} is an evaluation split; trained editors are trained on train "
                                "splits only (e.g. counterfact/easyedit_format/counterfact-train.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TrainingDataError(f"{p}: not readable JSON ({e})") from e
    if not isinstance(data, list) or not data:
        raise TrainingDataError(f"{p}: expected a non-empty JSON list of records")
    records = [record_from_dict(d) for d in (data if limit is None else data[:limit])]
    return records


@dataclass
class TrainingHparams:
    """What every trained editor's hyperparameters share: how long it trains, how its training curve and
    checkpoints are kept, and where its data and artefact come from (a method's dataclass extends it)."""

    train_steps: int = 250  # optimiser steps (the references: up to 100,000 with early stopping; the CPU budget)
    val_fraction: float = 0.05  # share of the training file held out for the training curve (at most 100)
    eval_every: int = 50  # steps between points of the training curve (and one at the end)
    checkpoint_every: int = 50  # steps between resumable checkpoints
    seed: int = 0  # data order and initialisation
    train_data: str = DEFAULT_TRAIN_DATA  # training file (relative to the data directory), or "toy" (tests)
    editor: Any = None  # folder of a trained editor (default: the cache folder of its key)
    train_if_missing: bool = False  # TESTS ONLY: train a missing editor instead of failing (never on by default)


def training_source(train_data: str, data_dir=None) -> tuple[str | None, list[TrainingRecord] | None]:
    """Where an editor's training records come from: ``(path, None)`` for a file (a relative name that is
    not a file here is looked up in the data directory, ``data_dir`` or :func:`find_data_dir`'s search),
    or ``(None, records)`` for ``"toy"``, the tests' synthetic set."""
    if train_data == "toy":
        return None, toy_records()
    p = Path(train_data).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = find_data_dir(data_dir) / train_data
    return str(p), None


def records_digest(records: Sequence[TrainingRecord]) -> str:
    """SHA-256 of the records as the training reads them (so the same data in another file layout
    gives the same key)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.request.to_dict(), list(r.paraphrases), [list(x) for x in r.locality]],
                            sort_keys=True).encode())
    return h.hexdigest()


def split_records(records: Sequence[TrainingRecord], val_fraction: float, seed: int,
                  max_val: int = 100) -> tuple[list[TrainingRecord], list[TrainingRecord]]:
    """A seeded split of the training file into (train, validation); the validation split (at most
    ``max_val`` records, at least one when there are two or more) only measures the training curve."""
    n = len(records)
    n_val = 0 if n < 2 else min(max_val, max(1, int(round(val_fraction * n))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


def batch_at(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The record indices of training step ``step``: epochs of seeded permutations, so the batch of a
    step depends only on (n, step, batch_size, seed), and a resumed run sees the same batches."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) * 100003 + epoch)).tolist()
    return order[pos * batch_size: (pos + 1) * batch_size]


# ====================================================================== keys and places
def library_versions() -> dict[str, str]:
    """The versions that shape a trained editor (torch, transformers, locate-edit)."""
    try:
        own = version("locate-edit")
    except PackageNotFoundError:
        own = "unknown"
    tf = sys.modules.get("transformers", transformers)
    return {"torch": torch.__version__, "transformers": tf.__version__, "locate-edit": own}


def key_hparams(hp: Any, edit_time: Sequence[str] = ()) -> dict:
    """The hyperparameters of ``hp`` (a dataclass) that shape the trained editor: all but the
    ``edit_time`` fields and ``train_if_missing``, ``editor``, ``checkpoint_every``, ``eval_every``,
    ``train_data`` (which say where it comes from and how often training reports, not what it is; the
    data enter the key as the digest of their records)."""
    skip = set(edit_time) | set(_NOT_IN_KEY)
    return {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp) if f.name not in skip}


def editor_key(method: str, lm, data_digest: str, hparams: dict) -> dict:
    """The key of a trained editor (stored in its files; compared field by field on load)."""
    return {"method": method, "fingerprint": lm.fingerprint, "model_name": lm.name,
            "versions": library_versions(), "data_sha256": data_digest, "hparams": json.loads(json.dumps(hparams))}


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def editor_dir(method: str, key: dict) -> Path:
    """``cache_dir()/editors/<method>/<digest of the key>``."""
    return cache_dir() / "editors" / method / key_digest(key)


# ====================================================================== the artefact
@dataclass
class TrainedEditor:
    """A trained editor: ``tensors`` (the trained networks' weights, running statistics...),
    ``config`` (JSON: what rebuilds the networks from them), ``curve`` (the training curve), ``key``
    (see :func:`editor_key`) and ``path`` (the folder it lives in, once saved or loaded)."""

    method: str
    key: dict
    config: dict
    tensors: dict[str, torch.Tensor]
    curve: list[dict] = field(default_factory=list)
    path: Path | None = None

    def save(self, directory: str | Path | None = None) -> Path:
        """Write ``editor.safetensors`` and ``training_curve.json`` to ``directory`` (default: the cache
        folder of its key) and remove the training checkpoint. Returns the folder."""
        d = Path(directory) if directory is not None else editor_dir(self.method, self.key)
        write_cached(d / EDITOR_FILE, EDITOR_FORMAT, self.key, body={"config": self.config, "curve": self.curve},
                     tensors=self.tensors)
        write_curve(d, self.method, self.key, self.curve, final=True)
        (d / CHECKPOINT_FILE).unlink(missing_ok=True)
        self.path = d
        return d

    @classmethod
    def load(cls, method: str, key: dict, directory: str | Path | None = None) -> "TrainedEditor":
        """The editor stored for ``key`` (in ``directory``, default its cache folder). A missing one raises
        :class:`TrainedEditorMissingError` (the caller adds the command); one stored for another
        key raises :class:`TrainedEditorMismatchError` naming what differs."""
        d = Path(directory) if directory is not None else editor_dir(method, key)
        f = d / EDITOR_FILE
        if not f.is_file():
            raise TrainedEditorMissingError(f"no trained {method} editor at {d}", "")
        try:
            body, tensors = verify_cached(f, EDITOR_FORMAT, key)
        except CacheCorruptedError as e:
            if "holds another entry" in str(e):
                raise TrainedEditorMismatchError(f"the trained {method} editor at {d} was made for something else; "
                                                 f"refusing to use it: {e}") from e
            raise
        return cls(method, key, body["config"], tensors, list(body.get("curve", [])), d)


def write_curve(directory: Path, method: str, key: dict, curve: list[dict], final: bool) -> Path:
    """``training_curve.json``: the validation edit success and locality (and the losses) at each
    evaluated step, with the key, for plotting."""
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / CURVE_FILE
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"method": method, "key": key, "final": final, "curve": curve}, indent=1))
    tmp.replace(p)
    return p


def train_command(method: str, lm, data: str | None, hparams: dict, defaults: dict) -> str:
    """The command line that trains the editor these settings need."""
    parts = ["locate-edit", "train", method, "--data", data or f"<shared data>/{DEFAULT_TRAIN_DATA}"]
    if not lm.name.startswith("SmolLM2-135M"):
        parts += ["--model", lm.name]
    for k in sorted(hparams):
        if k != "train_data" and hparams[k] != defaults.get(k):
            parts += ["--hparam", f"{k}={json.dumps(hparams[k], separators=(',', ':'))}"]
    return " ".join(parts)


def obtain_for_sites(method: str, lm, hp: Any, rt, *, train_fn: Callable[..., "TrainedEditor"], sites: Sequence,
                     build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, "TrainedEditor"]:
    """The trained network ``hp`` asks for on ``lm`` (:func:`obtain`, training data from ``hp.train_data``
    and ``rt.data_dir``), for editors that record the weights they were trained for in
    ``config["sites"]`` (dataclasses): refused when the settings now name other ``sites``. ``build()``
    makes the network the stored tensors load into; it is returned on the model's device, in eval mode."""
    path, records = training_source(hp.train_data, rt.data_dir if rt is not None else None)
    art = obtain(method, lm, hp, data_path=path, records=records, train_fn=train_fn,
                 progress=bool(rt.progress) if rt is not None else False)
    wanted = [dataclasses.asdict(s) for s in sites]
    if art.config.get("sites") != wanted:
        raise EditFailedError(f"the trained {method} editor is for the weights {art.config.get('sites')}, but these "
                              f"settings edit {wanted}")
    net = build()
    net.load_state_dict(art.tensors)
    return net.to(lm.device).eval(), art


def obtain(method: str, lm, hp: Any, *, data_path: str | None, records: Sequence[TrainingRecord] | None,
           train_fn: Callable[..., "TrainedEditor"], edit_time: Sequence[str] = (),
           progress: bool = False) -> TrainedEditor:
    """The trained editor that ``hp`` asks for on ``lm``: loaded from ``hp.editor`` (a folder) or the
    cache. When none is stored: :class:`TrainedEditorMissingError` with the training command, unless
    ``hp.train_if_missing`` (tests only), which trains it on ``records`` (or the file) and saves it."""
    hparams = key_hparams(hp, edit_time)
    if records is None:
        if data_path is None:
            raise TrainingDataError(f"{method}: no training data named (hyperparameter train_data)")
        p = Path(data_path).expanduser()
        if not p.is_file():
            raise TrainedEditorMissingError(
                f"{method} needs a trained editor, and its training data {p} is not there; train one with: "
                + train_command(method, lm, str(p), hparams, key_hparams(type(hp)(), edit_time)),
                train_command(method, lm, str(p), hparams, key_hparams(type(hp)(), edit_time)))
        records = load_training_data(p)
    key = editor_key(method, lm, records_digest(records), hparams)
    try:
        return TrainedEditor.load(method, key, getattr(hp, "editor", None))
    except TrainedEditorMissingError:
        if not getattr(hp, "train_if_missing", False):
            cmd = train_command(method, lm, data_path, hparams, key_hparams(type(hp)(), edit_time))
            raise TrainedEditorMissingError(
                f"{method} needs a trained editor for model {lm.name!r} (fingerprint {lm.fingerprint}), these "
                f"hyperparameters and this training data, and none is stored under {editor_dir(method, key)}. "
                f"Train it (this never happens on its own) with: {cmd}", cmd) from None
    return train_fn(lm, list(records), hp, progress=progress)  # saved where hp.editor (or the cache) says



# ====================================================================== the resumable loop
def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{idx}/{k}"] = v
            else:
                scalars[f"{idx}/{k}"] = v
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def _unflat_optimizer(opt: torch.optim.Optimizer, body: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("opt/"):
            _, idx, k = name.split("/", 2)
            state.setdefault(int(idx), {})[k] = t
    for name, v in body.get("scalars", {}).items():
        idx, k = name.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": body["param_groups"]})


def train_loop(method: str, key: dict, directory: Path, module: torch.nn.Module, opt: torch.optim.Optimizer,
               step_fn: Callable[[int], dict], eval_fn: Callable[[], dict], *, steps: int,
               eval_every: int, checkpoint_every: int, progress: bool = True,
               resume: bool = True) -> list[dict]:
    """Run ``step_fn(step)`` (one optimisation step; returns its losses) for ``steps`` steps, evaluating
    ``eval_fn()`` (``{"edit_success": ..., "locality": ...}`` on the validation split) every
    ``eval_every`` steps and at the end, and checkpointing ``module``'s state, the optimiser's, the
    step and the curve to ``directory/checkpoint.safetensors`` every ``checkpoint_every`` steps.
    With ``resume``, a checkpoint of the same key continues where it stopped. Returns the curve."""
    if steps < 0 or eval_every < 1 or checkpoint_every < 1:
        raise InvalidArgumentError(f"steps must be >= 0 and eval_every, checkpoint_every >= 1; got {steps}, "
                                   f"{eval_every}, {checkpoint_every}")
    ckpt = directory / CHECKPOINT_FILE
    start, curve = 0, []
    got = read_cached(ckpt, CHECKPOINT_FORMAT, key, what=f"{method} training checkpoint") if resume else None
    if got is not None:
        body, tensors = got
        module.load_state_dict({k[len("net/"):]: v for k, v in tensors.items() if k.startswith("net/")})
        _unflat_optimizer(opt, body["optimizer"], tensors)
        start, curve = int(body["step"]), list(body["curve"])

    def checkpoint(step: int) -> None:
        ob, ot = _flat_optimizer(opt)
        net = {f"net/{k}": v for k, v in module.state_dict().items()}
        write_cached(ckpt, CHECKPOINT_FORMAT, key, body={"step": step, "curve": curve, "optimizer": ob},
                     tensors={**net, **ot})
        write_curve(directory, method, key, curve, final=False)

    last: dict = {}
    bar = tqdm(range(start, steps), total=steps, initial=start, desc=f"train {method}", disable=not progress)
    for step in bar:
        last = step_fn(step)
        if not all(math.isfinite(float(v)) for v in last.values()):
            raise LocateEditError(f"{method} training diverged at step {step}: {last}")
        bar.set_postfix({k: f"{float(v):.3g}" for k, v in last.items()})
        done = step + 1
        if done % eval_every == 0 and done < steps:
            curve.append({"step": done, **{k: float(v) for k, v in last.items()}, **eval_fn()})
        if done % checkpoint_every == 0 and done < steps:
            checkpoint(done)
    if not curve or curve[-1]["step"] != steps:
        curve.append({"step": steps, **{k: float(v) for k, v in last.items()}, **eval_fn()})
    return curve


class EditorTrainer:
    """What a method gives :func:`run_training`: ``module`` (every trained tensor: its ``state_dict``
    is checkpointed and becomes the artefact's tensors), ``opt`` (its optimiser), ``step(step)`` (one
    optimisation step on :func:`batch_at`'s records; returns its losses), ``evaluate()`` (edit success
    and locality on the validation split) and ``config()`` (JSON that rebuilds the networks)."""

    module: torch.nn.Module
    opt: torch.optim.Optimizer

    def step(self, step: int) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError


def run_training(method: str, lm, records: Sequence[TrainingRecord], hp: Any,
                 make_trainer: Callable[[Any, list[TrainingRecord], list[TrainingRecord], Any], EditorTrainer], *,
                 steps: int | None = None, out: str | Path | None = None, progress: bool = True,
                 resume: bool = True, edit_time: Sequence[str] = ()) -> TrainedEditor:
    """Train a method's editor on ``records`` and save it: ``hp.train_steps`` (or ``steps``) steps of
    ``make_trainer(lm, train_records, val_records, hp)``, resumable, in ``out`` (or ``hp.editor``, or
    the cache folder of its key). ``hp`` needs ``train_steps``, ``val_fraction``, ``eval_every``,
    ``checkpoint_every`` and ``seed`` fields. Returns the saved :class:`TrainedEditor`."""
    records = list(records)
    if not records:
        raise TrainingDataError(f"{method}: no training records")
    if steps is not None:
        hp = dataclasses.replace(hp, train_steps=int(steps))
    key = editor_key(method, lm, records_digest(records), key_hparams(hp, edit_time))
    where = out if out is not None else getattr(hp, "editor", None)
    directory = Path(where).expanduser() if where is not None else editor_dir(method, key)
    train, val = split_records(records, hp.val_fraction, hp.seed)
    torch.manual_seed(int(hp.seed))
    trainer = make_trainer(lm, train, val, hp)
    curve = train_loop(method, key, directory, trainer.module, trainer.opt, trainer.step, trainer.evaluate,
                       steps=int(hp.train_steps), eval_every=int(hp.eval_every),
                       checkpoint_every=int(hp.checkpoint_every), progress=progress, resume=resume)
    tensors = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    editor = TrainedEditor(method, key, {**trainer.config(), "n_train": len(train), "n_val": len(val)}, tensors, curve)
    editor.save(directory)
    return editor


# ====================================================================== toy data (tests only)
_TOY_SUBJECTS = ("Alice Brown", "The Eiffel Tower", "Mount Fuji", "Lake Victoria", "Tom Hanks", "The Nile",
                 "Angela Merkel", "The Louvre", "Oxford", "Toyota", "Pablo Picasso", "The Amazon")
_TOY_TARGETS = (" Rome", " Berlin", " Tokyo", " Paris", " Madrid", " Cairo", " Lima", " Oslo")
_TOY_LOCALITY = (("The capital of France is", " Paris"), ("Water is made of hydrogen and", " oxygen"),
                 ("The first month of the year is", " January"))


def toy_records(n: int = 12) -> list[TrainingRecord]:
    """A small deterministic set of editing problems for the TEST SUITE ONLY (``train_data="toy"`` in
    the smoke settings): tiny editors train on it in seconds. Never a substitute for a train split."""
    out = []
    for i in range(n):
        subject, target = _TOY_SUBJECTS[i % len(_TOY_SUBJECTS)], _TOY_TARGETS[(3 * i + 1) % len(_TOY_TARGETS)]
        out.append(TrainingRecord(Request("{} is located in the city of", subject, target),
                                  (f"Where is {subject}? It is in the city of",),
                                  (_TOY_LOCALITY[i % len(_TOY_LOCALITY)],)))
    return out
