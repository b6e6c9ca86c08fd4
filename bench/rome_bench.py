"""ROME on CounterFact: per-edit wall time (key statistics cold vs cached) and efficacy / paraphrase /
neighborhood scores on the default model. Each edit is applied, scored, then reverted.

    python bench/rome_bench.py [--n 20] [--layer auto|INT] [--stats-tokens 40000] [--fast] [--key averaged]

Scores (ROME §4.2, CounterFact): efficacy = P(new) > P(true) on the rewrite prompt; paraphrase = the same,
averaged over each record's paraphrase prompts; neighborhood = P(true) > P(new) on prompts about other
subjects with the same relation (higher is better: the edit did not bleed). Probabilities are
teacher-forced whole-target probabilities (``edit.metrics``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import edit
import locate
from edit.eval.metrics import prob, teacher_forced
from locate import resolve_layers
from edit.stats import key_second_moments

DATA = Path(os.environ.get("LOCATE_EDIT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def beats(lm, prompts, first: str, second: str) -> float:
    """Fraction of prompts where P(first) > P(second)."""
    if not prompts:
        return float("nan")
    a = teacher_forced(lm, prompts, [first] * len(prompts))
    b = teacher_forced(lm, prompts, [second] * len(prompts))
    return sum(prob(x) > prob(y) for x, y in zip(a, b)) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--layer", default="auto")
    ap.add_argument("--stats-tokens", type=int, default=None)
    ap.add_argument("--key", default="original", choices=["averaged", "original"])
    ap.add_argument("--fast", action="store_true", help="1 + 5 context templates instead of the paper's 1 + 20")
    args = ap.parse_args()

    lm = locate.default_model()
    corpus = DATA / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    cases = edit.load_counterfact(DATA / "counterfact" / "counterfact_dev_800.json", n=args.n)
    (layer,), reason = resolve_layers(lm, args.layer if args.layer == "auto" else int(args.layer), 1)
    hp = {"key": args.key}
    if args.fast:
        hp["template_lengths"] = ((10, 5),)
    if args.stats_tokens:
        hp["stats_tokens"] = args.stats_tokens
    n_tokens = hp.get("stats_tokens", edit.ROMEHparams().stats_tokens)
    print(f"{lm.name} on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; layer {layer} ({reason}); {args.n} CounterFact records; {hp}")

    # key statistics: cold (recomputed, cache bypassed) vs cached
    t = time.perf_counter()
    key_second_moments(lm, [layer], corpus=corpus, n_tokens=n_tokens, cache=False, progress=False)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    stats = key_second_moments(lm, [layer], corpus=corpus, n_tokens=n_tokens, progress=False)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    stats = key_second_moments(lm, [layer], corpus=corpus, n_tokens=n_tokens, progress=False)
    cached = time.perf_counter() - t
    print(f"key statistics, {n_tokens} tokens: cold {cold:.1f} s, cached read {cached:.2f} s "
          f"(first call this run {t_first:.1f} s)")

    rows = []
    for i, case in enumerate(cases):
        r = case.requests[0]
        true = r.target_true
        t = time.perf_counter()
        e = edit.rome(r, model=lm, layer=layer, stats=stats, progress=False, **hp)
        seconds = time.perf_counter() - t
        try:
            es = beats(lm, [r.rendered], r.target_new, true)
            ps = beats(lm, case.paraphrase_prompts, r.target_new, true)
            ns = beats(lm, case.neighborhood_prompts, true, r.target_new)
        finally:
            e.revert()
        rows.append((es, ps, ns, seconds, e.metrics["v_star_steps"]))
        print(f"[{i + 1:2d}/{len(cases)}] {r.subject!r} -> {r.target_new!r}: ES {es:.0f} PS {ps:.2f} NS {ns:.2f} "
              f"{seconds:.1f} s ({e.metrics['v_star_steps']} v* steps)", flush=True)

    es, ps, ns, secs, steps = zip(*rows)
    print(f"\nefficacy {statistics.mean(es):.1%}  paraphrase {statistics.mean(ps):.1%}  "
          f"neighborhood {statistics.mean(ns):.1%}")
    print(f"seconds per edit (statistics cached): median {statistics.median(secs):.1f}, mean {statistics.mean(secs):.1f}; "
          f"cold statistics add {cold:.1f} s once per layer; v* steps mean {statistics.mean(steps):.1f}")


if __name__ == "__main__":
    main()
