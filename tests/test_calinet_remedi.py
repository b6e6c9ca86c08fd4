"""CaliNET and REMEDI (issue 20, added parameters) on the tiny random models, each with its defining
property:

* CaliNET: a memory of extra FFN slots, σ(x K_c) V_c added to the last FFN's output; the model's weights
  never change, the edit takes, one forward equals the hand computation, and reverting is bit-exact;
* REMEDI: a trained linear map from the attribute's representation to a direction added at the subject's
  last token; a trained map lowers the target NLL on held-out requests more than an untrained one,
  prompts without the subject are computed bit-identically, and reverting is bit-exact.
"""

from __future__ import annotations

import math

import pytest
import torch

import edit
from edit import Edit, Request
from edit.methods.calinet import CaliNETHparams, CalibrationMemory, calinet, init_memory
from locate.errors import InvalidHparamsError, LayerOutOfRangeError

EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
EINSTEIN = Request("{} worked in the field of", "Albert Einstein", " cooking")
UNRELATED = ["The capital city in Japan is", "My favourite food is", "Water boils at a high"]


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.hf_model.state_dict().items()}


def _same_state(lm, before) -> bool:
    now = lm.hf_model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@torch.no_grad()
def _logits(lm, prompts):
    return lm.forward(lm.encode_batch(prompts))


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("gpt2", tokenizer)


# ============================================================================================ CaliNET
def test_calinet_memory_is_the_ffn_shaped_term_keeps_the_weights_and_reverts_exactly(tiny):
    lm = tiny
    prompts = UNRELATED + [EIFFEL.rendered, EINSTEIN.rendered]
    before, base = _state(lm), _logits(lm, prompts)
    e = calinet([EIFFEL, EINSTEIN], model=lm, n_slots=16, steps=60)
    assert _same_state(lm, before) and not e.is_applied and e.kinds == ["hook"]
    (m,) = e.hook_modules
    last = lm.n_layers - 1  # the paper's placement: the last FFN
    assert isinstance(m, CalibrationMemory) and m.layer == last and e.layers == [last]
    assert m.keys.shape == (lm.d_model, 16) and m.values.shape == (16, lm.d_model)
    assert e.metrics["efficacy"] == 1.0 and e.loss_trace[-1] < e.loss_trace[0]

    # the same forward by hand: x = the last FFN's input, FFN output + relu(x K_c) V_c
    keep = {}

    def read(x, hook):
        keep["x"] = x
        return x

    def add(y, hook):
        return y + (torch.relu(keep["x"].float() @ m.keys) @ m.values).to(y.dtype)

    with torch.no_grad(), lm.hooks([(f"blocks.{last}.mlp.hook_in", read), (lm.hook_mlp_out(last), add)]):
        by_hand = _logits(lm, prompts)
    with edit.applied(lm, e):
        assert _same_state(lm, before)  # the memory is a hook: no weight changes
        edited = _logits(lm, prompts)
    assert torch.equal(edited, by_hand)
    # σ matters: some slots are negative before the ReLU, so a linear memory would compute other numbers
    with torch.no_grad():
        with lm.hooks([(f"blocks.{last}.mlp.hook_in", read)]):
            _logits(lm, prompts)
        assert bool((keep["x"].float() @ m.keys < 0).any()) and bool((keep["x"].float() @ m.keys > 0).any())
    assert not torch.equal(edited, base)
    assert _same_state(lm, before) and torch.equal(_logits(lm, prompts), base)  # reverted bit-exactly


def test_calinet_defaults_and_initialisation_are_the_references(gpt2):
    hp = CaliNETHparams()
    assert (hp.layers, hp.n_slots, hp.activation, hp.lr, hp.steps, hp.grad_clip, hp.stop_loss) == \
        (None, 64, "relu", 1e-2, 5000, 1.0, None)
    K, V = init_memory(256, 64, torch.Generator().manual_seed(0), torch.float32)
    # nn.Linear's default (Kaiming uniform, a = √5): bound 1/√fan_in, fan_in = d_model for K_c, n for V_c
    assert 0.95 / math.sqrt(256) < K.abs().max() <= 1 / math.sqrt(256)
    assert 0.95 / math.sqrt(64) < V.abs().max() <= 1 / math.sqrt(64)
    with pytest.raises(InvalidHparamsError):
        CaliNETHparams(n_slots=0)
    with pytest.raises(InvalidHparamsError):
        CaliNETHparams(activation="tanh")
    lm = gpt2
    before = _state(lm)
    with pytest.raises(LayerOutOfRangeError):
        calinet(EIFFEL, model=lm, layers=7, steps=2)
    assert _same_state(lm, before)


def test_calinet_training_forwards_are_full_forwards_and_layers_stack(gpt2):
    """The training loss starts at the NLL of the initialised memory in a full forward (training runs
    the blocks from the memory's layer on only); two layers give two memories, trained together."""
    lm = gpt2
    e = calinet(EIFFEL, model=lm, layers=[0, 1], n_slots=8, steps=3, runtime=edit.Runtime(seed=3, check_efficacy=False))
    assert [m.layer for m in e.hook_modules] == [0, 1]
    g = torch.Generator().manual_seed(3)
    init = [CalibrationMemory(l, f"blocks.{l}.mlp.hook_in", lm.hook_mlp_out(l), *init_memory(lm.d_model, 8, g, torch.float32))
            for l in (0, 1)]
    start = Edit("calinet", [], init, lm.fingerprint, lm.name)
    prompt = lm.encode(EIFFEL.rendered)
    target = lm.target_ids(EIFFEL.target_new, EIFFEL.rendered)
    with edit.applied(lm, start), torch.no_grad():
        logp = lm.forward(lm.pad([prompt + target])).float().log_softmax(-1)[0]
    nll = -logp[torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target)), torch.tensor(target)].mean()
    assert e.loss_trace[0] == pytest.approx(float(nll), abs=1e-5)
    # a stop loss above the initial loss stops before the first step: the memory is its initialisation
    s = calinet(EIFFEL, model=lm, layers=[0, 1], n_slots=8, steps=50, stop_loss=1e9,
                runtime=edit.Runtime(seed=3, check_efficacy=False))
    assert s.metrics["stopped_at"] == 0
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(s.hook_modules, init))


def test_calinet_edit_saves_and_loads(gpt2, tmp_path):
    lm = gpt2
    e = calinet(EIFFEL, model=lm, n_slots=8, steps=20, runtime=edit.Runtime(check_efficacy=False))
    loaded = Edit.load(e.save(tmp_path / "c.safetensors"), lm)
    assert loaded.id == e.id
    with edit.applied(lm, e):
        a = _logits(lm, UNRELATED)
    with edit.applied(lm, loaded):
        assert torch.equal(_logits(lm, UNRELATED), a)
