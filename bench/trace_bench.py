"""Fast causal trace vs the per-(token, layer) reference loop, same prompt, noise and seed.

    python bench/trace_bench.py [--prompt ...] [--subject ...] [--kinds hidden mlp attn] [--samples 10]

Prints, per kind, the wall-clock of both paths, their ratio and the max |score difference|, then the
fast path's time for all kinds in one call (the usual use) against the summed loop time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import locate
from locate.causal_trace import trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    lm = locate.load_model(args.model)
    tot_fast = tot_loop = 0.0
    for kind in args.kinds:
        t = time.perf_counter()
        fast = trace(args.prompt, args.subject, model=lm, kinds=(kind,), samples=args.samples)
        tf = time.perf_counter() - t
        t = time.perf_counter()
        loop = trace(args.prompt, args.subject, model=lm, kinds=(kind,), samples=args.samples, method="loop",
                     progress=True)
        tl = time.perf_counter() - t
        diff = float(np.abs(fast.scores[kind] - loop.scores[kind]).max())
        tot_fast, tot_loop = tot_fast + tf, tot_loop + tl
        print(f"{kind:6s}  loop {tl:8.1f} s   fast {tf:7.1f} s   ratio {tl / tf:5.1f}x   max|diff| {diff:.2e}", flush=True)
    print(f"sum     loop {tot_loop:8.1f} s   fast {tot_fast:7.1f} s   ratio {tot_loop / tot_fast:5.1f}x")
    # the usual call: all kinds in one trace (restorations of every kind share batches)
    t = time.perf_counter()
    trace(args.prompt, args.subject, model=lm, kinds=tuple(args.kinds), samples=args.samples)
    tf = time.perf_counter() - t
    print(f"one call, kinds {'+'.join(args.kinds)}: fast {tf:.1f} s   ratio vs the loop {tot_loop / tf:5.1f}x")


if __name__ == "__main__":
    main()
