"""MEMIT-CSK (Gupta et al. 2023) and DEPN (Wu et al. 2023), and the tracing of a non-subject span they need."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edit
import locate.causal_trace as ct
from locate.causal_trace import CausalTrace, TraceError, draw_noise, noise_level, restored_probability, trace
from locate.testing import tiny_model

SVO = "A horse rides a bicycle:"  # subject "horse", verb "rides", object "bicycle"


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return tiny_model("llama", tokenizer)


# ---------------------------------------------------------------------------------------- trace(corrupt=...)
def test_trace_corrupt_noises_exactly_the_verb_tokens(tiny_llama, monkeypatch):
    lm = tiny_llama
    verb = lm.subject_span(SVO, "rides")
    subj = lm.subject_span(SVO, "horse")
    assert verb != subj
    seen = []
    real = ct.fast_scores
    monkeypatch.setattr(ct, "fast_scores", lambda lm_, ids, span, eps, *a, **k: (seen.append((span, eps.shape)),
                                                                                   real(lm_, ids, span, eps, *a, **k))[1])
    tr = trace(SVO, "horse", model=lm, corrupt="rides", kinds=("mlp",), samples=3, noise=0.5)
    # the noise went to the verb's tokens, one draw per verb token
    assert seen == [(tuple(verb), (3, verb[1] - verb[0], lm.d_model))]
    assert tr.corrupted_range == tuple(verb) and tr.subject_range == tuple(subj)
    assert tr.token_index("last_corrupted") == verb[1] - 1 and tr.token_index("last_subject") == subj[1] - 1
    # p_corrupted is the reference run with the verb noised, not the subject (different numbers)
    eps = draw_noise(3, verb[1] - verb[0], lm.d_model, 0.5, seed=0)
    ids = lm.encode(SVO)
    assert tr.p_corrupted == pytest.approx(restored_probability(lm, ids, tuple(verb), eps, tr.answer_id), abs=1e-7)
    subject_noised = trace(SVO, "horse", model=lm, kinds=("mlp",), samples=3, noise=0.5)
    assert subject_noised.p_corrupted != pytest.approx(tr.p_corrupted, rel=1e-3)  # tiny models: small p
    # rows before the verb are untouched by the noise: restoring them has no effect
    assert np.all(tr.scores["mlp"][: verb[0]] == tr.p_corrupted)
    # the reference loop gives the same numbers
    loop = trace(SVO, "horse", model=lm, corrupt="rides", kinds=("mlp",), samples=3, noise=0.5, method="loop")
    assert np.abs(loop.scores["mlp"] - tr.scores["mlp"]).max() < 1e-5


def test_trace_without_corrupt_is_unchanged(tiny_llama, tmp_path):
    lm = tiny_llama
    a = trace(SVO, "horse", model=lm, kinds=("mlp",), samples=2, noise=0.5)
    b = trace(SVO, "horse", model=lm, kinds=("mlp",), samples=2, noise=0.5, corrupt="horse")
    np.testing.assert_array_equal(a.scores["mlp"], b.scores["mlp"])
    assert a.p_corrupted == b.p_corrupted and a.corrupted_range is None
    assert "corrupted_range" not in a.to_dict()  # subject traces save as before
    c = CausalTrace.load(b.save(tmp_path / "b.json"))
    assert c.corrupted_range == b.corrupted_range and c.token_index("last_corrupted") == b.token_index("last_corrupted")
    with pytest.raises(TraceError, match="first_corrupted"):
        a.token_index("first_corrupted")  # no corrupted span: the names do not exist
    only = trace(SVO, "horse", model=lm, corrupt="bicycle", kinds=("mlp",), samples=2, noise=0.5,
                 tokens=["last_corrupted"])
    assert np.isfinite(only.scores["mlp"][only.token_index("last_corrupted")]).all()
    with pytest.raises(TraceError):
        trace(SVO, "horse", model=lm, corrupt=3, samples=2, noise=0.5)
