"""PMET and BIRD: the properties that define each method, on tiny random models.

PMET: the edit touches only the FFN output projections; the attention state is optimised jointly with
the FFN state (so the FFN target differs from the FFN-only optimisation's); and each layer of the
window is given the FFN residual divided by √(layers left), the reference's share (MEMIT's is 1/n).

BIRD: on the edited model, the subject's final representation lies closer to the new object plus the
inverse relation (the reverse direction, o* + r⁻¹ ≈ s), and the whole bidirectional term is lower, than
after plain ROME; with α → 0 BIRD is ROME; it refuses without the relation phrases or the old object.
"""

from __future__ import annotations

import math

import pytest
import torch

import edit
from edit import Request
from edit.context import subject_keys, template_groups, templates_for
from edit.methods.bird import MissingOldObjectError, MissingRelationError, phrase_means
from locate.testing import tiny_model

REQ = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
SMOKE = {"template_lengths": ((5, 1),), "stats_tokens": 1024}

_MODELS: dict = {}


def _tiny(arch, tokenizer, n_layers=3):
    key = (arch, n_layers)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, tokenizer, n_layers=n_layers)
    return _MODELS[key]


@pytest.fixture(scope="module")
def runtime(shared_data):
    return edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw", check_efficacy=False)


def _state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.hf_model.state_dict().items()}


# --------------------------------------------------------------------------- PMET
@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt2"])
def test_pmet_changes_only_ffn_output_weights(arch, tokenizer, runtime):
    """Every delta is an FFN output projection of the window; applied, every other parameter (attention
    included, which PMET optimises but does not write) is bit-identical, and each FFN output projection
    of the window moves."""
    lm = _tiny(arch, tokenizer)
    e = edit.compute("pmet", [REQ], model=lm, runtime=runtime, layers=[0, 1], v_steps=5, **SMOKE)
    assert sorted(d.param for d in e.deltas) == ["blocks.0.mlp.out.weight", "blocks.1.mlp.out.weight"]
    assert e.metrics["attn_delta_norm"][0] > 0  # the attention δ was optimised ...
    before = _state(lm)
    ffn = {lm.mlp_out_weight(l).untyped_storage().data_ptr() for l in (0, 1)}
    sd = lm.hf_model.state_dict()  # (names alias: the bridge keeps the HF modules under several paths)
    with edit.applied(lm, e):
        after = _state(lm)
    changed = {sd[k].untyped_storage().data_ptr() for k in before if not torch.equal(before[k], after[k])}
    assert changed == ffn  # ... but only the FFN output weights change, both of them


def test_pmet_optimises_attention_and_ffn_jointly(tokenizer, runtime):
    """z^m is optimised together with the attention δ: it differs from z^m optimised alone (the FFN-only
    ablation, the one state a MEMIT-style method optimises at a module), and the attention δ is non-zero
    and clamped to its own radius (0.75 ‖a_0‖)."""
    lm = _tiny("gpt2", tokenizer)
    hp = dict(layers=[0, 1], v_steps=8, **SMOKE)
    joint = edit.compute("pmet", [REQ], model=lm, runtime=runtime, **hp)
    alone = edit.compute("pmet", [REQ], model=lm, runtime=runtime, optimize_attn=False, **hp)
    zj, za = joint.targets["z_m"][0], alone.targets["z_m"][0]
    assert alone.targets["delta_a"] is None and joint.targets["delta_a"] is not None
    a_delta = joint.targets["delta_a"][0]
    a0 = joint.targets["z_a"][0] - a_delta
    assert 0 < a_delta.norm() <= 0.75 * a0.norm() * (1 + 1e-5)
    assert (zj - za).norm() > 0.05 * joint.targets["delta_m"][0].norm()
    # the update follows z^m: with the attention δ the written deltas differ too
    assert not torch.allclose(joint.deltas[0].matrix(), alone.deltas[0].matrix())


@pytest.mark.parametrize("share, divisor", [("sqrt", math.sqrt(2)), ("linear", 2.0)])
def test_pmet_first_layer_writes_the_square_root_share(share, divisor, tokenizer, runtime):
    """With a negligible λ each layer's update writes its residual exactly (Δ k = r). At the first layer of
    a two-layer window the residual is δ^m / √2 by default (the reference's share); MEMIT's share would
    write δ^m / 2 (``residual_share="linear"``)."""
    lm = _tiny("llama", tokenizer)
    e = edit.compute("pmet", [REQ], model=lm, runtime=runtime, layers=[0, 1], v_steps=5,
                     mom2_update_weight=1e-6, residual_share=share, **SMOKE)
    k0 = e.keys[0][0]  # K_0: the keys of the first layer, read on the unedited model
    written = e.deltas[0].matrix().double() @ k0
    want = e.targets["delta_m"][0] / divisor
    assert torch.allclose(written, want, rtol=1e-3, atol=1e-6 * float(want.norm()))
    other = e.targets["delta_m"][0] / (2.0 if share == "sqrt" else math.sqrt(2))
    assert (written - other).norm() > 0.1 * want.norm()
    assert e.metrics["per_layer"][0]["share"] == pytest.approx(divisor)


def test_pmet_keys_are_memits(tokenizer, runtime):
    """K_l is MEMIT's grouped key average at each layer (read on the model carrying the earlier updates:
    the first layer's on the unedited model)."""
    lm = _tiny("llama", tokenizer)
    e = edit.compute("pmet", [REQ], model=lm, runtime=runtime, layers=[0, 1], v_steps=2, **SMOKE)
    templates = templates_for(lm, runtime, SMOKE["template_lengths"])
    k0 = subject_keys(lm, [REQ], 0, templates, template_groups(SMOKE["template_lengths"])).double()
    assert torch.allclose(e.keys[0], k0)


def test_pmet_bad_hparams_refused(tokenizer, runtime):
    lm = _tiny("llama", tokenizer)
    state = _state(lm)
    with pytest.raises(edit.registry.InvalidHparamsError, match="residual_share"):
        edit.compute("pmet", [REQ], model=lm, runtime=runtime, residual_share="cubic")
    assert all(torch.equal(v, state[k]) for k, v in _state(lm).items())


def test_vstar_top1_rule_is_pmets(tokenizer):
    """The reference PMET rule in edit.vstar: once the target is the top-1 token everywhere, the next
    step's NLL weighs 0.1 (with KL and weight decay off, the final loss is 0.1 × the final NLL; MEMIT's
    loss equals its NLL), and with the KL stop the request ends at once (its weighted KL term is 0)."""
    lm = _tiny("llama", tokenizer)
    with torch.no_grad():
        top = int(lm.last_logits([REQ.rendered])[0].argmax())
    req = Request(REQ.prompt, REQ.subject, lm.tokenizer.decode([top]))
    common = dict(site="mlp_out", templates=["{}"], steps=3, stop_loss=0.0, kl_factor=0.0, weight_decay=0.0)
    plain = edit.optimize_targets(lm, [req], 0, **common)
    pmet = edit.optimize_targets(lm, [req], 0, top1_nll_factor=0.1, **common)
    stop = edit.optimize_targets(lm, [req], 0, top1_nll_factor=0.1, top1_stop_kl=0.01, **common)
    assert plain.final_loss[0] == pytest.approx(plain.final_nll[0], rel=1e-6)
    assert pmet.final_loss[0] == pytest.approx(0.1 * pmet.final_nll[0], rel=1e-5)
    assert (plain.steps, pmet.steps, stop.steps) == (3, 3, 1)


# --------------------------------------------------------------------------- BIRD
RELATIONS = {"relation": "is located in", "inverse_relation": "is the location of"}
BIRD_COMMON = {"layers": [0], "v_steps": 10, **SMOKE}


def _bidirectional(lm, templates) -> tuple[float, float]:
    """On the model as it is: Σ_j ‖o*_j + r⁻¹_j − s_j‖ (the reverse distance) and the whole bracket of
    L_BIRD, Σ_j ‖s+r−o*‖ + ‖o*+r⁻¹−s‖ − (‖s+r−o‖ + ‖o+r⁻¹−s‖) (β = 1), from the final hidden states."""
    s, r, ri, o_new, o_old = (phrase_means(lm, templates, p) for p in
                              ("The Eiffel Tower", RELATIONS["relation"], RELATIONS["inverse_relation"], "Rome", "Paris"))
    reverse = (o_new + ri - s).norm(dim=-1)
    term = (s + r - o_new).norm(dim=-1) + reverse - (s + r - o_old).norm(dim=-1) - (o_old + ri - s).norm(dim=-1)
    return float(reverse.sum()), float(term.sum())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gptj", "qwen2"])
def test_bird_writes_the_reverse_direction(arch, tokenizer, runtime):
    """After a BIRD edit the subject's representation is closer to o* + r⁻¹ (and the bidirectional term
    lower) than after the ROME edit of the same fact; with α → 0 BIRD's v* is ROME's."""
    lm = _tiny(arch, tokenizer, n_layers=2)
    templates = templates_for(lm, runtime, SMOKE["template_lengths"])
    rome = edit.compute("rome", [REQ], model=lm, runtime=runtime, **BIRD_COMMON)
    bird = edit.compute("bird", [REQ], model=lm, runtime=runtime, alpha=0.1, **RELATIONS, **BIRD_COMMON)
    as_rome = edit.compute("bird", [REQ], model=lm, runtime=runtime, alpha=1e-12, **RELATIONS, **BIRD_COMMON)
    assert torch.allclose(as_rome.v_star, rome.v_star, rtol=1e-4, atol=1e-6)
    with edit.applied(lm, rome):
        rev_rome, term_rome = _bidirectional(lm, templates)
    with edit.applied(lm, bird):
        rev_bird, term_bird = _bidirectional(lm, templates)
    assert rev_bird < rev_rome - 0.1
    assert term_bird < term_rome - 0.5


def test_bird_refuses_without_relations_or_old_object(tokenizer, runtime):
    lm = _tiny("llama", tokenizer, n_layers=2)
    state = _state(lm)
    with pytest.raises(MissingRelationError, match="inverse_relation"):
        edit.compute("bird", [REQ], model=lm, runtime=runtime, relation="is located in", **BIRD_COMMON)
    no_old = Request(REQ.prompt, REQ.subject, REQ.target_new)
    with pytest.raises(MissingOldObjectError, match="beta=0"):
        edit.compute("bird", [no_old], model=lm, runtime=runtime, **RELATIONS, **BIRD_COMMON)
    assert all(torch.equal(v, state[k]) for k, v in _state(lm).items())
    e = edit.compute("bird", [no_old], model=lm, runtime=runtime, beta=0.0, **RELATIONS, **BIRD_COMMON)
    assert e.deltas and e.method == "bird"
