"""PCGU (Yu et al. 2023): bias score before and after unlearning, and WikiText-2 perplexity.

The model unlearns on WinoGender pairs (the paper's training data; advantaged pronoun from the
occupation's BLS share, :func:`edit.eval.datasets.load_winogender_pairs`) with ``pcgu`` at its
reference defaults (override with ``--k``, ``--lr``, ``--epochs``, ``--batch-size``), then the bias
score (:func:`edit.eval.bias.bias_score`: % of pairs whose stereotypical sentence the model prefers,
50 = unbiased) is measured on CrowS-Pairs, on EditBias's StereoSet gender/race/religion test splits
and on the WinoGender pairs themselves, before and after, with the perplexity of WikiText-2 test.

Resumable: the unedited scores, the edit (a safetensors file) and the edited scores are each a file
under ``--out`` (default ``results/pcgu/``) kept with the settings that made them; a file made with the
same settings is not recomputed.

    python bench/pcgu_bench.py --n 3 --n-eval 3 --ppl-tokens 2048      # a check that it runs
    python bench/pcgu_bench.py                                          # the full run (hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edit
import locate
from edit.eval.bias import bias_score
from edit.eval.datasets import find_data_dir, load_crows_pairs, load_stereoset_pairs, load_winogender_pairs
from edit.eval.metrics import perplexity
from edit.stats import token_stream

from _records import read, write  # bench/_records.py (scripts run from bench/)

EVAL_SETS = ("crows_pairs", "stereoset_gender", "stereoset_race", "stereoset_religion", "winogender")


def eval_pairs(data: Path, name: str, n: int | None) -> list[edit.Request]:
    bias = data / "bias"
    if name == "crows_pairs":
        cases = load_crows_pairs(bias / "crows_pairs" / "crows_pairs_anonymized.csv", n)
    elif name.startswith("stereoset_"):
        cases = load_stereoset_pairs(bias / "stereoset_editbias" / f"{name.split('_', 1)[1]}_test.json", n)
    else:
        cases = load_winogender_pairs(bias / "winogender" / "all_sentences.tsv", n)
    return [c.request for c in cases]


def measure(lm, sets: dict[str, list[edit.Request]], ppl_tokens) -> dict:
    out = {}
    for name, pairs in sets.items():
        s = bias_score(lm, pairs)
        out[name] = {"bias_score": s["bias_score"], "mean_gap": s["mean_gap"], "n": s["n"]}
    out["wikitext_ppl"] = perplexity(lm, ppl_tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model name or path (default: the toolkit's default model)")
    ap.add_argument("--data", default=None, help="shared data directory")
    ap.add_argument("--out", default="results/pcgu", help="where the resumable results go")
    ap.add_argument("--n", type=int, default=None, help="WinoGender training pairs (default: all 240)")
    ap.add_argument("--n-eval", type=int, default=None, help="pairs per evaluation set (default: all)")
    ap.add_argument("--ppl-tokens", type=int, default=20000, help="WikiText-2 test tokens for perplexity")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()

    lm = locate.load_model(args.model) if args.model else locate.default_model()
    data = find_data_dir(args.data)
    out = Path(args.out)
    overrides = {k: v for k, v in (("k", args.k), ("lr", args.lr), ("epochs", args.epochs),
                                   ("batch_size", args.batch_size)) if v is not None}
    hp = edit.get_method("pcgu").make_hparams(overrides)
    train = [c.request for c in load_winogender_pairs(data / "bias" / "winogender" / "all_sentences.tsv", args.n)]
    sets = {name: eval_pairs(data, name, args.n_eval) for name in EVAL_SETS}
    ppl_tokens = token_stream(lm, data / "wikitext" / "wikitext-2-raw" / "wiki.test.raw", args.ppl_tokens)[0]
    base = {"model": lm.fingerprint, "n_eval": args.n_eval, "ppl_tokens": args.ppl_tokens}

    before = read(out / "before.json", base)
    if before is None:
        before = write(out / "before.json", base, measure(lm, sets, ppl_tokens))
    print("before:", json.dumps({k: v for k, v in before.items() if k != "settings"}), flush=True)

    edit_settings = {"model": lm.fingerprint, "n": args.n, "hparams": {k: getattr(hp, k) for k in vars(hp)}}
    edit_file, edit_meta = out / "edit.safetensors", out / "edit.json"
    e = None
    if read(edit_meta, edit_settings) is not None and edit_file.is_file():
        e = edit.Edit.load(edit_file, lm)
    if e is None:
        t0 = time.perf_counter()
        e = edit.compute("pcgu", train, model=lm, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
        e.save(edit_file)
        write(edit_meta, edit_settings, {"seconds": time.perf_counter() - t0, "n_pairs": len(train),
                                         "rows_changed": sum(len(r) for r in e.metrics["selected_rows"].values()),
                                         "params_changed": len(e.deltas)})

    after_settings = {**base, "edit": e.id}
    after = read(out / "after.json", after_settings)
    if after is None:
        with edit.applied(lm, e):
            after = write(out / "after.json", after_settings, measure(lm, sets, ppl_tokens))
    print("after: ", json.dumps({k: v for k, v in after.items() if k != "settings"}), flush=True)

    print("\n| set | n | bias score before | after | mean gap before | after |")
    print("|---|---|---|---|---|---|")
    for name in EVAL_SETS:
        b, a = before[name], after[name]
        print(f"| {name} | {b['n']} | {b['bias_score']:.1f} | {a['bias_score']:.1f} | "
              f"{b['mean_gap']:.3f} | {a['mean_gap']:.3f} |")
    print(f"| WikiText-2 ppl | {args.ppl_tokens} tok | {before['wikitext_ppl']:.2f} | {after['wikitext_ppl']:.2f} | | |")


if __name__ == "__main__":
    main()
