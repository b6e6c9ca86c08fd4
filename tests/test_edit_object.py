"""`Edit` objects: bit-exact revert, composition order, save/load, fingerprint refusal."""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Edit, EditStateError, Request, WeightDelta
from locate.errors import CacheCorruptedError, EmptyTargetError, FingerprintMismatchError, LocateEditError
from locate.testing import tiny_model


@pytest.fixture
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)


def _random_edit(lm, layers, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    deltas = [WeightDelta.compact(l, torch.randn(lm.d_model, lm.d_mlp, generator=g) * 0.1, rank=rank) for l in layers]
    req = Request("{} is located in", "The Eiffel Tower", " Rome")
    return Edit("test", [req], deltas, lm.fingerprint, lm.name)


def _weights(lm):
    return [lm.mlp_out_weight(l).clone() for l in range(lm.n_layers)]


def test_apply_changes_only_edited_layer_and_revert_is_bit_exact(gpt2):
    before = _weights(gpt2)
    e = _random_edit(gpt2, [1]).apply(gpt2)
    after = _weights(gpt2)
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    torch.testing.assert_close(after[1] - before[1], e.deltas[0].matrix())
    e.revert(gpt2)
    assert all(torch.equal(a, b) for a, b in zip(_weights(gpt2), before))


def test_edits_compose_and_revert_in_reverse_order(gpt2):
    before = _weights(gpt2)
    e1, e2 = _random_edit(gpt2, [0, 1], seed=1), _random_edit(gpt2, [1], seed=2)
    e1.apply(gpt2)
    e2.apply(gpt2)
    with pytest.raises(EditStateError, match="reverse order"):
        e1.revert(gpt2)
    with pytest.raises(EditStateError, match="already applied"):
        e2.apply(gpt2)
    e2.revert(gpt2)
    e1.revert(gpt2)
    assert all(torch.equal(a, b) for a, b in zip(_weights(gpt2), before))
    with pytest.raises(EditStateError, match="not applied"):
        e1.revert(gpt2)


def test_context_manager(gpt2):
    before = _weights(gpt2)
    e1, e2 = _random_edit(gpt2, [0], seed=1), _random_edit(gpt2, [0], seed=2)
    with edit.applied(gpt2, e1, e2):
        assert e1.is_applied and e2.is_applied
        assert not torch.equal(gpt2.mlp_out_weight(0), before[0])
    assert all(torch.equal(a, b) for a, b in zip(_weights(gpt2), before))


def test_low_rank_storage_is_exact_and_smaller():
    m = torch.randn(64, 1) @ torch.randn(1, 256)
    d = WeightDelta.compact(3, m, rank=1)
    assert d.rank == 1 and d.dense is None
    torch.testing.assert_close(d.matrix(), m, rtol=1e-5, atol=1e-5)
    assert WeightDelta.compact(3, m).dense is not None


def test_save_load_roundtrip(gpt2, tmp_path):
    e = _random_edit(gpt2, [0, 1], rank=None)
    e.metrics["efficacy"] = 1.0
    e.loss_trace = [3.0, 1.0, 0.1]
    path = e.save(tmp_path / "e.safetensors")
    back = Edit.load(path, gpt2)
    assert back.method == "test" and back.layers == [0, 1] and back.requests == e.requests
    assert back.metrics == {"efficacy": 1.0} and back.loss_trace == [3.0, 1.0, 0.1]
    for a, b in zip(back.deltas, e.deltas):
        assert torch.equal(a.matrix(), b.matrix())
    before = _weights(gpt2)
    back.apply(gpt2)
    e.apply(gpt2)
    e.revert(gpt2)
    back.revert(gpt2)
    assert all(torch.equal(a, b) for a, b in zip(_weights(gpt2), before))


def test_fingerprint_mismatch_refused(gpt2, tokenizer, tmp_path):
    other = tiny_model("gpt2", tokenizer, seed=1)
    e = _random_edit(gpt2, [0])
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        e.apply(other)
    path = e.save(tmp_path / "e.safetensors")
    with pytest.raises(FingerprintMismatchError):
        Edit.load(path, other)
    before = _weights(other)
    assert all(torch.equal(a, b) for a, b in zip(_weights(other), before))


def test_corrupted_edit_file(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CacheCorruptedError, match="not a readable"):
        Edit.load(p)


def test_request_validation(gpt2):
    with pytest.raises(edit.InvalidRequestError, match="exactly one"):
        Request("{} is in {}", "Paris", " France").check()
    with pytest.raises(edit.InvalidRequestError, match="exactly one"):
        Request("Paris is in", "Paris", " France").check()
    with pytest.raises(EmptyTargetError):
        Request("{} is in", "Paris", " ").check()
    r = Request("{} is located in the city of", "The Eiffel Tower", " Rome").check(gpt2)
    assert r.rendered == "The Eiffel Tower is located in the city of"


def test_state_fingerprint_names_the_applied_edits_and_keys_the_caches(gpt2):
    from locate.loading import derived_cache_key

    base_fp, base_key = gpt2.state_fingerprint, derived_cache_key(gpt2)
    assert base_fp == gpt2.fingerprint
    e = _random_edit(gpt2, [1]).apply(gpt2)
    assert gpt2.state_fingerprint != base_fp and derived_cache_key(gpt2) != base_key  # nothing cached as unedited
    e.revert(gpt2)
    assert gpt2.state_fingerprint == base_fp and derived_cache_key(gpt2) == base_key


def test_an_edit_computed_on_top_of_another_needs_it(gpt2):
    first = _random_edit(gpt2, [0], seed=1).apply(gpt2)
    second = _random_edit(gpt2, [1], seed=2)
    second.parents = [first.id]
    first.revert(gpt2)
    with pytest.raises(FingerprintMismatchError, match="computed on top of"):
        second.apply(gpt2)
    with edit.applied(gpt2, first, second):
        assert [e.id for e in gpt2.applied_edits] == [first.id, second.id]


def test_damaged_or_non_finite_edit_files_are_refused(gpt2, tmp_path):
    e = _random_edit(gpt2, [1])
    path = e.save(tmp_path / "e.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the tensor data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptedError, match="checksum"):
        Edit.load(bad)
    before = _weights(gpt2)
    nan = _random_edit(gpt2, [1])
    nan.deltas[0].dense[0, 0] = float("nan")
    with pytest.raises(LocateEditError, match="not finite"):
        nan.apply(gpt2)
    assert all(torch.equal(a, b) for a, b in zip(_weights(gpt2), before)) and not gpt2.applied_edits
