"""Every dataset file in shared/data parses into requests plus evaluation prompts."""

from __future__ import annotations

import json

import pytest

from edit.eval.datasets import (
    DatasetError,
    DatasetNotFoundError,
    load_counterfact,
    load_counterfact_easyedit,
    load_dataset,
    load_known,
    load_mquake,
    load_piqa,
    load_zsre,
)


def test_counterfact_rome_schema(shared_data):
    cases = load_counterfact(shared_data / "counterfact/counterfact_dev_800.json")
    assert len(cases) == 800
    c = cases[0]
    assert c.case_id == 34
    r = c.request
    assert r.prompt == "{} was employed in" and r.subject == "Laurent Cars"
    assert r.target_new == " Philadelphia" and r.target_true == " Paris"  # leading space added
    assert r.rendered == "Laurent Cars was employed in"
    assert len(c.paraphrase_prompts) == 2 and len(c.neighborhood_prompts) == 10 and len(c.generation_prompts) == 10
    assert all(x.request.target_new.startswith(" ") and not x.request.target_new.startswith("  ") for x in cases)
    for x in cases:
        x.request.check()
    assert len(load_counterfact(shared_data / "counterfact/counterfact_dev_800.json", n=5)) == 5


def test_counterfact_portability_fields(shared_data):
    cases = load_counterfact(shared_data / "counterfact/easyedit_rome_format/counterfact_portability_gpt4.json")
    c = cases[0]
    assert c.portability[0].prompt.startswith("What famous food")
    assert c.portability[0].answer == " Cheesesteaks"
    dn = load_counterfact(shared_data / "counterfact/easyedit_rome_format/counterfact_distracting_neighbor.json", n=3)
    assert "distracting_neighborhood_prompts" in dn[0].extra
    sr = load_counterfact(shared_data / "counterfact/easyedit_rome_format/counterfact_subject_replace.json", n=3)
    assert sr[0].extra["alternative_subject"]


def test_counterfact_simplified_schema(shared_data):
    cases = load_counterfact_easyedit(shared_data / "counterfact/easyedit_format/counterfact-val.json")
    assert len(cases) == 1913
    c = cases[0]
    assert c.request.prompt == "{}, by" and c.request.rendered == "BBC One, by"
    assert c.request.target_new == " Sega" and c.request.target_true == " BBC"
    assert c.paraphrase_prompts == ["BBC One is my favorite product out of everything owned by"]
    assert c.locality[0].prompt == "BBC Radio, by" and c.locality[0].answer == " BBC"


def test_zsre(shared_data):
    cases = load_zsre(shared_data / "zsre/zsre_dev_800.json")
    assert len(cases) == 800
    c = cases[0]
    assert c.request.rendered == "Which family does Ramalinaceae belong to?"
    assert c.request.target_new == " Lamiinae" and c.request.target_true == " Lecanorales"
    assert c.paraphrase_prompts == ["What family are Ramalinaceae?"]
    assert c.locality[0].answer == " Downhill"
    assert c.portability[0].answer == " Cerambycidae"
    for x in cases:
        x.request.check()  # exactly one {} and a subject that occurs
    rome_style = load_zsre(shared_data / "zsre/zsre_dev_800.json", n=1, target_field="answers")
    assert rome_style[0].request.target_new == " Lecanorales"


def test_mquake_multi_edit_cases(shared_data):
    for name in ("MQuAKE-hard.json", "AKEW_MQuAKE-CF.json"):
        cases = load_mquake(shared_data / "mquake" / name)
        assert cases and all(len(c.requests) >= 1 and c.portability for c in cases)
    hard = load_mquake(shared_data / "mquake/MQuAKE-hard.json", n=1)[0]
    assert len(hard.requests) == 4
    assert [r.target_new for r in hard.requests] == [" Madonna", " Narendra Modi", " Australia", " Arabic"]
    assert hard.portability[0].answers[0] == " Arabic" and " Arabic language" in hard.portability[0].answers


def test_known_1000(shared_data):
    cases = load_known(shared_data / "known_1000/known_1000.json")
    assert len(cases) == 1209
    assert cases[0].request.rendered == "Vinson Massif is located in the continent of"
    assert cases[0].request.target_new == " Antarctica"


def test_load_dataset_by_name(shared_data):
    assert len(load_dataset("zsre", shared_data, n=3)) == 3
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("nope", shared_data)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "no" / "counterfact.json"
    with pytest.raises(DatasetNotFoundError, match="counterfact.json"):
        load_counterfact(missing)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        load_zsre(tmp_path / "zsre.json")


def test_wrong_schema_is_reported(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"src": "q", "alt": "a"}]))
    with pytest.raises(DatasetError, match="missing field"):
        load_counterfact(p)
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_zsre(p)


def test_counterfact_simplified_schema_neighbourhood(shared_data, tmp_path):
    # the locality prompt answers with the case's true object, so it is a CounterFact neighbourhood prompt (NS)
    c = load_counterfact_easyedit(shared_data / "counterfact/easyedit_format/counterfact-val.json", n=1)[0]
    assert c.neighborhood_prompts == ["BBC Radio, by"]
    rec = {"prompt": "Zed is in", "subject": "Zed", "target_new": "Rome", "ground_truth": "Paris",
           "rephrase_prompt": "Zed lies in", "locality_prompt": "Ann is in", "locality_ground_truth": "Oslo"}
    (tmp_path / "cf.json").write_text(json.dumps([rec]))
    other = load_counterfact_easyedit(tmp_path / "cf.json")[0]
    assert other.neighborhood_prompts == [] and other.locality[0].answer == " Oslo"


def test_piqa(shared_data, tmp_path):
    items = load_piqa(shared_data / "locality/piqa_valid.jsonl")
    assert len(items) == 1838 and all(len(i.solutions) == 2 and i.label in (0, 1) for i in items)
    assert items[0].goal.startswith("How do I ready a guinea pig cage") and items[0].label == 0  # paper, not jeans
    assert len(load_piqa(shared_data / "locality/piqa_valid.jsonl", n=5)) == 5
    (tmp_path / "p.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "p-labels.lst").write_text("0\n1\n")
    with pytest.raises(DatasetError, match="1 questions but"):
        load_piqa(tmp_path / "p.jsonl")
    with pytest.raises(DatasetNotFoundError, match="PIQA file not found"):
        load_piqa(tmp_path / "missing.jsonl")
