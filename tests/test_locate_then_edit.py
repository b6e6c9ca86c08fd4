"""The locate-then-edit family (issue 19): each method's defining property on a tiny model, checked
where plain ROME/MEMIT would give a different number."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import edit
from edit.context import templates_for
from edit.methods.emmet import EMMETHparams, emmet_update
from edit.methods.memit import layer_update, memit_targets, subject_residuals
from edit.methods.prune import accumulated, restrain
from edit.methods.rect import top_relative_mask
from edit.request import InvalidRequestError
from locate.errors import InvalidHparamsError
from locate import HookedLM
from locate.testing import tiny_config, tiny_model

REQS = [edit.Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
        edit.Request("{} was founded by", "Apple", " Newton", " Jobs"),
        edit.Request("{} plays the", "Miles Davis", " violin", " trumpet")]
ROME_HP = {"v_steps": 5, "template_lengths": ((5, 2),), "stats_tokens": 2048, "layers": [0]}


@pytest.fixture(scope="module")
def setup(tokenizer, shared_data):
    lm = tiny_model("llama", tokenizer)
    rt = edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw", check_efficacy=False)
    yield lm, rt
    assert not lm.applied_edits, "a test left an edit applied"


def _value(lm, layer: int, k: torch.Tensor) -> torch.Tensor:
    """W k + b at the MLP output projection of ``layer``, float64."""
    b = lm.mlp_out_bias(layer)
    return lm.mlp_out_weight(layer).double() @ k.double() + (0 if b is None else b.double())


# ---------------------------------------------------------------------------------------------- r-ROME
def test_r_rome_writes_v_star_at_the_averaged_key(setup):
    """r-ROME: Ŵ k* + b = v* for the averaged key k*. ROME (the reference key) maps the bare prompt's key
    to v* instead, and misses v* at k* by a margin whenever the templates move the key."""
    lm, rt = setup
    e = edit.compute("r-rome", REQS[:1], model=lm, hparams=ROME_HP, runtime=rt)
    assert e.method == "r-rome" and e.hparams["key"] == "averaged" and torch.equal(e.k_lambda, e.k_star)
    with edit.applied(lm, e):
        err = float((_value(lm, 0, e.k_star) - e.v_star.double()).norm())
    moved = float((e.v_star.double() - _value(lm, 0, e.k_star)).norm())
    assert err < 1e-4 * moved

    r = edit.compute("rome", REQS[:1], model=lm, hparams=ROME_HP, runtime=rt)
    assert not torch.equal(r.k_lambda, r.k_star)
    with edit.applied(lm, r):
        err_rome = float((_value(lm, 0, r.k_star) - r.v_star.double()).norm())
        err_rome_bare = float((_value(lm, 0, r.k_lambda) - r.v_star.double()).norm())
    assert err_rome_bare < 1e-4 * moved and err_rome > 1e-2 * moved


# ---------------------------------------------------------------------------------------------- EMMET
def test_emmet_solve_is_the_papers_closed_form():
    """Δ = R (Kᵀ C⁻¹ K + εI)⁻¹ Kᵀ C⁻¹ with C = λC₀ + μI (paper's column layout, explicit inverses), and with
    ε = 0 every constraint Δ k_i = r_i holds; MEMIT's least-squares solve on the same inputs misses them."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(400, 24, generator=g, dtype=torch.float64)
    C0 = A.T @ A / 400
    K, R = torch.randn(5, 24, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    lam, mu, eps = 3.0, 0.2, 0.1
    delta = torch.matmul(*emmet_update(K, R, C0, lam, mu, eps))
    Ci = torch.linalg.inv(lam * C0 + mu * torch.eye(24, dtype=torch.float64))
    Kc, Rc = K.T, R.T  # columns, as in the paper
    paper = Rc @ torch.linalg.inv(Kc.T @ Ci @ Kc + eps * torch.eye(5, dtype=torch.float64)) @ Kc.T @ Ci
    assert torch.allclose(delta, paper, atol=1e-10, rtol=1e-8)
    exact = torch.matmul(*emmet_update(K, R, C0, lam))
    assert torch.allclose(exact @ K.T, R.T, atol=1e-9)
    memit_delta = torch.matmul(*layer_update(K, R, C0, lam))
    assert float((memit_delta @ K.T - R.T).norm()) > 1e-2 * float(R.norm())


def _z_and_residuals(lm, rt, hp: dict, layer: int):
    """z (MEMIT eq. 16, as EMMET optimises it) and the current block output h at the subject's last token."""
    h = EMMETHparams(**{k: v for k, v in hp.items() if k != "layers"})
    z, _, _ = memit_targets(lm, REQS, layer, templates_for(lm, rt, h.template_lengths), h, rt)
    return z, subject_residuals(lm, REQS, layer)


@pytest.mark.parametrize("emmet_lambda, tol", [(0.0, 1e-4), (0.1, 1e-2)])
def test_emmet_satisfies_its_equality_constraints(setup, emmet_lambda, tol):
    """EMMET: with the bare prompt as the only template (so the key the update writes is the key the
    prompt produces), every request of the batch reaches its target z_i exactly once the edit is
    applied: W′k_i = W k_i + r_i. MEMIT's least-squares update on the same batch falls short."""
    lm, rt = setup
    hp = {"v_steps": 5, "template_lengths": (), "stats_tokens": 2048, "layers": [0]}
    z, h = _z_and_residuals(lm, rt, hp, 0)
    e = edit.compute("emmet", REQS, model=lm, hparams={**hp, "emmet_lambda": emmet_lambda}, runtime=rt)
    with edit.applied(lm, e):
        h_emmet = subject_residuals(lm, REQS, 0)
    gap = (z - h).norm(dim=1)
    assert ((h_emmet - z).norm(dim=1) < tol * gap).all()
    m = edit.compute("memit", REQS, model=lm, hparams=hp, runtime=rt)
    with edit.applied(lm, m):
        h_memit = subject_residuals(lm, REQS, 0)
    assert ((h_memit - z).norm(dim=1) > 0.05 * gap).all()


# ---------------------------------------------------------------------------------------------- RECT
MEMIT_HP = {"v_steps": 5, "template_lengths": ((5, 1),), "stats_tokens": 2048, "layers": [0, 1]}


@pytest.mark.parametrize("keep", [0.2, 0.37])
def test_rect_keeps_exactly_the_top_share_of_relative_changes(setup, keep):
    """RECT: of each edited matrix's n entries exactly n − ⌊n(1 − k)⌋ are non-zero, those of MEMIT's
    update with the largest |Δ|/|W|, unchanged; MEMIT's own update moves every entry."""
    lm, rt = setup
    m = edit.compute("memit", REQS[:2], model=lm, hparams=MEMIT_HP, runtime=rt)
    r = edit.compute("rect", REQS[:2], model=lm, hparams={**MEMIT_HP, "keep_fraction": keep}, runtime=rt)
    assert [d.param for d in r.deltas] == [d.param for d in m.deltas] and len(r.deltas) == 2
    for full, sparse in zip(m.deltas, r.deltas):
        D, S = full.matrix().double(), sparse.dense.double()
        n = D.numel()
        assert int((D != 0).sum()) == n  # MEMIT: dense
        assert int((S != 0).sum()) == n - int(n * (1 - keep))
        kept = S != 0
        assert torch.allclose(S[kept], D[kept], rtol=1e-5, atol=0)
        rho = D.abs() / lm.parameter(full.param).double().abs()
        assert float(rho[kept].min()) >= float(rho[~kept].max())


def test_rect_mask_ranks_zero_weights_first_and_breaks_ties_by_position():
    W = torch.tensor([[1.0, 0.0, 2.0, 2.0, 0.0]])
    D = torch.tensor([[0.1, 0.5, 0.2, 0.2, 0.0]])  # ρ = 0.1, inf, 0.1, 0.1, 0 (0/0)
    assert top_relative_mask(D, W, 0.4).tolist() == [[True, True, False, False, False]]  # 5 − ⌊5·0.6⌋ = 2


def test_rect_on_another_base_and_its_refusals(setup):
    lm, rt = setup
    r = edit.compute("rect", REQS[:1], model=lm, runtime=rt,
                     hparams={"base": "r-rome", "layers": [0], "n_layers": 1, "base_hparams": ROME_HP})
    (d,) = r.deltas
    assert r.hparams["base_record"]["key"] == "averaged" and d.dense is not None
    assert int((d.dense != 0).sum()) == d.dense.numel() - int(d.dense.numel() * 0.8)
    state = [t.clone() for t in lm.hf_model.state_dict().values()]
    for bad in ({"base": "prune"}, {"base": "rect"}, {"base": "ike"}, {"base": "nope"}, {"keep_fraction": 0.0},
                {"base_hparams": [1]}):
        with pytest.raises(InvalidHparamsError):
            edit.compute("rect", REQS[:1], model=lm, hparams={**MEMIT_HP, **bad}, runtime=rt)
    with pytest.raises(InvalidRequestError):
        edit.compute("rect", REQS[:2], model=lm, runtime=rt, hparams={"base": "rome", "layers": [0], "n_layers": 1})
    assert all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), state))


# ---------------------------------------------------------------------------------------------- PRUNE
def test_prune_restraint_function():
    s = torch.tensor([8.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert restrain(s, 2.0, "log", 2.0).tolist() == [4.0, 2.0, 1.0, 0.5]  # 2 + log₂(8/2)
    assert torch.allclose(restrain(s, 2.0), torch.tensor([2 + math.log(4), 2.0, 1.0, 0.5], dtype=torch.float64))
    assert restrain(s, 2.0, "linear").tolist() == [5.0, 2.0, 1.0, 0.5]


@pytest.fixture(scope="module")
def wide(tokenizer, shared_data):
    """A tiny Llama whose MLP output projections have σ_max ≈ 1.7 (≥ 1/ln e, as on real models, where the
    log restraint lowers what it touches) and small keys (so a MEMIT update exceeds σ_max within a few
    edits): up_proj × 0.2, down_proj × 4, wrapped after scaling so its fingerprint is its own."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    with torch.no_grad():
        for block in hf.model.layers:
            block.mlp.up_proj.weight.mul_(0.2)
            block.mlp.down_proj.weight.mul_(4.0)
    lm = HookedLM.from_hf(hf, tokenizer, name="tiny-llama-wide-values")
    rt = edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw", check_efficacy=False)
    yield lm, rt
    assert not lm.applied_edits


def _sequential(lm, rt, method: str) -> list:
    """Apply one edit of ``method`` per request, in turn; the caller reverts them."""
    done = []
    for r in REQS:
        done.append(edit.compute(method, [r], model=lm, hparams=MEMIT_HP, runtime=rt).apply(lm))
    return done


def test_prune_bounds_the_accumulated_edit_over_sequential_edits(wide):
    """PRUNE: after each of several sequential edits, the singular values of the accumulated PRUNE update
    A_n are F of those of A_{n−1} + Δ_n (Δ_n: MEMIT's update on the same model): every one above
    σ_max(W₀) is brought down to σ_max + ln(σ̄/σ_max). Plain MEMIT's accumulated update, on the same
    three facts, has a largest singular value well above PRUNE's."""
    lm, rt = wide
    done, compressed = [], 0
    try:
        for r in REQS:
            raw = edit.compute("memit", [r], model=lm, hparams=MEMIT_HP, runtime=rt)
            e = edit.compute("prune", [r], model=lm, hparams=MEMIT_HP, runtime=rt)
            for d_raw, d in zip(raw.deltas, e.deltas):
                A_prev = accumulated(lm, d.param)
                A_prev = torch.zeros(d.shape, dtype=torch.float64) if A_prev is None else A_prev
                s_max = float(torch.linalg.matrix_norm(lm.parameter(d.param).double() - A_prev, ord=2))
                plain = torch.linalg.svdvals(A_prev + d_raw.matrix().double())
                ours = torch.linalg.svdvals(A_prev + d.matrix().double())
                bound = torch.where(plain > s_max, s_max + torch.log(plain / s_max), plain)
                assert torch.allclose(ours, bound, rtol=1e-4, atol=1e-6 * s_max)
                assert bool((ours <= plain + 1e-6).all())
                compressed += int((plain > 1.5 * s_max).sum())
            done.append(e.apply(lm))
        params = [d.param for d in done[-1].deltas]
        A = {p: accumulated(lm, p) for p in params}
        assert torch.allclose(A[params[0]], sum(e.deltas[0].matrix().double() for e in done))
    finally:
        for e in reversed(done):
            e.revert(lm)
    assert compressed >= 3 and accumulated(lm, params[0]) is None
    plain_done = _sequential(lm, rt, "memit")
    try:
        for p in params:
            s_prune = float(torch.linalg.matrix_norm(A[p], ord=2))
            s_memit = float(torch.linalg.matrix_norm(sum(e.deltas[params.index(p)].matrix().double()
                                                         for e in plain_done), ord=2))
            assert s_memit > s_prune + 0.5
    finally:
        for e in reversed(plain_done):
            e.revert(lm)
