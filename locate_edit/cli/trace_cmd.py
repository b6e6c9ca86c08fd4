"""``locate-edit trace``: causal tracing of one fact, with heatmaps."""

from __future__ import annotations

from locate import trace
from viz.trace import trace_heatmaps

from .common import add_model_args, load_model, output_path


def run(args) -> int:
    output_path(args.json, "trace file (--json)")  # before the model loads
    output_path(args.out, "figure (--out)")
    lm = load_model(args)
    tr = trace(args.prompt, args.subject, model=lm, target=args.target, kinds=tuple(args.kinds),
               samples=args.samples, window=args.window, seed=args.seed, progress=True)
    print(tr.summary())
    if args.json:
        tr.save(args.json)
    if args.out:
        trace_heatmaps(tr, save=args.out)
        print(f"heatmaps saved to {args.out}")
    return 0


def add_trace_args(p) -> None:
    add_model_args(p)
    p.add_argument("--kinds", nargs="+", default=["hidden", "mlp", "attn"])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=None,
                   help="restoration window in layers (default: 10, the reference's, capped at the model's depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="figure path (.png, .pdf, .svg)")


def add(sub) -> None:
    p = sub.add_parser("trace", help="causal tracing of one fact")
    p.add_argument("prompt")
    p.add_argument("--subject", required=True)
    p.add_argument("--target", default=None, help="answer token (default: the clean top-1)")
    p.add_argument("--json", default=None, help="save the trace as JSON")
    add_trace_args(p)
    p.set_defaults(func=run)
