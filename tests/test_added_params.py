"""Editors that add parameters and keep the weights (issue 20): LoRA, T-Patcher and MELO on the tiny
random models, each with its defining property:

* LoRA: the adapters change the outputs only through their hooks (s·B A x at the MLP output, s = α/r),
  the weights never change, and reverting is bit-exact; the merged form is the same change;
* T-Patcher: each edit adds one neuron to the last MLP; it stays inactive (activation exactly 0, logits
  bit-identical) on the out-of-scope prompts of the test, and the edit takes in scope;
* MELO: a routed LoRA block; where routing says "not an edit" the outputs are bit-identical.
"""

from __future__ import annotations

import math

import pytest
import torch

import edit
from edit import Edit, Request
from edit.methods.lora import LoRAAdapter, LoRAHparams, init_factors, lora
from locate.errors import InvalidHparamsError

EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome")
EINSTEIN = Request("{} worked in the field of", "Albert Einstein", " cooking")
UNRELATED = ["The capital city in Japan is", "My favourite food is", "Water boils at a high",
             "The Eiffel Tower was built in"]


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.hf_model.state_dict().items()}


def _same_state(lm, before) -> bool:
    now = lm.hf_model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@torch.no_grad()
def _logits(lm, prompts):
    return lm.forward(lm.encode_batch(prompts))


def _first(lm, r: Request) -> int:
    return lm.target_ids(r.target_new, r.rendered)[0]


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("gpt2", tokenizer)


@pytest.fixture(scope="module")
def llama(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("llama", tokenizer)


# ============================================================================================== LoRA
def test_lora_changes_outputs_only_through_its_hooks_and_reverts_exactly(tiny):
    lm = tiny
    before, base = _state(lm), _logits(lm, UNRELATED + [EIFFEL.rendered])
    e = lora(EIFFEL, model=lm, layer=0, steps=20)
    assert _same_state(lm, before) and not e.is_applied and e.kinds == ["hook"] and e.layers == [0]
    (a,) = e.hook_modules
    assert isinstance(a, LoRAAdapter) and a.A.shape == (8, lm.d_mlp) and a.B.shape == (lm.d_model, 8)
    assert a.scale == 4.0  # EasyEdit's α / r = 32 / 8
    assert e.metrics["efficacy"] == 1.0 and e.loss_trace[-1] < e.loss_trace[0]

    # the same change made by hand: a hook adding 4·B A x at layer 0's MLP output, x the MLP key
    keys = {}

    def read(x, hook):
        keys["x"] = x
        return x

    def add(y, hook):
        return y + ((keys["x"].to(a.A.dtype) @ a.A.T.to(y.device)) @ a.B.T.to(y.device) * 4.0).to(y.dtype)

    with torch.no_grad(), lm.hooks([(lm.hook_mlp_key(0), read), (lm.hook_mlp_out(0), add)]):
        by_hand = _logits(lm, UNRELATED + [EIFFEL.rendered])
    with edit.applied(lm, e):
        assert _same_state(lm, before)  # LoRA adds hooks, never changes a weight
        edited = _logits(lm, UNRELATED + [EIFFEL.rendered])
        assert torch.equal(edited, by_hand)
        assert int(lm.last_logits([EIFFEL.rendered])[0].argmax()) == _first(lm, EIFFEL)
    assert not torch.equal(edited, base)
    assert _same_state(lm, before) and torch.equal(_logits(lm, UNRELATED + [EIFFEL.rendered]), base)


def test_lora_initialisation_and_defaults_are_easyedits():
    hp = LoRAHparams()
    assert (hp.rank, hp.lora_alpha, hp.lr, hp.steps, hp.lora_dropout, hp.batch_size) == (8, 32.0, 5e-3, 70, 0.1, 1)
    g = torch.Generator().manual_seed(0)
    A, B = init_factors(256, 64, 8, 256, g, torch.float32)
    bound = 1 / math.sqrt(256)  # Kaiming uniform with a = √5 (PEFT), not AdaLoRA's N(0, 0.02)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound and A.std() > 0.5 * bound
    assert torch.equal(B, torch.zeros(64, 8))  # the edit starts as the identity


def test_lora_zero_steps_is_the_identity_and_dropout_is_seeded(gpt2):
    lm = gpt2
    base = _logits(lm, UNRELATED)
    with pytest.raises(InvalidHparamsError):
        lora(EIFFEL, model=lm, layer=0, steps=0)
    e = lora(EIFFEL, model=lm, layer=0, steps=1, lr=1e-30, runtime=edit.Runtime(check_efficacy=False))
    with edit.applied(lm, e):  # B ≈ 0 after one vanishing step: the change is below round-off here
        assert torch.allclose(_logits(lm, UNRELATED), base, atol=1e-5)
    one = lora(EIFFEL, model=lm, layer=0, steps=3, runtime=edit.Runtime(seed=1, check_efficacy=False))
    same = lora(EIFFEL, model=lm, layer=0, steps=3, runtime=edit.Runtime(seed=1, check_efficacy=False))
    other = lora(EIFFEL, model=lm, layer=0, steps=3, runtime=edit.Runtime(seed=2, check_efficacy=False))
    assert one.id == same.id and one.id != other.id
    # no dropout in the finished edit: two forwards agree
    with edit.applied(lm, one):
        assert torch.equal(_logits(lm, UNRELATED), _logits(lm, UNRELATED))


def test_lora_dropout_is_used_while_training(gpt2):
    lm = gpt2
    rt = edit.Runtime(check_efficacy=False)
    with_drop = lora(EIFFEL, model=lm, layer=0, steps=3, runtime=rt)
    without = lora(EIFFEL, model=lm, layer=0, steps=3, lora_dropout=0.0, runtime=rt)
    (a,), (b,) = with_drop.hook_modules, without.hook_modules
    assert not torch.equal(a.B, b.B)  # same start (same seed), different training paths


def test_lora_merged_is_the_same_change_as_a_low_rank_delta(llama):
    lm = llama
    rt = edit.Runtime(check_efficacy=False)
    hooked = lora(EIFFEL, model=lm, layer=[0, 1], steps=5, runtime=rt)
    merged = lora(EIFFEL, model=lm, layer=[0, 1], steps=5, merge=True, runtime=rt)
    assert merged.kinds == ["weight"] and [d.rank for d in merged.deltas] == [8, 8] and merged.layers == [0, 1]
    for d, a in zip(merged.deltas, hooked.hook_modules):
        assert torch.allclose(d.matrix(), a.scale * (a.B @ a.A).cpu(), atol=1e-7)
    with edit.applied(lm, hooked):
        h = _logits(lm, UNRELATED)
    with edit.applied(lm, merged):
        m = _logits(lm, UNRELATED)
    assert torch.allclose(h, m, atol=1e-4)


def test_lora_hparams_are_checked(gpt2):
    for bad in ({"rank": 0}, {"lora_dropout": 1.0}, {"lr": -1.0}, {"merge": "yes"}, {"batch_size": 1.5}):
        with pytest.raises(InvalidHparamsError):
            lora(EIFFEL, model=gpt2, layer=0, **bad)
    m = edit.get_method("lora")
    assert m.batched and m.layers == 1 and m.smoke == {"steps": 5}


def test_lora_save_load_round_trip(gpt2, tmp_path):
    lm = gpt2
    e = lora([EIFFEL, EINSTEIN], model=lm, layer=0, steps=5, batch_size=2, runtime=edit.Runtime(check_efficacy=False))
    loaded = Edit.load(e.save(tmp_path / "lora.safetensors"), lm)
    assert loaded.id == e.id
    with edit.applied(lm, e):
        a = _logits(lm, UNRELATED)
    with edit.applied(lm, loaded):
        assert torch.equal(_logits(lm, UNRELATED), a)


# ============================================================================================== T-Patcher
from edit.methods.t_patcher import TPatcherHparams, TPatcherNeurons, label_smoothed_nll, t_patcher  # noqa: E402
from locate.hooks import capture  # noqa: E402

PIANO = Request("The instrument {} played was the", "Miles Davis", " piano")
# out of scope on the tiny models: no shared subject and no final " of" (on these random models the FFN input
# of a token barely depends on its context, so a prompt ending in " of" looks like EIFFEL's edit position)
OUT_OF_SCOPE = ["The capital city in Japan is", "My favourite food is", "Water boils at a high", "She plays the piano every"]
TP = {"max_steps": 300, "check_every": 1000, "memory_size": 4000}  # no early stop; 300 steps converge here


@torch.no_grad()
def _patch_pre_activations(lm, patch: TPatcherNeurons, prompts):
    with capture(lm, patch.in_hook) as got:
        batch = lm.encode_batch(prompts)
        lm.forward(batch)
    return patch.pre_activation(got[patch.in_hook]), batch


def test_t_patcher_neuron_is_off_out_of_scope_and_the_edit_takes(tiny):
    lm = tiny
    before, base = _state(lm), _logits(lm, OUT_OF_SCOPE)
    mixed = lm.encode_batch(OUT_OF_SCOPE + [EIFFEL.rendered])  # right-padded to the edited prompt's length
    real = mixed.attention_mask[:-1].bool()
    base_mixed = _logits(lm, OUT_OF_SCOPE + [EIFFEL.rendered])
    e = t_patcher(EIFFEL, model=lm, **TP)
    assert _same_state(lm, before) and not e.is_applied and e.kinds == ["hook"] and e.layers == [lm.n_layers - 1]
    (p,) = e.hook_modules
    assert isinstance(p, TPatcherNeurons) and len(p) == 1 and p.in_hook == f"blocks.{lm.n_layers - 1}.mlp.hook_in"
    assert e.metrics["efficacy"] == 1.0 and e.metrics["edit_activation_min"] > 0 and e.metrics["memory_size"] == 4000
    a, batch = _patch_pre_activations(lm, p, OUT_OF_SCOPE)
    assert bool((a[batch.attention_mask.bool()] <= 0).all())  # off at every real position of every prompt
    with edit.applied(lm, e):
        assert _same_state(lm, before)
        assert torch.equal(_logits(lm, OUT_OF_SCOPE), base)  # relu(a) = 0: bit-identical
        assert int(lm.last_logits([EIFFEL.rendered])[0].argmax()) == _first(lm, EIFFEL)
        with torch.no_grad():
            out = lm.forward(mixed)
        assert torch.equal(out[:-1][real], base_mixed[:-1][real]) and int(out[-1, mixed.last[-1]].argmax()) == _first(lm, EIFFEL)
    assert torch.equal(_logits(lm, OUT_OF_SCOPE), base)


def test_t_patcher_initialisation_is_the_references(gpt2):
    """k = q/‖q‖², b = 0 (so the patch's pre-activation at the prompt's last token is 1) and v = 10·v₀,
    v₀ ~ N(0, I) from the run's seed; after one vanishing step they are unchanged."""
    lm = gpt2
    rt = edit.Runtime(seed=3, check_efficacy=False)
    e = t_patcher(EIFFEL, model=lm, max_steps=1, lr=1e-12, memory_size=256, runtime=rt)
    (p,) = e.hook_modules
    a, batch = _patch_pre_activations(lm, p, [EIFFEL.rendered])
    assert float(a[0, batch.last[0], 0]) == pytest.approx(1.0, abs=1e-6)
    v0 = torch.randn(1, lm.d_model, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(p.values, 10 * v0, atol=1e-6) and float(p.biases[0]) == pytest.approx(0.0, abs=1e-9)
    assert p.queries.shape == (len(lm.target_ids(" Rome", EIFFEL.rendered)), lm.d_model)


def test_t_patcher_label_smoothed_loss_is_fairseqs():
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.0]]), -1)
    gold = torch.tensor([0, 3])
    eps, V = 0.1, 4
    nll = -(logp[0, 0] + logp[1, 3])
    smooth = -logp.sum()
    expected = ((1 - eps - eps / (V - 1)) * nll + eps / (V - 1) * smooth) / 2
    assert float(label_smoothed_nll(logp, gold, eps)) == pytest.approx(float(expected), rel=1e-6)
    assert float(label_smoothed_nll(logp, gold, 0.0)) == pytest.approx(float(nll / 2), rel=1e-6)
    assert float(label_smoothed_nll(logp, gold, eps)) != pytest.approx(float(nll / 2), rel=1e-3)


def test_t_patcher_sequential_patches_keep_off_the_earlier_edit(gpt2):
    lm = gpt2
    rt = edit.Runtime()
    first = t_patcher(EIFFEL, model=lm, runtime=rt, **TP)
    with edit.applied(lm, first):
        second = t_patcher(PIANO, model=lm, runtime=rt, **TP)
        (p1,), (p2,) = first.hook_modules, second.hook_modules
        assert second.parents == [first.id]
        assert second.metrics["memory_size"] == 4000 + p1.queries.shape[0]  # the earlier edit's positions joined the memory
        assert bool((p2.pre_activation(p1.queries) < 0).all())  # the new neuron stays off the earlier edit
        with edit.applied(lm, second):
            assert int(lm.last_logits([EIFFEL.rendered])[0].argmax()) == _first(lm, EIFFEL)
            assert int(lm.last_logits([PIANO.rendered])[0].argmax()) == _first(lm, PIANO)


def test_t_patcher_early_stop_and_schedule(gpt2):
    lm = gpt2
    e = t_patcher(EIFFEL, model=lm, max_steps=120, check_every=5, start_check=0, memory_size=1000,
                  runtime=edit.Runtime(check_efficacy=False))
    checks = e.metrics["checks"]
    assert [c["step"] for c in checks] == list(range(5, 5 * len(checks) + 1, 5))
    taken = [c["memory_loss"] for c in checks if c["takes"]]
    if e.metrics["stopped_early_at"] is not None:  # stopped at the first check without a new best (by 0.001)
        assert e.metrics["stopped_early_at"] == checks[-1]["step"] == e.metrics["steps"] and checks[-1]["takes"]
        assert taken[-1] >= min(taken[:-1]) - 0.001
    lrs = [c["lr"] for c in checks]
    assert lrs[0] <= 1e-2 and all(b in (a, a * 0.5) for a, b in zip(lrs, lrs[1:]))  # plateau halving only


def test_t_patcher_hparams_and_registration(gpt2):
    for bad in ({"max_steps": 0}, {"layer": 1.0}, {"label_smoothing": 1.0}, {"memory_window": 0}, {"lr": float("nan")}):
        with pytest.raises(InvalidHparamsError):
            t_patcher(EIFFEL, model=gpt2, **bad)
    m = edit.get_method("t-patcher")
    assert m.batched and m.layers is None
    hp = TPatcherHparams()
    assert (hp.lr, hp.act_coef, hp.memory_coef, hp.memory_margin1, hp.memory_margin2, hp.act_top_k, hp.memory_top_k,
            hp.amplify, hp.memory_size) == (1e-2, 1.0, 5.0, 3.0, -3.0, 5, 1000, 10.0, 40000)


# ============================================================================================== MELO
from edit.methods.melo import MELOHparams, MeloBlock, melo  # noqa: E402


def test_melo_is_bit_identical_where_routing_says_not_an_edit(tiny):
    lm = tiny
    before, base = _state(lm), _logits(lm, OUT_OF_SCOPE)
    mixed = lm.encode_batch(OUT_OF_SCOPE + [EIFFEL.rendered])
    base_mixed = _logits(lm, OUT_OF_SCOPE + [EIFFEL.rendered])
    e = melo(EIFFEL, model=lm, layer=[0, 1])
    assert _same_state(lm, before) and e.kinds == ["hook"] and e.layers == [0, 1]
    (b,) = e.hook_modules
    assert isinstance(b, MeloBlock) and b.key_hook == "blocks.0.mlp.hook_pre" and len(b.router) == 1
    assert [a.rank for a in b.adapters] == [2, 2] and b.adapters[0].scale == 350.0  # MELO: r_b = 2, s = num_block
    with torch.no_grad(), capture(lm, b.key_hook) as got:
        lm.forward(lm.encode_batch(OUT_OF_SCOPE))
    assert not bool(b.route(got[b.key_hook]).any())  # routing: no position of these prompts is an edit
    with edit.applied(lm, e):
        assert _same_state(lm, before)
        assert torch.equal(_logits(lm, OUT_OF_SCOPE), base)  # the very tensors: bit-identical
        assert int(lm.last_logits([EIFFEL.rendered])[0].argmax()) == _first(lm, EIFFEL)
        with torch.no_grad():
            out = lm.forward(mixed)
        real = mixed.attention_mask[:-1].bool()
        assert torch.equal(out[:-1][real], base_mixed[:-1][real]) and int(out[-1, mixed.last[-1]].argmax()) == _first(lm, EIFFEL)
    assert torch.equal(_logits(lm, OUT_OF_SCOPE), base)


def test_melo_block_is_the_references_slice_of_a_big_lora(gpt2):
    """Initialised as r_b = 2 ranks of a rank-700 LoRA (A ~ U(±1/√700), B = 0), scaled by 350, and where
    routed it adds exactly 350·B A x at the adapted layers' MLP outputs."""
    lm = gpt2
    hp = MELOHparams()
    assert (hp.rank_per_block, hp.num_block, hp.init_radius, hp.n_iter, hp.edit_lr, hp.lr_step, hp.lr_gamma,
            hp.expand) == (2, 350, 0.5, 50, 1e-3, 20, 0.5, "moving_average")
    e0 = melo(EIFFEL, model=lm, layer=0, n_iter=1, edit_lr=1e-30, runtime=edit.Runtime(check_efficacy=False))
    (a0,) = e0.hook_modules[0].adapters
    bound = 1 / math.sqrt(700)
    assert a0.A.abs().max() <= bound and a0.A.abs().max() > 0.9 * bound and a0.B.abs().max() < 1e-25
    e = melo(EIFFEL, model=lm, layer=0, n_iter=10, runtime=edit.Runtime(check_efficacy=False))
    (b,) = e.hook_modules
    (a,) = b.adapters
    saved = {}

    def route(q, hook):
        saved["on"] = b.route(q)
        return q

    def read(x, hook):
        saved["x"] = x
        return x

    def add(y, hook):
        d = (saved["x"] @ a.A.T) @ a.B.T * 350.0
        return torch.where(saved["on"][..., None], y + d, y)

    with torch.no_grad(), lm.hooks([(b.key_hook, route), (lm.hook_mlp_key(0), read), (lm.hook_mlp_out(0), add)]):
        by_hand = _logits(lm, [EIFFEL.rendered])
    assert bool(saved["on"].any())
    with edit.applied(lm, e):
        assert torch.equal(_logits(lm, [EIFFEL.rendered]), by_hand)


def test_melo_sequential_conflict_gets_half_the_distance(gpt2):
    lm = gpt2
    big = 100.0  # wider than the key distances here, so the second key is within reach of the first ball
    first = melo(EIFFEL, model=lm, layer=1, init_radius=big, n_iter=10)
    with edit.applied(lm, first):
        second = melo(PIANO, model=lm, layer=1, init_radius=big, n_iter=10)
        (b1,), (b2,) = first.hook_modules, second.hook_modules
        d = float((b1.router.keys[0].double() - b2.router.keys[0].double()).norm())
        assert 0 < d <= 2 * big and second.metrics["events"] == ["conflict_older"] and second.metrics["n_older_keys"] == 1
        assert float(b2.router.radii[0]) == pytest.approx(min(big, d / 2), rel=1e-6)
    with pytest.raises(InvalidHparamsError):
        melo(EIFFEL, model=lm, layer=0, key_layer=1)  # the key must be read before the block acts
    with pytest.raises(InvalidHparamsError):
        melo(EIFFEL, model=lm, layer=0, expand="grow")
    m = edit.get_method("melo")
    assert m.batched and m.layers == 2 and m.smoke == {"n_iter": 5}
