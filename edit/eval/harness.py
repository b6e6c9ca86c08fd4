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

Methods are the registered ones (:func:`edit.methods`, :mod:`edit.registry`), plus ``none``, the
unedited model. The harness knows nothing of any method beyond what the registry says of it.

Locality is agreement with the unedited model, so the unedited model's predictions on every case's
locality probes are taken first. Efficiency is the wall time and peak memory of computing and applying
each edit (on CPU, peak resident memory above the level at the start; on CUDA, peak allocated memory).

With ``out``, per-case records are appended to ``out/records.jsonl`` as they are computed and a
re-run with the same settings skips the cases already there (sequential runs also save each edit
under ``out/edits/`` and re-apply them), so an interrupted run resumes. At the end ``results.json``
and ``records.csv`` are written.

Several processes
-----------------
Launched by ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment), single and
batch mode spread the work over the processes with ``torch.distributed``: rank r takes the edit groups
(cases in single mode, batches in batch mode) r, r + W, r + 2W, ... of the W ranks, keeps its own
resumable records in ``out/rank{r}/``, and after a barrier the records are gathered and merged in case
order into the one :class:`Results` (the same, case for case, as one process gives, timings aside);
rank 0 writes ``results.json`` and ``records.csv`` in ``out``. Every rank returns the merged results.
The process group is the launcher's if it made one, else one is started from the environment (gloo
for a model on the CPU, nccl on CUDA). Sequential mode edits one model case after case, so it cannot be
split, and is refused under such a launch.

    torchrun --nproc_per_node 4 --no-python -- locate-edit eval counterfact --method rome --n 1000 --out runs/cf1000
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from locate._io import read_json, write_json
from locate import resolve_model
from locate.errors import InvalidArgumentError, LocateEditError

from ..edit import Edit
from ..registry import EditMethod, Runtime, get_method, write
from .datasets import Case
from ..stats import describe_corpus, token_stream
from .metrics import CONSISTENCY_NOT_AVAILABLE, aggregate, perplexity, reference_predictions, score_case, score_mquake
from .sequential import sequential

MODES = ("single", "batch", "sequential")


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
    ("Port.", "portability", 100), ("MH", "mquake_multihop", 100), ("EW", "mquake_edit_wise", 100),
    ("Flu.", "fluency", 1),
    ("PPL", "perplexity", 1), ("s/edit", "edit_seconds", 1), ("MB", "peak_memory_mb", 1),
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


def _fluent(fluency: bool | int, index: int) -> bool:
    """Whether the case at ``index`` of a run's case list is scored for fluency."""
    return bool(fluency) if isinstance(fluency, bool) else index < fluency


def _extends(old: dict, new: dict) -> bool:
    """Whether a single-mode run with settings ``new`` extends the run ``old`` to more cases: the same
    settings but for the case list, of which the old one is a prefix, and a fluency count that scores
    the same old cases for fluency. Each case of such a run is scored alone on the unedited model, so
    its old records are exactly what the longer run would write for them."""
    if old.get("mode") != "single" or new.get("mode") != "single" or "shard" in old or "shard" in new:
        return False
    rest = ("cases", "fluency")
    if {k: v for k, v in old.items() if k not in rest} != {k: v for k, v in new.items() if k not in rest}:
        return False
    before, after = list(old.get("cases", [])), list(new.get("cases", []))
    return (after[: len(before)] == before
            and all(_fluent(old["fluency"], i) == _fluent(new["fluency"], i) for i in range(len(before))))


class _Store:
    """records.jsonl in ``out``, guarded by the settings it was made with. A single-mode run resumes
    also with a longer case list that starts with the old one (:func:`_extends`): the run is extended."""

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
            if old.get("key") != key and not _extends(old.get("settings", {}), json.loads(json.dumps(settings, default=str))):
                raise LocateEditError(f"{self.dir} holds a run with different settings ({sfile}); "
                                      "use another output directory or resume=False")
            if old.get("key") != key:  # extended: the same run over more cases
                sfile.write_text(json.dumps({"key": key, "settings": settings}, indent=1, default=str))
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


NONE = "none"  # the unedited model: the baseline row of every table


def _score(lm, case: Case, *, mquake: dict, **kw) -> dict:
    """:func:`score_case`, plus MQuAKE's generated-answer metrics for an MQuAKE case."""
    rec = score_case(lm, case, **kw)
    if case.dataset == "mquake":
        rec.update(score_mquake(lm, case, **mquake))
    return rec


def _requests(c: Case) -> list:
    """The requests the editor gets for case ``c``: a single-fact case's request carries the case's
    paraphrase prompts (``Request.paraphrases``, used by methods that attribute over several prompts
    of the fact, e.g. ``kn``); a multi-fact case's requests go as they are."""
    if len(c.requests) == 1 and c.paraphrase_prompts:
        return [dataclasses.replace(c.request, paraphrases=tuple(c.paraphrase_prompts))]
    return list(c.requests)


def _edits(m: EditMethod | None, requests, lm, hp, rt) -> list[Edit]:
    return [] if m is None else write(m, requests, model=lm, hparams=hp, runtime=rt)


def launch() -> tuple[int, int]:
    """``(rank, world size)`` of this process under ``torchrun`` / ``accelerate launch`` (read from the
    ``RANK`` and ``WORLD_SIZE`` they set), ``(0, 1)`` when run on its own."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError as e:
        raise InvalidArgumentError(f"WORLD_SIZE/RANK must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise InvalidArgumentError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
    return rank, world


def _process_group(lm) -> None:
    """Join the launch's process group: the launcher's own if it started one, else from the environment
    (``MASTER_ADDR``/``MASTER_PORT``), on gloo for a model on the CPU and nccl for one on CUDA."""
    if not dist.is_available():
        raise LocateEditError("this launch has WORLD_SIZE > 1 but torch.distributed is not available")
    if lm.device.type == "cuda":  # nccl's collectives and the memory measure use the current device: this rank's
        torch.cuda.set_device(lm.device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if lm.device.type == "cuda" else "gloo")


def _merge(mine: list[tuple[int, list[dict]]], world: int) -> list[dict]:
    """Every rank's ``(group index, records)`` gathered after a barrier, as one list in group order."""
    dist.barrier()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    return [rec for _, recs in sorted(g for part in gathered for g in part) for rec in recs]


def evaluate(method: str, cases: Sequence[Case], *, model=None, mode: str = "single", hparams: dict | None = None,
             batch_size: int = 10, checkpoints: Sequence[int] | None = None, out: str | Path | None = None,
             resume: bool = True, fluency: bool | int = True, gen_length: int = 100, normalize: str = "sum",
             seed: int = 0, progress: bool = True, corpus=None, stats: dict | None = None,
             data_dir: str | Path | None = None, perplexity_corpus=None, perplexity_tokens: int = 20_000,
             mquake: dict | None = None) -> Results:
    """Edit with ``method`` (a registered name, or ``"none"``) and score, over ``cases``. See the module
    docstring for the modes.

    ``hparams`` go to the method (a dict of overrides of its hyperparameter dataclass, e.g.
    ``{"layers": 5}``); its layer spec (``"auto"``, ...) is resolved once, before the first case, and the
    settings record the layers used. ``corpus``/``stats``: the key statistics' source (see
    :class:`edit.registry.Runtime`). ``batch_size``: requests per edit in batch mode. ``checkpoints``:
    edit counts at which sequential mode scores (default 1, 10, 50, 100, 200, ... up to the number of
    cases). ``fluency``: sample generations for the fluency score (the slow part; ``gen_length``
    tokens per text); an int k scores fluency on the first k cases only. ``normalize``: ``"sum"`` (P of
    the whole target) or ``"mean"`` (the ROME code's per-token mean) for the probability comparisons.
    ``perplexity_corpus``: in sequential mode, the perplexity of its first ``perplexity_tokens`` tokens
    (e.g. WikiText-2 test) is measured before any edit and at every checkpoint (``curve[n]["perplexity"]``,
    ``curve[0]`` for the unedited model), a general-ability check. MQuAKE cases are also scored by
    :func:`edit.eval.metrics.score_mquake` (multi-hop, edit-wise and instance-wise accuracy from greedy
    answers); ``mquake`` holds its options (``few_shot``, ``match``, ``max_new_tokens``, ``relation_prompts``)."""
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    rank, world = launch()
    if world > 1 and mode == "sequential":
        raise InvalidArgumentError(
            "sequential mode edits one model case after case, so it cannot be split over processes; run it "
            f"in one process (this one is rank {rank} of a {world}-process torchrun/accelerate launch)")
    cases = list(cases)
    if not cases:
        raise InvalidArgumentError("no cases to evaluate")
    m = None if method == NONE else get_method(method)  # an unknown name fails here, before any work
    lm = resolve_model(model)
    for c in cases:
        for r in c.requests:
            r.check(lm)
    hp, layers_reason = (None, None) if m is None else m.pin(lm, m.make_hparams(hparams))
    # single and batch mode score every case right after its edit (ES, Rel.), so compute's own efficacy
    # check would run the same prompts again; sequential mode keeps it, as it scores only at checkpoints
    rt = Runtime(corpus=corpus, stats=stats, progress=False, seed=seed, data_dir=data_dir,
                 check_efficacy=mode == "sequential")
    settings = {"method": method, "mode": mode, "hparams": _describe_hparams(dataclasses.asdict(hp) if hp else {}),
                "fingerprint": lm.state_fingerprint, "cases": [str(c.case_id) for c in cases], "fluency": fluency,
                "gen_length": gen_length, "normalize": normalize, "seed": seed,
                "statistics": (describe_corpus(corpus) if stats is None
                               else sorted({st.source for st in dict(stats).values()}))}
    if mode == "batch":
        settings["batch_size"] = batch_size
    if any(c.dataset == "mquake" for c in cases):  # runs scored before these metrics existed do not resume
        settings["mquake"] = {"scoring": "generated answers", **(mquake or {})}
    if mode == "sequential":
        checkpoints = sorted(set(checkpoints or [k for k in (1, 10, 50, 100, 200, 500, 1000, 2000) if k < len(cases)]
                                 + [len(cases)]))
        if checkpoints[0] < 1 or checkpoints[-1] > len(cases):
            raise InvalidArgumentError(f"checkpoints must lie in 1..{len(cases)}, got {checkpoints}")
        settings["checkpoints"] = checkpoints
        if perplexity_corpus is not None:
            settings["perplexity"] = {"corpus": str(perplexity_corpus), "tokens": perplexity_tokens}
    if world > 1:
        _process_group(lm)
        # each rank's records apart, under the settings of the whole run and its place in the launch
        store = _Store(None if out is None else Path(out) / f"rank{rank}", {**settings, "shard": [rank, world]}, resume)
    else:
        store = _Store(out, settings, resume)
    if layers_reason:
        settings["layers_reason"] = layers_reason  # reported, not part of the resume key
    score_kw = dict(normalize=normalize, gen_length=gen_length, seed=seed, mquake=mquake or {})
    position = {id(c): i for i, c in enumerate(cases)}

    def with_fluency(c) -> bool:
        return bool(fluency) if isinstance(fluency, bool) else position[id(c)] < fluency

    def bar(n, desc):
        return tqdm(total=n, desc=desc if world == 1 else f"{desc} [rank {rank}/{world}]", disable=not progress)

    # this process's edit groups: all of them, or under a launch of W processes every W-th from its rank
    size = batch_size if mode == "batch" else 1
    groups = list(enumerate(cases[i:i + size] for i in range(0, len(cases), size)))[rank::world]
    mine = cases if mode == "sequential" else [c for _, g in groups for c in g]
    with lm.eval_mode():
        refs = {}
        for c in mine:
            if c.locality:  # the unedited model's predictions, the reference for Locality
                refs[c.case_id] = reference_predictions(lm, c)
        records: list[dict] = []
        curve: dict[int, dict] = {}
        if mode in ("single", "batch"):
            done: list[tuple[int, list[dict]]] = []  # (group index, its records)
            with bar(len(mine), f"{method} {mode}") as pb:
                for gi, g in groups:
                    keys = [f"{c.case_id}" for c in g]
                    if all(k in store.done for k in keys):
                        records += [store.done[k] for k in keys]
                        done.append((gi, [store.done[k] for k in keys]))
                        pb.update(len(g))
                        continue
                    reqs = [r for c in g for r in _requests(c)]
                    with Measure(lm.device) as meas:
                        edits = _edits(m, reqs, lm, hp, rt)
                    try:
                        for c, k in zip(g, keys):
                            rec = {"key": k, "case_id": c.case_id, "method": method,
                                   **_score(lm, c, reference=refs.get(c.case_id), fluency=with_fluency(c), **score_kw)}
                            rec["edit_seconds"] = meas.seconds / len(reqs) if edits else None
                            rec["peak_memory_mb"] = meas.peak_mb if edits else None
                            rec["n_requests_in_edit"] = len(reqs)
                            rec["statistics"] = _statistics_of(edits)
                            if edits:
                                rec["layers"] = sorted({l for e in edits for l in e.layers})
                            store.add(rec)
                            records.append(rec)
                            pb.update(1)
                    finally:
                        for e in reversed(edits):
                            e.revert(lm)
                    done.append((gi, records[-len(g):]))
            if world > 1:
                records = _merge(done, world)
            aggregates = aggregate(records)
        else:
            ppl_tokens = None if perplexity_corpus is None else token_stream(lm, perplexity_corpus, perplexity_tokens)[0]
            records, curve = _sequential_mode(m, method, cases, lm, hp, rt, store, checkpoints, refs, with_fluency,
                                              score_kw, progress, ppl_tokens)
            aggregates = curve[checkpoints[-1]] if checkpoints[-1] in curve else {}
    res = Results(method, mode, cases[0].dataset, lm.name, lm.state_fingerprint, settings, records, aggregates, curve)
    if out is not None and rank == 0:
        res.save(Path(out) / "results.json")
        res.save_csv(Path(out) / "records.csv")
    return res


def _statistics_of(edits) -> list[str]:
    """The key statistics' sources (corpus and token count) the edits record, for a case's record."""
    out = set()
    for e in edits:
        src = e.hparams.get("stats_source")
        out.update(src.values() if isinstance(src, dict) else [src] if src else [])
    return sorted(out)


def saved_edits(store: "_Store", cases: Sequence[Case], lm, cost_fields: Callable[[list[Edit]], dict]):
    """``(replay, on_batch)`` for :func:`edit.eval.sequential.sequential` over ``cases`` (one batch per
    case): each case's edits are saved under ``store.dir/edits/<case index>/`` with a ``cost/<case_id>``
    record (its edit seconds per request, plus ``cost_fields(new edits)``), and on resume a case whose
    record and edits are stored is re-applied instead of recomputed. Without a directory nothing is saved."""
    edit_dir = None if store.dir is None else store.dir / "edits"

    def replay(b):
        saved = None if edit_dir is None else edit_dir / f"{b:05d}"
        if saved is None or f"cost/{cases[b].case_id}" not in store.done or not saved.is_dir():
            return None
        return [Edit.load(p, lm) for p in sorted(saved.glob("*.safetensors"))]

    def on_batch(b, new, seconds):
        if edit_dir is not None:
            saved = edit_dir / f"{b:05d}"
            saved.mkdir(parents=True, exist_ok=True)
            for j, e in enumerate(new):
                e.save(saved / f"{j:02d}.safetensors")
        store.add({"key": f"cost/{cases[b].case_id}", "case_id": cases[b].case_id, "cost": True,
                   "edit_seconds": seconds / len(cases[b].requests) if new else None, **cost_fields(new)})

    return replay, on_batch


def _sequential_mode(m, method, cases, lm, hp, rt, store, checkpoints, refs, with_fluency, score_kw, progress,
                     ppl_tokens=None):
    """Edits accumulate case after case (through :func:`edit.eval.sequential.sequential`, each case's
    requests one batch); at each checkpoint every case edited so far is scored. With an output
    directory each case's edits are saved and re-applied on resume."""
    records: list[dict] = []
    curve: dict[int, dict] = {}
    replay, on_batch = saved_edits(store, cases, lm, lambda new: {"peak_memory_mb": None})

    def ppl(n) -> float | None:
        if ppl_tokens is None:
            return None
        if f"ppl/{n}" not in store.done:
            store.add({"key": f"ppl/{n}", "n_edits": n, "perplexity": perplexity(lm, ppl_tokens)})
        return store.done[f"ppl/{n}"]["perplexity"]

    if ppl_tokens is not None:
        curve[0] = {"perplexity": ppl(0), "n_cases": 0}

    def score(lm_, run):
        n = run.n_batches
        if n not in checkpoints:
            return None
        cp_records = []
        for prev in cases[:n]:
            k = f"{n}/{prev.case_id}"
            if k not in store.done:
                store.add({"key": k, "case_id": prev.case_id, "method": method, "n_edits": n,
                           **_score(lm, prev, reference=refs.get(prev.case_id), fluency=with_fluency(prev),
                                    **score_kw)})
            cp_records.append(store.done[k])
        costs = [store.done[f"cost/{p.case_id}"] for p in cases[:n] if f"cost/{p.case_id}" in store.done]
        agg = aggregate(cp_records)
        vals = [x["edit_seconds"] for x in costs if x.get("edit_seconds") is not None]
        if vals:
            agg["edit_seconds"] = sum(vals) / len(vals)
        if ppl_tokens is not None:
            agg["perplexity"] = ppl(n)
        curve[n] = agg
        records.extend(cp_records)
        return n

    if m is None:  # the unedited model: nothing to write, score at each checkpoint as is
        class _Run:
            n_batches = 0
        r = _Run()
        for n in checkpoints:
            r.n_batches = n
            score(lm, r)
        return records, curve
    run = sequential(None, m, model=lm, batches=[_requests(c) for c in cases], hparams=hp, runtime=rt,
                     callback=score, replay=replay, on_batch=on_batch, progress=progress)
    run.revert()
    return records, curve
