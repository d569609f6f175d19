"""``surgvqa <command> …``: one command for every tool of the toolkit (also ``python -m surgvqa``).

Each command is the ``main(argv)`` of one module, imported only when that command runs (so ``surgvqa check`` never
imports torch's training stack, and a command whose module is not installed fails alone). The original scripts
(``train_vqa.py``, ``evaluate_checkpoint.py``, ``merge_stage2_to_bf16.py``, ``verify_tokenizer.sh``,
``python -m surgvqa.data check``) call the same functions. Exit codes are the command's: 0 done, 1 a check failed,
2 a user error (one ``error: …`` line).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from surgvqa.errors import USAGE_EXIT, UserError, format_error


@dataclass(frozen=True)
class Command:
    module: str
    function: str
    help: str


#: every command, in the order ``surgvqa --help`` lists them
COMMANDS: dict[str, Command] = {
    "train": Command("surgvqa.train", "main", "fine-tune with LoRA / QLoRA (= python train_vqa.py)"),
    "evaluate": Command("surgvqa.evaluate", "main",
                        "evaluate a checkpoint by generated answers, or re-score (= python evaluate_checkpoint.py)"),
    "merge": Command("surgvqa.merge", "main",
                     "merge adapters into an unquantized base (= python merge_stage2_to_bf16.py)"),
    "check": Command("surgvqa.data", "check_main", "check a data file and its media (= python -m surgvqa.data check)"),
    "verify-tokenizer": Command("surgvqa.tokenizer", "verify_main",
                                "check pad / eos / end-of-turn tokens (= bash verify_tokenizer.sh)"),
    "report": Command("surgvqa.html_report", "main", "an HTML report of predictions files"),
    "plan": Command("surgvqa.plan", "main", "plan a run before spending GPU hours"),
    "cv": Command("surgvqa.cv", "main", "leave-one-video-out: train and evaluate one fold per video"),
    "create-graft": Command("surgvqa.backbones.qwen_vl_whisper.create", "main",
                            "write a Qwen-VL + Whisper graft directory (the qwen_vl_whisper backbone)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: surgvqa <command> [arguments]   (surgvqa <command> --help for a command's arguments)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):  # the module itself is missing, not a dependency
            return None
        raise


def resolve(name: str) -> Callable[[list[str]], int]:
    """The function that runs command ``name`` on its argument list (importing its module now)."""
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; commands: {', '.join(COMMANDS)} (see surgvqa --help)")
    command = COMMANDS[name]
    module = _import(command.module)
    if module is None:
        raise UserError(f"`surgvqa {name}` needs the module {command.module}, which this installation does not "
                        "have; update surgvqa")
    return getattr(module, command.function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(format_error(UserError("no command given; see surgvqa --help")), file=sys.stderr)
        return USAGE_EXIT
    try:
        run = resolve(argv[0])
    except UserError as err:
        print(format_error(err), file=sys.stderr)
        return USAGE_EXIT
    return run(argv[1:])


__all__ = ["COMMANDS", "Command", "main", "resolve", "usage"]
