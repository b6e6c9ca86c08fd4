"""`benchmark`: the comparison of "Editing Large Language Models: Problems, Methods, and Opportunities"
(Yao et al., EMNLP 2023), plus EasyEdit's KnowEdit, for every registered method, in one run.

    edit.benchmark(["rome", "memit"], out="runs/survey", n=200)      # -> the report's text
    edit.eval.benchmark.build_report("runs/survey")                  # the same report, from the records

Axes (``axes=``) and the tasks that feed them (files under the data directory)
------------------------------------------------------------------------------
``basic``        reliability, generalisation, locality on zsRE (``zsre/zsre_dev_800.json``) and
                 CounterFact (``counterfact/counterfact_dev_800.json``), in both metric families:
                 the ROME/MEMIT family compares probabilities (ES = E[1{P(o*) > P(o^c)}] on the
                 rewrite prompt, PS on paraphrases, NS = E[1{P(o^c) > P(o*)}] on neighbours,
                 S = HarmonicMean(ES, PS, NS)); the survey/EasyEdit family is teacher-forced top-1
                 token accuracy (Rel. on the rewrite prompt, Gen. on the rephrase, Loc. = agreement
                 of the edited model's top-1 tokens with the unedited model's on the locality probes;
                 for CounterFact the probes are the neighbourhood prompts with the true object, as
                 EasyEdit does). Fluency (generation entropy) on CounterFact.
``portability``  token accuracy of the answer to a question the edit should change: zsRE's and
                 CounterFact's one-hop ``portability`` fields (``zsre_dev_800.json``,
                 ``counterfact/easyedit_rome_format/counterfact_portability_gpt4.json``), subject
                 replacement (``zsre/zsre_subject_replace.json``,
                 ``counterfact/easyedit_rome_format/counterfact_subject_replace.json``) and reversed
                 relation (``zsre/zsre_inverse_relation.json``, field ``inverse question``).
``locality``     harder locality: other attribution (``counterfact_other_attribution.json``: a
                 question about another attribute of the edited subject), distracting neighbour
                 (``counterfact_distracting_neighbor.json``: the new fact written before each
                 neighbourhood prompt; NS and Loc.), and other task: PIQA accuracy
                 (``locality/piqa_valid.jsonl`` + labels, :func:`edit.eval.metrics.choice_accuracy`)
                 before and after each CounterFact edit of the ``basic`` task, on a window of
                 ``piqa_per_case`` questions (default 20) that moves on by that many questions
                 from case to case, so 200 cases see 4,000 question slots, every question of the
                 1,838 at least twice. Each case's window is scored on the unedited model just
                 before its edit; the cell is the mean accuracy after, and the mean change.
``knowedit``     KnowEdit (``knowedit/*.json``: wiki_recent, wiki_counterfact, WikiBio, ZsRE) as
                 EasyEdit scores it: Edit Succ. = token accuracy of target_new on the prompt;
                 Portability and Locality = per case the mean over the file's keys (Reasoning,
                 Subject_Aliasing, Logical_Generalization; Relation_Specificity, Forgetfulness) of
                 the mean over that key's probes, then the mean over the cases that have any;
                 Fluency = n-gram entropy of a 100-token top-k sample from the prompt (bits;
                 EasyEdit prints it times 100). The wiki_recent and wiki_counterfact *test* files
                 could not be obtained: their train files stand in.
``efficiency``   wall time and peak memory of computing and applying one edit (CounterFact task;
                 :class:`edit.eval.harness.Measure`: peak resident memory above the start on CPU,
                 peak allocated memory on CUDA).
``batch``        for each batch size b (default 1, 10, 100, 1,000), the first max(n, b) cases of
                 EasyEdit's CounterFact edit split (``counterfact/easyedit_format/counterfact-edit.json``)
                 are written b at a time (one edit per batch for a method with ``batched=True``; the
                 others apply the batch's requests one after another, as the survey did), every case
                 of the batch is scored, the batch reverted. After the first batch, general ability:
                 WikiText-2 test perplexity (``wikitext/wikitext-2-raw/wiki.test.raw``, the first
                 ``ppl_tokens``) and PIQA accuracy on the first ``piqa_general`` questions.
``sequential``   edits accumulate over the first max(checkpoints) cases of the same split; at each
                 checkpoint (default 1, 10, 100, 1,000 edits) every case edited so far is scored,
                 with perplexity and PIQA as above (also before any edit).

Cells. A cell holds a value, ``not supported`` (the method cannot run that axis: the run raised a
:class:`locate.errors.LocateEditError` or NotImplementedError, whose message the records keep; or the
quantity cannot see the method's edit, as perplexity and PIQA, which read weights and hooks, cannot
see an edit made only of input transforms such as IKE's prompt prefix), ``skipped`` (a data file
is missing: it is named with a warning and the run goes on) or ``not run`` (the axis was not asked
for). Never a silent zero.

Results directory (``out``): ``benchmark.json`` (methods, axes, settings, missing files, the tasks'
case counts); per task and method ``<axis>/<task>/<method>/`` (batch: ``.../b<size>/``) with the
resumable per-case records of :class:`edit.eval.harness`'s store (``settings.json``,
``records.jsonl``; a re-run with the same settings skips what is there; sequential runs keep their
edits under ``edits/``) and, for a run that failed, ``status.json``; ``report.md`` and ``figures/``.
:func:`build_report` rebuilds the report from the directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from locate import resolve_model
from locate.errors import InvalidArgumentError, LocateEditError, LocateEditWarning

from ..edit import Edit
from ..registry import Runtime, get_method, write
from ..registry import methods as registered_methods
from ..request import InvalidRequestError
from ..stats import token_stream
from .datasets import (Case, DatasetNotFoundError, Probe, find_data_dir, load_counterfact, load_counterfact_distracting_neighbor,
                       load_counterfact_easyedit, load_counterfact_other_attribution, load_counterfact_subject_replace,
                       load_knowedit, load_piqa, load_zsre, load_zsre_inverse_relation, load_zsre_subject_replace)
from .harness import NONE, Measure, _describe_hparams, _requests, _statistics_of, _Store, saved_edits
from .metrics import aggregate, choice_accuracy, perplexity, reference_predictions, score_case
from .sequential import sequential


class BenchmarkDataWarning(LocateEditWarning):
    """A data file the benchmark needs is missing: the axes it feeds are skipped."""


class UnsupportedAxisWarning(LocateEditWarning):
    """A method could not run a task of the benchmark: its cells read "not supported"."""


AXES = ("basic", "portability", "locality", "knowedit", "efficiency", "batch", "sequential")
PIQA_FILE = "locality/piqa_valid.jsonl"
PIQA_LABELS = "locality/piqa_valid-labels.lst"
WIKITEXT_FILE = "wikitext/wikitext-2-raw/wiki.test.raw"
BATCH_FILE = "counterfact/easyedit_format/counterfact-edit.json"

NOT_SUPPORTED, SKIPPED, NOT_RUN, PENDING = "not supported", "skipped", "not run", "pending"


def _counterfact_with_neighbour_locality(path: Path, n: int | None) -> list[Case]:
    """CounterFact (ROME schema) with the neighbourhood prompts also as locality probes on the true
    object, EasyEdit's CounterFact locality (token agreement with the unedited model)."""
    cases = load_counterfact(path, n)
    for c in cases:
        c.locality = [Probe(p, (c.request.target_true,)) for p in c.neighborhood_prompts]
    return cases


@dataclass(frozen=True)
class Task:
    """One dataset run: ``file`` (under the data directory) read by ``load(path, n)``, edited one case
    at a time (``single``), in batches or sequentially; ``piqa``: other-task locality per case;
    ``knowedit``: EasyEdit's per-key Portability and Locality."""

    name: str
    axis: str
    file: str
    load: Callable[[Path, int | None], list[Case]]
    title: str
    mode: str = "single"
    piqa: bool = False
    knowedit: bool = False
    fluency: bool = False


TASKS = (
    Task("zsre", "basic", "zsre/zsre_dev_800.json", load_zsre, "zsRE"),
    Task("counterfact", "basic", "counterfact/counterfact_dev_800.json", _counterfact_with_neighbour_locality,
         "CounterFact", piqa=True, fluency=True),
    Task("counterfact_one_hop", "portability", "counterfact/easyedit_rome_format/counterfact_portability_gpt4.json",
         load_counterfact, "CounterFact one-hop"),
    Task("zsre_subject_replace", "portability", "zsre/zsre_subject_replace.json", load_zsre_subject_replace,
         "zsRE subject replace"),
    Task("counterfact_subject_replace", "portability",
         "counterfact/easyedit_rome_format/counterfact_subject_replace.json", load_counterfact_subject_replace,
         "CounterFact subject replace"),
    Task("zsre_inverse_relation", "portability", "zsre/zsre_inverse_relation.json", load_zsre_inverse_relation,
         "zsRE reversed relation"),
    Task("other_attribution", "locality", "counterfact/easyedit_rome_format/counterfact_other_attribution.json",
         load_counterfact_other_attribution, "Other attribution"),
    Task("distracting_neighbor", "locality", "counterfact/easyedit_rome_format/counterfact_distracting_neighbor.json",
         load_counterfact_distracting_neighbor, "Distracting neighbour"),
    Task("knowedit_wiki_recent", "knowedit", "knowedit/wiki_recent_train.json", load_knowedit, "WikiData_recent",
         knowedit=True, fluency=True),
    Task("knowedit_zsre", "knowedit", "knowedit/ZsRE-test-all.json", load_knowedit, "ZsRE", knowedit=True,
         fluency=True),
    Task("knowedit_wikibio", "knowedit", "knowedit/wikibio_test_all.json", load_knowedit, "WikiBio", knowedit=True,
         fluency=True),
    Task("knowedit_wiki_counterfact", "knowedit", "knowedit/wiki_counterfact_train_cf.json", load_knowedit,
         "WikiData_counterfact", knowedit=True, fluency=True),
    Task("counterfact_edit", "batch", BATCH_FILE, load_counterfact_easyedit, "CounterFact (EasyEdit edit split)",
         mode="batch"),
    Task("counterfact_edit", "sequential", BATCH_FILE, load_counterfact_easyedit,
         "CounterFact (EasyEdit edit split)", mode="sequential"),
)

# Which tasks each axis reads (a task runs once, whichever axes ask for it).
AXIS_TASKS = {
    "basic": ("zsre", "counterfact"),
    "portability": ("zsre", "counterfact_one_hop", "zsre_subject_replace", "counterfact_subject_replace",
                    "zsre_inverse_relation"),
    "locality": ("other_attribution", "distracting_neighbor", "counterfact"),
    "knowedit": ("knowedit_wiki_recent", "knowedit_zsre", "knowedit_wikibio", "knowedit_wiki_counterfact"),
    "efficiency": ("counterfact",),
    "batch": ("counterfact_edit",),
    "sequential": ("counterfact_edit",),
}


def _tasks_for(axes: Sequence[str]) -> list[Task]:
    names = {x for a in axes for x in AXIS_TASKS[a]}
    return [t for t in TASKS if (t.name in names if t.mode == "single" else t.axis in axes)]


def _task_dir(out: Path, t: Task, method: str) -> Path:
    return out / t.axis / t.name / method


# --------------------------------------------------------------------------- per-case extras
def _keyed(case: Case, what: str) -> dict[str, Case]:
    """KnowEdit: one case per key of ``case.<what>`` (locality or portability), with only that key's probes."""
    probes, keys = getattr(case, what), case.extra.get(f"{what}_keys") or []
    out: dict[str, Case] = {}
    for k in dict.fromkeys(keys):
        sub = [p for p, kk in zip(probes, keys) if kk == k]
        out[k] = dataclasses.replace(case, paraphrase_prompts=[], neighborhood_prompts=[], attribute_prompts=[],
                                     generation_prompts=[], locality=sub if what == "locality" else [],
                                     portability=sub if what == "portability" else [])
    return out


def _input_only(edits: Sequence[Edit]) -> bool:
    """Edits that change only the prompt (input transforms, e.g. IKE): perplexity and PIQA, which feed
    raw token windows, cannot see them."""
    return bool(edits) and all(not e.deltas and not e.hook_modules for e in edits)


INPUT_ONLY_REASON = ("the edit only transforms the prompt; perplexity and PIQA read the weights and hooks, "
                     "so they cannot see it")


def _piqa_window(items: list, i: int, k: int) -> list:
    if not items or k <= 0:
        return []
    start = (i * k) % len(items)
    return [items[(start + j) % len(items)] for j in range(min(k, len(items)))]


@dataclass
class _Context:
    lm: Any
    normalize: str
    gen_length: int
    seed: int
    fluency: bool
    piqa: list
    piqa_per_case: int
    piqa_general: int
    ppl_tokens: Any  # a 1-D token tensor, or None without WikiText
    ppl_seq_len: int = 512


def _general(ctx: _Context, edits) -> dict:
    """Perplexity (WikiText-2 test) and PIQA accuracy on the model as it is now."""
    rec: dict = {}
    if _input_only(edits):
        rec["unsupported"] = {"perplexity": INPUT_ONLY_REASON, "piqa": INPUT_ONLY_REASON}
        return rec
    if ctx.ppl_tokens is not None:
        rec["perplexity"] = perplexity(ctx.lm, ctx.ppl_tokens, seq_len=ctx.ppl_seq_len)
    if ctx.piqa and ctx.piqa_general > 0:
        rec["piqa"] = choice_accuracy(ctx.lm, ctx.piqa[:ctx.piqa_general])
    return rec


# --------------------------------------------------------------------------- the runs
def _run_groups(t: Task, m, method: str, cases: list[Case], hp, rt: Runtime, store: _Store, size: int,
                ctx: _Context, progress: Callable[[str], None]) -> None:
    """Single (size 1) or batch mode: each group of ``size`` cases is written at once (registry.write:
    one edit for a batched method, one per request in turn otherwise), every case of it scored with
    :func:`score_case` (plus the task's extras), then reverted. Batch mode also measures general
    ability after the first batch."""
    lm = ctx.lm
    position = {id(c): i for i, c in enumerate(cases)}
    groups = [cases[i:i + size] for i in range(0, len(cases), size)]
    for gi, g in enumerate(groups):
        keys = [str(c.case_id) for c in g]
        want_general = t.mode == "batch" and gi == 0 and "general" not in store.done
        if all(k in store.done for k in keys) and not want_general:
            continue
        # the unedited model's side: locality references, KnowEdit per-key references, PIQA windows
        refs = {c.case_id: reference_predictions(lm, c) for c in g if c.locality}
        key_refs = {c.case_id: {k: reference_predictions(lm, s) for k, s in _keyed(c, "locality").items()}
                    for c in g if t.knowedit}
        piqa_before = {c.case_id: choice_accuracy(lm, w) for c in g
                       if t.piqa and (w := _piqa_window(ctx.piqa, position[id(c)], ctx.piqa_per_case))}
        reqs = [r for c in g for r in _requests(c)]
        with Measure(lm.device) as meas:
            edits = [] if m is None else write(m, reqs, model=lm, hparams=hp, runtime=rt)
        try:
            for c, k in zip(g, keys):
                if k in store.done:
                    continue
                rec = {"key": k, "case_id": c.case_id, "method": method,
                       **score_case(lm, c, reference=refs.get(c.case_id), normalize=ctx.normalize,
                                    fluency=ctx.fluency and t.fluency, gen_length=ctx.gen_length, seed=ctx.seed)}
                rec.pop("generations", None)
                if t.knowedit:
                    loc = {kk: score_case(lm, s, reference=key_refs[c.case_id][kk], fluency=False).get("locality")
                           for kk, s in _keyed(c, "locality").items()}
                    port = {kk: score_case(lm, s, fluency=False).get("portability")
                            for kk, s in _keyed(c, "portability").items()}
                    rec["knowedit_locality_by_key"], rec["knowedit_portability_by_key"] = loc, port
                    rec["knowedit_locality"] = float(np.mean(list(loc.values()))) if loc else None
                    rec["knowedit_portability"] = float(np.mean(list(port.values()))) if port else None
                if c.case_id in piqa_before:
                    if _input_only(edits):
                        rec["unsupported"] = {"piqa_after": INPUT_ONLY_REASON, "piqa_delta": INPUT_ONLY_REASON}
                    else:
                        after = choice_accuracy(lm, _piqa_window(ctx.piqa, position[id(c)], ctx.piqa_per_case))
                        rec["piqa_before"], rec["piqa_after"] = piqa_before[c.case_id], after
                        rec["piqa_delta"] = after - piqa_before[c.case_id]
                rec["edit_seconds"] = meas.seconds / len(reqs) if edits else None
                rec["peak_memory_mb"] = meas.peak_mb if edits else None
                rec["n_requests_in_edit"] = len(reqs)
                rec["edit_kinds"] = sorted({kind for e in edits for kind in e.kinds})
                rec["statistics"] = _statistics_of(edits)
                store.add(rec)
            if want_general:
                store.add({"key": "general", "n_edits": len(reqs), **_general(ctx, edits)})
        finally:
            for e in reversed(edits):
                e.revert(lm)
        progress(f"{t.name} {method} {min(len(cases), (gi + 1) * size)}/{len(cases)}")


def _run_sequential(t: Task, m, method: str, cases: list[Case], hp, rt: Runtime, store: _Store,
                    checkpoints: list[int], ctx: _Context, progress: Callable[[str], None]) -> None:
    """Edits accumulate case after case (:func:`edit.eval.sequential.sequential`); at each checkpoint
    every case edited so far is scored, with general ability (also before any edit). Each case's
    edits are saved under ``edits/`` and re-applied on resume, as the harness's sequential mode does."""
    lm = ctx.lm
    refs = {c.case_id: reference_predictions(lm, c) for c in cases if c.locality}
    if "general/0" not in store.done:
        store.add({"key": "general/0", "n_edits": 0, **_general(ctx, [])})
    replay, on_batch = saved_edits(store, cases, lm, lambda new: {"edit_kinds": sorted({k for e in new for k in e.kinds})})

    def score(lm_, run):
        n = run.n_batches
        if n not in checkpoints:
            return None
        for prev in cases[:n]:
            k = f"{n}/{prev.case_id}"
            if k not in store.done:
                rec = score_case(lm, prev, reference=refs.get(prev.case_id), normalize=ctx.normalize, fluency=False)
                store.add({"key": k, "case_id": prev.case_id, "method": method, "n_edits": n, **rec})
        if f"general/{n}" not in store.done:
            store.add({"key": f"general/{n}", "n_edits": n, **_general(ctx, run.edits)})
        progress(f"{t.name} {method} sequential {n}/{len(cases)}")
        return n

    if m is None:
        class _Unedited:
            n_batches = 0
            edits: list = []
        r = _Unedited()
        for n in checkpoints:
            r.n_batches = n
            score(lm, r)
        return
    run = sequential(None, m, model=lm, batches=[_requests(c) for c in cases], hparams=hp, runtime=rt,
                     checkpoints=checkpoints, callback=score, replay=replay, on_batch=on_batch, progress=False)
    run.revert()


def _status(d: Path, status: dict | None) -> None:
    f = d / "status.json"
    if status is None:
        if f.is_file():
            f.unlink()
        return
    d.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(status, indent=1))


# --------------------------------------------------------------------------- the entry point
def benchmark(methods: Sequence[str] | str | None = None, *, model=None, data_dir: str | Path | None = None,
              out: str | Path, n: int = 200, axes: Sequence[str] | str = AXES,
              batch_sizes: Sequence[int] = (1, 10, 100, 1000), checkpoints: Sequence[int] = (1, 10, 100, 1000),
              hparams: dict[str, dict] | None = None, fluency: bool = True, gen_length: int = 100,
              normalize: str = "sum", piqa_per_case: int = 20, piqa_general: int = 200,
              ppl_tokens: int = 20_000, ppl_seq_len: int = 512, corpus=None, seed: int = 0, resume: bool = True,
              figures: bool = True, progress: bool = True) -> str:
    """Run ``methods`` (registered names, ``"none"`` for the unedited model; default every registered
    method) over ``axes`` (default all of :data:`AXES`; see the module docstring) on ``model`` (default
    the toolkit's default model), write the records under ``out`` and the report ``out/report.md``,
    and return the report's text (figures: :func:`viz.benchmark_figures`, then :func:`build_report`).

    ``n``: cases per dataset (the first ``n`` of each file). ``batch_sizes``: the batch axis's sizes
    (size b edits the first max(n, b) cases). ``checkpoints``: numbers of accumulated edits at which
    the sequential axis scores (it edits the first max(checkpoints) cases). ``hparams``: per-method
    overrides (``{"rome": {"v_steps": 3}}``). ``fluency``: sample generations for the fluency columns
    (``gen_length`` tokens). ``normalize``: P of a multi-token target, ``"sum"`` (the definition) or
    ``"mean"`` (the ROME code). ``piqa_per_case``: PIQA questions per CounterFact case for the
    other-task locality; ``piqa_general`` and ``ppl_tokens``: PIQA questions and WikiText-2 test
    tokens for general ability on the batch and sequential axes, perplexity in windows of ``ppl_seq_len``
    tokens (at most the model's context). ``corpus``: the key statistics'
    source (:class:`edit.registry.Runtime`).

    Bad input is refused before any work: an unregistered method name (with the registered names), an
    unknown axis, a batch size or checkpoint below 1. A missing data file is named in a
    :class:`BenchmarkDataWarning`, the tasks it feeds are skipped, and the run goes on."""
    if methods is None:
        from_registry = True
        methods = list(registered_methods())
    else:
        from_registry = False
        methods = [x.strip() for x in methods.split(",")] if isinstance(methods, str) else list(methods)
    if not methods:
        raise InvalidArgumentError("no methods to benchmark")
    resolved = {name: (None if name == NONE else get_method(name)) for name in methods}  # unknown: refused here
    axes = [a.strip() for a in axes.split(",")] if isinstance(axes, str) else list(axes)
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise InvalidArgumentError(f"unknown axis {bad or axes!r}; choose from {list(AXES)}")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    checkpoints = sorted({int(c) for c in checkpoints})
    if (batch_sizes and batch_sizes[0] < 1) or (checkpoints and checkpoints[0] < 1) or n < 1:
        raise InvalidArgumentError(f"n, batch sizes and checkpoints must be at least 1, got n={n}, "
                                   f"batch_sizes={batch_sizes}, checkpoints={checkpoints}")
    hparams = dict(hparams or {})
    unknown_hp = sorted(set(hparams) - set(methods))
    if unknown_hp:
        raise InvalidArgumentError(f"hparams given for methods not benchmarked: {unknown_hp}")
    for name, mm in resolved.items():
        if mm is not None:
            mm.make_hparams(hparams.get(name))  # an unknown hyperparameter is refused before any work
    data = find_data_dir(data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda s: print(s, flush=True)) if progress else (lambda s: None)
    lm = resolve_model(model)

    tasks = _tasks_for(axes)
    missing: dict[str, list[str]] = {}

    def need(rel: str, what: str) -> bool:
        if (data / rel).is_file():
            return True
        if rel not in missing:
            warnings.warn(f"data file {rel} not found in {data}: {what} skipped", BenchmarkDataWarning, stacklevel=3)
        missing.setdefault(rel, []).append(what)
        return False

    piqa_wanted = any(t.piqa for t in tasks) or any(t.mode != "single" for t in tasks)
    piqa = (load_piqa(data / PIQA_FILE) if piqa_wanted and need(PIQA_FILE, "PIQA (other-task locality, "
                                                                           "general ability)")
            and need(PIQA_LABELS, "PIQA (other-task locality, general ability)") else [])
    ppl = None
    if any(t.mode != "single" for t in tasks) and need(WIKITEXT_FILE, "WikiText-2 perplexity (general ability)"):
        ppl = token_stream(lm, data / WIKITEXT_FILE, ppl_tokens)[0]
    ctx = _Context(lm, normalize, gen_length, seed, fluency, piqa, piqa_per_case, piqa_general, ppl, ppl_seq_len)

    manifest = {"methods": methods, "from_registry": from_registry, "axes": axes, "model": lm.name,
                "fingerprint": lm.state_fingerprint, "data_dir": str(data), "n": n, "batch_sizes": batch_sizes,
                "checkpoints": checkpoints, "fluency": fluency, "normalize": normalize,
                "piqa_per_case": piqa_per_case if piqa else 0, "piqa_general": piqa_general if piqa else 0,
                "ppl_tokens": ppl_tokens if ppl is not None else 0, "ppl_seq_len": ppl_seq_len, "hparams": hparams, "tasks": {},
                "missing": missing}
    loaded: dict[tuple[str, str], list[Case]] = {}
    for t in tasks:
        entry = {"axis": t.axis, "file": t.file, "mode": t.mode, "title": t.title}
        manifest["tasks"][f"{t.axis}/{t.name}"] = entry
        if not need(t.file, f"{t.axis}/{t.name}"):
            entry["missing"] = t.file
            continue
        size = n if t.mode == "single" else (max(n, max(batch_sizes)) if t.mode == "batch" else max(checkpoints))
        cases = t.load(data / t.file, size)
        cases, dropped = _checked(cases, lm)
        entry["n_cases"], entry["dropped"] = len(cases), dropped + int(cases[0].extra.get("skipped", 0) if cases else 0)
        if not cases:
            entry["missing"] = f"{t.file} (no usable case)"
            continue
        loaded[(t.axis, t.name)] = cases
        if t.mode == "sequential":
            entry["checkpoints"] = [c for c in checkpoints if c <= len(cases)] or [len(cases)]
    (out / "benchmark.json").write_text(json.dumps(manifest, indent=1, default=str))

    rt_base = dict(corpus=corpus, progress=False, seed=seed, data_dir=data)
    for name, m in resolved.items():
        hp = None if m is None else m.pin(lm, m.make_hparams(hparams.get(name)))[0]
        hp_desc = _describe_hparams(dataclasses.asdict(hp)) if hp is not None else {}
        rt = Runtime(**rt_base, check_efficacy=False)
        for t in tasks:
            cases = loaded.get((t.axis, t.name))
            if cases is None:
                continue
            base = dict(task=t.name, method=name, hparams=hp_desc, fingerprint=lm.state_fingerprint,
                        cases=[str(c.case_id) for c in cases], normalize=normalize, seed=seed,
                        statistics=str(corpus))
            runs: list[tuple[Path, dict, Callable]] = []
            d = _task_dir(out, t, name)
            if t.mode == "single":
                s = {**base, "fluency": fluency and t.fluency, "gen_length": gen_length,
                     "piqa_per_case": ctx.piqa_per_case if t.piqa and piqa else 0}
                runs.append((d, s, lambda st, t=t, cases=cases: _run_groups(t, m, name, cases, hp, rt, st, 1, ctx, say)))
            elif t.mode == "batch":
                for b in batch_sizes:
                    cb = cases[:max(n, b)]
                    s = {**base, "cases": [str(c.case_id) for c in cb], "batch_size": b,
                         "general": [ctx.piqa_general if piqa else 0, ppl_tokens if ppl is not None else 0, ppl_seq_len]}
                    runs.append((d / f"b{b}", s, lambda st, t=t, cb=cb, b=b: _run_groups(t, m, name, cb, hp, rt, st, b,
                                                                                           ctx, say)))
            else:
                cps = manifest["tasks"][f"{t.axis}/{t.name}"]["checkpoints"]
                s = {**base, "checkpoints": cps,
                     "general": [ctx.piqa_general if piqa else 0, ppl_tokens if ppl is not None else 0, ppl_seq_len]}
                runs.append((d, s, lambda st, t=t, cases=cases, cps=cps: _run_sequential(
                    t, m, name, cases, hp, Runtime(**rt_base, check_efficacy=True), st, cps, ctx, say)))
            for d_, s, fn in runs:
                store = _Store(d_, s, resume)
                try:
                    fn(store)
                    _status(d_, None)
                except (LocateEditError, NotImplementedError) as e:
                    if isinstance(e, InvalidArgumentError):
                        raise
                    reason = f"{type(e).__name__}: {e}"
                    warnings.warn(f"{name} cannot run {t.axis}/{t.name}: {reason}", UnsupportedAxisWarning,
                                  stacklevel=2)
                    _status(d_, {"status": NOT_SUPPORTED, "reason": reason})
    return build_report(out, figures=figures)


def _checked(cases: list[Case], lm) -> tuple[list[Case], int]:
    """The cases whose requests are valid on this model (a subject the tokenizer splits oddly, an empty
    target), and how many were left out."""
    ok = []
    for c in cases:
        try:
            for r in c.requests:
                r.check(lm)
        except (InvalidRequestError, LocateEditError):
            continue
        ok.append(c)
    return ok, len(cases) - len(ok)


# --------------------------------------------------------------------------- the report, from the records alone
LOWER_IS_BETTER = {"perplexity", "edit_seconds", "peak_memory_mb"}
NOT_PERCENT = {"fluency", "perplexity", "edit_seconds", "peak_memory_mb"}

# (axis, title, [(task, metric, column label)]): the survey's tables, methods as rows
TABLES = (
    ("basic", "Reliability, generalisation and locality: token accuracy (the survey's / EasyEdit's metrics)",
     [("zsre", "rewrite_acc", "zsRE Rel."), ("zsre", "paraphrase_acc", "zsRE Gen."), ("zsre", "locality", "zsRE Loc."),
      ("counterfact", "rewrite_acc", "CF Rel."), ("counterfact", "paraphrase_acc", "CF Gen."),
      ("counterfact", "locality", "CF Loc.")]),
    ("basic", "Reliability, generalisation and locality: probability comparisons (ROME's / MEMIT's metrics)",
     [("zsre", "es", "zsRE ES"), ("zsre", "ps", "zsRE PS"), ("counterfact", "es", "CF ES"),
      ("counterfact", "ps", "CF PS"), ("counterfact", "ns", "CF NS"), ("counterfact", "score", "CF S"),
      ("counterfact", "fluency", "CF Flu.")]),
    ("portability", "Portability (token accuracy of the new answer)",
     [("zsre", "portability", "zsRE one-hop"), ("counterfact_one_hop", "portability", "CF one-hop"),
      ("zsre_subject_replace", "portability", "zsRE subj. repl."),
      ("counterfact_subject_replace", "portability", "CF subj. repl."),
      ("zsre_inverse_relation", "portability", "zsRE reversed rel.")]),
    ("locality", "Harder locality",
     [("other_attribution", "locality", "Other attr. Loc."), ("distracting_neighbor", "ns", "Distr. nbr. NS"),
      ("distracting_neighbor", "locality", "Distr. nbr. Loc."), ("counterfact", "piqa_after", "PIQA after"),
      ("counterfact", "piqa_delta", "PIQA change")]),
    ("knowedit", "KnowEdit (EasyEdit's metrics)",
     [(t, k, f"{lab} {c}") for t, lab in (("knowedit_wiki_recent", "Recent"), ("knowedit_zsre", "ZsRE"),
                                          ("knowedit_wikibio", "WikiBio"), ("knowedit_wiki_counterfact", "CF"))
      for k, c in (("rewrite_acc", "Succ."), ("knowedit_portability", "Port."), ("knowedit_locality", "Loc."),
                   ("fluency", "Flu.")) if not (t == "knowedit_wikibio" and k == "knowedit_portability")]),
    ("efficiency", "Efficiency (CounterFact, one edit at a time)",
     [("counterfact", "edit_seconds", "s/edit"), ("counterfact", "peak_memory_mb", "peak MB")]),
)
CURVE_COLUMNS = (("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("score", "S"), ("rewrite_acc", "Rel."),
                 ("paraphrase_acc", "Gen."), ("locality", "Loc."), ("perplexity", "PPL"), ("piqa", "PIQA"))
GENERAL = {"perplexity", "piqa"}


@dataclass
class BenchmarkData:
    """A benchmark's results directory, read back: the manifest and every run's records and status."""

    out: Path
    manifest: dict
    runs: dict[str, dict] = field(default_factory=dict)  # "<axis>/<task>/<method>[/b<size>]" -> run

    @property
    def methods(self) -> list[str]:
        return list(self.manifest["methods"])

    def run(self, axis: str, task: str, method: str, sub: str | None = None) -> dict | None:
        return self.runs.get("/".join([axis, task, method] + ([sub] if sub else [])))

    def _task(self, axis: str, task: str) -> dict | None:
        return self.manifest["tasks"].get(f"{axis}/{task}")

    def _missing_general(self, metric: str) -> str | None:
        if metric in ("piqa", "piqa_after", "piqa_delta", "piqa_before") and not self.manifest.get("piqa_per_case") \
                and not self.manifest.get("piqa_general"):
            return PIQA_FILE
        if metric == "perplexity" and not self.manifest.get("ppl_tokens"):
            return WIKITEXT_FILE
        return None

    def cell(self, axis: str, task: str, method: str, metric: str, *, sub: str | None = None,
             checkpoint: int | None = None) -> float | str:
        """A table cell: a number, or why there is none (not run, skipped, not supported, pending)."""
        if axis not in self.manifest["axes"]:
            return NOT_RUN
        entry = self._task(axis, task) or next((v for k, v in self.manifest["tasks"].items()
                                                if k.endswith(f"/{task}")), None)
        if entry is None:
            return NOT_RUN
        if entry.get("missing"):
            return f"{SKIPPED} (no {entry['missing']})"
        r = self.run(entry["axis"], task, method, sub)
        if r is None:
            return PENDING
        if r["status"] and r["status"].get("status") == NOT_SUPPORTED:
            return NOT_SUPPORTED
        gone = self._missing_general(metric)
        if gone:
            return f"{SKIPPED} (no {gone})"
        recs = r["records"]
        if metric in GENERAL:
            g = recs.get("general" if checkpoint is None else f"general/{checkpoint}")
            if g is None:
                return PENDING
            if metric in (g.get("unsupported") or {}):
                return NOT_SUPPORTED
            return g.get(metric, "n/a")
        if checkpoint is not None:
            cases = [v for k, v in recs.items() if k.startswith(f"{checkpoint}/")]
        else:
            cases = [v for k, v in recs.items() if "/" not in k and k != "general"]
        if not cases:
            return PENDING
        if any(metric in (c.get("unsupported") or {}) for c in cases):
            return NOT_SUPPORTED
        if checkpoint is not None and metric == "edit_seconds":
            cases = [v for k, v in recs.items() if k.startswith("cost/")]
        agg = aggregate(cases)
        if metric in agg and isinstance(agg[metric], (int, float)):
            return float(agg[metric])
        vals = [c[metric] for c in cases if isinstance(c.get(metric), (int, float)) and not
                (isinstance(c[metric], float) and math.isnan(c[metric]))]
        return float(np.mean(vals)) if vals else "n/a"

    # ---- what the figures need (viz.benchmark draws them)
    def batch_curves(self) -> dict[str, dict[int, dict[str, float]]]:
        """method -> batch size -> {metric: value} (numbers only)."""
        if "batch" not in self.manifest["axes"]:
            return {}
        return {m: {b: self._numbers("batch", m, sub=f"b{b}") for b in self.manifest["batch_sizes"]}
                for m in self.methods}

    def sequential_curves(self) -> dict[str, dict[int, dict[str, float]]]:
        """method -> number of edits -> {metric: value}; 0 holds general ability before any edit."""
        entry = self.manifest["tasks"].get("sequential/counterfact_edit")
        if "sequential" not in self.manifest["axes"] or not entry or entry.get("missing"):
            return {}
        out = {}
        for m in self.methods:
            curve = {0: {k: v for k in GENERAL
                         if isinstance(v := self.cell("sequential", "counterfact_edit", m, k, checkpoint=0), float)}}
            for c in entry.get("checkpoints", []):
                curve[c] = self._numbers("sequential", m, checkpoint=c)
            out[m] = curve
        return out

    def _numbers(self, axis: str, method: str, **kw) -> dict[str, float]:
        cols = [k for k, _ in CURVE_COLUMNS] + ["edit_seconds"]
        return {k: v for k in cols if isinstance(v := self.cell(axis, "counterfact_edit", method, k, **kw), float)}

    def cost(self) -> dict[str, dict[str, float]]:
        """method -> {edit_seconds, peak_memory_mb} on the CounterFact task."""
        return {m: {k: v for k in ("edit_seconds", "peak_memory_mb")
                    if isinstance(v := self.cell("efficiency", "counterfact", m, k), float)} for m in self.methods}

    def summary(self) -> dict[str, dict[str, float]]:
        """method -> {column label: value in [0, 1]}: every percentage column of the axis tables."""
        out: dict[str, dict[str, float]] = {m: {} for m in self.methods}
        for axis, _, cols in TABLES:
            for task, metric, label in cols:
                if metric in NOT_PERCENT or metric == "piqa_delta":
                    continue
                for m in self.methods:
                    v = self.cell(axis, task, m, metric)
                    if isinstance(v, float):
                        out[m][label] = v
        return out


def load_benchmark(out: str | Path) -> BenchmarkData:
    """Read a benchmark results directory (``benchmark.json`` and every run's records)."""
    out = Path(out)
    mf = out / "benchmark.json"
    if not mf.is_file():
        raise DatasetNotFoundError(f"no benchmark results in {out} ({mf.name} not found)")
    manifest = json.loads(mf.read_text())
    data = BenchmarkData(out, manifest)
    for key, entry in manifest["tasks"].items():
        axis, task = key.split("/", 1)
        subs = [f"b{b}" for b in manifest["batch_sizes"]] if entry["mode"] == "batch" else [None]
        for m in manifest["methods"]:
            for sub in subs:
                d = out / axis / task / m / (sub or "")
                if not d.is_dir():
                    continue
                recs: dict[str, dict] = {}
                rf = d / "records.jsonl"
                if rf.is_file():
                    for line in rf.read_text().splitlines():
                        if line.strip():
                            r = json.loads(line)
                            recs[r["key"]] = r
                sf = d / "status.json"
                data.runs["/".join([axis, task, m] + ([sub] if sub else []))] = {
                    "records": recs, "status": json.loads(sf.read_text()) if sf.is_file() else None}
    return data


def _fmt(metric: str, v: float | str) -> str:
    if isinstance(v, str):
        return v
    if metric not in NOT_PERCENT:
        return f"{100 * v:.1f}"
    if metric == "edit_seconds":
        return f"{v:.3g}"
    if metric == "peak_memory_mb":
        return f"{v:.1f}"
    return f"{v:.2f}"


def _table(rows: list[str], cols: list[tuple[str, str]], values: dict[tuple[str, int], float | str]) -> list[str]:
    """Markdown table, methods as rows; the best number of each column in bold (ties all bold)."""
    best = {}
    for j, (metric, _) in enumerate(cols):
        nums = [values[(r, j)] for r in rows if isinstance(values[(r, j)], float) and not math.isnan(values[(r, j)])]
        if nums:
            best[j] = min(nums) if metric in LOWER_IS_BETTER else max(nums)
    lines = ["| Method | " + " | ".join(lab for _, lab in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for j, (metric, _) in enumerate(cols):
            v = values[(r, j)]
            s = _fmt(metric, v)
            cells.append(f"**{s}**" if isinstance(v, float) and j in best and _fmt(metric, best[j]) == s else s)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


FIGURES = (("summary.png", "Summary per method (every percentage column)"),
           ("cost.png", "Time and peak memory per edit"),
           ("batch.png", "Metrics against batch size"),
           ("sequential.png", "Metrics against the number of sequential edits"))


def report_text(data: BenchmarkData) -> str:
    """The report's markdown (tables from the records; links to the figures found under ``figures/``)."""
    mf = data.manifest
    rows = data.methods
    lines = ["# Survey benchmark", "",
             f"Model `{mf['model']}` (state {mf['fingerprint'][:12]}); data `{mf['data_dir']}`; the first {mf['n']} "
             f"cases of each dataset; axes: {', '.join(mf['axes'])}; metric normalisation `{mf['normalize']}`.",
             "Percentages except fluency (bits), perplexity, seconds and MB. The best value of each column is in "
             "bold (lowest for perplexity, time and memory). `not supported`: the method cannot run that axis, "
             "or the measure cannot see its edit; `skipped`: a data file is missing; `pending`: not computed yet; "
             "`not run`: the axis was not asked for; `n/a`: none of the cases has a probe for that column.", ""]
    if mf.get("missing"):
        lines += ["Missing data files (their axes were skipped): "
                  + "; ".join(f"`{f}` ({', '.join(sorted(set(w)))})" for f, w in sorted(mf["missing"].items())), ""]
    counts = [f"{k}: {v['n_cases']}" + (f" ({v['dropped']} left out)" if v.get("dropped") else "")
              for k, v in mf["tasks"].items() if "n_cases" in v]
    if counts:
        lines += ["Cases per task: " + "; ".join(counts) + ".", ""]
    for axis, title, cols in TABLES:
        if axis not in mf["axes"]:
            continue
        vals = {(m, j): data.cell(axis, task, m, metric) for m in rows for j, (task, metric, _) in enumerate(cols)}
        lines += [f"## {title}", ""] + _table(rows, [(mt, lab) for _, mt, lab in cols], vals) + [""]
    cols = list(CURVE_COLUMNS)
    if "batch" in mf["axes"]:
        lines += ["## Batch editing", "",
                  "Methods without batches (`batched=False`) apply a batch's requests one after another. PPL "
                  "(WikiText-2 test) and PIQA are measured after the first batch.", ""]
        for b in mf["batch_sizes"]:
            bc = cols + [("edit_seconds", "s/request")]
            vals = {(m, j): data.cell("batch", "counterfact_edit", m, k, sub=f"b{b}")
                    for m in rows for j, (k, _) in enumerate(bc)}
            lines += [f"### Batch size {b}", ""] + _table(rows, bc, vals) + [""]
    entry = mf["tasks"].get("sequential/counterfact_edit")
    if "sequential" in mf["axes"]:
        lines += ["## Sequential editing", "", "Every case edited so far is scored at each checkpoint; 0 edits: "
                  "the unedited model's general ability.", ""]
        cps = [0] + list((entry or {}).get("checkpoints", mf["checkpoints"]))
        for c in cps:
            cc = [x for x in cols if x[0] in GENERAL] if c == 0 else cols
            vals = {(m, j): data.cell("sequential", "counterfact_edit", m, k, checkpoint=c)
                    for m in rows for j, (k, _) in enumerate(cc)}
            lines += [f"### After {c} edit{'' if c == 1 else 's'}", ""] + _table(rows, cc, vals) + [""]
    figs = [(f, cap) for f, cap in FIGURES if (data.out / "figures" / f).is_file()]
    if figs:
        lines += ["## Figures", ""] + [f"![{cap}](figures/{f})" for f, cap in figs] + [""]
    return "\n".join(lines)


def build_report(out: str | Path, *, figures: bool = True) -> str:
    """Rebuild ``out/report.md`` from the results directory alone and return its text. ``figures``:
    link the figures found under ``out/figures`` (draw them with :func:`viz.benchmark_figures`)."""
    data = load_benchmark(out)
    if not figures:
        data = dataclasses.replace(data, out=Path(out) / "__no_figures__")
    text = report_text(data)
    (Path(out) / "report.md").write_text(text + "\n")
    return text
