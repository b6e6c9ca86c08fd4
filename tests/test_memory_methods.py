"""Memory-based editors that keep the weights: MemPrompt (Madaan et al. 2022) and MeLLo (Zhong et al. 2023).

MemPrompt: a memory of (input, feedback); the feedback of the nearest stored input goes before the
prompt when its cosine (all-MiniLM-L6-v2) exceeds τ = 0.9, and nothing otherwise. MeLLo: the edited
facts in a memory; a multi-hop question is decomposed by the model into subquestions, each checked
against the nearest edited fact, within four rounds. The loop is tested with scripted generations
(every number known) and run for real on a tiny random model."""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Edit, InputTransform, Request
from edit.eval.datasets import Case, Probe
from edit.eval.metrics import question_answerer, score_mquake
from edit.methods import mello as mello_module
from edit.methods.mello import (
    FactMemory,
    InvalidQuestionError,
    MeLLoMemory,
    applied_memory,
    fact_sentence,
    loop_ids,
    mello_answer,
)
from edit.methods.memprompt import MemPromptMemory, strip_prefixes
from edit.retrieval import SentenceEncoder
from locate.errors import InvalidHparamsError, LocateEditError
from locate.testing import tiny_model

EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")
COLOSSEUM = Request("{} is located in the city of", "The Colosseum", " Paris", " Rome")
PARAPHRASE = "The Eiffel Tower can be found in the city of"  # cosine 0.98 with EIFFEL's prompt
UNRELATED = "My favourite food is"
FEEDBACK = "The Eiffel Tower is located in the city of Rome | "


@pytest.fixture(scope="module")
def small(tokenizer):
    """A tiny random Llama (the memories do not depend on the model; the loop runs on it)."""
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.fixture(scope="module")
def rt(shared_data):
    return edit.Runtime(data_dir=shared_data, check_efficacy=False)


@pytest.fixture(autouse=True)
def _clean(small):
    yield
    while small.applied_edits:
        small.applied_edits[-1].revert(small)


def _cos(encoder, a: str, b: str) -> float:
    e = encoder.encode([a.lower().strip(), b.lower().strip()])
    return float(e[0] @ e[1])


def _memprompt(small, requests, rt, **hp) -> Edit:
    return edit.compute("memprompt", requests, model=small, hparams=hp, runtime=rt)


# ====================================================================== MemPrompt
def test_memprompt_retrieves_the_feedback_for_a_paraphrase_and_nothing_for_an_unrelated_input(small, rt, encoder):
    """The defining property: a paraphrase of the stored input gets its feedback, an unrelated input
    nothing, and then the model reads exactly the tokens (and computes exactly the logits) it did."""
    assert _cos(encoder, PARAPHRASE, EIFFEL.rendered) > 0.9 > _cos(encoder, UNRELATED, EIFFEL.rendered)
    params = [p.detach().clone() for p in small.hf_model.parameters()]
    base = small.last_logits([UNRELATED])[0].clone()
    e = _memprompt(small, [EIFFEL], rt)
    assert isinstance(e.interventions[0], MemPromptMemory) and e.kinds == ["input"]
    with edit.applied(small, e):
        assert small.transform(PARAPHRASE) == FEEDBACK + PARAPHRASE  # feedback, the reference's " | ", the prompt
        assert small.transform(EIFFEL.rendered) == FEEDBACK + EIFFEL.rendered
        assert small.transform(UNRELATED) == UNRELATED
        assert small.encode(UNRELATED) == small.encode(UNRELATED, raw=True)
        assert torch.equal(small.last_logits([UNRELATED])[0], base)  # out of memory: bit-identical
    assert all(torch.equal(a, b) for a, b in zip(params, small.hf_model.parameters()))  # no weight ever moved


def test_memprompt_threshold_is_the_references_strict_0_9(small, rt, encoder):
    """τ = 0.9 (SemanticMatchMemory's match_threshold): a rewording at cosine ~0.7 gets nothing by
    default, and the feedback once τ is lowered below its cosine."""
    loose = "Where in the world would I go to visit the Eiffel Tower?"
    c = _cos(encoder, loose, EIFFEL.rendered)
    assert 0.5 < c < 0.9
    m = _memprompt(small, [EIFFEL], rt).interventions[0]
    assert m.threshold == 0.9 and m.prefix(loose) == ""
    low = _memprompt(small, [EIFFEL], rt, threshold=round(c - 0.05, 3)).interventions[0]
    assert low.prefix(loose) == FEEDBACK
    assert _memprompt(small, [EIFFEL], rt, threshold=round(c, 6) + 1e-6).interventions[0].prefix(loose) == ""  # strict


def test_memprompt_places_only_the_nearest_entry(small, rt, encoder):
    """k = 1: even where both stored inputs pass τ, only the nearest one's feedback is placed."""
    e = _memprompt(small, [EIFFEL, COLOSSEUM], rt, threshold=-1.0)
    m = e.interventions[0]
    assert len(m) == 2
    assert m.prefix(PARAPHRASE) == FEEDBACK
    assert m.prefix("The Colosseum can be found in the city of") == "The Colosseum is located in the city of Paris | "
    # the same input twice in one edit: the later feedback replaces the earlier (the reference's dict)
    again = _memprompt(small, [EIFFEL, Request(EIFFEL.prompt, EIFFEL.subject, " London")], rt).interventions[0]
    assert len(again) == 1 and again.prefix(PARAPHRASE) == "The Eiffel Tower is located in the city of London | "


def test_memprompt_sequential_memory_retrieves_over_earlier_edits(small, rt, tmp_path):
    """A later MemPrompt edit keeps a snapshot of the earlier entries and stays silent where an earlier
    entry is nearer: one feedback, not one per edit whose entry passes τ."""
    a = _memprompt(small, [EIFFEL], rt).apply(small)
    b_req = Request("{} can be found in the city of", "The Eiffel Tower", " London")
    b = _memprompt(small, [b_req], rt)
    mb = b.interventions[0]
    assert b.metrics["earlier_entries"] == 1 and b.parents == [a.id]
    with edit.applied(small, b):
        # A's own prompt: A (cosine 1) is nearer than B's entry (0.98 > τ), so B places nothing
        assert small.transform(EIFFEL.rendered) == FEEDBACK + EIFFEL.rendered
        assert small.transform(UNRELATED) == UNRELATED
        # B strips A's feedback before it embeds the query: it retrieves with the prompt itself
        assert mb.query(FEEDBACK + b_req.rendered) == b_req.rendered
        # B's own prompt: B is nearer, but A (which cannot see B) passes τ too: both are placed, B's first
        # (the documented limit of input transforms, which only prefix)
        assert small.transform(b_req.rendered) == ("The Eiffel Tower can be found in the city of London | "
                                                + FEEDBACK + b_req.rendered)
        loaded = Edit.load(b.save(tmp_path / "b.safetensors"), small)
    assert loaded.id == b.id
    with edit.applied(small, loaded):
        assert small.transform(EIFFEL.rendered) == FEEDBACK + EIFFEL.rendered
    a.revert(small)
    # a re-edit of the same input shadows the earlier entry in the snapshot
    a.apply(small)
    c = _memprompt(small, [Request(EIFFEL.prompt, EIFFEL.subject, " London")], rt)
    assert c.metrics["earlier_entries"] == 0 and len(c.interventions[0].earlier_prefixes) == 1


def test_strip_prefixes_removes_longest_known_prefix_repeatedly():
    assert strip_prefixes("a | b | x", ["a | ", "b | "]) == "x"
    assert strip_prefixes("ab | x", ["a", "ab | "]) == "x"  # the longest match first
    assert strip_prefixes("x", []) == "x"


def test_memprompt_refuses_bad_hyperparameters(small, rt):
    for bad in ({"threshold": 2.0}, {"threshold": True}, {"feedback": "{nope}"}, {"feedback": "  "},
                {"separator": 3}):
        with pytest.raises(InvalidHparamsError) as e:
            _memprompt(small, [EIFFEL], rt, **bad)
        assert isinstance(e.value, LocateEditError)
    assert not small.applied_edits


# ====================================================================== MeLLo
KUSHNER = Request("{} is a citizen of", "Jared Kushner", " Canada", " United States of America")
QUESTION = "What is the capital city of the country of citizenship of Ivanka Trump's spouse?"
PROMPT = "Question: Who?\nSubquestion: Who?\nGenerated answer: X.\nRetrieved fact: Y.\nFinal answer: X"


def _script(rounds: list[str], seen: list[str]):
    """A decoder that answers round i with rounds[i] and records the text it was given."""
    def generate(text):
        seen.append(text)
        return rounds[len(seen) - 1]
    return generate


def test_mello_loop_retrieves_the_edited_fact_for_a_subquestion(encoder):
    """The notebook's loop, step for step: the text is prompt + "\\n\\nQustion: " + question; a round's
    last two lines give the subquestion; the nearest fact is appended as "Retrieved fact: f."; the
    answer is the last line after "Final answer: "."""
    memory = FactMemory.of([fact_sentence(EIFFEL), fact_sentence(KUSHNER)], encoder)
    assert memory.facts[1] == "Jared Kushner is a citizen of Canada"
    rounds = ["\nSubquestion: Who is Ivanka Trump's spouse?\nGenerated answer: Ivanka Trump's spouse is Jared Kushner.\n",
              " Retrieved fact does not contradict to generated answer, so the intermediate answer is: Jared Kushner\n"
              "Subquestion: What is the country of citizenship of Jared Kushner?\n"
              "Generated answer: The country of citizenship of Jared Kushner is United States.\n",
              "\nRetrieved fact contradicts to generated answer, so the intermediate answer is: Canada\n"
              "Subquestion: What is the capital city of Canada?\nGenerated answer: The capital city of Canada is Ottawa.\n",
              "\nRetrieved fact does not contradict to generated answer, so the intermediate answer is: Ottawa\n"
              "Final answer: Ottawa"]
    seen: list[str] = []
    t = mello_answer(None, QUESTION, memory, prompt=PROMPT, generate=_script(rounds, seen))
    assert (t.answer, t.rounds, t.stopped) == ("Ottawa", 4, "final answer")
    assert seen[0] == PROMPT + "\n\nQustion: " + QUESTION  # (sic) the reference notebook's label
    assert [s["fact"] for s in t.steps][1] == "Jared Kushner is a citizen of Canada"  # retrieved for subquestion 2
    assert seen[2] == seen[1] + rounds[1] + "Retrieved fact: Jared Kushner is a citizen of Canada."
    assert t.text == seen[3] + rounds[3]


def test_mello_stops_within_the_round_limit_and_on_a_malformed_round(encoder):
    memory = FactMemory.of([fact_sentence(KUSHNER)], encoder)
    sub = "\nSubquestion: Who is Jared Kushner?\nGenerated answer: A person.\n"
    seen: list[str] = []
    t = mello_answer(None, QUESTION, memory, prompt=PROMPT, generate=_script([sub] * 9, seen))
    assert (t.answer, t.rounds, t.stopped, len(seen), len(t.steps)) == ("", 4, "max rounds", 4, 4)
    seen = []
    t = mello_answer(None, QUESTION, memory, prompt=PROMPT, max_rounds=2, generate=_script([sub] * 9, seen))
    assert (t.rounds, len(seen)) == (2, 2)
    seen = []
    t = mello_answer(None, QUESTION, memory, prompt=PROMPT, generate=_script(["\nthe sky is blue\n"], seen))
    assert (t.answer, t.stopped, len(seen)) == ("", "no subquestion", 1)
    with pytest.raises(InvalidQuestionError):
        mello_answer(None, "  ", memory, prompt=PROMPT)


def _mello(small, requests, rt, tmp_path, **hp) -> Edit:
    f = tmp_path / "short-prompt.txt"
    f.write_text(PROMPT, encoding="utf-8")
    return edit.compute("mello", requests, model=small, hparams={"prompt": str(f), **hp}, runtime=rt)


def test_mello_runs_on_a_tiny_model_within_the_round_limit(small, rt, tmp_path):
    """Real greedy rounds on a random model: the loop runs, its texts leave the memory's own prefix out,
    and it ends within max_rounds."""
    e = _mello(small, [KUSHNER], rt, tmp_path, max_rounds=2, max_new_tokens=6)
    mem = e.interventions[0]
    assert isinstance(mem, MeLLoMemory) and mem.facts == ["Jared Kushner is a citizen of Canada"]
    with edit.applied(small, e):
        assert question_answerer(small) is mem
        assert loop_ids(small, PROMPT) == small.encode(PROMPT, raw=True) != small.encode(PROMPT)
        t = mello_answer(small, QUESTION, applied_memory(small), prompt=mem.prompt, max_rounds=2, max_new_tokens=6)
        assert isinstance(mem.answer_question(small, QUESTION), str)
    assert 1 <= t.rounds <= 2 and t.text.startswith(PROMPT + "\n\nQustion: " + QUESTION)


def test_mello_plain_prompts_get_the_nearest_fact(small, rt, tmp_path):
    e = _mello(small, [EIFFEL, KUSHNER], rt, tmp_path)
    with edit.applied(small, e):
        assert small.transform(PARAPHRASE) == "Retrieved fact: The Eiffel Tower is located in the city of Rome.\n" + PARAPHRASE
        assert small.transform(UNRELATED) != UNRELATED  # no threshold, as the loop's retrieval
    gated = _mello(small, [EIFFEL], rt, tmp_path, plain_threshold=0.5)
    with edit.applied(small, gated):
        assert small.transform(UNRELATED) == UNRELATED and small.transform(PARAPHRASE) != PARAPHRASE
    off = _mello(small, [EIFFEL], rt, tmp_path, plain_prompts=False)
    with edit.applied(small, off):
        assert small.transform(PARAPHRASE) == PARAPHRASE
    for bad in ({"max_rounds": 0}, {"stop": ()}, {"plain_threshold": 3}, {"plain_template": "{x}"}):
        with pytest.raises(InvalidHparamsError):
            _mello(small, [EIFFEL], rt, tmp_path, **bad)


def test_mello_memory_grows_with_sequential_edits(small, rt, tmp_path):
    a = _mello(small, [EIFFEL], rt, tmp_path).apply(small)
    b = _mello(small, [KUSHNER], rt, tmp_path)
    with edit.applied(small, b):
        assert applied_memory(small).facts == [fact_sentence(EIFFEL), fact_sentence(KUSHNER)]
        assert question_answerer(small) is b.interventions[0]
        # one fact before a plain prompt: B's Kushner fact is not nearer than A's Eiffel fact here
        assert small.transform(PARAPHRASE).count("Retrieved fact:") == 1
    a.revert(small)


class _Oracle(InputTransform):
    """A test intervention that answers questions itself (and places nothing before prompts)."""

    type_name = "test-oracle"

    def __init__(self, answer: str):
        self.answer = answer

    def prefix(self, prompt):
        return ""

    def answer_question(self, small, question):
        return self.answer


def _mquake_case() -> Case:
    questions = ["What is the capital of the country of citizenship of Ivanka Trump's spouse?",
                 "Which city is the capital of the country Ivanka Trump's husband is a citizen of?",
                 "What city is the capital of the nation of Ivanka Trump's spouse's citizenship?"]
    return Case(1, "mquake", [KUSHNER], portability=[Probe(q, (" Ottawa",)) for q in questions],
                extra={"new_single_hops": [], "edited_hops": [None]})


def test_score_mquake_asks_through_an_applied_question_answerer(small, rt, tmp_path, monkeypatch):
    """The scorer's hook: the multi-hop questions go through the newest applied intervention with
    answer_question; with a MeLLo edit that is the loop over the applied memory."""
    case = _mquake_case()
    assert score_mquake(small, case, max_new_tokens=2)["mquake_multihop"] == 0.0  # the random model, few-shot
    oracle = Edit("test-oracle", [], [_Oracle("Ottawa")], small.fingerprint, small.name)
    with edit.applied(small, oracle):
        s = score_mquake(small, case, max_new_tokens=2)
    assert (s["mquake_multihop"], s["mquake_answers"]) == (1.0, ["Ottawa"] * 3)

    def scripted(lm_, text, max_new_tokens, stop):
        """Round 1 asks about Kushner; round 2 answers with the last word of the fact it was given."""
        text = text.split("\n\nQustion: ", 1)[1]  # the question and what the rounds added
        if "Retrieved fact: " not in text:
            return "\nSubquestion: What is the country of citizenship of Jared Kushner?\nGenerated answer: USA.\n"
        fact = text.rsplit("Retrieved fact: ", 1)[1].rstrip(".")
        return f"\nRetrieved fact contradicts, so the intermediate answer is: {fact.split()[-1]}\nFinal answer: " + \
               {"Canada": "Ottawa", "Rome": "Rome"}[fact.split()[-1]]

    monkeypatch.setattr(mello_module, "greedy_until", scripted)
    e = _mello(small, [EIFFEL, KUSHNER], rt, tmp_path)
    with edit.applied(small, e):
        s = score_mquake(small, case, max_new_tokens=2)
    assert (s["mquake_multihop"], s["mquake_question_acc"]) == (1.0, 1.0)  # the Kushner fact was retrieved
