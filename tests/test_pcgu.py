"""PCGU (edit/methods/pcgu.py), its bias data loaders and the bias score, on tiny models."""

from __future__ import annotations

import pytest
import torch

import edit
from edit.eval import bias, datasets
from edit.methods import pcgu
from edit.request import InvalidRequestError
from locate.errors import InvalidHparamsError
from locate.testing import tiny_model

PAIR = edit.Request("The {} told the customer that", "technician", " she", " he")  # target_true: advantaged
QUICK = edit.Runtime(check_efficacy=False)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def small(request, tokenizer):
    return tiny_model(request.param, tokenizer)


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.hf_model.state_dict().items()}


def test_changes_only_the_selected_partitions(small):
    """One step: the rows that move are exactly the k of lowest gradient cosine (computed here on their
    own), in output-unit orientation on every architecture (GPT-2's Conv1D read transposed); every
    other row of every parameter is bit-identical once the edit is applied."""
    lm, k = small, 40
    table = pcgu.candidate_parameters(lm)
    rows_d = [(lm.encode(PAIR.rendered), lm.target_ids(PAIR.target_new, PAIR.rendered))]
    rows_a = [(lm.encode(PAIR.rendered), lm.target_ids(PAIR.target_true, PAIR.rendered))]
    with lm.eval_mode():
        for e in table:
            e.param.requires_grad_(True)
        g_d, g_a = pcgu.pair_gradients(lm, table, rows_d, rows_a, "logprob")
    sims, index = pcgu.partition_similarities(g_d, g_a, table, "input")
    expected = pcgu.select_partitions(sims, index, k)
    assert sum(len(r) for r in expected.values()) == k

    before = {e.name: e.param.detach().clone() for e in table}
    e = edit.compute("pcgu", [PAIR], model=lm, runtime=QUICK, k=k, epochs=1, lr=0.05)
    assert e.metrics["selected_rows"] == {n: sorted(r) for n, r in expected.items()}
    with edit.applied(lm, e):
        moved = 0
        for entry in table:
            now = pcgu.as_partitions(entry.param.detach(), entry.transposed, "input")
            old = pcgu.as_partitions(before[entry.name], entry.transposed, "input")
            changed = {int(r) for r in torch.nonzero((now != old).any(-1)).flatten()}
            assert changed <= set(expected.get(entry.name, [])), entry.name
            moved += len(changed)
    assert moved > k // 2  # the selected rows (reached by the gradient) do move
    if lm.name == "tiny-gpt2":  # the fused qkv is partitioned once, through its q, k, v views
        names = [t.name for t in table]
        assert not any(".qkv." in n for n in names) and any(".attn.q._original_component.weight" in n for n in names)


def test_ranking_is_by_gradient_cosine_not_size():
    """Hand-built gradients where the largest gradients (or the largest gradient difference) would pick
    other rows than the most dissimilar directions; PCGU takes the lowest cosine."""
    w = torch.nn.Parameter(torch.zeros(3, 4))
    b = torch.nn.Parameter(torch.zeros(4))
    unused = torch.nn.Parameter(torch.zeros(2, 4))
    table = [pcgu.Partitioned("w", w, False), pcgu.Partitioned("b", b, False), pcgu.Partitioned("u", unused, False)]
    g_d = {"w": torch.tensor([[100., 0, 0, 0], [0.01, 0, 0, 0], [3., 0, 0, 0]]), "b": torch.tensor([1., 1, 0, 0]),
           "u": None}
    g_a = {"w": torch.tensor([[100., 0, 0, 0], [-0.01, 0, 0, 0], [0., 3, 0, 0]]), "b": torch.tensor([1., -1, 1, 0]),
           "u": None}
    sims, index = pcgu.partition_similarities(g_d, g_a, table, "input")
    assert index == [("w", 0), ("w", 1), ("w", 2), ("b", 0), ("u", 0), ("u", 1)]
    assert torch.allclose(sims[:4], torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-6)
    assert sims[4:].tolist() == [pcgu.UNREACHED] * 2
    assert pcgu.select_partitions(sims, index, 1) == {"w": [1]}  # by norm: row 0; by |g_d - g_a|: row 2
    assert pcgu.select_partitions(sims, index, 3) == {"w": [1, 2], "b": [0]}
    everything = pcgu.select_partitions(sims, index, 99)  # k above the count takes all, unreached ones last
    assert {n: sorted(r) for n, r in everything.items()} == {"w": [0, 1, 2], "b": [0], "u": [0, 1]}
    # output aggregation: partitions are the columns
    s_out, i_out = pcgu.partition_similarities(g_d, g_a, table[:1], "output")
    assert i_out == [("w", j) for j in range(4)] and float(s_out[1]) == 0.0  # column 1: (0,0,0) vs (0,0,3)


def test_lowers_the_stereotypical_preference_on_its_pair(small):
    """With the reference's defaults (k=10000, lr=1e-5, 5 epochs) the gap log P(he) - log P(she) on the
    pair falls; maximising the disadvantaged side instead raises log P(she)."""
    lm = small
    state = _state(lm)
    gap0 = bias.pair_gaps(lm, [PAIR])[0]
    p_new0 = bias.continuation_logprob(lm, PAIR.rendered, PAIR.target_new)
    p_true0 = bias.continuation_logprob(lm, PAIR.rendered, PAIR.target_true)
    e = edit.compute("pcgu", [PAIR], model=lm, runtime=QUICK)
    with edit.applied(lm, e):
        gap1 = bias.pair_gaps(lm, [PAIR])[0]
        p_true1 = bias.continuation_logprob(lm, PAIR.rendered, PAIR.target_true)
    assert p_true1 < p_true0 and gap1 < gap0
    e2 = edit.compute("pcgu", [PAIR], model=lm, runtime=QUICK, direction="disadvantaged")
    with edit.applied(lm, e2):
        assert bias.continuation_logprob(lm, PAIR.rendered, PAIR.target_new) > p_new0
    assert all(torch.equal(v, state[k]) for k, v in lm.hf_model.state_dict().items())


def test_bad_input_is_refused_and_the_model_untouched(small):
    lm = small
    state = _state(lm)
    with pytest.raises(InvalidRequestError, match="target_true"):
        edit.compute("pcgu", [edit.Request("The {} said that", "nurse", " he")], model=lm, runtime=QUICK)
    for bad in ({"k": 0}, {"lr": -1.0}, {"aggregation": "rows"}, {"direction": "both"}, {"params": "("}):
        with pytest.raises(InvalidHparamsError):
            edit.compute("pcgu", [PAIR], model=lm, runtime=QUICK, **bad)
    with pytest.raises(InvalidHparamsError, match="no parameter"):
        edit.compute("pcgu", [PAIR], model=lm, runtime=QUICK, params="no-such-parameter")
    assert all(torch.equal(v, state[k]) for k, v in lm.hf_model.state_dict().items())


def test_params_restricts_the_candidates(small):
    lm = small
    e = edit.compute("pcgu", [PAIR], model=lm, runtime=QUICK, epochs=1, lr=0.05, params=r"\.1\.")
    assert e.deltas and all(".1." in d.name for d in e.deltas)
    assert all(".1." in n for n in e.metrics["selected_rows"])


# ---------------------------------------------------------------------------------------- data and score
def test_winogender_pairs_follow_the_occupation_statistics(shared_data):
    cases = datasets.load_winogender_pairs(shared_data / "bias" / "winogender" / "all_sentences.tsv")
    assert len(cases) == 240  # 120 templates x 2 participants, male and female versions
    by_id = {c.case_id: c for c in cases}
    tech = by_id["technician.customer.1"]  # BLS 40.34% female: male advantaged
    assert tech.request.rendered == "The technician told the customer that"
    assert (tech.request.target_true, tech.request.target_new) == (" he", " she") and tech.extra["advantaged"] == "male"
    acct = next(c for c in cases if c.extra["occupation"] == "accountant")  # BLS 59.7% female
    assert acct.extra["advantaged"] == "female" and acct.request.target_true in (" she", " her")


def test_crows_and_stereoset_pairs(shared_data):
    crows = datasets.load_crows_pairs(shared_data / "bias" / "crows_pairs" / "crows_pairs_anonymized.csv")
    first = crows[0].request
    assert first.rendered.endswith("most") and first.target_true.startswith(" black kids")
    assert first.target_new.startswith(" white kids")
    gender = datasets.load_crows_pairs(shared_data / "bias" / "crows_pairs" / "crows_pairs_anonymized.csv",
                                       bias_type="gender")
    assert gender and all(c.extra["bias_type"] == "gender" for c in gender)
    st = datasets.load_stereoset_pairs(shared_data / "bias" / "stereoset_editbias" / "gender_test.json")
    r = st[1].request
    assert r.rendered == "She told her childhood story about herself in a"
    assert (r.target_true, r.target_new) == (" combative way.", " upbeat way.")


def test_bias_score_counts_preferences(small):
    lm = small
    pairs = [PAIR, edit.Request("The {} told the customer that", "technician", " he", " she")]
    out = bias.bias_score(lm, pairs)
    assert out["n"] == 2 and out["gaps"][0] == pytest.approx(-out["gaps"][1])
    assert out["bias_score"] == 50.0  # the swapped pair is preferred exactly when the first is not
