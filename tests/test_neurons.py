"""Knowledge neurons (locate/neurons.py), KN edits (edit/kn.py) and the heatmap (viz/neurons.py)."""

from __future__ import annotations

import pytest
import torch

import edit
import locate
from edit import Request, applied, kn_erase, kn_update
from edit.eval.datasets import Case
from locate.neurons import (AttributionShapeError, KnowledgeNeurons, TooFewPromptsError, attribution,
                            attribution_loop, refine, refine_facts, suppress)

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def tiny64(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("llama", tokenizer, dtype=torch.float64)


def _prob_with_layer(lm, ids, layer, values, answer):
    def hook(act, hook):
        act = act.clone()
        act[0, -1] = values
        return act

    with torch.no_grad(), lm.hooks([(lm.hook_mlp_key(layer), hook)]):
        return float(lm.hf_model(input_ids=ids).logits[0, -1].softmax(-1)[answer])


def test_riemann_sum_matches_independent_finite_differences(tiny64):
    """Eq. 4 for one neuron, recomputed by central finite differences of P in float64."""
    lm, layer, steps = tiny64, 1, 5
    ids = torch.tensor([lm.encode(PROMPT)])
    answer = lm.target_ids(" Paris", PROMPT)[0]
    cache = {}
    with torch.no_grad(), lm.hooks([(lm.hook_mlp_key(layer), lambda a, hook: cache.setdefault("w", a[0, -1].clone()))]):
        lm.hf_model(input_ids=ids)
    w_bar = cache["w"]
    attr = attribution(lm, PROMPT, " Paris", steps=steps, batch_size=3)
    for i in attr[layer].abs().topk(2).indices.tolist():
        e, h, total = torch.zeros_like(w_bar), 1e-3, 0.0
        e[i] = h
        for k in range(steps):
            base = k / steps * w_bar
            total += (_prob_with_layer(lm, ids, layer, base + e, answer)
                      - _prob_with_layer(lm, ids, layer, base - e, answer)) / (2 * h)
        expected = float(w_bar[i]) * total / steps
        assert attr[layer, i].item() == pytest.approx(expected, rel=1e-4, abs=1e-12)  # finite-difference error ~1e-5


def test_batched_equals_per_layer_loop(tiny):
    a = attribution(tiny, PROMPT, " Paris", steps=4, batch_size=6)  # chunks of 1 layer, mixed
    b = attribution_loop(tiny, PROMPT, " Paris", steps=4)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama"])
def test_batched_is_exact_in_float64_on_deeper_models(arch, tokenizer):
    """The batched path (cached prefix, last token only, blocks below a chunk skipped) is the same
    computation as the loop: in float64 they agree to rounding, also with multi-token answers."""
    from locate.testing import tiny_model

    m = tiny_model(arch, tokenizer, n_layers=4, dtype=torch.float64)
    for tokens in ("first", "mean"):
        a = attribution(m, PROMPT, " Paris Texas", steps=3, batch_size=6, tokens=tokens)  # chunks start at layers 0, 2
        b = attribution_loop(m, PROMPT, " Paris Texas", steps=3, tokens=tokens)
        assert (a - b).abs().max() <= 1e-8 * b.abs().max()  # float32 paths differ by ~1e-4 of this


def test_float64_precision_on_a_float32_model_is_exact_and_restores_weights(tiny):
    """precision=torch.float64 computes both paths in float64 (equal to rounding), returns float64
    attributions, and leaves the float32 weights bit-identical afterwards."""
    before = {k: v.clone() for k, v in tiny.hf_model.state_dict().items()}
    a = attribution(tiny, PROMPT, " Paris", steps=4, batch_size=6, precision=torch.float64)
    b = attribution_loop(tiny, PROMPT, " Paris", steps=4, precision="float64")
    assert a.dtype == b.dtype == torch.float64
    assert (a - b).abs().max() <= 1e-8 * b.abs().max()  # float32: ~1e-4
    after = tiny.hf_model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert tiny.dtype == torch.float32
    with pytest.raises(ValueError, match="floating torch dtype"):
        with tiny.precision(torch.int64):
            pass


def test_refine_fixed_share_option():
    """min_prompts=1, adaptive=False: the plain rule, neurons in >= p·N prompts at the fixed p."""
    per = torch.zeros(3, 2, 4)
    per[:, 0, 0] = 1.0  # top in every prompt
    per[0, 1, 2] = per[1, 1, 2] = 0.5  # above 0.2*max in 2 of 3 prompts
    per[2, 1, 3] = 0.1  # below threshold
    plain = dict(min_prompts=1, adaptive=False)
    r = refine(per, threshold=0.2, share=0.6, **plain)
    assert r.neurons == [(0, 0), (1, 2)] and r.share == 0.6 and r.tried == [0.6]
    assert refine(per, threshold=0.2, share=0.7, **plain).neurons == [(0, 0)]
    assert r.coarse[2] == [(0, 0)]


def _bag(n_prompts: int, present: dict) -> torch.Tensor:
    """Attributions (n_prompts, 2, 8): neuron (0, 0) is every prompt's max (1.0); ``present`` maps a
    neuron to (value, the prompts whose attribution it gets); everything else is 0."""
    per = torch.zeros(n_prompts, 2, 8, dtype=torch.float64)
    per[:, 0, 0] = 1.0
    for (l, i), (value, where) in present.items():
        per[list(where), l, i] = value
    return per


def test_refine_moves_p_up_until_two_to_five_neurons():
    """Dai et al.'s code: p starts at 0.7 and rises by 0.05 while more than 5 neurons survive. Here 7
    neurons are in >= 4 of 5 prompts (p = 0.7, 0.75, 0.8 all need 4), and only 3 are in all 5, which
    p = 0.85 (needs 5) keeps. The fixed-p rule keeps the 7. (1, 0) sits exactly at 0.2 × max: kept (≥)."""
    per = _bag(5, {(0, 1): (0.5, range(5)), (1, 0): (0.2, range(5)),
                   **{(1, i): (0.6, range(4)) for i in (1, 2, 3, 4)}})
    r = refine(per)
    assert r.neurons == [(0, 0), (0, 1), (1, 0)]
    assert r.share == 0.85 and r.tried == [0.7, 0.75, 0.8, 0.85]
    fixed = refine(per, min_prompts=1, adaptive=False)
    assert len(fixed.neurons) == 7 and fixed.tried == [0.7]


def test_refine_floor_of_three_prompts_and_the_last_try_stands():
    """4 prompts: (0, 0) in all, (0, 1) and (0, 2) in 2 each. p falls from 0.7 while fewer than 2
    neurons survive; at p = 0.5, p·N = 2 but the floor still asks 3 prompts, so after 6 tries (p = 0.45)
    the loop ends outside 2–5 with the last result, 1 neuron. Without the floor p = 0.5 keeps 3."""
    per = _bag(4, {(0, 1): (0.5, (0, 1)), (0, 2): (0.5, (2, 3)), (1, 0): (0.5, (0,))})
    r = refine(per)
    assert r.neurons == [(0, 0)]
    assert r.share == 0.45 and r.tried == [0.7, 0.65, 0.6, 0.55, 0.5, 0.45]
    no_floor = refine(per, min_prompts=1)
    assert no_floor.neurons == [(0, 0), (0, 1), (0, 2)] and no_floor.share == 0.5


def test_refine_refuses_fewer_than_three_prompts():
    """One prompt: the fixed-p rule keeps its whole coarse set (3 neurons here); the reference rule
    could keep none, so it refuses."""
    per = _bag(2, {(0, 1): (0.5, (0, 1)), (1, 3): (0.3, (0,))})
    assert refine(per[:1], min_prompts=1, adaptive=False).neurons == [(0, 0), (0, 1), (1, 3)]
    for n in (1, 2):
        with pytest.raises(TooFewPromptsError, match="at least 3 prompts"):
            refine(per[:n])
    with pytest.raises(locate.LocateEditError):
        refine(per, share=0.0)
    with pytest.raises(AttributionShapeError):
        refine(per[0], min_prompts=1)


def test_refine_facts_adapts_one_p_to_the_mean_over_facts():
    """The authors adapt p per relation, on the mean count over its facts. Fact 1 alone (10 prompts:
    (0, 0) in all, two neurons in 6) drops to p = 0.6 and keeps 3; beside fact 2 (4 neurons in all 3
    prompts) the mean is 2.5 at p = 0.7, so p stays and fact 1 keeps 1."""
    fact1 = _bag(10, {(0, 1): (0.5, range(6)), (0, 2): (0.5, range(4, 10))})
    fact2 = _bag(3, {(0, i): (0.5, range(3)) for i in (3, 4, 5)})
    joint = refine_facts([fact1, fact2])
    assert [len(r.neurons) for r in joint] == [1, 4] and joint[0].share == 0.7 and joint[0].tried == [0.7]
    alone = refine(fact1)
    assert alone.neurons == [(0, 0), (0, 1), (0, 2)] and alone.tried == [0.7, 0.65, 0.6]


PARAPHRASES = ["The Eiffel Tower is in the city of", "Where is the Eiffel Tower? In the city of"]


def _request(paraphrases=()) -> Request:
    return Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris", paraphrases=paraphrases)


def test_kn_method_refines_over_the_request_and_its_paraphrases(tiny64):
    """The registered ``kn`` finds the neurons on the rendered prompt and its paraphrases. With 3 prompts
    the reference keeps the neurons in all three coarse sets (computed here from the raw attributions;
    no p changes that for N = 3); the single-prompt variant keeps prompt 0's whole coarse set."""
    lm = tiny64
    state = [t.clone() for t in lm.hf_model.state_dict().values()]
    for paraphrases in ((), PARAPHRASES[:1]):
        with pytest.raises(TooFewPromptsError, match="min_prompts=1"):
            edit.compute("kn", _request(paraphrases), model=lm, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(state, lm.hf_model.state_dict().values()))

    prompts = [PROMPT, *PARAPHRASES]
    e = edit.compute("kn", _request(PARAPHRASES), model=lm, steps=2)
    assert e.hparams["prompts"] == prompts and not e.is_applied
    per = torch.stack([attribution(lm, p, " Paris", steps=2) for p in prompts])
    coarse = [{tuple(n) for n in (a >= 0.2 * a.max()).nonzero().tolist()} for a in per]
    shared = sorted(set.intersection(*coarse))
    assert shared and [tuple(n) for n in e.hparams["neurons"]] == shared and e.metrics["n_neurons"] == len(shared)

    one = edit.compute("kn", _request(), model=lm, steps=2, min_prompts=1, adaptive=False)
    assert [tuple(n) for n in one.hparams["neurons"]] == sorted(coarse[0]) and len(coarse[0]) != len(shared)


def test_kn_through_the_harness_uses_the_case_paraphrases(tiny64):
    """The harness hands a case's paraphrase prompts to the method: with 2 of them ``kn`` has its 3
    prompts; with 1 the case is refused, the model untouched."""
    def case(paraphrases):
        return Case(0, "handmade", [_request()], paraphrase_prompts=list(paraphrases),
                    neighborhood_prompts=["The Colosseum is located in the city of"])

    lm = tiny64
    state = [t.clone() for t in lm.hf_model.state_dict().values()]
    res = edit.evaluate("kn", [case(PARAPHRASES)], model=lm, hparams={"steps": 2}, fluency=False, progress=False)
    assert len(res.records) == 1 and "es" in res.records[0]
    with pytest.raises(TooFewPromptsError):
        edit.evaluate("kn", [case(PARAPHRASES[:1])], model=lm, hparams={"steps": 2}, fluency=False, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(state, lm.hf_model.state_dict().values()))
    assert _request(PARAPHRASES) == _request() and "paraphrases" not in _request(PARAPHRASES).to_dict()


def test_knowledge_neurons_json_roundtrip(tmp_path):
    kn = KnowledgeNeurons(["a b", "c d"], " x", [(0, 1)], torch.rand(2, 3, 4), [[(0, 1)], [(0, 1)]], {"steps": 20})
    back = KnowledgeNeurons.load(kn.save(tmp_path / "kn.json"))
    assert back.neurons == kn.neurons and back.coarse == kn.coarse and back.params == kn.params
    assert torch.allclose(back.per_prompt, kn.per_prompt)
    assert kn.without([(0, 1)]).neurons == []
    with pytest.raises(FileNotFoundError):
        KnowledgeNeurons.load(tmp_path / "missing.json")


def test_suppress_and_amplify_hooks(tiny64):
    lm = tiny64
    ids = torch.tensor([lm.encode(PROMPT)])
    seen = {}
    grab = (lm.hook_mlp_key(1), lambda a, hook: seen.setdefault("a", a.clone()))
    with torch.no_grad():
        with lm.hooks([grab]):
            lm.hf_model(input_ids=ids)
        clean = seen.pop("a")
        with suppress([(1, 3), (1, 5)], model=lm), lm.hooks([grab]):
            lm.hf_model(input_ids=ids)
        sup = seen.pop("a")
        with locate.amplify([(1, 3)], 2.0, model=lm, positions="all"), lm.hooks([grab]):
            lm.hf_model(input_ids=ids)
        amp = seen.pop("a")
    assert (sup[0, -1, [3, 5]] == 0).all() and torch.equal(sup[0, :-1], clean[0, :-1])
    assert torch.allclose(amp[..., 3], 2 * clean[..., 3])
    with pytest.raises(locate.LayerOutOfRangeError):
        with suppress([(99, 0)], model=lm):
            pass


def test_kn_edits_write_value_slots_and_revert_bit_exactly(tiny64):
    lm = tiny64
    kn = KnowledgeNeurons([PROMPT], " Paris", [(0, 2), (1, 7), (1, 9)], torch.zeros(1, 2, lm.d_mlp))
    before = [lm.mlp_out_weight(l).clone() for l in range(lm.n_layers)]
    E = lm.hf_model.get_output_embeddings().weight
    old, new = lm.target_ids(" Paris", PROMPT)[0], lm.target_ids(" Rome", PROMPT)[0]
    upd = kn_update(kn, " Rome", lambda1=1.0, lambda2=8.0, model=lm)
    with applied(lm, upd):
        diff = lm.mlp_out_weight(1) - before[1]
        assert torch.allclose(diff[:, 7], -E[old] + 8.0 * E[new])
        assert diff[:, [i for i in range(lm.d_mlp) if i not in (7, 9)]].abs().max() == 0
    era = kn_erase(kn, model=lm)
    with applied(lm, era):
        assert (lm.mlp_out_weight(1)[:, [7, 9]] == 0).all() and (lm.mlp_out_weight(0)[:, 2] == 0).all()
    assert all(torch.equal(lm.mlp_out_weight(l), before[l]) for l in range(lm.n_layers))


def test_bad_input_raises_before_running(tiny64):
    with pytest.raises(locate.EmptyTargetError):
        locate.neurons([PROMPT], " ", model=tiny64)
    with pytest.raises(locate.LayerOutOfRangeError):
        locate.neurons([PROMPT], " Paris", model=tiny64, layers=[5])
    with pytest.raises(TooFewPromptsError, match="has 2 prompt"):
        locate.neurons([PROMPT, *PARAPHRASES[:1]], " Paris", model=tiny64)


def test_suppressing_knowledge_neurons_beats_random_on_default_model(lm):
    prompts = [PROMPT, "The Eiffel Tower is in the city of"]  # two prompts: below the reference's 3
    kn = locate.neurons(prompts, " Paris", model=lm, steps=4, layers=list(range(0, 30, 5)),
                        threshold=0.1, share=1.0, min_prompts=2, adaptive=False, progress=False)
    assert len(kn) > 0
    v = locate.verify_neurons(kn, model=lm, n_random=3)
    assert v.suppress_rel < v.random_suppress_rel - 0.2


def test_heatmap(tiny64):
    import matplotlib

    matplotlib.use("Agg")
    from viz import neuron_heatmap

    kn = KnowledgeNeurons([PROMPT], " Paris", [(1, 0)], torch.rand(1, 2, tiny64.d_mlp))
    fig = neuron_heatmap(kn, top=5)
    assert len(fig.axes) >= 2
