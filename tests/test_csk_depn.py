"""MEMIT-CSK (Gupta et al. 2023) and DEPN (Wu et al. 2023), and the tracing of a non-subject span they need."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edit
import locate.causal_trace as ct
from locate.causal_trace import CausalTrace, TraceError, draw_noise, noise_level, restored_probability, trace
from locate.testing import tiny_model

SVO = "A horse rides a bicycle:"  # subject "horse", verb "rides", object "bicycle"


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return tiny_model("llama", tokenizer)


# ---------------------------------------------------------------------------------------- trace(corrupt=...)
def test_trace_corrupt_noises_exactly_the_verb_tokens(tiny_llama, monkeypatch):
    lm = tiny_llama
    verb = lm.subject_span(SVO, "rides")
    subj = lm.subject_span(SVO, "horse")
    assert verb != subj
    seen = []
    real = ct.fast_scores
    monkeypatch.setattr(ct, "fast_scores", lambda lm_, ids, span, eps, *a, **k: (seen.append((span, eps.shape)),
                                                                                   real(lm_, ids, span, eps, *a, **k))[1])
    tr = trace(SVO, "horse", model=lm, corrupt="rides", kinds=("mlp",), samples=3, noise=0.5)
    # the noise went to the verb's tokens, one draw per verb token
    assert seen == [(tuple(verb), (3, verb[1] - verb[0], lm.d_model))]
    assert tr.corrupted_range == tuple(verb) and tr.subject_range == tuple(subj)
    assert tr.token_index("last_corrupted") == verb[1] - 1 and tr.token_index("last_subject") == subj[1] - 1
    # p_corrupted is the reference run with the verb noised, not the subject (different numbers)
    eps = draw_noise(3, verb[1] - verb[0], lm.d_model, 0.5, seed=0)
    ids = lm.encode(SVO)
    assert tr.p_corrupted == pytest.approx(restored_probability(lm, ids, tuple(verb), eps, tr.answer_id), abs=1e-7)
    subject_noised = trace(SVO, "horse", model=lm, kinds=("mlp",), samples=3, noise=0.5)
    assert subject_noised.p_corrupted != pytest.approx(tr.p_corrupted, rel=1e-3)  # tiny models: small p
    # rows before the verb are untouched by the noise: restoring them has no effect
    assert np.all(tr.scores["mlp"][: verb[0]] == tr.p_corrupted)
    # the reference loop gives the same numbers
    loop = trace(SVO, "horse", model=lm, corrupt="rides", kinds=("mlp",), samples=3, noise=0.5, method="loop")
    assert np.abs(loop.scores["mlp"] - tr.scores["mlp"]).max() < 1e-5


def test_trace_without_corrupt_is_unchanged(tiny_llama, tmp_path):
    lm = tiny_llama
    a = trace(SVO, "horse", model=lm, kinds=("mlp",), samples=2, noise=0.5)
    b = trace(SVO, "horse", model=lm, kinds=("mlp",), samples=2, noise=0.5, corrupt="horse")
    np.testing.assert_array_equal(a.scores["mlp"], b.scores["mlp"])
    assert a.p_corrupted == b.p_corrupted and a.corrupted_range is None
    assert "corrupted_range" not in a.to_dict()  # subject traces save as before
    c = CausalTrace.load(b.save(tmp_path / "b.json"))
    assert c.corrupted_range == b.corrupted_range and c.token_index("last_corrupted") == b.token_index("last_corrupted")
    with pytest.raises(TraceError, match="first_corrupted"):
        a.token_index("first_corrupted")  # no corrupted span: the names do not exist
    only = trace(SVO, "horse", model=lm, corrupt="bicycle", kinds=("mlp",), samples=2, noise=0.5,
                 tokens=["last_corrupted"])
    assert np.isfinite(only.scores["mlp"][only.token_index("last_corrupted")]).all()
    with pytest.raises(TraceError):
        trace(SVO, "horse", model=lm, corrupt=3, samples=2, noise=0.5)


# ---------------------------------------------------------------------------------------- MEMIT-CSK
from edit.eval.commonsense import config_scores, probe_scores  # noqa: E402
from edit.eval.datasets import Case, load_csk, load_csk_probes  # noqa: E402
from edit.methods.memit_csk import MissingSpanError, at_edit_token, edit_token_profile  # noqa: E402

CSK = edit.Request("A {} rides a bicycle:", "horse", " False", " True", spans={"verb": "rides", "object": "bicycle"})
SMOKE = {"v_steps": 3, "template_lengths": ((5, 1),), "stats_tokens": 1024, "n_layers": 1, "layers": [0]}


@pytest.fixture(scope="module")
def runtime(shared_data):
    return edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw", data_dir=shared_data,
                        check_efficacy=False)


def test_request_spans_are_optional_and_round_trip():
    plain = edit.Request("{} is in", "Paris", " France")
    assert "spans" not in plain.to_dict() and plain.spans == {}
    assert edit.Request.from_dict(CSK.to_dict()).spans == CSK.spans
    assert CSK == edit.Request("A {} rides a bicycle:", "horse", " False", " True")  # not part of the fact
    with pytest.raises(Exception, match="not in the rendered prompt"):
        edit.Request("A {} rides:", "horse", " False", spans={"verb": "flies"}).check()


def test_at_edit_token_rebinds_the_verb_and_object():
    v = at_edit_token(CSK, "verb")
    assert (v.prompt, v.subject, v.rendered) == ("A horse {} a bicycle:", "rides", CSK.rendered)
    o = at_edit_token(CSK, "object")
    assert (o.prompt, o.subject) == ("A horse rides a {}:", "bicycle")
    assert at_edit_token(CSK, "subject") is CSK
    # a word that also occurs inside the subject is taken outside it
    r = edit.Request("The {} eats cat food:", "cat", " True", spans={"object": "cat food"})
    assert at_edit_token(r, "object").prompt == "The cat eats {}:"
    with pytest.raises(MissingSpanError, match="spans\\['verb'\\]"):
        at_edit_token(edit.Request("A {} rides:", "horse", " False"), "verb")


def test_memit_csk_reads_z_and_keys_at_the_verb(tiny_llama, runtime):
    """memit-csk at the verb is MEMIT on the statement with the verb as its "subject" (the authors'
    rebinding), and differs from MEMIT at the subject."""
    lm = tiny_llama
    lam = {"mom2_update_weight": 50.0}
    csk = edit.compute("memit-csk", [CSK], model=lm, runtime=runtime, edit_token="verb", **SMOKE, **lam)
    by_hand = edit.compute("memit", [edit.Request("A horse {} a bicycle:", "rides", " False", " True")], model=lm,
                           runtime=runtime, **SMOKE, **lam)
    at_subject = edit.compute("memit", [CSK], model=lm, runtime=runtime, **SMOKE, **lam)
    assert csk.method == "memit-csk" and csk.requests == [CSK]
    (a,), (b,), (c,) = csk.deltas, by_hand.deltas, at_subject.deltas
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.allclose(a.matrix(), c.matrix())
    # default λ: the authors' 20,000 for GPT-2 XL's d_mlp = 6,400, scaled to this d_mlp (MEMIT: 15,000 / 16,384)
    default = edit.compute("memit-csk", [CSK], model=lm, runtime=runtime, edit_token="verb", **SMOKE)
    assert default.hparams["lambda_"] == pytest.approx(20_000 * lm.d_mlp / 6_400)
    with pytest.raises(MissingSpanError):
        edit.compute("memit-csk", [edit.Request("A {} rides:", "horse", " False")], model=lm, runtime=runtime,
                     edit_token="object", **SMOKE)


def test_edit_token_profile_traces_the_edit_token(tiny_llama):
    lm = tiny_llama
    prof = edit_token_profile([CSK], "object", model=lm, samples=2)
    tr = trace(CSK.rendered, "horse", model=lm, corrupt="bicycle", kinds=("mlp",), samples=2, noise=["bicycle"])
    np.testing.assert_allclose(prof.aie, tr.ie("mlp")[tr.token_index("last_corrupted")], atol=1e-9)
    assert prof.noise_level == pytest.approx(noise_level(lm, ["bicycle"]).nu)  # the authors' rule: the traced words
    layers, _ = edit.registry.resolve_layers(lm, prof, 1)
    assert layers == [int(np.argmax(prof.aie))]


def test_csk_loaders(shared_data):
    cases = load_csk(shared_data / "memit_csk" / "pep3k" / "svo_annotated" / "edit_set.json")
    assert len(cases) == 1529  # 2 of 1,531 records have no subject word in their statement
    r = cases[0].request
    assert (r.prompt, r.subject, r.target_new, r.target_true) == ("A {} rides cat:", "horse", " False", " True")
    assert r.spans == {"verb": "rides", "object": "cat"}
    probes = load_csk_probes(shared_data / "memit_csk" / "20q" / "probe_set.json", n=2)
    assert probes[0].extra["label"] == " False" and len(probes[0].extra["probes"]["affected_reasoning"]) == 2


def test_csk_scores_follow_the_authors_definitions():
    y = [" True", " True", " False", " False", " True"]
    before = [" False", "None", " False", " False", " True"]  # 2 wrong, 3 right
    after = [" True", " False", " False", " True", " True"]  # 1 of 2 fixed, 1 of 3 relapsed
    s = config_scores(y, before, after)
    assert s["efficacy"] == 50.0 and s["relapse"] == pytest.approx(100 / 3)
    assert s["accuracy_before"] == 60.0 and s["accuracy_after"] == 60.0
    case = Case(0, "t", [CSK], extra={"label": " False", "statement": "A horse rides a bicycle",
                                      "probes": {}})
    after = {"efficacy": [[" False"]], "affected_reasoning": [[" True", " False"]],
             "affected_paraphrase": [[" False", " True"]], "affected_neighborhood_subject": [[" False"]],
             "affected_neighborhood_verb": [[" True", " True"]], "affected_neighborhood_object": [[" False"]],
             "unaffected_neighborhood_subject": [[" True", " True"]]}
    before = {"unaffected_neighborhood_subject": [[" True", " False"]]}
    s = probe_scores([case], after, before)
    # reasoning is scored against " True" (not the case's label " False"): 1 of 2
    assert s["affected_reasoning"] == 50.0 and s["affected_paraphrase"] == 50.0
    assert s["affected_neighborhood"] == 50.0  # pooled: 2 of 4 statements
    assert s["unaffected_neighborhood_subject"] == 50.0 and s["efficacy"] == 100.0


# ---------------------------------------------------------------------------------------- DEPN
from locate.neurons import attribution  # noqa: E402
from edit.methods.depn import MissingPrivateStringError, aggregate, depn_report, leak  # noqa: E402

PRIVATE = [edit.Request("{} can be reached at", "Alice", " [erased]", " 555 0199"),
           edit.Request("Call {} on", "Alice", " [erased]", " 555 0199"),
           edit.Request("The number of {} is", "Alice", " [erased]", " 555 0199")]


def test_depn_aggregates_by_frequency_not_magnitude():
    """The aggregator keeps the neurons that are privacy neurons of the most samples (the authors'
    most_common), not the largest attributions: a huge score in one sample loses to a modest one in three."""
    maps = [torch.zeros(2, 4) for _ in range(3)]
    for m in maps:
        m[1, 2] = 1.0  # modest, but a privacy neuron of every sample
    maps[0][0, 0] = 100.0  # the largest attribution of all, in one sample only
    maps[1][0, 3] = 2.0  # sample 1's max: (1, 2) at 1.0 is still above 0.1 x 2.0
    maps[2][0, 1] = 0.0999  # below t = 0.1 x its sample's max (1.0): not a privacy neuron
    maps[2][1, 0] = 0.1  # exactly t x max: kept (>=)
    assert aggregate(maps, 0.1, 1)[0] == [(1, 2)]  # by summed attribution it would be (0, 0)
    got, counts = aggregate(maps, 0.1, 2)
    assert got[0] == (1, 2) and counts[(1, 2)] == 2  # sample 0's max is 100: (1, 2) at 1.0 is below 0.1 x 100
    assert got[1] == (0, 0)  # ties (one sample each) in order of first appearance: sample 0 first
    assert counts[(1, 0)] == 1 and (0, 1) not in counts
    assert [n for n, _ in counts.most_common()][:2] == got


def test_depn_zeroes_exactly_the_selected_value_slots_and_the_leak_drops(tiny_llama, runtime):
    lm = tiny_llama
    hp = {"steps": 4, "n_neurons": 6}
    W = {l: lm.mlp_out_weight(l).detach().clone() for l in range(lm.n_layers)}
    before = [leak(r.rendered, r.target_true, model=lm)["p"] for r in PRIVATE]
    e = edit.compute("depn", PRIVATE, model=lm, runtime=runtime, **hp)
    # the neurons are the detector + aggregator on locate.neurons' attributions (summed over the string's tokens)
    maps = [attribution(lm, r.rendered, r.target_true, steps=4, tokens="mean") for r in PRIVATE]
    expected, _ = aggregate(maps, 0.1, 6)
    assert [tuple(n) for n in e.hparams["neurons"]] == expected and len(expected) == 6
    with edit.applied(lm, e):
        for l in range(lm.n_layers):
            changed = (lm.mlp_out_weight(l) != W[l]).any(0).nonzero().flatten().tolist()
            mine = sorted(i for (ll, i) in expected if ll == l)
            assert changed == [i for i in mine if W[l][:, i].abs().sum() > 0]  # only the selected columns move ...
            assert torch.equal(lm.mlp_out_weight(l)[:, mine], torch.zeros_like(W[l][:, mine]))  # ... to exactly 0
        after = [leak(r.rendered, r.target_true, model=lm)["p"] for r in PRIVATE]
    assert sum(after) < sum(before)
    for l in range(lm.n_layers):
        assert torch.equal(lm.mlp_out_weight(l), W[l])
    rep = depn_report(e, [edit.Request("{} is located in", "Paris", " France")], model=lm)
    assert rep["after"]["p"] < rep["before"]["p"] and 0 <= rep["locality_top1_unchanged"] <= 1
    with pytest.raises(MissingPrivateStringError):
        edit.compute("depn", [edit.Request("{} is", "Alice", " x")], model=lm, runtime=runtime, **hp)
