"""Property-based checks of the public entry points (issue 18: no silent wrong results).

For generated inputs (prompts and subjects with any Unicode, targets, layers, token indices, noise
levels, hyperparameters, corpora and damaged edit files) every call must either

* return a finite result, or
* raise a subclass of :class:`locate.errors.LocateEditError` (never a bare builtin),

and in both cases leave the model's weights bit-identical, unless an edit was applied on purpose (then
its revert must restore them bit-identically).

Entry points: :func:`locate.trace`; every registered editing method through :func:`edit.compute`
(its registry ``smoke`` hyperparameters, on a tiny model), applied and reverted; :meth:`edit.Edit.save`
and :meth:`edit.Edit.load` with damaged files; :func:`edit.key_second_moments`.

Profiles: ``ci`` (the default: 15 examples per share, derandomized, so CI is reproducible; about a
minute and a half with the model load) and ``long`` (``HYPOTHESIS_PROFILE=long``: 250 per share, random;
about 8 minutes on two busy cores, about 5,000 inputs)::

    HYPOTHESIS_PROFILE=long pytest -q tests/test_properties.py --hypothesis-show-statistics
"""

from __future__ import annotations

import math
import os
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import edit
import locate
from edit import Edit, Request, WeightDelta
from locate.errors import LocateEditError
from locate.testing import tiny_model

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK, print_blob=True)
settings.register_profile("long", max_examples=250, deadline=None, database=None, suppress_health_check=_SLOW_OK,
                          print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def budget(weight: float) -> settings:
    """This test's share of the profile's examples (``weight`` x the profile's max_examples)."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=max(1, round(profile.max_examples * weight)))


# ---------------------------------------------------------------------- strategies
@st.composite
def arguments(draw, fields: dict):
    """Keyword arguments from ``fields`` = {name: (valid strategy, invalid strategy)}: all valid, except
    (in half the examples) one field drawn from its invalid strategy, so that most examples reach the
    code behind the argument checks and each check is still exercised."""
    bad = draw(st.one_of(st.none(), st.sampled_from(sorted(fields))))
    return {k: draw(invalid if k == bad else valid, label=k) for k, (valid, invalid) in fields.items()}


WORDS = ["The", "Eiffel", "Tower", "is", "located", "in", "Paris", "東京タワー", "İstanbul", "Café", "Cafe\u0301",
         "😀", "straße", "ǅemal", "\u200b", "\t", "of", "the", "city"]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)  # any code point but surrogates
PHRASE = st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join)


@st.composite
def prompt_and_subject(draw):
    """Mostly a phrase and a run of its words (perhaps in another case or normal form); else any text
    and any substring of it, or an unrelated subject."""
    how = draw(st.sampled_from(["words"] * 6 + ["substring", "unrelated"]))
    if how == "words":
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8))
        i = draw(st.integers(0, len(words) - 1))
        j = draw(st.integers(i + 1, len(words)))
        subject = " ".join(words[i:j])
        subject = draw(st.sampled_from([subject, subject, subject.upper(), subject.casefold(),
                                        unicodedata.normalize("NFD", subject)]))
        return " ".join(words), subject
    prompt = draw(TEXT)
    if how == "substring" and prompt:
        i = draw(st.integers(0, len(prompt) - 1))
        return prompt, prompt[i:draw(st.integers(i, len(prompt)))]
    return prompt, draw(st.one_of(st.sampled_from(WORDS), TEXT))


TRACE_ARGS = {
    "kinds": (st.lists(st.sampled_from(["hidden", "mlp", "attn"]), min_size=1, max_size=3, unique=True).map(tuple),
              st.sampled_from([(), ("bogus",), "mlp", ("mlp", "mlp"), None])),
    "samples": (st.integers(1, 3), st.sampled_from([-1, 0, 1.5, None, True, np.int64(2)])),
    "window": (st.one_of(st.none(), st.integers(1, 2)), st.sampled_from([-1, 0, 3, 10, 2.0, True])),
    "noise": (st.one_of(st.floats(0, 2), st.sampled_from(["embedding_matrix", "auto", 1e30, 0.0]),
                        st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)),
              st.one_of(st.floats(width=32), st.sampled_from([None, "s3", "bogus.json", -1, True, [1, 2]]),
                        st.lists(TEXT, max_size=3))),  # any float32: NaN, inf, the largest finite ones
    "uniform_noise": (st.booleans(), st.sampled_from([None, "yes"])),
    "target": (st.one_of(st.none(), st.integers(0, 49151), st.sampled_from([" Paris", " 東京", " the"])),
               st.one_of(st.integers(-3, 10**6), st.sampled_from(["Paris", "", " a b c", True, 1.5]), TEXT)),
    "tokens": (st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 6), st.sampled_from(["last_subject", "last"])),
                                             min_size=1, max_size=3)),
               st.lists(st.one_of(st.integers(-5, 40), st.sampled_from(["first_subsequent", "bogus", 1.0, True])),
                        max_size=4)),
    "method": (st.sampled_from(["fast", "fast", "loop"]), st.sampled_from(["Fast", None])),
    "seed": (st.integers(0, 2**31 - 1), st.sampled_from([-1, 2**64, 1.5, None])),
    "batch_size": (st.integers(1, 300), st.sampled_from([0, -1, 2.5])),
}


# ---------------------------------------------------------------------- fixtures and checks
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private cache directory for the module (noise levels, layer profiles, statistics)."""
    old = os.environ.get("LOCATE_EDIT_CACHE")
    os.environ["LOCATE_EDIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield tmp_path_factory.mktemp("files")
    if old is None:
        del os.environ["LOCATE_EDIT_CACHE"]
    else:
        os.environ["LOCATE_EDIT_CACHE"] = old


@pytest.fixture(scope="module")
def data_dir():
    """The shared data directory (IKE's demonstration pool) when present; without it IKE must refuse
    with a toolkit error, which the property allows."""
    d = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return d if d.is_dir() else None


@pytest.fixture(scope="module")
def lm(env):
    return tiny_model("llama", locate.default_model().tokenizer, n_layers=2)


def snapshot(lm) -> list[torch.Tensor]:
    return [t.detach().clone() for t in lm.hf_model.state_dict().values()]


def unchanged(lm, state) -> bool:
    now = list(lm.hf_model.state_dict().values())
    return len(now) == len(state) and all(torch.equal(a, b) for a, b in zip(now, state))


def finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return bool(np.isfinite(np.asarray(x, dtype=np.float64)).all())


def quietly(fn, *args, **kwargs):
    """Call ``fn``; the toolkit's warnings (fallbacks, rebuilt caches, weak statistics) are allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def attempt(lm, fn, *args, **kwargs):
    """``(result, state)``: ``fn``'s result, or None when it raised a :class:`LocateEditError` (recorded
    as a hypothesis event), and the weights' snapshot from before the call, which the weights must
    still equal either way. Any other exception fails the test."""
    state = snapshot(lm)
    try:
        out = quietly(fn, *args, **kwargs)
    except LocateEditError as err:
        event(f"refused: {type(err).__name__}")
        out = None
    assert unchanged(lm, state)
    return out, state


# ---------------------------------------------------------------------- locate.trace
@budget(3)
@given(ps=prompt_and_subject(), kw=arguments(TRACE_ARGS))
def test_trace_returns_finite_scores_or_a_toolkit_error(lm, ps, kw):
    prompt, subject = ps
    tokens = kw["tokens"]
    tr, _ = attempt(lm, locate.trace, prompt, subject, model=lm, **kw)
    if tr is None:
        return
    event("traced")
    T = len(lm.encode(prompt))
    assert len(tr.tokens) == T and 0 <= tr.subject_range[0] < tr.subject_range[1] <= T
    assert finite([tr.p_clean, tr.p_corrupted, tr.noise_level]) and 0 <= tr.p_clean <= 1
    rows = range(T) if tokens is None else sorted({tr.token_index(t) for t in tokens})
    for k in tr.kinds:
        assert tr.scores[k].shape == (T, lm.n_layers)
        assert finite(tr.scores[k][list(rows)])
        assert ((tr.scores[k][list(rows)] >= 0) & (tr.scores[k][list(rows)] <= 1)).all()


# ---------------------------------------------------------------------- editing methods
EDIT_ARGS = {
    "prompt": (st.sampled_from(["{} is located in the city of", "{}'s capital is", "In {}, people speak", "{}"]),
               st.one_of(TEXT.map(lambda t: t + " {}"), TEXT, st.just("{} and {}"))),
    "subject": (st.sampled_from(["The Eiffel Tower", "東京タワー", "Café", "İstanbul", "x", "Café"]),
                st.one_of(TEXT, st.just(" "))),
    "target_new": (st.sampled_from([" Rome", " 北京", " Paris", " a b c d e f g", " 😀", "Rome"]),
                   st.one_of(TEXT, st.sampled_from(["", " "]))),
    "target_true": (st.one_of(st.none(), st.sampled_from([" Paris", " Rome"])), TEXT),
    "layers": (st.one_of(st.integers(0, 1), st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
                         st.just(np.int64(1))),
               st.one_of(st.integers(-1, 3), st.lists(st.integers(-1, 2), max_size=3),
                         st.sampled_from([1.0, "Auto", "auto", None, True]))),
}


# the toolkit's own methods (edit/methods/*.py), not stubs other test modules register for their own use
SHIPPED_METHODS = sorted(n for n in edit.methods() if edit.get_method(n).compute_fn.__module__.startswith("edit.methods."))


@pytest.mark.parametrize("name", SHIPPED_METHODS)
@budget(1)
@given(kw=arguments(EDIT_ARGS), seed=st.integers(0, 3))
def test_editing_methods_return_finite_edits_or_a_toolkit_error(lm, env, data_dir, name, kw, seed):
    """compute leaves the weights as they were; a computed edit is finite, keeps the outputs finite
    once applied and reverts bit-exactly."""
    m = edit.get_method(name)
    hp = dict(m.smoke)
    if m.layers is not None:
        hp["layers"] = kw["layers"]
    rt = edit.Runtime(data_dir=data_dir, seed=seed)
    e, state = attempt(lm, lambda: edit.compute(m, [Request(kw["prompt"], kw["subject"], kw["target_new"],
                                                            kw["target_true"])], model=lm, hparams=hp, runtime=rt))
    assert not lm.applied_edits
    if e is None:
        return
    event("computed")
    assert isinstance(e, Edit) and not e.is_applied
    assert all(finite(t) for t in e._tensors().values())
    e.apply(lm)
    try:
        assert finite(lm.last_logits([e.requests[0].rendered]))
    finally:
        e.revert(lm)
    assert unchanged(lm, state)


# ---------------------------------------------------------------------- Edit.save / Edit.load
@pytest.fixture(scope="module")
def saved_edit(lm, env):
    g = torch.Generator().manual_seed(0)
    e = Edit("test", [Request("{} is located in", "The Eiffel Tower", " Rome")],
             [WeightDelta(0, dense=1e-3 * torch.randn(lm.d_model, lm.d_mlp, generator=g)),
              WeightDelta(1, left=torch.randn(lm.d_model, 1, generator=g), right=1e-3 * torch.randn(1, lm.d_mlp, generator=g))],
             lm.fingerprint, lm.name)
    path = e.save(env / "edit.safetensors")
    return e, path.read_bytes()


MUTATION = st.one_of(
    st.tuples(st.just("none"), st.just(0), st.just(0)),  # the file as saved: it must load
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("nan"), st.integers(0, 10**6), st.sampled_from([float("nan"), float("inf"), 3.4e38])),
)


def mutate(data: bytes, how) -> bytes:
    kind, pos, arg = how
    b = bytearray(data)
    if kind == "nan":  # a non-finite float32 in the tensor data (after the header)
        header = 8 + int.from_bytes(b[:8], "little")
        body = max(0, (len(b) - header) // 4 - 1)
        at = header + 4 * (pos % (body + 1))
        b[at:at + 4] = np.float32(arg).tobytes()
        return bytes(b)
    pos %= len(b) + 1
    if kind == "none":
        pass
    elif kind == "flip":
        if pos < len(b):
            b[pos] ^= 1 << arg
    elif kind == "truncate":
        del b[pos:]
    elif kind == "insert":
        b[pos:pos] = arg
    else:
        b[pos:pos + len(arg)] = arg
    return bytes(b)


@budget(6)
@given(how=st.lists(MUTATION, min_size=1, max_size=3))
def test_damaged_edit_files_are_refused_or_load_the_same_edit(lm, env, saved_edit, how):
    original, data = saved_edit
    for h in how:
        data = mutate(data, h)
    path = env / "damaged.safetensors"
    path.write_bytes(data)
    e, state = attempt(lm, Edit.load, path, lm)
    if e is None:
        return
    event("loaded")
    # what loads is the edit that was saved: same content, finite, and it reverts bit-exactly
    assert e.id == original.id
    got, want = e._tensors(), original._tensors()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    e.apply(lm)
    try:
        assert finite(lm.last_logits(["The Eiffel Tower is located in"]))
    finally:
        e.revert(lm)
    assert unchanged(lm, state)


# ---------------------------------------------------------------------- key second moments
@st.composite
def corpora(draw, files):
    kind = draw(st.sampled_from(["texts"] * 5 + ["text-file"] * 2 + ["empty", "binary", "missing", "bytes", "mixed"]))
    if kind == "texts":
        return draw(st.lists(st.one_of(PHRASE, TEXT), min_size=1, max_size=6))
    if kind == "empty":
        return draw(st.sampled_from([[], [""], "", [" "]]))
    if kind == "binary":
        p = files / "binary.bin"
        p.write_bytes(draw(st.binary(min_size=1, max_size=256)))
        return p
    if kind == "text-file":
        p = files / "corpus.txt"
        p.write_text(" ".join(draw(st.lists(PHRASE, min_size=1, max_size=20))), encoding="utf-8")
        return p
    if kind == "missing":
        return files / "no-such-corpus.txt"
    if kind == "bytes":
        return draw(st.binary(max_size=16))
    return draw(st.lists(st.one_of(TEXT, st.integers(), st.none()), min_size=1, max_size=3))


STATS_ARGS = {
    "layers": (st.one_of(st.integers(0, 1), st.lists(st.integers(0, 1), min_size=1, max_size=2), st.just(np.int64(1))),
               st.one_of(st.integers(-2, 3), st.lists(st.integers(-1, 2), max_size=3),
                         st.sampled_from([1.0, "0", None, True]))),
    "n_tokens": (st.one_of(st.integers(1, 600), st.just(np.int64(64))),
                 st.one_of(st.integers(-2, 0), st.sampled_from([2.5e3, 0.5, None, True]))),
    "seq_len": (st.integers(1, 64), st.sampled_from([-1, 0, None, 2.0])),
    "batch_tokens": (st.integers(1, 256), st.sampled_from([-1, 0, None])),
    "cache": (st.booleans(), st.sampled_from([None, "yes"])),
}


@budget(3)
@given(kw=arguments(STATS_ARGS), data=st.data())
def test_key_second_moments_are_finite_or_a_toolkit_error(lm, env, kw, data):
    corpus = data.draw(corpora(env), label="corpus")
    kw = dict(kw)
    layers = kw.pop("layers")
    stats, state = attempt(lm, edit.key_second_moments, lm, layers, corpus=corpus, progress=False, **kw)
    if stats is None:
        return
    event("computed")
    assert stats and all(0 <= l < lm.n_layers for l in stats)
    for s in stats.values():
        assert s.C.shape == (lm.d_mlp, lm.d_mlp) and finite(s.C) and s.n_tokens >= 1
        assert torch.allclose(s.C, s.C.T) and float(torch.diagonal(s.C).min()) >= 0 and not math.isnan(s.n_tokens)
