"""Metrics on hand-made cases whose answers are known exactly.

``BigramLM`` is a fake model over characters whose next-token distribution depends only on the
current character, with probabilities we choose, so P(multi-token target) is a product we can write
down. A tiny random model checks batched teacher forcing against an unbatched computation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edit.eval.datasets import Case, ChoiceItem, Probe
from edit.eval.metrics import (
    choice_accuracy,
    harmonic_mean,
    n_gram_entropy,
    n_gram_entropy_one,
    pearson,
    reference_predictions,
    score_case,
    spearman,
    teacher_forced,
    aggregate,
    CONSISTENCY_NOT_AVAILABLE,
)
from edit.request import Request
from locate.model import Batch

V = 128


class BigramLM:
    """Characters are tokens; P(next | ..., c) = table[c] (``over[c]`` sets some entries, the rest
    of the mass is spread evenly over the other characters)."""

    device = torch.device("cpu")

    def __init__(self, over: dict[str, dict[str, float]]):
        self.set(over)

    def set(self, over):
        probs = torch.full((V, V), 1.0 / V, dtype=torch.float64)
        for c, nxt in over.items():
            row = torch.full((V,), (1.0 - sum(nxt.values())) / (V - len(nxt)), dtype=torch.float64)
            for n, p in nxt.items():
                row[ord(n)] = p
            probs[ord(c)] = row
        self.logp = probs.log()

    def encode(self, text):
        return [ord(ch) for ch in text]

    def target_ids(self, target, prompt=None):
        return [ord(ch) for ch in target]

    def pad(self, rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return Batch(ids, mask, mask.sum(1))

    def forward(self, batch):
        return self.logp[batch.ids].float()


# After "f" (prompts end in "of"): new target "AB" has P = 0.6 * 0.25 = 0.15, true target "C" has 0.2.
# So P(new) < P(true) (ES = 0 by the definition), but the per-token geometric mean of "AB" is
# sqrt(0.15) = 0.387 > 0.2 (ES = 1 under the ROME code's mean normalisation).
TABLE = {"f": {"A": 0.6, "C": 0.2}, "A": {"B": 0.25}, "n": {"C": 0.5, "A": 0.1}, "?": {"X": 0.9}, "X": {"Y": 0.9}}


@pytest.fixture
def fake():
    return BigramLM(TABLE)


def test_teacher_forced_multi_token_is_product_of_token_probs(fake):
    tf_new, tf_true, tf_ax = teacher_forced(fake, ["city of", "city of", "city of"], ["AB", "C", "AX"], batch_size=2)
    assert tf_new.logprob == pytest.approx(math.log(0.6 * 0.25), rel=1e-5)
    assert tf_true.logprob == pytest.approx(math.log(0.2), rel=1e-5)
    assert tf_new.mean_logprob == pytest.approx(0.5 * math.log(0.15), rel=1e-5)
    assert tf_new.accuracy == 1.0 and tf_new.exact  # A is top-1 after f, B is top-1 after A
    assert tf_ax.accuracy == 0.5 and not tf_ax.exact  # X is not top-1 after A


def _cf_case():
    req = Request("{} is in the city of", "Zed", "AB", "C")
    # paraphrases end in "of" (P(new)=0.15 < P(true)=0.2) or in "n" (P(A)P(B|A)=0.025 < P(C)=0.5)
    return Case(1, "counterfact", [req], paraphrase_prompts=["Zed lies in the town of", "Zed is in"],
                neighborhood_prompts=["Ann is in the city of", "Bob is in"])


def test_counterfact_scores_known_values(fake):
    s = score_case(fake, _cf_case(), fluency=False)
    p_new, p_true = 0.15, 0.2
    assert s["es"] == 0.0 and s["em"] == pytest.approx(p_new - p_true, abs=1e-6)
    assert s["ps"] == 0.0 and s["pm"] == pytest.approx(((0.15 - 0.2) + (0.025 - 0.5)) / 2, abs=1e-6)
    assert s["ns"] == 1.0 and s["nm"] == pytest.approx(((0.2 - 0.15) + (0.5 - 0.025)) / 2, abs=1e-6)
    assert s["rewrite_acc"] == 1.0
    # "Zed is in" ends in "n": A is not top-1 (C is) but B is after A -> 0.5; the other paraphrase -> 1.0
    assert s["paraphrase_acc"] == pytest.approx(0.75)


def test_mean_normalisation_flips_efficacy(fake):
    s = score_case(fake, _cf_case(), fluency=False, normalize="mean")
    assert s["es"] == 1.0  # sqrt(0.15) > 0.2
    assert s["em"] == pytest.approx(math.sqrt(0.15) - 0.2, abs=1e-6)


def test_locality_is_agreement_with_the_unedited_model(fake):
    case = Case(2, "zsre", [Request("Q {}?", "Zed", "AB")], locality=[Probe("what?", ("XY",)), Probe("why?", ("XZ",))])
    ref = reference_predictions(fake, case)
    before = score_case(fake, case, reference=ref, fluency=False)
    assert before["locality"] == 1.0
    assert before["locality_acc"] == pytest.approx((1.0 + 0.5) / 2)  # "XZ": Z is not top-1 after X
    fake.set({**TABLE, "X": {"W": 0.9}})  # "edit": after X the model now prefers W
    after = score_case(fake, case, reference=ref, fluency=False)
    assert after["locality"] == pytest.approx(0.5)  # first token (X after ?) agrees, second does not


def test_portability_accuracy_and_aliases(fake):
    case = Case(3, "mquake", [Request("{} of", "Zed", "AB")],
                portability=[Probe("huh?", ("XQ", "XY")), Probe("so of", ("C",))])
    s = score_case(fake, case, fluency=False)
    assert s["portability"] == pytest.approx((0.5 + 0.0) / 2)  # main answers: "XQ" half right, "C" not top-1
    assert s["portability_em"] == pytest.approx(0.5)  # alias "XY" is exactly top-1


def test_n_gram_entropy_hand_computed():
    # tokens a b a b: bigrams ab,ba,ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert n_gram_entropy_one("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # a repetitive text has lower entropy than a varied one; punctuation is its own token
    assert n_gram_entropy_one("the the the the the the") < n_gram_entropy_one("the cat sat on a warm mat today")
    assert n_gram_entropy_one("a, b") == n_gram_entropy_one("a , b")
    assert n_gram_entropy(["a b a b", "a b a b"]) == pytest.approx(n_gram_entropy_one("a b a b"))


def test_harmonic_mean_and_aggregate():
    assert harmonic_mean([1.0, 0.5, 0.5]) == pytest.approx(0.6)
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    agg = aggregate([{"es": 1.0, "ps": 0.5, "ns": 1.0}, {"es": 1.0, "ps": 0.5, "ns": 0.0}])
    assert agg["es"] == 1.0 and agg["ns"] == 0.5
    assert agg["score"] == pytest.approx(3 / (1 + 2 + 2))
    assert agg["consistency"] == CONSISTENCY_NOT_AVAILABLE


def test_correlations():
    assert spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (0.5, 0.5, 2) vs (0, 1, 2)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_batched_teacher_forcing_matches_unbatched(tokenizer):
    """On a tiny random Llama: padded batches give the same per-token log-probs as one prompt at a time."""
    from locate.testing import tiny_model

    lm = tiny_model("llama", tokenizer)
    prompts = ["The Eiffel Tower is in", "Paris is the capital of", "A"]
    targets = [" the city of Rome", " France", " New York City"]
    got = teacher_forced(lm, prompts, targets, batch_size=2)
    for p, t, tf in zip(prompts, targets, got):
        pid, tid = lm.encode(p), lm.target_ids(t, p)
        assert len(tid) > 1 or t == " France"
        with torch.no_grad():
            logits = lm.hf_model(input_ids=torch.tensor([pid + tid])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        want = sum(float(lp[len(pid) - 1 + j, tok]) for j, tok in enumerate(tid))
        assert tf.logprob == pytest.approx(want, abs=1e-4)
        assert tf.target_ids == tid


def test_choice_accuracy_sum_and_char_normalised():
    # After "Answer:" the model writes " " (0.9), then "A" (0.3) or "C" (0.6), and "C" again after "C" (0.4):
    # log P(" A") = log 0.27 > log P(" CC") = log 0.216, but per character " CC" wins: log(0.216)/2 > log(0.27)/1.
    lm = BigramLM({":": {" ": 0.9}, " ": {"A": 0.3, "C": 0.6}, "C": {"C": 0.4}})
    items = [ChoiceItem("g", ("A", "CC"), 0), ChoiceItem("h", ("CC", "A"), 1)]
    assert choice_accuracy(lm, items) == 1.0
    assert choice_accuracy(lm, items, normalize="chars") == 0.0
    assert choice_accuracy(lm, [ChoiceItem("g", ("A", "CC"), 1)]) == 0.0
