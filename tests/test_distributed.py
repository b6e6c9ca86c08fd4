"""``edit.evaluate`` under ``torchrun``: two CPU processes on the gloo backend split the cases and merge
their records into the one Results, equal case for case to a one-process run.

The test launches this file itself as the worker (``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_distributed.py OUT DATA``), on a tiny random Llama that every process
builds from the same seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import edit
from edit.eval.datasets import Case, Probe
from edit.request import Request
from locate.errors import InvalidArgumentError
from locate.loading import default_model_cache
from locate.testing import tiny_model

TIMING = ("edit_seconds", "peak_memory_mb")  # measured, so not equal between runs
PEOPLE = [("Danielle Darrieux", " English", " French"), ("Otto Wagner", " Paris", " Vienna"),
          ("Hugo Boss", " Rome", " Metzingen"), ("Anna Smith", " Tokyo", " London"), ("Karl Marx", " Oslo", " Trier")]


def tiny_llama():
    return tiny_model("llama", AutoTokenizer.from_pretrained(default_model_cache()))


def cases() -> list[Case]:
    return [Case(i, "handmade", [Request("{} lives in the city of", s, new, true)],
                 paraphrase_prompts=[f"Everyone knows {s} lives in"], neighborhood_prompts=["Anna lives in the city of"],
                 generation_prompts=[f"{s} is"], locality=[Probe("The sky is", (" blue",))])
            for i, (s, new, true) in enumerate(PEOPLE)]


def runs(data: Path) -> dict:
    """The evaluations the test compares: ROME one case at a time, MEMIT two cases per edit (3 batches)."""
    corpus = data / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
    common = dict(fluency=True, gen_length=5, progress=False, corpus=corpus)
    return {"rome_single": dict(method="rome", mode="single", hparams={**edit.get_method("rome").smoke, "layers": [0]}, **common),
            "memit_batch": dict(method="memit", mode="batch", batch_size=2,
                                hparams={**edit.get_method("memit").smoke, "layers": [0]}, **common)}


def _records(res) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in res.records]


def worker(out: Path, data: Path) -> None:
    lm = tiny_llama()
    for name, kw in runs(data).items():
        edit.evaluate(kw.pop("method"), cases(), model=lm, out=out / name, **kw)


@pytest.mark.filterwarnings("ignore::locate.errors.EditIneffectiveWarning")
def test_two_processes_equal_one(shared_data, tmp_path, monkeypatch):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path / "dist"), str(shared_data)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    lm = tiny_llama()
    for name, kw in runs(shared_data).items():
        one = edit.evaluate(kw.pop("method"), cases(), model=lm, out=tmp_path / "one" / name, **kw)
        merged = edit.Results.load(tmp_path / "dist" / name / "results.json")
        assert [r["case_id"] for r in merged.records] == list(range(len(PEOPLE)))
        assert _records(merged) == _records(one)
        assert {k: v for k, v in merged.aggregates.items() if k not in TIMING} == \
            {k: v for k, v in one.aggregates.items() if k not in TIMING}
        # each rank kept its own records: the edit groups r, r + 2, ... (single: cases; batch: pairs of cases)
        size = 1 if kw["mode"] == "single" else kw["batch_size"]
        for rank in (0, 1):
            lines = (tmp_path / "dist" / name / f"rank{rank}" / "records.jsonl").read_text().splitlines()
            got = sorted(json.loads(x)["case_id"] for x in lines if x.strip())
            assert got == [i for i in range(len(PEOPLE)) if (i // size) % 2 == rank]


def test_sequential_mode_is_refused_under_a_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InvalidArgumentError, match="cannot be split"):
        edit.evaluate("none", cases(), model=object(), mode="sequential")


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
