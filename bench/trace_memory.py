"""Peak memory of causal tracing against prompt length.

    python bench/trace_memory.py [--lengths 100 400 800 2000] [--samples 2] [--kinds mlp]
                                 [--model NAME] [--batch-size 256] [--rows all|last_subject]

Each length runs in its own Python process (so one length's peak does not hide the next one's). The
prompt is a neutral filler text of about ``length`` tokens followed by the fact "The Eiffel Tower is
located in the city of", so the traced rows (the subject and the tokens after it) come after a long
prefix: the case where the fast path's key/value prefix matters. Each process reports

* ``load MB``: peak resident memory (``ru_maxrss``) after loading the model and one warm-up trace on
  a short prompt (torch's allocator and thread pools are then set up);
* ``peak MB``: peak resident memory after the long trace;
* ``trace MB``: the difference, i.e. what tracing the long prompt added on top;
* ``seconds``: wall-clock of the long trace.

``resource.getrusage`` gives the peak; ``psutil`` (if installed) adds the resident memory right after
the trace. Keep lengths few on a busy machine: each process loads the model once.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import locate

try:  # optional: the current (not peak) resident memory
    import psutil
except ImportError:  # not a dependency: without it only the peak is reported
    psutil = None

FACT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"
FILLER = ("The committee met on a quiet morning and read the minutes of the previous meeting. "
          "Several members asked about the budget, the schedule and the weather for the coming week. ")


def peak_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float | None:
    return psutil.Process().memory_info().rss / 2**20 if psutil is not None else None


def long_prompt(lm, length: int) -> str:
    """Filler text cut to about ``length - len(FACT)`` tokens, then the fact."""
    fact_len = len(lm.encode(" " + FACT, raw=True))
    filler_ids = lm.encode(FILLER * (length // 20 + 2), raw=True)[: max(0, length - fact_len)]
    return (lm.tokenizer.decode(filler_ids).rstrip() + " " + FACT).lstrip()


def child(args) -> None:
    lm = locate.load_model(args.model) if args.model else locate.default_model()
    tokens = None if args.rows == "all" else [args.rows]
    kw = dict(model=lm, kinds=tuple(args.kinds), samples=args.samples, noise=0.3, batch_size=args.batch_size,
              tokens=tokens)
    locate.trace(FACT, SUBJECT, **kw)  # warm-up on the short fact
    load = peak_mb()
    prompt = long_prompt(lm, args.child)
    n = len(lm.encode(prompt))
    t0 = time.perf_counter()
    tr = locate.trace(prompt, SUBJECT, **kw)
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    print(json.dumps({"length": args.child, "tokens": n, "load_mb": load, "peak_mb": peak,
                      "trace_mb": peak - load, "rss_after_mb": current_mb(), "seconds": seconds,
                      "p_corrupted": tr.p_corrupted}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 400, 800, 2000])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["mlp"])
    ap.add_argument("--model", default=None, help="a Hugging Face name or directory (default: the embedded model)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rows", default="all", help="'all' (every row from the subject on) or a token name")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args)
        return
    rows = []
    print(f"{'length':>6} {'tokens':>6} {'load MB':>8} {'peak MB':>8} {'trace MB':>9} {'seconds':>8}", flush=True)
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--child", str(length), "--samples", str(args.samples),
               "--batch-size", str(args.batch_size), "--rows", args.rows, "--kinds", *args.kinds]
        if args.model:
            cmd += ["--model", args.model]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            tail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.returncode}"]
            print(f"{length:>6} failed: {tail[0]}", flush=True)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['length']:>6} {r['tokens']:>6} {r['load_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['trace_mb']:>9.0f} "
              f"{r['seconds']:>8.1f}", flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        slope = (b["trace_mb"] - a["trace_mb"]) / max(1, b["tokens"] - a["tokens"]) * 100
        print(f"growth: {slope:.0f} MB of traced peak per 100 prompt tokens ({a['tokens']} -> {b['tokens']})")


if __name__ == "__main__":
    main()
