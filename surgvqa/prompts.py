"""Chat messages for one sample: the single place that decides what the model is shown."""

from __future__ import annotations

from surgvqa.errors import UserError

#: what the prompt carries of the question: its text, its spoken audio, or both
QUESTION_MODALITIES = ("text", "audio", "text+audio")
DEFAULT_SYSTEM_PROMPT = (
    "You are a surgical video assistant. Watch the colonoscopy clip and answer the question in one sentence."
)
#: what the user turn says when the question is only spoken (the question text itself is NOT in the prompt).
SPOKEN_QUESTION_INSTRUCTION = "Answer the spoken question."


def build_messages(
    question: str,
    answer: str | None,
    *,
    question_modality: str = "text",
    num_images: int = 0,
    use_video: bool = True,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[dict]:
    """System, user (video or images, then audio, then text) and, when ``answer`` is given, the assistant turn."""
    check_question_modality(question_modality)
    content: list[dict] = []
    if use_video:
        content.append({"type": "video"})
    content.extend({"type": "image"} for _ in range(num_images))
    if "audio" in question_modality:
        content.append({"type": "audio"})
    if "text" in question_modality:
        content.append({"type": "text", "text": question})
    else:
        content.append({"type": "text", "text": SPOKEN_QUESTION_INSTRUCTION})
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": content},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def check_question_modality(value: str, name: str = "question_modality") -> str:
    """``value`` if it is one of :data:`QUESTION_MODALITIES`; else a UserError naming ``name`` (flag or key)."""
    if value not in QUESTION_MODALITIES:
        raise UserError(f"{name} must be one of {', '.join(QUESTION_MODALITIES)}; got {value!r}")
    return value
