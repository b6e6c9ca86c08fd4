"""``locate-edit neurons``: the knowledge neurons of a fact (Dai et al. 2022) and their verification."""

from __future__ import annotations

from locate import neurons, verify_neurons
from viz.neurons import neuron_heatmap

from .common import add_model_args, load_model


def add(sub) -> None:
    p = sub.add_parser("neurons", help="knowledge neurons of a fact (Dai et al. 2022) and their verification")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt stating the fact (repeat for paraphrases)")
    p.add_argument("--target", required=True, help="the answer, with its leading space, e.g. ' Paris'")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--share", type=float, default=0.7, help="starting share p of prompts a neuron must appear in")
    p.add_argument("--min-prompts", type=int, default=3,
                   help="a neuron must be shared by at least this many prompts (Dai et al.: 3; 1 allows one prompt)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="keep p fixed (default: move it by 0.05 until 2-5 neurons remain, as Dai et al.'s code)")
    p.add_argument("--tokens", choices=["first", "mean"], default="first")
    p.add_argument("--precision", choices=["float32", "float64"], default=None,
                   help="compute the attributions in this dtype (default: the model's)")
    p.add_argument("--verify", action="store_true", help="also report ΔP under suppress/amplify vs random sets")
    p.add_argument("--out", default=None, help="save the result as JSON here")
    p.add_argument("--plot", default=None, help="save the heatmap figure here (png/pdf)")
    p.set_defaults(func=run)


def run(args) -> int:
    lm = load_model(args)
    kn = neurons(args.prompt, args.target, model=lm, steps=args.steps, threshold=args.threshold,
                 share=args.share, tokens=args.tokens, precision=args.precision, min_prompts=args.min_prompts,
                 adaptive=not args.no_adaptive)
    print(repr(kn))
    lm_maps = kn.layer_maps
    for l, i in kn.neurons:
        print(f"  layer {l:3d}  neuron {i:5d}  attribution {float(lm_maps[l, i]):.4g}")
    if args.verify and kn.neurons:
        print(verify_neurons(kn, model=lm))
    if args.out:
        print(f"saved {kn.save(args.out)}")
    if args.plot:
        neuron_heatmap(kn).savefig(args.plot, bbox_inches="tight")
        print(f"saved {args.plot}")
    return 0
