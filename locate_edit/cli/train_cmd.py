"""``locate-edit train``: train the editor of a method that edits with trained parts (MEND, SERAC, KE,
REMEDI, Language Patch's gate, ...) and store it where its edits look for it (the cache folder of its
key, or ``--out``).

    locate-edit train mend --data ../shared/data/counterfact/easyedit_format/counterfact-train.json
    locate-edit train serac --data train.json --steps 200 --hparam batch_size=8 --out serac-editor/

Training is resumable: run the same command again after an interruption and it continues from the
last checkpoint. The training curve (validation edit success and locality against the step) is
written to ``training_curve.json`` beside the editor.
"""

from __future__ import annotations

from pathlib import Path

import edit
from edit.training import TrainingDataError, load_training_data

from .common import add_model_args, existing_file, load_model
from .edit_cmd import parse_hparams


def run(args) -> int:
    method = edit.get_method(args.method)
    if method.train is None:
        trainable = sorted(n for n in edit.methods() if edit.get_method(n).train is not None)
        raise edit.MethodNotAvailableError(f"{method.name} has no trained editor; methods that do: {trainable}")
    hp = method.make_hparams(parse_hparams(args.hparam, method))
    if args.steps is not None and args.steps < 0:
        raise edit.InvalidHparamsError(f"--steps must be non-negative, got {args.steps}")
    data = existing_file(args.data, "training data (--data)")
    records = (method.load_training or load_training_data)(data)  # read and checked before the model loads
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise TrainingDataError(f"--out {out} is a file; give a folder")
    lm = load_model(args)
    editor = method.train(lm, records, hp, steps=args.steps, out=out, progress=not args.quiet,
                          resume=not args.restart)
    last = editor.curve[-1] if editor.curve else {}
    print(f"trained {method.name} editor for {lm.name}: {editor.path}")
    if last:
        print("final validation: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"))
    print(f"training curve: {editor.path / 'training_curve.json'}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("train", help="train the editor of a method that needs one (see `locate-edit methods`)")
    p.add_argument("method", help="a registered method with a trained editor (see `locate-edit methods`)")
    p.add_argument("--data", required=True,
                   help="training file: EasyEdit CounterFact (counterfact-train.json) or zsRE records, or the method's "
                        "own format (e.g. Language Patch's gating data); never a dev split")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps (default: the method's train_steps; the same as --hparam train_steps=N, "
                        "and edits find the editor with that hyperparameter)")
    p.add_argument("--out", default=None, help="folder for the editor (default: the cache folder of its key; "
                                               "pass the same folder as --hparam editor=... when editing)")
    p.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint and start from step 0")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=run)
