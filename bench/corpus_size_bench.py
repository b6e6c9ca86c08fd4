"""How much corpus the key statistics need: ROME and MEMIT on the first CounterFact dev cases with C
estimated from 10k, 40k, 160k and all WikiText-2 tokens, and from text the model samples (issue 22).

    python bench/corpus_size_bench.py --methods rome,memit --n 100 --sizes 10000,40000,160000,all \
        --model-samples 40000 --out results/corpus_size

"all" is every token of WikiText-2's validation and test splits, the validation split first (about 570k
SmolLM2 tokens; the raw files in ``--data``; the train split is not in the data directory). This curve
scores ES/PS/NS only, so the test split's use here does not touch the perplexity measured elsewhere on
it. The concatenation is written once to the cache folder. ``--model-samples N``: also C from N tokens
the model writes itself (``corpus="model-samples"``; slow the first time, then cached).

Each (method, corpus size) is one resumable ``edit.evaluate`` run in ``out/<method>_<size>`` (no fluency);
at the end the table of ES/PS/NS and EM/PM/NM against the size is printed and ``out/corpus_size.png`` drawn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import edit
import locate
import viz
from edit.eval import Results
from edit.stats import MODEL_SAMPLES, token_stream
from locate.loading import cache_dir

METRICS = ("es", "ps", "ns", "em", "pm", "nm")


def wikitext_all(data: Path) -> Path:
    """WikiText-2 validation + test (raw), concatenated once into the cache folder."""
    raw = data / "wikitext" / "wikitext-2-raw"
    parts = [raw / "wiki.valid.raw", raw / "wiki.test.raw"]
    out = cache_dir() / "corpora" / "wikitext2_valid_test.raw"
    if not out.is_file() or out.stat().st_size != sum(p.stat().st_size for p in parts):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"".join(p.read_bytes() for p in parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="rome,memit")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--sizes", default="10000,40000,160000,all", help="token counts, or 'all'")
    ap.add_argument("--model-samples", type=int, default=40_000, help="tokens of model samples (0: none)")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="results/corpus_size")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    methods = args.methods.split(",")
    for m in methods:
        edit.get_method(m)  # refuse an unknown name before any work
    corpus = wikitext_all(data)
    lm = locate.default_model()
    n_all = len(token_stream(lm, corpus, 10**9)[0])
    runs = [(s, corpus, n_all if s == "all" else int(s)) for s in args.sizes.split(",")]
    if args.model_samples:
        runs.append((f"samples{args.model_samples}", MODEL_SAMPLES, args.model_samples))
    cases = edit.load_counterfact(data / "counterfact/counterfact_dev_800.json", args.n)
    rows = []
    for m in methods:
        for label, source, n_tokens in runs:
            res = edit.evaluate(m, cases, model=lm, hparams={"stats_tokens": n_tokens}, corpus=source,
                                fluency=False, out=out / f"{m}_{label}", progress=True)
            rows.append((m, label, n_tokens, res))
    print(f"{'method':8s} {'corpus':>14s} {'tokens':>8s} " + " ".join(f"{k.upper():>6s}" for k in METRICS))
    for m, label, n_tokens, res in rows:
        print(f"{m:8s} {label:>14s} {n_tokens:8d} "
              + " ".join(f"{100 * res.aggregates.get(k, float('nan')):6.1f}" for k in METRICS))
    plot(rows, out / "corpus_size.png")


def plot(rows: list[tuple[str, str, int, Results]], path: Path) -> None:
    viz.plot_corpus_size({(m, label): (n, r.aggregates) for m, label, n, r in rows}, METRICS[:3]).savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
