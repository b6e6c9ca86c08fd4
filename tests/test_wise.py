"""WISE (issue 20) on the tiny random models: a side copy of one FFN value matrix, routed by its
activation, edited in random-mask shards that are TIES-merged.

* where routing says "main memory" the outputs are bit-identical to the base model; where it says
  "side memory" the edit takes;
* each shard changes only the entries of its own random mask (EasyEdit's weight decay, an option,
  would change the others too);
* TIES-merging (EasyEdit's default merge) averages only the entries that agree with the elected sign;
* the threshold is act_ratio times the smallest in-scope activation; a later call's shards draw new masks.
"""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Request
from edit.methods.wise import (WISEHparams, WiseMemory, margin_loss, sequence_scores, shard_mask, ties_merge, wise,
                               wise_layer)
from locate.errors import InvalidHparamsError, LayerOutOfRangeError
from locate.hooks import capture
from locate.testing import tiny_model

EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome")
EINSTEIN = Request("{} worked in the field of", "Albert Einstein", " cooking")
UNRELATED = ["The capital city in Japan is", "My favourite food is", "Water boils at a high",
             "The Eiffel Tower was built in"]
CHEAP = {"n_iter": 10, "context_lengths": ()}


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.hf_model.state_dict().items()}


def _same_state(lm, before) -> bool:
    now = lm.hf_model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@torch.no_grad()
def _routes(lm, m: WiseMemory, prompts) -> list[int]:
    """The memory routing picks for each prompt alone (−1: main), from the base model's key and output
    at the edited layer (the edit acts after both)."""
    out = []
    for p in prompts:
        with capture(lm, [m.key_hook, m.out_hook]) as got:
            lm.forward(lm.encode_batch([p]))
        out.append(int(m.route(got[m.key_hook], got[m.out_hook])[0][0]))
    return out


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)


# ====================================================================== routing
def test_main_memory_is_bit_identical_and_side_memory_takes(tiny):
    lm = tiny
    before = _state(lm)
    prompts = UNRELATED + [EIFFEL.rendered]
    base = [lm.last_logits([p])[0].clone() for p in prompts]
    e = wise(EIFFEL, model=lm, layer=0, **CHEAP)
    assert _same_state(lm, before) and not e.is_applied and e.kinds == ["hook"] and e.layers == [0]
    (m,) = e.hook_modules
    assert isinstance(m, WiseMemory) and m.deltas.shape == (1, lm.d_model, lm.d_mlp) and m.current
    routes = _routes(lm, m, prompts)
    assert routes[-1] == 0, "the edited prompt must route to the side memory"
    assert -1 in routes[:-1], "some unrelated prompt must route to the main memory on this model"
    with edit.applied(lm, e):
        after = [lm.last_logits([p])[0].clone() for p in prompts]
        batched = lm.forward(lm.encode_batch(prompts))
    for p, r, b, a in zip(prompts, routes, base, after):
        if r < 0:
            assert torch.equal(a, b), f"{p!r} routes to the main memory but its logits changed"
        else:
            assert not torch.equal(a, b)
    # routing is per row of a batch: the main-memory rows of a batch are bit-identical too
    with torch.no_grad():
        base_batched = lm.forward(lm.encode_batch(prompts))
    for i, r in enumerate(routes):
        if r < 0:
            assert torch.equal(batched[i], base_batched[i])
    first = lm.target_ids(EIFFEL.target_new, EIFFEL.rendered)[0]
    assert int(after[-1].argmax()) == first and e.metrics["efficacy"] == 1.0
    assert _same_state(lm, before)


def test_threshold_is_act_ratio_times_the_smallest_in_scope_activation(gpt2):
    e = wise([EIFFEL, EINSTEIN], model=gpt2, layer=0, act_ratio=0.5, **CHEAP)
    acts = [r["in_scope_activation"] for r in e.metrics["per_request"]]
    (m,) = e.hook_modules
    assert m.thresholds.tolist() == pytest.approx([0.5 * min(acts)])
    assert acts[0] != acts[1]  # the smallest, not the mean or the last


def test_routing_score_is_the_mean_over_tokens_and_the_max_beyond_100():
    scores = torch.tensor([[1.0, 2.0, 6.0]])
    assert sequence_scores(scores).tolist() == [3.0]
    assert sequence_scores(scores, torch.tensor([[True, True, False]])).tolist() == [1.5]
    long = torch.zeros(1, 101)
    long[0, 7] = 5.0
    assert sequence_scores(long).tolist() == [5.0]  # not 5/101


def test_margin_loss_is_the_sum_of_the_means_of_the_positive_parts():
    # α, β, γ = 5, 20, 10; in-scope 12 and 30, out-of-scope 8:
    # [8 − 12 + 10]₊, [8 − 30 + 10]₊ → mean 6; [8 − 5]₊ = 3; [20 − 12]₊, [20 − 30]₊ → 8
    loss = margin_loss(torch.tensor([12.0, 30.0]), torch.tensor(8.0), (5.0, 20.0, 10.0))
    assert float(loss) == pytest.approx(17.0)


# ====================================================================== shards and merge
def test_each_shard_changes_only_its_masked_subspace(gpt2):
    e = wise([EIFFEL, EINSTEIN], model=gpt2, layer=0, shard_size=1, merge_freq=4, **CHEAP)
    (m,) = e.hook_modules
    assert m.deltas.shape[0] == 2 and not m.current and m.n_shards == 2
    for i, d in enumerate(m.deltas):
        mask = shard_mask(d.shape, 0.2, 0, i)
        assert 0.15 < float(mask.float().mean()) < 0.25  # EasyEdit's mask_ratio 0.2
        assert bool((d[~mask] == 0).all()), f"shard {i} changed entries outside its mask"
        assert int((d[mask] != 0).sum()) > 0
        assert float(d.abs().max()) <= 1.0  # norm_constraint: W_v' within 1 of W_v
    masks = [shard_mask(m.deltas.shape[1:], 0.2, 0, i) for i in range(2)]
    assert not torch.equal(masks[0], masks[1])
    # EasyEdit's SGD decays every entry of W_v', outside the subspace too (the option)
    leaky = wise(EIFFEL, model=gpt2, layer=0, decay_outside_mask=True, **CHEAP).hook_modules[0].deltas[0]
    assert int((leaky[~masks[0]] != 0).sum()) > 0


def test_ties_merge_averages_the_entries_that_agree_with_the_elected_sign():
    d1 = torch.tensor([2.0, -1.0, 0.0, 0.0])
    d2 = torch.tensor([4.0, 3.0, 0.0, 1.0])
    # weighted sum (w = ½) [3, 1, 0, ½] elects + everywhere; −1 disagrees and is dropped, zeros never count
    assert ties_merge([d1, d2], [0.5, 0.5], 1.0).tolist() == [3.0, 3.0, 0.0, 1.0]  # a plain mean: [3, 1, 0, ½]
    # trimming keeps the ⌊ρ·n⌋ largest magnitudes of each task vector
    assert ties_merge([torch.tensor([4.0, -1.0, 3.0, 0.5])], [1.0], 0.5).tolist() == [4.0, 0.0, 3.0, 0.0]


def test_a_full_merge_group_becomes_one_ties_merged_memory(gpt2):
    sharded = wise([EIFFEL, EINSTEIN], model=gpt2, layer=0, shard_size=1, merge_freq=4, **CHEAP)
    merged = wise([EIFFEL, EINSTEIN], model=gpt2, layer=0, shard_size=1, merge_freq=2, **CHEAP)
    (s,), (m,) = sharded.hook_modules, merged.hook_modules
    assert m.deltas.shape[0] == 1 and not m.current
    expect = ties_merge(list(s.deltas), [0.5, 0.5], 0.53)
    assert torch.allclose(m.deltas[0], expect)
    assert not torch.allclose(expect, s.deltas.mean(0))  # the merge is not a plain average
    assert m.thresholds.tolist() == pytest.approx([min(s.thresholds.tolist())])


def test_a_later_call_draws_new_masks_and_stacks(gpt2):
    lm = gpt2
    first = wise(EIFFEL, model=lm, layer=0, **CHEAP)
    with edit.applied(lm, first):
        second = wise(EINSTEIN, model=lm, layer=0, **CHEAP)
    assert second.metrics["first_shard"] == 1 and second.parents == [first.id]
    d = second.hook_modules[0].deltas[0]
    assert bool((d[~shard_mask(d.shape, 0.2, 0, 1)] == 0).all())
    assert int((d[~shard_mask(d.shape, 0.2, 0, 0)] != 0).sum()) > 0  # not the first call's subspace
    with edit.applied(lm, first, second):
        top = lm.last_logits([EINSTEIN.rendered])[0].argmax()
    assert int(top) == lm.target_ids(EINSTEIN.target_new, EINSTEIN.rendered)[0]


# ====================================================================== defaults and refusals
def test_default_layer_is_easyedits_layer_scaled_to_the_depth(tokenizer, gpt2):
    assert wise_layer(gpt2, None)[0] == 1  # ⌊2 · 27/32⌋
    deep = tiny_model("llama", tokenizer, n_layers=8)
    assert wise_layer(deep, None)[0] == 6  # ⌊8 · 27/32⌋
    assert wise_layer(deep, 3)[0] == 3
    hp = WISEHparams()
    assert (hp.mask_ratio, hp.edit_lr, hp.n_iter, hp.act_margin, hp.act_ratio, hp.shard_size, hp.merge_freq,
            hp.densities) == (0.2, 1.0, 70, (5.0, 20.0, 10.0), 0.88, 500, 1000, 0.53)


def test_bad_hyperparameters_are_refused(gpt2):
    before = _state(gpt2)
    for bad in ({"merge_freq": 3, "shard_size": 2}, {"mask_ratio": 0.0}, {"act_margin": (1.0, 2.0)},
                {"routing": "cosine"}, {"n_iter": 0}, {"densities": 1.5}):
        with pytest.raises(InvalidHparamsError):
            wise(EIFFEL, model=gpt2, layer=0, **bad)
    with pytest.raises(LayerOutOfRangeError):
        wise(EIFFEL, model=gpt2, layer=5, **CHEAP)
    assert _same_state(gpt2, before) and not gpt2.applied_edits


def test_paper_routing_scores_the_side_memory_without_the_activation(gpt2):
    e = wise(EIFFEL, model=gpt2, layer=0, routing="paper", **CHEAP)
    (m,) = e.hook_modules
    assert m.act is None
    with torch.no_grad(), capture(gpt2, [m.key_hook, m.out_hook]) as got:
        gpt2.forward(gpt2.encode_batch([EIFFEL.rendered]))
    a = got[m.key_hook]
    expect = torch.linalg.vector_norm(a.float() @ m.deltas[0].T, dim=-1).mean()  # mean_t ‖Δ a_t‖
    assert float(m.route(a, got[m.out_hook])[1][0, 0]) == pytest.approx(float(expect), rel=1e-5)
