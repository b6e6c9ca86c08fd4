"""FT, FT-L and FT-M (edit/methods/ft.py): the references' parameters (bias included), objectives,
L∞ constraint (absolute and RMS-relative), batching and bit-exact revert, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import edit
from edit import Request
from edit.methods.ft import FTHparams, FTLHparams, FTMHparams, fine_tune
from locate import HookedLM
from locate.errors import InvalidHparamsError
from locate.testing import ARCHITECTURES, tiny_config, tiny_model

ONE_TOKEN = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
MULTI_TOKEN = Request("{} lives in the city of", "Marco", " New York City", " Paris")
OTHER = Request("{} was born in the country of", "Angela", " Japan", " Germany")


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    """A tiny GPT-2 whose MLP output biases are random (a fresh GPT-2 has them all zero, which would
    hide whether a bias is trained, and give it RMS 0)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in hf.transformer.h:
            block.mlp.c_proj.bias.copy_(torch.randn(block.mlp.c_proj.bias.shape, generator=g) * 0.05)
    return HookedLM.from_hf(hf, tokenizer, name="tiny-gpt2-bias")


def _state(lm):
    return {n: p.detach().clone() for n, p in lm.hf_model.named_parameters()}


def _same(lm, state) -> bool:
    return all(torch.equal(p, state[n]) for n, p in lm.hf_model.named_parameters())


def _raw_change(lm, e) -> dict[str, torch.Tensor]:
    """What applying ``e`` does to the stored tensors of layer 0's MLP output projection."""
    module = lm.mlp_out_module(0)
    named = {"weight": module.weight}
    if getattr(module, "bias", None) is not None:
        named["bias"] = module.bias
    before = {k: p.detach().clone() for k, p in named.items()}
    with edit.applied(lm, e):
        return {k: (p.detach() - before[k]) for k, p in named.items()}


def test_the_variants_carry_their_references_defaults():
    ftl, ft, ftm = FTLHparams(), FTHparams(), FTMHparams()
    # ROME hparams/FT/gpt2-xl_constr.json and gpt2-xl_unconstr.json; EasyEdit hparams/FT/llama-7b.yaml + target_new
    assert (ftl.layers, ftl.norm_constraint, ftl.norm_constraint_units, ftl.objective) == (0, 5e-4, "absolute", "prompt_last")
    assert (ft.layers, ft.norm_constraint, ft.objective) == (1, None, "prompt_last")
    assert (ftm.layers, ftm.norm_constraint, ftm.objective, ftm.batch_size) == (21, None, "target_new", 1)
    for hp in (ftl, ft, ftm):
        assert (hp.steps, hp.lr, hp.weight_decay, hp.stop_loss, hp.include_bias) == (25, 5e-4, 0.0, 1e-2, True)
    assert ftl.batch_size == ft.batch_size == 128
    assert {n: edit.get_method(n).hparams for n in ("ft-l", "ft", "ft-m")} == {
        "ft-l": FTLHparams, "ft": FTHparams, "ft-m": FTMHparams}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_the_projection_changes_bias_included_and_revert_is_bit_exact(arch, tokenizer):
    lm = tiny_model(arch, tokenizer)
    module = lm.mlp_out_module(0)
    has_bias = getattr(module, "bias", None) is not None
    assert has_bias == (arch in ("gpt2", "gpt_neox", "gptj"))  # Llama and Qwen2 down_proj have no bias
    state = _state(lm)

    e = edit.compute("ft-l", [ONE_TOKEN], model=lm, layers=0, steps=3)
    assert _same(lm, state)  # computing leaves the model as it was
    expected = ["blocks.0.mlp.out.weight"] + (["blocks.0.mlp.out.bias"] if has_bias else [])
    assert [d.param for d in e.deltas] == expected
    assert all(float(d.dense.abs().max()) > 0 for d in e.deltas)  # the bias is trained too, not carried along

    trained = {id(module.weight)} | ({id(module.bias)} if has_bias else set())
    with edit.applied(lm, e):
        changed = {id(p) for n, p in lm.hf_model.named_parameters() if not torch.equal(p, state[n])}
    assert changed == trained
    assert _same(lm, state)  # reverted bit for bit

    w_only = edit.compute("ft-l", [ONE_TOKEN], model=lm, layers=0, steps=3, include_bias=False)
    assert [d.param for d in w_only.deltas] == ["blocks.0.mlp.out.weight"]


def test_absolute_bound_holds_elementwise_and_binds(gpt2):
    eps = 1e-3
    e = edit.compute("ft-l", [ONE_TOKEN], model=gpt2, layers=0, steps=5, lr=1e-2, norm_constraint=eps)
    raw = _raw_change(gpt2, e)
    assert set(raw) == {"weight", "bias"}
    for k, d in raw.items():
        top = float(d.abs().max())
        assert top <= eps * (1 + 1e-5), k  # ‖ΔP‖_∞ ≤ ε, weight and bias alike
        assert top >= eps * (1 - 1e-3), k  # with lr 10ε the clamp is what stops it
    assert e.hparams["norm_bound"] == {"blocks.0.mlp.out.weight": eps, "blocks.0.mlp.out.bias": eps}


def test_rms_bound_is_relative_to_each_tensors_rms(gpt2):
    rel = 0.05
    module = gpt2.mlp_out_module(0)
    rms = {k: float(getattr(module, k).detach().double().pow(2).mean().sqrt()) for k in ("weight", "bias")}
    assert abs(rms["weight"] - rms["bias"]) > 0.5 * rms["weight"]  # the two tensors have different scales
    e = edit.compute("ft-l", [ONE_TOKEN], model=gpt2, layers=0, steps=5, lr=1e-2, norm_constraint=rel,
                     norm_constraint_units="rms")
    raw = _raw_change(gpt2, e)
    for k, d in raw.items():
        bound = rel * rms[k]  # Eq. (4): ε_P = ε · RMS(P0)
        top = float(d.abs().max())
        assert bound * (1 - 1e-3) <= top <= bound * (1 + 1e-5), k
    w = raw["weight"].double()
    assert float(w.norm()) <= rel * float(module.weight.detach().double().norm()) * (1 + 1e-5)  # ‖ΔW‖_F ≤ ε‖W0‖_F
    assert e.hparams["norm_bound"]["blocks.0.mlp.out.bias"] == pytest.approx(rel * rms["bias"])


def _prompt_last_loss(lm, req) -> float:
    p, t = lm.encode(req.rendered), lm.target_ids(req.target_new, req.rendered)
    with torch.no_grad():
        lp = torch.log_softmax(lm.forward(lm.pad([p]))[0, -1].float(), -1)
    return float(-lp[t].mean())


def _teacher_forced_loss(lm, req, *, prompt_too: bool = False) -> torch.Tensor:
    """Mean NLL of the target tokens given prompt and earlier target tokens; with ``prompt_too`` the
    prompt's own tokens (after the first) are labels as well."""
    p, t = lm.encode(req.rendered), lm.target_ids(req.target_new, req.rendered)
    ids = torch.tensor(p + t)
    labels = ids.clone()
    if not prompt_too:
        labels[: len(p)] = -100
    logits = lm.forward(lm.pad([p + t]))[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


def test_ft_l_reads_every_target_token_at_the_prompts_last_position(gpt2):
    assert len(gpt2.target_ids(MULTI_TOKEN.target_new, MULTI_TOKEN.rendered)) == 3
    ref = _prompt_last_loss(gpt2, MULTI_TOKEN)
    with torch.no_grad():
        forced = float(_teacher_forced_loss(gpt2, MULTI_TOKEN))
    assert abs(ref - forced) > 0.01  # the two objectives differ on this target (rel=1e-5 is 1e-4 here)
    e = edit.compute("ft-l", [MULTI_TOKEN], model=gpt2, layers=0, steps=1)
    assert e.loss_trace[0] == pytest.approx(ref, rel=1e-5)  # Eq. (1), the ROME code's loss
    m = edit.compute("ft-m", [MULTI_TOKEN], model=gpt2, layers=0, steps=1)
    assert m.loss_trace[0] == pytest.approx(forced, rel=1e-5)  # Eq. (2), EasyEdit's target_new


def test_ft_m_gradient_ignores_the_prompt_tokens(gpt2):
    """One Adam step from zero moments moves each entry by -lr·g/(|g|+1e-8): the step shows the
    gradient's sign pattern, which the prompt tokens' loss would change."""
    lr = 1e-3
    module = gpt2.mlp_out_module(0)
    params = [module.weight, module.bias]
    grads = {}
    with gpt2.eval_mode():
        for p in params:
            p.requires_grad_(True)
        for prompt_too in (False, True):
            grads[prompt_too] = torch.autograd.grad(_teacher_forced_loss(gpt2, MULTI_TOKEN, prompt_too=prompt_too), params)
    adam = {k: [-lr * g / (g.abs() + 1e-8) for g in gs] for k, gs in grads.items()}

    e = edit.compute("ft-m", [MULTI_TOKEN], model=gpt2, layers=0, steps=1, lr=lr)
    raw = _raw_change(gpt2, e)
    got = [raw["weight"], raw["bias"]]
    for observed, target_only, with_prompt in zip(got, adam[False], adam[True]):
        assert torch.allclose(observed, target_only, rtol=0, atol=1e-6)
        assert float((observed - with_prompt).abs().max()) > lr  # a prompt-token loss flips signs


def test_each_variant_raises_the_targets_probability(gpt2):
    target = gpt2.target_ids(ONE_TOKEN.target_new, ONE_TOKEN.rendered)[0]

    def p_target():
        return float(gpt2.last_logits([ONE_TOKEN.rendered])[0].softmax(-1)[target])

    before = p_target()
    state = _state(gpt2)
    for name in ("ft-l", "ft", "ft-m"):
        e = fine_tune(ONE_TOKEN, model=gpt2, method=name, layer=0, steps=10)
        assert e.method == name
        with edit.applied(gpt2, e):
            after = p_target()
        assert after > before * 1.05, name
        assert _same(gpt2, state)


def test_batch_size_sets_the_steps_per_epoch(gpt2):
    lr = 1e-3
    reqs = [ONE_TOKEN, OTHER]
    one_step = edit.compute("ft", reqs, model=gpt2, layers=0, steps=1, lr=lr)  # 128 per step: one step
    two_steps = edit.compute("ft", reqs, model=gpt2, layers=0, steps=1, lr=lr, batch_size=1)  # one per step
    assert float(one_step.deltas[0].dense.abs().max()) <= lr * (1 + 1e-4)  # Adam's first step is ≤ lr per entry
    assert float(two_steps.deltas[0].dense.abs().max()) > 1.5 * lr
    assert len(one_step.loss_trace) == len(two_steps.loss_trace) == 1


def test_no_step_below_the_stop_loss(gpt2):
    e = edit.compute("ft", [ONE_TOKEN], model=gpt2, layers=0, steps=5, stop_loss=1e9)
    assert len(e.loss_trace) == 1
    assert all(float(d.dense.abs().max()) == 0.0 for d in e.deltas)


@pytest.mark.parametrize("bad", [{"norm_constraint_units": "maxabs"}, {"objective": "all_tokens"}, {"steps": 0},
                                 {"norm_constraint": -1e-3}, {"batch_size": True}, {"lr": float("nan")}])
def test_bad_hyperparameters_are_refused_before_any_work(gpt2, bad):
    state = _state(gpt2)
    with pytest.raises(InvalidHparamsError):
        edit.compute("ft-l", [ONE_TOKEN], model=gpt2, layers=0, **bad)
    assert _same(gpt2, state)


def test_a_variants_hparams_do_not_run_another_variant(gpt2):
    with pytest.raises(InvalidHparamsError, match="takes FTHparams"):
        edit.compute("ft", [ONE_TOKEN], model=gpt2, hparams=FTLHparams(layers=0))


def test_several_layers_train_jointly(gpt2):
    e = edit.compute("ft", [ONE_TOKEN], model=gpt2, layers=[1, 0], steps=2)
    assert e.layers == [0, 1] and e.hparams["layers"] == [0, 1]
    assert [d.param for d in e.deltas] == ["blocks.0.mlp.out.weight", "blocks.0.mlp.out.bias",
                                           "blocks.1.mlp.out.weight", "blocks.1.mlp.out.bias"]
