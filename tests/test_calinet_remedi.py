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
from edit.methods.remedi import REMEDIDirections, REMEDIHparams, directions_edit
from edit.training import TrainedEditor, TrainedEditorMissingError
from locate.errors import InvalidHparamsError, LayerOutOfRangeError
from locate.hooks import capture

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


# ============================================================================================= REMEDI
HELD_OUT = [Request("{} is located in the city of", s, t) for s, t in
            [("Big Ben", " Tokyo"), ("The Great Wall", " Berlin"), ("Lake Como", " Cairo"), ("Jane Austen", " Oslo"),
             ("The Danube", " Paris"), ("Mount Etna", " Madrid")]]  # subjects the toy training set never names
TINY_REMEDI = {"train_data": "toy", "train_if_missing": True, "train_steps": 100, "batch_size": 4, "lr": 0.1,
               "eval_every": 100, "checkpoint_every": 100, "layer": 0}


@pytest.fixture(scope="module")
def llama(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def remedi_editor(llama, tmp_path_factory):
    """A tiny REMEDI editor trained on the toy records (train split only), in its own folder."""
    folder = tmp_path_factory.mktemp("remedi-editor")
    edit.compute("remedi", HELD_OUT[:1], model=llama, hparams={**TINY_REMEDI, "editor": str(folder)},
                 runtime=edit.Runtime(check_efficacy=False))
    return folder


def _first_token_nll(lm, e: Edit, requests) -> float:
    out = []
    with edit.applied(lm, e):
        for r in requests:
            logp = lm.last_logits([r.rendered])[0].float().log_softmax(-1)
            out.append(-float(logp[lm.target_ids(r.target_new, r.rendered)[0]]))
    return sum(out) / len(out)


def test_remedi_trained_map_lowers_the_held_out_target_nll_more_than_untrained_maps(llama, remedi_editor):
    lm = llama
    hp = REMEDIHparams(**{k: v for k, v in TINY_REMEDI.items() if k != "train_if_missing"}, editor=str(remedi_editor))
    trained = edit.compute("remedi", HELD_OUT, model=lm, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    D = lm.d_model
    zero = directions_edit(lm, HELD_OUT, torch.zeros(D, D), torch.zeros(D), hp)  # d = 0: the model itself
    identity = directions_edit(lm, HELD_OUT, torch.eye(D), torch.zeros(D), hp)  # d = a: the attribute itself
    nll_trained, nll_zero, nll_identity = (_first_token_nll(lm, e, HELD_OUT) for e in (trained, zero, identity))
    # the tiny random model moves little through one random attention layer; the trained map still
    # lowers the held-out NLL by a clear margin where the untrained maps do not
    assert nll_trained < nll_zero - 0.02 and nll_trained < nll_identity - 0.02
    assert abs(nll_identity - nll_zero) < 0.01


def test_remedi_adds_the_mapped_direction_at_the_subject_only_and_reverts_exactly(llama, remedi_editor):
    lm = llama
    hp = REMEDIHparams(**{k: v for k, v in TINY_REMEDI.items() if k != "train_if_missing"}, editor=str(remedi_editor))
    r = HELD_OUT[0]
    before = _state(lm)
    e = edit.compute("remedi", [r], model=lm, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    (m,) = e.hook_modules
    assert isinstance(m, REMEDIDirections) and e.kinds == ["hook"] and e.layers == [0] and _same_state(lm, before)

    # (1)-(2) by hand: the mean of block 0's output over the attribute's tokens of the context, mapped
    ctx = r.rendered + r.target_new
    a0, a1 = lm.subject_span(ctx, "is located in the city of" + r.target_new)
    site = lm.hook_resid(0)
    with torch.no_grad(), capture(lm, site) as got:
        lm.forward(lm.encode_batch([ctx]))
    attr = got[site][0, a0:a1].float().mean(0)
    art = TrainedEditor.load("remedi", _key_of(lm, hp), remedi_editor)
    d = attr @ art.tensors["w.weight"].T + art.tensors["w.bias"]
    assert torch.allclose(m.directions[0], d, atol=1e-6)

    # (3): with the edit, block 0's output moves by d at the subject's last token, and nowhere else
    with_subject = ["Big Ben is located in the city of", "Where is Big Ben? It is in the city of"]
    without = ["The capital city in Japan is", "My favourite food is", "Big Bend is"]  # "Big Bend": not the subject
    keep = {}

    def grab(x, hook):
        keep["h"] = x.detach().clone()
        return x

    base = _logits(lm, with_subject + without)
    with torch.no_grad(), lm.hooks([(site, grab)]):
        lm.forward(lm.encode_batch(with_subject))
    h_base = keep["h"]
    with edit.applied(lm, e):
        assert _same_state(lm, before)
        edited = _logits(lm, with_subject + without)
        with torch.no_grad(), lm.hooks([(site, grab)]):
            lm.forward(lm.encode_batch(with_subject))
    moved = keep["h"] - h_base
    for i, p in enumerate(with_subject):
        last = lm.subject_span(p, "Big Ben")[1] - 1
        assert torch.allclose(moved[i, last], d, atol=1e-5)
        others = [t for t in range(moved.shape[1]) if t != last]
        assert torch.equal(moved[i, others], torch.zeros_like(moved[i, others]))
    n = len(with_subject)
    assert not torch.equal(edited[:n], base[:n])
    assert torch.equal(edited[n:], base[n:])  # prompts without the subject: bit-identical
    for p in without:  # also alone: the hook returns its input itself
        with edit.applied(lm, e):
            alone = _logits(lm, [p])
        assert torch.equal(alone, _logits(lm, [p]))
    assert _same_state(lm, before) and torch.equal(_logits(lm, with_subject + without), base)  # reverted exactly


def test_remedi_without_a_trained_editor_names_the_training_command(llama, shared_data, tmp_path):
    lm = llama
    before = _state(lm)
    with pytest.raises(TrainedEditorMissingError) as err:
        edit.compute("remedi", [EIFFEL], model=lm, hparams={"editor": str(tmp_path / "none")},
                     runtime=edit.Runtime(data_dir=shared_data))
    cmd = err.value.command
    assert cmd.startswith("locate-edit train remedi --data ") and cmd.split()[4].endswith("counterfact-train.json")
    assert "--model tiny-llama" in cmd and str(err.value).endswith(cmd)
    assert _same_state(lm, before)
    hp = REMEDIHparams()
    assert (hp.layer, hp.lr, hp.batch_size, hp.lam_m, hp.lam_u, hp.lam_kl, hp.alpha, hp.beta, hp.val_fraction) == \
        (1, 1e-3, 16, 1.0, 1.0, 10.0, 1.0, 1.0, 0.1)
    with pytest.raises(InvalidHparamsError):
        REMEDIHparams(lam_kl=-1.0)


def _key_of(lm, hp):
    from edit.training import editor_key, key_hparams, records_digest, toy_records

    return editor_key("remedi", lm, records_digest(toy_records()), key_hparams(hp, ("alpha", "beta")))
