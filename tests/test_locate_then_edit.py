"""The locate-then-edit family (issue 19): each method's defining property on a tiny model, checked
where plain ROME/MEMIT would give a different number."""

from __future__ import annotations

import pytest
import torch

import edit
from locate.testing import tiny_model

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
