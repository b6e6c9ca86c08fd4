"""Memory-based editors that keep the weights: MemPrompt (Madaan et al. 2022).

MemPrompt: a memory of (input, feedback); the feedback of the nearest stored input goes before the
prompt when its cosine (all-MiniLM-L6-v2) exceeds τ = 0.9, and nothing otherwise."""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Edit, Request
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
