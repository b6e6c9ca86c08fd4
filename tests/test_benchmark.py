"""The survey benchmark (issue 23) on a tiny Llama: 2 methods (rome, grace; their smoke hyperparameters),
3 cases per axis. Every table cell is produced, the report round-trips from the records, bad input is
refused before any work, a missing data file skips its tasks with a warning, and KnowEdit's portability
is EasyEdit's mean over keys of the mean over each key's probes (not the mean over all probes)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import edit
from edit.eval import BenchmarkDataWarning, Case, Probe, benchmark, build_report, load_benchmark
from edit.eval.benchmark import AXES, NOT_SUPPORTED, TABLES, Task, _Context, _run_groups
from edit.eval.harness import _Store
from edit.eval.metrics import score_case
from edit.registry import Runtime, get_method
from locate.errors import MethodNotAvailableError
from locate.testing import tiny_model
from locate_edit.cli import main

METHODS = ("rome", "grace")
SMALL = dict(n=3, batch_sizes=(1, 2), checkpoints=(1, 3), gen_length=12, piqa_per_case=2, piqa_general=4,
             ppl_tokens=300, ppl_seq_len=128, progress=False)
NUMBER = re.compile(r"^\*{0,2}-?\d+(\.\d+)?(e[-+]?\d+)?\*{0,2}$")


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def run(tiny_lm, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("survey")
    hp = {m: get_method(m).smoke for m in METHODS}
    text = benchmark(list(METHODS), model=tiny_lm, data_dir=shared_data, out=out, hparams=hp, **SMALL)
    return out, text


def _cells(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_every_cell_is_produced(run):
    out, text = run
    rows = _cells(text)
    n_tables = sum(1 for a, _, _ in TABLES if a in AXES) + len(SMALL["batch_sizes"]) + 1 + len(SMALL["checkpoints"])
    assert text.count("| Method |") == n_tables
    assert len(rows) == n_tables * len(METHODS)
    for row in rows:
        assert row[0] in METHODS
        for cell in row[1:]:  # a number, or a stated reason: never an empty or pending cell
            assert NUMBER.match(cell) or cell in (NOT_SUPPORTED, "n/a"), (row, cell)
    data = load_benchmark(out)
    for axis, _, cols in TABLES:
        for task, metric, _ in cols:
            for m in METHODS:
                v = data.cell(axis, task, m, metric)
                assert isinstance(v, float) or v in (NOT_SUPPORTED, "n/a")


def test_report_round_trips_from_the_records(run):
    out, text = run
    assert (out / "report.md").read_text() == text + "\n"
    (out / "report.md").unlink()
    assert build_report(out) == text  # from the directory alone
    assert (out / "report.md").read_text() == text + "\n"


def test_records_are_resumed_not_recomputed(run, tiny_lm, shared_data):
    out, text = run
    before = {p: p.stat().st_size for p in out.rglob("records.jsonl")}
    hp = {m: get_method(m).smoke for m in METHODS}
    again = benchmark(list(METHODS), model=tiny_lm, data_dir=shared_data, out=out, hparams=hp,
                      axes=("basic", "efficiency"), **SMALL)
    assert {p: p.stat().st_size for p in out.rglob("records.jsonl")} == before
    assert "CF ES" in again


def test_unknown_method_refused_before_any_work(tmp_path):
    with pytest.raises(MethodNotAvailableError, match="rome"):
        benchmark(["rome", "no-such-method"], out=tmp_path / "b", data_dir=tmp_path)
    assert not (tmp_path / "b").exists()
    assert main(["benchmark", "survey", "--methods", "rome,no-such-method", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_missing_data_file_skips_its_task_and_the_run_goes_on(tiny_lm, shared_data, tmp_path):
    data = tmp_path / "data"
    for f in shared_data.rglob("*"):
        if f.is_file() and "zsre_inverse_relation" not in f.name and f.suffix in (".json", ".jsonl", ".lst", ".raw"):
            (data / f.relative_to(shared_data)).parent.mkdir(parents=True, exist_ok=True)
            (data / f.relative_to(shared_data)).symlink_to(f)
    with pytest.warns(BenchmarkDataWarning, match="zsre/zsre_inverse_relation.json"):
        text = benchmark(["grace"], model=tiny_lm, data_dir=data, out=tmp_path / "out", axes=("portability",),
                         hparams={"grace": get_method("grace").smoke}, **SMALL)
    d = load_benchmark(tmp_path / "out")
    assert d.cell("portability", "zsre_inverse_relation", "grace", "portability") == \
        "skipped (no zsre/zsre_inverse_relation.json)"
    assert isinstance(d.cell("portability", "zsre_subject_replace", "grace", "portability"), float)
    assert "`zsre/zsre_inverse_relation.json`" in text


def test_knowedit_portability_is_the_mean_over_keys_of_the_key_means(tiny_lm):
    """EasyEdit: per key, the mean over its probes; per case, the mean over keys. With one probe the
    model gets right under key A and two it gets wrong under key B that is (1 + 0) / 2 = 0.5, where the
    mean over all probes would be 1/3."""
    prompt = "The capital of France is"
    top = tiny_lm.predict(prompt, 1)[0].token
    case = Case(0, "knowedit", [edit.Request("{} is a city in", "Paris", " France")],
                portability=[Probe(prompt, (top,)), Probe("Snow is", (" zebra crossing",)),
                             Probe("The sea is", (" quantum chromodynamics",))],
                extra={"portability_keys": ["Reasoning", "Subject_Aliasing", "Subject_Aliasing"],
                       "locality_keys": []})
    pooled = score_case(tiny_lm, case, fluency=False)["portability"]
    store = _Store(None, {}, True)
    ctx = _Context(tiny_lm, "sum", 12, 0, False, [], 0, 0, None)
    task = Task("k", "knowedit", "-", lambda p, n: [], "k", knowedit=True)
    _run_groups(task, None, "none", [case], None, Runtime(), store, 1, ctx, lambda s: None)
    rec = store.done["0"]
    assert rec["knowedit_portability_by_key"]["Reasoning"] == 1.0
    assert rec["knowedit_portability_by_key"]["Subject_Aliasing"] == 0.0
    assert rec["knowedit_portability"] == pytest.approx(0.5)
    assert pooled == pytest.approx(1 / 3)
    assert np.isclose(rec["portability"], pooled)
