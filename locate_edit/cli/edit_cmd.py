"""``locate-edit edit``: write facts into the model with any registered method, print the predictions
before and after, optionally save the edit(s).

    locate-edit edit --subject "The Eiffel Tower" --prompt "{} is located in the city of" \\
        --target " Rome" --method rome --save eiffel.safetensors
    locate-edit edit --method memit --requests facts.json --hparam n_layers=3
"""

from __future__ import annotations

import edit
from edit.eval.datasets import load_requests

from .common import (
    CORPUS_HELP,
    add_model_args,
    corpus_arg,
    existing_file,
    load_model,
    output_path,
    parse_assignment,
    print_top,
)


def parse_hparams(items, method: edit.EditMethod) -> dict:
    """``KEY=VALUE`` pairs (VALUE as JSON when it parses, else a string), checked against the method."""
    out = dict(parse_assignment(item) for item in items or [])
    method.make_hparams(out)  # unknown names and bad values are refused now, before the model loads
    return out


def layer_hparams(args, method: edit.EditMethod) -> dict:
    spec = args.layers if args.layers else (None if args.layer is None else args.layer)
    if spec is None:
        return {}
    if method.layers is None:
        raise edit.InvalidHparamsError(f"{method.name} edits no particular layer; drop --layer/--layers")
    if isinstance(spec, list) or spec == "auto":
        return {"layers": spec}
    try:
        return {"layers": int(spec)}
    except ValueError:
        raise edit.LayerSpecError(f"--layer must be an int or auto, got {spec!r}") from None


def run(args) -> int:
    method = edit.get_method(args.method)
    hp = {**parse_hparams(args.hparam, method), **layer_hparams(args, method)}
    # everything that can be checked without the model is checked before it loads (seconds to minutes)
    requests_file = existing_file(args.requests, "requests file")
    corpus = corpus_arg(args.corpus)
    save = output_path(args.save, "edit file (--save)")
    if requests_file is None and not (args.subject and args.prompt and args.target):
        raise edit.InvalidRequestError("--subject, --prompt and --target are required (or --requests FILE)")
    requests = (load_requests(requests_file) if requests_file else
                [edit.Request(args.prompt, args.subject, args.target, args.target_true)])
    for r in requests:
        r.check()
    lm = load_model(args)
    for r in requests:
        r.check(lm)
    before = {r.rendered: lm.predict(r.rendered, 1)[0].token for r in requests}
    rt = edit.Runtime(corpus=corpus, progress=not args.quiet)
    edits = edit.write(method, requests, model=lm, hparams=hp, runtime=rt)
    try:
        for e in edits:
            print(f"{e!r}\n  {e.layer_reason or 'no layer'}; " + ", ".join(f"{k} {v:.1f}" for k, v in e.timings.items()))
            if "efficacy" in e.metrics:
                print(f"  efficacy {e.metrics['efficacy']:.2f} (share of requests whose target is now the top-1 "
                      f"continuation); already predicted before: {sum(e.metrics['already_predicted'])}")
        for r in requests:
            after = lm.predict(r.rendered, 1)[0].token
            print(f"  {r.rendered!r}: {before[r.rendered]!r} -> {after!r}  (target {r.target_new!r})")
        if len(requests) == 1:
            print_top(lm, requests[0].rendered, "after ")
    finally:
        for e in reversed(edits):
            e.revert(lm)
    if save is not None:
        for i, e in enumerate(edits):
            path = save if len(edits) == 1 else save.with_name(f"{save.stem}-{i:03d}{save.suffix}")
            print(f"saved to {e.save(path)}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("edit", help="edit facts with any registered method and show before/after predictions")
    add_model_args(p)
    p.add_argument("--method", default="rome", help="a registered method (locate-edit methods); default rome")
    p.add_argument("--subject", default=None, help='e.g. "The Eiffel Tower"')
    p.add_argument("--prompt", default=None, help='with {} for the subject, e.g. "{} is located in the city of"')
    p.add_argument("--target", default=None, help='the new target with its leading space, e.g. " Rome"')
    p.add_argument("--target-true", default=None, help="the fact being replaced (optional)")
    p.add_argument("--requests", default=None,
                   help="JSON file of requests ({prompt, subject, target_new} objects or CounterFact records)")
    p.add_argument("--layer", default=None, help="layer spec: an int or auto (default: the method's own)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="explicit layers (e.g. MEMIT's window)")
    p.add_argument("--hparam", action="append", default=None, metavar="KEY=VALUE",
                   help="set a hyperparameter of the method (repeatable); see locate-edit methods -v")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--save", default=None, help="write the edit here (safetensors + JSON metadata)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
