"""``locate-edit methods``: the registered editing methods, one line each."""

from __future__ import annotations

import dataclasses

import edit


def run(args) -> int:
    for name, description in edit.methods().items():
        print(f"{name:12s} {description}")
        if args.verbose:
            m = edit.get_method(name)
            for f in dataclasses.fields(m.hparams):
                print(f"{'':14s}{f.name} = {f.default!r}" if f.default is not dataclasses.MISSING else f"{'':14s}{f.name}")
    return 0


def add(sub) -> None:
    p = sub.add_parser("methods", help="list the registered editing methods")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each method's hyperparameters and defaults")
    p.set_defaults(func=run)
