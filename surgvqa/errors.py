"""User errors: a bad flag value, a missing file, a directory where a file is expected, incompatible flags.

Raise :class:`UserError` (a ``ValueError``) with a message that names the flag or the file and says how to fix it.
The command line (:func:`run_main`) prints it as one ``error: …`` line and exits 2, never with a traceback; other
``ValueError``/``OSError`` reaching a command line are treated the same way (set ``SURGVQA_TRACEBACK=1`` to see
the traceback instead). A leaf module: it imports nothing from ``surgvqa``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

#: the exit status of a command that was called wrongly (2, as argparse uses for bad arguments)
USAGE_EXIT = 2


class UserError(ValueError):
    """An error the user fixes by changing a flag, a file or a path (exit 2, no traceback)."""


def existing_file(path: str | Path | None, flag: str) -> Path:
    """``path`` as a Path when it is an existing file; else a :class:`UserError` naming ``flag``."""
    if path is None or str(path) == "":
        raise UserError(f"{flag} is required")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory; pass a file")
    if not p.is_file():
        raise UserError(f"{flag} {p} does not exist; check the path")
    return p


def existing_dir(path: str | Path | None, flag: str) -> Path:
    """``path`` as a Path when it is an existing directory; else a :class:`UserError` naming ``flag``."""
    if path is None or str(path) == "":
        raise UserError(f"{flag} is required")
    p = Path(path)
    if p.is_file():
        raise UserError(f"{flag} {p} is a file; pass a directory")
    if not p.is_dir():
        raise UserError(f"{flag} {p} does not exist; check the path")
    return p


def writable_file(path: str | Path | None, flag: str) -> Path:
    """``path`` as a Path when a file can be written there (not a directory, parent not a file)."""
    if path is None or str(path) == "":
        raise UserError(f"{flag} is required")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory; pass a file name, e.g. {p / 'predictions.jsonl'}")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {p}: {parent} is a file, not a directory; choose another path")
    return p


def format_error(err: BaseException) -> str:
    """``error: <message>``: the first line of the message carries the fix; a listing may follow."""
    message = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        message = f"{err.filename}: {err.strerror}"
    return f"error: {message}"


def run_main(body: Callable[[], int]) -> int:
    """Run a command's body; user errors become one ``error: …`` line on stderr and exit status 2."""
    try:
        return body()
    except (UserError, ValueError, OSError) as err:
        if os.environ.get("SURGVQA_TRACEBACK"):
            raise
        print(format_error(err), file=sys.stderr)
        return USAGE_EXIT


def _one_line_error(parser: argparse.ArgumentParser, message: str):
    parser.exit(USAGE_EXIT, f"error: {message}; see {parser.prog} --help\n")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what>; see <prog> --help`` (exit 2) instead of the usage block."""

    def error(self, message: str):
        _one_line_error(self, message)


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The same one-line errors for a parser built elsewhere (e.g. transformers' ``HfArgumentParser``)."""
    parser.error = lambda message: _one_line_error(parser, message)  # type: ignore[method-assign]
    return parser


__all__ = ["USAGE_EXIT", "ArgumentParser", "UserError", "existing_dir", "existing_file", "format_error",
           "one_line_errors", "run_main", "writable_file"]
