"""Attribution patching vs the exact fast path: speed on the demo prompt, agreement over known_1000.

    OMP_NUM_THREADS=1 python bench/attribution_bench.py [--n 100] [--samples 10] [--model NAME]

1. Speed: on the demo prompt of bench/trace_bench.py, the wall-clock of the exact fast path and of
   ``method="attribution"`` for each kind alone and for all three kinds in one call, same samples, noise
   and seed, and their ratio (issue 22's target: >= 50x for all three kinds). The first call of each
   path is a warm-up and not timed; attribution, being short, is timed as the median of 5 calls.
2. Agreement: over the first ``--n`` facts of known_1000 that the model knows (the reference's test,
   as trace_many), both paths with all kinds; per kind, over the (token, layer) cells from the first
   subject token on (before it both are exactly 0): the Pearson and Spearman correlation of the
   indirect effects per fact (median and mean over facts), how often the peak (token, layer) is the
   exact one, and how often the best layer at the last subject token is. ``--count-known``: ``--n``
   counts the known (traced) facts instead of the facts read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import locate
from locate._tracing import clean_states
from locate.causal_trace import KINDS, _is_known, find_known_facts, noise_level, trace

DEMO_PROMPT = "The Eiffel Tower is located in the city of"  # bench/trace_bench.py's demo
DEMO_SUBJECT = "The Eiffel Tower"


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    vals = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and vals[j + 1] == vals[i]:
            j += 1
        if j > i:
            r[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return r


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(a.ravel()), ranks(b.ravel()))


def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(lm, samples: int, noise) -> None:
    print(f"== speed: {DEMO_PROMPT!r}, subject {DEMO_SUBJECT!r}, {samples} samples, "
          f"{len(lm.encode(DEMO_PROMPT))} tokens", flush=True)
    kw = dict(model=lm, samples=samples, noise=noise, progress=False)
    trace(DEMO_PROMPT, DEMO_SUBJECT, kinds=("hidden",), method="attribution", **kw)  # warm-up
    trace(DEMO_PROMPT, DEMO_SUBJECT, kinds=("hidden",), tokens=["last"], **kw)  # warm-up (one row)
    for kinds in [(k,) for k in KINDS] + [KINDS]:
        exact = timed(lambda: trace(DEMO_PROMPT, DEMO_SUBJECT, kinds=kinds, **kw))
        approx = timed(lambda: trace(DEMO_PROMPT, DEMO_SUBJECT, kinds=kinds, method="attribution", **kw), 5)
        print(f"{'+'.join(kinds):16s} exact fast path {exact:8.2f} s   attribution {approx:7.3f} s   "
              f"ratio {exact / approx:7.1f}x", flush=True)


def agreement(lm, n: int, samples: int, noise, count_known: bool = False) -> None:
    path = find_known_facts()
    if path is None:
        print("== agreement: known_1000 not found (set LOCATE_EDIT_DATA); skipped")
        return
    facts = json.loads(path.read_text())
    facts = facts if count_known else facts[:n]
    what = f"the first {n} facts the model knows" if count_known else f"the first {len(facts)} facts"
    print(f"== agreement over {what} of {path} ({samples} samples)", flush=True)
    stats = {k: {"pearson": [], "spearman": [], "peak": [], "best_layer": []} for k in KINDS}
    t_exact = t_approx = 0.0
    skipped = 0
    for i, f in enumerate(facts):
        if count_known and len(stats["mlp"]["pearson"]) >= n:
            break
        logits, _ = clean_states(lm, lm.encode(f["prompt"]), [])
        if not _is_known(lm, f["prompt"], f["attribute"], logits):
            skipped += 1
            continue
        kw = dict(model=lm, kinds=KINDS, samples=samples, noise=noise, progress=False)
        t = time.perf_counter()
        ex = trace(f["prompt"], f["subject"], **kw)
        t_exact += time.perf_counter() - t
        t = time.perf_counter()
        ap = trace(f["prompt"], f["subject"], method="attribution", **kw)
        t_approx += time.perf_counter() - t
        s0 = ex.subject_range[0]
        for k in KINDS:
            a, b = ap.ie(k)[s0:], ex.ie(k)[s0:]
            stats[k]["pearson"].append(pearson(a, b))
            stats[k]["spearman"].append(spearman(a, b))
            stats[k]["peak"].append(ap.argmax(k) == ex.argmax(k))
            stats[k]["best_layer"].append(ap.best_layer(k) == ex.best_layer(k))
        print(f"  [fact {i + 1}] {f['prompt']!r}: " + "  ".join(
            f"{k} r={stats[k]['pearson'][-1]:+.2f}" for k in KINDS), flush=True)
    m = len(stats["mlp"]["pearson"])
    print(f"{m} facts known and traced, {skipped} skipped (not known); exact {t_exact:.1f} s, "
          f"attribution {t_approx:.1f} s in all ({t_exact / max(t_approx, 1e-9):.1f}x)")
    if not m:
        return
    print(f"{'kind':8s} {'Pearson med/mean':>18s} {'Spearman med/mean':>19s} {'peak (token, layer)':>20s} "
          f"{'best layer @ last subj':>23s}")
    for k in KINDS:
        p, s = np.array(stats[k]["pearson"]), np.array(stats[k]["spearman"])
        print(f"{k:8s} {np.nanmedian(p):8.3f} / {np.nanmean(p):6.3f} {np.nanmedian(s):9.3f} / {np.nanmean(s):6.3f} "
              f"{np.mean(stats[k]['peak']):19.0%} {np.mean(stats[k]['best_layer']):23.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="first N known_1000 facts for the agreement part")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default=None, help="default: locate.default_model()")
    ap.add_argument("--count-known", action="store_true",
                    help="--n counts the facts the model knows (traced), not the facts read")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    lm = locate.default_model() if args.model is None else locate.load_model(args.model)
    print(f"command: {' '.join(sys.argv)}\nmachine: {platform.machine()} {platform.processor() or ''}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), device {lm.device}, model {lm.name}")
    noise = noise_level(lm, "auto")  # resolved once, as trace_many
    print(f"noise nu={noise.nu:.4f} ({noise.source})")
    if not args.skip_speed:
        speed(lm, args.samples, noise)
    if args.n > 0:
        agreement(lm, args.n, args.samples, noise, args.count_known)


if __name__ == "__main__":
    main()
