"""Models spread over devices: ``locate.load_model(..., device_map=..., max_memory=...)``.

On a CPU-only machine the blocks cannot sit on two real devices, so the CPU tests check (a) that the
``device_map`` loading paths load and give the single-device model's numbers, and that a model dispatched
with accelerate's hooks on every block (the multi-device code path, here with every block on the CPU)
gives bit-identical trace scores and ROME/MEMIT edits; (b) the CUDA test, skipped without a GPU, splits
a tiny model across cuda:0 and the CPU and runs trace, ROME and MEMIT against the CPU model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.utils import find_tied_parameters
from transformers import AutoModelForCausalLM

import edit
import locate
from locate.errors import InvalidArgumentError
from locate.loading import dispatch_resident
from locate.model import HookedLM
from locate.testing import tiny_config

REQUEST = edit.Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris")


@pytest.fixture(scope="module")
def runtime(shared_data):
    return edit.Runtime(corpus=shared_data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw", data_dir=shared_data)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tokenizer, tmp_path_factory):
    """A tiny random model of ``arch`` saved as a Hugging Face directory (weights and tokenizer)."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config(request.param, len(tokenizer)))
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def block_plan(hf, device_of_block=lambda i: "cpu", other="cpu") -> dict:
    """An explicit device map naming every block (``device_of_block(i)``) and every other module."""
    plan = {}
    base_name, base = next(iter(hf.named_children()))
    for name, module in base.named_children():
        if isinstance(module, torch.nn.ModuleList):
            for i in range(len(module)):
                plan[f"{base_name}.{name}.{i}"] = device_of_block(i)
        else:
            plan[f"{base_name}.{name}"] = other
    for name, _ in hf.named_children():
        if name != base_name:
            plan[name] = other
    return plan


def hparams(name: str) -> dict:
    hp = dict(edit.get_method(name).smoke)
    hp["layers"] = [0]
    return hp


def numbers(lm, runtime) -> dict:
    """Trace scores (exact and attribution), and for ROME and MEMIT the edit's deltas and P(new) once applied."""
    out = {}
    for method in ("fast", "attribution"):
        tr = locate.trace(REQUEST.rendered, REQUEST.subject, model=lm, samples=3, noise=0.5, method=method)
        out[f"trace-{method}"] = np.stack([np.asarray(tr.scores[k]) for k in sorted(tr.scores)])
    new_id = lm.target_ids(REQUEST.target_new, REQUEST.rendered)[0]
    for name in ("rome", "memit"):
        e = edit.compute(edit.get_method(name), [REQUEST], model=lm, hparams=hparams(name), runtime=runtime)
        out[f"{name}-delta"] = torch.stack([d.matrix().double().cpu() for d in e.deltas])
        with edit.applied(lm, e):
            out[f"{name}-p"] = float(lm.last_logits([REQUEST.rendered])[0].float().softmax(-1)[new_id])
    return out


def assert_same(a: dict, b: dict, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = torch.as_tensor(a[k], dtype=torch.float64), torch.as_tensor(b[k], dtype=torch.float64)
        assert torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True), (k, float((x - y).abs().max()))


# ---------------------------------------------------------------------------------------- (a) on the CPU
@pytest.mark.filterwarnings("ignore::locate.errors.EditIneffectiveWarning")
def test_dispatched_model_gives_the_single_device_numbers(saved, tokenizer, runtime):
    """accelerate's hooks on every block (the multi-device path, all blocks on the CPU): no parameter is
    offloaded, every algorithm runs, and trace scores and ROME/MEMIT deltas are bit-identical."""
    plain = locate.load_model(str(saved), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(saved)
    plan = block_plan(hf)
    lm = HookedLM.from_hf(dispatch_resident(hf, plan), tokenizer, name="dispatched")
    assert lm.device_map == plan
    assert sum(hasattr(m, "_hf_hook") for m in lm.hf_model.modules()) > lm.n_layers  # hooks on every block
    assert not [n for n, p in lm.hf_model.named_parameters() if p.device.type == "meta"]
    assert lm.layer_device(lm.n_layers - 1) == torch.device("cpu")
    a, b = numbers(plain, runtime), numbers(lm, runtime)
    assert float(a["rome-delta"].abs().max()) > 0 and float(a["memit-delta"].abs().max()) > 0
    assert_same(a, b)


def test_load_model_device_map(saved):
    """``device_map`` as an explicit all-CPU map and as "auto" (all CPU here): loads, and predicts exactly as
    ``device="cpu"``; ``max_memory`` goes with a strategy."""
    ref = locate.load_model(str(saved), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(saved)
    explicit = locate.load_model(str(saved), device_map=block_plan(hf))
    auto = locate.load_model(str(saved), device_map="auto", max_memory={"cpu": "4GiB"})
    probe = "The Eiffel Tower is located in the city of"
    want = ref.last_logits([probe])
    for lm in (explicit, auto):
        assert lm.fingerprint == ref.fingerprint
        assert lm.device == torch.device("cpu")
        assert torch.equal(lm.last_logits([probe]), want)


def test_load_model_refuses_bad_placement(saved):
    hf = AutoModelForCausalLM.from_pretrained(saved)
    with pytest.raises(InvalidArgumentError, match="either device or device_map"):
        locate.load_model(str(saved), device="cpu", device_map="auto")
    with pytest.raises(InvalidArgumentError, match="give device_map too"):
        locate.load_model(str(saved), device="cpu", max_memory={"cpu": "1GiB"})
    with pytest.raises(InvalidArgumentError, match="'auto'"):
        locate.load_model(str(saved), device_map="everywhere")
    with pytest.raises(InvalidArgumentError, match="explicit map"):
        locate.load_model(str(saved), device_map=block_plan(hf), max_memory={"cpu": "1GiB"})
    with pytest.raises(InvalidArgumentError, match="disk"):
        locate.load_model(str(saved), device_map=block_plan(hf, lambda i: "disk" if i else "cpu"))
    if find_tied_parameters(hf):  # GPT-2: lm_head shares the token embedding; apart, one of them would run elsewhere
        plan = block_plan(hf)
        plan["lm_head"] = 0
        with pytest.raises(InvalidArgumentError, match="tied parameters"):
            dispatch_resident(hf, plan)


# ---------------------------------------------------------------------------------------- (b) on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device besides the CPU")
@pytest.mark.filterwarnings("ignore::locate.errors.EditIneffectiveWarning")
def test_split_across_cuda_and_cpu(saved, runtime):
    """Block 0 on the CPU between the embedding and block 1 on cuda:0 (activations cross cuda -> cpu ->
    cuda): trace (exact and attribution), ROME and MEMIT give the CPU model's numbers (float32 kernels
    differ between the devices: 1e-4 absolute on probabilities, 1e-3 relative on the deltas), the deltas
    land on the device and in the dtype of the weight they change, and revert exactly."""
    cpu = locate.load_model(str(saved), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(saved)
    plan = block_plan(hf, lambda i: "cpu" if i == 0 else 0, other=0)
    lm = locate.load_model(str(saved), device_map=plan)
    assert lm.layer_device(0) == torch.device("cpu") and lm.layer_device(1).type == "cuda"
    before = [t.detach().clone() for t in lm.hf_model.state_dict().values()]
    a, b = numbers(cpu, runtime), numbers(lm, runtime)
    for k in a:
        if k.endswith("-delta"):
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3 * float(a[k].abs().max())), k
        else:
            assert np.allclose(a[k], b[k], rtol=1e-3, atol=1e-4, equal_nan=True), k
    e = edit.compute(edit.get_method("rome"), [REQUEST], model=lm, hparams=hparams("rome"), runtime=runtime)
    with edit.applied(lm, e):
        W = lm.mlp_out_weight(0)
        assert W.device == torch.device("cpu")
    assert all(torch.equal(x, y) for x, y in zip(lm.hf_model.state_dict().values(), before))
