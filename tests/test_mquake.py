"""MQuAKE's metrics (Zhong et al. 2023, §3.3) from generated answers: multi-hop accuracy counts a case
if ANY of its three questions is answered with the new answer or an alias; edit-wise success pools
every edited fact; instance-wise accuracy asks the whole post-edit chain.

Hand-made cases with a stub decoder (prompt -> continuation) make every number known; a character
bigram model with a Hugging Face-style forward checks greedy decoding itself."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import edit
from edit.eval.datasets import Case, Probe, load_mquake
from edit.eval.metrics import (
    MQUAKE_FEW_SHOT,
    MQuAKEScoringError,
    aggregate,
    answer_correct,
    cloze_recalled,
    greedy_generate,
    mquake_edit_wise,
    mquake_question_prompt,
    normalize_answer,
    score_mquake,
)
from edit.request import Request
from locate.errors import LocateEditError


# --------------------------------------------------------------------------- the loader
def test_mquake_loader_keeps_the_post_edit_chain(shared_data):
    hard = load_mquake(shared_data / "mquake/MQuAKE-hard.json", n=1)[0]
    assert hard.extra["edited_hops"] == [0, 1, 2, 3]  # four edits, each one hop of the chain
    assert hard.extra["new_hop_relations"] == ["P175", "P1037", "P27", "P37"]
    assert hard.extra["new_single_hops"][1]["cloze"] == hard.requests[1].rendered
    akew = load_mquake(shared_data / "mquake/AKEW_MQuAKE-CF.json")
    partial = [c for c in akew if len(c.requests) < len(c.extra["new_single_hops"])]
    assert partial  # cases whose chain has unedited hops
    for c in partial:
        for r, k in zip(c.requests, c.extra["edited_hops"]):
            hop = c.extra["new_single_hops"][k]
            assert hop["answer"] == r.target_new.strip() and hop["cloze"] == r.rendered


# --------------------------------------------------------------------------- answer rules
def test_mquake_answer_rules_alias_and_normalisation():
    answers = (" Arabic", " ar", " Arabic language")
    assert answer_correct(" Arabic language\nQ: next question", answers)  # an alias, first line only
    assert not answer_correct(" Arabic language", (" Arabic",))  # the main answer alone does not match
    assert not answer_correct(" arabic", answers)  # the reference compares exactly (stripped)
    assert answer_correct(" arabic", answers, match="casefold")
    assert answer_correct(" the Arabic.", answers, match="loose") and not answer_correct(" the Arabic.", answers)
    assert normalize_answer("  The  U.K. ", "loose") == "u k"
    # cloze statements run on after the object: the continuation must begin with it, at a word boundary
    assert cloze_recalled(" Madonna, an American singer", ("Madonna",))
    assert not answer_correct(" Madonna, an American singer", ("Madonna",))
    assert not cloze_recalled(" Madonnas of the world", ("Madonna",))
    assert cloze_recalled(" Madonna", ("Madonna",)) and not cloze_recalled(" The Beatles", ("Madonna",))
    with pytest.raises(MQuAKEScoringError, match="match must be") as e:
        normalize_answer("x", "fuzzy")
    assert isinstance(e.value, LocateEditError)


# --------------------------------------------------------------------------- one case, stub decoder
QUESTIONS = ["What language is official where the director of Hey Jude's performer is a citizen?",
             "Which language is official in the citizenship country of the director of Hey Jude's performer?",
             "What is the official language of the country of the manager of Hey Jude's performer?"]


def _case() -> Case:
    """Two edits on a three-hop chain: hop 0 and hop 2 are edited, hop 1 is not."""
    reqs = [Request("{} was performed by", "Hey Jude", " Madonna", " The Beatles"),
            Request("{} is a citizen of", "Narendra Modi", " Australia", " India")]
    hops = [{"question": "Who performed Hey Jude?", "cloze": "Hey Jude was performed by", "answer": "Madonna",
             "answer_alias": ["Madonna Ciccone"]},
            {"question": "Who is the director of Madonna?", "cloze": "The director of Madonna is",
             "answer": "Narendra Modi", "answer_alias": ["Modi"]},
            {"question": "What is the country of citizenship of Narendra Modi?",
             "cloze": "Narendra Modi is a citizen of", "answer": "Australia", "answer_alias": ["AUS"]}]
    answers = (" Arabic", " ar", " Arabic language")
    return Case(7, "mquake", reqs, portability=[Probe(q, answers) for q in QUESTIONS],
                extra={"new_single_hops": hops, "new_hop_relations": ["P175", "P1037", "P27"], "edited_hops": [0, 2]})


def _stub(table: dict[str, str], seen: list):
    def generate(prompts):
        seen.extend(prompts)
        return [table[p] for p in prompts]  # a KeyError means a prompt was not formed as the reference forms it
    return generate


def _answers(few_shot=MQUAKE_FEW_SHOT) -> dict[str, str]:
    q = [mquake_question_prompt(x, few_shot) for x in QUESTIONS]
    return {q[0]: " English\nQ: Who", q[1]: " Arabic language\nQ: What", q[2]: " Hebrew\n",
            "Hey Jude was performed by": " Madonna, an American singer",  # edit 0 recalled
            "Narendra Modi is a citizen of": " India, and",  # edit 1 not recalled
            "The director of Madonna is": " Narendra Modi."}  # the unedited hop, recalled


def test_mquake_any_of_three_questions_and_edit_wise():
    seen: list = []
    s = score_mquake(None, _case(), generate=_stub(_answers(), seen))
    # one question of three is answered (by an alias): the case counts for multi-hop accuracy,
    # where the per-question mean is 1/3
    assert s["mquake_multihop"] == 1.0
    assert s["mquake_question_acc"] == pytest.approx(1 / 3)
    assert s["mquake_answers"] == ["English", "Arabic language", "Hebrew"]
    # one edit of two recalled; the chain is broken at the second edit
    assert (s["mquake_edits_recalled"], s["mquake_n_edits"], s["mquake_edit_wise"]) == (1, 2, 0.5)
    assert s["mquake_edit_answers"] == ["Madonna, an American singer", "India, and"]
    assert s["mquake_instance"] == 0.0
    assert seen[0].startswith(MQUAKE_FEW_SHOT + "\nQ: ") and seen[0].endswith(" A:")
    # without demonstrations the question is asked bare
    bare = score_mquake(None, _case(), few_shot="", generate=_stub(_answers(""), []))
    assert bare["mquake_multihop"] == 1.0
    assert mquake_question_prompt("Who?", "") == "Q: Who? A:"


def test_mquake_instance_wise_needs_every_hop():
    table = _answers()
    table["Narendra Modi is a citizen of"] = " Australia"  # now both edits are recalled
    s = score_mquake(None, _case(), generate=_stub(table, []))
    assert s["mquake_edit_wise"] == 1.0 and s["mquake_instance"] == 1.0
    table["The director of Madonna is"] = " Guy Oseary"  # the unedited hop fails: instance-wise 0, edit-wise 1
    s = score_mquake(None, _case(), generate=_stub(table, []))
    assert s["mquake_edit_wise"] == 1.0 and s["mquake_instance"] == 0.0
    # with relation demonstrations the unedited hop is asked as a question, under the question rule
    demo = "Q: Who is the director of Beyonce? A: Mathew Knowles"
    table[mquake_question_prompt("Who is the director of Madonna?", demo)] = " Modi\n"
    seen: list = []
    s = score_mquake(None, _case(), relation_prompts={"P1037": demo}, generate=_stub(table, seen))
    assert s["mquake_instance"] == 1.0 and "The director of Madonna is" not in seen


def test_mquake_refuses_a_case_without_questions():
    case = _case()
    case.portability = []
    with pytest.raises(MQuAKEScoringError, match="no multi-hop questions"):
        score_mquake(None, case, generate=_stub({}, []))
    with pytest.raises(MQuAKEScoringError):
        score_mquake(None, _case(), match="nope", generate=_stub({}, []))


def test_mquake_aggregate_pools_edit_wise_over_edits():
    recs = [{"mquake_multihop": 1.0, "mquake_edits_recalled": 4, "mquake_n_edits": 4, "mquake_edit_wise": 1.0,
             "mquake_instance": 1.0, "mquake_question_acc": 1 / 3},
            {"mquake_multihop": 0.0, "mquake_edits_recalled": 0, "mquake_n_edits": 1, "mquake_edit_wise": 0.0,
             "mquake_instance": 0.0, "mquake_question_acc": 0.0},
            {"mquake_multihop": 1.0, "mquake_edits_recalled": 1, "mquake_n_edits": 2, "mquake_edit_wise": 0.5,
             "mquake_instance": 0.0, "mquake_question_acc": 2 / 3}]
    agg = aggregate(recs)
    assert agg["mquake_edit_wise"] == pytest.approx(5 / 7)  # pooled edits; the mean over cases would be 0.5
    assert mquake_edit_wise(recs) == pytest.approx(5 / 7)
    assert agg["mquake_multihop"] == pytest.approx(2 / 3)
    assert agg["mquake_question_acc"] == pytest.approx(1 / 3)
    assert agg["mquake_instance"] == pytest.approx(1 / 3)
    assert "mquake_edit_wise" not in aggregate([{"es": 1.0}])


# --------------------------------------------------------------------------- greedy decoding
class CharLM:
    """Characters are tokens; the next character depends only on the current one (``NEXT``), so the
    greedy continuation is known. Exposes what :func:`greedy_generate` uses of a HookedLM."""

    NEXT = {":": " ", " ": "Z", "Z": "\n", "\n": "Q", "Q": "Q", "x": "y", "y": "x"}
    EOS = 0
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0
        self.tokenizer = SimpleNamespace(pad_token_id=1, eos_token_id=self.EOS, decode=self._decode)

    @staticmethod
    def _decode(ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == CharLM.EOS))

    def encode(self, text):
        return [ord(c) for c in text]

    def hf_model(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, 128)
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1]):
                c = chr(int(input_ids[b, t]))
                logits[b, t, ord(self.NEXT[c]) if c in self.NEXT else self.EOS] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_mquake_greedy_generate_stops_at_the_newline():
    lm = CharLM()
    # rows of different lengths (left-padded), each cut before its newline; decoding stops early
    assert greedy_generate(lm, ["Q: why? A:", "A:"], max_new_tokens=10) == [" Z", " Z"]
    assert lm.calls == 3
    assert greedy_generate(lm, ["A:"], max_new_tokens=5, stop=None) == [" Z\nQQ"]
    assert greedy_generate(lm, ["x"], max_new_tokens=3) == ["yxy"]  # the token budget
    assert greedy_generate(lm, ["A:!"], max_new_tokens=3) == [""]  # EOS at once
    with pytest.raises(MQuAKEScoringError):
        greedy_generate(lm, ["x"], max_new_tokens=0)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("llama", tokenizer)


def test_mquake_batched_greedy_matches_one_prompt_at_a_time(tiny_lm):
    prompts = ["The Eiffel Tower is in", "Q: Who performed Hey Jude? A:", "A"]
    got = greedy_generate(tiny_lm, prompts, max_new_tokens=6, stop=None, batch_size=2)
    assert got == [tiny_lm.generate(p, 6) for p in prompts]


def test_mquake_metrics_in_the_harness(tiny_lm, shared_data):
    cases = load_mquake(shared_data / "mquake/AKEW_MQuAKE-CF.json", n=3)
    res = edit.evaluate("none", cases, model=tiny_lm, fluency=False, progress=False, mquake={"max_new_tokens": 3})
    for r in res.records:
        for k in ("portability", "mquake_multihop", "mquake_question_acc", "mquake_edit_wise", "mquake_instance",
                  "mquake_n_edits", "mquake_edits_recalled", "mquake_answers"):
            assert k in r, k
        assert len(r["mquake_answers"]) == 3
    assert res.records[0]["mquake_n_edits"] == len(cases[0].requests)
    want = sum(r["mquake_edits_recalled"] for r in res.records) / sum(len(c.requests) for c in cases)
    assert res.aggregates["mquake_edit_wise"] == pytest.approx(want)
    assert "mquake_multihop" in res.aggregates and "portability" in res.aggregates
    assert res.settings["mquake"] == {"scoring": "generated answers", "max_new_tokens": 3}
    assert "MH" in res.table() and "EW" in res.table()
