"""MEMIT: the per-layer update solves its least-squares objective; inputs are checked before the
model is touched; a batch of distinct requests gets its targets; failures leave the model intact."""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Request
from edit.methods.memit import ConflictingRequestsError, MEMITHparams, check_conflicts as check_requests, layer_update


def _direct(K, R, C, lam):
    """argmin_Δ λ tr(Δ C Δᵀ) + ‖Δ Kᵀ − Rᵀ‖² as an ordinary least-squares problem:
    Δ [Kᵀ, √λ C^{1/2}] ≈ [Rᵀ, 0]  (C^{1/2} from an eigendecomposition)."""
    evals, evecs = torch.linalg.eigh(C)
    C_half = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    A = torch.cat([K.T, lam ** 0.5 * C_half], dim=1)  # (d_mlp, B + d_mlp)
    Y = torch.cat([R.T, torch.zeros(R.shape[1], C.shape[0], dtype=R.dtype)], dim=1)  # (d_model, B + d_mlp)
    # Δ A = Y  <=>  Aᵀ Δᵀ = Yᵀ
    return torch.linalg.lstsq(A.T, Y.T).solution.T


def _problem(B, d_mlp, d_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d_mlp, d_mlp, generator=g, dtype=torch.float64)
    C = X.T @ X / X.shape[0]  # a mean second moment, as edit.stats returns
    K = torch.randn(B, d_mlp, generator=g, dtype=torch.float64)
    R = torch.randn(B, d_model, generator=g, dtype=torch.float64)
    return K, R, C


@pytest.mark.parametrize("B,lam", [(1, 0.5), (1, 20.0), (3, 2.0), (7, 0.1), (20, 0.0)])
def test_layer_update_matches_direct_least_squares(B, lam):
    K, R, C = _problem(B, d_mlp=12, d_model=5, seed=B)
    left, right = layer_update(K, R, C, lam)
    delta = left @ right
    assert torch.allclose(delta, _direct(K, R, C, lam), atol=1e-9, rtol=1e-7)
    # first-order optimality: Δ (λC + KᵀK) = Rᵀ K
    assert torch.allclose(delta @ (lam * C + K.T @ K), R.T @ K, atol=1e-9)


def test_layer_update_small_lambda_writes_the_residuals_exactly():
    K, R, C = _problem(4, d_mlp=16, d_model=6)
    left, right = layer_update(K, R, C, 1e-9)
    assert torch.allclose((left @ right) @ K.T, R.T, atol=1e-6)


def test_lambda_default_scales_paper_value_with_key_width():
    hp = MEMITHparams()
    assert hp.lam(16_384) == pytest.approx(15_000)
    assert hp.lam(1536) == pytest.approx(15_000 * 1536 / 16_384)
    assert MEMITHparams(mom2_update_weight=7.0).lam(1536) == 7.0
    with pytest.raises(edit.InvalidHparamsError, match="no hyperparameter"):
        edit.get_method("memit").make_hparams({"mom2_weight": 1})


def test_conflicting_requests_are_refused_with_their_names(lm):
    a = Request("{} is located in the city of", "The Eiffel Tower", " Rome")
    b = Request("{} is located in the city of", "The Eiffel Tower", " Berlin")
    c = Request("{} plays the sport of", "LeBron James", " football")
    with pytest.raises(ConflictingRequestsError, match="Eiffel Tower.*Rome.*Berlin"):
        check_requests([a, c, b], lm)
    assert check_requests([a, c, a], lm) == [a, c]  # exact repeats are dropped, not refused


# --------------------------------------------------------------------------- on the default model
LAYERS = [4, 5, 6]
REQUESTS = [Request("{} is located in the city of", "The Eiffel Tower", " Rome"),
            Request("The mother tongue of {} is", "Danielle Darrieux", " English")]


@pytest.fixture(scope="module")
def stats(lm, shared_data):
    from edit.stats import key_second_moments

    return key_second_moments(lm, LAYERS, corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw",
                              n_tokens=6000, progress=False)


@pytest.fixture(scope="module")
def batch_edit(lm, stats):
    from edit.methods.memit import memit

    before = {l: lm.mlp_out_weight(l).clone() for l in LAYERS}
    e = memit(REQUESTS, model=lm, layers=LAYERS, stats=stats, v_steps=12, progress=False)
    for l in LAYERS:  # computing the edit leaves the model bit-identical
        assert torch.equal(lm.mlp_out_weight(l), before[l])
    return e


def test_batch_gets_every_target_as_argmax_and_reverts_exactly(lm, batch_edit):
    from edit import applied

    e = batch_edit
    assert e.method == "memit" and e.layers == LAYERS
    assert all(d.rank == len(REQUESTS) for d in e.deltas)  # stored as exact rank-B factors
    before = lm.mlp_out_weight(LAYERS[0]).clone()
    with applied(lm, e):
        for r in REQUESTS:
            top = lm.predict(r.rendered, 1)[0]
            assert top.id == lm.target_ids(r.target_new, r.rendered)[0], (r, top)
    assert torch.equal(lm.mlp_out_weight(LAYERS[0]), before)


def test_edit_round_trips_through_save(lm, batch_edit, tmp_path):
    from edit import Edit

    loaded = Edit.load(batch_edit.save(tmp_path / "m.safetensors"), lm)
    for a, b in zip(loaded.deltas, batch_edit.deltas):
        assert torch.equal(a.matrix(), b.matrix())
    assert loaded.hparams["lambda_"] == pytest.approx(15_000 * lm.d_mlp / 16_384)


def test_failure_midway_leaves_the_model_bit_identical(lm, stats):
    from edit.methods.memit import memit

    before = {l: lm.mlp_out_weight(l).clone() for l in LAYERS}
    seen = []

    def boom(rec):  # called after each layer's weight was written
        seen.append(rec["layer"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        memit(REQUESTS[:1], model=lm, layers=LAYERS, stats=stats, v_steps=2, progress=False, callback=boom)
    assert seen == LAYERS[:2]
    for l in LAYERS:
        assert torch.equal(lm.mlp_out_weight(l), before[l])


def test_bad_inputs_fail_before_any_work(lm, stats):
    from locate.errors import LayerOutOfRangeError
    from edit.methods.memit import memit

    with pytest.raises(LayerOutOfRangeError):
        memit(REQUESTS, model=lm, layers=[5, 99], stats=stats)
    with pytest.raises(ConflictingRequestsError):
        memit(REQUESTS + [Request(REQUESTS[0].prompt, REQUESTS[0].subject, " Berlin")], model=lm, layers=LAYERS,
              stats=stats)
    with pytest.raises(edit.InvalidHparamsError, match="no hyperparameter"):
        memit(REQUESTS, model=lm, layers=LAYERS, stats=stats, lamda=3)


def test_request_files_and_cli_refusals(tmp_path, capsys):
    import json

    from edit.eval.datasets import DatasetNotFoundError, load_requests
    from locate_edit.cli import main

    f = tmp_path / "reqs.json"
    f.write_text(json.dumps([{"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"},
                             {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is",
                              "subject": "Danielle Darrieux", "target_new": {"str": "English"},
                              "target_true": {"str": "French"}}}]))
    assert load_requests(f) == [Request("{} is located in the city of", "The Eiffel Tower", " Rome"),
                                Request("The mother tongue of {} is", "Danielle Darrieux", " English", " French")]
    with pytest.raises(DatasetNotFoundError, match="nope.json"):
        load_requests(tmp_path / "nope.json")
    assert main(["edit", "--method", "nope", "--requests", str(f)]) == 2  # refused before the model loads
    assert "unknown editing method 'nope'" in capsys.readouterr().err
    assert main(["edit", "--method", "memit", "--requests", str(tmp_path / "missing.json")]) == 2
    assert "requests file not found" in capsys.readouterr().err


def test_layers_from_a_trace_and_a_profile(tokenizer):
    """layers= accepts a CausalTrace (its MLP row at the last subject token) and a LayerProfile."""
    import numpy as np

    from locate import resolve_layers
    from locate.calibration import LayerProfile
    from locate.causal_trace import trace
    from locate.testing import tiny_model

    m = tiny_model("llama", tokenizer, n_layers=6)
    tr = trace("The Eiffel Tower is located in", "Eiffel Tower", model=m, kinds=("mlp",), samples=2, window=2)
    row = tr.ie("mlp")[tr.token_index("last_subject")]
    best = max(range(5), key=lambda i: row[i] + row[i + 1])
    layers, reason = resolve_layers(m, tr, 2)
    assert layers == [best, best + 1] and "trace" in reason
    prof = LayerProfile(aie=np.array([0, 0, 0.1, 0.9, 0.8, 0]), n_facts=3, source="test")
    assert resolve_layers(m, prof, 2)[0] == [3, 4]
    with pytest.raises(edit.LayerSpecError):
        resolve_layers(m, object())
