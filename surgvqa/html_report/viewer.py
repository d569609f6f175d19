"""The sample viewer: one card per prediction, keyed on (video_id, id), showing that record's question, gold
answers and prediction next to the media located for that same key (never another sample's), with its scores
under each metric and, for compared runs, their answers. ``templates/report.js`` adds filters and the flipbook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from surgvqa.html_report.locate import Located
from surgvqa.html_report.markup import esc
from surgvqa.html_report.media import LEFT_OUT, MediaOutput, href
from surgvqa.html_report.runs import Key, Run, record_key
from surgvqa.metrics import UNTYPED


def _figure(name: str, img_attrs: str) -> str:
    return (f'<figure data-name="{esc(name)}"><img {img_attrs} alt="{esc(name)}" title="{esc(name)}">'
            f'<figcaption>{esc(name)}</figcaption></figure>')


def _placeholder(name: str, reason: str) -> str:
    short = "left out (size cap)" if reason == LEFT_OUT else "unreadable"
    return (f'<figure data-name="{esc(name)}"><div class="ph" title="{esc(reason)}">{esc(short)}</div>'
            f'<figcaption>{esc(name)}</figcaption></figure>')


def _frames_html(loc: Located, media: MediaOutput) -> tuple[str, list[str]]:
    """The frame strip and flipbook of one card, and the reasons for frames that could not be shown."""
    figures: list[str] = []
    notes: list[str] = []

    def missing(name: str, why: str | None) -> str:
        if why and why != LEFT_OUT:
            notes.append(why)
        return _placeholder(name, why or "")

    if loc.video_path is not None:
        if media.link:
            return (f'<video controls preload="none" width="256" src="{href(loc.video_path, media.out_dir)}">'
                    "</video>", notes)
        keys, why = media.frames.get(loc.video_path)
        if not keys:
            figures.append(missing(loc.video_path.name, why))
        figures.extend(_figure(f"{loc.video_path.name} {k + 1}/{len(keys)}", f'data-frame="{key}"')
                       for k, key in enumerate(keys))
    for name, path in zip(loc.frame_names, loc.frame_paths, strict=True):
        if media.link:
            figures.append(_figure(name, f'src="{href(path, media.out_dir)}" loading="lazy"'))
            continue
        keys, why = media.frames.get(path)
        figures.append(_figure(name, f'data-frame="{keys[0]}"') if keys else missing(name, why))
    if not figures:
        return "", notes
    return (f'<div class="strip" title="click to play the frames as a flipbook">{"".join(figures)}</div>'
            '<div class="flip"><img alt=""><span class="fc"></span></div>', notes)


def _audio_html(loc: Located, media: MediaOutput) -> tuple[str, list[str]]:
    if loc.audio_path is None:
        return "", []
    if media.link:
        return f'<audio controls preload="none" src="{href(loc.audio_path, media.out_dir)}"></audio>', []
    keys, why = media.audio.get(loc.audio_path)
    if not keys:
        return "", [f"spoken question {loc.audio_path.name}: {why}"]
    return f'<audio controls preload="none" data-audio="{keys[0]}" title="spoken question"></audio>', []


def _tick(value: bool | None, name: str) -> str:
    if value is None:
        return f'<span title="not counted for this sample">{esc(name)} –</span>'
    return f'<span class="{"y" if value else "n"}">{esc(name)} {"✓" if value else "✗"}</span>'


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return esc(text) if text.strip() else '<span class="empty">(empty)</span>'


def render_card(
    index: int, run: Run, located: Mapping[Key, Located], compared: Sequence[Run], media: MediaOutput
) -> str:
    """One sample: every part is read from this record and the media located for its own (video_id, id)."""
    rec = run.records[index]
    key = record_key(rec)
    loc = located[key]
    hits = run.hits[index]
    correct = bool(hits["accuracy"])
    others = []
    disagree = False
    for other in compared:
        j = other.by_key.get(key)
        if j is None:
            others.append(f'<div><span class="lab">{esc(other.label)}</span><span class="muted">not in this run'
                          "</span></div>")
            continue
        other_ok = bool(other.hits[j]["accuracy"])
        disagree |= other_ok != correct
        others.append(
            f'<div><span class="lab">{esc(other.label)}</span>'
            f'<span class="flag {"ok" if other_ok else "bad"}">{"right" if other_ok else "wrong"}</span>'
            f'<span>{_text(other.records[j].get("prediction"))}</span></div>'
        )
    frames, frame_notes = _frames_html(loc, media)
    audio, audio_notes = _audio_html(loc, media)
    notes = "".join(f'<div class="media-note">{esc(n)}</div>' for n in [*loc.problems, *frame_notes, *audio_notes])
    question = rec.get("question")
    question_html = _text(question)
    if question is None and loc.question is not None:
        question_html = f'{esc(loc.question)} <span class="muted">(from the data file)</span>'
    eos = rec.get("stopped_by_eos")
    flags = f'<span class="flag {"ok" if correct else "bad"}">{"correct" if correct else "wrong"}</span>'
    if eos is False:
        flags += '<span class="flag warn" title="generation did not stop with EOS">no EOS</span>'
    if disagree:
        flags += '<span class="flag muted">runs disagree</span>'
    qtype = rec.get("question_type") or UNTYPED
    tokens = rec.get("new_tokens")
    extra = f'<span class="muted">{tokens} new tokens</span>' if isinstance(tokens, int) else ""
    video_id = key[0] if key[0] is not None else ""
    return (
        f'<article class="card{" correct" if correct else ""}" id="s{index}" tabindex="-1" '
        f'data-video-id="{esc(video_id)}" data-id="{esc(key[1])}" data-type="{esc(qtype)}" '
        f'data-correct="{int(correct)}" data-disagree="{int(disagree)}">'
        f'<div class="head"><span class="key">{esc(video_id or "?")} / {esc(key[1])}</span>'
        f'<span class="qtype">{esc(qtype)}</span>{flags}</div>'
        f"{frames}{audio}{notes}"
        f'<dl class="qa"><dt>question</dt><dd class="question">{question_html}</dd>'
        f'<dt>gold answer</dt><dd class="gold">{_text(rec.get("answer"))}</dd>'
        f'<dt>gold short</dt><dd class="short">{_text(rec.get("short_answer"))}</dd>'
        f'<dt>prediction</dt><dd class="pred">{_text(rec.get("prediction"))}</dd>'
        f'<dt>predicted</dt><dd class="label mono">{esc(run.labels[index])}</dd></dl>'
        f'<div class="scores">{_tick(hits["accuracy"], "strict")}{_tick(hits["k_acc"], "K-ACC")}'
        f'{_tick(hits["substring"], "substring")}{_tick(hits["exact_match"], "exact match")}{extra}</div>'
        + (f'<div class="others">{"".join(others)}</div>' if others else "")
        + "</article>"
    )


def section_samples(run: Run, cards: Sequence[str], compared: Sequence[Run]) -> str:
    """The viewer: filters (type, wrong only, disagreements), search by id, the keys, then every card."""
    types = sorted({r.get("question_type") or UNTYPED for r in run.records})
    options = "".join(f'<option value="{esc(t)}">{esc(t)}</option>' for t in types)
    n_wrong = sum(1 for h in run.hits if not h["accuracy"])
    dis_attr = "" if compared else ' disabled title="give --compare to find disagreements"'
    return (
        f'<section id="samples"><h2>Samples <span class="muted">({len(cards)}, {n_wrong} wrong)</span></h2>'
        '<div class="toolbar">'
        f'<label>type <select id="f-type"><option value="">all types</option>{options}</select></label>'
        '<label><input type="checkbox" id="f-wrong"> wrong only</label>'
        f'<label><input type="checkbox" id="f-disagree"{dis_attr}> runs disagree</label>'
        '<input type="search" id="f-search" placeholder="search video_id / id" aria-label="search by id">'
        '<span class="count" id="f-count"></span>'
        '<div class="keys"><kbd>j</kbd>/<kbd>k</kbd> or <kbd>→</kbd>/<kbd>←</kbd> next/previous sample · '
        '<kbd>space</kbd> play the frames · <kbd>w</kbd> wrong only · <kbd>d</kbd> disagreements · '
        '<kbd>/</kbd> search · click a frame strip to play it</div></div>'
        f'<div class="cards">{"".join(cards)}</div></section>'
    )
