"""Editable Training (Sinitsin et al. 2020) on tiny models: meta-training makes k gradient steps edit better
than k plain steps on the base model; an Edit is exactly meta-delta + inner-step delta on the named weights;
revert returns the base model bit for bit; a missing artefact fails with its training command."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import edit
from edit.training import TrainedEditorMissingError, toy_records
from locate.testing import tiny_model

et = importlib.import_module("edit.methods.editable_training")
mend_mod = importlib.import_module("edit.methods.mend")

TINY = dict(train_data="toy", train_steps=30, batch_size=2, lr=1e-4, lr_lr=5e-2, eval_every=15, checkpoint_every=15)
#    (edit_lr is the reference's 1e-2; the tiny random models' loss saturates about 1.2 nats below its start,
#    so a larger base step would leave nothing to learn)
HELD_OUT = [edit.Request("{} is located in the city of", s, t) for s, t in
            [("Big Ben", " Vienna"), ("The Colosseum", " Dublin"), ("Sydney Opera House", " Prague"),
             ("Mount Everest", " Athens")]]
NO_CHECK = edit.Runtime(check_efficacy=False)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)


@pytest.fixture(scope="module")
def trained(gpt2, cache):
    hp = edit.get_method("editable-training").make_hparams(TINY)
    art = et.train_editable_training(gpt2, toy_records(), hp, progress=False)
    return hp, art


def _loss(lm, requests) -> float:
    batch, rows, pos, gold = mend_mod._rows(lm, requests)
    with torch.no_grad():
        return float(mend_mod._target_nll(lm.forward(batch), rows, pos, gold))


def _state(lm):
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def _same_state(lm, state) -> bool:
    return all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), state))


def _plain_sgd(lm, r, sites, lr, k) -> edit.Edit:
    """k steps of plain SGD at step size ``lr`` on the base model's edited weights, as an Edit."""
    zeros = [torch.zeros(s.d_out, s.d_in) for s in sites]
    inner = et.inner_steps(lm, [r], sites, zeros, torch.full((len(sites),), lr), k, order="none")
    return edit.Edit(method="sgd", requests=[r], interventions=et.weight_deltas(lm, sites, inner),
                     fingerprint=lm.fingerprint, model_name=lm.name)


def test_meta_training_makes_k_steps_edit_better_than_plain_sgd(gpt2, trained):
    """On requests it never saw, the meta-trained edit (M + k steps at the learned η) lowers the edit loss
    below the base model's far more than k plain SGD steps at the initial step size on the base model."""
    hp, art = trained
    net, _ = et.load_meta(gpt2, hp)
    assert art.curve[-1]["step"] == hp.train_steps
    assert all(float(lr) > 10 * hp.edit_lr for lr in net.edit_lrs.detach())  # the step sizes grew (≈ 0.2-0.3)
    gains_et, gains_sgd = [], []
    for r in HELD_OUT:
        base = _loss(gpt2, [r])
        e = edit.compute("editable-training", [r], model=gpt2, hparams=hp, runtime=NO_CHECK)
        with edit.applied(gpt2, e):
            gains_et.append(base - _loss(gpt2, [r]))
        with edit.applied(gpt2, _plain_sgd(gpt2, r, net.sites, hp.edit_lr, hp.n_edit_steps)):
            gains_sgd.append(base - _loss(gpt2, [r]))
    assert all(m > g for m, g in zip(gains_et, gains_sgd)), (gains_et, gains_sgd)
    # ≈ 1.12 against ≈ 0.75 (untrained, train_steps=0, the two are the same edit)
    assert sum(gains_et) / len(gains_et) > sum(gains_sgd) / len(gains_sgd) + 0.25, (gains_et, gains_sgd)


def test_edit_is_meta_delta_plus_inner_steps_and_reverts_to_the_base(gpt2, trained):
    hp, art = trained
    net, _ = et.load_meta(gpt2, hp)
    r = HELD_OUT[0]
    state = _state(gpt2)
    e = edit.compute("editable-training", [r], model=gpt2, hparams=hp, runtime=NO_CHECK)
    assert _same_state(gpt2, state)
    # every MLP weight of the (two) tiny blocks: GPT-2's c_fc and c_proj
    assert [d.param for d in e.deltas] == [s.param for s in net.sites] and len(e.deltas) == 4
    # (3) exactly: Δ = M (the artefact's tensor) + D (the inner steps from θ0 + M)
    meta, inner = et.edit_parts(gpt2, [r], net, hp)
    for i, (d, s) in enumerate(zip(e.deltas, net.sites)):
        assert torch.equal(meta[i], art.tensors[f"deltas.{i}"])
        total = meta[i] + inner[i]
        assert torch.equal(d.dense, total.T if s.transposed else total)
        assert meta[i].abs().sum() > 0 and inner[i].abs().sum() > 0  # both parts are there
    # D is a real gradient step on the real weights θ0 + M: check it against autograd on the parameters
    meta_only = edit.Edit(method="meta", requests=[r], interventions=et.weight_deltas(gpt2, net.sites, meta),
                          fingerprint=gpt2.fingerprint, model_name=gpt2.name)
    with edit.applied(gpt2, meta_only):
        # the modules' own weights: GPT-2's Conv1D stores (d_in, d_out), so ∇ is transposed to (d_out, d_in)
        params = [getattr(gpt2.bridge.blocks[s.layer].mlp, s.part).original_component.weight for s in net.sites]
        batch, rows, pos, gold = mend_mod._rows(gpt2, [r])
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = mend_mod._target_nll(gpt2.forward(batch), rows, pos, gold)
                grads = torch.autograd.grad(loss, params)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        for i, g in enumerate(grads):
            expect = -net.edit_lrs[i].detach() * g.T  # all four are Conv1D
            torch.testing.assert_close(inner[i], expect, rtol=1e-4, atol=1e-7)
    assert _same_state(gpt2, state)
    # applied, the model is θ0 + M + D; reverted, bit-identical to the base
    with edit.applied(gpt2, e):
        assert not _same_state(gpt2, state)
    assert _same_state(gpt2, state) and not gpt2.applied_edits


def test_missing_artefact_fails_with_the_training_command(gpt2, cache, tmp_path):
    data = tmp_path / "facts-train.json"
    data.write_text(json.dumps([{"prompt": r.request.rendered, "subject": r.request.subject,
                                 "target_new": r.request.target_new.strip(), "ground_truth": "Paris",
                                 "rephrase_prompt": r.paraphrases[0], "locality_prompt": r.locality[0][0],
                                 "locality_ground_truth": r.locality[0][1].strip()} for r in toy_records()]))
    state = _state(gpt2)
    with pytest.raises(TrainedEditorMissingError) as err:
        edit.compute("editable-training", HELD_OUT[:1], model=gpt2, train_data=str(data), n_edit_steps=2)
    cmd = f"locate-edit train editable-training --data {data} --model tiny-gpt2 --hparam n_edit_steps=2"
    assert err.value.command == cmd and str(err.value).endswith(cmd)
    assert _same_state(gpt2, state) and not gpt2.applied_edits


def test_bad_hparams_are_refused():
    with pytest.raises(edit.InvalidHparamsError, match="edit_loss_on"):
        edit.get_method("editable-training").make_hparams({"edit_loss_on": "nowhere"})
