"""`evaluate`: run an editing method over evaluation cases and score it.

    res = edit.evaluate("rome", cases, mode="single", out="runs/rome_cf100")
    res.aggregates["es"], res.aggregates["score"]; res.table()

Modes
-----
``single``      each case is edited on the unedited model, scored, and reverted (bit-exactly) before
                the next: the ROME paper's protocol.
``batch``       cases are grouped ``batch_size`` at a time and all their requests are written at once
                (one MEMIT edit; methods that edit one fact at a time apply theirs in turn); every case
                of the batch is scored, then the batch is reverted: the MEMIT paper's scaling curve.
``sequential``  edits accumulate case after case and are never reverted until the end; at each
                checkpoint (number of edits so far) all cases edited so far are scored.

Methods are looked up by name when first used, so a method that is not installed yet fails only
when asked for: ``none`` (the unedited model), ``ft`` (FT-L, :mod:`edit.ft`), ``rome``, ``memit``,
``kn``. :func:`register_method` adds one.

Locality is agreement with the unedited model, so the unedited model's predictions on every case's
locality probes are taken first. Efficiency is the wall time and peak memory of computing and applying
each edit (on CPU, peak resident memory above the level at the start; on CUDA, peak allocated memory).

With ``out``, per-case records are appended to ``out/records.jsonl`` as they are computed and a
re-run with the same settings skips the cases already there (sequential runs also save each edit
under ``out/edits/`` and re-apply them), so an interrupted run resumes. At the end ``results.json``
and ``records.csv`` are written.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from locate._io import read_json, write_json
from locate import resolve_model
from locate.errors import LocateEditError

from .datasets import Case
from .edit import Edit
from .metrics import CONSISTENCY_NOT_AVAILABLE, aggregate, reference_predictions, score_case
from .request import Request

MODES = ("single", "batch", "sequential")


class MethodNotAvailableError(LocateEditError, LookupError):
    """An editing method name that is unknown, or whose module is not installed."""


# --------------------------------------------------------------------------- method registry
@dataclass(frozen=True)
class Method:
    """How the harness calls an editing method.

    ``target`` is ``"module:function"`` (imported when first used) or the function itself. ``batched`` methods take a list of requests and return one
    :class:`Edit`; the others take one request, and several requests are edited one after another,
    each on the model already carrying the previous ones."""

    name: str
    target: str | Callable | None
    batched: bool
    description: str = ""
    layers: tuple[str, str | Callable] | None = None  # (the hparam naming the layers, "module:resolver" or resolver)

    def function(self) -> Callable:
        if callable(self.target):
            return self.target
        mod, fn = self.target.split(":")
        try:
            return getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise MethodNotAvailableError(f"editing method {self.name!r} needs {self.target}, which is not available: {e}") from e


_METHODS: dict[str, Method] = {}


def register_method(name: str, target: str | Callable | None, *, batched: bool, description: str = "",
                    layers: tuple[str, str | Callable] | None = None) -> None:
    """Make ``name`` usable in :func:`evaluate`. ``target``: ``"module:function"``, a function
    ``(requests_or_request, *, model, **hparams) -> Edit``, or None for no edit. ``layers``:
    ``(hparam, "module:resolver" or the resolver)`` for a method whose layers may be ``"auto"``; the resolver
    ``(lm, spec) -> (layers, reason)`` fixes them before the run (see :func:`pin_layers`)."""
    _METHODS[name] = Method(name, target, batched, description, layers)


register_method("none", None, batched=True, description="the unedited model")
register_method("ft", "edit.ft:fine_tune", batched=True, description="FT-L, constrained fine-tuning of one MLP",
                layers=("layer", "edit.rome:resolve_layer"))
register_method("rome", "edit.rome:rome", batched=False, description="ROME (Meng et al. 2022)",
                layers=("layer", "edit.rome:resolve_layer"))
register_method("memit", "edit.memit:memit", batched=True, description="MEMIT (Meng et al. 2023)",
                layers=("layers", "edit.memit:resolve_layers"))
register_method("kn", "edit.evaluate:kn_edit", batched=False, description="knowledge-neuron edit (Dai et al. 2022)")


def kn_edit(request: Request, *, model=None, steps: int = 20, threshold: float = 0.2, lambda1: float = 1.0,
            lambda2: float = 8.0) -> Edit:
    """The knowledge-neuron edit of one request, as the harness calls it: find the neurons of the old
    fact (``rendered prompt -> target_true``, :func:`locate.neurons`) and rewrite their value slots
    toward ``target_new`` (:func:`edit.kn.kn_update`, Dai et al. §5.1). When no neuron passes the
    threshold the edit is empty (the case is scored unedited) and says so in ``metrics``."""
    import locate
    from locate.neurons import NoNeuronsError

    from .kn import kn_update

    lm = resolve_model(model)
    if not request.target_true:
        raise LocateEditError(f"a knowledge-neuron edit needs the old answer (target_true) of {request!r}")
    found = locate.neurons([request.rendered], request.target_true, model=lm, steps=steps, threshold=threshold,
                           progress=False)
    try:
        e = kn_update(found, request.target_new, target_old=request.target_true, lambda1=lambda1, lambda2=lambda2,
                      model=lm)
    except NoNeuronsError:
        e = Edit("KN-update", [request], [], lm.fingerprint, lm.name, metrics={"n_neurons": 0})
    e.metrics.setdefault("n_neurons", sum(len(d.right) if d.right is not None else 0 for d in e.deltas))
    return e


def pin_layers(method: Method, lm, hparams: dict) -> tuple[dict, str | None]:
    """``hparams`` with the method's layer spec (``"auto"``, a trace, a profile or explicit layers)
    replaced by the layers it resolves to now, and the resolver's reason. A run's settings then name
    the layers it edits, so resuming it after ``"auto"`` would pick other layers (a new calibration,
    another library version) fails instead of mixing layers in one table."""
    if method.layers is None:
        return dict(hparams), None
    key, resolver = method.layers
    if not callable(resolver):
        mod, fn = resolver.split(":")
        resolver = getattr(importlib.import_module(mod), fn)
    spec = hparams.get(key, "auto")
    extra = {"n_layers": hparams["n_layers"]} if key == "layers" and "n_layers" in hparams else {}
    resolved, reason = resolver(lm, spec, **extra)
    return {**hparams, key: resolved}, reason


def methods() -> dict[str, Method]:
    return dict(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise MethodNotAvailableError(f"unknown editing method {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def make_edits(method: str | Method, requests: Sequence[Request], lm, hparams: dict | None = None) -> list[Edit]:
    """Compute *and apply* the edits writing ``requests``; returns them in order of application
    (revert in reverse). On failure, the edits applied so far are reverted before raising."""
    m = get_method(method) if isinstance(method, str) else method
    if m.target is None:
        return []
    fn, hp = m.function(), dict(hparams or {})
    if m.batched:
        groups = [list(requests)]
    else:
        groups = [[r] for r in requests]
    done: list[Edit] = []
    try:
        for g in groups:
            e = fn(g if m.batched else g[0], model=lm, **hp)
            done.append(e if e.is_applied else e.apply(lm))  # some methods (ROME) apply by default
    except BaseException:
        for e in reversed(done):
            e.revert(lm)
        raise
    return done


# --------------------------------------------------------------------------- efficiency
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Measure:
    """``with Measure(device) as m: ...`` → ``m.seconds``, ``m.peak_mb``.

    CUDA: peak allocated memory during the block. CPU (Linux): peak resident set size during the
    block minus the size at its start, sampled every 2 ms by a background thread (None elsewhere)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._stop = threading.Event()

            def sample():
                while not self._stop.wait(0.002):
                    r = _rss_bytes()
                    if r is not None and r > self._peak:
                        self._peak = r

            self._thread = threading.Thread(target=sample, daemon=True)
            if self._base is not None:
                self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes() or 0)
            self.peak_mb = (self._peak - self._base) / 2**20
        return False


# --------------------------------------------------------------------------- results
@dataclass
class Results:
    """The results table of one :func:`evaluate` run: per-case records plus aggregates.

    ``aggregates`` holds the means over cases (and S). In sequential mode, ``curve`` maps each
    checkpoint (number of edits) to the aggregates over the cases edited by then, and ``aggregates``
    is the last checkpoint's."""

    method: str
    mode: str
    dataset: str
    model_name: str
    fingerprint: str
    settings: dict[str, Any]
    records: list[dict]
    aggregates: dict[str, Any]
    curve: dict[int, dict[str, Any]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["curve"] = {str(k): v for k, v in self.curve.items()}
        return d

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Results":
        d = read_json(path, "results")
        d["curve"] = {int(k): v for k, v in d.get("curve", {}).items()}
        return cls(**d)

    def save_csv(self, path: str | Path) -> Path:
        """One row per record, scalar fields only (generations are in the JSON)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for r in self.records:
            for k, v in r.items():
                if k not in keys and not isinstance(v, (list, dict)):
                    keys.append(k)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in self.records:
                w.writerow({k: r.get(k) for k in keys})
        return path

    def table(self) -> str:
        """A one-row text table (see :func:`format_table` for several runs)."""
        return format_table([self])


# Columns of the printed table: CounterFact (ROME Table), then the survey's Table 2 quantities.
COLUMNS = [
    ("ES", "es", 100), ("PS", "ps", 100), ("NS", "ns", 100), ("S", "score", 100),
    ("EM", "em", 100), ("PM", "pm", 100), ("NM", "nm", 100),
    ("Rel.", "rewrite_acc", 100), ("Gen.", "paraphrase_acc", 100), ("Loc.", "locality", 100),
    ("Port.", "portability", 100), ("Flu.", "fluency", 1),
    ("s/edit", "edit_seconds", 1), ("MB", "peak_memory_mb", 1),
]


def format_table(results: Sequence[Results], *, label: Callable[[Results], str] | None = None) -> str:
    """A text table in the spirit of ROME's Table 4 / the survey's Table 2 (percentages, except
    fluency in bits, seconds and MB). Columns no run has are dropped; ``-`` marks a missing value."""
    label = label or (lambda r: r.method if r.mode == "single" else f"{r.method} ({r.mode})")
    cols = [c for c in COLUMNS if any(c[1] in r.aggregates for r in results)]
    head = ["Method"] + [c[0] for c in cols]
    rows = []
    for r in results:
        row = [label(r)]
        for _, k, scale in cols:
            v = r.aggregates.get(k)
            row.append("-" if v is None else f"{v * scale:.1f}" if scale == 100 else f"{v:.2f}")
        rows.append(row)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    line = lambda xs: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths)))  # noqa: E731
    n = results[0].aggregates.get("n_cases") if results else 0
    foot = (f"{n} cases of {results[0].dataset}; model {results[0].model_name}. Consistency: {CONSISTENCY_NOT_AVAILABLE}."
            if results else "")
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows] + [foot])


# --------------------------------------------------------------------------- the harness
def _settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Store:
    """records.jsonl in ``out``, guarded by the settings it was made with."""

    def __init__(self, out: str | Path | None, settings: dict, resume: bool):
        self.dir = None if out is None else Path(out)
        self.done: dict[str, dict] = {}
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        sfile, self.rfile = self.dir / "settings.json", self.dir / "records.jsonl"
        key = _settings_key(settings)
        if sfile.is_file() and resume:
            old = json.loads(sfile.read_text())
            if old.get("key") != key:
                raise LocateEditError(f"{self.dir} holds a run with different settings ({sfile}); "
                                      "use another output directory or resume=False")
            if self.rfile.is_file():
                for line in self.rfile.read_text().splitlines():
                    if line.strip():
                        r = json.loads(line)
                        self.done[r["key"]] = r
        else:
            self.rfile.write_text("")
            sfile.write_text(json.dumps({"key": key, "settings": settings}, indent=1, default=str))

    def add(self, rec: dict) -> None:
        self.done[rec["key"]] = rec
        if self.dir is not None:
            with open(self.rfile, "a") as f:
                f.write(json.dumps(rec, default=float) + "\n")


def _describe_hparams(hp: dict) -> dict:
    """hparams as JSON for the settings file: objects (key statistics, traces) by type and shape."""
    out = {}
    for k, v in hp.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = f"<{type(v).__name__}{'' if not isinstance(v, dict) else ' ' + str(sorted(map(str, v)))}>"
    return out


def evaluate(method: str, cases: Sequence[Case], *, model=None, mode: str = "single", hparams: dict | None = None,
             batch_size: int = 10, checkpoints: Sequence[int] | None = None, out: str | Path | None = None,
             resume: bool = True, fluency: bool | int = True, gen_length: int = 100, normalize: str = "sum",
             seed: int = 0, progress: bool = True) -> Results:
    """Edit with ``method`` and score, over ``cases``. See the module docstring for the modes.

    ``hparams`` go to the method (e.g. ``{"layer": 5}``); a layer spec such as ``"auto"`` is resolved
    once, before the first case (:func:`pin_layers`), and the settings record the layers used. ``batch_size``: requests per MEMIT batch in
    batch mode. ``checkpoints``: edit counts at which sequential mode scores (default 1, 10, 50,
    100, 200, ... up to the number of cases). ``fluency``: sample generations for the fluency score
    (the slow part; ``gen_length`` tokens per text); an int k scores fluency on the first k cases only. ``normalize``: ``"sum"`` (P of the whole target)
    or ``"mean"`` (the ROME code's per-token mean) for the probability comparisons."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cases = list(cases)
    if not cases:
        raise ValueError("no cases to evaluate")
    m = get_method(method)
    if m.target is not None:
        m.function()  # fail now, before any work, if the method is not installed
    lm = resolve_model(model)
    for c in cases:
        for r in c.requests:
            r.check(lm)
    hp, layers_reason = pin_layers(m, lm, dict(hparams or {}))
    settings = {"method": method, "mode": mode, "hparams": _describe_hparams(hp), "fingerprint": lm.fingerprint,
                "cases": [str(c.case_id) for c in cases], "fluency": fluency, "gen_length": gen_length,
                "normalize": normalize, "seed": seed}
    if mode == "batch":
        settings["batch_size"] = batch_size
    if mode == "sequential":
        checkpoints = sorted(set(checkpoints or [k for k in (1, 10, 50, 100, 200, 500, 1000, 2000) if k < len(cases)]
                                 + [len(cases)]))
        if checkpoints[0] < 1 or checkpoints[-1] > len(cases):
            raise ValueError(f"checkpoints must lie in 1..{len(cases)}, got {checkpoints}")
        settings["checkpoints"] = checkpoints
    store = _Store(out, settings, resume)
    if layers_reason:
        settings["layers_reason"] = layers_reason  # reported, not part of the resume key
    score_kw = dict(normalize=normalize, gen_length=gen_length, seed=seed)
    position = {id(c): i for i, c in enumerate(cases)}

    def with_fluency(c) -> bool:
        return bool(fluency) if isinstance(fluency, bool) else position[id(c)] < fluency

    def bar(n, desc):
        return tqdm(total=n, desc=desc, disable=not progress)

    with lm.eval_mode():
        refs = {}
        for c in cases:
            if c.locality:  # the unedited model's predictions, the reference for Locality
                refs[c.case_id] = reference_predictions(lm, c)
        records: list[dict] = []
        curve: dict[int, dict] = {}
        if mode in ("single", "batch"):
            size = 1 if mode == "single" else batch_size
            groups = [cases[i:i + size] for i in range(0, len(cases), size)]
            with bar(len(cases), f"{method} {mode}") as pb:
                for g in groups:
                    keys = [f"{c.case_id}" for c in g]
                    if all(k in store.done for k in keys):
                        records += [store.done[k] for k in keys]
                        pb.update(len(g))
                        continue
                    reqs = [r for c in g for r in c.requests]
                    with Measure(lm.device) as meas:
                        edits = make_edits(m, reqs, lm, hp)
                    try:
                        for c, k in zip(g, keys):
                            rec = {"key": k, "case_id": c.case_id, "method": method,
                                   **score_case(lm, c, reference=refs.get(c.case_id), fluency=with_fluency(c), **score_kw)}
                            rec["edit_seconds"] = meas.seconds / len(reqs) if edits else None
                            rec["peak_memory_mb"] = meas.peak_mb if edits else None
                            rec["n_requests_in_edit"] = len(reqs)
                            if edits:
                                rec["layers"] = sorted({l for e in edits for l in e.layers})
                            store.add(rec)
                            records.append(rec)
                            pb.update(1)
                    finally:
                        for e in reversed(edits):
                            e.revert(lm)
            aggregates = aggregate(records)
        else:
            applied: list[Edit] = []
            edit_dir = None if store.dir is None else store.dir / "edits"
            try:
                with bar(len(cases), f"{method} sequential") as pb:
                    for i, c in enumerate(cases):
                        saved = None if edit_dir is None else edit_dir / f"{i:05d}"
                        cost_key = f"cost/{c.case_id}"
                        if saved is not None and cost_key in store.done and saved.is_dir():
                            for p in sorted(saved.glob("*.safetensors")):  # resume: re-apply the stored edits
                                applied.append(Edit.load(p, lm).apply(lm))
                        else:
                            with Measure(lm.device) as meas:
                                new = make_edits(m, c.requests, lm, hp)
                            applied += new
                            if saved is not None:
                                saved.mkdir(parents=True, exist_ok=True)
                                for j, e in enumerate(new):
                                    e.save(saved / f"{j:02d}.safetensors")
                            store.add({"key": cost_key, "case_id": c.case_id, "cost": True,
                                       "edit_seconds": meas.seconds / len(c.requests) if new else None,
                                       "peak_memory_mb": meas.peak_mb if new else None})
                        pb.update(1)
                        n = i + 1
                        if n in checkpoints:
                            cp_records = []
                            for prev in cases[:n]:
                                k = f"{n}/{prev.case_id}"
                                if k not in store.done:
                                    store.add({"key": k, "case_id": prev.case_id, "method": method, "n_edits": n,
                                               **score_case(lm, prev, reference=refs.get(prev.case_id), fluency=with_fluency(prev),
                                                           **score_kw)})
                                cp_records.append(store.done[k])
                            costs = [store.done[f"cost/{p.case_id}"] for p in cases[:n]]
                            agg = aggregate(cp_records)
                            for key in ("edit_seconds", "peak_memory_mb"):
                                vals = [x[key] for x in costs if x.get(key) is not None]
                                if vals:
                                    agg[key] = sum(vals) / len(vals)
                            curve[n] = agg
                            records += cp_records
            finally:
                for e in reversed(applied):
                    e.revert(lm)
            aggregates = curve[checkpoints[-1]] if checkpoints[-1] in curve else {}
    res = Results(method, mode, cases[0].dataset, lm.name, lm.fingerprint, settings, records, aggregates, curve)
    if store.dir is not None:
        res.save(store.dir / "results.json")
        res.save_csv(store.dir / "records.csv")
    return res
