"""Chat examples -> input_ids, attention_mask, labels, pixel_values for any medray family.

How labels are found, independent of the template: the assistant's span in turn i is the
text between render(turns[:i], generation prompt) and render(turns[:i+1]). Every template
medray ships (and every well-formed HF template) renders a conversation's prefix as a
prefix of the whole, which is asserted, so the spans are exact. Tokens starting inside a
span are labelled; everything else, image tokens included, is -100.

Prompts are encoded by `medray.models.processing.encode_prompt`, as for generation: the
model's image rule and prompt tokenization apply, and each image placeholder becomes one
token per image feature, all standing at the placeholder's characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from medray.models.loading import render_chat
from medray.models.processing import encode_prompt

IGNORE_INDEX = -100


class SampleTooLongError(ValueError):
    """Truncating to max_length would cut through the image tokens."""


@dataclass
class Example:
    messages: list[dict]
    images: list[Any]
    """PIL images, in the order their image parts appear."""
    id: str = ""


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn."""
    full = render_chat(processor, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(processor, messages[:i], add_generation_prompt=True)
        upto = render_chat(processor, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("the chat template does not render a conversation's start as a prefix "
                             "of the whole, so assistant turns cannot be located")
        spans.append((len(before), len(upto)))
    return full, spans


def _image_token_id(processor) -> int | None:
    tok = getattr(processor, "tokenizer", processor)
    token = getattr(processor, "image_token", None)
    return tok.convert_tokens_to_ids(token) if token else None


class ChatCollator:
    """Callable collator over `Example`s; right-pads for training."""

    def __init__(self, processor, max_length: int = 2048):
        if max_length < 8:
            raise ValueError("max_length must be at least 8")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.image_token_id = _image_token_id(processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def encode(self, ex: Example) -> dict:
        text, spans = assistant_spans(self.processor, ex.messages)
        try:
            enc = encode_prompt(self.processor, text, ex.images)
        except ValueError as e:
            raise ValueError(f"example {ex.id!r}: {e}") from e
        # A token belongs to the turn its first character is in; image tokens stand at
        # their placeholder, inside a user turn, so they are never labelled.
        labels = [tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX
                  for tok, (start, _end) in zip(enc.input_ids, enc.offsets)]
        pixel_values = torch.as_tensor(enc.pixel_values) if enc.pixel_values is not None else None
        ids, labels = self._truncate(enc.input_ids, labels, ex.id)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}

    def _truncate(self, ids: list[int], labels: list[int], ex_id: str):
        if len(ids) <= self.max_length:
            return ids, labels
        if self.image_token_id is not None and self.image_token_id in ids[self.max_length:]:
            last_image = max(i for i, t in enumerate(ids) if t == self.image_token_id)
            raise SampleTooLongError(
                f"example {ex_id!r} needs {last_image + 1} tokens to keep its image but max_length "
                f"is {self.max_length}; raise max_length or shorten the text before the image")
        return ids[: self.max_length], labels[: self.max_length]

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(ex) for ex in examples]
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e["input_ids"])
            input_ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            attention[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        pixels = [e["pixel_values"] for e in encoded if e["pixel_values"] is not None]
        if pixels:
            # LLaVA pairs image features with <image> tokens in order, so text-only rows may
            # ride along; a model without image tokens (GIT) needs an image on every row.
            if len(pixels) != len(encoded) and self.image_token_id is None:
                raise ValueError("this model needs an image on every example in a batch")
            batch["pixel_values"] = torch.cat(pixels)
        return batch
