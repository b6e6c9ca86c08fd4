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
    # records made under other settings (here the known-fact test) are not reused: both facts again
    trace_many(facts, model=lm, kinds=("mlp",), samples=2, results=res_path, known_match="first_token",
               progress=False)
    assert len(res_path.read_text().splitlines()) == 4
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


# ---------------------------------------------------------------------- fidelity to the reference code
def _tiny_llama():
    from locate.testing import tiny_model

    return tiny_model("llama", locate.default_model().tokenizer, n_layers=3)


def _two_facts(lm):
    """Fact A: the top-1 token spells the whole attribute. Fact B: the top-1 token is only the first
    token of a two-word attribute, so the reference's test rejects it and the first-token test keeps it."""
    a_prompt, b_prompt = PROMPT, "The Colosseum is located in the city of"
    top_a = lm.tokenizer.decode([int(lm.last_logits([a_prompt])[0].argmax())])
    top_b = int(lm.last_logits([b_prompt])[0].argmax())
    b_attr = lm.tokenizer.decode([top_b]).strip() + " Zq"
    assert lm.target_ids(" " + b_attr, b_prompt)[0] == top_b and len(lm.target_ids(" " + b_attr, b_prompt)) > 1
    return [{"prompt": a_prompt, "subject": SUBJECT, "attribute": top_a.strip()},
            {"prompt": b_prompt, "subject": "Colosseum", "attribute": b_attr}]


def _known_1000(tmp_path, subjects):
    d = tmp_path / "data" / "known_1000"
    d.mkdir(parents=True)
    facts = [{"known_id": i, "prompt": f"{s} is in", "subject": s, "attribute": "x"} for i, s in enumerate(subjects)]
    (d / "known_1000.json").write_text(json.dumps(facts))
    return tmp_path / "data"


def test_known_means_the_decoded_top1_is_the_whole_attribute(tmp_path, monkeypatch):
    """The reference keeps a fact only if decode(top-1).strip() == attribute: fact B (two tokens, first
    one right) is skipped, so the AIE is fact A's alone; the first-token test would average both."""
    from locate.causal_trace import _is_known, average_indirect_effects
    from locate._tracing import clean_states

    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path / "cache"))
    lm = _tiny_llama()
    facts = _two_facts(lm)
    for f, ref in zip(facts, (True, False)):
        logits, _ = clean_states(lm, lm.encode(f["prompt"]), [])
        assert _is_known(lm, f["prompt"], f["attribute"], logits) is ref
        assert _is_known(lm, f["prompt"], f["attribute"], logits, "first_token") is True

    nu = 0.3
    only_a = trace(facts[0]["prompt"], facts[0]["subject"], model=lm, kinds=("mlp",), samples=2, noise=nu)
    want = average_indirect_effects([only_a], ("mlp",), lm.n_layers).aie
    r = trace_many(facts, model=lm, kinds=("mlp",), samples=2, noise=nu, progress=False)
    assert (r.n_facts, r.n_skipped, r.known_match) == (1, 1, "answer")
    assert r.aie == want
    loose = trace_many(facts, model=lm, kinds=("mlp",), samples=2, noise=nu, known_match="first_token",
                       progress=False)
    assert loose.n_facts == 2 and not np.allclose(loose.array("mlp"), r.array("mlp"))

    prof = locate.layer_profile(lm, facts=facts, samples=2, noise=nu, cache=False)
    assert prof.n_facts == 1 and prof.known_match == "answer"
    np.testing.assert_allclose(prof.aie, only_a.ie("mlp")[only_a.token_index("last_subject")], atol=1e-6)
    assert locate.layer_profile(lm, facts=facts, samples=2, noise=nu, cache=False,
                                known_match="first_token").n_facts == 2
    with pytest.raises(TraceError):
        trace_many(facts, model=lm, known_match="prefix", progress=False)


def test_default_noise_is_3_std_of_the_known_subjects_embeddings(tmp_path, monkeypatch, recwarn):
    """nu = 3 x std of the known_1000 subjects' token-embedding rows (the reference's "s3"), not of
    the whole embedding matrix; computed once per model and cached; a warned fallback without data."""
    import locate.causal_trace as ct

    lm = _tiny_llama()
    subjects = ["Eiffel Tower", "Colosseum", "Big Ben"]
    monkeypatch.setenv("LOCATE_EDIT_DATA", str(_known_1000(tmp_path, subjects)))
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path / "cache"))
    emb = lm.hf_model.get_input_embeddings().weight.detach()
    ids = [i for s in subjects for i in lm.tokenizer(s, add_special_tokens=False)["input_ids"]]
    ref = 3 * float(emb[ids].std())
    matrix = 3 * float(emb.std())
    assert abs(ref - matrix) > 1e-3  # the two definitions give different numbers here

    tr = trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2)
    assert tr.noise_level == pytest.approx(ref, rel=1e-6)
    assert "3 subjects of known_1000.json" in tr.noise_source
    assert not [w for w in recwarn if issubclass(w.category, ct.NoiseFallbackWarning)]
    cached = list((tmp_path / "cache" / "noise").glob("*.json"))
    assert len(cached) == 1
    d = json.loads(cached[0].read_text())
    d["body"]["std"] *= 2  # tampered without fixing the checksum: detected and recomputed
    cached[0].write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="noise cache"):
        assert ct.noise_level(lm).nu == pytest.approx(ref, rel=1e-6)

    named = trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise="embedding_matrix")
    assert named.noise_level == pytest.approx(matrix, rel=1e-6) and "matrix" in named.noise_source
    assert ct.noise_level(lm, subjects).nu == pytest.approx(ref, rel=1e-6)

    monkeypatch.setattr(ct, "find_known_facts", lambda: None)
    with pytest.warns(ct.NoiseFallbackWarning, match="known_1000"):
        fb = trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2)
    assert fb.noise_level == pytest.approx(matrix, rel=1e-6) and "fallback" in fb.noise_source
    with pytest.raises(TraceError):
        ct.noise_level(lm, "s3")


def test_aie_pools_rows_across_facts_as_the_reference_notebook():
    """Middle-subject and further rows are pooled over facts and the mean p_corrupted of all facts is
    subtracted; the first subsequent token counts even when it is the last token."""
    from locate.causal_trace import average_indirect_effects

    def fact(n_tokens, span, col, p_corr):
        return CausalTrace(prompt="p", subject="s", tokens=["t"] * n_tokens, subject_range=span, answer_id=0,
                           answer="a", p_clean=1.0, p_corrupted=p_corr,
                           scores={"mlp": np.asarray(col, dtype=float)[:, None]}, kinds=("mlp",), window=1,
                           samples=1, seed=0, noise_level=0.1, noise_kind="gaussian", noise_source="given")

    # f1: subject 0..3, first subsequent 4, further 5-6, last 7.  f2: subject 0..2, token 3 = first subsequent = last
    f1 = fact(8, (0, 4), [0.9, 0.5, 0.9, 0.6, 0.7, 0.2, 0.4, 0.8], 0.1)
    f2 = fact(4, (0, 3), [0.9, 0.4, 0.5, 0.6], 0.3)
    r = average_indirect_effects([f1, f2], ("mlp",), 1)
    got = dict(zip(locate.causal_trace.TOKEN_GROUPS, r.array("mlp")[:, 0]))
    assert got["middle subject tokens"] == pytest.approx((0.5 + 0.9 + 0.4) / 3 - 0.2)  # per fact first: 0.35
    assert got["first subsequent token"] == pytest.approx((0.7 + 0.6) / 2 - 0.2)  # without f2's: 0.6
    assert got["further tokens"] == pytest.approx((0.2 + 0.4) / 2 - 0.2)  # f1's own baseline: 0.2
    assert got["last token"] == pytest.approx((0.8 + 0.6) / 2 - 0.2)
    assert r.rows["middle subject tokens"] == 3 and r.counts["first subsequent token"] == 2
    per_fact = average_indirect_effects([f1, f2], ("mlp",), 1, pool="facts")
    assert per_fact.aie["mlp"]["middle subject tokens"][0] == pytest.approx(((0.4 + 0.8) / 2 + 0.1) / 2)
