"""The ``surgvqa`` command, and every user error of every command: one ``error: …`` line naming the fix, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgvqa import cli

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``surgvqa ARGV`` run in this process (argparse's exits included)."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "merge", "check", "verify-tokenizer", "report", "plan", "create-graft"):
        assert f"  {name} " in out


def test_command_errors(capsys, monkeypatch):
    assert _run([], capsys) == (2, "error: no command given; see surgvqa --help\n")
    code, err = _run(["fit"], capsys)
    assert code == 2 and err.startswith("error: unknown command 'fit'; commands: train, evaluate")
    monkeypatch.setitem(cli.COMMANDS, "report", cli.Command("surgvqa.no_such_module", "main", "x"))
    code, err = _run(["report"], capsys)
    assert code == 2 and "needs the module surgvqa.no_such_module" in err and len(err.splitlines()) == 1


def test_commands_run_the_tools(test_set, tiny_model_dir, capsys):
    code = cli.main(["check", "--data_path", str(test_set / "in_002-001.jsonl"), "--frames_dir",
                     str(test_set / "frames")])
    assert code == 0 and "OK: 50 sample(s), no problems." in capsys.readouterr().out
    assert cli.main(["verify-tokenizer", str(tiny_model_dir)]) == 0
    assert "OK" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # the graft's creator, imported only now
        cli.main(["create-graft", "--help"])
    assert info.value.code == 0 and "--vl_model" in capsys.readouterr().out


def test_python_m_surgvqa_imports_no_tool_until_asked():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "surgvqa", "--help"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and "create-graft" in result.stdout
    probe = "import sys, surgvqa.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ user errors
@pytest.fixture(scope="module")
def world(tmp_path_factory, test_set, tiny_model_dir):
    root = tmp_path_factory.mktemp("errors")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "x").write_text("x")
    return {"root": root, "data": str(test_set / "in_002-001.jsonl"), "frames": str(test_set / "frames"),
            "set": str(test_set), "model": str(tiny_model_dir)}


# (name, argv built from the world, text the error must contain). Every one fails before a model loads.
USER_ERRORS = [
    ("train, no arguments", lambda w: ["train"], "--train_data_path is required"),
    ("train --question_modality video",
     lambda w: ["train", "--model_name_or_path", w["model"], "--train_data_path", w["data"], "--frames_dir",
                w["frames"], "--question_modality", "video"], "--question_modality must be one of"),
    ("train --question_modality audio without --audio_dir",
     lambda w: ["train", "--model_name_or_path", w["model"], "--train_data_path", w["data"], "--frames_dir",
                w["frames"], "--question_modality", "audio"], "pass --audio_dir"),
    ("train --train_data_path missing", lambda w: ["train", "--train_data_path", str(w["root"] / "none.jsonl")],
     "--train_data_path"),
    ("train --train_data_path a directory", lambda w: ["train", "--train_data_path", w["set"]], "is a directory"),
    ("train --model_name_or_path missing",
     lambda w: ["train", "--model_name_or_path", str(w["root"] / "none"), "--train_data_path", w["data"],
                "--frames_dir", w["frames"]], "--model_name_or_path must be a local model directory"),
    ("train --frames_dir missing",
     lambda w: ["train", "--train_data_path", w["data"], "--frames_dir", str(w["root"] / "none")], "--frames_dir"),
    ("train --frame_size 10",
     lambda w: ["train", "--train_data_path", w["data"], "--frames_dir", w["frames"], "--frame_size", "10"],
     "frame_size must be an int >= 28"),
    ("train --load_in_4bit with --fp16",
     lambda w: ["train", "--train_data_path", w["data"], "--load_in_4bit", "True", "--fp16", "True"], "--bf16 True"),
    ("train, an unknown flag", lambda w: ["train", "--no_such_flag", "1"], "unknown argument(s) --no_such_flag 1"),
    ("evaluate, no arguments", lambda w: ["evaluate"], "--checkpoint_path is required"),
    ("evaluate --score_predictions missing", lambda w: ["evaluate", "--score_predictions",
                                                        str(w["root"] / "none.jsonl")], "--score_predictions"),
    ("evaluate --score_predictions a directory", lambda w: ["evaluate", "--score_predictions", w["set"]],
     "is a directory"),
    ("evaluate --output_file a directory",
     lambda w: ["evaluate", "--checkpoint_path", w["model"], "--eval_data_path", w["data"], "--output_file",
                str(w["root"])], "--output_file"),
    ("evaluate --checkpoint_path missing",
     lambda w: ["evaluate", "--checkpoint_path", str(w["root"] / "none"), "--eval_data_path", w["data"],
                "--output_file", str(w["root"] / "p.jsonl")], "--checkpoint_path"),
    ("evaluate --frames_dir missing",
     lambda w: ["evaluate", "--checkpoint_path", w["model"], "--eval_data_path", w["data"], "--output_file",
                str(w["root"] / "p.jsonl"), "--frames_dir", str(w["root"] / "none")], "--frames_dir"),
    ("evaluate --baseline 46", lambda w: ["evaluate", "--baseline", "46"], "write 0.46, not 46"),
    ("evaluate a model without surgvqa_config.json",
     lambda w: ["evaluate", "--checkpoint_path", w["model"], "--eval_data_path", w["data"], "--output_file",
                str(w["root"] / "p.jsonl")], "--allow_default_preprocessing True"),
    ("evaluate --question_modality video",
     lambda w: ["evaluate", "--checkpoint_path", w["model"], "--eval_data_path", w["data"], "--output_file",
                str(w["root"] / "p.jsonl"), "--question_modality", "video"], "--question_modality must be one of"),
    ("evaluate --frames_as movie",
     lambda w: ["evaluate", "--checkpoint_path", w["model"], "--eval_data_path", w["data"], "--output_file",
                str(w["root"] / "p.jsonl"), "--frames_as", "movie"], "--frames_as must be one of video, images"),
    ("merge, no arguments", lambda w: ["merge"], "the following arguments are required: --base_model_path"),
    ("merge --base_model_path missing",
     lambda w: ["merge", "--base_model_path", str(w["root"] / "none"), "--adapter_path", w["model"],
                "--output_dir", str(w["root"] / "m")], "--base_model_path"),
    ("merge --adapter_path not an adapter",
     lambda w: ["merge", "--base_model_path", w["model"], "--adapter_path", w["model"], "--output_dir",
                str(w["root"] / "m")], "--adapter_path"),
    ("merge --dtype fp8",
     lambda w: ["merge", "--base_model_path", w["model"], "--adapter_path", w["model"], "--output_dir",
                str(w["root"] / "m"), "--dtype", "fp8"], "argument --dtype: invalid choice"),
    ("check --data_path missing", lambda w: ["check", "--data_path", str(w["root"] / "none.jsonl")], "--data_path"),
    ("check --data_path a directory", lambda w: ["check", "--data_path", w["set"]], "is a directory"),
    ("check --frames_dir missing",
     lambda w: ["check", "--data_path", w["data"], "--frames_dir", str(w["root"] / "none")], "--frames_dir"),
    ("verify-tokenizer, a directory without a tokenizer", lambda w: ["verify-tokenizer", str(w["root"])],
     "cannot load a tokenizer"),
]


@pytest.mark.parametrize(("argv", "expected"), [case[1:] for case in USER_ERRORS],
                         ids=[case[0] for case in USER_ERRORS])
def test_user_error_is_one_line_and_exit_2(world, capsys, argv, expected):
    code, err = _run(argv(world), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
