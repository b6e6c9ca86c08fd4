"""Sequential editing: batches land on top of each other, checkpoints call back, the whole sequence
reverts bit-exactly, and a failure midway leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from edit import Request
import edit
from edit.eval.sequential import _checkpoint_counts, sequential


def _weights(lm):
    return [lm.mlp_out_weight(l).clone() for l in range(lm.n_layers)]


def _same(lm, ws):
    return all(torch.equal(lm.mlp_out_weight(l), w) for l, w in enumerate(ws))


def test_checkpoint_counts_snap_to_batch_boundaries():
    assert _checkpoint_counts(None, 10, 4) == [4, 8, 10]
    assert _checkpoint_counts([1, 5, 10], 10, 4) == [4, 8, 10]
    assert _checkpoint_counts(2, 10, 1) == [2, 4, 6, 8, 10]
    with pytest.raises(ValueError):
        _checkpoint_counts([11], 10, 1)


def _requests(lm, n):
    """n distinct, well-formed requests built from the model's vocabulary (no data files needed)."""
    words = [" Rome", " Paris", " Berlin", " Tokyo", " Cairo", " Lima", " Oslo", " Madrid", " Athens", " Dublin"]
    subjects = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet"]
    return [Request("{} is located in the city of", f"{subjects[i % 10]} {i}", words[i % 10]) for i in range(n)]


def test_100_sequential_rome_edits_revert_bit_exactly(lm, shared_data):
    """100 ROME edits, one after another, with cheap settings (1 v* step, 2 templates, small statistics):
    reverting the run restores every weight bit for bit."""
    from edit.stats import key_second_moments

    st = key_second_moments(lm, [5], corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw",
                            n_tokens=6000, progress=False)
    ws = _weights(lm)
    seen = []
    run = sequential(_requests(lm, 100), "rome", batch_size=10, model=lm, checkpoints=[50, 100], progress=False,
                     hparams={"layers": 5, "v_steps": 1, "template_lengths": ((5, 1),)},
                     runtime=edit.Runtime(stats=st, check_efficacy=False),  # this test is about revert, not efficacy
                     callback=lambda m, r: seen.append(r.n_edits) or r.n_edits)
    assert len(run.edits) == 100 and run.n_edits == 100
    assert seen == [50, 100] and [c.value for c in run.checkpoints] == [50, 100]
    assert not _same(lm, ws)
    run.revert()
    assert _same(lm, ws)


def test_failure_midway_reverts_the_edits_made_so_far(lm):
    from dataclasses import dataclass

    from edit.edit import Edit, WeightDelta

    calls = []

    @dataclass
    class FakeHparams:
        scale: float = 1e-3

    def fake(lm_, requests, hp, rt):  # a stand-in batched method: rank-1 nudge, fails on the third batch
        calls.append(len(requests))
        if len(calls) == 3:
            raise RuntimeError("boom")
        return Edit("fake", list(requests), [WeightDelta(2, left=torch.ones(lm.d_model, 1) * hp.scale,
                                                          right=torch.ones(1, lm.d_mlp))], lm_.fingerprint)

    edit.register("_fake", FakeHparams, batched=True, layers=None, description="test stand-in")(fake)
    ws = _weights(lm)
    with pytest.raises(RuntimeError, match="boom"):
        sequential(_requests(lm, 10), "_fake", batch_size=4, model=lm, progress=False)
    assert calls == [4, 4, 2] and _same(lm, ws)
    run = sequential(_requests(lm, 8), "_fake", batch_size=4, model=lm, progress=False)
    assert len(run.edits) == 2 and not _same(lm, ws)
    run.revert()
    assert _same(lm, ws)
