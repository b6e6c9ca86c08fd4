"""PPA (plug-in LoRA modules behind a selector) and KE (a trained hypernetwork editor) on tiny models."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import edit
from edit import Request
from edit.training import TrainedEditorMissingError, toy_records
from locate.errors import InvalidHparamsError
from locate.testing import tiny_model

ppa_mod = importlib.import_module("edit.methods.ppa")
ke_mod = importlib.import_module("edit.methods.ke")
mend_mod = importlib.import_module("edit.methods.mend")

A = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
B = Request("My favourite {} is", "food", " pizza")
OUTSIDE = ["Water is made of hydrogen and", "The first month of the year is"]
TINY_PPA = dict(layers=[0], steps=30, lora_dropout=0.0)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)


@torch.no_grad()
def _logits(lm, prompts):
    return [lm.last_logits([p])[0].clone() for p in prompts]


def _state(lm):
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def _same_state(lm, state) -> bool:
    return all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), state))


@torch.no_grad()
def _selected(lm, module, prompt) -> torch.Tensor:
    """The module's selection (3) at each position of ``prompt`` (read at its key hook)."""
    got = {}

    def keep(x, hook):
        got["q"] = x.detach()
        return x
    with lm.hooks([(module.key_hook, keep)]):
        lm.forward(lm.pad([lm.encode(prompt)]))
    return module.selector.select(got["q"])[0]


# ====================================================================== PPA
def test_ppa_selector_is_a_sticky_nearest_neighbour_on_the_running_mean():
    """(2)-(3): the running mean of the activations is compared with the stored inputs, and once selected
    the module stays on. A selector on the last token alone would give [F, F, F] here (cosines 0, 0.89,
    -0.71), one on the running mean that does not stay on [F, T, F]."""
    sel = ppa_mod.PPASelector(torch.tensor([[1.0, 0.0]]), 0.9)
    q = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [-3.0, 3.0]]])  # running means (0,1), (1,0), (-1/3,1)
    assert torch.allclose(sel.similarity(q)[0], torch.tensor([0.0, 1.0, -1 / 10 ** 0.5]), atol=1e-6)
    assert sel.select(q)[0].tolist() == [False, True, True]


def test_ppa_edit_takes_and_out_of_scope_inputs_are_bit_identical(gpt2):
    lm = gpt2
    state, base = _state(lm), _logits(lm, [A.rendered] + OUTSIDE)
    e = edit.compute("ppa", [A], model=lm, **TINY_PPA)
    assert _same_state(lm, state) and len(e.hook_modules) == 1
    module = e.hook_modules[0]
    assert isinstance(module, ppa_mod.PPAModule) and len(module.selector) == 1
    assert e.metrics["efficacy"] == 1.0  # the target is the top-1 continuation at every token
    with edit.applied(lm, e):
        after = _logits(lm, [A.rendered] + OUTSIDE)
        on = _selected(lm, module, A.rendered)
        assert on[-1] and lm.tokenizer.decode([int(after[0].argmax())]) == A.target_new
        for p in OUTSIDE:
            assert not _selected(lm, module, p).any()
            assert module.selector.similarity(module.selector.keys[None]).min() > 0.99  # its own input
    assert not torch.equal(after[0], base[0])
    assert all(torch.equal(x, y) for x, y in zip(after[1:], base[1:]))  # rejected: the base model itself
    assert _same_state(lm, state)


def test_ppa_two_updates_each_route_to_their_own_module_and_revert_exactly(gpt2):
    lm = gpt2
    state = _state(lm)
    probes = [A.rendered, B.rendered] + OUTSIDE
    base = _logits(lm, probes)
    e1 = edit.compute("ppa", [A], model=lm, **TINY_PPA).apply(lm)
    only1 = _logits(lm, probes)
    e2 = edit.compute("ppa", [B], model=lm, **TINY_PPA).apply(lm)
    both = _logits(lm, probes)
    m1, m2 = e1.hook_modules[0], e2.hook_modules[0]
    # A selects module 1 only, B module 2 only; the outside prompts neither
    assert _selected(lm, m1, A.rendered)[-1] and not _selected(lm, m2, A.rendered).any()
    assert _selected(lm, m2, B.rendered)[-1] and not _selected(lm, m1, B.rendered).any()
    assert lm.tokenizer.decode([int(both[0].argmax())]) == A.target_new
    assert lm.tokenizer.decode([int(both[1].argmax())]) == B.target_new
    assert torch.equal(both[0], only1[0])  # module 2 leaves A's forward as module 1 made it, bit for bit
    assert not torch.equal(both[1], only1[1])
    assert all(torch.equal(x, y) for x, y in zip(both[2:], base[2:]))
    # reverting the newest unplugs its module only
    e2.revert(lm)
    assert all(torch.equal(x, y) for x, y in zip(_logits(lm, probes), only1))
    e1.revert(lm)
    assert all(torch.equal(x, y) for x, y in zip(_logits(lm, probes), base)) and _same_state(lm, state)


def test_ppa_save_load_and_hparams(gpt2, tmp_path):
    e = edit.compute("ppa", [A], model=gpt2, runtime=edit.Runtime(check_efficacy=False), **dict(TINY_PPA, steps=2))
    loaded = edit.Edit.load(e.save(tmp_path / "ppa.safetensors"), gpt2)
    assert loaded.id == e.id and loaded.hook_modules[0].selector.threshold == 0.9
    for bad in (dict(threshold=1.0), dict(threshold=-1), dict(rank=0), dict(lora_dropout=1.0), dict(key_layer=1)):
        with pytest.raises(InvalidHparamsError):
            edit.compute("ppa", [A], model=gpt2, **dict(TINY_PPA, **bad))
    assert not gpt2.applied_edits


# ====================================================================== KE
TINY_KE = dict(train_data="toy", train_steps=100, batch_size=2, lr=1e-2, lstm_hidden=32, condition_dim=32, hidden_dim=32,
               eval_every=50, checkpoint_every=50)
HELD_OUT = [Request("{} is located in the city of", s, t) for s, t in
            [("Big Ben", " Vienna"), ("The Colosseum", " Dublin"), ("Sydney Opera House", " Prague"),
             ("Mount Everest", " Athens")]]


def _nll(lm, requests) -> float:
    batch, rows, pos, gold = mend_mod._rows(lm, requests)
    with torch.no_grad():
        return float(mend_mod._target_nll(lm.forward(batch), rows, pos, gold))


def test_trained_ke_lowers_held_out_loss_more_than_gradient_steps_of_the_same_size(gpt2, cache):
    """On requests it never saw (new subjects and new targets), the trained editor's update (4) lowers the
    edit loss more than a plain gradient step of the same size (ΔW = −c ∇W with ‖c ∇W‖ = ‖ΔW_KE‖ for
    every edited weight: steepest descent at KE's step length), and the untrained editor does almost
    nothing (its gate A is a softmax over d_out rows: ≈ 1/d_out of the gradient)."""
    hp = edit.get_method("ke").make_hparams(TINY_KE)
    ke_mod.train_ke(gpt2, toy_records(), hp, progress=False)
    net, _ = ke_mod.load_editor(gpt2, hp)
    fresh = ke_mod.KEEditor(net.sites, ke_mod._embedding(gpt2), hp)
    gains_ke, gains_grad, gains_fresh = [], [], []
    for r in HELD_OUT:
        base = _nll(gpt2, [r])
        e = edit.compute("ke", [r], model=gpt2, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
        with edit.applied(gpt2, e):
            gains_ke.append(base - _nll(gpt2, [r]))
        grads = mend_mod.gradient_factors(gpt2, [r], net.sites)
        with torch.no_grad():
            learned = net.factors(ke_mod.condition_batch(gpt2, [r]), grads)
            untrained = fresh.factors(ke_mod.condition_batch(gpt2, [r]), grads)
        plain = {}
        for s, (u, d) in grads.items():
            left, right = learned[s]
            c = (left.T @ right).norm() / (d.T @ u).norm()
            plain[s] = (-c * d, u)
        with torch.no_grad(), gpt2.hooks(mend_mod._edited_hooks(plain)):
            gains_grad.append(base - _nll(gpt2, [r]))
        with torch.no_grad(), gpt2.hooks(mend_mod._edited_hooks(untrained)):
            gains_fresh.append(base - _nll(gpt2, [r]))
    assert all(k > g for k, g in zip(gains_ke, gains_grad)), (gains_ke, gains_grad)
    assert sum(gains_ke) / 4 > sum(gains_grad) / 4 + 0.05, (gains_ke, gains_grad)  # ≈ 1.17 against ≈ 1.08
    assert all(abs(f) < 0.05 for f in gains_fresh) and min(gains_ke) > 0.8, (gains_fresh, gains_ke)

    # (4) as exact low-rank factors: in the last block only the position predicting the one-token target
    # carries a gradient, so each of its deltas has rank 2 (the gated gradient term and the shift B)
    e = edit.compute("ke", HELD_OUT[:1], model=gpt2, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    assert len(e.deltas) == 4 and e.layers == [0, 1]
    assert all(d.rank == 2 for d in e.deltas if d.layer == 1)


def test_missing_ke_editor_fails_with_the_training_command(gpt2, cache, tmp_path):
    data = tmp_path / "facts-train.json"
    data.write_text(json.dumps([{"prompt": r.request.rendered, "subject": r.request.subject,
                                 "target_new": r.request.target_new.strip(), "ground_truth": "Paris",
                                 "rephrase_prompt": r.paraphrases[0], "locality_prompt": r.locality[0][0],
                                 "locality_ground_truth": r.locality[0][1].strip()} for r in toy_records()]))
    state = _state(gpt2)
    with pytest.raises(TrainedEditorMissingError) as err:
        edit.compute("ke", HELD_OUT[:1], model=gpt2, train_data=str(data), hidden_dim=4)
    cmd = f"locate-edit train ke --data {data} --model tiny-gpt2 --hparam hidden_dim=4"
    assert err.value.command == cmd and str(err.value).endswith(cmd)
    assert _same_state(gpt2, state) and not gpt2.applied_edits
