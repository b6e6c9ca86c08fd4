"""The editor protocol's conformance suite: every registered method, on every tiny architecture.

A new method passes this suite by registering (with cheap ``smoke`` hyperparameters); nothing here
names a method. For each (method, architecture) the method must:

1. return an unapplied :class:`edit.Edit` and leave the model bit-identical until it is applied;
2. change the model's output for the request once applied;
3. revert bit-exactly (weights, outputs and tokenization);
4. round-trip through save/load (the loaded edit changes the output exactly as the original);
5. be refused on a model with another fingerprint;
6. revert correctly when stacked on edits of the other kinds (a hook module and an input transform).
"""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Edit, HookModule, PrefixText, Request
from locate.errors import FingerprintMismatchError
from locate.testing import ARCHITECTURES, tiny_model

METHODS = sorted(edit.methods())
REQUEST = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
PROBES = [REQUEST.rendered, "The Colosseum is located in the city of", "My favourite food is"]


class Shift(HookModule):
    """A test hook module: adds a fixed vector to one layer's MLP output."""

    type_name = "test-shift"

    def __init__(self, hook: str, vector: torch.Tensor):
        super().__init__()
        self.hook = hook
        self.register_buffer("vector", vector)

    def hook_fns(self):
        return {self.hook: lambda x: x + self.vector.to(x.dtype)}

    def config(self):
        return {"hook": self.hook}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["hook"], tensors["vector"])


_MODELS: dict = {}


@pytest.fixture(params=ARCHITECTURES)
def arch_lm(request, tokenizer):
    if request.param not in _MODELS:
        _MODELS[request.param] = tiny_model(request.param, tokenizer)
    lm = _MODELS[request.param]
    yield lm
    assert not lm.applied_edits, "a test left an edit applied"


@pytest.fixture(scope="module")
def runtime(shared_data):
    return edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw", data_dir=shared_data)


def _hparams(method: edit.EditMethod, lm) -> dict:
    hp = dict(method.smoke)
    if method.layers is not None:  # tiny models have 2 layers; edit the first. (An optimisation target at
        hp["layers"] = [0]            # the last block's output does not reach the loss on the tiny models.)
    return hp


def _state(lm) -> list[torch.Tensor]:
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def _same_state(lm, state) -> bool:
    return all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), state))


@torch.no_grad()
def _outputs(lm) -> list[torch.Tensor]:
    return [lm.last_logits([p])[0].clone() for p in PROBES]


def _same_outputs(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _compute(name, lm, runtime) -> Edit:
    m = edit.get_method(name)
    return edit.compute(m, [REQUEST], model=lm, hparams=_hparams(m, lm), runtime=runtime)


@pytest.mark.parametrize("name", METHODS)
def test_method_conforms(name, arch_lm, runtime, tmp_path, tokenizer):
    lm = arch_lm
    state, base, tokens = _state(lm), _outputs(lm), lm.encode(PROBES[1])

    # 1. an unapplied Edit; the model is untouched
    e = _compute(name, lm, runtime)
    assert isinstance(e, Edit) and not e.is_applied and e.fingerprint == lm.fingerprint
    assert _same_state(lm, state) and _same_outputs(_outputs(lm), base)

    # 2. applied, it changes the output for the request
    with edit.applied(lm, e):
        edited = _outputs(lm)
        assert lm.applied_edits == [e]
    assert not torch.equal(edited[0], base[0]), f"{name} did not change the output for its request"

    # 3. reverted, everything is bit-identical
    assert _same_state(lm, state) and _same_outputs(_outputs(lm), base) and lm.encode(PROBES[1]) == tokens

    # 4. save/load: the loaded edit does exactly what the original did
    loaded = Edit.load(e.save(tmp_path / "e.safetensors"), lm)
    assert loaded.id == e.id and loaded.kinds == e.kinds
    with edit.applied(lm, loaded):
        assert _same_outputs(_outputs(lm), edited)
    assert _same_state(lm, state)

    # 5. refused on another model (same architecture, other weights)
    other = tiny_model(_arch_of(lm), tokenizer, seed=1)
    with pytest.raises(FingerprintMismatchError):
        e.apply(other)
    with pytest.raises(FingerprintMismatchError):
        Edit.load(tmp_path / "e.safetensors", other)


@pytest.mark.parametrize("name", METHODS)
def test_method_stacks_with_the_other_kinds(name, arch_lm, runtime):
    """Computed on a model carrying a hook-module edit and an input-transform edit, the method's edit
    records them as its parents, is refused without them, and everything reverts bit-exactly."""
    lm = arch_lm
    state, base = _state(lm), _outputs(lm)
    g = torch.Generator().manual_seed(0)
    hook = Edit("test-hook", [], [Shift(lm.hook_mlp_out(1), torch.randn(lm.d_model, generator=g) * 0.01)],
                lm.fingerprint, lm.name)
    prefix = Edit("test-prefix", [], [PrefixText("Facts follow. ")], lm.fingerprint, lm.name)
    hook.apply(lm)
    prefix.apply(lm)
    try:
        under = _outputs(lm)
        e = _compute(name, lm, runtime)
        assert e.parents == [hook.id, prefix.id]
        e.apply(lm)
        assert not torch.equal(_outputs(lm)[0], under[0])
        e.revert(lm)
        assert _same_outputs(_outputs(lm), under)
    finally:
        prefix.revert(lm)
        hook.revert(lm)
    assert _same_state(lm, state) and _same_outputs(_outputs(lm), base)
    with pytest.raises(FingerprintMismatchError, match="computed on top of"):
        e.apply(lm)  # its parents are no longer applied
    assert _same_state(lm, state)


def _arch_of(lm) -> str:
    return lm.name.removeprefix("tiny-")


def test_every_method_is_documented():
    for name, description in edit.methods().items():
        m = edit.get_method(name)
        assert description and name == name.lower()
        assert m.compute_fn.__doc__, f"{name}'s compute function has no docstring"
        assert m.hparams.__doc__, f"{name}'s hyperparameters have no docstring"


_HALF: dict = {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", METHODS)
def test_method_in_half_precision(name, dtype, runtime, tokenizer):
    """On a bf16 or fp16 model (the Llama tiny architecture) every method computes a finite edit whose
    weight deltas are stored in the dtype of the weight they change, changes the request's output, and
    reverts bit-exactly in that dtype."""
    if dtype not in _HALF:
        _HALF[dtype] = tiny_model("llama", tokenizer, dtype=dtype)
    lm = _HALF[dtype]
    state, base = _state(lm), _outputs(lm)
    e = _compute(name, lm, runtime)
    for d in e.deltas:
        assert d.matrix().dtype == lm.parameter(d.name).dtype == dtype
    assert _same_state(lm, state)
    with edit.applied(lm, e):
        edited = _outputs(lm)
    assert all(torch.isfinite(x).all() for x in edited)
    assert not torch.equal(edited[0], base[0]), f"{name} did not change the output for its request in {dtype}"
    assert _same_state(lm, state) and _same_outputs(_outputs(lm), base)
