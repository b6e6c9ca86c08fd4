"""AlphaEdit: the update lies in the null space of the preserved keys, and sequential edits accumulate K_p."""

from __future__ import annotations

import pytest
import torch

import edit
from edit.methods.alphaedit import alpha_update, null_space_projection, previous_keys
from locate.testing import tiny_model

REQS = [edit.Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"),
        edit.Request("{} was founded by", "Apple", " Newton", " Jobs")]
HP = {"v_steps": 5, "template_lengths": ((5, 1),), "stats_tokens": 2048, "layers": [0],
      "nullspace_threshold": 0.5, "threshold_relative": True}


@pytest.fixture(scope="module")
def setup(tokenizer, shared_data):
    lm = tiny_model("llama", tokenizer)
    rt = edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw")
    return lm, rt


def test_projection_and_solve_algebra():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3, 12, dtype=torch.float64)
    C = A.T @ A / 200
    P = null_space_projection(C, 0.05)
    s, U = torch.linalg.eigh(C)
    assert torch.allclose(P @ P, P, atol=1e-12) and int(round(float(torch.trace(P)))) == int((s < 0.05).sum())
    assert torch.allclose(P @ U[:, s >= 0.05], torch.zeros(12, int((s >= 0.05).sum()), dtype=torch.float64), atol=1e-12)
    K, R = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    left, right = alpha_update(K, R, P, None, L2=0.1)
    delta = left @ right
    # Δ (I − P) = 0: preserved directions are untouched; and the closed form solves its normal equation
    assert torch.allclose(delta @ (torch.eye(12, dtype=torch.float64) - P), torch.zeros(5, 12, dtype=torch.float64), atol=1e-10)
    A_ = P @ (K.T @ K) + 0.1 * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(A_ @ delta.T, P @ K.T @ R, atol=1e-10)
    # with an earlier fact's key in K_p, the new update moves that key's value less
    k_prev = torch.randn(1, 12, generator=g, dtype=torch.float64)
    with_prev = torch.matmul(*alpha_update(K, R, P, k_prev * 10, L2=0.1))
    assert float((with_prev @ k_prev[0]).norm()) < 0.5 * float((delta @ k_prev[0]).norm())


def test_edit_is_orthogonal_to_the_preserved_keys(setup):
    lm, rt = setup
    e = edit.compute("alphaedit", REQS[:1], model=lm, hparams=HP, runtime=rt)
    st = edit.key_second_moments(lm, [0], corpus=rt.corpus, n_tokens=2048, progress=False)[0]
    s, U = torch.linalg.eigh(st.C.double())
    preserved = U[:, s >= 0.5 * float(s[-1])]  # the directions the projection keeps out of the update
    delta = e.deltas[0].matrix().double()
    assert preserved.shape[1] > 0 and float((delta @ preserved).abs().max()) < 1e-4 * float(delta.abs().max())
    assert e.hparams["null_space_dim"][0] == lm.d_mlp - preserved.shape[1]
    assert "keys_0" in e.state and e.state["keys_0"].shape == (1, lm.d_mlp)


def test_sequential_edits_accumulate_the_keys_of_earlier_edits(setup):
    lm, rt = setup
    assert previous_keys(lm, 0) is None
    first = edit.compute("alphaedit", REQS[:1], model=lm, hparams=HP, runtime=rt).apply(lm)
    try:
        assert torch.equal(previous_keys(lm, 0), first.state["keys_0"])
        second = edit.compute("alphaedit", REQS[1:], model=lm, hparams=HP, runtime=rt)
        assert second.parents == [first.id]
        with edit.applied(lm, second):
            assert torch.equal(previous_keys(lm, 0), torch.cat([first.state["keys_0"], second.state["keys_0"]]))
    finally:
        first.revert(lm)
    assert previous_keys(lm, 0) is None
