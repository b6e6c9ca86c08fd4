"""PokeMQA (Gu et al. 2023): MeLLo's decomposition loop with a trained two-stage scope detector.

The detector (frozen all-MiniLM-L6-v2 with trained heads: a pre-detector (1) and a conflict
disambiguator (2)) is trained for a few seconds on synthetic (edit, question) pairs and judged on
edits it never saw; the loop is driven by scripted generations, so every transcript is known."""

from __future__ import annotations

import json

import pytest
import torch

import edit
from edit import Request
from edit.eval.metrics import question_answerer
from edit.methods import pokemqa as pk
from edit.methods.mello import fact_sentence
from edit.retrieval import SentenceEncoder
from edit.training import TrainedEditorMissingError, load_training_data
from locate.errors import InvalidHparamsError
from locate.testing import tiny_model

# (cloze template, question template): six relations
RELATIONS = [("{} is a citizen of", "What is the country of citizenship of {}?"),
             ("{} was born in the city of", "In which city was {} born?"),
             ("{} is married to", "Who is the spouse of {}?"),
             ("{} works in the field of", "What field does {} work in?"),
             ("{} speaks the language", "Which language does {} speak?"),
             ("{} plays the instrument", "Which musical instrument does {} play?")]
TARGETS = [[" Croatia", " Japan", " Peru", " Kenya"], [" Lisbon", " Osaka", " Denver", " Quito"],
           [" Maria Lopez", " John Smith", " Aiko Tanaka", " Paul Weber"], [" chemistry", " law", " botany", " music"],
           [" Finnish", " Swahili", " Korean", " Dutch"], [" violin", " cello", " drums", " flute"]]
SUBJECTS = ["Ellie Kemper", "Rainn Wilson", "Carl Sagan", "Marie Curie", "Lionel Messi", "Ada Lovelace",
            "Haruki Murakami", "Nelson Mandela", "Greta Gerwig", "Yo-Yo Ma"]
HELD_OUT = SUBJECTS[-2:]  # edits of these subjects are never trained on


def _records(subjects) -> list[dict]:
    """Training records in the EasyEdit CounterFact layout (what `locate-edit train` reads): each edit with
    its question and a hard negative (the same subject's next relation)."""
    out = []
    for si, s in enumerate(subjects):
        for ri, (cloze, question) in enumerate(RELATIONS):
            out.append({"prompt": cloze.format(s), "subject": s, "target_new": TARGETS[ri][si % 4].strip(),
                        "rephrase_prompt": question.format(s),
                        "locality_prompt": RELATIONS[(ri + 1) % len(RELATIONS)][1].format(s),
                        "locality_ground_truth": "x"})
    return out


TINY = dict(train_steps=150, batch_size=16, n_negatives=20, hidden=64, lr=3e-3, eval_every=150,
            checkpoint_every=150, val_fraction=0.0, prompt=pk.FORMAT_EXAMPLE_NAME)


@pytest.fixture(scope="module")
def small(tokenizer):
    """A tiny random Llama (it only keys the detector; the loop is scripted)."""
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.fixture(scope="module")
def trained(small, cache, tmp_path_factory):
    """The detector trained on the edits of every subject but the held-out two, and the hparams that find it."""
    path = tmp_path_factory.mktemp("data") / "scope-pairs.json"
    path.write_text(json.dumps(_records(SUBJECTS[:-2])))
    hp = dict(TINY, train_data=str(path))
    art = pk.train_pokemqa(small, load_training_data(path), pk.PokeMQAHparams(**hp), progress=False)
    return pk.detector_from_tensors(art.tensors), hp


@pytest.fixture(autouse=True)
def _clean(small):
    yield
    while small.applied_edits:
        small.applied_edits[-1].revert(small)


def _held_out_pairs():
    """(edit, in-scope question, out-of-scope questions) for every held-out edit; out of scope: the same
    subject's other relations and the same relation's other subject."""
    out = []
    for si, s in enumerate(HELD_OUT):
        for ri, (cloze, question) in enumerate(RELATIONS):
            fact = fact_sentence(Request(cloze, s, TARGETS[ri][si % 4]))
            neg = [q.format(s) for j, (_, q) in enumerate(RELATIONS) if j != ri]
            neg.append(question.format(HELD_OUT[1 - si]))
            out.append((fact, question.format(s), neg))
    return out


def _pre_scores(det, encoder, pairs):
    pos, neg = [], []
    with torch.no_grad():
        for fact, q, negs in pairs:
            v = encoder.encode([fact])
            pos.append(float(det.pre_log_prob(encoder.encode([q]), v).exp()))
            neg.append(det.pre_log_prob(encoder.encode(negs), v.expand(len(negs), -1)).exp().tolist())
    return pos, neg


# ====================================================================== the detector
def test_trained_detector_scores_in_scope_pairs_above_out_of_scope_ones_on_held_out_edits(trained, encoder):
    """On edits of subjects it never saw, the trained pre-detector (1) gives every edit's own question a
    higher p1 than every out-of-scope question of that edit (AUC 1), passes every in-scope pair and no
    out-of-scope one, and the decision (1)+(2) against all twelve held-out edits picks the right edit for
    each question and "no conflict" for a question no edit covers. The untrained heads (P = I, the
    initial s: raw MiniLM distances, a random MLP) let 9 of 72 out-of-scope questions through (1) and
    decide 10 of 12 questions right."""
    det, hp = trained
    pairs = _held_out_pairs()
    pos, neg = _pre_scores(det, encoder, pairs)
    auc = sum(p > n for p, ns in zip(pos, neg) for n in ns) / sum(len(ns) for ns in neg)
    fresh = pk.ScopeDetector(hidden=64).eval()
    pos0, neg0 = _pre_scores(fresh, encoder, pairs)
    auc0 = sum(p > n for p, ns in zip(pos0, neg0) for n in ns) / sum(len(ns) for ns in neg0)
    margin = sum(p - max(ns) for p, ns in zip(pos, neg)) / len(pos)
    margin0 = sum(p - max(ns) for p, ns in zip(pos0, neg0)) / len(pos0)
    false0 = sum(n >= 0.5 for ns in neg0 for n in ns)
    print(f"AUC trained {auc:.3f} untrained {auc0:.3f}; margin trained {margin:.3f} untrained {margin0:.3f}; "
          f"out-of-scope candidates of (1): untrained {false0} of {sum(map(len, neg0))}")
    assert auc == 1.0 and margin > margin0 + 0.3, (auc, auc0, margin, margin0)
    assert all(p >= 0.5 for p in pos) and not any(n >= 0.5 for ns in neg for n in ns)  # untrained: 9 of 72 pass
    assert false0 > 0
    facts = [f for f, _, _ in pairs]
    embs = encoder.encode(facts)
    right = [pk.detect(det, encoder, q, facts, embs).index == i for i, (_, q, _) in enumerate(pairs)]
    right0 = [pk.detect(fresh, encoder, q, facts, embs).index == i for i, (_, q, _) in enumerate(pairs)]
    assert sum(right) == len(right) > sum(right0), (sum(right), sum(right0))  # untrained: 10 of 12
    assert pk.detect(det, encoder, "What is the boiling point of water?", facts, embs).index is None


def _dis_scores(det, encoder):
    pos, neg = [], []
    with torch.no_grad():
        for fact, q, negs in _held_out_pairs():
            qs = [q, *negs]
            z = det.dis_logit(encoder.encode([pk.pair_text(fact, x) for x in qs]), encoder.encode(qs),
                              encoder.encode([fact]).expand(len(qs), -1)).sigmoid()
            pos.append(float(z[0]))
            neg.append(z[1:].tolist())
    ranked = sum(p > n for p, ns in zip(pos, neg) for n in ns) / sum(map(len, neg))
    return pos, [n for ns in neg for n in ns], ranked


def test_trained_disambiguator_separates_pairs_of_held_out_edits(trained, encoder):
    """(2) on its own, on pairs it never saw: p2 of an edit with its own question ranks above p2 with every
    out-of-scope question of it (pairwise 1.0), is >= 0.5 for all in-scope pairs and below 0.5 for most
    out-of-scope ones (trained with the reference's random negatives only, so the same subject's other
    relations are its hardest case); the untrained MLP is near chance (p2 about 0.5 everywhere)."""
    det, _ = trained
    pos, neg, ranked = _dis_scores(det, encoder)
    torch.manual_seed(0)
    pos0, neg0, ranked0 = _dis_scores(pk.ScopeDetector(hidden=64).eval(), encoder)
    print(f"disambiguator: mean p2 in scope {sum(pos) / len(pos):.3f}, out {sum(neg) / len(neg):.3f}, pairwise "
          f"{ranked:.3f}; untrained {sum(pos0) / len(pos0):.3f}, {sum(neg0) / len(neg0):.3f}, {ranked0:.3f}")
    assert ranked == 1.0 > ranked0 and all(p >= 0.5 for p in pos)
    assert sum(neg) / len(neg) < 0.4 and sum(n < 0.5 for n in neg) >= 0.75 * len(neg)


# ====================================================================== the loop
FACT = "Ellie Kemper is a citizen of Croatia"
SCRIPT = ["Subquestion: Who is the author of Dune?\n",
          ": The author of Dune is Frank Herbert.\nAccording to Generated answer, the entity of Subquestion is: "
          "Frank Herbert\nSubquestion: What is the country of citizenship of Ellie Kemper?\n",
          "\nAccording to Generated answer, the entity of Subquestion is: Croatia\nFinal answer: Croatia"]


def _scripted():
    seen = []

    def gen(text):
        seen.append(text)
        return SCRIPT[len(seen) - 1]
    return gen, seen


def test_no_conflict_keeps_the_generated_answer_and_a_conflict_writes_the_edit():
    """The paper's decision: "no conflict" → the text gets "Generated answer" and the MODEL writes the
    answer (no fact in the transcript: MeLLo would have written its nearest fact, "Retrieved fact: ...");
    a conflict → "Generated answer: {edit}." is written for it."""
    gen, seen = _scripted()
    decide = lambda q: (FACT, {}) if "Ellie Kemper" in q else (None, {})  # noqa: E731
    t = pk.pokemqa_answer(None, "Who is the head of state of the country of Ellie Kemper?", decide,
                          prompt="P", generate=gen)
    assert t.answer == "Croatia" and t.stopped == "final answer" and t.rounds == 3
    assert seen[0] == "P\n\nQuestion: Who is the head of state of the country of Ellie Kemper?"
    assert seen[1] == seen[0] + SCRIPT[0] + "Generated answer"  # no conflict: the model answers
    assert seen[2] == seen[1] + SCRIPT[1] + "Generated answer: " + FACT + "."  # conflict: the edit is written
    assert FACT not in seen[1] and "Retrieved fact" not in t.text
    assert [s["conflict"] for s in t.steps] == [False, True] and t.steps[1]["fact"] == FACT


def test_loop_stops_like_the_reference():
    """More than three generated lines, or a last line that is no subquestion, ends without an answer;
    five rounds at most."""
    decide = lambda q: (None, {})  # noqa: E731
    long = pk.pokemqa_answer(None, "Q?", decide, prompt="P", generate=lambda t: "a\nb\nc\nSubquestion: x?\n")
    assert (long.answer, long.stopped) == ("", "no subquestion")
    loop = pk.pokemqa_answer(None, "Q?", decide, prompt="P", generate=lambda t: ": y\nSubquestion: x?\n")
    assert (loop.answer, loop.stopped, loop.rounds) == ("", "max rounds", 5)


def test_the_trained_detector_drives_the_loop_of_an_applied_edit(small, trained, cache):
    """Through an applied edit: the subquestion about Dune is out of every edit's scope (the model's
    answer stands), the one about Ellie Kemper's citizenship is the edit's (written in)."""
    det, hp = trained
    e = edit.compute("pokemqa", [Request("{} is a citizen of", "Ellie Kemper", " Croatia")], model=small,
                     hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    gen, seen = _scripted()
    with edit.applied(small, e):
        mem = e.interventions[0]
        assert question_answerer(small) is mem  # score_mquake asks the multi-hop questions through it
        t = mem.trace(small, "Who is the head of state of the country of Ellie Kemper?", generate=gen)
        assert small.transform("Ellie Kemper is a citizen of") == FACT + ".\nEllie Kemper is a citizen of"
        assert small.transform("My favourite food is") == "My favourite food is"
    assert [s["conflict"] for s in t.steps] == [False, True]
    assert seen[1].endswith("Generated answer") and seen[2].endswith("Generated answer: " + FACT + ".")


def test_revert_is_exact_and_no_weight_moves(small, trained):
    det, hp = trained
    params = [p.detach().clone() for p in small.hf_model.parameters()]
    prompt = "Ellie Kemper is a citizen of"
    base, ids = small.last_logits([prompt])[0].clone(), small.encode(prompt)
    e = edit.compute("pokemqa", [Request("{} is a citizen of", "Ellie Kemper", " Croatia")], model=small,
                     hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    e.apply(small)
    assert small.encode(prompt) != ids
    e.revert(small)
    assert small.encode(prompt) == ids and torch.equal(small.last_logits([prompt])[0], base)
    assert all(torch.equal(a, b) for a, b in zip(params, small.hf_model.parameters()))


# ====================================================================== training data and artefact
def _case(cid, subject, target):
    q = f"What is the country of citizenship of {subject}?"
    return {"case_id": cid, "requested_rewrite": [{"prompt": "{} is a citizen of", "subject": subject,
                                                   "target_new": {"str": target}, "target_true": {"str": "Peru"},
                                                   "question": q}],
            "new_single_hops": [{"question": q, "answer": target},
                                {"question": f"Who is the head of state of {target}?", "answer": "Someone"}],
            "questions": ["?"], "new_answer": "Someone"}


def test_training_data_comes_from_the_cases_after_the_evaluated_ones():
    cases = [_case(1, "Ellie Kemper", "Croatia"), _case(2, "Carl Sagan", "Japan"), _case(3, "Ada Lovelace", "Kenya"),
             _case(4, "Ellie Kemper", "Croatia")]  # case 4 repeats an evaluated edit: dropped
    d = pk.mquake_training_dicts(cases, eval_cases=2)
    assert [(x["case_id"], x["rephrase_prompt"], x["locality_prompt"]) for x in d] == \
        [(3, "What is the country of citizenship of Ada Lovelace?", "Who is the head of state of Kenya?")]
    with pytest.raises(pk.TrainingOverlapError):
        pk.mquake_training_dicts(cases + [_case(2, "Yo-Yo Ma", "Peru")], eval_cases=2)


def test_missing_detector_names_the_exact_training_command(small, cache, tmp_path):
    """Without a trained detector the edit fails with `locate-edit train pokemqa --data <derived file>`; that
    file is what the command's loader reads, and training on it exactly as the command would makes the same
    edit succeed."""
    cases = [_case(i + 1, s, TARGETS[0][i % 4].strip()) for i, s in enumerate(SUBJECTS)]
    src = tmp_path / "mquake-small.json"
    src.write_text(json.dumps(cases))
    hp = dict(prompt=pk.FORMAT_EXAMPLE_NAME, train_data=str(src), eval_cases=6, train_steps=2, batch_size=2,
              hidden=8)
    before = [p.detach().clone() for p in small.hf_model.parameters()]
    req = [Request("{} is a citizen of", "Ellie Kemper", " Croatia")]
    with pytest.raises(TrainedEditorMissingError) as err:
        edit.compute("pokemqa", req, model=small, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    cmd = err.value.command.split()
    assert cmd[:4] == ["locate-edit", "train", "pokemqa", "--data"] and str(err.value).endswith(err.value.command)
    assert "--model" in cmd and "--hparam" in cmd and all(p.is_leaf for p in before)
    records = load_training_data(cmd[4])  # what `locate-edit train` reads
    assert sorted({r.request.subject for r in records}) == sorted(SUBJECTS[6:])
    extra = dict(kv.split("=", 1) for kv in cmd[cmd.index("--hparam"):][1::2])
    method = edit.get_method("pokemqa")
    pk.train_pokemqa(small, records, method.make_hparams({k: json.loads(v) for k, v in extra.items()}), progress=False)
    e = edit.compute("pokemqa", req, model=small, hparams=hp, runtime=edit.Runtime(check_efficacy=False))
    assert e.interventions[0].facts == [FACT]
    assert all(torch.equal(a, b) for a, b in zip(before, small.hf_model.parameters()))


def test_bad_hparams_are_refused():
    for bad in ({"threshold": 1.5}, {"max_rounds": 0}, {"stop": ()}, {"plain_template": "{x}"}, {"eval_cases": -1}):
        with pytest.raises(InvalidHparamsError):
            pk.PokeMQAHparams(**bad)
