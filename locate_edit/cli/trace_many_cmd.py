"""``locate-edit trace-many``: average indirect effects over a JSON file of known facts."""

from __future__ import annotations

from locate import trace_many
from viz.trace import aie_plot

from .common import facts_arg, load_model, output_path
from .trace_cmd import add_trace_args


def run(args) -> int:
    facts = facts_arg(args.facts)  # read and checked before the model loads
    out = output_path(args.out, "AIE plot (--out)")
    output_path(args.results, "results file (--results)")
    lm = load_model(args)
    res = trace_many(facts, model=lm, n=args.n, kinds=tuple(args.kinds), samples=args.samples,
                     window=args.window, seed=args.seed, results=args.results)
    print(f"{res.n_facts} known facts traced, {res.n_skipped} skipped; average TE {res.avg_te:.4f}")
    for kind in res.kinds:
        a = res.array(kind)
        print(f"  {kind}: peak AIE at last subject token, layer {int(a[2].argmax())} ({a[2].max():.4f})")
    if out is not None:
        aie_plot(res, save=out)
        print(f"AIE plot saved to {args.out}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("trace-many", help="average indirect effects over a JSON file of known facts")
    p.add_argument("facts", help="JSON list of {prompt, subject, attribute} (known_1000 shape)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--results", default=None, help="JSONL file to append to / resume from")
    add_trace_args(p)
    p.set_defaults(func=run)
