"""``locate-edit edit``: write one fact into the model with ROME (or MEMIT), print before/after
predictions and the chosen layer, optionally save the edit.

    locate-edit edit --subject "The Eiffel Tower" --prompt "{} is located in the city of" \\
        --target " Rome" --method rome --save eiffel.safetensors
"""

from __future__ import annotations

from pathlib import Path

from locate.cli import _load_model, add_model_args

# Where a corpus for the key statistics is looked for when --corpus is not given (the repo's shared data).
_SHARED_WIKITEXT = Path("wikitext") / "wikitext-2-raw" / "wiki.valid.raw"


def default_corpus() -> Path | None:
    """wikitext-2 from a ``shared/data`` directory next to the working directory or the package, if any;
    ``None`` otherwise (the statistics then fall back to text sampled from the model, and say so)."""
    here = Path(__file__).resolve().parents[1]
    for root in (Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data", here.parent / "shared" / "data"):
        if (root / _SHARED_WIKITEXT).is_file():
            return root / _SHARED_WIKITEXT
    return None


def _layer(text: str):
    return text if text == "auto" else int(text)


def print_top(lm, prompt: str, title: str, k: int = 5) -> None:
    print(f"{title} {prompt!r}:")
    for tp in lm.predict(prompt, k):
        print(f"  {tp.token!r:>14}  {tp.prob:.4f}")


def cmd_edit(args) -> int:
    from edit import Request

    lm = _load_model(args)
    if args.requests:  # ---- MEMIT batch from a file (edit/memit.py owns this branch) ----
        from edit.memit import cli_memit

        cli_memit(args, lm)
        return 0
    if not (args.subject and args.prompt and args.target):
        from edit import InvalidRequestError

        raise InvalidRequestError("--subject, --prompt and --target are required (or --method memit --requests FILE)")
    request = Request(args.prompt, args.subject, args.target, args.target_true).check(lm)
    corpus = args.corpus if args.corpus else default_corpus()
    print_top(lm, request.rendered, "before")
    if args.method == "rome":
        from edit import rome

        e = rome(request, model=lm, layer=args.layer, corpus=corpus, key=args.key,
                 stats_tokens=args.stats_tokens, progress=not args.quiet)
    else:
        # ---- MEMIT hook: edit.memit is owned by the MEMIT implementation (edit/memit.py) ----
        from edit import memit

        layers = args.layers or ("auto" if args.layer == "auto" else [args.layer])
        e = memit([request], model=lm, layers=layers, corpus=corpus, n_tokens=args.stats_tokens, progress=not args.quiet)
    print(f"\nedited: {e.layer_reason}")
    print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in e.timings.items()))
    print_top(lm, request.rendered, "after ")
    if args.save:
        print(f"saved to {e.save(args.save)}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("edit", help="edit one fact with ROME or MEMIT and show before/after predictions")
    add_model_args(p)
    p.add_argument("--subject", default=None, help='e.g. "The Eiffel Tower"')
    p.add_argument("--prompt", default=None, help='with {} for the subject, e.g. "{} is located in the city of"')
    p.add_argument("--target", default=None, help='the new target with its leading space, e.g. " Rome"')
    p.add_argument("--target-true", default=None, help="the fact being replaced (optional)")
    p.add_argument("--method", choices=["rome", "memit"], default="rome")
    p.add_argument("--requests", default=None,
                   help="MEMIT only: JSON file of requests ({prompt, subject, target_new} objects or CounterFact records)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="MEMIT only: the critical layers (default: auto)")
    p.add_argument("--layer", type=_layer, default="auto", help="int, or auto (causal tracing picks it)")
    p.add_argument("--key", choices=["averaged", "original"], default="averaged",
                   help="ROME key for the update: averaged (consistent, default) or original (reference code)")
    p.add_argument("--corpus", default=None,
                   help="text file for the key statistics (default: shared wikitext if found, else model samples)")
    p.add_argument("--stats-tokens", type=int, default=None, help="corpus tokens for the key statistics")
    p.add_argument("--save", default=None, help="write the edit here (safetensors + JSON metadata)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.stats_tokens is None:
        from edit.stats import DEFAULT_N_TOKENS

        args.stats_tokens = DEFAULT_N_TOKENS
    return cmd_edit(args)

