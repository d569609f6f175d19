"""User errors: a bad flag value, a missing file, a directory where a file is expected, incompatible flags.

Raise :class:`UserError` (a ``ValueError``; or a subclass of it) with a message that names the flag or the file and
says how to fix it. The command line (:func:`run_main`) prints it as one ``error: …`` line and exits 2, never with a
traceback (set ``SURGVQA_TRACEBACK=1`` to see the traceback instead). Every other exception keeps its traceback,
whoever raised it: a broken invariant or a library's error is a bug to report, not a flag to fix. Every command starts here,
so here it also warns about untested library versions (:mod:`surgvqa.versions`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from surgvqa.versions import warn_untested_versions

#: the exit status of a command that was called wrongly (2, as argparse uses for bad arguments)
USAGE_EXIT = 2


class UserError(ValueError):
    """An error the user fixes by changing a flag, a file or a path (exit 2, no traceback)."""


def _given(path: str | Path | None, flag: str) -> Path:
    if path is None or str(path) == "":
        raise UserError(f"{flag} is required")
    return Path(path)


def _existing(path: str | Path | None, flag: str, directory: bool) -> Path:
    p = _given(path, flag)
    wanted, other = ("directory", "file") if directory else ("file", "directory")
    if not (p.is_dir() if directory else p.is_file()):
        raise UserError(f"{flag} {p} is a {other}; pass a {wanted}" if p.exists() else
                        f"{flag} {p} does not exist; check the path")
    return p


def existing_file(path: str | Path | None, flag: str) -> Path:
    """``path`` as a Path when it is an existing file; else a :class:`UserError` naming ``flag``."""
    return _existing(path, flag, directory=False)


def existing_dir(path: str | Path | None, flag: str) -> Path:
    """``path`` as a Path when it is an existing directory; else a :class:`UserError` naming ``flag``."""
    return _existing(path, flag, directory=True)


def writable_file(path: str | Path | None, flag: str) -> Path:
    """``path`` as a Path when a file can be written there (not a directory, no parent that is a file)."""
    p = _given(path, flag)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory; pass a file name, e.g. {p / 'predictions.jsonl'}")
    blocking = next((parent for parent in p.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{flag} {p}: {blocking} is a file, not a directory; choose another path")
    return p


def format_error(err: BaseException) -> str:
    """``error: <message>``: the first line of the message carries the fix; a listing may follow."""
    return f"error: {str(err).strip() or type(err).__name__}"


def run_main(body: Callable[[], object], *, logs: bool = False) -> int:
    """Run a command's body and return its exit status: the body's ``int`` result, else 0. A user error becomes one
    ``error: …`` line on stderr and status 2. ``logs`` sets up INFO logging with timestamps first.

    User errors are :class:`UserError` (by type alone); anything else is a bug or an environment problem and keeps
    its traceback.
    """
    if logs:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_untested_versions()
    try:
        result = body()
    except UserError as err:
        if os.environ.get("SURGVQA_TRACEBACK"):
            raise
        print(format_error(err), file=sys.stderr)
        return USAGE_EXIT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    parser.exit(USAGE_EXIT, f"error: {message}; see {parser.prog} --help\n")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what>; see <prog> --help`` (exit 2) instead of the usage block."""

    def error(self, message: str):
        _one_line_error(self, message)


def parse_dataclasses(parser, argv: list[str]) -> tuple:
    """The dataclasses of a transformers ``HfArgumentParser`` from ``argv``. An unknown flag, or a combination the
    dataclasses refuse (``TrainingArguments.__post_init__``), is a :class:`UserError` naming it."""
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as err:
        raise UserError(str(err)) from err
    except ImportError as err:  # a flag whose package is missing (--deepspeed without DeepSpeed)
        if "deepspeed" in str(err).lower():
            raise UserError("--deepspeed needs DeepSpeed, which is not installed: pip install 'surgvqa[deepspeed]' "
                            "(the tested version), or drop --deepspeed (--fsdp --fsdp_config configs/fsdp2.json "
                            "shards with torch alone)") from err
        raise UserError(f"a flag needs a package that is not installed: {err}") from err
    if unknown:
        raise UserError(f"unknown argument(s) {' '.join(unknown)}; see {parser.prog} --help")
    return tuple(parsed)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The same one-line errors for a parser built elsewhere (e.g. transformers' ``HfArgumentParser``)."""
    parser.error = lambda message: _one_line_error(parser, message)  # type: ignore[method-assign]
    return parser


__all__ = ["USAGE_EXIT", "ArgumentParser", "UserError", "existing_dir", "existing_file", "format_error",
           "one_line_errors", "parse_dataclasses", "run_main", "writable_file"]
