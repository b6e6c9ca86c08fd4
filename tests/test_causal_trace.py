"""Causal tracing: the fast path equals the reference loop; the paper's sanity properties hold."""

from __future__ import annotations

import json
import unicodedata

import numpy as np
import pytest
import torch

import locate
from locate.loading import CacheRebuiltWarning
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
    d["body"]["aie"][0] += 1.0
    f.write_text(json.dumps(d))
    with pytest.warns(CacheRebuiltWarning, match="corrupted"):
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


# ---------------------------------------------------------------------- reliability (issue 18)
def _known_fact(lm, prompt=PROMPT, subject=SUBJECT):
    top = lm.tokenizer.decode([int(lm.last_logits([prompt])[0].argmax())]).strip()
    return {"prompt": prompt, "subject": subject, "attribute": top}


def test_layer_profile_cache_is_keyed_by_the_model_as_it_is(tmp_path, monkeypatch):
    """A profile computed while an edit is applied is the edited model's: it is neither read from nor
    written as the unedited model's entry, and after the revert the unedited profile comes back.
    (Keyed by the load-time fingerprint, the edited call returned the cached unedited profile.)"""
    from edit import Edit, Request, WeightDelta

    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    lm = _tiny_llama()
    facts = [_known_fact(lm)]
    base = locate.layer_profile(lm, facts=facts, samples=2, noise=0.3)
    assert base.n_facts == 1 and base.fingerprint == lm.fingerprint
    g = torch.Generator().manual_seed(0)
    delta = 0.02 * torch.randn(lm.d_model, lm.d_mlp, generator=g)  # small: the top-1 answer stays
    e = Edit("test", [Request("{} is located in", SUBJECT, " Rome")], [WeightDelta(1, dense=delta)],
             lm.fingerprint, lm.name).apply(lm)
    try:
        edited = locate.layer_profile(lm, facts=facts, samples=2, noise=0.3)
        assert "(cached)" not in edited.source and edited.n_facts == 1
        assert edited.fingerprint == lm.state_fingerprint != lm.fingerprint
        assert np.abs(edited.aie - base.aie).max() > 0.1 * np.abs(base.aie).max()  # the edit changes it
    finally:
        e.revert(lm)
    again = locate.layer_profile(lm, facts=facts, samples=2, noise=0.3)
    assert "(cached)" in again.source
    np.testing.assert_array_equal(again.aie, base.aie)
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 2  # one entry per model state


def test_cached_profile_with_the_wrong_number_of_layers_is_rejected(tmp_path, monkeypatch):
    """A well-formed entry (valid checksum) whose profile has n_layers + 1 values is refused with a
    CacheRebuiltWarning and recomputed, instead of steering "auto" with a foreign profile."""
    from locate.calibration import CACHE_FORMAT
    from locate.loading import write_cached

    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    lm = _tiny_llama()
    facts = [_known_fact(lm)]
    p1 = locate.layer_profile(lm, facts=facts, samples=2, noise=0.3)
    f = next((tmp_path / "calibration").glob("*.json"))
    d = json.loads(f.read_text())
    d["body"]["aie"] = d["body"]["aie"] + [9.0]
    write_cached(f, CACHE_FORMAT, d["key"], body=d["body"])  # a consistent digest over the wrong profile
    with pytest.warns(CacheRebuiltWarning, match="4 values.*3 layers"):
        p2 = locate.layer_profile(lm, facts=facts, samples=2, noise=0.3)
    assert p2.aie.shape == (3,) and "(cached)" not in p2.source
    np.testing.assert_array_equal(p2.aie, p1.aie)
    # a damaged entry is reported with the toolkit's warning class, not a bare UserWarning
    f.write_text(f.read_text().replace('"aie"', '"aie_"', 1))
    with pytest.warns(CacheRebuiltWarning):
        locate.layer_profile(lm, facts=facts, samples=2, noise=0.3)


def test_profile_window_is_checked_not_clamped():
    """window(0) used to become window(1) (MEMIT's n_layers=0 edited one layer); now it is refused."""
    from locate.calibration import LayerProfile
    from locate.errors import LayerSpecError

    prof = LayerProfile(aie=np.array([0.1, 0.5, 0.2]), n_facts=1, source="test")
    assert prof.window(2) == [1, 2] and prof.window(3) == [0, 1, 2]
    for k in (0, 4, -1, 1.5, True):
        with pytest.raises(LayerSpecError, match="1..3"):
            prof.window(k)
    with pytest.raises(LayerSpecError):
        locate.resolve_layers(_tiny_llama(), prof, n=0)


@pytest.mark.parametrize("tokens, message", [
    ([-1], r"out of range.*0\.\.\d+"),
    ([999], r"token index 999 is out of range.*0\.\.\d+"),
    (["nope"], r"unknown token name 'nope'.*first_subject.*last_subject"),
    ([1.0], r"a token is an index"),
    ([], r"empty"),
])
def test_trace_tokens_are_validated(tokens, message):
    """tokens=[-1] used to write the last row as p_corrupted untraced; [999] ended in a reshape
    RuntimeError and an unknown name in a KeyError. Each is now a TraceError naming what is valid."""
    lm = _tiny_llama()
    with pytest.raises(TraceError, match=message):
        trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3, tokens=tokens)


def test_trace_tokens_by_index_and_name_trace_the_right_rows():
    lm = _tiny_llama()
    full = trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3)
    last = len(full.tokens) - 1
    part = trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3, tokens=[last, "last_subject"])
    for row in (last, full.token_index("last_subject")):
        np.testing.assert_allclose(part.scores["mlp"][row], full.scores["mlp"][row], atol=1e-6)
    assert np.isnan(part.scores["mlp"][full.subject_range[0] + 0]).all() or full.subject_range[1] - 1 == full.subject_range[0]
    with pytest.raises(TraceError, match="out of range"):
        full.token_index(last + 1)
    with pytest.raises(TraceError, match="does not exist"):  # the subject ends the prompt
        trace("I visited the Eiffel Tower", SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3,
              tokens=["first_subsequent"])


def test_window_is_checked_against_the_model():
    """A window larger than the model used to be accepted (every column then restores every layer);
    now it is refused, and the default is the reference's 10 capped at the model's layers."""
    lm = _tiny_llama()  # 3 layers
    with pytest.raises(TraceError, match=r"1\.\.3"):
        trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3, window=4)
    with pytest.raises(TraceError, match=r"1\.\.3"):
        locate.layer_profile(lm, facts=[_known_fact(lm)], samples=2, noise=0.3, window=10, cache=False)
    assert trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3).window == 3


def test_trace_shows_a_progress_bar_by_default_for_long_prompts(monkeypatch):
    import locate.causal_trace as ct

    seen = []
    real = ct.fast_scores

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ct, "fast_scores", spy)
    lm = _tiny_llama()
    trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3)
    monkeypatch.setattr(ct, "PROGRESS_MIN_TOKENS", 4)  # PROMPT has more than 4 tokens
    trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3)
    trace(PROMPT, SUBJECT, model=lm, kinds=("mlp",), samples=2, noise=0.3, progress=False)
    assert seen == [False, True, False]


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def test_fast_path_shares_the_corrupted_prefix_across_rows():
    """The key/value prefix a forward keeps is the S noise samples' (S x t positions), not a copy per
    batch row (R x S x t), so tracing memory no longer grows with rows x prefix length."""
    lm = _tiny_llama()
    prompt = "Some words come first here. " * 6 + PROMPT
    S = 2
    held = []
    forward = lm.hf_model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        if cache is not None and kwargs["input_ids"].shape[0] > S:
            per_pos = sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k, _ in
                          ((layer.keys, None) for layer in cache.layers))
            held.append((_cache_bytes(cache), S * cache.get_seq_length() * per_pos))
        return out

    lm.hf_model.forward = spy
    try:
        tr = trace(prompt, SUBJECT, model=lm, kinds=("mlp", "attn"), samples=S, noise=0.3)
    finally:
        del lm.hf_model.forward
    assert held, "no batched forward continued from a cache"
    for got, shared in held:
        assert got <= shared  # at most the S samples' prefix (an R*S-row copy held R times more)
    loop = trace(prompt, SUBJECT, model=lm, kinds=("mlp", "attn"), samples=S, noise=0.3, method="loop")
    for k in tr.kinds:
        assert np.abs(tr.scores[k] - loop.scores[k]).max() <= 1e-5


def test_long_prompts_use_fewer_rows_per_forward_with_the_same_scores():
    """rows x prompt length per forward stays within batch_tokens (at least one restoration's samples)."""
    from locate._fast_restore import fast_scores, rows_per_batch

    assert rows_per_batch(256, 100, 10) == 256 and rows_per_batch(256, 2000, 2) == 32
    assert rows_per_batch(256, 2000, 10) == 32 and rows_per_batch(256, 10**6, 10) == 10
    lm = _tiny_llama()
    prompt = "Some words come first here. " * 4 + PROMPT
    ids = lm.encode(prompt)
    span = lm.subject_span(prompt, SUBJECT)
    eps = draw_noise(2, span[1] - span[0], lm.d_model, 0.3, seed=0)
    answer = int(lm.last_logits([prompt])[0].argmax())
    rows = []
    forward = lm.hf_model.forward

    def spy(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    wide = fast_scores(lm, ids, span, eps, answer, ("mlp", "hidden"), 2)
    lm.hf_model.forward = spy
    try:
        narrow = fast_scores(lm, ids, span, eps, answer, ("mlp", "hidden"), 2, batch_tokens=4 * len(ids))
    finally:
        del lm.hf_model.forward
    assert max(rows[2:]) <= 4 and len(rows) > 2  # after the clean and corrupted runs
    for k in ("mlp", "hidden"):
        np.testing.assert_allclose(narrow[1][k], wide[1][k], atol=1e-6)


def test_subject_span_survives_case_folds_that_change_length():
    """"İ".lower() has two code points, so offsets from prompt.lower() pointed 3 characters past the
    subject here and the span covered the wrong tokens."""
    lm = locate.default_model()
    prompt, subject = "İİİ The eiffel tower is in Paris", "Eiffel Tower"
    start = prompt.index("eiffel")
    ids, offsets = lm._char_offsets(prompt)
    want = [i for i, (a, b) in enumerate(offsets) if b > a and a < start + len(subject) and b > start]
    span = lm.subject_span(prompt, subject)
    assert span == (want[0], want[-1] + 1)
    assert lm.tokenizer.decode(ids[span[0]:span[1]]).strip() == "eiffel tower"


@pytest.mark.parametrize("prompt, subject", [
    ("The Cafe\u0301 Tower is in", "Caf\u00e9 Tower"),  # decomposed prompt, precomposed subject
    ("The Caf\u00e9 Tower is in", "Cafe\u0301 Tower"),  # and the other way round
    ("The CAFE\u0301 TOWER is in", "caf\u00e9 tower"),  # and caselessly
])
def test_subject_span_matches_after_nfc_normalisation(prompt, subject):
    lm = locate.default_model()
    span = lm.subject_span(prompt, subject)
    ids = lm.encode(prompt)
    text = lm.tokenizer.decode(ids[span[0]:span[1]]).strip()
    assert unicodedata.normalize("NFC", text).casefold() == unicodedata.normalize("NFC", subject).casefold()


def test_cjk_tokens_are_readable_in_traces_and_heatmap_labels(tmp_path):
    """Byte-level BPE splits each of these characters into two tokens that decode to U+FFFD alone; the
    trace's tokens and the heatmap's labels show the characters instead."""
    from viz import trace_heatmap

    lm = _tiny_llama()
    prompt, subject = "東京タワーは日本にあります", "東京タワー"
    assert "\ufffd" in "".join(lm.to_str_tokens(prompt))  # what the labels used to show
    tr = trace(prompt, subject, model=lm, kinds=("mlp",), samples=2, noise=0.3)
    assert not any("\ufffd" in t for t in tr.tokens)
    assert tr.tokens[:2] == ["東…", "…東"] and len(tr.tokens) == len(lm.encode(prompt))
    fig = trace_heatmap(tr, "mlp")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "'東…'*" and not any("\ufffd" in s for s in labels)
    assert lm.token_labels("emoji 😀 ok") == ["em", "oji", " 😀…", "…😀", " ok"]


def test_long_prompts_run_the_clean_and_corrupted_passes_in_chunks(monkeypatch):
    """Past PREFILL_TOKENS row-positions the whole-prompt runs go chunk by chunk through the key/value
    cache (no (rows, heads, T, T) attention matrix); the scores still equal the reference loop's."""
    import locate._tracing as tracing

    lm = _tiny_llama()
    prompt = "Some words come first here. " * 3 + PROMPT + " and more words after it"
    widths = []
    forward = lm.hf_model.forward

    def spy(*args, **kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tracing, "PREFILL_TOKENS", 8)
    lm.hf_model.forward = spy
    try:
        fast = trace(prompt, SUBJECT, model=lm, kinds=("mlp", "hidden"), samples=2, noise=0.3)
    finally:
        del lm.hf_model.forward
    T = len(lm.encode(prompt))
    assert widths[0] == (1, 8) and widths[1] == (1, 8)  # the clean run, 8 positions at a time
    assert (2, 4) in widths  # the corrupted run: 2 samples x 4 positions
    whole = 2 * -(-T // 8) + -(-T // 4)  # trace's clean run, fast_scores' clean run, the corrupted run
    assert max(b * n for b, n in widths[:whole]) <= 8 and widths[whole][0] > 2  # then the restorations
    monkeypatch.setattr(tracing, "PREFILL_TOKENS", 10**6)
    loop = trace(prompt, SUBJECT, model=lm, kinds=("mlp", "hidden"), samples=2, noise=0.3, method="loop")
    for k in fast.kinds:
        assert np.abs(fast.scores[k] - loop.scores[k]).max() <= 1e-5
    assert fast.p_clean == pytest.approx(loop.p_clean, rel=1e-5)


def test_bad_noise_and_targets_are_refused_not_traced(tmp_path):
    """noise=None used to end in a TypeError, a float32-overflowing nu (3e38) in NaN scores returned as
    a result, target=True in a trace of the string 'True'."""
    lm = _tiny_llama()
    kw = dict(model=lm, kinds=("mlp",), samples=2)
    for noise in (None, -0.1, float("nan"), float("inf"), [1, 2], True):
        with pytest.raises(TraceError, match="noise"):
            trace(PROMPT, SUBJECT, noise=noise, **kw)
    with pytest.raises(TraceError, match="overflows"):
        trace(PROMPT, SUBJECT, noise=3e38, **kw)
    for target in (True, 1.5):
        with pytest.raises(TraceError, match="target"):
            trace(PROMPT, SUBJECT, noise=0.3, target=target, **kw)
    for seed in (-1, 2**64, 1.5):
        with pytest.raises(TraceError, match="seed"):
            trace(PROMPT, SUBJECT, noise=0.3, seed=seed, **kw)
    for kinds in (None, 3, [["mlp"]]):  # None used to end in a TypeError (found by tests/test_properties.py)
        with pytest.raises(TraceError, match="kinds"):
            trace(PROMPT, SUBJECT, model=lm, kinds=kinds, samples=2, noise=0.3)
    tr = trace(PROMPT, SUBJECT, model=lm, kinds="mlp", samples=np.int64(2), seed=np.int64(1), noise=0.3)
    assert tr.kinds == ("mlp",) and CausalTrace.load(tr.save(tmp_path / "t.json")).samples == 2
    from locate.causal_trace import NonFiniteTraceError

    lm.mlp_out_weight(0)[0, 0] = float("nan")  # a model whose outputs are NaN: refused, not traced
    with pytest.raises(NonFiniteTraceError, match="non-finite"):
        trace(PROMPT, SUBJECT, noise=0.3, **kw)
