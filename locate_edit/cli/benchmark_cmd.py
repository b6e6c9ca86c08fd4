"""``locate-edit benchmark survey``: the knowledge-editing survey's comparison (and KnowEdit) for every
registered method, or those named, into one results directory with report.md and figures.

    locate-edit benchmark survey --out runs/survey
    locate-edit benchmark survey --methods rome,memit --n 50 --axes basic,portability --out runs/survey50
"""

from __future__ import annotations

from pathlib import Path

import viz
from edit import get_method
from edit.eval import AXES, NONE, benchmark, build_report, load_benchmark
from locate.errors import InvalidArgumentError

from .common import add_model_args, CORPUS_HELP, corpus_arg, find_data_dir, load_model, parse_method_hparams


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise InvalidArgumentError(f"expected comma-separated integers, got {s!r}") from e


def run(args) -> int:
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods or []:  # unknown names are refused before any work, with the registered names
        if m != NONE:
            get_method(m)
    axes = [a.strip() for a in args.axes.split(",")] if args.axes else list(AXES)
    bad = [a for a in axes if a not in AXES]
    if bad:
        raise InvalidArgumentError(f"unknown axis {bad}; choose from {list(AXES)}")
    corpus = corpus_arg(args.corpus)
    data = find_data_dir(args.data)
    lm = load_model(args)
    benchmark(methods, model=lm, data_dir=data, out=args.out, n=args.n, axes=axes,
              batch_sizes=_ints(args.batch_sizes), checkpoints=_ints(args.checkpoints),
              hparams=parse_method_hparams(args.hparam), fluency=not args.no_fluency, corpus=corpus)
    viz.benchmark_figures(load_benchmark(args.out))
    print(build_report(args.out))
    print(f"\nrecords, report.md and figures in {Path(args.out)}/")
    return 0


def add(sub) -> None:
    p = sub.add_parser("benchmark", help="benchmarks over every registered editing method")
    kinds = p.add_subparsers(dest="benchmark", required=True)
    s = kinds.add_parser("survey", help="the knowledge-editing survey's axes and KnowEdit (see docs/BENCHMARK.md)")
    s.add_argument("--methods", default=None, help="comma-separated registered methods, or none for the unedited "
                                                   "model (default: every registered method)")
    s.add_argument("--n", type=int, default=200, help="cases per dataset (default 200)")
    s.add_argument("--axes", default=None, help=f"comma-separated axes (default all: {','.join(AXES)})")
    s.add_argument("--batch-sizes", default="1,10,100,1000", help="batch axis sizes (default 1,10,100,1000)")
    s.add_argument("--checkpoints", default="1,10,100,1000", help="sequential axis checkpoints (default 1,10,100,1000)")
    s.add_argument("--hparam", action="append", default=None, metavar="METHOD:KEY=VALUE",
                   help="a method's hyperparameter (repeatable)")
    s.add_argument("--out", default="runs/survey", help="results directory, resumed from (default runs/survey)")
    s.add_argument("--data", default=None, help="data directory laid out like shared/data "
                                                "(default $LOCATE_EDIT_DATA, ./shared/data or ../shared/data)")
    s.add_argument("--corpus", default=None, help=CORPUS_HELP)
    s.add_argument("--no-fluency", action="store_true", help="skip the sampled generations (faster)")
    add_model_args(s)
    s.set_defaults(func=run)
