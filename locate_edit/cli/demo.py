"""``locate-edit demo``: the README demo on the default model: predict, trace, edit with ROME, revert."""

from __future__ import annotations

import edit
from edit.stats import describe_corpus
from locate import trace
from viz.trace import trace_heatmaps

from .common import add_model_args, load_model, output_path, print_top

DEMO_PROMPT = "The Eiffel Tower is located in the city of"


def run(args) -> int:
    output_path(args.out, "heatmap figure (--out)")  # before the model loads
    lm = load_model(args)
    print(f"{lm!r}  [{lm.load_report.source}, {lm.load_report.seconds:.1f} s]")
    print(f"\nTop-5 next tokens for {DEMO_PROMPT!r}:")
    for tp in lm.predict(DEMO_PROMPT, 5):
        print(f"  {tp.token!r:>12}  {tp.prob:.4f}")

    print(f"\nCausal trace of {DEMO_PROMPT!r} (subject 'The Eiffel Tower', 3 noise samples):")
    tr = trace(DEMO_PROMPT, "The Eiffel Tower", model=lm, samples=3, progress=True)
    print(tr.summary())
    trace_heatmaps(tr, save=args.out)
    print(f"heatmaps saved to {args.out}")

    request = edit.Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
    n_tokens = 20_000
    print(f"\nROME edit {request.subject!r} -> {request.target_new!r} (key statistics: "
          f"{describe_corpus(None)}, {n_tokens} tokens; 1 + 5 context templates)")
    e = edit.rome(request, model=lm, layer="auto", stats_tokens=n_tokens, template_lengths=((10, 5),))
    print(f"edited {e.layer_reason}  ({e.timings['total_s']:.1f} s)")
    with edit.applied(lm, e):
        print_top(lm, DEMO_PROMPT, "after the edit,")
    print_top(lm, DEMO_PROMPT, "after revert,")
    return 0


def add(sub) -> None:
    p = sub.add_parser("demo", help="the README demo on the default model")
    add_model_args(p)
    p.add_argument("--out", default="trace.png", help="where to save the trace heatmaps (default trace.png)")
    p.set_defaults(func=run)
