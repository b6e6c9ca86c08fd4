from locate_edit.cli import main


def test_info_prints_dimensions(capsys, lm):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "layers          : 30" in out
    assert "d_model         : 576" in out
    assert "d_mlp           : 1536" in out
    assert "cache directory" in out


def test_demo_prints_top5_and_saves_the_heatmaps(capsys, lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo writes trace.png to the working directory
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out
    assert (tmp_path / "trace.png").stat().st_size > 10_000


def test_cli_error_is_reported_not_raised(capsys):
    assert main(["info", "--model", "/nonexistent/model"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_hparam_arguments_are_parsed_and_checked_before_the_model_loads(capsys):
    from locate_edit.cli.common import parse_method_hparams

    assert parse_method_hparams(["grace:layers=25", "grace:eps=0.5", "ike:order=paper"]) == {
        "grace": {"layers": 25, "eps": 0.5}, "ike": {"order": "paper"}}
    args = ["edit", "--method", "rome", "--subject", "a", "--prompt", "{} b", "--target", " c"]
    assert main(args + ["--hparam", "v_steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(args + ["--hparam", "v_stepz=3"]) == 2
    assert "no hyperparameter(s) ['v_stepz']" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 18 item 10: bad paths, before the model loads
def _no_model(monkeypatch):
    import locate

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(locate, "load_model", refuse)


EDIT = ["edit", "--subject", "The Eiffel Tower", "--prompt", "{} is located in the city of", "--target", " Rome"]


def test_missing_corpus_requests_and_facts_files_are_refused_before_the_model_loads(capsys, monkeypatch, tmp_path):
    _no_model(monkeypatch)
    assert main(EDIT + ["--corpus", str(tmp_path / "missing.txt")]) == 2
    assert "corpus file" in capsys.readouterr().err
    assert main(["edit", "--requests", str(tmp_path / "missing.json")]) == 2
    assert "requests file not found" in capsys.readouterr().err
    assert main(["trace-many", str(tmp_path / "missing.json")]) == 2
    assert "facts file not found" in capsys.readouterr().err


def test_bad_file_contents_and_outputs_are_refused_before_the_model_loads(capsys, monkeypatch, tmp_path):
    _no_model(monkeypatch)
    binary = tmp_path / "corpus.bin"
    binary.write_bytes(bytes(range(256)) * 16)
    assert main(EDIT + ["--corpus", str(binary)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    broken = tmp_path / "facts.json"
    broken.write_text("[{\"prompt\": ")
    assert main(["trace-many", str(broken)]) == 2
    assert "not a JSON list" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(EDIT + ["--save", str(blocker / "sub" / "e.safetensors")]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    assert main(["trace", "x", "--subject", "x", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(EDIT + ["--layer", "3.5"]) == 2
    assert "--layer must be an int or auto" in capsys.readouterr().err
    assert main(["edit", "--subject", "a", "--prompt", "no placeholder", "--target", " b"]) == 2
    assert "exactly one" in capsys.readouterr().err
