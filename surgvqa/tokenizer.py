"""Pad/EOS repair and the pre-flight check behind ``verify_tokenizer.sh``.

With PAD == EOS a model never sees the end-of-turn token as a target distinct from padding, and generation loops.
Repair order: keep a pad that is set and differs from eos; else reuse an existing special token the chat template
never emits (Qwen: ``<|endoftext|>`` while eos is ``<|im_end|>``), so no embedding changes; only if none exists add
``<|pad|>`` (and grow the embeddings only if the new id does not fit the existing rows).

    python -m surgvqa.tokenizer verify MODEL_OR_CHECKPOINT     # exit 0 when safe, 1 with the repair it would apply,
                                                               # 2 when no tokenizer can be loaded from there
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgvqa.errors import ArgumentParser, UserError, existing_dir, run_main

logger = logging.getLogger(__name__)

NEW_PAD_TOKEN = "<|pad|>"
_MARKER = "SURGVQA_ANSWER_MARKER"
#: media placeholders are never valid pads even though templates emit them only with media
_MEDIA_HINTS = ("AUDIO", "IMAGE", "VIDEO", "audio", "vision", "image", "video")


@dataclass
class TokenizerReport:
    pad_token: str | None
    pad_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    end_of_turn_token: str | None
    end_of_turn_id: int | None
    problems: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    added_pad: bool = False
    resized_embeddings_to: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def format(self) -> str:
        lines = [
            f"pad token:         {self.pad_token!r} (id {self.pad_token_id})",
            f"eos token:         {self.eos_token!r} (id {self.eos_token_id})",
            f"end-of-turn token: {self.end_of_turn_token!r} (id {self.end_of_turn_id})",
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems]
        lines += [f"repair: {a}" for a in self.actions]
        lines.append("OK" if self.ok else "NOT OK")
        return "\n".join(lines)


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant answer (``<|im_end|>`` for Qwen)."""
    if tokenizer.chat_template is None:
        return None
    text = _render(
        tokenizer,
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARKER}],
    )
    tail = text.split(_MARKER, 1)[-1]
    for token in sorted(tokenizer.all_special_tokens, key=len, reverse=True):
        if tail.startswith(token):
            return token
    return None


def template_tokens(tokenizer) -> set[str]:
    """Special tokens the chat template emits for a full conversation with every media type."""
    if tokenizer.chat_template is None:
        return set()
    content = [{"type": "video"}, {"type": "image"}, {"type": "audio"}, {"type": "text", "text": "q"}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
    ]
    try:
        text = _render(tokenizer, messages, add_generation_prompt=True)
    except Exception:  # a text-only template
        text = _render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    return {t for t in tokenizer.all_special_tokens if t in text}


def spare_special_token(tokenizer) -> str | None:
    """An existing special token the template never emits and that is no media placeholder."""
    emitted = template_tokens(tokenizer)
    eos = tokenizer.eos_token
    candidates = [t for t in tokenizer.all_special_tokens if t not in emitted and t != eos]
    candidates = [t for t in candidates if not any(h in t for h in _MEDIA_HINTS)]
    for preferred in ("<|endoftext|>", "<|fim_pad|>", "<pad>", "[PAD]"):
        if preferred in candidates:
            return preferred
    return candidates[0] if candidates else None


def inspect_tokenizer(tokenizer) -> TokenizerReport:
    eot = end_of_turn_token(tokenizer)
    report = TokenizerReport(
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        end_of_turn_token=eot,
        end_of_turn_id=tokenizer.convert_tokens_to_ids(eot) if eot else None,
    )
    if tokenizer.pad_token_id is None:
        report.problems.append("pad token is not set")
    elif tokenizer.pad_token_id == tokenizer.eos_token_id:
        report.problems.append("pad token == eos token: answers would not learn to stop and generation loops")
    if eot is None:
        report.problems.append("the chat template has no end-of-turn special token")
    elif tokenizer.eos_token != eot:
        report.problems.append(f"eos token {tokenizer.eos_token!r} is not the template's end-of-turn token {eot!r}")
    return report


def plan_repair(tokenizer) -> list[str]:
    report = inspect_tokenizer(tokenizer)
    actions = []
    if report.end_of_turn_token and tokenizer.eos_token != report.end_of_turn_token:
        actions.append(f"set eos to {report.end_of_turn_token!r}")
    eos = report.end_of_turn_token or tokenizer.eos_token
    if tokenizer.pad_token_id is None or tokenizer.pad_token == eos:
        spare = spare_special_token(tokenizer)
        if spare and spare != eos:
            actions.append(f"set pad to the existing unused special token {spare!r} (no embedding change)")
        else:
            actions.append(f"add {NEW_PAD_TOKEN!r} as pad (resize embeddings only if its id exceeds the rows)")
    return actions


def repair_tokenizer(tokenizer, model: Any | None = None) -> TokenizerReport:
    """Fix eos/pad in place (and the model's embeddings and generation config when given). Logs what it did."""
    report = inspect_tokenizer(tokenizer)
    eot = report.end_of_turn_token
    if eot and tokenizer.eos_token != eot:
        tokenizer.eos_token = eot
        report.actions.append(f"set eos to {eot!r}")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = spare_special_token(tokenizer)
        if spare is not None and spare != tokenizer.eos_token:
            tokenizer.pad_token = spare
            report.actions.append(f"set pad to existing special token {spare!r} (id {tokenizer.pad_token_id})")
        else:
            tokenizer.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
            report.added_pad = True
            report.actions.append(f"added {NEW_PAD_TOKEN!r} as pad (id {tokenizer.pad_token_id})")
    if model is not None:
        embeddings = model.get_input_embeddings()
        if len(tokenizer) > embeddings.num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
            report.resized_embeddings_to = len(tokenizer)
            report.actions.append(f"resized embeddings to {len(tokenizer)} rows (saved with the adapter)")
        sync_generation_config(model, tokenizer)
    for action in report.actions:
        logger.warning("tokenizer repair: %s", action)
    if not report.actions:
        logger.info("tokenizer OK: pad %r, eos %r", tokenizer.pad_token, tokenizer.eos_token)
    report.pad_token, report.pad_token_id = tokenizer.pad_token, tokenizer.pad_token_id
    report.eos_token, report.eos_token_id = tokenizer.eos_token, tokenizer.eos_token_id
    report.problems = inspect_tokenizer(tokenizer).problems
    return report


def sync_generation_config(model, tokenizer) -> None:
    """Generation stops at the end-of-turn token and pads with the (distinct) pad token."""
    eos_ids = [tokenizer.eos_token_id]
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = eos_ids
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def verify(path: str | Path) -> tuple[int, str]:
    """Exit code and report text for ``verify_tokenizer.sh``."""
    tokenizer = load_tokenizer(path)
    report = inspect_tokenizer(tokenizer)
    text = f"tokenizer of {path}\n{report.format()}"
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file() and report.end_of_turn_id is not None:
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        stops = report.end_of_turn_id in eos
        text += f"\ngeneration_config eos_token_id: {eos} ({'stops' if stops else 'does NOT stop'} at end of turn)"
    if not report.ok:
        text += "\ntraining would apply: " + "; ".join(plan_repair(tokenizer))
    return (0 if report.ok else 1), text


def make_verify_parser(subparsers=None) -> argparse.ArgumentParser:
    """The ``verify`` arguments: a subcommand of ``subparsers`` or standalone (``surgvqa verify-tokenizer``)."""
    description = "check pad/eos/end-of-turn tokens of a model or checkpoint directory"
    if subparsers is None:
        verify_parser = ArgumentParser(prog="surgvqa verify-tokenizer", description=description)
    else:
        verify_parser = subparsers.add_parser("verify", help=description, description=description)
    verify_parser.add_argument("path", help="a local model or checkpoint directory")
    return verify_parser


def run_verify(path: str) -> int:
    """Print the report: 0 safe, 1 the tokenizer needs the repair shown, 2 no tokenizer could be loaded."""
    existing_dir(path, "the model or checkpoint directory")
    try:
        code, text = verify(path)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load a tokenizer from {path} ({reason}); pass a directory holding "
                        "tokenizer.json / tokenizer_config.json (a model or a training output)") from err
    print(text)
    return code


def verify_main(argv: list[str] | None = None) -> int:
    """``surgvqa verify-tokenizer PATH``: 0 safe, 1 bad tokenizer, 2 bad invocation (``error: …``)."""
    args = make_verify_parser().parse_args(argv)
    return run_main(lambda: run_verify(args.path))


def main(argv: list[str] | None = None) -> int:
    """``python -m surgvqa.tokenizer verify PATH`` (``verify_tokenizer.sh``): exit codes of :func:`verify_main`."""
    parser = ArgumentParser(prog="python -m surgvqa.tokenizer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    make_verify_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_main(lambda: run_verify(args.path))


if __name__ == "__main__":
    raise SystemExit(main())
