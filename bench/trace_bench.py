"""Fast causal trace vs the per-(token, layer) reference loop, same prompt, noise and seed.

    python bench/trace_bench.py [--prompt ...] [--subject ...] [--kinds hidden mlp attn] [--samples 10]

Prints, per kind, the wall-clock of both paths, their ratio and the max |score difference|, then the
fast path's time for all kinds in one call (the usual use) against the summed loop time, and the
ratio of the matmul FLOPs the two paths need (counted from the shapes they run), which bounds what an
exact fast path can gain on this prompt: the wall-clock ratio can only exceed it by running the
matmuls faster, not by doing less.

    python bench/trace_bench.py --bound-over ../shared/data/known_1000/known_1000.json

prints only that FLOP ratio's distribution over a file of facts (objects with "prompt" and "subject"),
without running a trace: it shows how much any exact fast path can gain on the facts users trace.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import locate
from locate._fast_restore import _chunks
from locate.causal_trace import restored_layers, trace


def matmul_flops(lm, prompt: str, subject: str, kinds, samples: int, window: int = 10, batch_size: int = 256):
    """(loop, fast, ideal) FLOPs of the weight matmuls: 2 · params per block per token and block run,
    plus the unembedding at every position (loop) or the last one (fast, ideal). Attention scores,
    norms and activations are left out (small at these lengths).

    ``fast`` counts what the fast path runs: each batch from its lowest restored layer. ``ideal`` is
    the least any exact path can run: every restoration on its own, only tokens >= t, only the
    blocks after its first restored one (the block where a window starts changes nothing but token t,
    so even that is not counted), and in the last block only the last token (the others' keys and
    values are needed there, but they are not counted)."""
    L, T = lm.n_layers, len(lm.encode(prompt))
    s0, _ = lm.subject_span(prompt, subject)
    per_block = 2 * sum(p.numel() for p in lm.blocks[0].parameters()) * samples
    unembed = 2 * lm.d_model * lm.n_vocab * samples
    loop = len(kinds) * T * L * (T * L * per_block + T * unembed)
    restorations = sorted(((k, l) for k in kinds for l in range(L)), key=lambda kl: restored_layers(*kl, window, L)[0])
    fast = ideal = 0
    for t in range(s0, T):
        for chunk in _chunks(restorations, window, L, samples, batch_size):
            j0 = min(restored_layers(k, l, window, L)[0] for k, l in chunk)
            fast += len(chunk) * ((T - t) * (L - j0) * per_block + unembed)
        for k, l in restorations:
            blocks = L - 1 - restored_layers(k, l, window, L)[0]
            # in the last block only the last token's output is read: count that token alone there
            ideal += ((T - t) * (blocks - 1) + 1 if blocks else 0) * per_block + unembed
    return loop, fast, ideal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    ap.add_argument("--subject", default="The Eiffel Tower")
    ap.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--bound-over", default=None, metavar="FACTS.json",
                    help="only print the exact-work (matmul FLOP) ratio over these facts; runs no trace")
    args = ap.parse_args()
    lm = locate.load_model(args.model)
    if args.bound_over:
        return bound_over(lm, args.bound_over, args.kinds, args.samples)
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
    loop_f, fast_f, ideal_f = matmul_flops(lm, args.prompt, args.subject, args.kinds, args.samples)
    print(f"matmul FLOPs: loop {loop_f / 1e12:.1f} T ({loop_f / tot_loop / 1e9:.0f} GFLOP/s), fast {fast_f / 1e12:.1f} T "
          f"({fast_f / tf / 1e9:.0f} GFLOP/s): the exact work ratio is {loop_f / fast_f:.1f}x "
          f"(at most {loop_f / ideal_f:.1f}x for any exact path)")


def bound_over(lm, path: str, kinds, samples: int) -> None:
    """Distribution of loop FLOPs / fast FLOPs over a facts file (tokenization only)."""
    import json

    ratios, at_start = [], 0
    for f in json.load(open(path)):
        loop_f, fast_f, ideal_f = matmul_flops(lm, f["prompt"], f["subject"], kinds, samples)
        ratios.append((loop_f / fast_f, loop_f / ideal_f))
        at_start += lm.subject_span(f["prompt"], f["subject"])[0] == 0
    print(f"{len(ratios)} facts from {path}, kinds {'+'.join(kinds)}, {samples} samples; "
          f"{at_start / len(ratios):.0%} have the subject at token 0 (nothing before it to skip)")
    for name, r in zip(("this fast path", "any exact path"), np.array(ratios).T):
        print(f"loop/{name} matmul FLOPs: median {np.median(r):.2f}x  mean {r.mean():.2f}x  p10 {np.percentile(r, 10):.2f}x  "
              f"p90 {np.percentile(r, 90):.2f}x  max {r.max():.2f}x  share >= 10x: {(r >= 10).mean():.1%}")


if __name__ == "__main__":
    main()
