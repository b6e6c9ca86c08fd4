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
