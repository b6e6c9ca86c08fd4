"""Causal tracing: the fast path equals the reference loop; the paper's sanity properties hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

import locate
from locate.causal_trace import (CausalTrace, TraceError, draw_noise, restored_probability, trace,
                                 trace_many, window_layers)

PROMPT = "The Eiffel Tower is located in"
SUBJECT = "Eiffel Tower"


def test_fast_equals_loop_on_every_tiny_architecture(tiny):
    a = trace(PROMPT, SUBJECT, model=tiny, samples=3, window=2)
    b = trace(PROMPT, SUBJECT, model=tiny, samples=3, window=2, method="loop")
    assert a.p_corrupted == pytest.approx(b.p_corrupted, abs=1e-9)
    for k in a.kinds:
        diff = np.abs(a.scores[k] - b.scores[k]).max()
        assert diff <= 1e-5
        # the tiny models' probabilities are small, so also compare relative to the effect size
        assert diff <= 1e-3 * max(np.abs(b.ie(k)).max(), 1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_fast_path_layer_skip_matches_loop_on_deeper_models(arch, tokenizer):
    """Small batches force many batches whose lowest restored layer is > 0, so blocks are skipped."""
    from locate.testing import tiny_model

    m = tiny_model(arch, tokenizer, n_layers=4)
    kinds = ("hidden", "mlp")
    a = trace(PROMPT, SUBJECT, model=m, kinds=kinds, samples=2, window=3, batch_size=4)
    b = trace(PROMPT, SUBJECT, model=m, kinds=kinds, samples=2, window=3, method="loop")
    for k in a.kinds:
        assert np.abs(a.scores[k] - b.scores[k]).max() <= 1e-5
        assert np.abs(a.scores[k] - b.scores[k]).max() <= 1e-3 * max(np.abs(b.ie(k)).max(), 1e-12)


def test_window_is_clipped_at_both_ends():
    assert window_layers(0, 10, 30) == list(range(0, 5))
    assert window_layers(29, 10, 30) == list(range(24, 30))
    assert window_layers(10, 9, 30) == list(range(6, 15))
    assert window_layers(1, 1, 3) == [1]


def test_same_seed_same_result_and_json_roundtrip(tiny, tmp_path):
    a = trace(PROMPT, SUBJECT, model=tiny, kinds=("mlp",), samples=2, seed=3)
    b = trace(PROMPT, SUBJECT, model=tiny, kinds=("mlp",), samples=2, seed=3)
    np.testing.assert_array_equal(a.scores["mlp"], b.scores["mlp"])
    c = CausalTrace.load(a.save(tmp_path / "t.json"))
    np.testing.assert_array_equal(c.scores["mlp"], a.scores["mlp"])
    assert c.subject_range == a.subject_range and c.answer == a.answer


def test_errors(tiny):
    with pytest.raises(locate.SubjectNotFoundError):
        trace(PROMPT, "Colosseum", model=tiny)
    with pytest.raises(locate.TokenNotInVocabularyError):
        trace(PROMPT, SUBJECT, model=tiny, target=10**9)
    with pytest.raises(locate.TokenNotInVocabularyError):
        trace(PROMPT, SUBJECT, model=tiny, target=" Paris Saint-Germain football")
    with pytest.raises(TraceError):
        trace(PROMPT, SUBJECT, model=tiny, kinds=("nope",))


def test_uniform_noise_is_bounded():
    eps = draw_noise(4, 3, 8, 0.5, seed=0, uniform=True)
    assert eps.abs().max() <= 0.5 and eps.shape == (4, 3, 8)


def test_default_model_known_fact_sanity(lm):
    """p_corrupted < p_clean; restoring the last token's last hidden state, or all subject embeddings,
    gives p_clean back."""
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    ids = lm.encode(prompt)
    s0, s1 = lm.subject_span(prompt, subject)
    answer = lm.target_ids(" Paris", prompt)[0]
    eps = draw_noise(3, s1 - s0, lm.d_model, 3 * 0.1356, seed=0)
    p_clean = float(lm.last_logits([prompt])[0].softmax(-1)[answer])
    p_corr = restored_probability(lm, ids, (s0, s1), eps, answer)
    assert p_corr < p_clean
    last = restored_probability(lm, ids, (s0, s1), eps, answer, [(lm.hook_resid(lm.n_layers - 1), len(ids) - 1)])
    assert last == pytest.approx(p_clean, abs=1e-5)
    emb = restored_probability(lm, ids, (s0, s1), eps, answer, [(lm.hook_embed, t) for t in range(s0, s1)])
    assert emb == pytest.approx(p_clean, abs=1e-5)


def test_trace_many_resumes_and_layer_profile_caches(tmp_path, monkeypatch):
    from locate.testing import tiny_model

    lm = tiny_model("llama", locate.default_model().tokenizer, n_layers=3)
    top = lm.tokenizer.decode([int(lm.last_logits([PROMPT])[0].argmax())]).strip()
    facts = [{"prompt": PROMPT, "subject": SUBJECT, "attribute": top},
             {"prompt": PROMPT, "subject": SUBJECT, "attribute": "zzzz"}]
    res_path = tmp_path / "r.jsonl"
    r1 = trace_many(facts, model=lm, kinds=("mlp",), samples=2, results=res_path, progress=False)
    assert r1.n_facts + r1.n_skipped == 2 and len(res_path.read_text().splitlines()) == 2
    r2 = trace_many(facts, model=lm, kinds=("mlp",), samples=2, results=res_path, progress=False)
    assert r2.aie == r1.aie and len(res_path.read_text().splitlines()) == 2
    from viz import aie_plot

    for style in ("heatmap", "lines"):
        aie_plot(r2, style=style, save=tmp_path / f"aie_{style}.svg")
        assert (tmp_path / f"aie_{style}.svg").stat().st_size > 0

    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    p1 = locate.layer_profile(lm, facts=facts, samples=2)
    assert p1.aie.shape == (3,) and "(cached)" not in p1.source
    assert p1.best_layer() == int(np.argmax(p1.aie)) and len(p1.window(2)) == 2
    assert "peaks at layer" in p1.reason(p1.best_layer())
    p2 = locate.layer_profile(lm, facts=facts, samples=2)
    assert "(cached)" in p2.source and np.allclose(p2.aie, p1.aie)
    f = next((tmp_path / "calibration").glob("*.json"))
    d = json.loads(f.read_text())
    d["profile"]["aie"][0] += 1.0
    f.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="corrupted"):
        p3 = locate.layer_profile(lm, facts=facts, samples=2)
    assert np.allclose(p3.aie, p1.aie)


def test_heatmaps_save(tiny, tmp_path):
    from viz import trace_heatmaps

    tr = trace(PROMPT, SUBJECT, model=tiny, samples=2)
    fig = trace_heatmaps(tr, save=tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0 and len(fig.axes) >= 3
