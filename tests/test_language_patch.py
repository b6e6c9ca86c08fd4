"""Language Patch (Murty et al. 2022): "If <condition>, then <consequence>" patches behind a trained gate.

The gate (a head on frozen all-MiniLM-L6-v2 embeddings of condition and input) is trained tiny here:
on a sample of the paper's gating data (it must separate held-out applies / does-not-apply pairs) and
on the tests' toy editing records (subject conditions) for the editing properties: an input the gate
rejects runs bit-identically to the base model; an input it accepts is read with the patch's
consequence before it ("patch: {q}. Input: {x}", the reference's prompt); a missing gate fails with
the command that trains it; revert is exact."""

from __future__ import annotations

import json

import pytest
import torch

import edit
from edit import Edit, Request
from edit.methods.language_patch import (
    GATE_DATA,
    InvalidPatchError,
    LanguagePatchHparams,
    Patch,
    PatchGate,
    load_gate_data,
    split_instances,
    train_language_patch,
)
from edit.training import TrainedEditorMissingError
from locate.errors import InvalidHparamsError, LocateEditError
from locate.testing import tiny_model

EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
PREFIX = "patch: The Eiffel Tower is located in the city of Rome. Input: "
UNRELATED = ["My favourite food is", "The capital of France is", "Water is made of hydrogen and"]
TOY = {"train_data": "toy", "train_if_missing": True, "train_steps": 60, "batch_size": 8, "lr": 1e-2, "hidden": 32,
       "val_fraction": 0.25, "eval_every": 30, "checkpoint_every": 30}


@pytest.fixture(scope="module")
def small(tokenizer):
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def rt(shared_data):
    return edit.Runtime(data_dir=shared_data, check_efficacy=False)


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lp-gate")


@pytest.fixture(autouse=True)
def _clean(small):
    yield
    while small.applied_edits:
        small.applied_edits[-1].revert(small)


def _edit(small, rt, gate_dir, requests=(EIFFEL,), **hp) -> Edit:
    return edit.compute("language-patch", list(requests), model=small, hparams={**TOY, "editor": str(gate_dir), **hp},
                        runtime=rt)


def _state(lm):
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


# ====================================================================== the gate
def test_tiny_gate_separates_held_out_pairs_of_the_papers_data(small, shared_data, tmp_path):
    """Trained on 600 instances of synthetic_data_applies.json (80/20 split of the unique instances, one
    positive and one other-condition negative per instance, as the reference builds its gating data),
    the gate's balanced accuracy on the held-out instances' pairs is far above chance (0.5)."""
    data = load_gate_data(shared_data / GATE_DATA)
    assert len(data.conditions) == 84 and len(data.applies) == 9456  # the paper's file as stored
    hp = LanguagePatchHparams(max_texts=600, train_steps=200, batch_size=32, eval_every=100, checkpoint_every=100)
    before = train_language_patch(small, data, hp, steps=0, out=tmp_path / "untrained", progress=False)
    after = train_language_patch(small, data, hp, out=tmp_path / "trained", progress=False)
    assert after.config["n_train"] == 480 and after.config["n_val"] == 120
    bal = lambda c: (c["edit_success"] + c["locality"]) / 2  # noqa: E731
    assert abs(bal(before.curve[-1]) - 0.5) < 0.15  # the untrained head: about chance
    assert bal(after.curve[-1]) > 0.75, after.curve
    # the held-out instances are not trained on
    train, val = split_instances(data, 0.2, 0)
    assert not set(train) & set(val) and len(val) == 9456 - int(9456 * 0.8)


def test_patch_parses_like_the_reference():
    """The reference's ``dissect``: condition before the comma without "If", consequence without "then"."""
    p = Patch.parse("If food is described as good, then label is positive")
    assert (p.condition, p.consequence) == ("food is described as good", "label is positive")
    assert str(p) == "If food is described as good, then label is positive"
    assert Patch.parse("if the city is Washington, D.C., then it is the capital.").condition == "the city is Washington, D.C."
    with pytest.raises(InvalidPatchError):
        Patch.parse("food is good so label is positive")


# ====================================================================== the edit
def test_rejected_inputs_run_bit_identical_and_accepted_inputs_read_the_consequence(small, rt, gate_dir):
    params = _state(small)
    base = {p: small.last_logits([p])[0].clone() for p in UNRELATED}
    patched_base = small.last_logits([PREFIX + EIFFEL.rendered])[0].clone()  # the interpreter: LM on "q, x"
    e = _edit(small, rt, gate_dir)
    gate = e.interventions[0]
    assert isinstance(gate, PatchGate) and e.kinds == ["input"]
    assert e.metrics["patches"] == ["If the input is about The Eiffel Tower, then The Eiffel Tower is located in "
                                    "the city of Rome"]
    g_own = e.metrics["gate"][0]
    assert g_own > 0.5 and g_own == pytest.approx(gate.gate(EIFFEL.rendered)[1])
    with edit.applied(small, e):
        assert small.transform(EIFFEL.rendered) == PREFIX + EIFFEL.rendered
        assert torch.equal(small.last_logits([EIFFEL.rendered])[0], patched_base)
        for p in UNRELATED:
            assert gate.gate(p)[1] < 0.5
            assert small.transform(p) == p and small.encode(p) == small.encode(p, raw=True)
            assert torch.equal(small.last_logits([p])[0], base[p])  # rejected: bit-identical
    assert all(torch.equal(a, b) for a, b in zip(params, _state(small)))


def test_threshold_decides_hard_gating(small, rt, gate_dir):
    """The patch is applied where g(x, c) > threshold, strictly: at threshold g the request's own prompt
    is rejected; at threshold 0 every input reads the consequence."""
    g = _edit(small, rt, gate_dir).metrics["gate"][0]
    assert _edit(small, rt, gate_dir, threshold=g).interventions[0].prefix(EIFFEL.rendered) == ""
    assert _edit(small, rt, gate_dir, threshold=0.0).interventions[0].prefix(UNRELATED[0]) == PREFIX


def test_explicit_patches_pick_the_highest_gate(small, rt, gate_dir):
    """Several patches: the one whose condition scores highest is applied (the reference's argmax)."""
    col = Request("{} is located in the city of", "The Louvre", " Lima")
    e = _edit(small, rt, gate_dir, requests=[EIFFEL, col],
              patches=["If the input is about The Eiffel Tower, then The Eiffel Tower is in Rome",
                       "If the input is about The Louvre, then The Louvre is in Lima"])
    gate = e.interventions[0]
    assert gate.gate(EIFFEL.rendered)[0] == 0 and gate.gate(col.rendered)[0] == 1
    assert gate.prefix(col.rendered) == "patch: The Louvre is in Lima. Input: "
    with pytest.raises(InvalidHparamsError, match="one per request"):
        _edit(small, rt, gate_dir, patches=["If a, then b", "If c, then d"])
    with pytest.raises(InvalidHparamsError, match="If <condition>, then <consequence>"):
        _edit(small, rt, gate_dir, patches=["no patch here"])


def test_missing_gate_names_the_training_command(small, rt, tmp_path):
    state = _state(small)
    with pytest.raises(TrainedEditorMissingError) as got:
        edit.compute("language-patch", [EIFFEL], model=small, runtime=rt,
                     hparams={"editor": str(tmp_path / "none"), "max_texts": 50})
    cmd = got.value.command
    assert cmd.startswith("locate-edit train language-patch --data ") and cmd.endswith(
        "synthetic_data_applies.json --model tiny-llama --hparam max_texts=50")
    assert cmd in str(got.value) and isinstance(got.value, LocateEditError)
    assert all(torch.equal(a, b) for a, b in zip(state, _state(small)))


def test_revert_is_exact_and_save_load_round_trips(small, rt, gate_dir, tmp_path):
    state, base, tokens = _state(small), small.last_logits([EIFFEL.rendered])[0].clone(), small.encode(EIFFEL.rendered)
    e = _edit(small, rt, gate_dir)
    with edit.applied(small, e):
        edited = small.last_logits([EIFFEL.rendered])[0].clone()
    assert not torch.equal(edited, base)
    assert torch.equal(small.last_logits([EIFFEL.rendered])[0], base) and small.encode(EIFFEL.rendered) == tokens
    assert all(torch.equal(a, b) for a, b in zip(state, _state(small)))
    loaded = Edit.load(e.save(tmp_path / "lp.safetensors"), small)
    assert loaded.id == e.id
    with edit.applied(small, loaded):
        assert torch.equal(small.last_logits([EIFFEL.rendered])[0], edited)


def test_bad_hyperparameters_are_refused():
    for bad in ({"threshold": 1.5}, {"interpreter_prompt": "no field here"}, {"interpreter_prompt": "{other}{consequence}"},
                {"condition": "{nope}"}, {"max_texts": 2}, {"patches": ["If a then b"]}):
        with pytest.raises(InvalidHparamsError):
            LanguagePatchHparams(**bad)


def test_the_command_line_trains_the_gate_on_the_papers_gating_format(tmp_path, capsys):
    """``locate-edit train language-patch --data`` reads the gating file (a JSON object, not editing
    records) through the method's own loader and writes the gate where ``--out`` says."""
    from locate_edit.cli import main as cli_main

    foods = ["good", "nice", "awful", "bad", "great", "terrible"]
    instances = [f"The {w} was {a}" for w in ("food", "service") for a in foods]
    explanations = [f"{w} is described as {'good' if a in ('good', 'nice', 'great') else 'bad'}"
                    for w in ("food", "service") for a in foods]
    data = tmp_path / "applies.json"
    data.write_text(json.dumps({"instances": instances, "explanations": explanations}))
    out = tmp_path / "gate"
    assert cli_main(["train", "language-patch", "--data", str(data), "--steps", "4", "--out", str(out), "--quiet",
                     "--hparam", "batch_size=4", "--hparam", "eval_every=2", "--hparam", "checkpoint_every=2",
                     "--hparam", "hidden=8"]) == 0
    assert "trained language-patch editor" in capsys.readouterr().out
    assert (out / "training_curve.json").is_file()
