"""Old and new runs side by side, on the cases both scored.

    python bench/compare_runs.py results/eval_report/cf_rome=old results/fidelity_cf50/cf_rome=new ...

Each argument is a run directory of :func:`edit.evaluate` (its ``records.jsonl``), optionally with a
label after ``=``. The table restricts every run to the case ids that all the given runs scored (so
two runs over different numbers of cases are compared on their common cases), aggregates them with
:func:`edit.eval.metrics.aggregate` and prints one markdown row per run: ES, PS, NS, S, fluency
(where scored), zsRE-style accuracies (where present), the layers edited and the statistics' source.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from edit.eval.metrics import aggregate

COLUMNS = [("es", "ES"), ("ps", "PS"), ("ns", "NS"), ("score", "S"), ("fluency", "fluency"),
           ("rewrite_acc", "Rel."), ("paraphrase_acc", "Gen."), ("locality", "Loc."), ("portability", "Port.")]


def records(run: Path) -> list[dict]:
    lines = (run / "records.jsonl").read_text().splitlines()
    return [r for r in (json.loads(x) for x in lines if x.strip()) if "case_id" in r and not r.get("cost")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="RUN_DIR[=label]")
    args = ap.parse_args()
    runs = []
    for item in args.runs:
        path, _, label = item.partition("=")
        runs.append((label or Path(path).name, Path(path), records(Path(path))))
    common = set.intersection(*({str(r["case_id"]) for r in recs} for _, _, recs in runs))
    print(f"{len(common)} cases scored by every run")
    aggs = [aggregate([r for r in recs if str(r["case_id"]) in common]) for _, _, recs in runs]
    present = [(k, h) for k, h in COLUMNS if any(isinstance(a.get(k), (int, float)) for a in aggs)]
    print("| run | " + " | ".join(h for _, h in present) + " | layers | statistics |")
    print("|---|" + "---|" * (len(present) + 2))
    for (label, path, recs), agg in zip(runs, aggs):
        mine = [r for r in recs if str(r["case_id"]) in common]
        cells = []
        for k, _ in present:
            v = agg.get(k)
            cells.append("-" if not isinstance(v, (int, float)) else (f"{v:.2f}" if k == "fluency" else f"{100 * v:.1f}"))
        layers = Counter(tuple(r.get("layers", [])) for r in mine).most_common(1)
        stats = sorted({s for r in mine for s in r.get("statistics", [])})
        print(f"| {label} | " + " | ".join(cells) + f" | {list(layers[0][0]) if layers and layers[0][0] else '-'} | "
              f"{'; '.join(stats) if stats else '-'} |")


if __name__ == "__main__":
    main()
