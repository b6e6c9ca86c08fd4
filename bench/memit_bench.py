"""MEMIT at 10, 100 and 1,000 CounterFact edits on the default model: time, memory, ES/PS/NS.

    python bench/memit_bench.py [--sizes 10 100 1000] [--v-steps 20] [--layers 3 4 5 6 7] [--data DIR]

Records: the 800 ROME-schema dev records (counterfact_dev_800.json: rewrite, 2 paraphrases, 10
neighborhood prompts) first, then the EasyEdit simplified records (one rephrase, no neighborhood
prompts, so NS is over the dev records only) to reach larger sizes. Records whose (subject, prompt)
repeats one already taken with another target are skipped (MEMIT refuses such conflicts).

Scores are the CounterFact ones from edit.metrics.score_case (no fluency: generation is the slow
part): ES = P(new) > P(true) on the rewrite prompt, PS on paraphrases, NS = P(true) > P(new) on
neighborhood prompts. Time: wall clock of memit() (z optimisation + layer walk; the key statistics
are computed once beforehand and cached). Memory: the process's peak resident set size (ru_maxrss)
and the increase during the edit (edit.Measure). On a shared CPU the times are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch


def cases_for(n: int, data: Path):
    from edit import load_counterfact, load_counterfact_easyedit

    cases = load_counterfact(data / "counterfact" / "counterfact_dev_800.json")
    if n > len(cases):
        for f in ("counterfact-val.json", "counterfact-train.json", "counterfact-edit.json"):
            cases += load_counterfact_easyedit(data / "counterfact" / "easyedit_format" / f)
            if len(cases) >= 3 * n:
                break
    out, seen = [], set()
    for c in cases:
        key = (c.request.prompt, c.request.subject)
        if key in seen or not c.request.target_true:
            continue
        seen.add(key)
        out.append(c)
        if len(out) == n:
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: 'auto' (the calibrated MLP window)")
    ap.add_argument("--v-steps", type=int, default=20)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--stats-tokens", type=int, default=40_000)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import locate
    from edit.eval.harness import Measure
    from edit.methods.memit import memit
    from edit.eval.metrics import aggregate, score_case
    from edit.stats import key_second_moments

    torch.manual_seed(0)
    lm = locate.default_model()
    layers = args.layers or "auto"
    corpus = args.data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    print(f"model {lm.name}, {torch.get_num_threads()} threads, layers {layers}, v_steps {args.v_steps}")
    results = []
    for n in args.sizes:
        cases = cases_for(n, args.data)
        reqs = [c.request for c in cases]
        from locate import resolve_layers

        L, _ = resolve_layers(lm, layers, 5)
        stats = key_second_moments(lm, L, corpus=corpus, n_tokens=args.stats_tokens, progress=False)
        with Measure(lm.device) as meas:
            e = memit(reqs, model=lm, layers=L, stats=stats, v_steps=args.v_steps, chunk_size=args.chunk_size)
        with lm.eval_mode():
            pre = aggregate([score_case(lm, c, fluency=False) for c in cases])
            e.apply(lm)
            try:
                post = aggregate([score_case(lm, c, fluency=False) for c in cases])
            finally:
                e.revert(lm)
        row = {"n_edits": len(reqs), "layers": L, "total_s": meas.seconds, "per_edit_s": meas.seconds / len(reqs),
               "z_s": e.timings.get("z_s"), "update_s": e.timings.get("update_s"),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "edit_rss_increase_mb": meas.peak_mb,
               **{f"pre_{k}": pre.get(k) for k in ("es", "ps", "ns")},
               **{k: post.get(k) for k in ("es", "ps", "ns", "score", "em", "nm")}}
        results.append(row)
        print(json.dumps(row, default=float), flush=True)
    print(f"\n{'edits':>6} {'total s':>9} {'s/edit':>7} {'peak RSS MB':>11} {'ES':>6} {'PS':>6} {'NS':>6}  (unedited ES/PS/NS)")
    for r in results:
        f = lambda x: f"{x:6.3f}" if x is not None else "   n/a"  # noqa: E731
        print(f"{r['n_edits']:>6} {r['total_s']:>9.1f} {r['per_edit_s']:>7.2f} {r['peak_rss_mb']:>11.0f} "
              f"{f(r['es'])} {f(r['ps'])} {f(r['ns'])}  ({f(r['pre_es'])} {f(r['pre_ps'])} {f(r['pre_ns'])})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
