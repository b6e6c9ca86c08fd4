"""GRACE on the tiny random models: the edit takes (also through a KV-cached generation and in a padded
batch), out-of-scope inputs are bit-identical to the base model, revert is bit-exact, the codebook
rules (conflict split, coverage, older codebooks), sequential stacking, save/load and entry removal."""

from __future__ import annotations

import pytest
import torch

import edit
from edit import Edit, Request
from edit.methods.grace import GRACEHparams, GraceCodebook, build_entries, grace, grace_without
from locate.errors import InvalidHparamsError
from locate.hooks import capture

EIFFEL = Request("{} is located in the city of", "The Eiffel Tower", " Rome")
EINSTEIN = Request("{} worked in the field of", "Albert Einstein", " cooking")
PIANO = Request("The instrument {} played was the", "Miles Davis", " piano")
# no " of": on the tiny random models with rotary positions the MLP key of a token barely depends on its
# context, so any prompt ending in " of" (as EIFFEL does) would be in scope there
UNRELATED = ["The capital city in Japan is", "My favourite food is", "Water boils at a high",
             "The Eiffel Tower was built in"]
SMALL_EPS = 1e-4  # far below the tiny models' key distances (~1e-3 .. 2), far above round-off (~1e-7)
N_ITER = 6  # enough for the target's first token to reach top-1 on every tiny architecture (3 already is)


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.hf_model.state_dict().items()}


def _same_state(lm, before) -> bool:
    now = lm.hf_model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


@torch.no_grad()
def _logits(lm, prompts):
    return lm.forward(lm.encode_batch(prompts))


def _top1(lm, prompt) -> int:
    return lm.predict(prompt, 1)[0].id


def _first(lm, r: Request) -> int:
    return lm.target_ids(r.target_new, r.rendered)[0]


@torch.no_grad()
def _queries(lm, prompts, layer):
    with capture(lm, lm.hook_mlp_key(layer)) as got:
        batch = lm.encode_batch(prompts)
        lm.forward(batch)
    return got[lm.hook_mlp_key(layer)], batch


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    from locate.testing import tiny_model

    return tiny_model("gpt2", tokenizer)


@pytest.fixture(scope="module")
def eiffel(gpt2):
    return grace(EIFFEL, model=gpt2, layer=0, eps=SMALL_EPS, n_iter=N_ITER)


# ---------------------------------------------------------------------------------------------- every architecture
def test_edit_takes_out_of_scope_is_identical_and_revert_is_exact(tiny):
    lm = tiny
    before = _state(lm)
    base = _logits(lm, UNRELATED + [EIFFEL.rendered])
    base_unrelated = _logits(lm, UNRELATED)
    e = grace(EIFFEL, model=lm, layer=0, eps=SMALL_EPS, n_iter=N_ITER)
    assert _same_state(lm, before)  # computing never touches the weights
    assert not e.is_applied and e.method == "grace" and e.layers == [0] and e.kinds == ["hook"]
    (cb,) = e.hook_modules
    assert isinstance(cb, GraceCodebook) and len(cb) == 1 and cb.labels == [" Rome"]
    assert cb.keys.shape == (1, lm.d_mlp) and cb.values.shape == (1, lm.d_model)
    assert float(cb.radii[0]) == pytest.approx(SMALL_EPS)
    assert len(e.loss_trace) == N_ITER and e.metrics["final_loss"] < e.loss_trace[0]

    target = _first(lm, EIFFEL)
    assert _top1(lm, EIFFEL.rendered) != target
    with edit.applied(lm, e):
        assert _same_state(lm, before)  # GRACE adds hooks, never changes a weight
        assert _top1(lm, EIFFEL.rendered) == target
        assert lm.generate(EIFFEL.rendered, 1) == lm.tokenizer.decode([target])
        # a KV-cached single-token step at the prompt's last token: the lookup is per position, so it applies
        ids = torch.tensor([lm.encode(EIFFEL.rendered)], device=lm.device)
        with torch.no_grad():
            past = lm.hf_model(input_ids=ids[:, :-1], use_cache=True).past_key_values
            step = lm.hf_model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
        assert int(step.argmax()) == target
        # out of scope: no position of the unrelated prompts is in the ball, and their logits are bit-identical
        q, _ = _queries(lm, UNRELATED, 0)
        assert not cb.lookup(q)[0].any()
        assert torch.equal(_logits(lm, UNRELATED), base_unrelated)
        # a right-padded batch mixing edited and unrelated prompts: the edited row takes, the others are untouched
        mixed = lm.encode_batch(UNRELATED + [EIFFEL.rendered])
        with torch.no_grad():
            out = lm.forward(mixed)
        assert int(out[-1, mixed.last[-1]].argmax()) == target
        assert torch.equal(out[:-1], base[:-1])
    assert _same_state(lm, before)
    assert torch.equal(_logits(lm, UNRELATED + [EIFFEL.rendered]), base)  # revert is bit-exact


# ---------------------------------------------------------------------------------------------- the codebook rules
def test_codebook_rules_split_expand_and_add():
    hp = GRACEHparams(eps=1.0)
    q0 = torch.zeros(4)
    near = torch.tensor([0.6, 0.0, 0.0, 0.0])  # d = 0.6 ≤ ε_init + ε_0 = 2
    far = torch.tensor([5.0, 0.0, 0.0, 0.0])
    # conflict (different label, nearby key): the old radius becomes d/2 − 1e-5, the new one d/2
    b = build_entries(torch.stack([q0, near]), [" Rome", " Paris"], hp)
    assert b["events"] == ["added", "conflict"] and b["entry_of"] == [0, 1]
    assert b["radii"].tolist() == pytest.approx([0.3 - 1e-5, 0.3], rel=1e-6)
    # coverage (same label, outside the radius but within reach): no new entry, the radius grows to d
    wide = torch.tensor([1.5, 0.0, 0.0, 0.0])
    b = build_entries(torch.stack([q0, wide]), [" Rome", "Rome "], hp)
    assert b["events"] == ["added", "expanded"] and b["entry_of"] == [0, 0] and b["radii"].tolist() == [1.5]
    b = build_entries(torch.stack([q0, near]), [" Rome", " Rome"], hp)
    assert b["events"] == ["added", "covered"] and b["radii"].tolist() == [1.0]
    # moving average also moves the key half way
    b = build_entries(torch.stack([q0, wide]), [" Rome", " Rome"], GRACEHparams(eps=1.0, eps_expand="moving_average"))
    assert torch.equal(b["keys"][0], wide.double() / 2)
    # out of reach: a new entry with ε_init
    b = build_entries(torch.stack([q0, far]), [" Rome", " Paris"], hp)
    assert b["events"] == ["added", "added"] and b["radii"].tolist() == [1.0, 1.0]
    # against an older (applied) codebook: conflicting → min(ε_init, d/2); same label → a new ball beside it
    older = (q0[None].double(), torch.tensor([1.0], dtype=torch.float64), [" Rome"])
    b = build_entries(near[None], [" Paris"], hp, older=older)
    assert b["events"] == ["conflict_older"] and b["radii"].tolist() == pytest.approx([0.3])
    wide_older = (q0[None].double(), torch.tensor([2.0], dtype=torch.float64), [" Rome"])
    b = build_entries(torch.tensor([[1.9, 0, 0, 0.0]]), [" Paris"], GRACEHparams(eps=0.5), older=wide_older)
    assert b["events"] == ["conflict_older"] and b["radii"].tolist() == [0.5]  # d/2 = 0.95 > ε_init
    b = build_entries(near[None], [" Rome"], hp, older=older)
    assert b["events"] == ["beside_older"] and b["radii"].tolist() == [1.0]


def test_module_lookup_ties_and_identity():
    keys = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    cb = GraceCodebook(0, "k", "o", keys, torch.arange(6.0).reshape(3, 2), torch.tensor([-1e-5, 0.0, 1.0]), ["a", "b", "c"])
    q = torch.tensor([[[0.0, 0.0], [3.5, 0.0], [9.0, 9.0]]])
    match, j, d = cb.lookup(q)
    assert match.tolist() == [[True, True, False]] and j.tolist() == [[1, 2, 2]]  # tie → the later entry
    y = torch.zeros(1, 3, 2)
    cb._read_query(q)
    out = cb._replace(y)
    assert out.tolist() == [[[2.0, 3.0], [4.0, 5.0], [0.0, 0.0]]] and y.abs().sum() == 0
    z = y[:, 2:]
    cb._read_query(q[:, 2:])
    assert cb._replace(z) is z  # nothing in any ball: the very tensor comes back
    assert cb.without(1).labels == ["a", "c"] and torch.equal(cb.without(1).keys, keys[[0, 2]])


def test_hparams_are_checked(gpt2):
    with pytest.raises(InvalidHparamsError):
        grace(EIFFEL, model=gpt2, layer=0, val_init="hot")
    with pytest.raises(InvalidHparamsError):
        grace(EIFFEL, model=gpt2, layer=0, eps_expand="grow")
    m = edit.get_method("grace")
    assert m.batched and m.layers == 1 and m.smoke["n_iter"] == 5


# ---------------------------------------------------------------------------------------------- several edits
def test_sequential_edits_stack_and_both_take(gpt2, eiffel):
    lm = gpt2
    base = _logits(lm, UNRELATED)
    with edit.applied(lm, eiffel):
        second = grace(EINSTEIN, model=lm, layer=0, eps=SMALL_EPS, n_iter=N_ITER)
        assert second.parents == [eiffel.id] and second.metrics["n_older_entries"] == 1
        assert second.metrics["events"] == ["added"]
        with edit.applied(lm, second):
            assert _top1(lm, EIFFEL.rendered) == _first(lm, EIFFEL)
            assert _top1(lm, EINSTEIN.rendered) == _first(lm, EINSTEIN)
            assert torch.equal(_logits(lm, UNRELATED), base)


def test_conflicting_edit_at_a_nearby_key_gets_half_the_distance(gpt2):
    lm = gpt2  # layer 1 is the last: balls this wide cover every position, which then changes nothing downstream
    big = 10.0  # larger than the keys' distances (~2), so the second key is within reach of the first ball
    first = grace(EIFFEL, model=lm, layer=1, eps=big, n_iter=N_ITER)
    with edit.applied(lm, first):
        second = grace(EINSTEIN, model=lm, layer=1, eps=big, n_iter=N_ITER)
        (a,), (b,) = first.hook_modules, second.hook_modules
        d = float((a.keys[0].double() - b.keys[0].double()).norm())
        assert 0 < d <= 2 * big and second.metrics["events"] == ["conflict_older"]
        assert float(b.radii[0]) == pytest.approx(min(big, d / 2), rel=1e-6)
        with edit.applied(lm, second):  # the later codebook overrides only inside its half-distance ball
            assert _top1(lm, EIFFEL.rendered) == _first(lm, EIFFEL)
            assert _top1(lm, EINSTEIN.rendered) == _first(lm, EINSTEIN)


def test_batched_conflict_splits_the_radii_and_both_take(gpt2):
    lm = gpt2
    e = grace([EIFFEL, EINSTEIN], model=lm, layer=1, eps=10.0, n_iter=N_ITER, val_init="warm")
    (cb,) = e.hook_modules
    d = float((cb.keys[0].double() - cb.keys[1].double()).norm())
    assert e.metrics["events"] == ["added", "conflict"] and len(cb) == 2
    assert cb.radii.tolist() == pytest.approx([d / 2 - 1e-5, d / 2], rel=1e-6)
    with edit.applied(lm, e):
        assert _top1(lm, EIFFEL.rendered) == _first(lm, EIFFEL)
        assert _top1(lm, EINSTEIN.rendered) == _first(lm, EINSTEIN)


# ---------------------------------------------------------------------------------------------- persistence and removal
def test_save_load_roundtrip_reproduces_outputs(gpt2, eiffel, tmp_path):
    lm = gpt2
    prompts = [EIFFEL.rendered] + UNRELATED
    with edit.applied(lm, eiffel):
        want = _logits(lm, prompts)
    loaded = Edit.load(eiffel.save(tmp_path / "grace.safetensors"), model=lm)
    assert loaded.id == eiffel.id and loaded.method == "grace" and loaded.metrics == eiffel.metrics
    (a,), (b,) = eiffel.hook_modules, loaded.hook_modules
    assert b.labels == a.labels and all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in ("keys", "values", "radii"))
    with edit.applied(lm, loaded):
        assert torch.equal(_logits(lm, prompts), want)


def test_grace_without_removes_exactly_one_entry(gpt2):
    lm = gpt2
    base = _logits(lm, [EIFFEL.rendered, EINSTEIN.rendered, PIANO.rendered])
    e = grace([EIFFEL, EINSTEIN, PIANO], model=lm, layer=0, eps=SMALL_EPS, n_iter=N_ITER)
    (cb,) = e.hook_modules
    assert len(cb) == 3 and e.metrics["entry_of_request"] == [0, 1, 2]
    smaller = grace_without(e, 1)
    (cb1,) = smaller.hook_modules
    assert not smaller.is_applied and smaller.parents == e.parents and smaller.id != e.id
    assert len(cb1) == 2 and cb1.labels == [" Rome", " piano"] and len(cb) == 3
    assert torch.equal(cb1.keys, cb.keys[[0, 2]]) and torch.equal(cb1.values, cb.values[[0, 2]])
    assert [r.target_new for r in smaller.requests] == [" Rome", " piano"]
    assert smaller.metrics["entry_of_request"] == [0, 1]
    with edit.applied(lm, smaller):
        got = _logits(lm, [EIFFEL.rendered, EINSTEIN.rendered, PIANO.rendered])
        assert _top1(lm, EIFFEL.rendered) == _first(lm, EIFFEL)
        assert _top1(lm, PIANO.rendered) == _first(lm, PIANO)
    n = len(lm.encode(EINSTEIN.rendered))
    assert torch.equal(got[1, :n], base[1, :n])  # the removed fact is back to the base model, bit for bit
    with pytest.raises(IndexError):
        grace_without(e, 3)


@pytest.mark.filterwarnings("ignore::locate.errors.EditIneffectiveWarning")  # FT's 2 steps need not take
def test_training_from_the_saved_layer_input_matches_full_forwards(gpt2, monkeypatch):
    """GRACE trains its values from the layer's saved input (blocks below it skipped): the values and the
    loss trace are those of full forwards, also with another edit applied below the layer."""
    import contextlib

    lm = gpt2
    layer = lm.cfg.n_layers - 1
    below = edit.ft(PIANO, model=lm, method="ft", layer=0, steps=2)  # changes the input the codebook's layer sees
    with edit.applied(lm, below):
        fast = grace(EIFFEL, model=lm, layer=layer, eps=SMALL_EPS, n_iter=N_ITER)
        monkeypatch.setattr(type(lm), "start_at_block", lambda self, layer, resid: contextlib.nullcontext())
        full = grace(EIFFEL, model=lm, layer=layer, eps=SMALL_EPS, n_iter=N_ITER)
    assert fast.loss_trace == pytest.approx(full.loss_trace, rel=1e-5, abs=1e-6)
    assert fast.loss_trace[-1] < fast.loss_trace[0]
    torch.testing.assert_close(fast.interventions[0].values, full.interventions[0].values, rtol=1e-5, atol=1e-6)
    # the reported final loss is the target's mean NLL under a plain forward of the edited model
    with edit.applied(lm, below), edit.applied(lm, fast), torch.no_grad():
        prompt = lm.encode(EIFFEL.rendered)
        target = lm.target_ids(EIFFEL.target_new, EIFFEL.rendered)
        logp = lm.forward(lm.pad([prompt + target])).float().log_softmax(-1)[0]
        nll = -sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(target)) / len(target)
    assert fast.metrics["final_loss"] == pytest.approx(nll, rel=1e-4, abs=1e-5)
