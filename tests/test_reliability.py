"""Issue 18 ("no silent wrong results"), items 1, 2, 4, 7, 9, 10 and 11: each test fails on the behaviour
the issue measured (commit 61f2da2) and passes now. Tiny random models, temporary cache directories."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

import edit
import locate
from edit import Edit, HookModule, Request, WeightDelta
from edit import context as context_module
from edit import registry
from edit.methods.memit import ConflictingRequestsError, check_conflicts
from edit.stats import KeyStats, check_corpus_file, key_second_moments, stats_for, stats_path
from locate.errors import (
    CacheCorruptedError,
    CorpusError,
    CorpusNotFoundError,
    EditIneffectiveWarning,
    EmptyPromptError,
    InsufficientStatisticsError,
    InsufficientStatisticsWarning,
    InvalidArgumentError,
    InvalidEditError,
    LayerOutOfRangeError,
    LayerSpecError,
    LocateEditError,
    NonFiniteEditError,
    TargetSpacingWarning,
    UnknownParameterError,
)
from locate.loading import CacheRebuiltWarning, read_cached, verify_cached, write_cached
from locate.testing import tiny_model

TEXTS = ["The cat sat on the mat and looked at the garden.", "Paris is the capital of France, a country in Europe.",
         "In 1969 astronauts first walked on the Moon.", "Water boils at one hundred degrees Celsius."] * 12
EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCATE_EDIT_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def gpt2(tokenizer):
    return tiny_model("gpt2", tokenizer)  # d_mlp = 256


def _weights(lm):
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def _same(lm, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(lm.hf_model.state_dict().values(), before))


def _dense_edit(lm, layer=0, scale=1.0, seed=0, request=EIFFEL):
    g = torch.Generator().manual_seed(seed)
    delta = WeightDelta(layer, dense=torch.randn(lm.d_model, lm.d_mlp, generator=g) * scale)
    return Edit("test", [request], [delta], lm.fingerprint, lm.name)


# ============================================================== item 1: caches describe the model as it is
def test_statistics_computed_under_an_edit_are_not_read_back_after_revert(gpt2, tmp_cache):
    base = key_second_moments(gpt2, 1, corpus=TEXTS, n_tokens=400, progress=False)[1]
    e = _dense_edit(gpt2).apply(gpt2)
    edited = key_second_moments(gpt2, 1, corpus=TEXTS, n_tokens=400, progress=False)[1]
    assert not edited.cached and float((edited.C - base.C).abs().max()) > 1e-3  # the edited model's own C
    e.revert(gpt2)
    again = key_second_moments(gpt2, 1, corpus=TEXTS, n_tokens=400, progress=False)[1]
    assert again.cached and torch.equal(again.C, base.C)  # the unedited model's C, not the edited one
    assert len(list((tmp_cache / "stats").iterdir())) == 2  # two models, two keys


def test_context_templates_under_an_edit_are_their_own_entry(gpt2, tmp_cache):
    lengths = ((4, 3),)
    base = edit.context_templates(gpt2, lengths=lengths)
    with edit.applied(gpt2, _dense_edit(gpt2, scale=5.0)):
        edited = edit.context_templates(gpt2, lengths=lengths)
    assert edited != base  # sampled from the edited model, not read back as the unedited one's
    assert edit.context_templates(gpt2, lengths=lengths) == base
    assert len(list((tmp_cache / "context").glob("*.json"))) == 2


# ============================================================== item 2: non-finite or corrupted edits
def test_an_edit_file_holding_nan_is_refused_on_load_and_apply(gpt2, tmp_path):
    e = _dense_edit(gpt2)
    e.deltas[0].dense[3, 4] = float("nan")
    path = e.save(tmp_path / "nan.safetensors")  # a NaN saved on purpose passes the checksum...
    before = _weights(gpt2)
    with pytest.raises(NonFiniteEditError, match="not finite"):  # ... but never reaches the weights
        Edit.load(path, gpt2)
    with pytest.raises(NonFiniteEditError):
        Edit.load(path).apply(gpt2)
    assert _same(gpt2, before) and not gpt2.applied_edits


def test_finite_deltas_that_overflow_in_the_models_dtype_are_refused(gpt2):
    big = torch.full((gpt2.d_model, gpt2.d_mlp), 3e38)  # finite in float32; twice it is not
    e = Edit("test", [EIFFEL], [WeightDelta(0, dense=big), WeightDelta(0, dense=big.clone())], gpt2.fingerprint)
    before = _weights(gpt2)
    with pytest.raises(NonFiniteEditError, match="overflow"):
        e.apply(gpt2)
    assert _same(gpt2, before) and not gpt2.applied_edits and not e.is_applied


def test_a_rome_update_that_overflows_in_the_models_dtype_is_refused(gpt2, tmp_cache):
    tiny_c = KeyStats(0, torch.eye(gpt2.d_mlp, dtype=torch.float64) * 1e-40, 10**6, "extreme", "x")
    before = _weights(gpt2)  # u = C⁻¹k ~ 1e40: finite in float64, infinite in the model's float32
    with pytest.raises(locate.EditFailedError, match="not finite in torch.float32"):
        edit.compute("rome", EIFFEL, model=gpt2, layers=0, runtime=edit.Runtime(stats={0: tiny_c}),
                     v_steps=1, template_lengths=((3, 1),))
    assert _same(gpt2, before)


def test_low_rank_factors_that_do_not_chain_are_a_damaged_file_not_a_runtime_error(gpt2, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from edit.edit import _digest

    g = torch.Generator().manual_seed(0)
    e = Edit("test", [EIFFEL], [WeightDelta(0, left=torch.randn(gpt2.d_model, 1, generator=g),
                                            right=torch.randn(1, gpt2.d_mlp, generator=g))], gpt2.fingerprint)
    path = e.save(tmp_path / "e.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["locate_edit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["0/right"] = tensors["0/right"].T.contiguous()  # a writer that stored right transposed
    meta["sha256"] = _digest(tensors)  # a consistent checksum: only the shapes are wrong
    bad = tmp_path / "transposed.safetensors"
    save_file(tensors, str(bad), metadata={"locate_edit": json.dumps(meta)})
    with pytest.raises(CacheCorruptedError, match="do not chain"):
        Edit.load(bad)
    with pytest.raises(InvalidEditError, match="do not chain"):
        WeightDelta(0, left=torch.zeros(4, 2), right=torch.zeros(3, 8))


# ============================================================== item 4: MEMIT's conflict check
def test_requests_that_render_the_same_prompt_conflict_whatever_the_subject_split(gpt2):
    a = Request("The {} is located in", "Eiffel Tower", " Rome")
    b = Request("{} is located in", "The Eiffel Tower", " Paris")
    with pytest.raises(ConflictingRequestsError, match="'The Eiffel Tower is located in' -> ' Rome' vs ' Paris'"):
        check_conflicts([a, b], gpt2)
    with pytest.raises(ConflictingRequestsError):  # the same words, other whitespace
        check_conflicts([Request("{} is located in", "Eiffel Tower", " Rome"),
                         Request("{}  is located in ", "Eiffel Tower", " Paris")], gpt2)
    same = Request("{} is located in", "The Eiffel Tower", " Rome")
    assert check_conflicts([a, same], gpt2) == [a]  # the same fact twice is written once
    with pytest.raises(ConflictingRequestsError):
        edit.compute("memit", [a, b], model=gpt2, layers=[0])


# ============================================================== item 7: bad corpora
def test_a_binary_corpus_file_is_refused_not_decoded_into_statistics(gpt2, tmp_cache, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(CorpusError, match="not UTF-8 text"):
        key_second_moments(gpt2, 0, corpus=binary, n_tokens=300, progress=False)
    nul = tmp_path / "zeros.txt"
    nul.write_bytes(b"\x00" * 5000)  # valid UTF-8, but not text
    with pytest.raises(CorpusError, match="binary"):
        key_second_moments(gpt2, 0, corpus=nul, n_tokens=300, progress=False)
    late = tmp_path / "late.txt"  # text for the first 64 KiB, then a byte that is not UTF-8
    late.write_bytes((" ".join(TEXTS) + "\n\n").encode() * 40 + b"\xff\xfe tail\n")
    assert check_corpus_file(late) == late  # the quick look passes; the full read still refuses it
    with pytest.raises(CorpusError, match="not UTF-8 text"):
        key_second_moments(gpt2, 0, corpus=late, n_tokens=10**6, progress=False)
    with pytest.raises(CorpusNotFoundError) as err:
        check_corpus_file(tmp_path / "missing.txt")
    assert isinstance(err.value, FileNotFoundError)
    assert not (tmp_cache / "stats").exists()  # nothing was cached


def test_statistics_from_fewer_tokens_than_d_mlp_are_not_cached_and_are_refused_by_rome(gpt2, tmp_cache):
    with pytest.warns(InsufficientStatisticsWarning, match="fewer than d_mlp = 256"):
        st = key_second_moments(gpt2, 0, corpus=TEXTS, n_tokens=100, progress=False)[0]
    assert st.n_tokens == 100 and not stats_path(gpt2, 0, st.corpus_hash, 100).exists()
    before = _weights(gpt2)
    with pytest.raises(InsufficientStatisticsError, match="fewer than the 256 dimensions"):
        edit.compute("rome", EIFFEL, model=gpt2, layers=0, runtime=edit.Runtime(stats={0: st}),
                     v_steps=1, template_lengths=((3, 1),))
    with pytest.raises(InsufficientStatisticsError):
        st.solve(torch.ones(gpt2.d_mlp))
    assert _same(gpt2, before)
    enough = key_second_moments(gpt2, 0, corpus=TEXTS * 2, n_tokens=300, progress=False)[0]
    assert enough.n_tokens == 300 and stats_path(gpt2, 0, enough.corpus_hash, 300).is_file()


# ============================================================== item 8 (caches of this part): one mechanism
def test_context_templates_cache_false_regenerates_instead_of_returning_the_memo(gpt2, tmp_cache, monkeypatch):
    calls = []
    real = context_module.sample
    monkeypatch.setattr(context_module, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = edit.context_templates(gpt2, lengths=((4, 2),))
    n = len(calls)
    assert edit.context_templates(gpt2, lengths=((4, 2),)) == first and len(calls) == n  # memo
    assert edit.context_templates(gpt2, lengths=((4, 2),), cache=False) == first and len(calls) > n  # sampled


def test_a_foreign_or_corrupted_context_template_file_is_rebuilt_with_a_warning(gpt2, tmp_cache):
    first = edit.context_templates(gpt2, lengths=((4, 2),))
    (path,) = (tmp_cache / "context").glob("*.json")
    path.write_text(json.dumps(["{}", "Foreign text. {}", "Other foreign text. {}"]))  # a plausible list
    gpt2.__dict__.pop("_context_templates")  # a new process: no memory cache
    with pytest.warns(CacheRebuiltWarning, match="context templates"):
        assert edit.context_templates(gpt2, lengths=((4, 2),)) == first
    path.write_text(path.read_text().replace("{}", "{} {}", 1))  # flipped content, digest unchanged
    gpt2.__dict__.pop("_context_templates")
    with pytest.warns(CacheRebuiltWarning, match="SHA-256"):
        assert edit.context_templates(gpt2, lengths=((4, 2),)) == first


def test_cache_entries_check_format_key_and_digest(tmp_path):
    path = write_cached(tmp_path / "x.safetensors", "test/1", {"model": "m", "layer": 3}, body={"source": "s"},
                        tensors={"C": torch.eye(3, dtype=torch.float64)})
    body, tensors = verify_cached(path, "test/1", {"model": "m", "layer": 3})
    assert body == {"source": "s"} and torch.equal(tensors["C"], torch.eye(3, dtype=torch.float64))
    with pytest.raises(CacheCorruptedError, match="format"):
        verify_cached(path, "test/2", {"model": "m", "layer": 3})
    with pytest.raises(CacheCorruptedError, match="layer=3, expected 4"):
        verify_cached(path, "test/1", {"model": "m", "layer": 4})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.warns(CacheRebuiltWarning, match="SHA-256"):
        assert read_cached(path, "test/1", {"model": "m", "layer": 3}, what="test") is None
    assert read_cached(tmp_path / "absent.json", "test/1", {}, what="test") is None
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries
    with pytest.raises(InvalidArgumentError, match="must be JSON"):  # not stored as the array's str()
        write_cached(tmp_path / "p.json", "test/1", {"model": "m"}, body={"aie": np.zeros(3)})


# ============================================================== item 9: integral layers that are not ints
def test_numpy_integer_layers_are_layers_and_floats_are_not_out_of_range(gpt2, tmp_cache):
    by_np = key_second_moments(gpt2, np.int64(1), corpus=TEXTS, n_tokens=300, progress=False, cache=False)
    by_int = key_second_moments(gpt2, 1, corpus=TEXTS, n_tokens=300, progress=False, cache=False)
    assert list(by_np) == [1] and torch.equal(by_np[1].C, by_int[1].C)
    assert WeightDelta(np.int64(1), dense=torch.zeros(2, 2)).param == "blocks.1.mlp.out.weight"
    with pytest.raises(InvalidEditError):
        WeightDelta(1.0, dense=torch.zeros(2, 2))  # was silently int(1.0); 1.7 would have become layer 1
    with pytest.raises(LayerSpecError) as err:
        gpt2.check_layer(1.0)
    assert "out of range" not in str(err.value)
    assert edit.subject_keys(gpt2, [EIFFEL], np.int64(0), ["{}"]).shape == (1, gpt2.d_mlp)


# ============================================================== item 10: bad input raises a LocateEditError
@pytest.mark.parametrize("call, error", [
    (lambda lm: key_second_moments(lm, 0, corpus=TEXTS, n_tokens=2.5e3, progress=False), InvalidArgumentError),
    (lambda lm: key_second_moments(lm, 0, corpus="/no/such/corpus.txt", progress=False), CorpusNotFoundError),
    (lambda lm: key_second_moments(lm, 0, corpus=b"bytes", progress=False), CorpusError),
    (lambda lm: key_second_moments(lm, 0, corpus=42, progress=False), CorpusError),
    (lambda lm: key_second_moments(lm, 0, corpus=[1, 2], progress=False), CorpusError),
    (lambda lm: key_second_moments(lm, 0, corpus=["", " "], progress=False), CorpusError),
    (lambda lm: key_second_moments(lm, [], corpus=TEXTS, progress=False), InvalidArgumentError),
    (lambda lm: key_second_moments(lm, 7, corpus=TEXTS, progress=False), LayerOutOfRangeError),
    (lambda lm: key_second_moments(lm, "Auto", corpus=TEXTS, progress=False), LayerSpecError),
    (lambda lm: stats_for(lm, [0], edit.Runtime(stats={0: "C"})), InvalidArgumentError),
    (lambda lm: lm.parameter("blocks.0.no.such.weight"), UnknownParameterError),
    (lambda lm: locate.resolve_model("gpt2"), InvalidArgumentError),
    (lambda lm: lm.precision("int8").__enter__(), InvalidArgumentError),
    (lambda lm: lm.precision("float65").__enter__(), InvalidArgumentError),
    (lambda lm: lm.predict(""), EmptyPromptError),
    (lambda lm: lm.predict("Hello", k=0), InvalidArgumentError),
    (lambda lm: lm.generate("", 3), EmptyPromptError),
    (lambda lm: edit.subject_keys(lm, [EIFFEL], 0, ["no placeholder"]), InvalidArgumentError),
    (lambda lm: edit.context_templates(lm, lengths=((5,),)), InvalidArgumentError),
    (lambda lm: WeightDelta(0), InvalidEditError),
    (lambda lm: WeightDelta(0, dense=torch.tensor(3.0)), InvalidEditError),
    (lambda lm: WeightDelta(0, left=torch.zeros(3), right=torch.zeros(3)), InvalidEditError),
    (lambda lm: Edit("test", [], [3], lm.fingerprint), InvalidEditError),
    (lambda lm: edit.compute("rome", "not a request", model=lm), LocateEditError),
    (lambda lm: edit.compute("rome", EIFFEL, model=lm, layers="Auto"), LayerSpecError),
    (lambda lm: edit.compute("memit", [EIFFEL], model=lm, layers=[0, 9]), LayerOutOfRangeError),
])
def test_bad_input_raises_a_locate_edit_error_and_leaves_the_model_alone(gpt2, tmp_cache, call, error):
    before = _weights(gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsufficientStatisticsWarning)
        with pytest.raises(error) as err:
            call(gpt2)
    assert isinstance(err.value, LocateEditError)
    assert _same(gpt2, before) and not gpt2.applied_edits


def test_the_new_errors_still_are_the_builtins_callers_catch():
    assert issubclass(CorpusNotFoundError, FileNotFoundError) and issubclass(UnknownParameterError, KeyError)
    assert issubclass(InvalidArgumentError, TypeError) and issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InsufficientStatisticsError, locate.SingularStatisticsError)


# ============================================================== item 11: edits that do not take, targets
class LogitPush(HookModule):
    """A test intervention: adds ``amount`` to one token's logit."""

    type_name = "test-logit-push"

    def __init__(self, token: int, amount: float):
        super().__init__()
        self.token, self.amount = token, amount

    def hook_fns(self):
        def push(logits):
            out = logits.clone()
            out[..., self.token] += self.amount
            return out
        return {"unembed.hook_out": push}

    def config(self):
        return {"token": self.token, "amount": self.amount}

    @classmethod
    def from_saved(cls, config, tensors):
        return cls(config["token"], config["amount"])


@pytest.fixture
def push_method():
    """A registered test method: pushes target_new's first token by ``amount`` (0: an edit that changes nothing)."""

    from dataclasses import dataclass

    @dataclass
    class PushHparams:
        amount: float = 100.0

    def compute_push(lm, requests, hp, rt):
        pushes = [LogitPush(lm.target_ids(r.target_new, r.rendered)[0], hp.amount) for r in requests]
        return Edit("test-push", list(requests), pushes, lm.fingerprint, lm.name)

    registry.register("test-push", PushHparams, batched=True, layers=None, description="test only")(compute_push)
    yield "test-push"
    registry._REGISTRY.pop("test-push")


def test_efficacy_is_measured_and_an_edit_that_does_not_take_warns(gpt2, push_method):
    before = _weights(gpt2)
    top = gpt2.predict(EIFFEL.rendered, 1)[0].token  # what the random model says now
    with warnings.catch_warnings():
        warnings.simplefilter("error", EditIneffectiveWarning)
        took = edit.compute(push_method, [EIFFEL], model=gpt2)
    assert took.metrics["efficacy"] == 1.0 and took.metrics["already_predicted"] == [False]
    outcome = took.metrics["request_outcomes"][0]
    assert outcome["took"] and outcome["top1_before"] == top and outcome["top1_after"] == " Rome"
    assert outcome["p_new_after"] > 0.99 and outcome["p_new_before"] < 1e-3 and outcome["p_true_before"] is None
    assert not took.is_applied and _same(gpt2, before)  # measured by applying and reverting
    with edit.applied(gpt2, took):  # the same fact again, on the model that already says it
        again = edit.compute(push_method, [EIFFEL], model=gpt2)
    assert again.metrics["already_predicted"] == [True] and again.parents == [took.id]
    with pytest.warns(EditIneffectiveWarning, match=r"does not take for 1 of 1 request\(s\).*' Rome'"):
        inert = edit.compute(push_method, [EIFFEL], model=gpt2, amount=0.0)
    assert inert.metrics["efficacy"] == 0.0 and inert.metrics["request_outcomes"][0]["top1_after"] == top
    assert _same(gpt2, before)
    quiet = edit.compute(push_method, [EIFFEL], model=gpt2, amount=0.0, runtime=edit.Runtime(check_efficacy=False))
    assert "efficacy" not in quiet.metrics


def test_rome_and_memit_record_whether_their_edit_takes(gpt2, tmp_cache):
    g = torch.Generator().manual_seed(0)
    texts = [gpt2.tokenizer.decode(torch.randint(1000, 30000, (40,), generator=g).tolist()) for _ in range(40)]
    stats = key_second_moments(gpt2, [0], corpus=texts, n_tokens=gpt2.d_mlp * 4, progress=False, cache=False)
    rt = edit.Runtime(stats=stats)
    for method, hp in (("rome", {"layers": 0}), ("memit", {"layers": [0]})):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e = edit.compute(method, [EIFFEL], model=gpt2, runtime=rt, v_steps=2, template_lengths=((3, 1),), **hp)
        outcome = e.metrics["request_outcomes"][0]
        with edit.applied(gpt2, e):
            top = gpt2.predict(EIFFEL.rendered, 1)[0].token
        assert outcome["top1_after"] == top and e.metrics["efficacy"] == float(top == " Rome")
        warned = [w for w in caught if issubclass(w.category, EditIneffectiveWarning)]
        assert len(warned) == (top != " Rome")


def test_a_target_without_its_leading_space_warns(gpt2, push_method):
    with pytest.warns(TargetSpacingWarning, match="ofRome"):
        edit.compute(push_method, [Request(EIFFEL.prompt, EIFFEL.subject, "Rome")], model=gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetSpacingWarning)
        edit.compute(push_method, [EIFFEL], model=gpt2)  # " Rome": as CounterFact writes it
        warnings.simplefilter("ignore", EditIneffectiveWarning)  # the push moves only the first of its tokens
        edit.compute(push_method, [Request("{}位于", "埃菲尔铁塔", "巴黎")], model=gpt2)  # no spaces in Chinese
        edit.compute(push_method, [Request("{} is located in the city of ", "The Eiffel Tower", "Rome")], model=gpt2)


def test_a_one_layer_method_refuses_a_list_of_several_layers(tokenizer):
    lm = tiny_model("llama", tokenizer)
    assert locate.resolve_layer(lm, [1]) == (1, "layers [1]: chosen by the caller")
    with pytest.raises(LayerSpecError, match="edits one layer"):
        locate.resolve_layer(lm, [0, 1])
    with pytest.raises(LayerSpecError, match="edits one layer"):
        edit.compute("rome", [edit.Request("{} is in", "Paris", " France")], model=lm, layers=[0, 1])
