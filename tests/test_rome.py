"""ROME on the default model: W' k* = v*, bit-exact revert, only one layer changes, the fact flips,
unrelated facts stay, failures leave the model untouched; the update's algebra on every tiny arch."""

from __future__ import annotations

import sys

import pytest
import torch

import edit
from edit import Edit, Request, rome
from edit.methods.rome import rank_one_update
from edit.stats import key_second_moments
from locate.errors import FingerprintMismatchError, SingularStatisticsError

LAYER = 5  # an early-middle MLP layer (SmolLM2 has 30); layer="auto" is exercised by the notebook
EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
FAST = dict(template_lengths=((10, 5),))  # 1 + 5 templates (MEMIT's set) to keep CI quick


@pytest.fixture(scope="module")
def wiki_stats(lm, shared_data):
    path = shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    return key_second_moments(lm, [LAYER], corpus=path, n_tokens=20_000, progress=False)  # cached on disk


@pytest.fixture(scope="module")
def eiffel(lm, wiki_stats):
    return rome(EIFFEL, model=lm, layer=LAYER, stats=wiki_stats, progress=False, **FAST)


def _weights(lm):
    return [lm.mlp_out_weight(l).clone() for l in range(lm.n_layers)]


def test_edit_object_records_what_the_issue_asks(eiffel):
    assert eiffel.method == "rome" and eiffel.layers == [LAYER] and eiffel.deltas[0].rank == 1
    assert "chosen by the caller" in eiffel.layer_reason
    assert eiffel.hparams["key"] == "original" and eiffel.hparams["stats_tokens"] == 20_000
    assert {"stats_s", "key_s", "v_star_s", "total_s"} <= set(eiffel.timings)
    assert len(eiffel.loss_trace) == eiffel.metrics["v_star_steps"] >= 1
    assert eiffel.loss_trace[-1] < eiffel.loss_trace[0]


def test_new_key_maps_to_v_star_and_fact_flips_and_unrelated_stays(lm, eiffel):
    before = _weights(lm)
    unrelated = "The capital of Japan is"
    top_unrelated = lm.predict(unrelated, 1)[0].token
    assert lm.predict(EIFFEL.rendered, 1)[0].token == " Paris"
    with edit.applied(lm, eiffel):
        W = lm.mlp_out_weight(LAYER).double()
        v = W @ eiffel.k_lambda.double()
        if lm.mlp_out_bias(LAYER) is not None:
            v = v + lm.mlp_out_bias(LAYER).double()
        assert ((v - eiffel.v_star.double()).norm() / eiffel.v_star.double().norm()) < 1e-4  # W' k = v* (k of Λ)
        after = _weights(lm)
        changed = [l for l in range(lm.n_layers) if not torch.equal(after[l], before[l])]
        assert changed == [LAYER]
        assert lm.predict(EIFFEL.rendered, 1)[0].token == " Rome"
        assert lm.predict(unrelated, 1)[0].token == top_unrelated
    assert all(torch.equal(a, b) for a, b in zip(_weights(lm), before))  # revert is bit-exact


def test_save_load_roundtrip_and_fingerprint_refusal(lm, eiffel, tmp_path, tokenizer):
    from locate.testing import tiny_model

    path = eiffel.save(tmp_path / "eiffel.safetensors")
    loaded = Edit.load(path, model=lm)
    assert loaded.layers == [LAYER] and loaded.deltas[0].rank == 1
    assert torch.equal(loaded.deltas[0].matrix(), eiffel.deltas[0].matrix())
    assert loaded.loss_trace == eiffel.loss_trace and loaded.layer_reason == eiffel.layer_reason
    with pytest.raises(FingerprintMismatchError):
        Edit.load(path, model=tiny_model("llama", tokenizer))


def test_failures_leave_the_model_bit_identical(lm, wiki_stats, monkeypatch):
    before = _weights(lm)
    bad = edit.KeyStats(LAYER, torch.zeros(lm.d_mlp, lm.d_mlp, dtype=torch.float64), 1, "zeros", "0")
    with pytest.raises(SingularStatisticsError):
        rome(EIFFEL, model=lm, layer=LAYER, stats=bad, progress=False, **FAST, v_steps=1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["edit.methods.rome"], "optimize_targets", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rome(EIFFEL, model=lm, layer=LAYER, stats=wiki_stats, progress=False, **FAST)
    with pytest.raises(edit.InvalidRequestError):
        rome(Request("no placeholder", "The Eiffel Tower", " Rome"), model=lm, layer=LAYER, stats=wiki_stats)
    assert all(torch.equal(a, b) for a, b in zip(_weights(lm), before))


def test_rank_one_update_algebra_and_original_key_variant():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 10, generator=g), torch.randn(6, generator=g)
    k, k0, v = torch.rand(10, generator=g), torch.rand(10, generator=g), torch.randn(6, generator=g)
    A = torch.randn(40, 10, generator=g, dtype=torch.float64)
    st = edit.KeyStats(0, A.T @ A / 40, 40, "t", "t")
    u = st.solve(k)
    for key in (k, k0):  # averaged (consistent) and original (reference code): W' maps *that* key to v*
        Lam, den = rank_one_update(W, b, key, u, v)
        W2 = W.double() + Lam[:, None] * u[None, :]
        assert torch.allclose(W2 @ key.double() + b.double(), v.double(), atol=1e-9)


def test_rome_runs_on_every_tiny_architecture(tiny):
    g = torch.Generator().manual_seed(0)  # varied text: random tokens, so that C is full rank
    texts = [tiny.tokenizer.decode(torch.randint(1000, 30000, (40,), generator=g).tolist()) for _ in range(80)]
    stats = key_second_moments(tiny, [0], corpus=texts, n_tokens=tiny.d_mlp * 4, seq_len=64, progress=False,
                               cache=False)
    subject = "The cat"
    e = rome(Request("{} sat on the", subject, " mat"), model=tiny, layer=0, stats=stats, progress=False,
             template_lengths=((4, 5),), v_steps=3).apply(tiny)
    try:
        W = tiny.mlp_out_weight(0).double()
        b = tiny.mlp_out_bias(0)
        v = W @ e.k_lambda.double() + (0 if b is None else b.double())
        assert ((v - e.v_star.double()).norm() / e.v_star.double().norm()) < 1e-4
    finally:
        e.revert()
