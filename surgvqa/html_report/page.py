"""The HTML document around the sections: head, table of contents, notes, the embedded media stores, and the
CSS and JavaScript of ``templates/`` inline, so the page needs no network. Its generator tag is what lets a
rebuild replace an earlier report and nothing else."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from surgvqa import __version__
from surgvqa.html_report.markup import esc
from surgvqa.html_report.media import MediaOutput
from surgvqa.html_report.runs import ReportError, Run
from surgvqa.metrics import SCORING_VERSION

GENERATOR = f"surgvqa {__version__} html_report"


def _asset(name: str) -> str:
    """A file of ``templates/`` (package data), inlined into the page."""
    return resources.files("surgvqa.html_report").joinpath("templates", name).read_text(encoding="utf-8")


def _json_script(element_id: str, data: Mapping[str, Any]) -> str:
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def render_page(
    run: Run,
    sections: Sequence[str],
    notes: Sequence[str],
    media: MediaOutput,
    toc: Sequence[tuple[str, str]],
) -> str:
    """The whole document: header and table of contents, notes, sections, the media stores, CSS and JS inline."""
    nav = "".join(f'<a href="#{anchor}">{esc(title)}</a>' for anchor, title in toc)
    note_html = ('<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>") if notes else ""
    stores = "" if media.link else _json_script("frame-store", media.frames.items) + _json_script(
        "audio-store", media.audio.items
    )
    generated = time.strftime("%Y-%m-%d %H:%M")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{esc(GENERATOR)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>surgvqa report: {esc(run.path.name)}</title><style>{_asset('report.css')}</style></head><body>"
        f'<header class="top"><h1>surgvqa report: {esc(run.path.name)}</h1>'
        f'<div class="sub">{len(run.records)} predictions · scored with {esc(SCORING_VERSION)} · generated '
        f'{esc(generated)} by surgvqa {esc(__version__)}</div><nav class="toc">{nav}</nav></header>'
        f"<main>{note_html}{''.join(sections)}</main>"
        "<footer>Every number on this page is re-computed from the predictions file(s) by surgvqa.metrics; "
        "no stored score is trusted.</footer>"
        f"{stores}<script>{_asset('report.js')}</script></body></html>\n"
    )


def check_output(output: Path, inputs: Iterable[Path], flag: str = "--output") -> None:
    """Refuse an output that is a directory, one of the inputs, or an existing file that is not a surgvqa report
    (recognised by the generator tag that :func:`render_page` writes). ``flag``: the option that named it."""
    if output.is_dir():
        raise ReportError(f"{flag} {output} is a directory; give a file name such as {output / 'report.html'}")
    resolved = output.resolve()
    for path in inputs:
        if path.exists() and path.resolve() == resolved:
            raise ReportError(f"{flag} {output} is one of the inputs ({path}); choose another file name")
    if output.is_file():
        with output.open("rb") as handle:
            head = handle.read(400)
        if b'name="generator" content="surgvqa' not in head:
            raise ReportError(
                f"{flag} {output} exists and is not a surgvqa report; choose another file name or remove it"
            )
