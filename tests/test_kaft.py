"""KAFT (Li et al. 2022) on tiny models: the paper's training mixture (counterfactual context → the new
object, factual context → the true object, irrelevant context → the base model's own closed-book answer),
the edit as the adapters' low-rank deltas plus the fact as context, exact revert, and the training command
when no adapters are stored."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import edit
from edit.training import TrainedEditorMissingError, TrainingRecord, toy_records
from locate.testing import tiny_model

kaft = importlib.import_module("edit.methods.kaft")

TINY = dict(train_data="toy", train_steps=20, batch_size=4, rank=4, lr=3e-2, eval_every=10, checkpoint_every=10)
REQ = edit.Request("{} is located in the city of", "Big Ben", " Tokyo", " London")
NO_CHECK = edit.Runtime(check_efficacy=False)


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)


@pytest.fixture(scope="module")
def trained(gpt2, cache):
    hp = edit.get_method("kaft").make_hparams(TINY)
    art = kaft.train_kaft(gpt2, toy_records(), hp, progress=False)
    return hp, art


def _state(lm):
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def _same_state(lm, state) -> bool:
    return all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), state))


def test_mixture_follows_relevant_contexts_and_answers_irrelevant_ones_closed_book(gpt2):
    """The three parts of the paper's mixture for one record; the irrelevant part's target is what the BASE
    model answers to the unrelated prompt without any context (not the locality file's answer)."""
    hp = edit.get_method("kaft").make_hparams(TINY)
    rec = TrainingRecord(REQ, (), (("The capital of France is", " Paris"),))
    other = TrainingRecord(edit.Request("{} is located in the city of", "Mount Fuji", " Oslo"))
    t = kaft._KAFTTrainer(gpt2, [rec, other], [], hp)
    ex = t.examples(rec, other)
    cf = "Context: Big Ben is located in the city of Tokyo.\n"
    assert ex["counterfactual"] == (cf + REQ.rendered, gpt2.target_ids(" Tokyo", cf + REQ.rendered))
    tf = "Context: Big Ben is located in the city of London.\n"
    assert ex["factual"] == (tf + REQ.rendered, gpt2.target_ids(" London", tf + REQ.rendered))
    prompt, target = ex["irrelevant"]
    assert prompt == cf + "The capital of France is"
    with torch.no_grad():
        top = int(gpt2.forward(gpt2.pad([gpt2.encode("The capital of France is")]))[0, -1].argmax())
    n = len(gpt2.target_ids(" Paris", "The capital of France is"))
    assert target[0] == top and len(target) == n  # the random model's own answer ...
    assert target != gpt2.target_ids(" Paris", "The capital of France is")  # ... not the file's " Paris"
    # without a locality prompt: another record's fact as the irrelevant context of this record's prompt
    ex2 = t.examples(TrainingRecord(REQ), other)
    assert ex2["irrelevant"][0] == "Context: Mount Fuji is located in the city of Oslo.\n" + REQ.rendered
    only = kaft._KAFTTrainer(gpt2, [rec], [], edit.get_method("kaft").make_hparams(dict(TINY, mixture=["counterfactual"])))
    assert list(only.examples(rec, rec)) == ["counterfactual"]


def test_training_lowers_the_mixture_loss(gpt2, trained):
    hp, art = trained
    assert [p["step"] for p in art.curve] == [10, 20]
    t = kaft._KAFTTrainer(gpt2, toy_records(), [], hp)
    examples = [x for i, r in enumerate(toy_records()) for x in t.examples(r, toy_records()[(i + 1) % 12]).values()]
    with torch.no_grad():
        before, _ = kaft._target_nll(gpt2, examples, t.module.hooks())  # B = 0: the base model
        t.module.load_state_dict(art.tensors)
        after, _ = kaft._target_nll(gpt2, examples, t.module.hooks())
    assert float(after) < float(before) - 0.1, (float(before), float(after))


def test_edit_is_the_adapters_plus_the_fact_as_context_and_reverts_exactly(gpt2, trained):
    hp, art = trained
    state = _state(gpt2)
    e = edit.compute("kaft", [REQ], model=gpt2, hparams=hp, runtime=NO_CHECK)
    assert _same_state(gpt2, state)
    assert sorted(e.kinds) == ["input", "weight"] and len(e.deltas) == 4
    ctx = [iv for iv in e.interventions if isinstance(iv, edit.PrefixText)]
    assert len(ctx) == 1 and ctx[0].text == "Context: Big Ben is located in the city of Tokyo.\n"
    net, _ = kaft.load_adapters(gpt2, hp)
    for d, s, a, b in zip(e.deltas, net.sites, net.a, net.b):  # (α/r) B A in lm.parameter's layout
        m = ((b * net.scale) @ a).detach()
        assert d.rank == hp.rank and d.param == s.param
        torch.testing.assert_close(d.matrix(), m.T if s.transposed else m)
    with edit.applied(gpt2, e):
        assert gpt2.encode("Paris is") == gpt2.encode(ctx[0].text + "Paris is", raw=True)
        assert not _same_state(gpt2, state)
    assert _same_state(gpt2, state) and not gpt2.applied_edits
    assert gpt2.encode("Paris is") == gpt2.encode("Paris is", raw=True)


def test_missing_adapters_fail_with_the_training_command(gpt2, cache, tmp_path):
    data = tmp_path / "facts-train.json"
    data.write_text(json.dumps([{"prompt": r.request.rendered, "subject": r.request.subject,
                                 "target_new": r.request.target_new.strip(), "ground_truth": "Paris",
                                 "rephrase_prompt": r.paraphrases[0], "locality_prompt": r.locality[0][0],
                                 "locality_ground_truth": r.locality[0][1].strip()} for r in toy_records()]))
    state = _state(gpt2)
    with pytest.raises(TrainedEditorMissingError) as err:
        edit.compute("kaft", [REQ], model=gpt2, train_data=str(data), rank=4)
    cmd = f"locate-edit train kaft --data {data} --model tiny-gpt2 --hparam rank=4"
    assert err.value.command == cmd and str(err.value).endswith(cmd)
    assert _same_state(gpt2, state) and not gpt2.applied_edits


def test_bad_hparams_are_refused():
    with pytest.raises(edit.InvalidHparamsError, match="mixture"):
        edit.get_method("kaft").make_hparams({"mixture": ["closed-book"]})
    with pytest.raises(edit.InvalidHparamsError, match="fact"):
        edit.get_method("kaft").make_hparams({"context_template": "no slot"})


UNRELATED = ["My favourite colour is", "The sun rises in the", "Dogs are known for their", "The opposite of hot is"]
HELD_OUT = [edit.Request("{} is located in the city of", s, t) for s, t in
            [("Big Ben", " Vienna"), ("The Colosseum", " Dublin"), ("Sydney Opera House", " Prague")]]


def _next(lm, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.forward(lm.pad([lm.encode(prompt)]))[0, -1].float().log_softmax(-1)


def _moved(lm, ctx: str) -> float:
    """How far an irrelevant context moves the model: mean KL(p(· | q) ‖ p(· | ctx + q)) over unseen prompts."""
    kls = []
    for q in UNRELATED:
        p, c = _next(lm, q), _next(lm, ctx + q)
        kls.append(float((p.exp() * (p - c)).sum()))
    return sum(kls) / len(kls)


def test_fine_tuned_model_is_moved_less_by_an_irrelevant_context(gpt2, cache):
    """The mixture's irrelevant part: with the adapters, a held-out edited fact as context moves the
    next-token distribution of unseen unrelated prompts far less than it moves the base model's (≈ 0.012
    against ≈ 0.001 nats). (The other half, following a relevant context with a new object, needs the
    copying that a 2-layer random model with MLP adapters does not learn in a test's budget: the
    context-swap effect stays ≈ 0 for both, so it is not asserted here.)"""
    hp = edit.get_method("kaft").make_hparams(dict(TINY, train_steps=100, rank=8, eval_every=50, checkpoint_every=50))
    kaft.train_kaft(gpt2, toy_records(), hp, progress=False)
    base, tuned = [], []
    for r in HELD_OUT:
        e = edit.compute("kaft", [r], model=gpt2, hparams=hp, runtime=NO_CHECK)
        ctx = kaft.context(hp, [kaft.fact(r, r.target_new)])
        base.append(_moved(gpt2, ctx))
        adapters = edit.Edit(method="kaft-adapters", requests=[r], interventions=e.deltas, fingerprint=gpt2.fingerprint,
                             model_name=gpt2.name)
        with edit.applied(gpt2, adapters):
            tuned.append(_moved(gpt2, ctx))
    assert all(t < b for t, b in zip(tuned, base)), (tuned, base)
    assert sum(tuned) < 0.5 * sum(base), (tuned, base)
