"""VQACollator: exact labels, both paddings, prompts per question modality, audio padding, frames, length estimate."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from surgvqa.collate import IGNORE_INDEX, OverlongSampleError, VQACollator
from surgvqa.data import MediaConfig, Sample, SurgicalVQADataset, load_samples
from surgvqa.prompts import SPOKEN_QUESTION_INSTRUCTION

FRAME = 56
MODALITIES = ("text", "audio", "text+audio")
QUESTIONS = ["Is the scope advancing?", "Which quadrant shows the lesion in this clip?", "Is NBI on?"]
ANSWERS = [
    "Yes, the scope is advancing.",
    "The lesion appears in the upper-left quadrant of the screen.",
    "No.",
]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_model_dir).eval()


def _item(i: int, seconds: float = 1.0, n_frames: int = 8, question=None, answer=None, seed=None) -> dict:
    rng = np.random.default_rng(i if seed is None else seed)
    frames = [rng.integers(0, 256, (FRAME, FRAME, 3), dtype=np.uint8) for _ in range(n_frames)]
    audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    sample = Sample(
        video_id="002-001",
        id=f"qa_{i:06d}",
        question=question or QUESTIONS[i % len(QUESTIONS)],
        answer=answer or ANSWERS[i % len(ANSWERS)],
        source=f"mem:{i}",
    )
    return {"sample": sample, "frames": frames, "audio": audio}


def _items(n: int = 3) -> list[dict]:
    return [_item(i, seconds=1.0 + 0.7 * i) for i in range(n)]


def _id(processor, token: str) -> int:
    return processor.tokenizer.convert_tokens_to_ids(token)


# ------------------------------------------------------------------------------------------- labels, padding
@pytest.mark.parametrize("modality", MODALITIES)
def test_labels_are_exactly_answer_plus_end_of_turn(processor, modality):
    tok = processor.tokenizer
    items = _items(3)
    train = VQACollator(processor, question_modality=modality, frame_size=FRAME)(items)
    prompts = VQACollator(processor, question_modality=modality, frame_size=FRAME, mode="generate")(items)
    assert "labels" not in prompts and prompts["keys"] == [it["sample"].key for it in items]

    lengths = train["attention_mask"].sum(1).tolist()
    prompt_lengths = prompts["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and len(set(prompt_lengths)) == 3  # the batch really needs padding
    width_t, width_g = train["input_ids"].shape[1], prompts["input_ids"].shape[1]
    for i, item in enumerate(items):
        n, p = lengths[i], prompt_lengths[i]
        # train: right padding
        assert train["attention_mask"][i, :n].all() and not train["attention_mask"][i, n:].any()
        assert (train["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (train["labels"][i, n:] == IGNORE_INDEX).all()
        # generate: left padding; its prompt is the train row's prompt, token for token
        assert not prompts["attention_mask"][i, : width_g - p].any() and prompts["attention_mask"][i, width_g - p:].all()
        assert (prompts["input_ids"][i, : width_g - p] == tok.pad_token_id).all()
        assert torch.equal(train["input_ids"][i, :p], prompts["input_ids"][i, width_g - p:])
        tail = tok("<|im_start|>assistant\n")["input_ids"]
        assert prompts["input_ids"][i, -len(tail):].tolist() == tail
        # labels: exactly the positions after the prompt, none masked inside the answer
        labelled = (train["labels"][i] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(p, n))
        assert torch.equal(train["labels"][i, p:n], train["input_ids"][i, p:n])
        assert tok.decode(train["labels"][i, p:n]) == item["sample"].answer + "<|im_end|>"
        assert train["labels"][i, n - 1] == tok.eos_token_id == _id(processor, "<|im_end|>")
    assert width_t == max(lengths) and width_g == max(prompt_lengths)


def test_masking_is_positional_when_the_answer_contains_the_pad_token(processor):
    """Masking by value (labels[input_ids == pad] = -100) would drop these answer tokens; ours keeps them."""
    tok = processor.tokenizer
    pad = tok.pad_token_id
    answers = ["Yes <|endoftext|> the scope is advancing.", "<|endoftext|>"]
    items = [_item(i, answer=a) for i, a in enumerate(answers)]
    train = VQACollator(processor, frame_size=FRAME)(items)
    prompts = VQACollator(processor, frame_size=FRAME, mode="generate")(items)
    for i, answer in enumerate(answers):
        p, n = int(prompts["attention_mask"][i].sum()), int(train["attention_mask"][i].sum())
        span = train["labels"][i, p:n]
        assert (span != IGNORE_INDEX).all()
        assert pad in span.tolist()
        assert tok.decode(span) == answer + "<|im_end|>"
        assert (train["labels"][i, :p] == IGNORE_INDEX).all()


def test_prompt_content_per_question_modality(processor):
    tok = processor.tokenizer
    item = _item(0, seconds=2.0)
    question = item["sample"].question
    decoded = {}
    for modality in MODALITIES:
        batch = VQACollator(processor, question_modality=modality, frame_size=FRAME, mode="generate")([item])
        decoded[modality] = tok.decode(batch["input_ids"][0])
        n_audio = int((batch["input_ids"][0] == _id(processor, "<|AUDIO|>")).sum())
        assert (n_audio > 0) == ("audio" in modality)
        assert ("input_features" in batch) == ("audio" in modality)
        assert int((batch["input_ids"][0] == _id(processor, "<|VIDEO|>")).sum()) == 16
    assert question not in decoded["audio"] and SPOKEN_QUESTION_INSTRUCTION in decoded["audio"]
    assert "<|audio_bos|>" in decoded["audio"]
    assert question in decoded["text+audio"] and "<|audio_bos|>" in decoded["text+audio"]
    assert SPOKEN_QUESTION_INSTRUCTION not in decoded["text+audio"]
    assert question in decoded["text"] and "<|audio_bos|>" not in decoded["text"]


# ----------------------------------------------------------------------------------------------------- audio
class _Whisper30s:
    """The processor called without our audio_kwargs, i.e. every clip padded to Whisper's 30 s window."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, **kwargs):
        kwargs.pop("audio_kwargs", None)
        self.output = self._processor(**kwargs)
        self.features = self.output["input_features"].clone(), self.output["feature_attention_mask"].clone()
        return self.output


def _audio_item(i: int, samples: int) -> dict:
    item = _item(i)
    rng = np.random.default_rng(100 + i)
    return dict(item, audio=(0.1 * rng.standard_normal(samples)).astype(np.float32))


def test_audio_padded_to_longest_clip_and_logits_unchanged(processor, model):
    mode = "train"
    # lengths not multiples of the 160-sample hop: 1.0 s, 2.5 s + 50 samples, 1.7 s + 1 sample
    items = [_audio_item(0, 16000), _audio_item(1, 40050), _audio_item(2, 27201)]
    ours = VQACollator(processor, question_modality="text+audio", frame_size=FRAME, mode=mode)(items)
    assert ours["input_features"].shape == (3, 128, 251)  # ceil(40050 / 160): the longest clip, not 3000
    assert ours["feature_attention_mask"].sum(1).tolist() == [100, 251, 171]

    wrapped = _Whisper30s(processor)
    whisper = VQACollator(wrapped, question_modality="text+audio", frame_size=FRAME, mode=mode)(items)
    features, feature_mask = wrapped.features
    assert features.shape == (3, 128, 3000)
    assert torch.equal(ours["input_ids"], whisper["input_ids"])
    assert torch.equal(ours["feature_attention_mask"], feature_mask[:, :251])
    assert not feature_mask[:, 251:].any()
    assert torch.equal(ours["input_features"], features[..., :251])
    whisper = dict(whisper, input_features=features, feature_attention_mask=feature_mask)
    with torch.no_grad():
        a = model(**{k: v for k, v in ours.items() if k != "keys"}).logits
        b = model(**{k: v for k, v in whisper.items() if k != "keys"}).logits
    real = ours["attention_mask"].bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("samples", [16000, 16370, 16481])
def test_audio_tokens_do_not_depend_on_the_rest_of_the_batch(processor, samples):
    """Alone, a clip is the longest of its batch; next to a 3 s clip it is not: same tokens and features."""
    collator = VQACollator(processor, question_modality="audio", frame_size=FRAME, mode="generate")
    clip, longer = _audio_item(0, samples), _audio_item(1, 48000)
    alone, paired = collator([clip]), collator([clip, longer])
    prompt = alone["input_ids"][0]
    assert torch.equal(paired["input_ids"][0, -prompt.shape[0]:], prompt)
    frames = -(-samples // 160)
    assert alone["input_features"].shape[-1] == frames
    assert torch.equal(alone["input_features"][0], paired["input_features"][0, :, :frames])
    n_audio = int((prompt == _id(processor, "<|AUDIO|>")).sum())
    assert n_audio == processor._get_num_audio_tokens(samples)
    estimate = collator.sequence_length(clip["sample"].question, "", (FRAME, FRAME), 8, samples)
    assert estimate == prompt.shape[0]


def test_audio_follows_the_video_id_and_id_key(processor, test_set, tmp_path):
    """Two videos share the id qa_000001: each sample gets the audio of its own (video_id, id)."""
    source = json.loads((test_set / "in_002-001.jsonl").read_text().splitlines()[0])
    frames_dir, audio_dir = tmp_path / "frames", tmp_path / "audio"
    (frames_dir / "002-999").mkdir(parents=True)
    (audio_dir / "002-999").mkdir(parents=True)
    (audio_dir / "002-001").mkdir(parents=True)
    shutil.copytree(test_set / "frames/002-001", frames_dir / "002-001")
    other = dict(source, video_id="002-999", frames=[f.replace("002-001", "002-999") for f in source["frames"]])
    for name in source["frames"]:
        shutil.copy(test_set / f"frames/002-001/{name}.jpg", frames_dir / f"002-999/{name.replace('002-001', '002-999')}.jpg")
    shutil.copy(test_set / "audio/in_002-001/002-001/qa_000001.wav", audio_dir / "002-001/qa_000001.wav")
    t = np.arange(16000 * 2) / 16000
    sf.write(audio_dir / "002-999/qa_000001.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps(source) + "\n" + json.dumps(other) + "\n")

    media = MediaConfig(frames_dir=str(frames_dir), audio_dir=str(audio_dir), frame_size=FRAME,
                        question_modality="audio")
    samples, problems = load_samples(data, media)
    assert not problems and [s.key for s in samples] == [("002-001", "qa_000001"), ("002-999", "qa_000001")]
    dataset = SurgicalVQADataset(samples, media)
    items = [dataset[0], dataset[1]]
    expected = [sf.read(audio_dir / f"{v}/qa_000001.wav", dtype="float32")[0] for v in ("002-001", "002-999")]
    for item, wav in zip(items, expected, strict=True):
        np.testing.assert_allclose(item["audio"], wav, atol=1e-6)

    batch = VQACollator(processor, question_modality="audio", frame_size=FRAME, mode="generate")(items)
    assert batch["keys"] == [("002-001", "qa_000001"), ("002-999", "qa_000001")]
    lengths = batch["feature_attention_mask"].sum(1).tolist()
    assert lengths == [-(-len(w) // 160) for w in expected]
    features = batch["input_features"]
    assert not torch.allclose(features[0, :, : min(lengths)], features[1, :, : min(lengths)])
    for row, wav in enumerate(expected):
        alone = processor.feature_extractor(wav, sampling_rate=16000, return_tensors="pt")["input_features"][0]
        torch.testing.assert_close(features[row, :, : lengths[row]], alone[:, : lengths[row]])


# ---------------------------------------------------------------------------------------------------- frames
def test_odd_frame_count_repeats_the_last_frame(processor, caplog):
    seven = _item(0, n_frames=7)
    eight = dict(seven, frames=[*seven["frames"], seven["frames"][-1]])
    collator = VQACollator(processor, frame_size=FRAME)
    with caplog.at_level(logging.WARNING, logger="surgvqa.collate"):
        odd = collator([seven])
        collator([seven])
    warnings = [r for r in caplog.records if "repeating the last frame" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per batch
    even = collator([eight])
    assert odd["video_grid_thw"].tolist() == even["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert torch.equal(odd["pixel_values_videos"], even["pixel_values_videos"])
    assert torch.equal(odd["input_ids"], even["input_ids"])


def test_frames_as_images_one_image_group_per_frame(processor, model):
    tok = processor.tokenizer
    items = [_item(0, n_frames=8), _item(1, n_frames=3)]
    batch = VQACollator(processor, frame_size=FRAME, frames_as="images")(items)
    assert "pixel_values_videos" not in batch
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 11
    for row, n in zip(batch["input_ids"], (8, 3), strict=True):
        assert int((row == _id(processor, "<|vision_bos|>")).sum()) == n
        assert int((row == _id(processor, "<|IMAGE|>")).sum()) == 4 * n
        assert int((row == _id(processor, "<|VIDEO|>")).sum()) == 0
        text = tok.decode(row)
        assert text.count("<|vision_bos|>" + "<|IMAGE|>" * 4 + "<|vision_eos|>") == n
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


# ------------------------------------------------------------------------------------------- length, overlong
@pytest.mark.parametrize(
    ("modality", "frames_as", "mode"),
    [("text", "video", "train"), ("audio", "video", "train"), ("text+audio", "images", "train"),
     ("text+audio", "video", "generate")],
)
def test_sequence_length_estimate_matches_collated_length(processor, test_set, modality, frames_as, mode):
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio/in_002-001"),
                        frame_size=FRAME, question_modality=modality)
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:3], media, max_frames=5)  # 5 frames: odd, padded to 6 for video
    collator = VQACollator(processor, question_modality=modality, frame_size=FRAME, frames_as=frames_as, mode=mode)
    for i in range(len(dataset)):
        item = dataset[i]
        real = int(collator([item])["attention_mask"].sum())
        audio = len(item["audio"]) if item["audio"] is not None else None
        estimate = collator.sequence_length(item["sample"].question, item["sample"].answer,
                                            item["frames"][0].shape[:2], len(item["frames"]), audio)
        assert estimate == real, item["sample"].key


def test_sequence_length_non_square_frames(processor):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (42, 70, 3), dtype=np.uint8) for _ in range(4)]
    item = {"sample": Sample(video_id="v", id="q", question="Is it?", answer="Yes."), "frames": frames, "audio": None}
    collator = VQACollator(processor, frame_size=FRAME)
    assert collator.sequence_length("Is it?", "Yes.", (42, 70), 4, None) == int(collator([item])["attention_mask"].sum())


def test_overlong_sample_error_names_the_key(processor, test_set):
    media = MediaConfig(frames_dir=str(test_set / "frames"), frame_size=FRAME)
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:2], media)
    items = [dataset[0], dataset[1]]
    lengths = [int(VQACollator(processor, frame_size=FRAME)([it])["attention_mask"].sum()) for it in items]
    collator = VQACollator(processor, frame_size=FRAME, model_max_length=min(lengths) - 1)
    with pytest.raises(OverlongSampleError) as err:
        collator(items)
    message = str(err.value)
    assert "002-001" in message and samples[0].id in message and "--model_max_length" in message
    assert samples[0].source in message
    batch = VQACollator(processor, frame_size=FRAME, model_max_length=max(lengths))(items)
    assert batch["attention_mask"].sum(1).tolist() == lengths
