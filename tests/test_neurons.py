"""Knowledge neurons (locate/neurons.py), KN edits (edit/kn.py) and the heatmap (viz/neurons.py)."""

from __future__ import annotations

import pytest
import torch

import locate
from edit import applied, kn_erase, kn_update
from locate.neurons import KnowledgeNeurons, attribution, attribution_loop, refine, suppress

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


def test_refine_threshold_and_share():
    per = torch.zeros(3, 2, 4)
    per[:, 0, 0] = 1.0  # top in every prompt
    per[0, 1, 2] = per[1, 1, 2] = 0.5  # above 0.2*max in 2 of 3 prompts
    per[2, 1, 3] = 0.1  # below threshold
    refined, coarse = refine(per, threshold=0.2, share=0.6)
    assert refined == [(0, 0), (1, 2)]
    assert refine(per, threshold=0.2, share=0.7)[0] == [(0, 0)]
    assert coarse[2] == [(0, 0)]


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


def test_suppressing_knowledge_neurons_beats_random_on_default_model(lm):
    prompts = [PROMPT, "The Eiffel Tower is in the city of"]
    kn = locate.neurons(prompts, " Paris", model=lm, steps=4, layers=list(range(0, 30, 5)),
                        threshold=0.1, share=1.0, progress=False)
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
