"""The ``qwen_vl_whisper`` backbone (Qwen-VL + Whisper encoder + projector) through the unchanged data, training,
evaluation and merge code: a tiny random graft built from real configs, two-stage training on the shipped test_set,
audio token counts, M-RoPE positions, generation parity and the on-disk format."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GREEDY_GAP, TEST_SET, greedy_gaps, load_script

from surgvqa.backbones import LoadOptions, backbone_for, get_backbone

BACKBONE = "qwen_vl_whisper"


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on a shared 2-core machine torch's default (one per core) makes OpenMP spin against the
    other processes, and a tiny-model training step takes seconds instead of tens of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def graft_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL + Whisper-encoder graft (default settings: 30 s encoder window, output trimmed,
    2x pooling), built by scripts/make_tiny_graft.py."""
    out = tmp_path_factory.mktemp("tiny-graft")
    with one_thread():
        return load_script("make_tiny_graft").build_tiny_graft(out, seed=0)


@pytest.fixture(scope="session")
def family_grafts(tmp_path_factory, graft_dir) -> dict[str, Path]:
    """The same tiny graft on each Qwen-VL family (Qwen2-VL: ``graft_dir``)."""
    grafts = {"qwen2_vl": graft_dir}
    with one_thread():
        for vl in ("qwen2_5_vl", "qwen3_vl"):
            grafts[vl] = load_script("make_tiny_graft").build_tiny_graft(tmp_path_factory.mktemp(vl), seed=0, vl=vl)
    return grafts


def _train_args(model: Path, out: Path, data: Path, frames: Path, audio: Path | None, modality: str,
                *extra: str) -> list[str]:
    args = [
        "--model_name_or_path", str(model), "--train_data_path", str(data), "--frames_dir", str(frames),
        "--question_modality", modality, "--frame_size", "56", "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--logging_steps", "10",
        "--use_cpu", "True", "--seed", "0", "--data_seed", "0", "--disable_tqdm", "True",
        "--dataloader_num_workers", "0",
    ]
    if audio is not None:
        args += ["--audio_dir", str(audio)]
    return args + list(extra)


@pytest.fixture(scope="session")
def graft_stages(tmp_path_factory, graft_dir, test_set) -> dict[str, Path]:
    """Stage 1 (projector only) then stage 2 (LoRA + projector, --init_from stage 1) on test_set, spoken and
    written question (text+audio), a few steps each through surgvqa.train.main."""
    from surgvqa.train import main as train_main

    root = tmp_path_factory.mktemp("graft-train")
    common = (graft_dir, test_set / "in_002-001.jsonl", test_set / "frames", test_set / "audio" / "in_002-001",
              "text+audio")
    stage1, stage2 = root / "stage1", root / "stage2"
    with one_thread():
        assert train_main(_train_args(common[0], stage1, *common[1:], "--stage", "1", "--max_steps", "3",
                                      "--learning_rate", "1e-3")) == 0
        assert train_main(_train_args(common[0], stage2, *common[1:], "--stage", "2", "--init_from", str(stage1),
                                      "--max_steps", "3", "--learning_rate", "1e-3")) == 0
    return {"stage1": stage1, "stage2": stage2}


def _batch(processor, modality: str = "text+audio", n: int = 3, mode: str = "generate", ablate: str | None = None):
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    media = MediaConfig(frames_dir=str(TEST_SET / "frames"), audio_dir=str(TEST_SET / "audio" / "in_002-001"),
                        frame_size=56, question_modality=modality, ablate=ablate)
    samples, _ = load_samples(TEST_SET / "in_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:n], media)
    collator = VQACollator(processor, question_modality=modality, frame_size=56, mode=mode)
    return collator([dataset[i] for i in range(n)]), collator, samples[:n]


@pytest.fixture(scope="session")
def loaded_graft(graft_dir):
    from surgvqa.tokenizer import repair_tokenizer

    backbone = get_backbone(BACKBONE)
    model = backbone.load(str(graft_dir), LoadOptions(dtype="float32"))
    processor = backbone.load_processor(str(graft_dir))
    repair_tokenizer(processor.tokenizer, model)
    return model, processor


# ----------------------------------------------------------------------------------------- format, tokens
def test_graft_directory_and_registry(graft_dir, loaded_graft):
    config = json.loads((graft_dir / "config.json").read_text())
    assert config["model_type"] == BACKBONE and backbone_for(graft_dir).name == BACKBONE
    assert config["vl_model_path"] == "vl_model" and config["audio_encoder_path"] == "whisper"  # relative
    assert config["vl_config"]["model_type"] == "qwen2_vl" and config["audio_config"]["num_mel_bins"] == 128
    assert {"projector.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in graft_dir.iterdir()}
    saved = json.loads((graft_dir / "processor_config.json").read_text())  # the library's processor record
    assert saved["processor_class"] == "QwenVLWhisperProcessor" and saved["vl_processor_class"] == "Qwen2VLProcessor"
    assert saved["feature_extractor"]["feature_size"] == 128 and saved["audio_pooling"] == 2
    model, processor = loaded_graft
    tok = processor.tokenizer
    # Qwen-VL names, ids consistent with the VL config; audio tokens added after the VL vocabulary, in its rows
    assert tok.convert_tokens_to_ids("<|video_pad|>") == model.config.vl_config.video_token_id
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.vl_config.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == model.config.vl_config.vision_start_token_id
    ids = [tok.convert_tokens_to_ids(t) for t in ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")]
    assert ids == [config["audio_bos_token_id"], config["audio_token_id"], config["audio_eos_token_id"]]
    assert min(ids) > tok.convert_tokens_to_ids("<|file_sep|>")
    assert max(ids) < model.get_input_embeddings().num_embeddings
    assert "<|VIDEO|>" not in tok.get_vocab()
    # the chat template renders audio and video parts with the right placeholders
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "audio"}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|video_pad|><|vision_end|><|audio_bos|><|AUDIO|><|audio_eos|>q<|im_end|>" in text
    assert tok.chat_template == processor.chat_template  # tokenizer.repair reads the end-of-turn from it
    # the composite: VL model, Whisper encoder, projector - only transformers classes
    assert type(model.vl_model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(model.audio_encoder).__name__ == "WhisperEncoder"
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())


def test_create_reuses_audio_tokens_the_vocabulary_has(graft_dir, tmp_path):
    """A VL tokenizer that already has <|audio_bos|> <|AUDIO|> <|audio_eos|> keeps their ids (no new tokens)."""
    import shutil

    from surgvqa.backbones.qwen_vl_whisper.create import create_graft
    from surgvqa.backbones.qwen_vl_whisper.processing import QwenVLWhisperProcessor

    vl = tmp_path / "vl_with_audio_tokens"
    shutil.copytree(graft_dir / "vl_model", vl)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the graft's tokenizer: audio tokens included
        shutil.copy(graft_dir / name, vl / name)
    before = QwenVLWhisperProcessor.from_pretrained(graft_dir).tokenizer
    out = create_graft(vl, graft_dir / "whisper", tmp_path / "graft")
    after = QwenVLWhisperProcessor.from_pretrained(out).tokenizer
    assert len(after) == len(before)
    for token in ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"):
        assert after.convert_tokens_to_ids(token) == before.convert_tokens_to_ids(token)
    assert json.loads((out / "config.json").read_text())["audio_token_id"] == before.convert_tokens_to_ids("<|AUDIO|>")


def test_create_command(graft_dir, tmp_path, capsys):
    """``python -m surgvqa.backbones.qwen_vl_whisper create`` (= ``….create``'s ``main(argv)``): a graft with the
    settings asked for; a user error is one ``error:`` line and exit status 2."""
    from surgvqa.backbones.qwen_vl_whisper.create import main

    out = tmp_path / "graft"
    assert main(["--vl_model", str(graft_dir / "vl_model"), "--audio_encoder", str(graft_dir / "whisper"),
                 "--output_dir", str(out), "--projector", "mlp", "--audio_window", "trimmed"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["projector_type"], config["audio_window"], config["graft_stage"]) == ("mlp", "trimmed", 0)
    assert Path(config["vl_model_path"]) == (graft_dir / "vl_model").resolve()  # absolute: nothing is copied
    assert "--stage 1" in capsys.readouterr().out
    assert main(["--vl_model", str(graft_dir / "whisper"), "--audio_encoder", str(graft_dir / "whisper"),
                 "--output_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'whisper' is not one of qwen2_vl" in err[0]


def test_vl_quantization_keeps_the_vision_tower_whole():
    config = get_backbone(BACKBONE).vl_quantization_config(LoadOptions(load_in_4bit=True))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert {"model.visual", "lm_head"} <= set(config.llm_int8_skip_modules)  # names inside the VL model
    assert get_backbone(BACKBONE).vl_quantization_config(LoadOptions()) is None


def test_audio_tokens_follow_audio_length(loaded_graft):
    from surgvqa.backbones.qwen_vl_whisper import audio_token_count

    _, processor = loaded_graft
    three_seconds = 3 * 16000
    assert audio_token_count(three_seconds) == 75 <= 100  # was 1,500 in the original graft
    assert audio_token_count(three_seconds, pooling=1) == 150
    assert audio_token_count(three_seconds, trim=False, pooling=1) == 1500
    assert audio_token_count(30 * 16000) == 750 and audio_token_count(40 * 16000) == 750  # Whisper's window
    clips = [np.random.default_rng(0).normal(size=n).astype(np.float32) * 0.1 for n in (three_seconds, 16000)]
    text = ["<|audio_bos|><|AUDIO|><|audio_eos|>a", "<|audio_bos|><|AUDIO|><|audio_eos|>b"]
    encoded = processor(text=text, audio=clips, return_tensors="pt", padding=True,
                        audio_kwargs={"max_length": three_seconds, "truncation": False})
    placeholders = (encoded["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    assert placeholders == [75, 25]
    assert encoded["input_features"].shape == (2, 128, 301)  # the batch's longest clip (+ n_fft / 2), not 30 s
    assert encoded["feature_attention_mask"].sum(-1).tolist() == [300, 100]
    assert "mm_token_type_ids" not in encoded  # built by the model from input_ids (audio = text)
    budget = {"size": {"shortest_edge": 784, "longest_edge": 3136}}
    counts = processor._get_num_multimodal_tokens(audio_lengths=[three_seconds, 16000], video_sizes=[(8, 56, 56)],
                                                  videos_kwargs=budget)
    assert counts.num_audio_tokens == [75, 25] and counts.num_video_tokens == [16]


def test_placeholder_count_matches_audio_features(loaded_graft):
    """For any clip length (alone or padded in a batch): processor placeholders == the model's audio tokens."""
    model, processor = loaded_graft
    rng = np.random.default_rng(0)
    lengths = [1, 159, 160, 161, 24445, 24480, 24481, 24639, 24640, 33810, 47999, 48000, 48161]
    clips = [rng.normal(size=n).astype(np.float32) * 0.1 for n in lengths]
    for batch in ([c] for c in clips):
        encoded = processor(text=["<|AUDIO|>"], audio=batch, return_tensors="pt")
        with torch.no_grad():
            tokens = model.get_audio_features(encoded["input_features"], encoded["feature_attention_mask"])
        assert tokens.shape[0] == int((encoded["input_ids"] == processor.audio_token_id).sum())
        assert tokens.shape[0] == processor.num_audio_tokens(len(batch[0]))
    encoded = processor(text=["<|AUDIO|>"] * len(clips), audio=clips, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = model.get_audio_features(encoded["input_features"], encoded["feature_attention_mask"])
    assert tokens.shape[0] == int((encoded["input_ids"] == processor.audio_token_id).sum()) == sum(
        processor.num_audio_tokens(n) for n in lengths)


def test_collator_sequence_length_matches_batch(loaded_graft):
    _, processor = loaded_graft
    batch, collator, samples = _batch(processor, "text+audio", n=2, mode="train")
    for i, sample in enumerate(samples):
        import soundfile

        n = soundfile.info(str(sample.audio_path)).frames
        predicted = collator.sequence_length(sample.question, sample.answer, (56, 56), 8, n)
        assert predicted == int(batch["attention_mask"][i].sum())


def test_rope_audio_is_text_and_vision_unchanged(loaded_graft):
    """Audio placeholders advance the M-RoPE position like text; vision positions are the VL model's own."""
    model, processor = loaded_graft
    batch, _, _ = _batch(processor, "audio", n=3)
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["video_grid_thw"]
    positions = model.get_position_ids(ids, mask, None, grid)
    audio_id, video_id = model.config.audio_token_id, model.config.vl_config.video_token_id
    for i in range(ids.shape[0]):
        row, pos = ids[i][mask[i].bool()], positions[:, i][:, mask[i].bool()]
        audio = (row == audio_id).nonzero().flatten()
        assert len(audio) > 0 and (pos[:, audio].diff(dim=1) == 1).all() and (pos[0, audio] == pos[1, audio]).all()
        keep = row != audio_id  # the same prompt without its audio: the VL model's own rope index
        short = row[keep][None]
        reference, _ = model.vl_model.model.get_rope_index(
            short, mm_token_type_ids=model.mm_token_type_ids(short), video_grid_thw=grid[i:i + 1])
        reference = reference[:, 0]
        assert torch.equal(pos[:, row == video_id], reference[:, (row == video_id)[keep]])
        assert torch.equal(pos[:, int(audio[-1]) + 1:], reference[:, int(audio[0]):] + len(audio))


def test_generate_from_inputs_embeds_matches_forward(loaded_graft):
    """generate() (inputs_embeds, explicit 3-D positions, left padding) returns only the new tokens, and they are
    what a cache-free argmax loop over forward() picks; logits at the first step agree too."""
    from surgvqa.generate import new_token_ids

    model, processor = loaded_graft
    batch, _, _ = _batch(processor, "text+audio", n=3)
    batch.pop("keys")
    assert (batch["attention_mask"][:, 0] == 0).any()  # some rows are left padded
    out, manual = _generate_and_argmax_loop(model, processor, batch)
    assert out.shape == (3, 5)  # new tokens only
    assert torch.equal(new_token_ids(out, batch["input_ids"]), out)
    assert torch.equal(out, manual)
    assert len(set(out.flatten().tolist())) > 1


def _generate_and_argmax_loop(model, processor, batch, steps: int = 5):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=[10**6],
                             pad_token_id=processor.tokenizer.pad_token_id)
        ids, mask, manual = batch["input_ids"], batch["attention_mask"], []
        for _ in range(steps):
            logits = model(**{**batch, "input_ids": ids, "attention_mask": mask}).logits[:, -1]
            manual.append(logits.argmax(-1, keepdim=True))
            ids = torch.cat([ids, manual[-1]], 1)
            mask = torch.cat([mask, torch.ones_like(manual[-1])], 1)
    return out, torch.cat(manual, 1)


@pytest.mark.parametrize("vl", ["qwen2_5_vl", "qwen3_vl"])
def test_other_qwen_vl_families(vl, family_grafts):
    """Qwen2.5-VL (second_per_grid_ts from the frame rate) and Qwen3-VL (frame timestamps, deepstack: the VL model
    splices vision itself) under the same graft: training loss and gradients, generate parity, length check."""
    import soundfile
    from peft import LoraConfig

    from surgvqa.tokenizer import repair_tokenizer

    graft = family_grafts[vl]
    backbone = get_backbone(BACKBONE)
    model = backbone.load(str(graft), LoadOptions(dtype="float32"))
    processor = backbone.load_processor(str(graft))
    repair_tokenizer(processor.tokenizer, model)
    assert model.vl_type == vl
    batch, collator, samples = _batch(processor, "text+audio", n=3, mode="train")
    if vl == "qwen2_5_vl":
        assert torch.allclose(batch["second_per_grid_ts"], torch.ones(3))  # 2 frames per grid at 2 fps
    else:
        assert "<1.2 seconds>" in processor.tokenizer.decode(batch["input_ids"][0])
    n = soundfile.info(str(samples[0].audio_path)).frames
    assert collator.sequence_length(samples[0].question, samples[0].answer, (56, 56), 8, n) == int(
        batch["attention_mask"][0].sum())
    peft_model = backbone.make_trainable(model, LoraConfig(target_modules=backbone.lora_target_regex,
                                                           task_type="CAUSAL_LM"), stage=2)
    peft_model(**batch).loss.backward()
    grads = {name for name, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_" in g for g in grads) and any("audio_projector" in g for g in grads)
    generate_batch, _, _ = _batch(processor, "text+audio", n=3)
    generate_batch.pop("keys")
    out, manual = _generate_and_argmax_loop(model, processor, generate_batch, steps=3)
    assert torch.equal(out, manual)


@pytest.mark.parametrize("vl", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_preflight_counts_tokens_at_the_collators_frame_rate(vl, family_grafts, test_set):
    """The length pre-flight (train.py's overlong check) predicts the collated length at the collator's --fps: Qwen3-VL
    writes a timestamp per frame pair into the prompt, so 24 frames take more tokens at 1 fps (stamps up to 22.5 s)
    than at 4 fps (up to 5.6 s)."""
    import soundfile

    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, load_samples

    processor = get_backbone(BACKBONE).load_processor(str(family_grafts[vl]))
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "in_002-001"),
                        frame_size=56, question_modality="text+audio")
    sample = load_samples(test_set / "in_002-001.jsonl", media)[0][0]
    audio, _ = soundfile.read(str(sample.audio_path), dtype="float32")
    frames = list(np.random.default_rng(0).integers(0, 256, size=(24, 56, 56, 3), dtype=np.uint8))
    lengths = {}
    for fps in (1.0, 2.0, 4.0):
        for mode in ("train", "generate"):
            collator = VQACollator(processor, question_modality="text+audio", frame_size=56, mode=mode, fps=fps)
            batch = collator([{"sample": sample, "frames": frames, "audio": audio}])
            lengths[fps, mode] = int(batch["attention_mask"].sum())
            assert collator.sequence_length(sample.question, sample.answer, (56, 56), 24, len(audio)) == lengths[
                fps, mode], (fps, mode)
    if vl == "qwen3_vl":
        assert lengths[1.0, "train"] > lengths[2.0, "train"] > lengths[4.0, "train"]
    else:
        assert len({lengths[fps, "train"] for fps in (1.0, 2.0, 4.0)}) == 1


def test_preflight_counts_qwen3_vl_timestamps_at_the_clips_own_clock(family_grafts, test_set):
    """With --video_fps, a clip's clock comes from its frame_numbers: Qwen3-VL's timestamps (written by its
    processor) then run to 70 s instead of 3.5 s, and the pre-flight, given the kept frames' times, counts them
    as the processor writes them."""
    from surgvqa.collate import VQACollator, frame_times
    from surgvqa.data import MediaConfig, load_samples

    processor = get_backbone(BACKBONE).load_processor(str(family_grafts["qwen3_vl"]))
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "in_002-001"),
                        frame_size=56, question_modality="text")
    sample = load_samples(test_set / "in_002-001.jsonl", media)[0][0]
    frames = list(np.random.default_rng(0).integers(0, 256, size=(8, 56, 56, 3), dtype=np.uint8))
    item = {"sample": sample, "frames": frames, "audio": None, "frame_numbers": [300 * i for i in range(8)]}
    collator = VQACollator(processor, question_modality="text", frame_size=56, mode="train", video_fps=30.0)
    collated = int(collator([item])["attention_mask"].sum())
    times = frame_times(item, collator.fps, collator.video_fps)
    assert times[-1] == 70.0
    assert collator.sequence_length(sample.question, sample.answer, (56, 56), 8, None, times) == collated
    assert collator.sequence_length(sample.question, sample.answer, (56, 56), 8, None) < collated  # "<3.0 seconds>"


def test_preflight_frame_rate_for_omni(tiny_model_dir, test_set):
    """The same pre-flight call on Qwen2.5-Omni (the frame rate sets positions there, not the token count)."""
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    processor = get_backbone("qwen2_5_omni").load_processor(str(tiny_model_dir))
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "in_002-001"),
                        frame_size=56, question_modality="text+audio")
    samples, _ = load_samples(test_set / "in_002-001.jsonl", media)
    item = SurgicalVQADataset(samples[:1], media)[0]
    for fps in (1.0, 2.0, 4.0):
        collator = VQACollator(processor, question_modality="text+audio", frame_size=56, mode="train", fps=fps)
        predicted = collator.sequence_length(samples[0].question, samples[0].answer, (56, 56), len(item["frames"]),
                                             len(item["audio"]))
        assert predicted == int(collator([item])["attention_mask"].sum()), fps


@pytest.mark.parametrize("window", ["full", "trimmed"])
def test_audio_tokens_do_not_depend_on_the_batch(loaded_graft, window):
    """A clip's audio tokens alone equal its tokens batched with a clip three times longer (padded to it), in both
    encoder windows; without the per-clip lengths (the batch's padding treated as audio) they would not."""
    import soundfile as sf

    from surgvqa.backbones.qwen_vl_whisper.audio import encode_trimmed, fit_window

    model, processor = loaded_graft
    speech, _ = sf.read(TEST_SET / "audio" / "in_002-001" / "002-001" / "qa_000001.wav", dtype="float32")
    speech = speech + np.random.default_rng(0).normal(size=len(speech)).astype(np.float32) * 0.01  # room noise
    longer = np.tile(speech, 3)
    before = model.config.audio_window
    model.config.audio_window = window
    try:
        alone = processor(text=["<|AUDIO|>"], audio=[speech], return_tensors="pt")
        batched = processor(text=["<|AUDIO|>"] * 2, audio=[speech, longer], return_tensors="pt", padding=True)
        assert batched["input_features"].shape[-1] > 2.5 * alone["input_features"].shape[-1]
        with torch.no_grad():
            tokens = model.get_audio_features(alone["input_features"], alone["feature_attention_mask"])
            together = model.get_audio_features(batched["input_features"], batched["feature_attention_mask"])
        n = processor.num_audio_tokens(len(speech))
        assert tokens.shape[0] == n and together.shape[0] == n + processor.num_audio_tokens(len(longer))
        torch.testing.assert_close(together[:n], tokens, rtol=1e-5, atol=1e-5)
        # the same batch encoded as one block (padding seen as audio) moves the short clip's encoder states
        features, encoder = batched["input_features"], model.audio_encoder
        with torch.no_grad():
            if window == "full":
                blind = encoder(fit_window(features, 3000)).last_hidden_state
                own = encoder(fit_window(features, 3000, batched["feature_attention_mask"].sum(-1))).last_hidden_state
            else:
                blind = encode_trimmed(encoder, features)
                own = encode_trimmed(encoder, features, batched["feature_attention_mask"].sum(-1))
        assert (blind[0] - own[0]).abs().max() > 1e-3
    finally:
        model.config.audio_window = before


def test_frames_as_images(loaded_graft):
    """--frames_as images: every frame an image placeholder, spliced from the VL model's image features."""
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples

    model, processor = loaded_graft
    media = MediaConfig(frames_dir=str(TEST_SET / "frames"), audio_dir=str(TEST_SET / "audio" / "in_002-001"),
                        frame_size=56, question_modality="audio", max_frames=4)
    samples, _ = load_samples(TEST_SET / "in_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:2], media)
    collator = VQACollator(processor, question_modality="audio", frame_size=56, frames_as="images", mode="train")
    batch = collator([dataset[0], dataset[1]])
    assert "pixel_values" in batch and batch["image_grid_thw"].shape[0] == 8
    image_tokens = int((batch["input_ids"] == model.config.vl_config.image_token_id).sum())
    assert image_tokens == 8 * 4  # 56 px frames: 2 x 2 merged patches each
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_audio_changes_the_answer_logits(loaded_graft):
    model, processor = loaded_graft
    batch, _, _ = _batch(processor, "audio", n=2)
    silent, _, _ = _batch(processor, "audio", n=2, ablate="audio")
    batch.pop("keys"), silent.pop("keys")
    assert torch.equal(batch["input_ids"], silent["input_ids"])  # same length: same placeholders
    with torch.no_grad():
        a, b = model(**batch).logits[:, -1], model(**silent).logits[:, -1]
    assert not torch.allclose(a, b)


def test_whisper_window_rebuilt_exactly(loaded_graft):
    """The processor computes log-mels for the batch's clips only; the model pads them to Whisper's 30 s window
    with what zero-padded audio gives (the clip's max - 8 in log10, floored at 1e-10): identical to features
    computed on 30 s of audio, except the two frames straddling the end of the clip."""
    import soundfile as sf

    from surgvqa.backbones.qwen_vl_whisper.audio import fit_window

    _, processor = loaded_graft
    speech, _ = sf.read(TEST_SET / "audio" / "in_002-001" / "002-001" / "qa_000001.wav", dtype="float32")
    noise = np.random.default_rng(0).normal(size=40000).astype(np.float32) * 0.2
    for clips in ([speech], [speech, noise], [np.zeros(30000, np.float32)]):  # silence: the --ablate audio input
        ours = processor.audio_features(clips)
        reference = processor.feature_extractor(clips, sampling_rate=16000, padding="max_length",
                                                max_length=480000, return_tensors="pt")["input_features"]
        fitted = fit_window(ours["input_features"], 3000)
        assert fitted.shape == reference.shape
        for i, n in enumerate(ours["feature_attention_mask"].sum(-1).tolist()):
            assert torch.equal(fitted[i, :, :n], reference[i, :, :n])
            assert torch.equal(fitted[i, :, n + 2:], reference[i, :, n + 2:])


def test_trimmed_encoder_window_and_untrimmed_variant(graft_dir, tmp_path):
    """audio_window='trimmed' cuts the encoder input too; trim_audio=False is the original 1,500-token graft."""
    from surgvqa.backbones.qwen_vl_whisper.modeling import load_graft
    from surgvqa.backbones.qwen_vl_whisper.processing import QwenVLWhisperProcessor

    model = load_graft(graft_dir, dtype=torch.float32)
    processor = QwenVLWhisperProcessor.from_pretrained(graft_dir)
    clip = [np.random.default_rng(1).normal(size=48000).astype(np.float32) * 0.1]
    text = ["<|audio_bos|><|AUDIO|><|audio_eos|>"]
    full = processor(text=text, audio=clip, return_tensors="pt")
    tokens_full = model.get_audio_features(full["input_features"], full["feature_attention_mask"])
    assert full["input_features"].shape[-1] == 301
    model.config.audio_window = "trimmed"  # the encoder sees 3 s instead of 30 s: same token count, other values
    tokens_short = model.get_audio_features(full["input_features"], full["feature_attention_mask"])
    assert tokens_full.shape == tokens_short.shape == (75, model.config.vl_config.text_config.hidden_size)
    assert not torch.allclose(tokens_full, tokens_short)
    model.config.audio_window = "full"
    processor.trim_audio = model.config.trim_audio = False
    processor.audio_pooling = model.config.audio_pooling = 1
    untrimmed = processor(text=text, audio=clip, return_tensors="pt")
    assert int((untrimmed["input_ids"] == processor.audio_token_id).sum()) == 1500
    tokens = model.get_audio_features(untrimmed["input_features"], untrimmed["feature_attention_mask"])
    assert tokens.shape[0] == 1500


# --------------------------------------------------------------------------------------- two-stage training
def test_stage1_writes_only_the_projector(graft_stages, graft_dir):
    stage1 = graft_stages["stage1"]
    files = {p.name for p in stage1.iterdir()}
    assert {"config.json", "projector.safetensors", "processor_config.json", "surgvqa_config.json"} <= files
    assert not any(n.endswith("model.safetensors") or n.startswith("adapter_") for n in files)
    assert not (stage1 / "vl_model").exists() and not (stage1 / "audio_encoder").exists()
    assert sum(p.stat().st_size for p in stage1.glob("*.safetensors")) < 100_000  # the projector only
    config = json.loads((stage1 / "config.json").read_text())
    assert config["model_type"] == BACKBONE and config["graft_stage"] == 1
    assert Path(config["vl_model_path"]) == (graft_dir / "vl_model").resolve()  # absolute: the dir moved
    record = json.loads((stage1 / "surgvqa_config.json").read_text())
    assert record["backbone"] == BACKBONE and record["graft"]["stage"] == 1
    assert Path(record["graft"]["audio_encoder"]) == (graft_dir / "whisper").resolve()
    # the projector moved; nothing else did
    from safetensors.torch import load_file

    before = load_file(str(graft_dir / "projector.safetensors"))
    after = load_file(str(stage1 / "projector.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_stage1_resumes_from_a_checkpoint(graft_dir, test_set, tmp_path):
    """A stage-1 checkpoint holds only the projector (plus an index naming it), and Trainer resumes from it: the
    resumed run ends with the projector of the uninterrupted one."""
    from safetensors.torch import load_file

    from surgvqa.train import main as train_main

    data = (test_set / "in_002-001.jsonl", test_set / "frames", test_set / "audio" / "in_002-001", "audio")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--stage", "1", "--max_steps", "2", "--learning_rate", "1e-2")
    assert train_main(_train_args(graft_dir, straight, *data, *common, "--save_strategy", "steps",
                                  "--save_steps", "1")) == 0
    checkpoint = straight / "checkpoint-1"
    assert (checkpoint / "projector.safetensors").is_file()
    assert (checkpoint / "model.safetensors.index.json").is_file()
    assert not (checkpoint / "vl_model").exists() and not (checkpoint / "model.safetensors").exists()
    assert train_main(_train_args(graft_dir, resumed, *data, *common, "--resume_from_checkpoint",
                                  str(checkpoint))) == 0
    a, b = load_file(str(straight / "projector.safetensors")), load_file(str(resumed / "projector.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    first = load_file(str(checkpoint / "projector.safetensors"))
    assert any(not torch.equal(first[k], a[k]) for k in a)


def test_stage2_adapter_projector_and_lineage(graft_stages):
    from safetensors.torch import load_file

    stage1, stage2 = graft_stages["stage1"], graft_stages["stage2"]
    adapter = json.loads((stage2 / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["audio_projector"]
    assert adapter["target_modules"].startswith(r"vl_model\.model\.language_model")
    weights = load_file(str(stage2 / "adapter_model.safetensors"))
    assert any("audio_projector" in k for k in weights) and any("lora_A" in k for k in weights)
    assert not any("visual" in k or "audio_encoder" in k for k in weights)
    assert (stage2 / "projector.safetensors").is_file()
    record = json.loads((stage2 / "surgvqa_config.json").read_text())
    assert Path(record["base_model"]) == stage1.resolve()  # stage 2's base is the stage-1 directory
    assert record["graft"]["stage"] == 2 and Path(record["graft"]["init_from"]) == stage1.resolve()
    assert record["lora"]["stage"] == 2


def test_stage_arguments_are_checked(graft_dir, tmp_path):
    from peft import LoraConfig

    backbone = get_backbone(BACKBONE)
    model = backbone.load(str(graft_dir), LoadOptions(dtype="float32"))
    with pytest.raises(ValueError, match="--stage must be 1"):
        backbone.make_trainable(model, LoraConfig(target_modules=backbone.lora_target_regex), stage=3)
    with pytest.raises(ValueError, match="not a qwen_vl_whisper graft"):
        backbone.make_trainable(model, LoraConfig(target_modules=backbone.lora_target_regex), stage=2,
                                init_from=str(tmp_path))
    other = json.loads((graft_dir / "config.json").read_text())
    other["vl_model_path"] = str(graft_dir / "whisper")  # some other model
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="its vl_model_path is"):
        backbone.make_trainable(model, LoraConfig(target_modules=backbone.lora_target_regex), stage=2,
                                init_from=str(tmp_path))
    with pytest.raises(ValueError, match="trains in one stage"):
        get_backbone("qwen2_5_omni").make_trainable(model, None, stage=1)


def test_evaluate_and_merge_flow(graft_stages, tmp_path, test_set, capsys):
    """evaluate_checkpoint on stage 1 (a plain graft dir) and stage 2 (an adapter on it); merge_stage2_to_bf16
    turns stage 2 into one self-contained directory that loads without PEFT and answers the same."""
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.merge import main as merge_main

    stage1, stage2 = graft_stages["stage1"], graft_stages["stage2"]
    eval_args = ["--eval_data_path", str(test_set / "out_002-001.jsonl"), "--frames_dir", str(test_set / "frames"),
                 "--audio_dir", str(test_set / "audio" / "out_002-001"), "--limit", "4", "--batch_size", "4",
                 "--max_new_tokens", "6", "--device", "cpu"]
    for checkpoint, stage in ((stage1, "stage 1 (projector aligned)"), (stage2, "stage 1 (projector aligned); ")):
        out = tmp_path / f"{checkpoint.name}.jsonl"
        assert evaluate_main(["--checkpoint_path", str(checkpoint), "--output_file", str(out), *eval_args]) == 0
        summary = json.loads(out.with_suffix(".summary.json").read_text())
        assert summary["n"] == 4 and summary["question_modality"] == "text+audio"
        printed = capsys.readouterr().out
        assert f"model: {BACKBONE}: qwen2_vl (vl_model) + Whisper encoder" in printed and stage in printed
    assert "+ LoRA adapter (unmerged)" in printed

    merged = tmp_path / "merged"
    assert merge_main(["--base_model_path", str(stage1), "--adapter_path", str(stage2),
                       "--output_dir", str(merged), "--dtype", "float32", "--device", "cpu", "--verify", "4",
                       "--verify_max_new_tokens", "6",
                       "--verify_data_path", str(test_set / "in_002-001.jsonl"),
                       "--verify_frames_dir", str(test_set / "frames"),
                       "--verify_audio_dir", str(test_set / "audio" / "in_002-001")]) == 0
    assert (merged / "vl_model" / "model.safetensors").is_file() and (merged / "audio_encoder").is_dir()
    config = json.loads((merged / "config.json").read_text())
    assert config["vl_model_path"] == "vl_model" and config["audio_encoder_path"] == "audio_encoder"
    # the merged graft says what it is: stage 2, which adapter was merged into which graft
    assert config["graft_stage"] == 2 and json.loads((stage1 / "config.json").read_text())["graft_stage"] == 1
    assert config["merged_adapters"] == [str(stage2.resolve())] and config["merged_base"] == str(stage1.resolve())
    assert json.loads((merged / "merge_verification.json").read_text())["passed"]

    adapter_model, processor, _, _ = load_for_inference(stage2)
    merged_model, merged_processor, merged_backbone, _ = load_for_inference(merged)
    assert merged_backbone.name == BACKBONE and not hasattr(merged_model, "peft_config")
    description = get_backbone(BACKBONE).describe(merged_model)
    assert f"stage 2 (LoRA merged into the LLM): {stage2.resolve()} merged into {stage1.resolve()}" in description
    batch, _, _ = _batch(processor, "text+audio", n=2, mode="train")
    batch.pop("labels")
    with torch.no_grad():
        a, b = adapter_model(**batch).logits, merged_model(**batch).logits
    assert torch.allclose(a, b, atol=1e-4)
    # the merged VL model is a plain transformers checkpoint
    import transformers

    vl = transformers.Qwen2VLForConditionalGeneration.from_pretrained(merged / "vl_model")
    assert torch.equal(vl.lm_head.weight, merged_model.vl_model.lm_head.weight)


@pytest.mark.parametrize("window", ["full", "trimmed"])
def test_greedy_answers_do_not_depend_on_the_eval_batch_size(graft_stages, test_set, window):
    """The trained stage-2 graft (adapter on stage 1) answers 8 spoken+written questions (clips of 1.9-2.6 s)
    identically at --batch_size 1 and 4, in both encoder windows; the last prompt position's logits agree too."""
    from surgvqa.checkpoint import load_for_inference
    from surgvqa.collate import VQACollator
    from surgvqa.data import MediaConfig, SurgicalVQADataset, load_samples
    from surgvqa.generate import generate_predictions

    model, processor, _, _ = load_for_inference(graft_stages["stage2"], options=LoadOptions(dtype="float32"))
    graft = model.get_base_model()
    graft.config.audio_window = window
    media = MediaConfig(frames_dir=str(test_set / "frames"), audio_dir=str(test_set / "audio" / "out_002-001"),
                        frame_size=56, question_modality="text+audio")
    samples, _ = load_samples(test_set / "out_002-001.jsonl", media)
    dataset = SurgicalVQADataset(samples[:8], media)
    collator = VQACollator(processor, question_modality="text+audio", frame_size=56, mode="generate")
    answers, last_logits = {}, {}
    for size in (1, 4):
        predictions = generate_predictions(model, processor.tokenizer, dataset, collator, batch_size=size,
                                           max_new_tokens=6)
        answers[size] = [(p.key, p.text, p.stopped_by_eos, p.new_tokens) for p in predictions]
        rows = []
        for start in range(0, len(dataset), size):
            batch = collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            batch.pop("keys")
            with torch.no_grad():
                rows.append(model(**batch).logits[:, -1])
        last_logits[size] = torch.cat(rows)
    # no greedy step is a near tie, so the equality below cannot depend on the CPU's rounding
    gaps = greedy_gaps(model, processor.tokenizer, [dataset[i] for i in range(len(dataset))], collator, 6)
    assert min(gaps) >= GREEDY_GAP, gaps
    assert answers[1] == answers[4]
    assert len({text for _, text, _, _ in answers[1]}) > 1  # not one constant answer
    torch.testing.assert_close(last_logits[4], last_logits[1], rtol=1e-4, atol=1e-4)


def test_save_pretrained_round_trip(loaded_graft, tmp_path):
    from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration

    model, processor = loaded_graft
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again = QwenVLWhisperForConditionalGeneration.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert get_backbone(BACKBONE).load_processor(str(tmp_path / "copy")).num_audio_tokens(48000) == 75


# ------------------------------------------------------------------------------------- spoken-question task
TOPICS = {  # the answer depends only on which question is spoken
    "Is the scope pulling back?": "scope", "Is the scope moving forward?": "scope",
    "Is the scope advancing or withdrawing?": "scope", "Is the scope moving in this clip?": "scope",
    "Is narrow band imaging switched on?": "view", "Is the view blocked by debris?": "view",
    "Is a catheter visible?": "view", "Which quadrant shows the lesion?": "lesion",
    "Which way does the lesion move?": "lesion",
}


def spoken_topic_data(root: Path, eval_clips: int = 12) -> dict[str, Path]:
    """Train on test_set (17 clips, 50 questions); evaluate on fresh clips of another video asking the same 9
    spoken questions. Question type ``spoken_topic``; the answer names the question's topic (scope / view /
    lesion), so the frames say nothing (each clip is asked questions of different topics) and only hearing the
    question beats the majority. Every clip is padded to the same length so the audio-token count carries no
    hint."""
    import soundfile as sf

    synth = load_script("make_synthetic_dataset")
    synth.make_dataset(root / "eval_clips", num_clips=eval_clips, seed=7, video_ids=("002-007",), audio=False,
                       progress=False)
    shipped = {}
    for line in (TEST_SET / "in_002-001.jsonl").read_text().splitlines():
        row = json.loads(line)
        wav = TEST_SET / "audio" / "in_002-001" / row["video_id"] / f"{row['id']}.wav"
        audio, _ = sf.read(wav, dtype="float32")
        shipped[row["question"]] = audio
    length = 16000 * math.ceil(max(len(a) for a in shipped.values()) / 16000)
    out = {}
    sources = (("train", TEST_SET / "in_002-001.jsonl"), ("eval", root / "eval_clips" / "in_template.jsonl"))
    for split, source in sources:
        lines = []
        for line in source.read_text().splitlines():
            row = json.loads(line)
            topic = TOPICS[row["question"]]
            row.update(question_type="spoken_topic", short_answer=topic, answer=f"{topic.capitalize()}.")
            wav = root / "audio" / split / row["video_id"] / f"{row['id']}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            sf.write(wav, np.pad(shipped[row["question"]], (0, length - len(shipped[row["question"]]))), 16000)
            lines.append(json.dumps(row))
        out[split] = root / f"{split}.jsonl"
        out[split].write_text("\n".join(lines) + "\n")
    out["train_frames"], out["eval_frames"] = TEST_SET / "frames", root / "eval_clips" / "frames"
    out["train_audio"], out["eval_audio"] = root / "audio" / "train", root / "audio" / "eval"
    return out


def test_spoken_question_beats_majority_and_needs_the_audio(tmp_path_factory, graft_dir):
    """Audio-only questions (question_modality audio) whose answer depends only on which question is spoken: after
    stage 1 (10 steps) and stage 2 (100 steps) the tiny graft (default settings: Whisper's 30 s window, output
    trimmed, 2x pooling) beats the majority baseline on clips it never saw, and with the audio silenced
    (--ablate audio) it falls back to (or below) the majority. ~30 s on 2 busy cores with one torch thread."""
    from surgvqa.evaluate import main as evaluate_main
    from surgvqa.train import main as train_main

    root = tmp_path_factory.mktemp("spoken-topic")
    graft = graft_dir
    data = spoken_topic_data(root / "data")
    train = (data["train"], data["train_frames"], data["train_audio"], "audio")
    stage1, stage2 = root / "stage1", root / "stage2"
    assert train_main(_train_args(graft, stage1, *train, "--stage", "1", "--max_steps", "10",
                                  "--learning_rate", "1e-2", "--lr_scheduler_type", "constant")) == 0
    assert train_main(_train_args(graft, stage2, *train, "--stage", "2", "--init_from", str(stage1),
                                  "--max_steps", "100", "--learning_rate", "5e-3")) == 0

    summaries = {}
    for ablate in (None, "audio"):
        out = root / f"eval-{ablate or 'none'}.jsonl"
        args = ["--checkpoint_path", str(stage2), "--eval_data_path", str(data["eval"]),
                "--frames_dir", str(data["eval_frames"]), "--audio_dir", str(data["eval_audio"]),
                "--output_file", str(out), "--batch_size", "12", "--max_new_tokens", "6", "--device", "cpu"]
        if ablate:
            args += ["--ablate", ablate, "--compare", str(root / "eval-none.jsonl")]
        assert evaluate_main(args) == 0
        summaries[ablate] = json.loads(out.with_suffix(".summary.json").read_text())
    heard, silenced = summaries[None], summaries["audio"]
    majority = heard["majority_baseline"]
    assert 0.4 <= majority <= 0.6 and silenced["majority_baseline"] == majority
    assert heard["accuracy_ci95"][0] > majority, heard["accuracy"]  # the 95 % interval clears the baseline
    assert heard["accuracy"] >= majority + 0.2
    assert silenced["accuracy"] <= majority + 0.05  # without the question, no better than the majority


def test_surgvqa_plan_plans_a_graft_from_its_directory(graft_dir, capsys):
    """`surgvqa plan --model GRAFT` builds the graft's config and meta model from the package's own classes: its
    parameter count equals the loaded graft's, and the table prints (no traceback)."""
    from surgvqa.backbones.qwen_vl_whisper.modeling import QwenVLWhisperForConditionalGeneration
    from surgvqa.plan import main

    assert main(["--model", str(graft_dir), "--question_modality", "text+audio", "--frame_size", "56",
                 "--json", "True"]) == 0
    plan = json.loads(capsys.readouterr().out)
    loaded = QwenVLWhisperForConditionalGeneration.from_pretrained(str(graft_dir))
    assert plan["model"]["params"] == sum(p.numel() for p in loaded.parameters())
