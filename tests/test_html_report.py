"""surgvqa report: the self-contained HTML report, checked by parsing its HTML and, end to end, in a real browser
(Debian's chromium, headless, driven by Playwright) on the tiny model's predictions."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from surgvqa import html_report
from surgvqa.html_report import build_report, main
from surgvqa.metrics import score_record, summarize

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SURGVQA_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# ------------------------------------------------------------------------------------------------ helpers
class Page(HTMLParser):
    """The parts of a report the tests look at: cards (attributes, frame names, image sources, question text),
    the embedded stores, notes and every tag name."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.notes: list[str] = []
        self.scripts: dict[str, str] = {}
        self.tags: list[tuple[str, dict]] = []
        self._card: dict | None = None
        self._text_into: str | None = None
        self._script: str | None = None
        self._in_notes = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        cls = a.get("class") or ""
        if tag == "article" and "card" in cls.split():
            self._card = {"attrs": a, "frames": [], "imgs": [], "question": "", "notes": [], "audio": [],
                          "placeholders": [], "pred": ""}
            self.cards.append(self._card)
        elif self._card is not None:
            if tag == "figure":
                self._card["frames"].append(a.get("data-name"))
            elif tag == "img" and "data-name" not in a and (a.get("data-frame") or a.get("src")):
                self._card["imgs"].append(a.get("data-frame") or a.get("src"))
            elif tag == "audio":
                self._card["audio"].append(a.get("data-audio") or a.get("src"))
            elif tag == "dd" and cls in ("question", "pred"):
                self._text_into = cls
            elif tag == "div" and cls in ("media-note", "ph"):
                self._text_into = "notes" if cls == "media-note" else "placeholders"
                self._card[self._text_into].append("")
        if tag == "script" and a.get("type") == "application/json":
            self._script = a["id"]
            self.scripts[self._script] = ""
        if tag == "ul" and cls == "notes":
            self._in_notes = True
        elif tag == "li" and self._in_notes:
            self.notes.append("")

    def handle_endtag(self, tag):
        if tag == "article":
            self._card = None
        if tag in ("dd", "div"):
            self._text_into = None
        if tag == "script":
            self._script = None
        if tag == "ul":
            self._in_notes = False

    def handle_data(self, data):
        if self._script:
            self.scripts[self._script] += data
        if self._in_notes and self.notes:
            self.notes[-1] += data
        if self._card is not None and self._text_into:
            if self._text_into in ("notes", "placeholders"):
                self._card[self._text_into][-1] += data
            else:
                self._card[self._text_into] += data

    def card(self, video_id: str, qid: str) -> dict:
        found = [c for c in self.cards if c["attrs"]["data-video-id"] == video_id and c["attrs"]["data-id"] == qid]
        assert len(found) == 1, f"{len(found)} cards for {(video_id, qid)}"
        return found[0]


def _jpeg(path: Path, color: tuple[int, int, int], size=(200, 150)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=90)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _with_meta(meta: dict, rows) -> list:
    return [{"surgvqa_meta": meta}, *rows]


@pytest.fixture
def small_run(tmp_path):
    """Two videos whose ids collide, frames on disk, a data file and predictions with a meta line."""
    data_rows, pred_rows = [], []
    answers = {"qa_1": ("yes", "Yes, NBI is on.", "Yes, NBI is on."), "qa_2": ("no", "No tool.", "Yes, a tool.")}
    for v, (vid, color) in enumerate((("002-001", (200, 40, 40)), ("002-009", (40, 40, 200)))):
        for qid, (short, answer, prediction) in answers.items():
            frames = [f"{vid}_{qid}_{k}" for k in range(3)]
            for k, name in enumerate(frames):
                _jpeg(tmp_path / "frames" / vid / f"{name}.jpg", tuple(min(255, c + 20 * k) for c in color))
            question = f"{qid} of video {vid}: is it so?"
            data_rows.append({"id": qid, "video_id": vid, "frames": frames, "question": question,
                              "question_type": "nbi_status" if qid == "qa_1" else "tool_check",
                              "answer": answer, "short_answer": short})
            pred = prediction if v == 0 else answer
            pred_rows.append({"video_id": vid, "id": qid, "question_type": data_rows[-1]["question_type"],
                              "question": question, "answer": answer, "short_answer": short, "prediction": pred,
                              "stopped_by_eos": True, "new_tokens": 5})
    data = _write_jsonl(tmp_path / "eval.jsonl", data_rows)
    meta = {"checkpoint": "outputs/run1", "eval_data_path": str(data),
            "eval_data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "frames_dir": str(tmp_path / "frames"),
            "ablate": None, "question_modality": "text", "frame_size": 56}
    preds = _write_jsonl(tmp_path / "preds.jsonl", _with_meta(meta, pred_rows))
    return {"dir": tmp_path, "data": data, "preds": preds, "rows": pred_rows, "data_rows": data_rows}


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


# -------------------------------------------------------------------------------------------- HTML checks
def test_cards_carry_their_own_frames_and_question(small_run, tmp_path):
    out = build_report(small_run["preds"], tmp_path / "r" / "report.html")
    page = Page(out.read_text(encoding="utf-8"))
    assert len(page.cards) == 4
    store = json.loads(page.scripts["frame-store"])
    for row in small_run["data_rows"]:
        card = page.card(row["video_id"], row["id"])
        assert card["question"] == row["question"]
        assert card["frames"] == row["frames"]
        assert len(card["imgs"]) == 3 and not card["placeholders"]
        # the thumbnail shown is the frame named: same colour as the file on disk, within the pixel budget
        for name, key in zip(row["frames"], card["imgs"], strict=True):
            thumb = _decode(store[key]).convert("RGB")
            assert thumb.width * thumb.height <= html_report.THUMB_MAX_PIXELS
            original = Image.open(small_run["dir"] / "frames" / row["video_id"] / f"{name}.jpg").convert("RGB")
            got, want = thumb.getpixel((5, 5)), original.getpixel((5, 5))
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 12
    assert not any("changed since the run" in n for n in page.notes)
    # same id, other video: other frames, other question
    a, b = page.card("002-001", "qa_1"), page.card("002-009", "qa_1")
    assert a["question"] != b["question"] and not set(a["frames"]) & set(b["frames"])
    assert not set(a["imgs"]) & set(b["imgs"])
    # correctness attributes follow surgvqa.metrics
    summary = summarize(small_run["rows"])
    for row in small_run["rows"]:
        hit = score_record(row, summary["candidates"])["accuracy"]
        assert page.card(row["video_id"], row["id"])["attrs"]["data-correct"] == str(int(hit))
    # self-contained: nothing is fetched from anywhere
    text = out.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not [a for t, a in page.tags if t in ("script", "link", "img") and (a.get("src") or "").startswith("http")]


def test_summary_numbers_are_the_metrics(small_run, tmp_path):
    out = build_report(small_run["preds"], tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    summary = summarize(small_run["rows"])
    assert f'id="overall-accuracy">{100 * summary["accuracy"]:.1f}%' in text
    lo, hi = summary["accuracy_ci95"]
    assert f"Wilson [{100 * lo:.1f}, {100 * hi:.1f}]" in text
    clustered = summary["clustered"]["accuracy"]
    assert (f"clustered 95 % CI [{100 * clustered['ci95'][0]:.1f}, {100 * clustered['ci95'][1]:.1f}]" in text
            if clustered["ci95"] else "no clustered interval" in text)
    assert 'id="per-video"' in text
    assert f"majority baseline <b>{100 * summary['majority_baseline']:.1f}%</b>" in text
    assert f"no EOS (loops or cut at max tokens)</th><td>{summary['no_eos']} / 4" in text
    assert "outputs/run1" in text  # the run's meta


def test_original_toolkit_file_renders_with_unknown_meta(tmp_path, recwarn):
    rows = [{"question_id": f"q{i}", "question_type": "nbi_status", "question": f"question {i}?",
             "ground_truth": "Yes.", "short_answer": "yes", "predicted_answer": "Yes." if i % 2 else "No."}
            for i in range(4)]
    preds = _write_jsonl(tmp_path / "orig.jsonl", rows)
    assert main([str(preds), "--output", str(tmp_path / "r.html")]) == 0
    page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert len(page.cards) == 4
    assert any("no surgvqa_meta line" in n for n in page.notes)
    card = page.card("", "q1")
    assert card["question"] == "question 1?" and card["frames"] == []
    assert any("names no eval data file" in n for n in card["notes"])
    assert "meta: unknown" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_size_cap_leaves_thumbnails_out_with_a_note(small_run, tmp_path, monkeypatch):
    one = len(html_report.thumbnail_jpeg(small_run["dir"] / "frames" / "002-001" / "002-001_qa_1_0.jpg")[0][0])
    monkeypatch.setattr(html_report, "MAX_EMBEDDED_FRAME_BYTES", int(one * 1.34 * 4.5))  # room for ~4 frames
    out = build_report(small_run["preds"], tmp_path / "report.html")
    page = Page(out.read_text(encoding="utf-8"))
    store = json.loads(page.scripts["frame-store"])
    assert 1 <= len(store) <= 4
    shown = sum(len(c["imgs"]) for c in page.cards)
    left = sum(len(c["placeholders"]) for c in page.cards)
    assert shown + left == 12 and left >= 8
    assert all("size cap" in p for c in page.cards for p in c["placeholders"])
    assert any("left out" in n and "--link_media" in n for n in page.notes)
    assert len(out.read_bytes()) < 200_000


def test_unreadable_frame_is_named_on_its_card(small_run, tmp_path, monkeypatch):
    real = html_report.thumbnail_jpeg
    bad = small_run["dir"] / "frames" / "002-009" / "002-009_qa_1_2.jpg"

    def thumbnail(path):
        if path == bad.resolve():
            raise OSError("broken data stream when reading image file")
        return real(path)

    monkeypatch.setattr(html_report, "thumbnail_jpeg", thumbnail)
    page = Page(build_report(small_run["preds"], tmp_path / "report.html").read_text(encoding="utf-8"))
    card = page.card("002-009", "qa_1")
    assert len(card["imgs"]) == 2 and card["placeholders"] == ["unreadable"]
    assert card["frames"] == small_run["data_rows"][2]["frames"]
    assert any("cannot read 002-009_qa_1_2.jpg: broken data stream" in n for n in card["notes"])


def test_link_media_links_relative_paths(small_run, tmp_path):
    out = build_report(small_run["preds"], tmp_path / "sub" / "report.html", link_media=True)
    page = Page(out.read_text(encoding="utf-8"))
    assert "frame-store" not in page.scripts
    card = page.card("002-009", "qa_2")
    assert len(card["imgs"]) == 3
    for name, src in zip(card["frames"], card["imgs"], strict=True):
        assert not src.startswith(("/", "data:"))
        target = (out.parent / src).resolve()
        assert target == (small_run["dir"] / "frames" / "002-009" / f"{name}.jpg").resolve()


def test_question_mismatch_hides_media(small_run, tmp_path):
    rows = [dict(r) for r in small_run["data_rows"]]
    rows[0]["question"] = "a different question"
    _write_jsonl(small_run["data"], rows)
    page = Page(build_report(small_run["preds"], tmp_path / "report.html").read_text(encoding="utf-8"))
    card = page.card("002-001", "qa_1")
    assert card["frames"] == [] and card["imgs"] == []
    assert any("not this prediction's question" in n for n in card["notes"])
    assert any("changed since the run" in n for n in page.notes)
    assert len(page.card("002-009", "qa_1")["imgs"]) == 3


def test_missing_frame_and_escaping_template_are_shown_not_hidden(small_run, tmp_path):
    (small_run["dir"] / "frames" / "002-009" / "002-009_qa_2_1.jpg").unlink()
    page = Page(build_report(small_run["preds"], tmp_path / "report.html").read_text(encoding="utf-8"))
    card = page.card("002-009", "qa_2")
    assert card["imgs"] == [] and any("missing" in n and "002-009_qa_2_1" in n for n in card["notes"])
    assert len(page.card("002-009", "qa_1")["imgs"]) == 3
    _jpeg(small_run["dir"] / "002-001_qa_1_0.jpg", (0, 255, 0))  # exists, but outside the frames root
    page = Page(build_report(small_run["preds"], tmp_path / "report2.html",
                             frame_path_template="../{frame}.jpg").read_text(encoding="utf-8"))
    assert all(c["imgs"] == [] for c in page.cards)
    assert all(any("outside root" in n for n in c["notes"]) for c in page.cards)


def test_audio_embedded_per_key_and_missing_audio_named(small_run, tmp_path):
    import numpy as np
    import soundfile as sf

    audio = tmp_path / "audio"
    for i, row in enumerate(small_run["data_rows"][:3]):
        path = audio / row["video_id"] / f"{row['id']}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, 0.3 * np.sin(np.arange(8000) * (0.05 + 0.02 * i)).astype("float32"), 16000)
    page = Page(build_report(small_run["preds"], tmp_path / "report.html", audio_dir=audio)
                .read_text(encoding="utf-8"))
    store = json.loads(page.scripts["audio-store"])
    keys = [page.card(r["video_id"], r["id"])["audio"] for r in small_run["data_rows"]]
    assert all(len(k) == 1 for k in keys[:3]) and len({k[0] for k in keys[:3]}) == 3
    assert all(store[k[0]].startswith(("data:audio/ogg;base64,", "data:audio/wav;base64,")) for k in keys[:3])
    last = page.card("002-009", "qa_2")
    assert last["audio"] == [] and len(last["imgs"]) == 3  # frames still shown
    assert any("spoken-question audio missing" in n for n in last["notes"])


def test_spoken_question_resampling_keeps_speech_band_and_drops_aliases(tmp_path):
    import numpy as np
    import soundfile as sf

    t = np.arange(16000) / 16000
    for freq, rms in ((1000, 0.354), (7000, 0.0)):  # 7 kHz would alias to 1 kHz at 8 kHz without the low-pass
        path = tmp_path / f"{freq}.wav"
        sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t)).astype("float32"), 16000)
        wave = html_report.media._speech_at_audio_rate(path)
        assert wave.shape == (8000,)
        assert float(np.sqrt((wave[100:-100] ** 2).mean())) == pytest.approx(rms, abs=0.01)
    data, mime = html_report.audio_ogg(tmp_path / "1000.wav")[0]
    assert mime in ("audio/ogg", "audio/wav")
    assert sf.info(io.BytesIO(data)).samplerate == 8000


def test_compare_pairs_by_key_and_marks_disagreements(small_run, tmp_path):
    other_rows = [dict(r, prediction="No.") for r in small_run["rows"]]
    other = _write_jsonl(tmp_path / "ablated.jsonl", _with_meta({"ablate": "video"}, other_rows))
    out = build_report(small_run["preds"], tmp_path / "report.html", compare=[other])
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert 'id="compare"' in text and "McNemar" in text and "ablated (ablate=video)" in text
    assert "no measurable drop without video" in text
    cands = summarize(small_run["rows"])["candidates"]
    for a, b in zip(small_run["rows"], other_rows, strict=True):
        differ = score_record(a, cands)["accuracy"] != score_record(b, cands)["accuracy"]
        assert page.card(a["video_id"], a["id"])["attrs"]["data-disagree"] == str(int(differ))
    # key sets that differ are reported, never silently intersected
    partial = _write_jsonl(tmp_path / "partial.jsonl", _with_meta({"ablate": "video"}, other_rows[1:]))
    text = build_report(small_run["preds"], tmp_path / "report.html", compare=[partial]).read_text(encoding="utf-8")
    assert "1 sample(s) only in preds, not paired: (video_id=&#x27;002-001&#x27;, id=&#x27;qa_1&#x27;)" in text
    assert "WARNING: the files do not hold the same samples" in text
    page = Page(text)
    assert page.card("002-001", "qa_1")["attrs"]["data-disagree"] == "0"
    # the ablated run is the "run" of the pairing whichever file the report is about (as evaluate_checkpoint.py
    # --ablate video --compare NORMAL --report writes it)
    for main_file, other_file in ((small_run["preds"], other), (other, small_run["preds"])):
        text = build_report(main_file, tmp_path / "r2.html", compare=[other_file]).read_text(encoding="utf-8")
        assert "run ablated (ablate=video) vs reference preds" in text


def _run_config():
    from surgvqa.run_config import Preprocessing, RunConfig

    return RunConfig(surgvqa_version="0.1.0", backbone="qwen2_5_omni", base_model="/models/base",
                     preprocessing=Preprocessing(frame_size=56, system_prompt="Answer."), model_max_length=4096,
                     dtype="bfloat16", tokenizer_repair=[], train_data_path=None, eval_data_path=None,
                     frames_dir=None, audio_dir=None, eval_frames_dir=None, eval_audio_dir=None,
                     lora={"lora_r": 16})


def test_training_curves_and_settings(small_run, tmp_path):
    run = tmp_path / "run1"
    ckpt = run / "checkpoint-20"
    ckpt.mkdir(parents=True)
    history = [{"step": s, "loss": 2.0 / s, "epoch": s / 10} for s in range(2, 22, 2)]
    history += [{"step": 10, "eval_loss": 0.5, "eval_accuracy": 0.4}, {"step": 20, "eval_loss": 0.4, "eval_accuracy": 0.7}]
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 20,
                                                        "best_model_checkpoint": str(ckpt), "best_metric": 0.7}))
    _run_config().write(run)
    (run / "training_args.json").write_text(json.dumps({"learning_rate": 0.003, "max_steps": 20, "output_dir": "x"}))
    text = build_report(small_run["preds"], tmp_path / "report.html", train_dir=run).read_text(encoding="utf-8")
    assert 'id="training"' in text and "train loss" in text and "eval_accuracy" in text
    assert "preprocessing.frame_size" in text and "training_args.learning_rate" in text
    assert "highest eval_accuracy</th><td>70.0% at step 20" in text
    (ckpt / "trainer_state.json").unlink()
    text = build_report(small_run["preds"], tmp_path / "report.html", train_dir=run).read_text(encoding="utf-8")
    assert "no trainer_state.json" in text and "preprocessing.frame_size" in text


@pytest.mark.parametrize("case", ["nan_from_step_6", "all_nan", "inf", "minus_inf"])
def test_non_finite_losses_are_gaps_with_a_marked_point_and_a_note(small_run, tmp_path, capsys, case):
    """What a diverged (e.g. fp16) run writes: json.dump's NaN / Infinity in trainer_state.json."""
    run = tmp_path / "diverged"
    run.mkdir()
    value = {"nan_from_step_6": float("nan"), "all_nan": float("nan"), "inf": float("inf"),
             "minus_inf": float("-inf")}[case]
    first_bad = 1 if case == "all_nan" else 6
    history = [{"step": s, "loss": value if s >= first_bad else 2.0 / s} for s in range(1, 11)]
    history.append({"step": 10, "eval_loss": value, "eval_accuracy": 0.25})
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 10,
                                                       "best_metric": value}))
    out = tmp_path / "report.html"
    assert main([str(small_run["preds"]), "--output", str(out), "--train_dir", str(run)]) == 0
    assert capsys.readouterr().err == ""
    text = out.read_text(encoding="utf-8")
    shown = {"inf": "inf", "minus_inf": "-inf"}.get(case, "NaN")
    assert f"train loss became {shown} at step {first_bad} ({11 - first_bad} of 10 logged values" in text
    assert f"eval loss became {shown} at step 10" in text
    training = text[text.index('id="training"'):]
    chart = training[training.index("<svg"):training.index("</svg>")]
    coordinates = re.findall(r' (?:points|cx|cy|x|y|x1|y1|x2|y2)="([^"]*)"', chart)
    assert coordinates and all(math.isfinite(float(v)) for c in coordinates for v in re.split(r"[ ,]+", c) if v)
    assert chart.count('class="nonfinite"') == (10 - first_bad + 1) + 1  # every bad train point, the eval loss
    assert f"train loss step 6: {shown}</title>" in chart
    if case == "nan_from_step_6":  # the finite part is still a line
        assert chart.count("<polyline") == 1


@pytest.mark.parametrize("case", ["missing", "directory", "output_is_input", "foreign_output", "train_dir",
                                  "malformed", "bad_run_config", "bad_flag"])
def test_user_errors_exit_2_with_one_line(small_run, tmp_path, capsys, case):
    preds, out = small_run["preds"], tmp_path / "report.html"
    args = [str(preds), "--output", str(out)]
    if case == "missing":
        args[0] = str(tmp_path / "nope.jsonl")
    elif case == "directory":
        args[0] = str(tmp_path)
    elif case == "output_is_input":
        args[2] = str(small_run["data"])
    elif case == "foreign_output":
        out.write_text("my notes")
    elif case == "train_dir":
        args += ["--train_dir", str(tmp_path / "no-run")]
    elif case == "malformed":
        preds.write_text(preds.read_text() + "{not json\n")
    elif case == "bad_run_config":
        run = tmp_path / "run"
        _run_config().write(run)
        config = json.loads((run / "surgvqa_config.json").read_text())
        (run / "surgvqa_config.json").write_text(json.dumps({**config, "frame_sise": 56}))
        args += ["--train_dir", str(run)]
    elif case == "bad_flag":
        args += ["--frames"]
    before = small_run["data"].read_bytes()
    try:
        code = main(args)
    except SystemExit as stop:  # argparse
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert small_run["data"].read_bytes() == before
    if case == "foreign_output":
        assert out.read_text() == "my notes"


def test_rebuild_replaces_own_report(small_run, tmp_path):
    out = tmp_path / "report.html"
    assert main([str(small_run["preds"]), "--output", str(out)]) == 0
    assert main([str(small_run["preds"]), "--output", str(out), "--link_media"]) == 0
    assert "frame-store" not in Page(out.read_text(encoding="utf-8")).scripts


def test_module_runs_as_script_without_loading_torch():
    import subprocess
    import sys

    code = "import sys, surgvqa.html_report; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert done.stdout.split() == ["False", "False"]
    done = subprocess.run([sys.executable, "-m", "surgvqa.html_report", "--help"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert "--link_media" in done.stdout and "--compare" in done.stdout


# ------------------------------------------------------------------------------------------ real browser
@pytest.fixture(scope="module")
def two_video_eval(tmp_path_factory, trained_adapter, test_set):
    """test_set's video 002-001 plus a synthetic video 002-009 whose ids are the same (qa_000001...), evaluated by
    the tiny trained adapter (and again with --ablate video), as evaluate_checkpoint.py writes them."""
    from conftest import load_script

    from surgvqa.evaluate import main as evaluate_main

    root = tmp_path_factory.mktemp("two-videos")
    extra = root / "extra"
    load_script("make_synthetic_dataset").make_dataset(extra, None, seed=7, video_ids=("002-009",), audio=False,
                                                       num_samples=6, progress=False)
    shutil.copytree(test_set / "frames" / "002-001", root / "frames" / "002-001")
    shutil.copytree(extra / "frames" / "002-009", root / "frames" / "002-009")
    shutil.copytree(test_set / "audio" / "in_002-001" / "002-001", root / "audio" / "002-001")
    lines = (test_set / "in_002-001.jsonl").read_text().splitlines()[:12]
    lines += (extra / "in_template.jsonl").read_text().splitlines()
    data = root / "eval.jsonl"
    data.write_text("\n".join(lines) + "\n")
    rows = [json.loads(x) for x in lines]
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    assert any(len(rs) == 2 and rs[0]["question"] != rs[1]["question"] for rs in by_id.values())

    outputs = {}
    for name, extra_args in (("preds", []), ("ablated", ["--ablate", "video"])):
        out = root / f"{name}.jsonl"
        assert evaluate_main([
            "--checkpoint_path", str(trained_adapter), "--eval_data_path", str(data), "--frames_dir",
            str(root / "frames"), "--output_file", str(out), "--batch_size", "8", "--max_new_tokens", "16",
            "--device", "cpu", *extra_args,
        ]) == 0
        assert html_report.read_predictions_meta(out).eval_data_path == str(data.resolve())
        outputs[name] = out
    return {"root": root, "data_rows": rows, **outputs}


def test_report_in_a_real_browser(two_video_eval, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (run `make system-deps`: apt-get install chromium "
                    "chromium-driver)")
    from playwright.sync_api import expect, sync_playwright

    report = build_report(two_video_eval["preds"], tmp_path / "report.html", compare=[two_video_eval["ablated"]],
                          audio_dir=two_video_eval["root"] / "audio")
    records = html_report.read_predictions(two_video_eval["preds"])
    meta = html_report.read_predictions_meta(two_video_eval["preds"])
    summary = summarize(records, candidates=meta.candidates)
    wrong = {(r["video_id"], r["id"]) for r in records if not score_record(r, summary["candidates"])["accuracy"]}
    assert 0 < len(wrong) < len(records), "the tiny model should get some samples right and some wrong"
    frames_of = {(r["video_id"], r["id"]): r["frames"] for r in two_video_eval["data_rows"]}

    errors: list[str] = []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(report.as_uri())
            page.wait_for_load_state("load")

            def shown() -> set[tuple[str, str]]:
                return {tuple(k) for k in page.eval_on_selector_all(
                    "article.card:not([hidden])", "cs => cs.map(c => [c.dataset.videoId, c.dataset.id])")}

            everything = {(r["video_id"], r["id"]) for r in records}
            assert shown() == everything
            # each card shows its own sample's question and frame names
            for key in everything:
                card = page.locator(f'article.card[data-video-id="{key[0]}"][data-id="{key[1]}"]')
                assert card.count() == 1
                card.scroll_into_view_if_needed()
                record = next(r for r in records if (r["video_id"], r["id"]) == key)
                expect(card.locator("dd.question")).to_have_text(record["question"], use_inner_text=True)
                expect(card.locator(".strip figcaption")).to_have_text(frames_of[key], use_inner_text=True)
                names = card.locator(".strip figure").evaluate_all("fs => fs.map(f => f.dataset.name)")
                assert names == frames_of[key]
            # frames really render (embedded thumbnails of this card) and the flipbook plays this card's frames
            card = page.locator('article.card[data-video-id="002-009"][data-id="qa_000001"]')
            card.scroll_into_view_if_needed()
            page.wait_for_function("c => [...c.querySelectorAll('.strip img')].every(i => i.complete && "
                                   "i.naturalWidth > 0)", arg=card.element_handle())
            card.locator(".strip figure").first.click()
            page.wait_for_timeout(600)
            big = card.locator(".flip img").get_attribute("src")
            own = card.locator(".strip img").evaluate_all("is => is.map(i => i.src)")
            assert big in own
            assert card.locator(".flip .fc").inner_text().split()[-1] in frames_of[("002-009", "qa_000001")]
            card.locator(".strip figure").first.click()  # pause
            # "wrong only" shows exactly the wrong predictions
            page.check("#f-wrong")
            assert shown() == wrong
            assert page.inner_text("#f-count") == f"showing {len(wrong)} of {len(records)}"
            page.uncheck("#f-wrong")
            # disagreements with the ablated run, search by id, type filter, keyboard navigation
            page.check("#f-disagree")
            disagree = {tuple(k) for k in page.eval_on_selector_all(
                "article.card[data-disagree='1']", "cs => cs.map(c => [c.dataset.videoId, c.dataset.id])")}
            assert shown() == disagree
            page.uncheck("#f-disagree")
            page.fill("#f-search", "002-009/qa_000001")
            assert shown() == {("002-009", "qa_000001")}
            page.fill("#f-search", "qa_000001")
            assert shown() == {("002-001", "qa_000001"), ("002-009", "qa_000001")}
            page.fill("#f-search", "")
            page.select_option("#f-type", "nbi_status")
            assert shown() == {(r["video_id"], r["id"]) for r in records if r["question_type"] == "nbi_status"}
            page.select_option("#f-type", "")
            page.keyboard.press("Escape")
            page.locator("h1").click()
            page.keyboard.press("j")
            page.keyboard.press("j")
            current = page.eval_on_selector_all("article.card.current", "cs => cs.map(c => c.id)")
            assert current == ["s1"]
            page.locator("#summary").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "html_report_browser.png"))
            card.screenshot(path=str(ARTIFACTS / "html_report_card.png"))
        finally:
            context.close()
    assert errors == []
    shot = ARTIFACTS / "html_report_browser.png"
    assert shot.is_file() and shot.stat().st_size > 10_000
    with Image.open(shot) as img:
        assert img.size == (1280, 900)
