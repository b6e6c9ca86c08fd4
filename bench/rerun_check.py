"""Re-run stored evaluation rows and compare them case by case with the stored records.

    python bench/rerun_check.py --old results/eval_report --runs cf_rome,cf_memit --n 20 \
        --out results/protocol_check

For each run directory under ``--old`` it reads the settings (method, hyperparameters, fluency,
generation length, normalisation, seed), evaluates the same method on the first ``--n`` of the same
CounterFact dev cases through the registry, and prints, per metric, the stored and the new mean and
the largest per-case difference. Settings written before the editor protocol (``layer``, ``corpus``
and ``progress`` among the hyperparameters) are translated to the protocol's names.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import edit
import locate

METRICS = ("es", "ps", "ns", "em", "pm", "nm", "rewrite_acc", "paraphrase_acc", "fluency")


def translate(hparams: dict) -> tuple[dict, str | None]:
    """Old harness settings -> (method hyperparameters, corpus)."""
    hp = dict(hparams)
    corpus = hp.pop("corpus", None)
    hp.pop("progress", None)
    if "layer" in hp:
        hp["layers"] = hp.pop("layer")
    return hp, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="results/eval_report")
    ap.add_argument("--runs", default="cf_rome,cf_memit")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="results/protocol_check")
    args = ap.parse_args()
    lm = locate.default_model()
    cases = edit.load_counterfact(Path(args.data) / "counterfact/counterfact_dev_800.json", args.n)
    out = Path(args.out)
    report = []
    for run in args.runs.split(","):
        old_dir = Path(args.old) / run
        settings = json.loads((old_dir / "settings.json").read_text())["settings"]
        old = {}
        for line in (old_dir / "records.jsonl").read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                old[str(r["case_id"])] = r
        hp, corpus = translate(settings["hparams"])
        t = time.perf_counter()
        method = {"ft": "ft-l"}.get(settings["method"], settings["method"])
        res = edit.evaluate(method, cases, model=lm, hparams=hp, corpus=corpus,
                            fluency=min(int(settings["fluency"]), args.n), gen_length=settings["gen_length"],
                            normalize=settings["normalize"], seed=settings["seed"], out=out / run, progress=False)
        secs = time.perf_counter() - t
        lines = [f"## {run}: {method} {hp}, first {args.n} cases ({secs:.0f} s)",
                 "metric | stored mean | new mean | max per-case |diff|", "---|---|---|---"]
        for k in METRICS:
            pairs = [(old[str(r['case_id'])].get(k), r.get(k)) for r in res.records if str(r["case_id"]) in old]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                continue
            a = sum(p[0] for p in pairs) / len(pairs)
            b = sum(p[1] for p in pairs) / len(pairs)
            lines.append(f"{k} | {a:.4f} | {b:.4f} | {max(abs(x - y) for x, y in pairs):.2e}")
        report.append("\n".join(lines))
        print(report[-1], flush=True)
    (out / "report.md").write_text("\n\n".join(report) + "\n")


if __name__ == "__main__":
    main()
