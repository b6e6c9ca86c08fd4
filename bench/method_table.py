"""Single-mode CounterFact table for any registered methods (resumable; one results directory per method).

    python bench/method_table.py --methods alphaedit,grace,kn --n 200 --fluency-cases 50 \
        --hparam grace:layers=25 --out results/methods_cf

Each method runs through ``edit.evaluate`` (the registry), with key statistics from ``--corpus`` (default:
the packaged WikiText-2 validation head, as every entry point) and the data directory for methods that
read data (IKE's demonstration pool). Re-running resumes; a larger ``--n`` extends the runs.
At the end ``table.md`` holds every method found under ``--out`` (and ``--include`` directories).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import edit
import locate
from edit.eval import Results, format_table
from locate_edit.cli.common import CORPUS_HELP, corpus_arg, parse_method_hparams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", required=True, help="comma-separated registered methods (or none)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--fluency-cases", type=int, default=50, help="fluency on the first K cases (0: none)")
    ap.add_argument("--gen-length", type=int, default=100)
    ap.add_argument("--hparam", action="append", default=None, metavar="METHOD:KEY=VALUE")
    ap.add_argument("--corpus", default=None, help=CORPUS_HELP)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="results/methods_cf")
    ap.add_argument("--include", default="", help="comma-separated extra run directories for the table")
    args = ap.parse_args()
    data = Path(args.data)
    methods = args.methods.split(",")
    for m in methods:
        if m != "none":
            edit.get_method(m)  # refuse an unknown name before any work
    hps = parse_method_hparams(args.hparam)
    corpus = corpus_arg(args.corpus)
    lm = locate.default_model()
    cases = edit.load_counterfact(data / "counterfact/counterfact_dev_800.json", args.n)
    out = Path(args.out)
    for m in methods:
        t = time.perf_counter()
        edit.evaluate(m, cases, model=lm, hparams=hps.get(m, {}), corpus=corpus, data_dir=data,
                      fluency=args.fluency_cases, gen_length=args.gen_length, out=out / m, progress=True)
        print(f"{m}: {time.perf_counter() - t:.0f} s", flush=True)
    dirs = sorted(p.parent for p in out.glob("*/results.json"))
    dirs += [Path(p) for p in args.include.split(",") if p]
    runs = [Results.load(d / "results.json") for d in dirs if (d / "results.json").is_file()]
    table = format_table(runs)
    (out / "table.md").write_text("```\n" + table + "\n```\n")
    print(table)


if __name__ == "__main__":
    main()
