"""Key second moments C = E[k kᵀ]: one pass over all layers, sources, disk cache with integrity check."""

from __future__ import annotations

import warnings

import pytest
import torch

from edit.stats import MODEL_SAMPLES, KeyStats, key_second_moments, stats_path, token_stream
from locate.errors import SingularStatisticsError
from locate.loading import CacheRebuiltWarning
from locate.testing import tiny_model

TEXTS = ["The cat sat on the mat and looked at the garden.", "Paris is the capital of France, a country in Europe.",
         "In 1969 astronauts first walked on the Moon.", "Water boils at one hundred degrees Celsius."] * 12


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    return tmp_path


def _direct(lm, texts, layer, n_tokens, seq_len):
    tokens, _ = token_stream(lm, texts, n_tokens, seq_len=seq_len)
    keys = []
    for w in tokens.split(seq_len):
        _, cache = lm.run_with_cache(w[None].to(lm.device))
        keys.append(cache[lm.hook_mlp_key(layer)][0])
    K = torch.cat(keys).double()
    return K.T @ K / K.shape[0]


def test_one_pass_matches_direct_computation_for_every_layer(lm, tmp_cache):
    stats = key_second_moments(lm, [2, 7], corpus=TEXTS, n_tokens=300, seq_len=64, batch_tokens=128,
                               progress=False)
    assert sorted(stats) == [2, 7]
    for layer in (2, 7):
        C = _direct(lm, TEXTS, layer, 300, 64)
        st = stats[layer]
        assert st.C.dtype == torch.float64 and st.C.shape == (lm.d_mlp, lm.d_mlp)
        assert st.n_tokens == 300 and st.source == "iterable of strings (300 tokens)"
        assert ((st.C - C).abs().max() / C.abs().max()) < 1e-5


ENOUGH = 2000  # >= d_mlp = 1536: statistics from fewer tokens are singular and never cached


def test_cache_hit_and_corrupt_file_is_detected_and_rebuilt(lm, tmp_cache):
    first = key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)[3]
    assert not first.cached
    path = stats_path(lm, 3, first.corpus_hash, ENOUGH)
    assert path.is_file() and str(path).startswith(str(tmp_cache / "stats" / lm.fingerprint))
    again = key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)[3]
    assert again.cached and torch.equal(again.C, first.C)

    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # flip bits inside C
    path.write_bytes(bytes(raw))
    with pytest.warns(CacheRebuiltWarning, match="SHA-256"):
        rebuilt = key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)[3]
    assert not rebuilt.cached and torch.equal(rebuilt.C, first.C)

    path.write_bytes(b"not a safetensors file")
    with pytest.warns(CacheRebuiltWarning, match="unreadable"):
        key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)
    # a file holding another key (here: another layer) is refused, not silently used
    other = stats_path(lm, 4, first.corpus_hash, ENOUGH)
    other.write_bytes(path.read_bytes())
    with pytest.warns(CacheRebuiltWarning, match="layer"):
        key_second_moments(lm, 4, n_tokens=ENOUGH, progress=False)


def test_different_corpus_or_token_count_gets_its_own_entry(lm, tmp_cache):
    a = key_second_moments(lm, 1, corpus=TEXTS, n_tokens=100, progress=False)[1]
    b = key_second_moments(lm, 1, corpus=TEXTS[1:], n_tokens=100, progress=False)[1]
    c = key_second_moments(lm, 1, corpus=TEXTS, n_tokens=120, progress=False)[1]
    assert a.corpus_hash != b.corpus_hash and not b.cached and not c.cached and c.n_tokens == 120


def test_text_file_source_records_file_and_token_count(lm, tmp_cache, shared_data):
    path = shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    st = key_second_moments(lm, 0, corpus=path, n_tokens=256, progress=False)[0]
    assert st.source == "file wiki.valid.raw (256 tokens)" and st.n_tokens == 256
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        key_second_moments(lm, 0, corpus=path.parent / "nope.txt", n_tokens=10, progress=False)


def test_model_samples_by_name_and_says_so(lm, tmp_cache):
    tiny = tiny_model("gpt2", lm.tokenizer)  # d_mlp = 256: enough sampled tokens to be cached, sampled fast
    st = key_second_moments(tiny, 0, corpus=MODEL_SAMPLES, n_tokens=256, seq_len=32, progress=False)[0]
    assert st.source.startswith("model samples (asked for") and st.n_tokens == 256
    assert key_second_moments(tiny, 0, corpus=MODEL_SAMPLES, n_tokens=256, seq_len=32, progress=False)[0].cached


def test_solve_is_a_cholesky_solve_and_singular_stats_raise():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 8, generator=g, dtype=torch.float64)
    st = KeyStats(0, A.T @ A / 50, 50, "test", "x")
    k = torch.randn(8, dtype=torch.float64, generator=g)
    x = st.solve(k)
    assert torch.allclose(st.C @ x, k, atol=1e-10)
    singular = KeyStats(0, torch.ones(8, 8, dtype=torch.float64), 1, "test", "x")
    with pytest.raises(SingularStatisticsError, match="not positive definite"):
        singular.solve(k)


def test_every_tiny_architecture(tiny, tmp_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = key_second_moments(tiny, [0, tiny.n_layers - 1], corpus=TEXTS, n_tokens=128, seq_len=32,
                                   progress=False)
    for st in stats.values():
        assert st.C.shape == (tiny.d_mlp, tiny.d_mlp) and torch.isfinite(st.C).all()
        assert torch.allclose(st.C, st.C.T)


def test_caches_made_under_other_library_versions_are_not_reused(lm, tmp_cache, monkeypatch):
    """Statistics, context templates and layer profiles are keyed by the library versions as well as
    the weights: transformers 5.24 once broke cached forwards, and what it computed must not outlive it."""
    import transformers

    from edit.context import context_templates
    from locate.loading import derived_cache_key

    first = key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)[3]
    key, installed = derived_cache_key(lm), transformers.__version__
    templates = context_templates(lm, lengths=((4, 2),))
    assert key.startswith(lm.fingerprint) and len(list((tmp_cache / "context").glob(f"{key}-*"))) == 1
    monkeypatch.setattr(transformers, "__version__", "0.0.0-other")
    assert derived_cache_key(lm) != key
    again = key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)[3]
    assert not again.cached and torch.equal(again.C, first.C)  # recomputed (deterministically), not reused
    assert stats_path(lm, 3, first.corpus_hash, ENOUGH).parent.name == derived_cache_key(lm)
    assert context_templates(lm, lengths=((4, 2),)) == templates  # regenerated: same seed, same text
    assert len(list((tmp_cache / "context").glob(f"{lm.fingerprint}-*"))) == 2
    monkeypatch.setattr(transformers, "__version__", installed)  # not undo(): that would also drop tmp_cache's env
    assert derived_cache_key(lm) == key
    assert key_second_moments(lm, 3, n_tokens=ENOUGH, progress=False)[3].cached
