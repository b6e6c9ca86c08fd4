"""Sequential editing in batches: CounterFact ES/PS/NS over every edit so far and WikiText-2 perplexity.

    python bench/sequential_bench.py --methods memit,alphaedit --n 1000 --batch-size 100 \
        --out results/sequential_cf

For each method, batches of ``--batch-size`` CounterFact dev requests are written one after another
(:func:`edit.eval.sequential.sequential`, through the registry: one edit per batch for a batched
method, one per request otherwise). Before any edit and after every batch the script scores every case
edited so far (single-case CounterFact metrics, no fluency), the perplexity of the first
``--ppl-tokens`` tokens of WikiText-2 test and the accuracy on the first ``--piqa`` PIQA validation
questions (general ability), and the norm and condition number of the accumulated MLP update per layer.
``--score-every K`` scores the cases every K batches only; ``--watch`` records after every batch the
signals of a disabling edit (the batch's update norm, perplexity on a little WikiText-2 test text, the
n-gram entropy of short generations) in ``watch.jsonl``: ROME against r-ROME one edit at a time is

    python bench/sequential_bench.py --methods rome,r-rome --n 200 --batch-size 1 --score-every 50 \
        --watch --piqa 0 --out results/disabling

Every case is also scored once on the unedited model (``out/unedited_<dataset>.jsonl``), and each
checkpoint records the unedited ES/PS/NS of the same cases beside the edited ones.
Key statistics come from ``--corpus`` (default: the packaged WikiText-2 validation head, the default of
every entry point; runs made when this script read ``wiki.valid.raw`` itself used the same tokens).

``--dataset counterfact`` (default) reads the 800 full-schema dev cases; ``counterfact-edit`` reads
EasyEdit's simplified CounterFact edit split (9,693 cases: one paraphrase and one neighbourhood prompt
each), which is what a run beyond 800 edits has to use here. Each batch's edits are saved under ``out/<method>/edits``
and each checkpoint's numbers appended to ``out/<method>/curve.jsonl``, so an interrupted run resumes:
stored edits are re-applied, stored checkpoints are not recomputed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import edit
import locate
from edit.eval.metrics import aggregate, n_gram_entropy, perplexity, sample_generations, score_case
from edit.stats import token_stream
from edit.eval import load_piqa
from edit.eval.metrics import choice_accuracy
from locate_edit.cli.common import CORPUS_HELP, corpus_arg, parse_method_hparams

# name -> (loader, file under --data)
DATASETS = {"counterfact": (edit.load_counterfact, "counterfact/counterfact_dev_800.json"),
            "counterfact-edit": (edit.load_counterfact_easyedit, "counterfact/easyedit_format/counterfact-edit.json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=20_000)
    ap.add_argument("--piqa", type=int, default=200, help="PIQA validation questions per checkpoint (0: none)")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="counterfact")
    ap.add_argument("--hparam", action="append", default=None, metavar="METHOD:KEY=VALUE")
    ap.add_argument("--score-every", type=int, default=1,
                    help="score the cases edited so far every K batches (and after the last)")
    ap.add_argument("--watch", action="store_true",
                    help="after every batch, record the batch's update norm, the perplexity of --watch-tokens "
                         "WikiText-2 test tokens and the n-gram entropy of short generations (watch.jsonl): "
                         "the signals of a disabling edit")
    ap.add_argument("--watch-tokens", type=int, default=2_000)
    ap.add_argument("--corpus", default=None, help=CORPUS_HELP)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="results/sequential_cf")
    ap.add_argument("--report", default=None, help="comma-separated method run directories: print their curves "
                    "as a table and draw --figure instead of running")
    ap.add_argument("--figure", default="sequential.png")
    args = ap.parse_args()
    if args.report:
        report(args.report.split(","), args.figure)
        return
    data = Path(args.data)
    methods = args.methods.split(",")
    for m in methods:
        edit.get_method(m)
    hps = parse_method_hparams(args.hparam)
    corpus = corpus_arg(args.corpus)
    lm = locate.default_model()
    loader, file = DATASETS[args.dataset]
    cases = loader(data / file, args.n)
    if len(cases) < args.n:
        raise SystemExit(f"{file} has only {len(cases)} cases, fewer than --n {args.n}")
    piqa = load_piqa(data / "locality/piqa_valid.jsonl", args.piqa) if args.piqa else []
    ppl_tokens = token_stream(lm, data / "wikitext/wikitext-2-raw/wiki.test.raw", args.ppl_tokens)[0]
    batches = [cases[i: i + args.batch_size] for i in range(0, len(cases), args.batch_size)]
    unedited = unedited_scores(lm, cases, Path(args.out) / f"unedited_{args.dataset}.jsonl")
    for m in methods:
        out = Path(args.out) / m
        (out / "edits").mkdir(parents=True, exist_ok=True)
        settings = {"method": m, "n": len(cases), "batch_size": args.batch_size, "hparams": hps.get(m, {}),
                    "ppl_tokens": args.ppl_tokens, "fingerprint": lm.fingerprint}
        if args.dataset != "counterfact" or args.piqa:  # keys absent from runs stored before these options
            settings.update(dataset=args.dataset, piqa=args.piqa)
        if args.score_every != 1:
            settings["score_every"] = args.score_every
        sfile = out / "settings.json"
        if sfile.is_file():
            # A run may be extended to more cases (the cases are a prefix of one ordered file), nothing else.
            stored = json.loads(sfile.read_text())
            if {k: v for k, v in stored.items() if k != "n"} != {k: v for k, v in settings.items() if k != "n"}:
                raise SystemExit(f"{out} holds a run with other settings; use another --out")
            if stored["n"] % args.batch_size and stored["n"] < len(cases):
                raise SystemExit(f"{out} ended on a partial batch ({stored['n']} cases); it cannot be extended")
        sfile.write_text(json.dumps(settings, indent=1))
        cfile = out / "curve.jsonl"
        done = {}
        if cfile.is_file():
            for line in cfile.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done[r["n_edits"]] = r

        watched = watch_log(out / "watch.jsonl") if args.watch else None
        if watched is not None and 0 not in watched:
            watched[0] = watch(lm, out / "watch.jsonl", 0, None, ppl_tokens[: args.watch_tokens])

        def checkpoint(n_batches: int, seconds: float) -> None:
            n = sum(len(b) for b in batches[:n_batches])
            if watched is not None and n not in watched:
                watched[n] = watch(lm, out / "watch.jsonl", n, last_norm.get(n_batches), ppl_tokens[: args.watch_tokens])
            if n in done or (n_batches % args.score_every and n_batches != len(batches)):
                return
            t = time.perf_counter()
            recs = [score_case(lm, c, fluency=False) for c in cases[:n]]
            agg = {k: v for k, v in aggregate(recs).items() if isinstance(v, (int, float))} if recs else {}
            row = {"n_edits": n, "perplexity": perplexity(lm, ppl_tokens),
                   "edit_seconds_total": edit_seconds(out, n_batches), **agg}
            if n:  # the same cases on the unedited model
                base_agg = aggregate([unedited[str(c.case_id)] for c in cases[:n]])
                row.update({f"unedited_{k}": base_agg[k] for k in ("es", "ps", "ns") if k in base_agg})
            if piqa:
                row["piqa_acc"] = choice_accuracy(lm, piqa)
            row["score_seconds"] = time.perf_counter() - t
            row.update(norms(lm, n_batches))
            done[n] = row
            with open(cfile, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(m, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()
                      if k in ("n_edits", "es", "ps", "ns", "perplexity", "piqa_acc")}, flush=True)

        base = {n: lm.mlp_out_weight(n).clone() for n in range(lm.n_layers)}

        def norms(lm_, n_batches) -> dict:
            """Norm and condition number of the accumulated update of each edited layer."""
            out_ = {}
            for l in range(lm_.n_layers):
                d = (lm_.mlp_out_weight(l) - base[l]).double()
                if float(d.abs().max()) > 0:
                    s = torch.linalg.svdvals(d)
                    out_[f"update_norm_{l}"] = float(d.norm())
                    out_[f"update_cond_{l}"] = float(s[0] / s[min(len(s) - 1, n_batches * args.batch_size - 1)])
            return out_

        def replay(b):
            d = out / "edits" / f"{b:04d}"
            files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
            return [edit.Edit.load(p, lm) for p in files] if files and (d / "done").is_file() else None

        last_norm: dict[int, float] = {}  # batch count -> Frobenius norm of that batch's weight change

        def on_batch(b, new, seconds):
            last_norm[b + 1] = update_norm(new)
            d = out / "edits" / f"{b:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for j, e in enumerate(new):
                e.save(d / f"{j:03d}.safetensors")
            (d / "done").write_text(f"{seconds}\n")

        checkpoint(0, 0.0)
        run = edit.sequential(None, m, model=lm, batches=[[c.request for c in b] for b in batches],
                              hparams=hps.get(m, {}), runtime=edit.Runtime(corpus=corpus, progress=False),
                              callback=lambda lm_, r: checkpoint(r.n_batches, r.seconds),
                              replay=replay, on_batch=on_batch, progress=True)
        run.revert()


def edit_seconds(out: Path, n_batches: int) -> float:
    """Seconds spent editing the first ``n_batches`` batches, over every session of a resumed run (each
    batch's own time is kept in its ``edits/<b>/done`` marker)."""
    return sum(float((out / "edits" / f"{b:04d}" / "done").read_text().split()[0]) for b in range(n_batches))


WATCH_PROMPTS = ("The most important thing about", "My favourite city is", "In the beginning of the")


def update_norm(edits) -> float:
    """Frobenius norm of the weight change the edits of one batch make (0 for edits without weights)."""
    total = {}
    for e in edits:
        for d in e.deltas:
            total[d.param] = total.get(d.param, 0) + d.matrix().double()
    return float(sum(float(m.norm()) ** 2 for m in total.values()) ** 0.5)


def watch_log(path: Path) -> dict[int, dict]:
    return ({r["n_edits"]: r for r in map(json.loads, path.read_text().splitlines()) if r}
            if path.is_file() else {})


def watch(lm, path: Path, n: int, norm: float | None, tokens: torch.Tensor) -> dict:
    """The per-batch signals of a disabling edit (Gupta et al. 2024): the batch's update norm, perplexity
    on a little generic text, and the n-gram entropy of short sampled continuations of fixed prompts."""
    texts = sample_generations(lm, WATCH_PROMPTS, max_length=40, seed=0)
    row = {"n_edits": n, "update_norm": norm, "perplexity": perplexity(lm, tokens), "gen_entropy": n_gram_entropy(texts),
           "sample": texts[0]}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def unedited_scores(lm, cases, path: Path) -> dict[str, dict]:
    """Every case scored on the unedited model (no fluency), kept in ``path`` (resumable, guarded by the
    model's fingerprint): the baseline that each checkpoint's ES/PS/NS is read against."""
    done: dict[str, dict] = {}
    if path.is_file():
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and lines[0].get("fingerprint") != lm.fingerprint:
            raise SystemExit(f"{path} was scored on another model; remove it or use another --out")
        done = {r["case_id"]: r["scores"] for r in lines[1:]}
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": lm.fingerprint}) + "\n")
    todo = [c for c in cases if str(c.case_id) not in done]
    with open(path, "a") as f:
        for c in tqdm(todo, desc="unedited scores", unit="case", disable=not todo):
            done[str(c.case_id)] = score_case(lm, c, fluency=False)
            f.write(json.dumps({"case_id": str(c.case_id), "scores": done[str(c.case_id)]}, default=float) + "\n")
    return done


def report(dirs: list[str], figure: str) -> None:
    """A table of the checkpoints of each run directory and the figure (viz.plot_sequential_curves)."""
    import viz

    curves = {}
    print("method | edits | ES | PS | NS | NS unedited | Rel. | Gen. | WikiText-2 ppl | PIQA | max update norm (layer)")
    print("---|---|---|---|---|---|---|---|---|---|---")
    for d in dirs:
        method = json.loads((Path(d) / "settings.json").read_text())["method"]
        rows = [json.loads(line) for line in (Path(d) / "curve.jsonl").read_text().splitlines() if line.strip()]
        curves[method] = rows
        for r in sorted(rows, key=lambda r: r["n_edits"]):
            norms = {k: v for k, v in r.items() if k.startswith("update_norm_")}
            top = max(norms, key=norms.get) if norms else None
            cells = [f"{100 * r[k]:.1f}" if k in r else "-"
                     for k in ("es", "ps", "ns", "unedited_ns", "rewrite_acc", "paraphrase_acc")]
            piqa = f"{100 * r['piqa_acc']:.1f}" if "piqa_acc" in r else "-"
            print(f"{method} | {r['n_edits']} | " + " | ".join(cells) + f" | {r['perplexity']:.2f} | {piqa} | "
                  + (f"{norms[top]:.1f} ({top.rsplit('_', 1)[1]})" if top else "-"))
    viz.plot_sequential_curves(curves).savefig(figure, dpi=120)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
