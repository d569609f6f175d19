"""The few HTML functions every part of the page uses: escaping, percentages, key-value tables."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any


def esc(text: Any) -> str:
    """Text or an attribute value, HTML-escaped (quotes too)."""
    return html.escape(str(text), quote=True)


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage ("n/a" for None)."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "none" if v is None else json.dumps(v, ensure_ascii=False)


def kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of (name, value) rows; values that are not text are shown as JSON."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_value(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'
