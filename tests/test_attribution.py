"""Attribution patching (locate.attribution): a first-order estimate of the causal-tracing scores.

What is checked against what:
* the result has the exact path's type, shapes, tokens, answer and endpoints (same seed, same
  p_corrupted), with the method recorded;
* each single-state estimate is the tangent of the restoration at the corrupted run, equation (2):
  it equals a finite difference of P(answer) along clean - corrupted, and differs from the exact
  restoration effect (the secant) at a large noise level;
* with small noise the estimates agree with the exact scores (Pearson > 0.99; a random estimate
  would not), for every kind with window 1;
* a window's estimate is the sum of its layers' single-layer terms, equation (3);
* trace_many accepts the method and keeps its records apart from exact ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from locate.causal_trace import (CausalTrace, TraceError, draw_noise, trace, trace_many, window_layers)
from locate.testing import tiny_model
from locate._tracing import clean_states, state_hook

PROMPT = "The Eiffel Tower is located in"
SUBJECT = "Eiffel Tower"


@pytest.fixture(scope="module")
def gpt2_4(tokenizer):
    return tiny_model("gpt2", tokenizer, n_layers=4)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_same_type_shapes_and_endpoints_as_exact(tiny):
    a = trace(PROMPT, SUBJECT, model=tiny, samples=3, window=2, noise=0.5, seed=7, method="attribution")
    b = trace(PROMPT, SUBJECT, model=tiny, samples=3, window=2, noise=0.5, seed=7)
    assert isinstance(a, CausalTrace) and a.method == "attribution" and b.method == "fast"
    assert a.kinds == b.kinds and a.tokens == b.tokens and a.subject_range == b.subject_range
    assert a.answer_id == b.answer_id and a.window == b.window == 2
    for k in a.kinds:
        assert a.scores[k].shape == b.scores[k].shape == (len(a.tokens), tiny.n_layers)
        assert np.isfinite(a.scores[k]).all()
        # tokens before the subject: no effect in either path
        np.testing.assert_array_equal(a.ie(k)[: a.subject_range[0]], 0.0)
    assert a.p_clean == b.p_clean
    # the same noise draw: the corrupted endpoint is the exact path's, and another seed moves it
    assert a.p_corrupted == pytest.approx(b.p_corrupted, rel=1e-6, abs=0)
    c = trace(PROMPT, SUBJECT, model=tiny, kinds=("hidden",), samples=3, noise=0.5, seed=8, method="attribution")
    assert abs(c.p_corrupted - a.p_corrupted) > 1e3 * abs(a.p_corrupted - b.p_corrupted)
    # the estimates are not the exact scores (at this noise level the model is far from linear)
    assert max(np.abs(a.ie(k) - b.ie(k)).max() for k in a.kinds) > 1e-3 * max(np.abs(b.ie(k)).max() for k in b.kinds)


def test_json_roundtrip_keeps_the_method(gpt2_4, tmp_path):
    a = trace(PROMPT, SUBJECT, model=gpt2_4, kinds=("mlp",), samples=2, noise=0.5, method="attribution")
    c = CausalTrace.load(a.save(tmp_path / "t.json"))
    assert c.method == "attribution"
    np.testing.assert_array_equal(c.scores["mlp"], a.scores["mlp"])
    assert "attribution path" in a.summary()


def _restored_with(lm, ids, span, eps, answer_id, name, t, alpha, clean) -> float:
    """P(answer) averaged over the noise rows, with state (name, t) moved from its corrupted value
    a fraction ``alpha`` of the way to its clean value (alpha = 1: the exact restoration)."""
    s0, s1 = span

    def add_noise(h, hook):
        h = h.clone()
        h[:, s0:s1] += eps.to(h.dtype)
        return h

    def move(h, hook):
        h = h.clone()
        h[:, t] += alpha * (clean[name][t].to(h.dtype) - h[:, t])
        return h

    x = torch.tensor([list(ids)] * eps.shape[0])
    with torch.no_grad(), lm.hooks([(lm.hook_embed, add_noise), (name, move)]):
        logits = lm.hf_model(input_ids=x, logits_to_keep=1).logits[:, -1]
    return float(logits.double().softmax(-1)[:, answer_id].mean())


@pytest.mark.parametrize("arch, h, rel", [("gpt2", 1e-4, 1e-3), ("gptj", 1e-4, 1e-3),
                                          ("llama", 0.05, 2e-2)])  # Llama's RMSNorm runs in float32
def test_estimate_is_the_tangent_at_the_corrupted_run(arch, h, rel, tokenizer):
    """Equation (2): IE_hat(t, l) = (a_clean - a_corr) . dm/da at the corrupted run, i.e. the derivative
    of alpha -> m(a_corr + alpha (a_clean - a_corr)) at alpha = 0 (a central finite difference here),
    not the exact effect m(alpha = 1) - m(0), which differs at this noise level. The model runs in float64
    so the finite difference is precise (Llama's norm casts to float32: a wider step, a looser tolerance)."""
    lm = tiny_model(arch, tokenizer, n_layers=3, dtype=torch.float64)
    noise, samples, seed = 0.5, 3, 0
    tr = trace(PROMPT, SUBJECT, model=lm, samples=samples, window=1, noise=noise, seed=seed, method="attribution")
    ids, span = lm.encode(PROMPT), tr.subject_range
    eps = draw_noise(samples, span[1] - span[0], lm.d_model, noise, seed=seed)
    checked = 0
    for kind, t, l in [("hidden", span[1] - 1, 0), ("mlp", span[1] - 1, 1), ("attn", len(ids) - 1, 1),
                       ("hidden", span[0], 1)]:
        name = state_hook(lm, kind, l)
        _, clean = clean_states(lm, ids, [name])
        plus = _restored_with(lm, ids, span, eps, tr.answer_id, name, t, h, clean)
        minus = _restored_with(lm, ids, span, eps, tr.answer_id, name, t, -h, clean)
        tangent = (plus - minus) / (2 * h)
        secant = _restored_with(lm, ids, span, eps, tr.answer_id, name, t, 1.0, clean) - tr.p_corrupted
        est = tr.ie(kind)[t, l]
        assert est == pytest.approx(tangent, rel=rel, abs=rel * abs(secant)), (kind, t, l)
        if abs(secant - tangent) > 0.05 * abs(secant):  # where the model bends, the estimate is not the exact effect
            assert abs(est - secant) > 0.02 * abs(secant)
            checked += 1
    assert checked >= 1  # at least one state where tangent and secant part


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gptj"])
def test_small_noise_estimates_agree_with_exact(arch, tokenizer):
    """As the noise shrinks, restoration effects become linear in the restored difference and the
    estimate approaches the exact score: Pearson > 0.99 over every (token, layer) from the subject on,
    for every kind (window 1). A random estimate of the same size scores near 0. (At the reference
    noise level the tiny random models are far from linear: see the bench for the real model.)"""
    lm = tiny_model(arch, tokenizer, n_layers=4, dtype=torch.float64)
    kw = dict(model=lm, samples=3, window=1, noise=1e-4, seed=1)
    a = trace(PROMPT, SUBJECT, method="attribution", **kw)
    b = trace(PROMPT, SUBJECT, **kw)
    s0 = a.subject_range[0]
    rng = np.random.default_rng(0)
    for k in a.kinds:
        est, exact = a.ie(k)[s0:], b.ie(k)[s0:]
        assert _pearson(est, exact) > 0.99, k
        assert np.abs(est - exact).max() < 0.1 * np.abs(exact).max(), k
        assert abs(_pearson(rng.permutation(est.ravel()), exact)) < 0.9
        # the peak state is the exact path's
        assert a.argmax(k) == b.argmax(k), k


def test_window_estimate_is_the_sum_of_its_layers(gpt2_4):
    """Equation (3): the estimate for a window is the sum of the single-layer estimates (window 1) over
    the window's layers, clipped at both ends, and the hidden kind ignores the window."""
    kw = dict(model=gpt2_4, samples=2, noise=0.5, seed=2, method="attribution")
    one = trace(PROMPT, SUBJECT, window=1, **kw)
    for w in (2, 3, 4):
        win = trace(PROMPT, SUBJECT, window=w, **kw)
        for k in ("mlp", "attn"):
            want = np.stack([one.ie(k)[:, window_layers(l, w, gpt2_4.n_layers)].sum(1) for l in range(gpt2_4.n_layers)], 1)
            np.testing.assert_allclose(win.ie(k), want, rtol=1e-9, atol=1e-15)
            assert not np.allclose(win.ie(k), one.ie(k))  # a window sums several layers, not one
        np.testing.assert_array_equal(win.scores["hidden"], one.scores["hidden"])


def test_tokens_subset_and_samples_in_chunks(gpt2_4):
    kw = dict(model=gpt2_4, samples=4, noise=0.5, seed=3, method="attribution")
    full = trace(PROMPT, SUBJECT, **kw)
    part = trace(PROMPT, SUBJECT, tokens=["last_subject"], batch_size=3, **kw)  # samples 3 + 1
    row = full.token_index("last_subject")
    for k in full.kinds:
        np.testing.assert_allclose(part.scores[k][row], full.scores[k][row], rtol=1e-5)
        others = [t for t in range(len(full.tokens)) if t != row]
        assert np.isnan(part.scores[k][others]).all()
    assert part.p_corrupted == pytest.approx(full.p_corrupted, rel=1e-6)


def test_bad_method_and_loop_with_tokens_are_refused(gpt2_4):
    with pytest.raises(TraceError, match="method"):
        trace(PROMPT, SUBJECT, model=gpt2_4, method="atp")
    with pytest.raises(TraceError, match="tokens"):
        trace(PROMPT, SUBJECT, model=gpt2_4, method="loop", tokens=["last"])
    with pytest.raises(TraceError, match="method"):
        trace_many([], model=gpt2_4, method="nope", progress=False)


def test_trace_many_passes_the_method_and_keeps_records_apart(gpt2_4, tmp_path):
    ids = gpt2_4.encode(PROMPT)
    logits, _ = clean_states(gpt2_4, ids, [])
    answer = gpt2_4.tokenizer.decode([int(logits.argmax())]).strip()
    facts = [{"prompt": PROMPT, "subject": SUBJECT, "attribute": answer}]
    path = tmp_path / "runs.jsonl"
    kw = dict(model=gpt2_4, kinds=("mlp",), samples=2, noise=0.5, results=path, progress=False)
    exact = trace_many(facts, **kw)
    approx = trace_many(facts, method="attribution", **kw)
    assert exact.n_facts == approx.n_facts == 1
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["trace"]["method"] for r in recs] == ["fast", "attribution"]  # not read back as each other
    assert "method" not in recs[0]["settings"] and recs[1]["settings"]["method"] == "attribution"
    assert not np.allclose(exact.array("mlp"), approx.array("mlp"), equal_nan=True)
    one = trace(PROMPT, SUBJECT, model=gpt2_4, kinds=("mlp",), samples=2, noise=0.5, method="attribution")
    last = one.token_index("last_subject")
    np.testing.assert_allclose(approx.aie["mlp"]["last subject token"], one.ie("mlp")[last], rtol=1e-9)
    again = trace_many(facts, method="attribution", **kw)  # resumed from the record, nothing appended
    assert len(path.read_text().splitlines()) == 2
    np.testing.assert_array_equal(again.array("mlp"), approx.array("mlp"))


def test_layer_profile_by_attribution_is_cached_apart(tokenizer, tmp_path, monkeypatch):
    """layer_profile(method="attribution") averages first-order estimates, records the method, and is
    cached apart from the exact profile (neither is read back as the other)."""
    import locate

    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    lm = tiny_model("llama", tokenizer, n_layers=3)
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    top = lm.tokenizer.decode([int(lm.last_logits([prompt])[0].argmax())]).strip()
    facts = [{"prompt": prompt, "subject": subject, "attribute": top}]
    exact = locate.layer_profile(lm, facts=facts, samples=2)
    approx = locate.layer_profile(lm, facts=facts, samples=2, method="attribution")
    assert exact.method == "fast" and approx.method == "attribution" and approx.n_facts == 1
    assert "(cached)" not in approx.source and not np.allclose(approx.aie, exact.aie, rtol=1e-3, atol=0)
    again = locate.layer_profile(lm, facts=facts, samples=2, method="attribution")
    assert "(cached)" in again.source and np.allclose(again.aie, approx.aie, rtol=1e-9, atol=0) and again.method == "attribution"
    assert np.allclose(locate.layer_profile(lm, facts=facts, samples=2).aie, exact.aie, rtol=1e-9, atol=0)
