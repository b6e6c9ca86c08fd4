"""Trained editors (edit.training), MEND and SERAC on tiny models: the artefact (key, refusal for another
model, the training command when missing, resumable training), MEND's learned edits against plain
gradient steps, and SERAC's routing (in scope → counterfactual model; out of scope → bit-identical)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import edit
from edit.training import (
    CHECKPOINT_FILE,
    CURVE_FILE,
    TrainedEditorMismatchError,
    TrainedEditorMissingError,
    TrainingDataError,
    load_training_data,
    run_training,
    toy_records,
)
from locate.errors import FingerprintMismatchError
from locate.testing import tiny_model
from locate_edit.cli import main as cli_main

mend_mod = importlib.import_module("edit.methods.mend")
serac_mod = importlib.import_module("edit.methods.serac")

TINY_MEND = dict(train_data="toy", train_steps=20, batch_size=2, rank=8, lr=1e-3, lr_lr=1e-2, edit_lr=1e-2,
                 eval_every=10, checkpoint_every=10)
HELD_OUT = [edit.Request("{} is located in the city of", s, t) for s, t in
            [("Big Ben", " Vienna"), ("The Colosseum", " Dublin"), ("Sydney Opera House", " Prague"),
             ("Mount Everest", " Athens")]]


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)


@pytest.fixture(scope="module")
def trained_mend(gpt2, cache):
    hp = edit.get_method("mend").make_hparams(TINY_MEND)
    art = mend_mod.train_mend(gpt2, toy_records(), hp, progress=False)
    return hp, art


def _loss(lm, requests) -> float:
    batch, rows, pos, gold = mend_mod._rows(lm, requests)
    with torch.no_grad():
        return float(mend_mod._target_nll(lm.forward(batch), rows, pos, gold))


def _state(lm):
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def _same_state(lm, state) -> bool:
    return all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), state))


# ====================================================================== MEND
def test_trained_mend_lowers_held_out_loss_more_than_plain_gradient_steps(gpt2, trained_mend):
    """On requests it never saw, the trained editor's edit lowers the edit loss more than a plain gradient
    step of the step size the editor starts from (ΔW = −edit_lr ∇W on every edited weight), and more
    than the untrained (identity-initialised) editor, whose W + η Σ δ̂ ûᵀ (the reference's sign) raises it."""
    hp, art = trained_mend
    net, _ = mend_mod.load_editor(gpt2, hp)
    fresh = mend_mod.MENDEditor(net.sites, hp.rank, hp.n_hidden, hp.edit_lr)
    gains_mend, gains_grad, gains_fresh = [], [], []
    for r in HELD_OUT:
        base = _loss(gpt2, [r])
        e = edit.compute("mend", [r], model=gpt2, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
        with edit.applied(gpt2, e):
            gains_mend.append(base - _loss(gpt2, [r]))
        grads = mend_mod.gradient_factors(gpt2, [r], net.sites)
        plain = {s: (-hp.edit_lr * grads[s][1], grads[s][0]) for s in net.sites}
        with torch.no_grad(), gpt2.hooks(mend_mod._edited_hooks(plain)):
            gains_grad.append(base - _loss(gpt2, [r]))
        with torch.no_grad():
            untrained = fresh.factors(grads)
        with torch.no_grad(), gpt2.hooks(mend_mod._edited_hooks(untrained)):
            gains_fresh.append(base - _loss(gpt2, [r]))
    assert all(g > 0.5 for g in gains_mend), gains_mend
    assert all(m > g for m, g in zip(gains_mend, gains_grad)), (gains_mend, gains_grad)
    assert sum(gains_mend) / len(gains_mend) > sum(gains_grad) / len(gains_grad) + 0.15  # ≈ 1.03 against ≈ 0.75
    assert all(f < 0 for f in gains_fresh), gains_fresh


def test_mend_edits_every_mlp_weight_of_the_last_blocks_with_low_rank_deltas(gpt2, trained_mend):
    hp, _ = trained_mend
    state = _state(gpt2)
    e = edit.compute("mend", HELD_OUT[:2], model=gpt2, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    assert _same_state(gpt2, state)
    # GPT-2 has c_fc and c_proj; the tiny model has 2 blocks, so "the last 3" are both
    assert len(e.deltas) == 4 and e.layers == [0, 1]
    n_tokens = sum(len(gpt2.encode(r.rendered)) + len(gpt2.target_ids(r.target_new, r.rendered)) for r in HELD_OUT[:2])
    for d in e.deltas:
        assert d.rank is not None and 1 <= d.rank <= n_tokens  # one rank-one term per token position
        assert d.shape == tuple(gpt2.parameter(d.param).shape)
    # in the last block only the positions that predict a target token carry a gradient
    last = [d for d in e.deltas if d.layer == 1]
    assert all(d.rank == 2 for d in last)  # one-token targets, two requests


def test_missing_editor_fails_with_the_training_command(gpt2, cache, tmp_path):
    data = tmp_path / "facts-train.json"
    data.write_text(json.dumps([{"prompt": r.request.rendered, "subject": r.request.subject,
                                 "target_new": r.request.target_new.strip(), "ground_truth": "Paris",
                                 "rephrase_prompt": r.paraphrases[0], "locality_prompt": r.locality[0][0],
                                 "locality_ground_truth": r.locality[0][1].strip()} for r in toy_records()]))
    state = _state(gpt2)
    with pytest.raises(TrainedEditorMissingError) as err:
        edit.compute("mend", HELD_OUT[:1], model=gpt2, train_data=str(data), rank=4)
    cmd = f"locate-edit train mend --data {data} --model tiny-gpt2 --hparam rank=4"
    assert err.value.command == cmd and str(err.value).endswith(cmd)
    assert _same_state(gpt2, state) and not gpt2.applied_edits
    with pytest.raises(TrainedEditorMissingError, match="locate-edit train serac --data"):
        edit.compute("serac", HELD_OUT[:1], model=gpt2, train_data=str(data))
    assert len(load_training_data(data)) == len(toy_records())


def test_editor_trained_for_another_model_is_refused(gpt2, tokenizer, cache, tmp_path):
    hp = dict(TINY_MEND, train_steps=2, editor=str(tmp_path / "ed"))
    mend_mod.train_mend(gpt2, toy_records(), edit.get_method("mend").make_hparams(hp), progress=False)
    assert edit.compute("mend", HELD_OUT[:1], model=gpt2, hparams=hp).deltas
    other = tiny_model("gpt2", tokenizer, seed=1)
    with pytest.raises(TrainedEditorMismatchError, match="fingerprint") as err:
        edit.compute("mend", HELD_OUT[:1], model=other, hparams=hp)
    assert isinstance(err.value, FingerprintMismatchError)


def test_training_resumes_from_its_checkpoint(gpt2, cache, tmp_path):
    hp = edit.get_method("mend").make_hparams(dict(TINY_MEND, train_steps=5, checkpoint_every=2, eval_every=2))
    records = toy_records()
    whole = run_training("mend", gpt2, records, hp, mend_mod._MENDTrainer, out=tmp_path / "whole", progress=False)

    ran: list[int] = []

    class Interrupted(Exception):
        pass

    def make(stop_at):
        def factory(*a):
            t = mend_mod._MENDTrainer(*a)
            step = t.step

            def counted(s):
                if s == stop_at:
                    raise Interrupted
                ran.append(s)
                return step(s)
            t.step = counted
            return t
        return factory

    with pytest.raises(Interrupted):
        run_training("mend", gpt2, records, hp, make(3), out=tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / CHECKPOINT_FILE).is_file() and ran == [0, 1, 2]
    ran.clear()
    resumed = run_training("mend", gpt2, records, hp, make(-1), out=tmp_path / "resumed", progress=False)
    assert ran == [2, 3, 4]  # continued after the checkpoint of step 2
    assert not (tmp_path / "resumed" / CHECKPOINT_FILE).exists()
    assert resumed.tensors.keys() == whole.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)
    curve = json.loads((tmp_path / "resumed" / CURVE_FILE).read_text())
    assert curve["final"] and [p["step"] for p in curve["curve"]] == [2, 4, 5]
    assert {"edit_success", "locality", "loss_edit", "loss_loc"} <= set(curve["curve"][-1])


def test_training_refuses_an_evaluation_split(tmp_path):
    p = tmp_path / "zsre_dev_800.json"
    p.write_text("[]")
    with pytest.raises(TrainingDataError, match="evaluation split"):
        load_training_data(p)


def test_cli_train_refuses_a_method_without_an_editor_before_loading_a_model(tmp_path, capsys):
    p = tmp_path / "train.json"
    p.write_text("[]")
    assert cli_main(["train", "rome", "--data", str(p)]) == 2
    assert "rome has no trained editor" in capsys.readouterr().err
    assert cli_main(["train", "mend", "--data", str(p)]) == 2
    assert "non-empty JSON list" in capsys.readouterr().err


# ====================================================================== SERAC
@pytest.fixture(scope="module")
def trained_serac(gpt2, cache):
    hp = edit.get_method("serac").make_hparams(dict(train_data="toy", train_steps=30, batch_size=4, cf_lr=1e-2,
                                                    eval_every=10, checkpoint_every=10))
    art = serac_mod.train_serac(gpt2, toy_records(), hp, progress=False)
    return hp, art


def test_serac_routes_an_in_scope_paraphrase_and_leaves_out_of_scope_inputs_bit_identical(gpt2, trained_serac):
    hp, art = trained_serac
    r = edit.Request("{} is located in the city of", "Big Ben", " Vienna")
    paraphrase = "Where is Big Ben? It is in the city of"
    outside = ["My favourite food is", "The first month of the year is"]
    base = {p: gpt2.last_logits([p])[0].clone() for p in [paraphrase, *outside]}
    e = edit.compute("serac", [r], model=gpt2, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    router = next(iv for iv in e.interventions if isinstance(iv, serac_mod.SERACRouter))
    assert float(router.scores(paraphrase)[0]) > serac_mod.THRESHOLD
    assert all(float(router.scores(p)[0]) <= serac_mod.THRESHOLD for p in outside)
    with edit.applied(gpt2, e):
        assert gpt2.transform(paraphrase) == serac_mod.edit_text(r) + paraphrase
        routed = gpt2.last_logits([paraphrase])[0]
        kept = {p: gpt2.last_logits([p])[0] for p in outside}
        assert all(gpt2.transform(p) == p for p in outside)
    for p in outside:
        assert torch.equal(kept[p], base[p])  # out of scope: the base model, bit for bit
    # in scope: the counterfactual model (base + adapters) reading "c_e x"
    cf = serac_mod.CounterfactualAdapters(gpt2.n_layers, serac_mod._d_mlp(gpt2), gpt2.d_model, hp.cf_rank)
    cf.load_state_dict({"a": art.tensors["cf.a"], "b": art.tensors["cf.b"]})
    with torch.no_grad(), gpt2.hooks(serac_mod._mlp_hooks(gpt2, cf, lambda: slice(None))):
        expected = gpt2.forward(gpt2.pad([gpt2.encode(serac_mod.edit_text(r) + paraphrase, raw=True)]))[0, -1]
    assert torch.allclose(routed, expected, atol=1e-5)
    assert not torch.allclose(routed, base[paraphrase], atol=1e-3)
    # without the adapters (the prefix alone) the output is not the counterfactual model's
    with torch.no_grad():
        prefix_only = gpt2.forward(gpt2.pad([gpt2.encode(serac_mod.edit_text(r) + paraphrase, raw=True)]))[0, -1]
    assert not torch.allclose(routed, prefix_only, atol=1e-4)
