"""Fidelity to the reference code (issue 17): each test is built so that the reference's behaviour and
the toolkit's earlier one give different numbers, and asserts the reference's.

* the KL term of v*: KL(edited ‖ original) at the subject's last token of "{s} is a" (rome/compute_v.py);
* MEMIT's keys: averaged within each template group, then across groups (memit/compute_ks.py);
* fluency texts: always ``max_length`` tokens, through end-of-sequence (util/generate.py);
* the statistics corpus: one default everywhere (the packaged WikiText-2 head), model samples only by name.
"""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Request
from edit.context import normalize_generation, subject_keys, subject_last_token, template_groups
from edit.eval.datasets import Case
from edit.eval.metrics import sample_generations
from edit.methods.memit import MEMITHparams
from edit.stats import DEFAULT_CORPUS, MODEL_SAMPLES, describe_corpus, key_second_moments, token_stream
from edit.vstar import KL_PROMPT, optimize_targets
from locate import capture_at
from locate.testing import tiny_model

REQ = Request("{} plays the sport of", "Michael Jordan", " football", " basketball")


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    return tiny_model("llama", tokenizer, seed=1)


@pytest.fixture(scope="module")
def sharp(tokenizer):
    """A tiny model with peaked next-token distributions (random init gives near-uniform ones, where
    KL is nearly symmetric and the two orders could not be told apart)."""
    lm = tiny_model("llama", tokenizer, seed=2)
    with torch.no_grad():
        lm.hf_model.get_output_embeddings().weight.mul_(300.0)
    return lm


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """KL(p ‖ q) from log-probabilities, by hand."""
    return float((p_log.exp() * (p_log - q_log)).sum())


# ------------------------------------------------------------------ item 2: the KL term of v*
def test_vstar_kl_is_edited_vs_original_at_the_subjects_last_token(sharp):
    lm, layer, kl_factor = sharp, 0, 10.0
    tv = optimize_targets(lm, [REQ], layer, site="mlp_out", templates=["{}"], steps=2, lr=2.0,
                          kl_factor=kl_factor, stop_loss=-1.0, weight_decay=0.0)
    delta = tv.delta[0]
    kl_in_loss = (tv.final_loss[0] - tv.final_nll[0]) / kl_factor  # no weight decay here

    # the essence prompt, run by hand with and without δ at the subject's last token
    ids, s = subject_last_token(lm, "{}", Request(KL_PROMPT, REQ.subject, REQ.target_new))
    assert s < len(ids) - 1  # " is a" follows the subject: the two positions differ

    def logprobs(add: bool) -> torch.Tensor:
        def hook(x, hook):
            x = x.clone()
            x[0, s] += delta.to(x.dtype)
            return x
        with torch.no_grad():
            out = lm.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(lm.hook_mlp_out(layer), hook)] if add else [])
        return out[0].float().log_softmax(-1)

    edited, original = logprobs(True), logprobs(False)
    reference = _kl(edited[s], original[s])  # KL(P_edited ‖ P_original) at the subject's last token
    others = {"reverse order": _kl(original[s], edited[s]),
              "after 'is a'": _kl(edited[-1], original[-1]),
              "reverse, after 'is a'": _kl(original[-1], edited[-1])}
    assert reference > 1e-4
    assert kl_in_loss == pytest.approx(reference, rel=2e-3, abs=1e-6)
    for name, v in others.items():
        assert abs(v - reference) > 10 * 2e-3 * reference, f"the case does not separate the {name} variant"


def test_vstar_kl_position_option(tiny_llama):
    with pytest.raises(edit.InvalidHparamsError, match="kl_position"):
        optimize_targets(tiny_llama, [REQ], 0, templates=["{}"], steps=1, kl_position="end")


# ------------------------------------------------------------------ item 3: MEMIT's keys
def test_memit_keys_average_within_template_groups_first(tiny_llama):
    lm = tiny_llama
    templates = ["{}", "The weather was cold. {}", "I said yes. {}", "Because of that. {}"]
    keys = torch.stack([capture_at(lm, [subject_last_token(lm, t, REQ)[0]], [subject_last_token(lm, t, REQ)[1]],
                                   lm.hook_mlp_key(0))[0].double() for t in templates])
    reference = 0.5 * keys[0] + 0.5 * keys[1:].mean(0)  # bare prompt weighs 1/2 (groups [1, 3])
    uniform = keys.mean(0)  # bare prompt weighs 1/4
    got = subject_keys(lm, [REQ], 0, templates, groups=[1, 3])[0].double()
    assert torch.allclose(got, reference, atol=1e-5)
    assert not torch.allclose(uniform, reference, atol=1e-3)
    assert torch.allclose(subject_keys(lm, [REQ], 0, templates)[0].double(), uniform, atol=1e-5)
    assert template_groups(((10, 5),)) == [1, 5] and MEMITHparams().key_average == "grouped"
    with pytest.raises(ValueError, match="partition"):
        subject_keys(lm, [REQ], 0, templates, groups=[1, 2])
    with pytest.raises(edit.InvalidHparamsError, match="key_average"):
        MEMITHparams(key_average="mean")


# ------------------------------------------------------------------ item 7: fluency generations
def test_fluency_generation_goes_through_eos(tiny_llama):
    lm, prompt, length = tiny_llama, "The city of", 24
    tok = lm.tokenizer
    greedy = sample_generations(lm, [prompt], max_length=length, top_k=1)[0]
    first = lm.encode(greedy, raw=True)[len(lm.encode(prompt, raw=True))]
    saved = (tok.eos_token_id, tok.eos_token, list(tok.all_special_ids))
    tok.eos_token_id = first  # the model's first new token is now "EOS"
    try:
        stopped = sample_generations(lm, [prompt], max_length=length, top_k=1, stop_at_eos=True)[0]
        reference = sample_generations(lm, [prompt], max_length=length, top_k=1)[0]
    finally:
        tok.eos_token_id = saved[0]
    assert (tok.eos_token_id, tok.eos_token, list(tok.all_special_ids)) == saved  # the shared tokenizer is intact
    assert len(lm.encode(stopped, raw=True)) <= len(lm.encode(prompt, raw=True)) + 1
    assert reference == greedy and len(lm.encode(reference, raw=True)) >= length - 2


def test_generated_text_is_normalised_as_the_reference():
    assert normalize_generation("one\n\ntwo ﬁne café") == "one two fine cafe\u0301"


# ------------------------------------------------------------------ item 1: the statistics corpus
def test_default_corpus_is_packaged_wikitext_and_a_prefix_of_the_full_file(tiny_llama, shared_data, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    assert DEFAULT_CORPUS.is_file() and (DEFAULT_CORPUS.parent / "README.md").read_text().count("CC BY-SA 3.0")
    full = shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    a, ha = token_stream(tiny_llama, None, 3000)
    b, hb = token_stream(tiny_llama, full, 3000)
    assert ha == hb and torch.equal(a, b)
    st = key_second_moments(tiny_llama, 0, n_tokens=3000, progress=False, cache=False)[0]
    assert st.source.startswith("packaged WikiText-2 validation head") and "3000 tokens" in st.source
    assert describe_corpus(MODEL_SAMPLES) == "model samples"


def test_model_samples_only_when_asked(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    st = key_second_moments(tiny_llama, 0, corpus=MODEL_SAMPLES, n_tokens=64, seq_len=32, progress=False)[0]
    assert st.source.startswith("model samples (asked for") and st.n_tokens == 64


def test_evaluate_records_the_statistics_source(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    case = Case("c0", "counterfact", [REQ], paraphrase_prompts=["Jordan, Michael, plays the sport of"],
                neighborhood_prompts=["Larry Bird plays the sport of"])
    res = edit.evaluate("rome", [case], model=tiny_llama, fluency=False, progress=False,
                        hparams={"layers": 0, "v_steps": 2, "template_lengths": ((4, 1),), "stats_tokens": 2000})
    assert res.settings["statistics"].startswith("packaged WikiText-2 validation head")
    assert res.records[0]["statistics"] == ["packaged WikiText-2 validation head (wikitext2_valid_head.txt) "
                                            "(2000 tokens)"]
