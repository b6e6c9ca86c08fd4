"""Produce the numbers and figures of docs/RESULTS.md on the default model.

    python bench/eval_report.py --data-dir ../shared/data --out runs/eval_report \
        --n-cf 200 --n-zsre 200 --n-seq 200 --n-sweep 50 --fluency-cases 50

Sections (each resumable: re-running with the same arguments continues where it stopped):
  1. CounterFact, single mode: each method on the first --n-cf dev cases (ES, PS, NS, S, fluency, time).
  2. zsRE, single mode: the first --n-zsre cases (reliability, generality, locality, portability).
  2b. MQuAKE, single mode: the first --n-mquake cases of --mquake-file; all rewrites of a case are
      applied (ROME one after another, MEMIT in one batch), then the multi-hop questions are asked.
  3. Sequential ROME on CounterFact: the curve at checkpoints up to --n-seq edits.
  4. Layer sweep on the first --n-sweep CounterFact cases (with --sweep-known: the first ones the
     model knows), with the MLP AIE correlation across layers and the case-level regression.
  5. MEMIT batch sizes (--batch-sizes) on CounterFact, when MEMIT is installed.
Everything printed is also written to
OUT/report.md; figures go to OUT/*.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("LOCATE_EDIT_DATA", "../shared/data"))
    ap.add_argument("--out", default="runs/eval_report")
    ap.add_argument("--methods", default="rome,memit,ft-l,ft,ft-m,none",
                    help="registered method names (locate-edit methods), 'none' for the unedited model")
    ap.add_argument("--n-cf", type=int, default=200)
    ap.add_argument("--n-zsre", type=int, default=200)
    ap.add_argument("--n-mquake", type=int, default=20)
    ap.add_argument("--mquake-file", default="mquake/MQuAKE-hard.json", help="relative to --data-dir")
    ap.add_argument("--n-seq", type=int, default=200)
    ap.add_argument("--seq-checkpoints", default="1,10,25,50,100,150,200",
                    help="edit counts at which the sequential run scores every case edited so far (those <= --n-seq)")
    ap.add_argument("--n-sweep", type=int, default=50)
    ap.add_argument("--sweep-layers", default=None, help="comma-separated (default: every layer)")
    ap.add_argument("--sweep-method", default="rome")
    ap.add_argument("--sweep-known", action="store_true",
                    help="sweep the first --n-sweep dev cases the model knows (top-1 = true target), into sweep_known/")
    ap.add_argument("--sweep-aie", choices=("cases", "calibration", "none"), default="cases",
                    help="AIE for the sweep: trace the swept cases (default), the calibration facts, or none")
    ap.add_argument("--batch-sizes", default="1,10,50")
    ap.add_argument("--n-batch", type=int, default=50)
    ap.add_argument("--fluency-cases", type=int, default=50, help="cases (of --n-cf) that get sampled generations")
    ap.add_argument("--gen-length", type=int, default=100)
    ap.add_argument("--hparam", action="append", default=None, metavar="METHOD:KEY=VALUE",
                    help="a hyperparameter of one method, e.g. rome:layers=5 or memit:layers=[3,4,5] (repeatable); "
                    "every method runs with its own defaults otherwise")
    ap.add_argument("--seq-method", default="rome", help="the method of the sequential section")
    ap.add_argument("--batch-method", default="memit", help="the (batched) method of the batch-size section")
    ap.add_argument("--corpus", default=None, help="text for the key statistics (default: the packaged WikiText-2 "
                    "validation head, edit.stats.DEFAULT_CORPUS; 'model-samples' to sample from the model)")
    ap.add_argument("--sections", default="cf,zsre,mquake,seq,sweep,batch")
    ap.add_argument("--partial", action="store_true",
                    help="only summarise the records already in OUT (runs cut short), without running anything")
    args = ap.parse_args(argv)

    import torch

    import edit
    import locate
    import viz
    from edit.eval.harness import NONE, format_table
    from edit.registry import get_method
    from edit.eval.sweep import layer_sweep
    from edit.stats import describe_corpus
    from locate_edit.cli.common import corpus_arg, parse_method_hparams

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    if args.partial:
        return summarise_partial(out)

    def say(s=""):
        print(s, flush=True)
        report.append(s)

    for m in args.methods.split(","):  # an unknown name fails here, before the model loads
        if m != NONE:
            get_method(m)
    lm = locate.default_model()
    data = Path(args.data_dir)
    sections = args.sections.split(",")
    available = args.methods.split(",")
    say(f"# locate-edit evaluation report, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    say(f"model {lm.name} (fingerprint {lm.fingerprint}), {lm.n_layers} layers, device {lm.device}, "
        f"torch {torch.__version__}, {platform.machine()} with {os.cpu_count()} CPUs, threads {torch.get_num_threads()}")
    say(f"methods run: {available}")
    corpus = corpus_arg(args.corpus)
    kw = dict(model=lm, gen_length=args.gen_length, corpus=corpus)
    say(f"key statistics from {describe_corpus(corpus)}")
    hparams = parse_method_hparams(args.hparam)

    def hp(m):
        return hparams.get(m, {})

    if "cf" in sections:
        cases = edit.load_counterfact(data / "counterfact/counterfact_dev_800.json", args.n_cf)
        runs = []
        for m in available:
            t = time.perf_counter()
            runs.append(edit.evaluate(m, cases, hparams=hp(m), fluency=args.fluency_cases,
                                      out=out / f"cf_{m}", **kw))
            say(f"[cf] {m}: {time.perf_counter() - t:.0f} s")
        say(f"\n## CounterFact dev, first {len(cases)} cases, single mode; "
            f"fluency on the first {min(args.fluency_cases, len(cases))} cases, {args.gen_length} tokens, top-k 5")
        say("```\n" + format_table(runs) + "\n```")
        viz.plot_methods(runs).savefig(out / "counterfact_methods.png", dpi=120)

    def single_runs(prefix, cases, title):
        """Every available method on ``cases`` in single mode, without fluency, into OUT/<prefix>_<method>."""
        runs = []
        for m in available:
            t = time.perf_counter()
            runs.append(edit.evaluate(m, cases, hparams=hp(m), fluency=False, out=out / f"{prefix}_{m}", **kw))
            say(f"[{prefix}] {m}: {time.perf_counter() - t:.0f} s")
        say(f"\n## {title}")
        say("```\n" + format_table(runs) + "\n```")

    if "zsre" in sections:
        cases = edit.load_zsre(data / "zsre/zsre_dev_800.json", args.n_zsre)
        single_runs("zsre", cases, f"zsRE dev, first {len(cases)} cases, single mode")

    if "mquake" in sections:
        cases = edit.load_mquake(data / args.mquake_file, args.n_mquake)
        single_runs("mquake", cases, f"MQuAKE ({args.mquake_file}), first {len(cases)} cases "
                    f"({sum(len(c.requests) for c in cases)} rewrites), single mode: every rewrite of a case "
                    "applied together; Port. is the multi-hop questions' answer accuracy")

    if "seq" in sections and args.seq_method in available:
        cases = edit.load_counterfact(data / "counterfact/counterfact_dev_800.json", args.n_seq)
        t = time.perf_counter()
        checkpoints = sorted({k for k in map(int, args.seq_checkpoints.split(",")) if k <= len(cases)} | {len(cases)})
        res = edit.evaluate(args.seq_method, cases, mode="sequential", hparams=hp(args.seq_method), fluency=False,
                            out=out / f"seq_{args.seq_method}", checkpoints=checkpoints, **kw)
        say(f"\n## Sequential {args.seq_method} on CounterFact, {len(cases)} edits ({time.perf_counter() - t:.0f} s)")
        say("edits   ES     PS     NS     S")
        for n, a in sorted(res.curve.items()):
            say(f"{n:>5}  {100 * a['es']:5.1f}  {100 * a['ps']:5.1f}  {100 * a['ns']:5.1f}  {100 * a['score']:5.1f}")
        viz.plot_sequential(res).savefig(out / f"sequential_{args.seq_method}.png", dpi=120)

    if "sweep" in sections and args.sweep_method in available:
        cf_file = data / "counterfact/counterfact_dev_800.json"
        if args.sweep_known:  # the first --n-sweep cases the model knows (causal tracing's correctness filter)
            from edit.eval.sweep import known_cases

            cases = known_cases(edit.load_counterfact(cf_file), lm, n=args.n_sweep)
        else:
            cases = edit.load_counterfact(cf_file, args.n_sweep)
        sweep_name = "sweep_known" if args.sweep_known else "sweep"
        layers = None if not args.sweep_layers else [int(x) for x in args.sweep_layers.split(",")]
        t = time.perf_counter()
        sw_hp = {k: v for k, v in hp(args.sweep_method).items() if k not in ("layer", "layers")}
        sw = layer_sweep(cases, method=args.sweep_method, model=lm, layers=layers, hparams=sw_hp, out=out / sweep_name,
                         aie=None if args.sweep_aie == "none" else args.sweep_aie, corpus=corpus)
        which = "CounterFact cases the model knows" if args.sweep_known else "CounterFact cases"
        say(f"\n## Layer sweep, {args.sweep_method}, {len(cases)} {which} ({time.perf_counter() - t:.0f} s)")
        say("```\n" + sw.table() + "\n```")
        viz.plot_layer_sweep(sw).savefig(out / f"{sweep_name}.png", dpi=120)
        if sw.points:
            viz.plot_tracing_vs_editing(sw).savefig(out / f"{sweep_name}_cases.png", dpi=120)

    if "batch" in sections and args.batch_method in available:
        cases = edit.load_counterfact(data / "counterfact/counterfact_dev_800.json", args.n_batch)
        runs = []
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            t = time.perf_counter()
            bm = args.batch_method
            runs.append(edit.evaluate(bm, cases, mode="batch", batch_size=bs, hparams=hp(bm), fluency=False,
                                      out=out / f"batch_{bm}_{bs}", **kw))
            say(f"[batch] {bm} {bs}: {time.perf_counter() - t:.0f} s")
        say(f"\n## {args.batch_method} batch sizes, {len(cases)} CounterFact cases")
        say("```\n" + format_table(runs, label=lambda r: f"{r.method} (batch {r.settings['batch_size']})") + "\n```")
        viz.plot_batch_sizes(runs).savefig(out / f"batch_{args.batch_method}.png", dpi=120)

    (out / "report.md").write_text("\n".join(report) + "\n")
    print(f"\nwritten {out / 'report.md'}")
    return 0


def summarise_partial(out: Path) -> int:
    """Tables from the records written so far (each run directory's records.jsonl)."""
    import json

    from edit.eval.harness import Results, format_table
    from edit.eval.metrics import aggregate

    lines = [f"# partial summary of {out}, {time.strftime('%Y-%m-%d %H:%M %Z')}"]
    for prefix in ("cf", "zsre", "mquake"):
        runs = []
        for d in sorted(out.glob(f"{prefix}_*")):
            rec_file = d / "records.jsonl"
            if not rec_file.is_file():
                continue
            recs = [json.loads(x) for x in rec_file.read_text().splitlines() if x.strip()]
            if recs:
                settings = json.loads((d / "settings.json").read_text())["settings"]
                runs.append(Results(d.name.split("_", 1)[1], "single", prefix, "SmolLM2-135M-Instruct",
                                    settings["fingerprint"], settings, recs, aggregate(recs)))
        if runs:
            lines.append(f"\n## {prefix}: cases done per method: " + ", ".join(f"{r.method} {len(r.records)}" for r in runs))
            lines.append("```\n" + format_table(runs) + "\n```")
    seq = out / "seq_rome" / "records.jsonl"
    if seq.is_file():
        recs = [json.loads(x) for x in seq.read_text().splitlines() if x.strip()]
        by_n: dict = {}
        for r in recs:
            if "n_edits" in r:
                by_n.setdefault(r["n_edits"], []).append(r)
        if by_n:
            lines.append("\n## sequential ROME (checkpoints completed)\nedits   ES     PS     NS     S")
            for n, rs in sorted(by_n.items()):
                a = aggregate(rs)
                lines.append(f"{n:>5}  {100 * a['es']:5.1f}  {100 * a['ps']:5.1f}  {100 * a['ns']:5.1f}  {100 * a['score']:5.1f}")
    text = "\n".join(lines)
    print(text)
    (out / "report_partial.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
