"""Layer sweep: does localization inform editing? (Hase et al. 2023, asked for any model.)

Edit the same cases at every layer l (single mode, reverting after each case) and record efficacy,
paraphrase and neighborhood scores per layer, next to the MLP average indirect effect (AIE) of
causal tracing per layer. The answer is the correlation across layers between where tracing says the
fact is and where editing works:

    r_Pearson(AIE_l, metric_l),  rho_Spearman(AIE_l, metric_l)   over l = 0..L-1.

(Hase et al. also correlate tracing and editing success case by case; this sweep reports the
layer-level relation, which is what the ROME paper's layer choice rests on.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from locate._io import read_json, write_json
from locate import resolve_model

from .datasets import Case
from .metrics import pearson, spearman

SWEEP_METRICS = ("es", "ps", "ns", "score", "em", "pm", "nm", "rewrite_acc", "paraphrase_acc", "locality")


@dataclass
class LayerSweep:
    """Metrics against layer, the AIE profile, and their correlations."""

    method: str
    layers: list[int]
    metrics: dict[str, list[float]]
    aie: list[float] | None
    aie_source: str
    correlations: dict[str, dict[str, float]]
    n_cases: int
    model_name: str
    hparams: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "LayerSweep":
        return cls(**read_json(path, "layer-sweep"))

    def table(self) -> str:
        keys = [k for k in ("es", "ps", "ns", "score") if k in self.metrics]
        lines = ["layer  " + "  ".join(f"{k.upper():>6}" for k in keys) + ("     AIE" if self.aie else "")]
        for i, l in enumerate(self.layers):
            row = f"{l:>5}  " + "  ".join(f"{100 * self.metrics[k][i]:6.1f}" for k in keys)
            if self.aie:
                row += f"  {self.aie[l]:6.3f}"
            lines.append(row)
        for k, c in self.correlations.items():
            lines.append(f"corr(AIE, {k.upper()}): Pearson {c['pearson']:+.2f}, Spearman {c['spearman']:+.2f}")
        if not self.aie:
            lines.append(f"AIE: {self.aie_source}")
        return "\n".join(lines)


def _aie_profile(lm, aie) -> tuple[list[float] | None, str]:
    if aie is not None:
        vals = getattr(aie, "aie", aie)
        return [float(x) for x in np.asarray(vals, dtype=float).reshape(-1)], "given"
    from locate import layer_profile

    prof = layer_profile(lm)
    return [float(x) for x in np.asarray(prof.aie, dtype=float).reshape(-1)], "locate.layer_profile (MLP AIE, last subject token)"


def layer_hparams(method: str, layer: int) -> dict:
    """The keyword that pins ``method`` to one layer (MEMIT takes a list of layers)."""
    return {"layers": [layer]} if method == "memit" else {"layer": layer}


def layer_sweep(cases: Sequence[Case], *, method: str = "rome", layers: Sequence[int] | None = None, model=None,
                aie=None, trace: bool = True, hparams: dict | None = None, out: str | Path | None = None,
                fluency: bool = False, progress: bool = True) -> LayerSweep:
    """Edit ``cases`` with ``method`` at each of ``layers`` (default: all) and correlate the metrics
    with the MLP AIE per layer (``aie``: an array or a ``LayerProfile``; default
    ``locate.layer_profile(model)`` when causal tracing is installed; ``trace=False`` skips it). With ``out``, each layer's run
    is stored (and resumed) under ``out/layer_XX/`` and the sweep in ``out/sweep.json``."""
    from .evaluate import evaluate

    lm = resolve_model(model)
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(l) for l in layers]
    metrics: dict[str, list[float]] = {k: [] for k in SWEEP_METRICS}
    for l in layers:
        res = evaluate(method, cases, model=lm, mode="single", hparams={**(hparams or {}), **layer_hparams(method, l)},
                       out=None if out is None else Path(out) / f"layer_{l:02d}", fluency=fluency, progress=progress)
        for k in SWEEP_METRICS:
            metrics[k].append(float(res.aggregates.get(k, float("nan"))))
    metrics = {k: v for k, v in metrics.items() if not all(np.isnan(v))}
    profile, source = _aie_profile(lm, aie) if (aie is not None or trace) else (None, "not computed (trace=False)")
    corr = {}
    if profile is not None:
        a = [profile[l] for l in layers]
        for k in ("es", "ps", "ns", "score"):
            if k in metrics:
                corr[k] = {"pearson": pearson(a, metrics[k]), "spearman": spearman(a, metrics[k])}
    sweep = LayerSweep(method, layers, metrics, profile, source, corr, len(cases), lm.name, dict(hparams or {}))
    if out is not None:
        sweep.save(Path(out) / "sweep.json")
    return sweep
