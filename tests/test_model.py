"""The hooked-model layer: default model, cache integrity, vocabulary, tokenization, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

import locate
from locate import loading
from locate.errors import (
    CacheCorruptedError,
    EmptyTargetError,
    LayerOutOfRangeError,
    ModelNotFoundError,
    SubjectNotFoundError,
)

EIFFEL = "The Eiffel Tower is located in the city of"


def test_default_model_dimensions(lm):
    assert (lm.n_layers, lm.d_model, lm.d_mlp) == (30, 576, 1536)
    assert lm.name == "SmolLM2-135M-Instruct"


def test_default_model_knows_paris(lm):
    top = lm.predict(EIFFEL, 5)
    assert top[0].token == " Paris"
    assert top[0].prob > 0.5
    assert all(a.prob >= b.prob for a, b in zip(top, top[1:]))


def test_generate_is_greedy(lm):
    text = lm.generate(EIFFEL, 3)
    assert text.startswith(" Paris")
    # greedy: each token is the argmax given the previous ones
    ids = lm.encode(EIFFEL)
    for tok in lm.tokenizer(text, add_special_tokens=False)["input_ids"][:3]:
        logits = lm.bridge(torch.tensor([ids]))[0, -1]
        assert int(logits.argmax()) == tok
        ids.append(tok)


def test_bos_policy_follows_tokenizer(lm):
    ids = lm.encode(EIFFEL)
    assert ids[0] != lm.tokenizer.bos_token_id  # SmolLM2's tokenizer adds no BOS
    assert lm.to_str_tokens(EIFFEL)[0] == "The"


def test_hooks_fire_with_expected_shapes(lm):
    names = [lm.hook_embed, lm.hook_resid(3), lm.hook_mlp_out(3), lm.hook_attn_out(3), lm.hook_mlp_key(3)]
    _, cache = lm.run_with_cache(torch.tensor([lm.encode(EIFFEL)]), names_filter=lambda n: n in names)
    T = len(lm.encode(EIFFEL))
    assert cache[lm.hook_mlp_key(3)].shape == (1, T, lm.d_mlp)
    for n in names[:4]:
        assert cache[n].shape == (1, T, lm.d_model)


def test_weight_write_changes_outputs_and_restores(lm):
    W = lm.mlp_out_weight(5)
    before = lm.last_logits([EIFFEL]).clone()
    saved = W.clone()
    try:
        W.add_(0.05 * torch.randn_like(W))
        after = lm.last_logits([EIFFEL])
        assert (after - before).abs().max() > 1e-3
    finally:
        W.copy_(saved)
    assert torch.equal(lm.last_logits([EIFFEL]), before)


def test_subject_span(lm):
    assert lm.subject_span(EIFFEL, "The Eiffel Tower") == (0, 4)
    prompt = "I visited the Eiffel Tower yesterday"
    start, end = lm.subject_span(prompt, " Eiffel Tower")  # leading space on the subject
    assert "".join(lm.to_str_tokens(prompt)[start:end]).strip() == "Eiffel Tower"


def test_subject_span_bpe_merge_across_boundary(lm):
    # "Tower's" - the subject ends inside a word; the span must cover every overlapping token
    prompt = "The Tower's height is"
    start, end = lm.subject_span(prompt, "Tow")
    toks = lm.to_str_tokens(prompt)
    assert "".join(toks[start:end]).strip().startswith("Tow")


def test_target_ids_leading_space(lm):
    rome = lm.target_ids(" Rome", EIFFEL)
    assert lm.tokenizer.decode(rome) == " Rome"
    assert lm.target_ids(" Rome") == rome
    multi = lm.target_ids(" New York City", EIFFEL)
    assert len(multi) == 3 and lm.tokenizer.decode(multi) == " New York City"


def test_bad_input_errors(lm):
    with pytest.raises(SubjectNotFoundError, match="Louvre"):
        lm.subject_span(EIFFEL, "The Louvre")
    with pytest.raises(EmptyTargetError):
        lm.target_ids("")
    with pytest.raises(EmptyTargetError):
        lm.target_ids("   ", EIFFEL)
    with pytest.raises(LayerOutOfRangeError, match="0..29"):
        lm.mlp_out_weight(30)
    with pytest.raises(LayerOutOfRangeError):
        lm.hook_resid(-1)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        locate.load_model("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        locate.load_model("/nonexistent/dir")


def test_default_model_is_shared(lm):
    assert locate.resolve_model(None) is lm
    with pytest.raises(TypeError):
        locate.resolve_model("gpt2")


def test_cache_manifest_detects_corruption(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.bin").write_bytes(b"0123456789" * 100)
    loading.write_manifest(d)
    loading.verify_manifest(d)
    # truncation
    (d / "a.bin").write_bytes(b"0123456789" * 99)
    with pytest.raises(CacheCorruptedError, match="truncated"):
        loading.verify_manifest(d)
    # same size, flipped byte
    (d / "a.bin").write_bytes(b"1123456789" + b"0123456789" * 99)
    with pytest.raises(CacheCorruptedError, match="SHA-256"):
        loading.verify_manifest(d)
    # unreadable manifest
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorruptedError, match="manifest"):
        loading.verify_manifest(d)


def test_corrupted_default_cache_is_rebuilt_and_reported(tmp_path, monkeypatch, lm):
    """Copy the real cache, corrupt the weights file, and check it is rebuilt (not used)."""
    import shutil

    src = loading.default_model_cache()
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    dst = loading.default_model_cache()
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.warns(loading.CacheRebuiltWarning, match="truncated"):
        hf, tok, report = loading.load_default_hf()
    assert report.source == "gguf" and "truncated" in report.rebuilt_because
    loading.verify_manifest(dst)  # the rebuilt cache is whole
    probe = torch.tensor([lm.encode(EIFFEL)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lm.hf_model(probe).logits[0, -1]
        assert torch.allclose(hf(probe).logits[0, -1], ref, atol=1e-4)


def test_cached_load_is_fast_and_reported(lm):
    hf, tok, report = loading.load_default_hf()
    assert report.source == "cache"
    assert report.seconds < 10


def test_kv_cache_continuation_matches_full_forward_or_load_fails(tiny):
    """The check HookedLM runs at load: it passes on the installed libraries, and a model whose
    forward drops the key/value cache (as transformers 5.24 with the 4.3 bridge does) is refused."""
    tiny._check_kv_cache()  # the installed versions keep the cache
    orig = tiny.hf_model.forward

    def drops_cache(*args, past_key_values=None, use_cache=None, **kw):
        return orig(*args, **kw)

    tiny.hf_model.forward = drops_cache
    try:
        with pytest.raises(locate.IncompatibleLibraryError, match="key/value cache"):
            tiny._check_kv_cache()
    finally:
        del tiny.hf_model.forward
    tiny._check_kv_cache()
