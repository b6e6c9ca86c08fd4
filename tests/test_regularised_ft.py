"""RecAdam (edit/methods/recadam.py) and F-Learning (edit/methods/f_learning.py): regularised
fine-tuning, each compared with plain FT on tiny random models in the direction its paper says."""

from __future__ import annotations

import math

import pytest
import torch

import edit
from edit import Request
from edit.methods.f_learning import FLearningHparams, forgetting_edit, old_fact_requests
from edit.methods.ft import fine_tune_edit
from edit.methods.recadam import RecAdam, RecAdamHparams, anneal_lambda
from edit.request import InvalidRequestError
from locate.errors import InvalidHparamsError
from locate.testing import tiny_model

REQ = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    torch.manual_seed(0)
    return tiny_model("gpt2", tokenizer)


def _state(lm):
    return {n: p.detach().clone() for n, p in lm.hf_model.named_parameters()}


def _same(lm, state) -> bool:
    return all(torch.equal(p, state[n]) for n, p in lm.hf_model.named_parameters())


def _norm(e) -> float:
    return math.sqrt(sum(float(d.dense.double().pow(2).sum()) for d in e.deltas))


# ------------------------------------------------------------------------------------------ RecAdam
def test_recadam_defaults_are_the_official_codes():
    hp = RecAdamHparams()
    # run_glue_with_RecAdam.py: sigmoid, k 0.5, t0 250, pretrain_cof 5000, anneal_w 1; lr 2e-5 (BERT-base)
    assert (hp.anneal, hp.anneal_k, hp.anneal_t0, hp.gamma, hp.anneal_w, hp.lr) == ("sigmoid", 0.5, 250.0, 5000.0, 1.0, 2e-5)
    assert hp.steps == 500 and hp.norm_constraint is None
    with pytest.raises(InvalidHparamsError, match="overshoots"):
        RecAdamHparams(lr=5e-4)  # lr·γ = 2.5: the penalty step diverges
    with pytest.raises(InvalidHparamsError):
        RecAdamHparams(anneal="cosine")


def test_recadam_step_is_decoupled_the_penalty_never_enters_adams_moments():
    """Two steps on one tensor with fixed gradients, by hand (module docstring, Eqs. 3-4). A penalty
    added to the loss (its gradient through m and v) would give other numbers."""
    theta0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p = theta0.clone().requires_grad_(True)
    lr, gamma, k, t0, eps, b1, b2 = 1e-2, 20.0, 1.0, 1.0, 1e-8, 0.9, 0.999
    opt = RecAdam([p], [theta0], lr=lr, gamma=gamma, k=k, t0=t0, eps=eps, betas=(b1, b2))
    grads = [torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.25], dtype=torch.float64)]
    th, m, v = theta0.clone(), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    mc, vc, thc = m.clone(), v.clone(), theta0.clone()  # the coupled alternative, for contrast
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        lam = 1 / (1 + math.exp(-k * (t - t0)))
        alpha = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        th = th - alpha * lam * m / (v.sqrt() + eps)
        th = th - lr * (1 - lam) * gamma * (th - theta0)
        gc = lam * g + (1 - lam) * gamma * (thc - theta0)
        mc, vc = b1 * mc + (1 - b1) * gc, b2 * vc + (1 - b2) * gc * gc
        thc = thc - alpha * mc / (vc.sqrt() + eps)
    assert torch.allclose(p.detach(), th, rtol=0, atol=1e-12)
    assert not torch.allclose(th, thc, atol=1e-6)
    assert opt.lambdas == pytest.approx([0.5, 1 / (1 + math.exp(-1.0))])


def test_recadam_anneals_lambda_along_the_sigmoid(gpt2):
    k, t0, n = 0.7, 4.0, 10
    e = edit.compute("recadam", [REQ], model=gpt2, layers=0, steps=n, lr=1e-3, gamma=100.0, anneal_k=k,
                     anneal_t0=t0, stop_loss=0.0)
    expected = [1 / (1 + math.exp(-k * (t - t0))) for t in range(1, n + 1)]
    assert e.metrics["anneal_lambda"] == pytest.approx(expected, rel=1e-12)
    assert anneal_lambda(3, "linear", k, t0) == pytest.approx(0.75)  # the linear option differs
    assert anneal_lambda(-5000, "sigmoid", 1.0, 0.0) == 0.0  # no overflow far before t0


def test_recadam_stays_closer_to_the_pre_edit_weights_than_ft(gpt2):
    """Same parameters, learning rate and number of steps: the annealed penalty holds θ nearer θ0."""
    state = _state(gpt2)
    common = dict(model=gpt2, layers=0, steps=20, lr=1e-3, stop_loss=0.0)
    ft = edit.compute("ft", [REQ], **common)
    rec = edit.compute("recadam", [REQ], gamma=500.0, anneal_k=0.5, anneal_t0=10.0, **common)
    assert _same(gpt2, state)
    assert [d.param for d in rec.deltas] == [d.param for d in ft.deltas]
    assert _norm(rec) < 0.8 * _norm(ft)
    # and it still learns: the new target is more likely than before
    out = rec.metrics["request_outcomes"][0]
    assert out["p_new_after"] > out["p_new_before"]


# ------------------------------------------------------------------------------------------ F-Learning
def test_f_learning_refuses_a_request_without_the_old_fact(gpt2):
    state = _state(gpt2)
    with pytest.raises(InvalidRequestError, match="target_true"):
        edit.compute("f-learning", [Request("{} is located in the city of", "The Eiffel Tower", " Rome")],
                     model=gpt2, layers=0, steps=2)
    assert _same(gpt2, state)


def test_f_learning_is_minus_lambda_old_plus_new_exactly(gpt2):
    hp = FLearningHparams(layers=[0], steps=4, lr=1e-3, stop_loss=0.0, forget_lambda=0.7)
    state = _state(gpt2)
    e = edit.compute("f-learning", [REQ], model=gpt2, hparams=hp)
    assert _same(gpt2, state)
    rt = edit.Runtime()
    e_old = fine_tune_edit(gpt2, old_fact_requests([REQ]), hp, rt, "check")
    assert old_fact_requests([REQ])[0].target_new == " Paris"
    forget = forgetting_edit(gpt2, e_old, 0.7)
    with edit.applied(gpt2, forget):
        e_new = fine_tune_edit(gpt2, [REQ], hp, rt, "check")
    assert [d.param for d in e.deltas] == [d.param for d in e_new.deltas]
    for d, do, dn in zip(e.deltas, e_old.deltas, e_new.deltas):
        assert torch.equal(d.dense, -0.7 * do.dense + dn.dense)
        assert float(do.dense.abs().max()) > 0 and float(dn.dense.abs().max()) > 0
    assert not torch.equal(e.deltas[0].dense, e_new.deltas[0].dense)


def test_f_learning_lowers_the_old_fact_more_than_ft(gpt2):
    common = dict(model=gpt2, layers=0, steps=6, lr=1e-3, stop_loss=0.0, objective="target_new", batch_size=1)
    ft = edit.compute("ft", [REQ], **common).metrics["request_outcomes"][0]
    fl = edit.compute("f-learning", [REQ], **common).metrics["request_outcomes"][0]
    assert ft["p_true_before"] == fl["p_true_before"]
    assert fl["p_true_after"] < ft["p_true_after"]
    assert fl["p_true_after"] < fl["p_true_before"]
