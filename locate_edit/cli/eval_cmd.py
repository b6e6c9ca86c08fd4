"""``locate-edit eval``: evaluate editing methods on a dataset, print the table, save results and plots.

    locate-edit eval counterfact --method rome --n 100 --out runs/rome_cf100/
    locate-edit eval zsre --method rome,memit,ft,none --n 200 --out runs/zsre/
    locate-edit eval counterfact --method rome --mode sequential --n 200 --out runs/seq/
    locate-edit eval counterfact --method memit --mode batch --batch-size 1,10,100 --n 100 --out runs/batch/
    locate-edit eval counterfact --method rome --sweep --n 50 --out runs/sweep/
    torchrun --nproc_per_node 4 --no-python -- locate-edit eval counterfact --method rome --n 1000 --out runs/cf1000/

Under ``torchrun`` / ``accelerate launch`` (single and batch mode) every process evaluates its share of
the cases on its own GPU (``cuda:$LOCAL_RANK``, unless ``--device`` says otherwise) and rank 0 prints
the merged table and draws the plots (see :mod:`edit.eval.harness`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

import viz
from edit import get_method
from edit.eval import LOADERS, NONE, evaluate, format_table, layer_sweep, load_dataset
from edit.eval.harness import launch
from locate.errors import InvalidArgumentError

from .common import add_model_args, CORPUS_HELP, corpus_arg, existing_file, find_data_dir, load_model


def _ints(s: str | None) -> list[int] | None:
    return None if not s else [int(x) for x in s.split(",")]


def run(args) -> int:
    rank, world = launch()
    if world > 1 and (args.sweep or args.mode == "sequential"):
        raise InvalidArgumentError(f"{'--sweep' if args.sweep else 'sequential mode'} runs in one process; launch "
                                   "it without torchrun/accelerate launch (single and batch mode can be split)")
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    try:
        return _run(args, rank)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, rank: int) -> int:
    methods = args.method.split(",")
    for m in methods:  # unknown names are refused before any work
        if m != NONE:
            get_method(m)
    corpus = corpus_arg(args.corpus)
    data_dir = find_data_dir(args.data_dir) if not args.dataset.endswith(".json") or args.data_dir else None
    if args.dataset.endswith(".json"):
        cases = LOADERS[args.schema](existing_file(args.dataset, "dataset file"), args.n)
    else:
        cases = load_dataset(args.dataset, data_dir, args.n)
    lm = load_model(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(model=lm, fluency=not args.no_fluency, gen_length=args.gen_length, normalize=args.normalize,
              corpus=corpus, data_dir=data_dir)

    if args.sweep:
        for m in methods:
            sw = layer_sweep(cases, method=m, model=lm, layers=_ints(args.layers), out=out / f"sweep_{m}",
                             aie=None if args.sweep_aie == "none" else args.sweep_aie, corpus=corpus)
            print(sw.table())
            viz.plot_layer_sweep(sw).savefig(out / f"sweep_{m}.png", dpi=120)
            if sw.points:
                viz.plot_tracing_vs_editing(sw).savefig(out / f"sweep_{m}_cases.png", dpi=120)
        return 0

    runs = []
    for m in methods:
        mhp = {} if args.layer is None or m == NONE else {"layers": [args.layer]}
        if args.mode == "batch":
            for bs in _ints(args.batch_size) or [10]:
                runs.append(evaluate(m, cases, mode="batch", batch_size=bs, hparams=mhp, out=out / f"{m}_batch{bs}", **kw))
        else:
            runs.append(evaluate(m, cases, mode=args.mode, hparams=mhp, checkpoints=_ints(args.checkpoints),
                                 out=out / f"{m}_{args.mode}", **kw))
    if rank != 0:  # rank 0 reports the merged runs
        return 0
    label = (lambda r: f"{r.method} (batch {r.settings['batch_size']})") if args.mode == "batch" else None
    table = format_table(runs, label=label)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    if args.mode == "single":
        viz.plot_methods(runs).savefig(out / "methods.png", dpi=120)
    elif args.mode == "sequential":
        viz.plot_sequential(runs).savefig(out / "sequential.png", dpi=120)
    else:
        for m in methods:
            viz.plot_batch_sizes([r for r in runs if r.method == m]).savefig(out / f"batch_{m}.png", dpi=120)
    print(f"results, table and plots in {out}/")
    return 0


def add(sub) -> None:
    p = sub.add_parser("eval", help="evaluate editing methods (CounterFact, zsRE, MQuAKE) and plot the results")
    p.add_argument("dataset", help="counterfact, counterfact_easyedit, zsre, mquake, known, or a .json file")
    p.add_argument("--method", default="rome", help="comma-separated registered methods (locate-edit methods) "
                                                    "or none, the unedited model (default rome)")
    p.add_argument("--n", type=int, default=100, help="first N cases (default 100)")
    p.add_argument("--mode", choices=["single", "batch", "sequential"], default="single")
    p.add_argument("--batch-size", default=None, help="batch mode: comma-separated batch sizes (default 10)")
    p.add_argument("--checkpoints", default=None, help="sequential mode: comma-separated edit counts")
    p.add_argument("--layer", type=int, default=None, help="edit this layer (default: the method's own choice)")
    p.add_argument("--sweep", action="store_true", help="layer sweep: edit the cases at every layer")
    p.add_argument("--layers", default=None, help="with --sweep: comma-separated layers (default all)")
    p.add_argument("--sweep-aie", choices=("cases", "calibration", "none"), default="cases",
                   help="with --sweep: trace the swept cases themselves (default; also gives the case-level "
                        "regression), use locate.layer_profile's calibration facts, or skip tracing")
    p.add_argument("--data-dir", default=None, help="data directory laid out like shared/data "
                                                     "(default $LOCATE_EDIT_DATA, ./shared/data or ../shared/data)")
    p.add_argument("--schema", default="counterfact", help="loader for a .json dataset path (default counterfact)")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--out", required=True, help="output directory (results are resumed from it)")
    p.add_argument("--no-fluency", action="store_true", help="skip the sampled generations (much faster)")
    p.add_argument("--gen-length", type=int, default=100, help="tokens per generation for fluency (ROME: 100)")
    p.add_argument("--normalize", choices=["sum", "mean"], default="sum",
                   help="P of a multi-token target: whole-target (sum of log-probs) or ROME-code per-token mean")
    add_model_args(p)
    p.set_defaults(func=run)
