"""The harness: modes, reverting, resuming, efficiency fields, FT-L, errors. On a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

import edit
import edit.eval.harness as ev
from dataclasses import dataclass
from typing import Any

import locate.layers
from edit.eval.datasets import Case, Probe
from edit.edit import Edit, WeightDelta
from edit.methods.ft import fine_tune
from edit.registry import register
from edit.request import InvalidRequestError, Request
from locate.calibration import LayerProfile
from locate.errors import EditFailedError, LayerOutOfRangeError, LocateEditError, MethodNotAvailableError

CALLS: list = []


@dataclass
class BumpHparams:
    layers: Any = 1  # a layer spec, resolved by the registry like every method's
    scale: float = 1e-3


def _bump(lm, requests, hp, rt):
    """A test method: adds a fixed rank-one delta at one layer (one request at a time)."""
    (request,) = requests
    if request.subject == "Otto" and hp.scale < 0:
        raise EditFailedError("no")
    CALLS.append(request.subject)
    (layer,), _ = locate.resolve_layers(lm, hp.layers, 1)
    g = torch.Generator().manual_seed(len(request.subject))
    u, v = torch.randn(lm.d_model, 1, generator=g), torch.randn(1, lm.d_mlp, generator=g)
    return Edit("bump", [request], [WeightDelta(layer, left=u * hp.scale, right=v)], lm.fingerprint, lm.name)


register("bump", BumpHparams, batched=False, layers=1, description="test: a fixed rank-one delta")(_bump)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("llama", tokenizer)


def _cases():
    mk = lambda i, s, new, true: Case(i, "handmade", [Request("{} lives in the city of", s, new, true)],  # noqa: E731
                                      paraphrase_prompts=[f"Everyone knows {s} lives in"],
                                      neighborhood_prompts=["Anna lives in the city of"],
                                      generation_prompts=[f"{s} is"],
                                      locality=[Probe("The sky is", (" blue",))],
                                      portability=[Probe(f"The country where {s} lives is", (" Italy",))])
    return [mk(0, "Marco", " Rome", " Paris"), mk(1, "Jean", " New York City", " Lyon"), mk(2, "Otto", " Berlin", " Bonn")]


def _weights(lm):
    return [p.detach().clone() for p in lm.hf_model.parameters()]


def _same(lm, ws):
    return all(torch.equal(a, b) for a, b in zip(ws, lm.hf_model.parameters()))


def test_single_mode_reverts_and_records_everything(tiny_lm, tmp_path):
    ws = _weights(tiny_lm)
    res = edit.evaluate("bump", _cases(), model=tiny_lm, out=tmp_path, gen_length=12, progress=False)
    assert _same(tiny_lm, ws)
    assert len(res.records) == 3
    for r in res.records:
        for k in ("es", "ps", "ns", "em", "rewrite_acc", "paraphrase_acc", "locality", "portability", "fluency",
                  "edit_seconds", "peak_memory_mb"):
            assert k in r, k
        assert r["edit_seconds"] > 0 and r["layers"] == [1]
    assert 0.0 <= res.aggregates["score"] <= 1.0
    assert "not available" in res.aggregates["consistency"]
    assert (tmp_path / "results.json").is_file() and (tmp_path / "records.csv").is_file()
    again = ev.Results.load(tmp_path / "results.json")
    assert again.aggregates == json.loads(json.dumps(res.aggregates))
    assert "ES" in res.table() and "bump" in res.table()


def test_unedited_model_locality_is_perfect(tiny_lm):
    res = edit.evaluate("none", _cases(), model=tiny_lm, fluency=False, progress=False)
    assert res.aggregates["locality"] == 1.0
    assert all(r["edit_seconds"] is None for r in res.records)


def test_resume_skips_done_cases(tiny_lm, tmp_path):
    CALLS.clear()
    edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=False, progress=False)
    assert CALLS == ["Marco", "Jean"]
    # simulate an interrupted run: keep only the first record
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text(lines[0] + "\n")
    CALLS.clear()
    res = edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=False, progress=False)
    assert CALLS == ["Jean"] and len(res.records) == 2
    with pytest.raises(LocateEditError, match="different settings"):
        edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=False, progress=False,
                      hparams={"scale": 2e-3})


def test_a_single_mode_run_extends_to_a_longer_case_list(tiny_lm, tmp_path):
    """--n 2 then --n 3: the longer run keeps the 2 records (they are what it would write) and edits only
    the third case; a list that does not start with the old one, another fluency split of the old
    cases, another setting, or another mode are refused."""
    CALLS.clear()
    short = edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=2, gen_length=8, progress=False)
    assert CALLS == ["Marco", "Jean"]
    CALLS.clear()
    longer = edit.evaluate("bump", _cases(), model=tiny_lm, out=tmp_path, fluency=2, gen_length=8, progress=False)
    assert CALLS == ["Otto"] and len(longer.records) == 3
    assert longer.records[:2] == short.records and "fluency" in longer.records[1] and "fluency" not in longer.records[2]
    assert json.loads((tmp_path / "settings.json").read_text())["settings"]["cases"] == ["0", "1", "2"]
    fresh = edit.evaluate("bump", _cases(), model=tiny_lm, fluency=2, gen_length=8, progress=False)
    drop = ("edit_seconds", "peak_memory_mb", "seconds")
    assert ([{k: v for k, v in r.items() if k not in drop} for r in longer.records]
            == [{k: v for k, v in r.items() if k not in drop} for r in fresh.records])
    for kw in ({"cases": _cases()[1:]}, {"fluency": 1}, {"fluency": 2, "gen_length": 9},
               {"fluency": 2, "mode": "sequential"}):
        cases = kw.pop("cases", _cases())
        with pytest.raises(LocateEditError, match="different settings"):
            edit.evaluate("bump", cases, model=tiny_lm, out=tmp_path, **{"gen_length": 8, **kw}, progress=False)


def test_auto_layers_are_pinned_in_the_settings_and_guard_the_resume(tiny_lm, tmp_path, monkeypatch):
    """A run records the layers "auto" resolved to; if "auto" later resolves elsewhere (a recomputed
    calibration), resuming fails instead of mixing layers in one table."""
    peak = {"layer": 1}  # where the (stand-in) calibration says the MLP effect peaks

    def profile(lm):
        aie = [0.0] * lm.n_layers
        aie[peak["layer"]] = 1.0
        return LayerProfile(aie=__import__("numpy").array(aie), n_facts=1, source="test")

    monkeypatch.setattr(locate.layers, "layer_profile", profile)
    res = edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=False, progress=False,
                        hparams={"layers": "auto"})
    assert [r["layers"] for r in res.records] == [[1], [1]]
    stored = json.loads((tmp_path / "settings.json").read_text())["settings"]
    assert stored["hparams"]["layers"] == [1] and "layer 1" in res.settings["layers_reason"]
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text(lines[0] + "\n")
    peak["layer"] = 0
    ws = _weights(tiny_lm)
    with pytest.raises(LocateEditError, match="different settings"):
        edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=False, progress=False,
                      hparams={"layers": "auto"})
    assert _same(tiny_lm, ws)
    CALLS.clear()  # the explicit layer the run was made with resumes it
    res = edit.evaluate("bump", _cases()[:2], model=tiny_lm, out=tmp_path, fluency=False, progress=False,
                        hparams={"layers": [1]})
    assert CALLS == ["Jean"] and [r["layers"] for r in res.records] == [[1], [1]]
    # the registry's pinning: MEMIT's explicit layers come back checked and sorted
    m = edit.get_method("memit")
    hp, why = m.pin(tiny_lm, m.make_hparams({"layers": [1, 0], "kl_factor": 0.1}))
    assert hp.layers == [0, 1] and hp.kl_factor == 0.1 and "chosen by the caller" in why
    with pytest.raises(LayerOutOfRangeError):
        m = edit.get_method("rome")
        m.pin(tiny_lm, m.make_hparams({"layers": tiny_lm.n_layers}))


def test_batch_mode(tiny_lm):
    ws = _weights(tiny_lm)
    res = edit.evaluate("ft-l", _cases(), model=tiny_lm, mode="batch", batch_size=2, fluency=False, progress=False,
                        hparams={"layers": 1, "steps": 3, "norm_constraint": None, "lr": 1e-2})
    assert _same(tiny_lm, ws)
    assert [r["n_requests_in_edit"] for r in res.records] == [2, 2, 1]


def test_sequential_mode_checkpoints_and_resume(tiny_lm, tmp_path):
    ws = _weights(tiny_lm)
    CALLS.clear()
    res = edit.evaluate("bump", _cases(), model=tiny_lm, mode="sequential", checkpoints=[1, 3], out=tmp_path,
                        fluency=False, progress=False)
    assert _same(tiny_lm, ws)
    assert sorted(res.curve) == [1, 3]
    assert res.curve[1]["n_cases"] == 1 and res.curve[3]["n_cases"] == 3
    assert res.aggregates == res.curve[3]
    assert len(list((tmp_path / "edits").rglob("*.safetensors"))) == 3
    # with every edit stored, a re-run recomputes nothing and re-applies the saved edits
    CALLS.clear()
    again = edit.evaluate("bump", _cases(), model=tiny_lm, mode="sequential", checkpoints=[1, 3], out=tmp_path,
                          fluency=False, progress=False)
    assert CALLS == [] and again.curve[3]["es"] == res.curve[3]["es"]
    assert _same(tiny_lm, ws)


def test_sequential_failure_reverts_everything(tiny_lm):
    ws = _weights(tiny_lm)
    bad = _cases()
    bad[2] = Case(9, "handmade", [Request("{} lives in", "Otto", " Berlin")])

    with pytest.raises(EditFailedError):  # a negative scale makes the test method fail on "Otto"
        edit.evaluate("bump", bad, model=tiny_lm, mode="sequential", fluency=False, progress=False,
                      hparams={"scale": -1e-3})
    assert _same(tiny_lm, ws)


def test_method_errors(tiny_lm):
    with pytest.raises(MethodNotAvailableError, match="unknown editing method"):
        edit.evaluate("nope", _cases(), model=tiny_lm)
    with pytest.raises(edit.InvalidHparamsError, match="no hyperparameter"):
        edit.evaluate("bump", _cases(), model=tiny_lm, hparams={"nope": 1})
    with pytest.raises(ValueError, match="mode"):
        edit.evaluate("none", _cases(), model=tiny_lm, mode="parallel")
    bad = [Case(0, "x", [Request("{} lives in", "Nobody", " Rome")], paraphrase_prompts=[])]
    bad[0].requests[0] = Request("lives in", "Nobody", " Rome")
    with pytest.raises(InvalidRequestError):
        edit.evaluate("none", bad, model=tiny_lm)


def test_ft_respects_the_linf_bound_and_leaves_model_unchanged(tiny_lm):
    ws = _weights(tiny_lm)
    req = Request("{} lives in the city of", "Marco", " New York City", " Paris")
    e = fine_tune(req, model=tiny_lm, layer=1, steps=5, lr=1e-2, norm_constraint=1e-3)
    assert _same(tiny_lm, ws)
    assert e.method == "ft-l" and e.layers == [1]
    assert float(e.deltas[0].dense.abs().max()) <= 1e-3 + 1e-7
    free = fine_tune(req, model=tiny_lm, layer=1, steps=20, lr=1e-2, norm_constraint=None)
    assert free.loss_trace[-1] < free.loss_trace[0]  # unconstrained FT does learn the target
    assert float(free.deltas[0].dense.abs().max()) > 1e-3
    with pytest.raises(LayerOutOfRangeError):
        fine_tune(req, model=tiny_lm, layer=7)


def test_measure_reports_time_and_memory():
    with ev.Measure("cpu") as m:
        x = torch.ones(2_000_000)  # 8 MB
        x += 1
    assert m.seconds > 0
    assert m.peak_mb is None or m.peak_mb >= 0


def test_layer_sweep_correlates_with_the_given_aie(tiny_lm, tmp_path):
    from edit.eval.sweep import LayerSweep, layer_sweep

    sw = layer_sweep(_cases()[:2], method="bump", model=tiny_lm, aie=[0.1, 0.3], out=tmp_path, progress=False)
    assert sw.layers == [0, 1] and len(sw.metrics["es"]) == 2
    assert set(sw.correlations) >= {"es", "ps", "ns"}
    assert LayerSweep.load(tmp_path / "sweep.json").metrics == sw.metrics
    assert "corr(AIE" in sw.table() or "nan" in sw.table()


def test_localization_regression_recovers_known_structure():
    """Regressions (1)-(3) on synthetic (case, layer) data where the answer is known."""
    import numpy as np
    from edit.eval.sweep import localization_regression

    rng = np.random.default_rng(0)
    layer = np.repeat([0, 1, 2], 20)
    te = rng.random(60)
    by_layer = np.array([0.1, 0.5, 0.9])[layer]
    only_layer = localization_regression(layer, te, by_layer)
    assert only_layer["r2_layer"] == pytest.approx(1.0) and abs(only_layer["delta_r2"]) < 1e-9
    only_trace = localization_regression(layer, te, 3 * te - 1)
    assert only_trace["r2_trace"] == pytest.approx(1.0) and only_trace["pearson"] == pytest.approx(1.0)
    both = localization_regression(layer, te, by_layer + te)
    assert both["r2_both"] == pytest.approx(1.0)
    assert 0 < both["r2_layer"] < 1 and both["delta_r2"] == pytest.approx(1 - both["r2_layer"])
    assert both["n"] == 60
    tiny = localization_regression([0, 1], [0.1, 0.2], [0.0, 1.0])  # fewer observations than parameters
    assert np.isnan(tiny["r2_both"]) and np.isnan(tiny["r2_layer"])


def test_layer_sweep_traces_its_own_cases_and_regresses(tiny_lm, tmp_path, monkeypatch):
    import numpy as np
    from edit.eval import sweep as sweep_mod
    from edit.eval.sweep import LayerSweep, layer_sweep

    cases = _cases()[:2]
    with pytest.warns(UserWarning, match="knows none of the swept cases"):  # a random model knows nothing
        sw = layer_sweep(cases, method="bump", model=tiny_lm, out=tmp_path, trace_window=1, progress=False)
    tr = sw.case_tracing
    assert tr["case_ids"] == ["0", "1"] and np.asarray(tr["ie"]).shape == (2, tiny_lm.n_layers)
    # the traced token is the true target's first token, and the profile is the mean over the cases
    assert tr["answers"][0] == tiny_lm.tokenizer.decode([tiny_lm.target_ids(" Paris", cases[0].request.rendered)[0]])
    assert sw.aie == pytest.approx(np.asarray(tr["ie"]).mean(0).tolist())
    assert all(0 <= p <= 1 for p in tr["p_clean"] + tr["p_corrupted"] + tr["p_new_before"])
    assert set(sw.regression) == {"rewrite_score", "em", "pm", "nm"}
    assert all(r["n"] == 4 for r in sw.regression.values())  # 2 cases x 2 layers
    rec = json.loads((tmp_path / "layer_01" / "records.jsonl").read_text().splitlines()[0])
    i = tr["case_ids"].index(str(rec["case_id"]))
    expect = (rec["p_new"] - tr["p_new_before"][i]) / (1 - tr["p_new_before"][i])
    assert sweep_mod._outcomes(rec, tr["p_new_before"][i])["rewrite_score"] == pytest.approx(expect)
    assert "added by tracing" in sw.table()
    assert LayerSweep.load(tmp_path / "sweep.json").case_tracing == tr
    assert len(sw.points["rewrite_score"]) == 4 and sw.regression["em"]["n"] == 4
    iv = sw.intervals  # case-bootstrap intervals, the profile redrawn with the cases
    assert iv["n_boot"] == 1000 and iv["profile_redrawn"] and iv["valid"] == 1000
    assert set(iv["correlations"]) == {"es", "ps", "ns", "score"} and set(iv["regression"]) == set(sw.regression)
    for k, v in sw.metrics.items():
        if k in iv["metrics"]:
            assert all(lo - 1e-12 <= x <= hi + 1e-12 for x, (lo, hi) in zip(v, iv["metrics"][k]))
    assert "95% CI of added" in sw.table() and "case-bootstrap draws" in sw.table()
    assert json.dumps(LayerSweep.load(tmp_path / "sweep.json").intervals) == json.dumps(iv)
    import matplotlib

    matplotlib.use("Agg")
    import viz

    assert viz.plot_tracing_vs_editing(sw).axes
    with pytest.raises(ValueError, match="aie='cases'"):
        viz.plot_tracing_vs_editing(layer_sweep(cases, method="bump", model=tiny_lm, aie=[0.1, 0.3], progress=False))

    # a rerun reuses the stored tracing and records: nothing is traced or edited again
    def no_trace(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(sweep_mod, "trace", no_trace)
    CALLS.clear()
    again = layer_sweep(cases, method="bump", model=tiny_lm, out=tmp_path, trace_window=1, progress=False)
    assert again.case_tracing == tr and CALLS == []
    monkeypatch.undo()

    # a corrupted tracing file is reported and traced again
    (tmp_path / "case_tracing.json").write_text("{not json")
    with pytest.warns(UserWarning, match="case tracing file"):
        redone = layer_sweep(cases, method="bump", model=tiny_lm, out=tmp_path, trace_window=1, progress=False)
    assert np.allclose(redone.case_tracing["ie"], tr["ie"], rtol=1e-5, atol=1e-12)


def test_the_case_analysis_keeps_only_known_cases():
    from edit.eval.sweep import CaseTracing, analysed_cases, case_points

    tr = CaseTracing(["a", "b", "c"], [[0.0, 1.0], [0.5, 0.2], [0.1, 0.9]], [" x"] * 3, [0.5] * 3, [0.1] * 3,
                     [False, True, True], [0.0] * 3, 3, 10, 0)
    assert analysed_cases(tr)[0] == [1, 2]
    records = [[{"case_id": c, "em": 0.3, "p_new": 0.5} for c in "abc"]]
    pts = case_points([1], records, tr)
    assert pts["em"] == [[1, 0.2, 0.3], [1, 0.9, 0.3]] and pts["rewrite_score"][0][2] == pytest.approx(0.5)
    tr.known = [False] * 3
    with pytest.warns(UserWarning, match="knows none"):
        assert analysed_cases(tr)[0] == [0, 1, 2]


def test_known_cases_is_the_correctness_filter(lm, shared_data):
    """The reference's test: the decoded top-1 token is the whole true target. Case 715 (" Nokia", two
    tokens, top-1 " Nok") passes the first-token test and fails this one."""
    from edit.eval.sweep import known_cases

    cases = edit.load_counterfact(shared_data / "counterfact/counterfact_dev_800.json", 60)
    known = known_cases(cases, lm)
    assert 0 < len(known) < len(cases)
    ids = {c.case_id for c in known}
    for c in cases:
        r = c.request
        top1 = int(lm.last_logits([r.rendered])[0].argmax())
        assert (lm.tokenizer.decode([top1]).strip() == r.target_true.strip()) == (c.case_id in ids)
    loose = {c.case_id for c in known_cases(cases, lm, known_match="first_token")}
    assert 715 in loose - ids
    assert [c.case_id for c in known_cases(cases, lm, n=1)] == [known[0].case_id]


def test_layer_sweep_rejects_an_unknown_aie_before_editing(tiny_lm):
    from edit.eval.sweep import layer_sweep

    ws = _weights(tiny_lm)
    CALLS.clear()
    with pytest.raises(ValueError, match="aie must be"):
        layer_sweep(_cases()[:1], method="bump", model=tiny_lm, aie="everywhere", progress=False)
    with pytest.raises(ValueError, match="bootstrap must be"):
        layer_sweep(_cases()[:1], method="bump", model=tiny_lm, aie=[0.1, 0.3], level=1.5, progress=False)
    assert CALLS == [] and _same(tiny_lm, ws)


def _synthetic_sweep(n_cases: int = 24, seed: int = 0):
    """Records at layers 0-2 where ES equals the profile for every case, PS is noisy, and the rewrite
    score is y = 0.2 l + 0.1 TE exactly (so regression (3) fits it perfectly), with a tracing of them."""
    import numpy as np
    from edit.eval.sweep import CaseTracing

    rng = np.random.default_rng(seed)
    layers, profile = [0, 1, 2], [0.1, 0.5, 0.9]
    ie = rng.random((n_cases, 3))
    ids = [f"c{i}" for i in range(n_cases)]
    records = [[{"case_id": cid, "es": profile[l], "ps": float(rng.random() < 0.3 + 0.3 * l), "ns": 0.5 + 0.1 * l,
                 "em": 0.2 * l, "pm": 0.1, "nm": 0.0, "p_new": 0.2 * l + 0.1 * ie[c, l]} for c, cid in enumerate(ids)]
               for l in layers]
    tracing = CaseTracing(ids, ie.tolist(), [" x"] * n_cases, [0.5] * n_cases, [0.1] * n_cases, [True] * n_cases,
                          [0.0] * n_cases, 3, 10, 0)
    return layers, records, ids, profile, tracing


def test_case_bootstrap_intervals_on_known_structure():
    """Case-bootstrap intervals where the answer is known: exact relations give point intervals."""
    from edit.eval.sweep import case_bootstrap, case_points, case_regression

    layers, records, ids, profile, tracing = _synthetic_sweep()
    iv = case_bootstrap(layers, records, ids, profile=profile, tracing=tracing, analysed=list(range(len(ids))),
                        n_boot=300, seed=1)
    # ES is the profile for every case: every draw's per-layer means equal it, so r = rho = 1 exactly
    assert iv["metrics"]["es"] == [[pytest.approx(p), pytest.approx(p)] for p in profile]
    assert iv["correlations"]["es"]["pearson"] == [pytest.approx(1.0), pytest.approx(1.0)]
    # PS varies between cases: a real interval around each per-layer mean
    for j, (lo, hi) in enumerate(iv["metrics"]["ps"]):
        mean = sum(r["ps"] for r in records[j]) / len(records[j])
        assert lo <= mean <= hi and hi - lo > 0.05
    # the rewrite score is alpha_l + 0.1 TE: regression (3) is exact in every draw and TE adds a positive R²
    point = case_regression(case_points(layers, records, tracing))["rewrite_score"]
    reg = iv["regression"]["rewrite_score"]
    assert reg["r2_both"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert 0 < reg["delta_r2"][0] <= point["delta_r2"] <= reg["delta_r2"][1]
    # EM depends on the layer alone: the tracing effect adds exactly nothing in any draw
    assert iv["regression"]["em"]["delta_r2"] == [pytest.approx(0.0, abs=1e-9)] * 2
    # reproducible for a seed, different for another; a wider level gives a wider interval
    again = case_bootstrap(layers, records, ids, profile=profile, tracing=tracing, analysed=list(range(len(ids))),
                           n_boot=300, seed=1)
    assert json.dumps(again) == json.dumps(iv)  # NaN-safe equality (NM is constant: its R² are NaN)
    other = case_bootstrap(layers, records, ids, profile=profile, n_boot=300, seed=2, level=0.5)
    assert other["regression"] == {} and other["metrics"]["ps"] != iv["metrics"]["ps"]
    assert all(o[1] - o[0] <= w[1] - w[0] for o, w in zip(other["metrics"]["ps"], iv["metrics"]["ps"]))
    with pytest.raises(ValueError, match="level"):
        case_bootstrap(layers, records, ids, profile=profile, level=0.0)
    # the sweep plot draws each metric's interval as a band
    import matplotlib

    matplotlib.use("Agg")
    import viz
    from edit.eval.sweep import LayerSweep

    sw = LayerSweep("rome", layers, {k: [sum(r[k] for r in rs) / len(rs) for rs in records] for k in ("es", "ps", "ns")},
                    profile, "given", {}, len(ids), "synthetic", intervals=iv)
    ax = viz.plot_layer_sweep(sw).axes[0]
    assert len(ax.collections) == 3 and "bootstrap CI" in ax.get_ylabel()


def test_plots_draw(tiny_lm):
    import matplotlib

    matplotlib.use("Agg")
    import viz
    from edit.eval.sweep import LayerSweep

    single = edit.evaluate("bump", _cases()[:2], model=tiny_lm, fluency=False, progress=False)
    seq = edit.evaluate("bump", _cases(), model=tiny_lm, mode="sequential", checkpoints=[1, 2, 3], fluency=False,
                        progress=False)
    batches = [edit.evaluate("bump", _cases(), model=tiny_lm, mode="batch", batch_size=b, fluency=False, progress=False)
               for b in (1, 3)]
    sw = LayerSweep("bump", [0, 1], {"es": [0.5, 1.0], "ps": [0.0, 0.5], "ns": [1.0, 1.0]}, [0.1, 0.3], "given",
                    {"es": {"pearson": 1.0, "spearman": 1.0}}, 2, "tiny")
    for fig in (viz.plot_methods([single]), viz.plot_sequential(seq), viz.plot_batch_sizes(batches), viz.plot_layer_sweep(sw)):
        assert fig.axes
    curves = {"a": [{"n_edits": 0, "perplexity": 20.0}, {"n_edits": 10, "es": 0.9, "ps": 0.8, "ns": 0.7, "perplexity": 21.0}],
              "b": [{"n_edits": 0, "perplexity": 20.0}, {"n_edits": 10, "es": 0.5, "ps": 0.4, "ns": 0.6, "perplexity": 30.0}]}
    fig = viz.plot_sequential_curves(curves)
    left, right = fig.axes
    assert len(left.lines) == 6 and [list(l.get_ydata()) for l in right.lines] == [[20.0, 21.0], [20.0, 30.0]]


def test_eval_cli_on_the_default_model(shared_data, tmp_path, capsys):
    from locate_edit.cli import main

    rc = main(["eval", "counterfact", "--method", "none", "--n", "1", "--no-fluency", "--data-dir", str(shared_data),
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ES" in out and "Consistency: not available" in out
    assert (tmp_path / "methods.png").is_file() and (tmp_path / "none_single" / "results.json").is_file()


def test_eval_cli_layer_sweep_on_the_default_model(shared_data, tmp_path, capsys):
    """--sweep traces the swept case itself, edits at each given layer, and saves both figures."""
    from edit.eval.sweep import LayerSweep
    from locate_edit.cli import main

    rc = main(["eval", "counterfact", "--method", "ft-l", "--sweep", "--layers", "2,8", "--n", "1", "--no-fluency",
               "--data-dir", str(shared_data), "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "corr(AIE, ES)" in out and "added by tracing" in out
    sw = LayerSweep.load(tmp_path / "sweep_ft-l" / "sweep.json")
    assert sw.layers == [2, 8] and len(sw.case_tracing["ie"][0]) == 30
    assert (tmp_path / "sweep_ft-l.png").is_file() and (tmp_path / "sweep_ft-l_cases.png").is_file()


def test_kn_edit_through_the_harness(tiny_lm):
    ws = _weights(tiny_lm)
    res = edit.evaluate("kn", _cases()[:1], model=tiny_lm, hparams={"steps": 4, "min_prompts": 1, "adaptive": False},
                        fluency=False, progress=False)  # the case has 2 prompts: the single-prompt rule
    assert _same(tiny_lm, ws) and len(res.records) == 1 and "es" in res.records[0]


def test_sequential_mode_measures_perplexity_at_each_checkpoint(tiny_lm):
    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "Paris is the capital of France. " * 8]
    res = edit.evaluate("bump", _cases(), model=tiny_lm, mode="sequential", checkpoints=[1, 3], fluency=False,
                        progress=False, perplexity_corpus=texts, perplexity_tokens=120, hparams={"scale": 0.5})
    assert sorted(res.curve) == [0, 1, 3] and res.curve[0]["n_cases"] == 0
    base = res.curve[0]["perplexity"]
    # the unedited perplexity is exp(mean next-token NLL) over the stream, computed directly here
    from edit.eval.metrics import perplexity
    from edit.stats import token_stream

    tokens = token_stream(tiny_lm, texts, 120)[0]
    logits = tiny_lm.forward(tiny_lm.pad([tokens.tolist()]))[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:].to(logits.device))
    assert base == pytest.approx(float(torch.exp(nll)), rel=1e-4) == perplexity(tiny_lm, tokens)
    assert res.curve[3]["perplexity"] != base  # the large test edits change the model's text predictions


def test_methods_command_lists_the_registry(capsys):
    from locate_edit.cli import main

    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    for name in edit.methods():
        assert name in out
    assert "v_steps = 20" in out  # ROME's default, from its hyperparameter dataclass
