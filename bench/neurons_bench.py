"""Knowledge-neuron benchmark (Dai et al. 2022) on the default model.

1. Speed: attribution of one fact with 3 prompts over all layers, batched (`locate.neurons.attribution`)
   vs the per-layer loop (`attribution_loop`: steps forwards+backwards per layer). With
   ``--loop-layers K`` the loop runs on K evenly spaced layers only and its time is extrapolated to all
   layers (said so in the output); the attributions are compared on those layers. ``--precision
   float32 float64`` times and compares both paths in each dtype (in float32 they differ by rounding,
   ~2e-4 of the largest attribution; in float64 they agree to ~1e-9).
2. Verification: over N known_1000 facts, 3 prompts each made from the fact's template with different
   short prefixes, the relative change of P(answer) when the refined neurons are suppressed/amplified,
   against random neuron sets of equal size from the same layers.

    python bench/neurons_bench.py --facts 10 --loop-layers 30 [--precision float32 float64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import locate
from locate.neurons import attribution, attribution_loop

PREFIXES = ("", "Fact: ", "As everyone knows, ")


def speed(lm, steps: int, loop_layers: int, precision=None) -> dict:
    prompts = ["The Eiffel Tower is located in the city of", "The Eiffel Tower is in the city of",
               "Fact: the Eiffel Tower is located in the city of"]
    t0 = time.perf_counter()
    batched = [attribution(lm, p, " Paris", steps=steps, precision=precision) for p in prompts]
    t_batched = time.perf_counter() - t0
    layers = sorted({round(i * (lm.n_layers - 1) / max(1, loop_layers - 1)) for i in range(loop_layers)})
    t0 = time.perf_counter()
    loop = [attribution_loop(lm, p, " Paris", steps=steps, layers=layers, precision=precision) for p in prompts]
    t_loop = (time.perf_counter() - t0) * lm.n_layers / len(layers)
    rel = max(float((a[layers] - b[layers]).abs().max() / b[layers].abs().max()) for a, b in zip(batched, loop))
    return {"batched_s": t_batched, "loop_s": t_loop, "loop_extrapolated": len(layers) < lm.n_layers,
            "loop_layers": len(layers), "speedup": t_loop / t_batched, "max_rel_diff": rel}


def verification(lm, data: Path, n_facts: int, steps: int) -> dict:
    facts = json.loads(Path(data).read_text())
    rows = []
    for f in facts:
        if len(rows) >= n_facts:
            break
        target = " " + f["attribute"]
        prompts = [(pre + f["template"].format(f["subject"]))for pre in PREFIXES]
        prompts = [p[0].upper() + p[1:] for p in prompts]
        if lm.predict(prompts[0], 1)[0].id != lm.target_ids(target, prompts[0])[0]:
            continue  # only facts the model knows
        kn = locate.neurons(prompts, target, model=lm, steps=steps, progress=False)
        if not kn.neurons:
            continue
        v = locate.verify_neurons(kn, model=lm)
        rows.append(v.summary())
        print(f"  {f['subject']!r:30} {v}", flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "target"} if rows else {}
    return {"n_facts": len(rows), "mean": mean, "facts": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--facts", type=int, default=10, help="facts to verify (0: speed only)")
    ap.add_argument("--loop-layers", type=int, default=30, help="layers the reference loop runs on")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/known_1000/known_1000.json"))
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "float64"],
                    help="dtypes to time and compare both paths in (float64: the paths agree to rounding)")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    lm = locate.default_model()
    print(f"{lm!r}, torch threads {torch.get_num_threads()}")
    for precision in [] if args.skip_speed else args.precision:
        s = speed(lm, args.steps, args.loop_layers, precision)
        print(f"speed, {precision} (1 fact, 3 prompts, {lm.n_layers} layers, m={args.steps}): batched {s['batched_s']:.1f} s, "
              f"per-layer loop {s['loop_s']:.1f} s{' (extrapolated from %d layers)' % s['loop_layers'] if s['loop_extrapolated'] else ''}, "
              f"speed-up {s['speedup']:.1f}x, max |diff| / max |attr| = {s['max_rel_diff']:.2e}", flush=True)
    if args.facts < 1:
        return
    r = verification(lm, Path(args.data), args.facts, args.steps)
    m = r["mean"]
    print(f"verification over {r['n_facts']} known_1000 facts (3 prompts each): suppress {m['suppress_rel']:+.1%} "
          f"(random {m['random_suppress_rel']:+.1%}), amplify {m['amplify_rel']:+.1%} "
          f"(random {m['random_amplify_rel']:+.1%}), mean {m['n_neurons']:.1f} neurons")


if __name__ == "__main__":
    main()
