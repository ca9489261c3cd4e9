"""What a model is asked for a task: the one rule from (task, model kind, question) to chat
messages, shared by the pipeline's preprocessing and the visual experts."""

from __future__ import annotations

from medray.data import CAPTION_PROMPT, user_message


def messages_for(task: str, family_kind: str, question: str, with_image: bool) -> list[dict]:
    """- a VLM sees the image placeholder and the question (the caption prompt when captioning
      without one);
    - a GIT-style captioner sees no placeholder (its pixels are the prompt) and, at most, a
      text prefix: none when captioning, the question otherwise;
    - a text model sees the question only."""
    if family_kind == "captioner":
        text = "" if task == "caption" else question
        return [user_message(text or None)]
    text = question or CAPTION_PROMPT if task == "caption" else question
    return [user_message(text, with_image and family_kind == "vlm")]
