"""MEMIT-CSK vs MEMIT at subject tokens on the PEP3k and 20Q edit and probe sets (Gupta et al. 2023).

For each dataset:

* configuration generalisation: the edit set's statements the unedited model judges wrongly are edited
  in one batch (the authors edit up to 1,000 at once) toward their labels; efficacy, relapse and
  accuracy before/after over the whole edit set (:func:`edit.eval.commonsense.config_scores`);
* semantic generalisation: the probe set's statements are edited in one batch; the probe accuracies
  (affected paraphrase / neighbourhood / reasoning, unaffected neighbourhood agreement;
  :func:`edit.eval.commonsense.probe_scores`).

Methods: ``memit`` (its default layers, keys at the subject) and ``memit-csk`` at each ``--edit-tokens``
token, whose window is chosen by tracing that token (:func:`edit.methods.memit_csk.edit_token_profile`)
on the edit-validation set's wrongly judged statements, as the authors choose their window on that set.

Resumable: every (dataset, setting, method) result is one JSON file under ``--out`` (default
``results/memit_csk/``), as are the unedited predictions and the traced profiles; a file made with the
same settings is not recomputed. ``--n`` limits each set to its first n statements (a quick check).

    python bench/memit_csk_bench.py --n 3             # a check that it runs
    python bench/memit_csk_bench.py                   # the full comparison (hours on a CPU)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import edit
import locate
from edit.eval.commonsense import config_scores, predict_labels, probe_predictions, probe_scores
from edit.eval.datasets import find_data_dir, load_csk, load_csk_probes
from edit.methods.memit_csk import edit_token_profile
from locate import LayerProfile
from _records import read, write  # bench/_records.py (scripts run from bench/)


def profile_for(lm, out: Path, ds_dir: Path, token: str, args) -> LayerProfile | None:
    settings = {"token": token, "n": args.profile_n, "samples": args.trace_samples, "model": lm.fingerprint}
    path = out / f"profile_{token}.json"
    rec = read(path, settings)
    if rec is None:
        val = load_csk(ds_dir / "svo_annotated" / "edit_validation_set.json")
        val = [c for c in val if token == "subject" or token in c.request.spans]
        preds = predict_labels([c.request.rendered for c in val], model=lm)
        wrong = [c.request for c, p in zip(val, preds) if p != c.extra["label"]][: args.profile_n]
        if not wrong:
            return None
        prof = edit_token_profile(wrong, token, model=lm, samples=args.trace_samples)
        rec = write(path, settings, {"aie": [float(x) for x in prof.aie], "n_facts": prof.n_facts,
                                     "source": prof.source})
    return LayerProfile(aie=np.asarray(rec["aie"]), n_facts=rec["n_facts"], source=rec["source"])


def methods(lm, out: Path, ds_dir: Path, args) -> dict[str, tuple[str, dict]]:
    ms = {"memit": ("memit", {})}
    for tok in args.edit_tokens:
        prof = profile_for(lm, out, ds_dir, tok, args)
        hp = {"edit_token": tok, **({"layers": prof} if prof is not None else {})}
        ms[f"memit-csk-{tok}"] = ("memit-csk", hp)
    return ms


def run_edit(lm, method: str, hp: dict, requests, rt) -> tuple[edit.Edit, dict]:
    t0 = time.perf_counter()
    e = edit.compute(method, requests, model=lm, runtime=rt, **hp)
    info = {"layers": e.hparams.get("layers"), "seconds": time.perf_counter() - t0, "n_edits": len(requests),
            "efficacy_top1": e.metrics.get("efficacy")}
    return e, info


def config_setting(lm, out: Path, ds_dir: Path, ms, args, rt):
    cases = load_csk(ds_dir / "svo_annotated" / "edit_set.json", n=args.n)
    labels = [c.extra["label"] for c in cases]
    base = {"n": args.n, "model": lm.fingerprint}
    rec = read(out / "config_before.json", base)
    if rec is None:
        rec = write(out / "config_before.json", base, {"pred": predict_labels([c.request.rendered for c in cases], model=lm)})
    before = rec["pred"]
    for name, (method, hp) in ms.items():
        settings = {**base, "method": method, "hp": {k: v for k, v in hp.items() if k != "layers"}}
        path = out / f"config_{name}.json"
        if read(path, settings) is not None:
            continue
        tok = hp.get("edit_token", "subject")
        todo = [c.request for c, b in zip(cases, before)
                if b != c.extra["label"] and (tok == "subject" or tok in c.request.spans)]
        if not todo:
            write(path, settings, {"skipped": "the unedited model judges every statement correctly"})
            continue
        e, info = run_edit(lm, method, hp, todo, rt)
        with edit.applied(lm, e):
            after = predict_labels([c.request.rendered for c in cases], model=lm)
        write(path, settings, {**info, "scores": config_scores(labels, before, after)})
        print(f"  config {name}: {config_scores(labels, before, after)}", flush=True)


def semantic_setting(lm, out: Path, ds_dir: Path, ms, args, rt):
    cases = load_csk_probes(ds_dir / "probe_set.json", n=args.n)
    base = {"n": args.n, "model": lm.fingerprint}
    rec = read(out / "probe_before.json", base)
    if rec is None:
        rec = write(out / "probe_before.json", base, {"pred": probe_predictions(cases, model=lm)})
    before = rec["pred"]
    for name, (method, hp) in ms.items():
        settings = {**base, "method": method, "hp": {k: v for k, v in hp.items() if k != "layers"}}
        path = out / f"probe_{name}.json"
        if read(path, settings) is not None:
            continue
        e, info = run_edit(lm, method, hp, [c.request for c in cases], rt)
        with edit.applied(lm, e):
            after = probe_predictions(cases, model=lm)
        scores = probe_scores(cases, after, before)
        write(path, settings, {**info, "scores": scores, "before": probe_scores(cases, before)})
        print(f"  probe {name}: {scores}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="pep3k,20q")
    ap.add_argument("--edit-tokens", default="subject,verb,object")
    ap.add_argument("--n", type=int, default=None, help="first n statements of each set (default: all)")
    ap.add_argument("--profile-n", type=int, default=16, help="wrongly judged validation statements traced per token")
    ap.add_argument("--trace-samples", type=int, default=3)
    ap.add_argument("--model", default=None, help="model name or path (default: the toolkit's default model)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="results/memit_csk")
    args = ap.parse_args()
    args.edit_tokens = [t for t in args.edit_tokens.split(",") if t]
    lm = locate.load_model(args.model) if args.model else locate.default_model()
    data = find_data_dir(args.data_dir)
    rt = edit.Runtime(data_dir=data)
    for ds in [d for d in args.datasets.split(",") if d]:
        ds_dir = data / "memit_csk" / ds
        out = Path(args.out) / ds
        print(f"{ds}:", flush=True)
        ms = methods(lm, out, ds_dir, args)
        config_setting(lm, out, ds_dir, ms, args, rt)
        semantic_setting(lm, out, ds_dir, ms, args, rt)


if __name__ == "__main__":
    main()
