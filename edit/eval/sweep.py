"""Layer sweep: does localization inform editing? (Hase et al. 2023, asked for any model.)

Edit the same cases at every layer l (single mode, reverting after each case) and record efficacy,
paraphrase and neighborhood scores per layer, next to the MLP average indirect effect (AIE) of
causal tracing per layer. Two answers are reported.

**Layer level** (the ROME paper's layer choice rests on this): the correlation across layers between
where tracing says the fact is and where editing works,

    r_Pearson(AIE_l, metric_l),  rho_Spearman(AIE_l, metric_l)   over the swept layers l.

**Case level** (Hase et al. §4). With ``aie="cases"`` each swept case is traced itself: its tracing
effect TE_{c,l} is the MLP indirect effect at the last subject token for layer l, on the first token
of the true target (restoring a window of MLP layers around l, as in causal tracing). Over all
(case, layer) pairs, edit success y_{c,l} is regressed three ways:

    (1) y_{c,l} = α_l + ε                  R²_layer   the layer alone (one mean per layer)
    (2) y_{c,l} = β_0 + β_1 TE_{c,l} + ε   R²_trace   the tracing effect alone
    (3) y_{c,l} = α_l + β_1 TE_{c,l} + ε   R²_both    layer and tracing effect

and ΔR² = R²_both − R²_layer is what the tracing effect adds once the layer is known. Hase et al.
find it near zero for ROME on GPT-J. As they (and ROME's causal tracing) do, the profile and the
regression use only the cases the model knows, by ROME's test: the top-1 token on the rewrite prompt,
decoded, is the whole true target (so a multi-token target is never known). For a fact the model does
not know, P(true) is near zero with or without noise and the tracing effect measures nothing.
:func:`known_cases` selects such cases up front.
The outcomes y are the rewrite score (p_after(new) − p_before(new)) / (1 − p_before(new)) on the
rewrite prompt, and the efficacy, paraphrase and neighborhood magnitudes of each case's record.

**Uncertainty.** Both answers come with case-bootstrap percentile intervals (:func:`case_bootstrap`):
the case is the resampling unit, so each draw keeps all layers of a case (and its tracing effects)
together. A draw recomputes the per-layer means, S, the profile (when it comes from the cases) and
the correlations from the swept cases, and regressions (1)-(3) from the analysed cases. The
intervals cover which cases were drawn, not the dependence between neighbouring layers, and a
packaged calibration profile is held fixed.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from locate._io import read_json, write_json
from locate import layer_profile, resolve_model, trace
from locate.causal_trace import _is_known, noise_level
from locate.errors import InvalidArgumentError, LocateEditError

from ..registry import get_method
from .harness import evaluate

from .datasets import Case
from .metrics import harmonic_mean, pearson, prob, spearman, teacher_forced

SWEEP_METRICS = ("es", "ps", "ns", "score", "em", "pm", "nm", "rewrite_acc", "paraphrase_acc", "locality")
REGRESSION_OUTCOMES = ("rewrite_score", "em", "pm", "nm")


@dataclass
class CaseTracing:
    """Causal tracing of each swept case on the unedited model (MLP kind, last subject token)."""

    case_ids: list[str]
    ie: list[list[float]]  # ie[c][l]: MLP indirect effect at the last subject token, layer l
    answers: list[str]  # the traced token: the true target's first token (the clean top-1 without one)
    p_clean: list[float]
    p_corrupted: list[float]
    known: list[bool]  # the traced token is the unedited model's top-1
    p_new_before: list[float]  # unedited P(target_new | rewrite prompt), for the rewrite score
    samples: int
    window: int
    seed: int


@dataclass
class LayerSweep:
    """Metrics against layer, the AIE profile, their correlations and (with ``aie="cases"``) the
    case-level regression of edit success on layer and tracing effect."""

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
    case_tracing: dict | None = None  # asdict(CaseTracing)
    regression: dict[str, dict[str, float]] = field(default_factory=dict)  # outcome -> R² values
    points: dict[str, list[list[float]]] = field(default_factory=dict)  # outcome -> [layer, TE, y] rows
    intervals: dict = field(default_factory=dict)  # case-bootstrap percentile intervals (case_bootstrap)

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
        ci = self.intervals.get("correlations", {})
        for k, c in self.correlations.items():
            line = f"corr(AIE, {k.upper()}): Pearson {c['pearson']:+.2f}, Spearman {c['spearman']:+.2f}"
            if k in ci:
                line += f"   {_pct(self.intervals)} CI: Pearson {_fmt_ci(ci[k]['pearson'])}, Spearman {_fmt_ci(ci[k]['spearman'])}"
            lines.append(line)
        lines.append(f"AIE: {self.aie_source}")
        if self.regression:
            rci = self.intervals.get("regression", {})
            lines.append("case level, over (case, layer) pairs of the known cases: R² of edit success on")
            lines.append("outcome         layer  tracing   both   added by tracing  corr(TE, y)"
                         + (f"   {_pct(self.intervals)} CI of added" if rci else ""))
            for k, r in self.regression.items():
                lines.append(f"{k:<14} {r['r2_layer']:6.3f}  {r['r2_trace']:6.3f}  {r['r2_both']:6.3f}  "
                             f"{r['delta_r2']:+16.3f}  {r['pearson']:+10.2f}   (n={r['n']})"
                             + (f"   {_fmt_ci(rci[k]['delta_r2'], '.3f')}" if k in rci else ""))
        if self.intervals:
            iv = self.intervals
            lines.append(f"intervals: {_pct(iv)} percentile, {iv['n_boot']} case-bootstrap draws (seed {iv['seed']})"
                         + (f"; the profile redrawn with the cases, {iv['valid']} draws held an analysed case"
                            if iv.get("profile_redrawn") else ""))
        return "\n".join(lines)


# --------------------------------------------------------------------------- tracing the swept cases
def known_cases(cases: Sequence[Case], model=None, *, n: int | None = None, batch_size: int = 32,
                known_match: str = "answer") -> list[Case]:
    """The cases the unedited model knows, in order; the first ``n`` of them if given.

    Causal tracing's correctness filter (:func:`locate.causal_trace._is_known`): by default, as the
    reference, the top-1 token on the rewrite prompt, decoded and stripped, is the whole true target
    (so a case whose true target has several tokens is never known); ``known_match="first_token"``
    only asks for the true target's first token."""

    lm = resolve_model(model)
    keep: list[Case] = []
    for s in range(0, len(cases), batch_size):
        batch = [c for c in cases[s:s + batch_size] if c.request.target_true]
        if not batch:
            continue
        logits = lm.last_logits([c.request.rendered for c in batch])
        keep += [c for c, lg in zip(batch, logits)
                 if _is_known(lm, c.request.rendered, c.request.target_true, lg, known_match)]
        if n is not None and len(keep) >= n:
            return keep[:n]
    return keep


def analysed_cases(tracing: CaseTracing) -> tuple[list[int], str]:
    """Indices of the traced cases the profile and regression use: the known ones, or all of them
    (with a warning) when the model knows none."""
    known = [i for i, k in enumerate(tracing.known) if k]
    if known:
        return known, f"the {len(known)} of {len(tracing.known)} swept cases the model knows"
    warnings.warn("the model knows none of the swept cases (top-1 != true target); the tracing effects "
                  "use all of them and are close to zero. Select cases with edit.sweep.known_cases.", stacklevel=2)
    return list(range(len(tracing.known))), f"all {len(tracing.known)} swept cases (the model knows none)"


def trace_cases(cases: Sequence[Case], model=None, *, samples: int = 3, window: int | None = None, seed: int = 0,
                out: str | Path | None = None, progress: bool = True) -> CaseTracing:
    """Trace each case's rewrite prompt on the (unedited) model: MLP indirect effects at the last
    subject token for every layer, on the first token of ``target_true``. With ``out`` the result is
    cached in ``out`` (a JSON file) and reused when model, cases and settings match."""

    lm = resolve_model(model)
    nu = noise_level(lm, "auto")  # resolved once: the file records which ν (and rule) traced its cases
    window = min(10, lm.n_layers) if window is None else window  # trace's default: the reference's 10, capped
    settings = {"fingerprint": lm.state_fingerprint, "cases": [str(c.case_id) for c in cases], "samples": samples,
                "window": window, "seed": seed, "noise": [nu.nu, nu.source], "known_match": "answer"}
    if out is not None and Path(out).is_file():
        try:
            stored = read_json(out, "case tracing")
            if stored["settings"] == settings:
                return CaseTracing(**stored["tracing"])
        except (ValueError, KeyError, TypeError) as e:  # unreadable or from an older format: trace again
            warnings.warn(f"case tracing file {out} is unreadable ({e}); tracing again", stacklevel=2)
    known = {id(c) for c in known_cases(cases, lm)}
    rows = {k: [] for k in ("ie", "answers", "p_clean", "p_corrupted", "known")}
    for c in tqdm(cases, desc="tracing the swept cases", disable=not progress):
        r = c.request
        prompt = r.rendered
        target = lm.target_ids(r.target_true, prompt)[0] if r.target_true else None
        tr = trace(prompt, r.subject, model=lm, kinds=("mlp",), samples=samples, window=window, seed=seed,
                   target=target, tokens=["last_subject"], noise=nu)
        rows["ie"].append([float(x) for x in tr.ie("mlp")[tr.token_index("last_subject")]])
        rows["answers"].append(tr.answer)
        rows["p_clean"].append(tr.p_clean)
        rows["p_corrupted"].append(tr.p_corrupted)
        rows["known"].append(target is None or id(c) in known)  # without a true target the top-1 is traced
    before = teacher_forced(lm, [c.request.rendered for c in cases], [c.request.target_new for c in cases])
    result = CaseTracing(case_ids=settings["cases"], p_new_before=[prob(t) for t in before], samples=samples,
                         window=window, seed=seed, **rows)
    if out is not None:
        write_json(out, {"settings": settings, "tracing": asdict(result)})
    return result


# --------------------------------------------------------------------------- Hase et al.'s regression
def _r2(X: np.ndarray, y: np.ndarray) -> float:
    """R² of the least-squares fit y ≈ X β (X holds its own intercept columns)."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_res = float(((y - X @ beta) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return float("nan") if ss_tot == 0 else 1.0 - ss_res / ss_tot


def localization_regression(layer: Sequence[int], te: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Regressions (1)-(3) of the module docstring over pairs (layer_i, TE_i, y_i). NaN values of y
    are dropped; with no more observations than parameters the R² values are NaN."""
    layer, te, y = np.asarray(layer), np.asarray(te, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y) & ~np.isnan(te)
    layer, te, y = layer[keep], te[keep], y[keep]
    levels = sorted(set(layer.tolist()))
    onehot = (layer[:, None] == np.asarray(levels)[None, :]).astype(np.float64)  # α_l
    X_layer = onehot
    X_trace = np.stack([np.ones_like(te), te], axis=1)  # β_0 + β_1 TE
    X_both = np.concatenate([onehot, te[:, None]], axis=1)  # α_l + β_1 TE
    n = len(y)
    fits = {}
    for name, X in (("r2_layer", X_layer), ("r2_trace", X_trace), ("r2_both", X_both)):
        fits[name] = _r2(X, y) if n > X.shape[1] else float("nan")
    fits["delta_r2"] = fits["r2_both"] - fits["r2_layer"]
    fits["pearson"] = pearson(te, y)
    fits["n"] = int(n)
    return fits


def _outcomes(record: dict, p_before: float) -> dict[str, float]:
    y = {k: float(record[k]) for k in ("em", "pm", "nm") if record.get(k) is not None}
    if record.get("p_new") is not None and p_before < 1.0:
        y["rewrite_score"] = (float(record["p_new"]) - p_before) / (1.0 - p_before)
    return y


def case_points(layers: Sequence[int], records_by_layer: Sequence[Sequence[dict]], tracing: CaseTracing,
                used: Sequence[int] | None = None) -> dict[str, list[list[float]]]:
    """Pair every (case, layer) record of the analysed cases (:func:`analysed_cases`) with the case's
    tracing effect at that layer:
    ``{outcome: [[layer, TE_{c,l}, y_{c,l}], ...]}`` for each outcome in ``REGRESSION_OUTCOMES``."""
    used = analysed_cases(tracing)[0] if used is None else used
    index = {tracing.case_ids[i]: i for i in used}
    points: dict[str, list[list[float]]] = {k: [] for k in REGRESSION_OUTCOMES}
    for l, records in zip(layers, records_by_layer):
        for rec in records:
            i = index.get(str(rec["case_id"]))
            if i is None:
                continue
            for k, v in _outcomes(rec, tracing.p_new_before[i]).items():
                points[k].append([l, tracing.ie[i][l], v])
    return {k: p for k, p in points.items() if p}


def case_regression(points: dict[str, list[list[float]]]) -> dict[str, dict[str, float]]:
    """:func:`localization_regression` for each outcome of :func:`case_points`."""
    return {k: localization_regression(*zip(*p)) for k, p in points.items()}


# --------------------------------------------------------------------------- case bootstrap
def _pct(intervals: dict) -> str:
    return f"{100 * intervals.get('level', 0.95):g}%"


def _fmt_ci(ci: Sequence[float], spec: str = "+.2f") -> str:
    return f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _percentile_ci(draws: np.ndarray, level: float) -> list[float]:
    """The (1-level)/2 and (1+level)/2 percentiles of the finite draws (NaN when there are none)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _by_case(case_ids: Sequence[str], records_by_layer: Sequence[Sequence[dict]], key: str) -> np.ndarray:
    """``M[c, j]``: case c's value of ``key`` at the j-th swept layer (NaN where a record lacks it)."""
    index = {cid: i for i, cid in enumerate(case_ids)}
    M = np.full((len(case_ids), len(records_by_layer)), np.nan)
    for j, records in enumerate(records_by_layer):
        for rec in records:
            v = rec.get(key)
            if str(rec["case_id"]) in index and v is not None:
                M[index[str(rec["case_id"])], j] = float(v)
    return M


def case_bootstrap(layers: Sequence[int], records_by_layer: Sequence[Sequence[dict]], case_ids: Sequence[str], *,
                   profile: Sequence[float] | None, tracing: CaseTracing | None = None,
                   analysed: Sequence[int] | None = None, profile_from_cases: bool = False, n_boot: int = 1000,
                   level: float = 0.95, seed: int = 0) -> dict:
    """Percentile intervals for the sweep's numbers, resampling cases with replacement ``n_boot`` times.

    Layer level: each draw b picks n of the n swept cases, and recomputes ES_l, PS_l, NS_l (means over
    the drawn cases), S_l = HarmonicMean(ES_l, PS_l, NS_l) and r(AIE_l, metric_l). With
    ``profile_from_cases`` the profile is redrawn too, as the mean tracing effect of the drawn cases
    that are analysed (a draw with none of them gives no correlation and is not counted in ``valid``).
    Case level: each draw picks as many of the analysed cases, with all their (case, layer) pairs,
    and refits regressions (1)-(3)."""
    if not 0 < level < 1:
        raise InvalidArgumentError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    case_ids = [str(c) for c in case_ids]
    n = len(case_ids)
    M = {k: _by_case(case_ids, records_by_layer, k) for k in ("es", "ps", "ns")}
    ie = None if tracing is None else np.asarray(tracing.ie, dtype=np.float64)[:, list(layers)]
    is_analysed = np.zeros(n, dtype=bool)
    if analysed is not None:
        is_analysed[list(analysed)] = True
    fixed = None if profile is None else np.asarray([profile[l] for l in layers], dtype=np.float64)
    redrawn = profile_from_cases and ie is not None

    metric_draws = {k: np.full((n_boot, len(layers)), np.nan) for k in ("es", "ps", "ns", "score")}
    corr_draws = {k: np.full((n_boot, 2), np.nan) for k in ("es", "ps", "ns", "score")}
    valid = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a layer no drawn case has
        for b in range(n_boot):
            draw = rng.integers(0, n, size=n)
            means = {k: np.nanmean(M[k][draw], axis=0) for k in ("es", "ps", "ns")}
            means["score"] = np.asarray([harmonic_mean(v) for v in zip(means["es"], means["ps"], means["ns"])])
            for k, v in means.items():
                metric_draws[k][b] = v
            a = fixed
            if redrawn:
                used = draw[is_analysed[draw]]
                a = ie[used].mean(0) if used.size else None
            if a is None:
                continue
            valid += 1
            for k, v in means.items():
                corr_draws[k][b] = (pearson(a, v), spearman(a, v))
    out = {"level": level, "n_boot": n_boot, "seed": seed, "unit": "case", "valid": valid,
           "profile_redrawn": bool(redrawn),
           "metrics": {k: [_percentile_ci(d[:, j], level) for j in range(len(layers))] for k, d in metric_draws.items()},
           "correlations": {} if fixed is None and not redrawn else
           {k: {"pearson": _percentile_ci(d[:, 0], level), "spearman": _percentile_ci(d[:, 1], level)}
            for k, d in corr_draws.items()},
           "regression": {}}
    if tracing is None or analysed is None or not len(analysed):
        return out
    # case level: per analysed case, its (layer, TE, y) rows for every outcome
    blocks = [case_points(layers, records_by_layer, tracing, [i]) for i in analysed]
    for k in REGRESSION_OUTCOMES:
        rows = [np.asarray(bl.get(k, []), dtype=np.float64).reshape(-1, 3) for bl in blocks]
        if not any(len(r) for r in rows):
            continue
        draws = {q: np.full(n_boot, np.nan) for q in ("r2_layer", "r2_trace", "r2_both", "delta_r2")}
        for b in range(n_boot):
            pts = np.concatenate([rows[i] for i in rng.integers(0, len(rows), size=len(rows))])
            if len(pts):
                fit = localization_regression(pts[:, 0].astype(int), pts[:, 1], pts[:, 2])
                for q in draws:
                    draws[q][b] = fit[q]
        out["regression"][k] = {q: _percentile_ci(d, level) for q, d in draws.items()}
    return out


# --------------------------------------------------------------------------- the sweep
def _aie_profile(lm, aie, tracing: CaseTracing | None, analysed) -> tuple[list[float] | None, str]:
    if aie is None:
        return None, "not computed (aie=None)"
    if isinstance(aie, str) and aie == "cases":
        used, which = analysed
        return (np.asarray(tracing.ie)[used].mean(0).tolist(),
                f"MLP IE at the last subject token on the true target's first token, mean over {which}; "
                f"samples={tracing.samples}, window={tracing.window}")
    if isinstance(aie, str) and aie == "calibration":

        prof = layer_profile(lm)
        return [float(x) for x in prof.aie], f"locate.layer_profile: {prof.reason()} ({prof.source})"
    vals = getattr(aie, "aie", aie)
    return [float(x) for x in np.asarray(vals, dtype=float).reshape(-1)], "given"


def layer_hparams(method: str, layer: int) -> dict:
    """The hyperparameter that pins ``method`` to one layer: every layered method takes a layer spec
    in ``layers`` (:mod:`edit.registry`); a method that edits no layer cannot be swept."""
    if get_method(method).layers is None:
        raise LocateEditError(f"{method} edits no particular layer; a layer sweep needs a method that does")
    return {"layers": [layer]}


def layer_sweep(cases: Sequence[Case], *, method: str = "rome", layers: Sequence[int] | None = None, model=None,
                aie="cases", hparams: dict | None = None, out: str | Path | None = None, fluency: bool = False,
                trace_samples: int = 3, trace_window: int | None = None, bootstrap: int = 1000, level: float = 0.95,
                seed: int = 0, progress: bool = True, corpus=None, stats: dict | None = None) -> LayerSweep:
    """Edit ``cases`` with ``method`` at each of ``layers`` (default: all) and relate the metrics to
    causal tracing.

    ``aie``: ``"cases"`` (default) traces the swept cases themselves (:func:`trace_cases`); their mean
    is the AIE profile and the per-case effects feed the case-level regression. ``"calibration"``
    uses :func:`locate.layer_profile` (the packaged known facts); an array or ``LayerProfile`` is used
    as given; ``None`` skips tracing. With ``out``, each layer's run is stored (and resumed) under
    ``out/layer_XX/``, the case tracing in ``out/case_tracing.json`` and the sweep in ``out/sweep.json``.
    ``bootstrap`` case-bootstrap draws (0: none) give ``level`` percentile intervals (:func:`case_bootstrap`).
    ``corpus``/``stats``: the key statistics' source, as in :func:`edit.eval.evaluate`.
    """
    lm = resolve_model(model)
    layers = list(range(lm.n_layers)) if layers is None else [lm.check_layer(l) for l in layers]
    if isinstance(aie, str) and aie not in ("cases", "calibration"):
        raise InvalidArgumentError(f"aie must be 'cases', 'calibration', None, an array or a LayerProfile, got {aie!r}")
    if bootstrap < 0 or not 0 < level < 1:
        raise InvalidArgumentError(f"bootstrap must be >= 0 draws and level in (0, 1), got {bootstrap} and {level}")
    tracing = None
    if isinstance(aie, str) and aie == "cases":  # before editing: the unedited model is traced
        tracing = trace_cases(cases, lm, samples=trace_samples, window=trace_window,
                              out=None if out is None else Path(out) / "case_tracing.json", progress=progress)
    metrics: dict[str, list[float]] = {k: [] for k in SWEEP_METRICS}
    records_by_layer = []
    for l in layers:
        res = evaluate(method, cases, model=lm, mode="single", hparams={**(hparams or {}), **layer_hparams(method, l)},
                       out=None if out is None else Path(out) / f"layer_{l:02d}", fluency=fluency, progress=progress,
                       corpus=corpus, stats=stats)
        records_by_layer.append(res.records)
        for k in SWEEP_METRICS:
            metrics[k].append(float(res.aggregates.get(k, float("nan"))))
    metrics = {k: v for k, v in metrics.items() if not all(np.isnan(v))}
    analysed = analysed_cases(tracing) if tracing is not None else None
    profile, source = _aie_profile(lm, aie, tracing, analysed)
    corr = {}
    if profile is not None:
        a = [profile[l] for l in layers]
        for k in ("es", "ps", "ns", "score"):
            if k in metrics:
                corr[k] = {"pearson": pearson(a, metrics[k]), "spearman": spearman(a, metrics[k])}
    points = case_points(layers, records_by_layer, tracing, analysed[0]) if tracing is not None else {}
    intervals = {}
    if bootstrap:
        intervals = case_bootstrap(layers, records_by_layer, [c.case_id for c in cases], profile=profile,
                                   tracing=tracing, analysed=None if analysed is None else analysed[0],
                                   profile_from_cases=isinstance(aie, str) and aie == "cases", n_boot=bootstrap,
                                   level=level, seed=seed)
    sweep = LayerSweep(method, layers, metrics, profile, source, corr, len(cases), lm.name, dict(hparams or {}),
                       case_tracing=None if tracing is None else asdict(tracing), regression=case_regression(points),
                       points=points, intervals=intervals)
    if out is not None:
        sweep.save(Path(out) / "sweep.json")
    return sweep
