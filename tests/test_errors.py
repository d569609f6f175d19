"""User errors: one ``error: …`` line and exit 2; a library's exception keeps its traceback."""

from __future__ import annotations

import json

import pytest

from surgvqa.errors import ArgumentParser, UserError, existing_dir, existing_file, run_main, writable_file
from surgvqa.metrics import parse_baseline


def test_run_main_turns_user_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv("SURGVQA_TRACEBACK", raising=False)

    def bad_flag() -> int:
        raise UserError("--frame_size 10 is below the 28 px grid; pass --frame_size 28 or more")

    assert run_main(bad_flag) == 2
    assert capsys.readouterr().err == "error: --frame_size 10 is below the 28 px grid; pass --frame_size 28 or more\n"

    def our_check() -> int:  # surgvqa's checks raise UserError
        existing_file(None, "--data_path")
        return 0

    assert run_main(our_check) == 2 and capsys.readouterr().err == "error: --data_path is required\n"
    assert run_main(lambda: 0) == 0


def test_only_the_type_decides(monkeypatch):
    """A plain ValueError keeps its traceback wherever it was raised (surgvqa's own code included): a broken
    invariant is a bug to report; every deliberate check raises UserError."""
    from surgvqa.backbones.common.token_merging import bipartite_merge, kept_video_tokens

    monkeypatch.delenv("SURGVQA_TRACEBACK", raising=False)
    with pytest.raises(ValueError, match="cannot merge") as raised:
        run_main(lambda: bipartite_merge(__import__("torch").zeros(2, 1), 3))
    assert not isinstance(raised.value, UserError)
    with pytest.raises(UserError, match="token_kept_ratio must be in"):
        kept_video_tokens(4, 1.5)


def test_a_library_error_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("SURGVQA_TRACEBACK", raising=False)

    def library_bug() -> int:
        json.loads("{")  # raised inside the json module: a bug or a broken file, not a flag to fix
        return 0

    with pytest.raises(json.JSONDecodeError):
        run_main(library_bug)
    monkeypatch.setenv("SURGVQA_TRACEBACK", "1")
    with pytest.raises(UserError):
        run_main(lambda: (_ for _ in ()).throw(UserError("x")))


def test_path_checks_name_the_flag(tmp_path):
    (tmp_path / "f.jsonl").write_text("{}\n")
    assert existing_file(tmp_path / "f.jsonl", "--data_path") == tmp_path / "f.jsonl"
    with pytest.raises(UserError, match=r"^--data_path .* is a directory; pass a file$"):
        existing_file(tmp_path, "--data_path")
    with pytest.raises(UserError, match=r"^--data_path .* does not exist"):
        existing_file(tmp_path / "nope.jsonl", "--data_path")
    with pytest.raises(UserError, match=r"^--frames_dir .* is a file; pass a directory$"):
        existing_dir(tmp_path / "f.jsonl", "--frames_dir")
    with pytest.raises(UserError, match=r"^--output_file .* is a directory; pass a file name"):
        writable_file(tmp_path, "--output_file")
    with pytest.raises(UserError, match=r"f.jsonl is a file, not a directory"):
        writable_file(tmp_path / "f.jsonl" / "p.jsonl", "--output_file")


def test_argparse_errors_are_one_line(capsys):
    parser = ArgumentParser(prog="surgvqa check")
    parser.add_argument("--data_path", required=True)
    with pytest.raises(SystemExit) as info:
        parser.parse_args([])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("error: the following arguments are required: --data_path; "
                                       "see surgvqa check --help\n")


def test_baseline_is_parsed_once_for_evaluate_and_rescoring(tmp_path, capsys):
    from surgvqa import evaluate

    assert evaluate.parse_baseline is parse_baseline
    assert parse_baseline("0.46") == pytest.approx(0.46) and parse_baseline("chance") == "chance"
    with pytest.raises(UserError, match="write 0.46, not 46"):
        parse_baseline("46")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"video_id": "v", "id": "q", "question_type": "t", "short_answer": "yes",
                                       "answer": "Yes.", "prediction": "Yes."}) + "\n")
    # re-scoring (its one command line: evaluate_checkpoint.py --score_predictions) refuses 46 as 4,600 %
    assert evaluate.main(["--score_predictions", str(predictions), "--baseline", "46"]) == 2
    assert "write 0.46, not 46" in capsys.readouterr().err
    assert evaluate.main(["--score_predictions", str(predictions), "--baseline", "0.46"]) == 0


@pytest.mark.parametrize(("command", "required"), [("evaluate", []), ("plan", ["--model", "m"]), ("train", [])])
def test_an_unknown_flag_is_one_error_line_naming_it(command, required, capsys):
    """evaluate_checkpoint.py, surgvqa plan and train_vqa.py: an unknown flag is one ``error:`` line, no traceback."""
    import importlib

    main = importlib.import_module(f"surgvqa.{command}").main
    assert main([*required, "--data_path", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown argument(s) --data_path x.jsonl; see ") and err.count("\n") == 1
