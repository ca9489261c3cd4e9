"""The generation engine: chat messages (+ images) in, answers out, batched.

One engine serves the batch pipeline, the Serve deployment and the demo, so a prompt is
rendered and decoded the same way everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from medray.models import LoadedModel, render_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 64
    """Upper bound on generated tokens per answer."""
    temperature: float = 0.0
    """0 means greedy (deterministic); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass, used only when sampling."""
    stop: tuple[str, ...] = ()
    """Strings that end an answer; the answer is cut before the first one."""
    seed: int | None = None
    """Seed for sampling, for reproducible samples."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Request:
    messages: list[dict]
    images: list[Any] = field(default_factory=list)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length'."""


@dataclass
class Encoded:
    """One request after preprocessing: what a generation worker needs, nothing more."""

    input_ids: list[int]
    pixel_values: Any = None
    """numpy float32 (n_images, 3, H, W), or None for text-only requests."""


def encode_request(processor, request: Request) -> Encoded:
    """Render the chat template and run the processor: the CPU half of generation.

    Separate from generation so a pipeline can run it on CPU workers and ship only ids
    and pixels to the GPU actors.
    """
    prompt = render_chat(processor, request.messages, add_generation_prompt=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    if request.images:
        out = processor(text=[prompt], images=request.images, add_special_tokens=False, return_tensors="np")
        return Encoded(out["input_ids"][0].tolist(), out["pixel_values"].astype("float32"))
    return Encoded(tokenizer(prompt, add_special_tokens=False)["input_ids"])


class GenerationEngine:
    """Batched generation over a LoadedModel."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompt(self, messages: list[dict]) -> str:
        return render_chat(self.loaded.processor, messages, add_generation_prompt=True)

    def encode(self, request: Request) -> Encoded:
        return encode_request(self.loaded.processor, request)

    def _collate(self, encoded: Sequence[Encoded]) -> dict:
        # Left padding: every row's prompt ends at the last position, where generation starts.
        width = max(len(e.input_ids) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[row, width - n:] = torch.tensor(e.input_ids)
            mask[row, width - n:] = 1
        device = self.loaded.device
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        pixels = [e.pixel_values for e in encoded if e.pixel_values is not None]
        if pixels:
            dtype = next(self.loaded.model.parameters()).dtype
            stacked = torch.cat([torch.as_tensor(p) for p in pixels])
            inputs["pixel_values"] = stacked.to(device, dtype if dtype.is_floating_point else torch.float32)
        return inputs

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], settings: GenerationSettings = GenerationSettings()) -> list[Answer]:
        return self.generate_encoded([self.encode(r) for r in requests], settings)

    @torch.inference_mode()
    def generate_encoded(self, encoded: Sequence[Encoded],
                         settings: GenerationSettings = GenerationSettings()) -> list[Answer]:
        if not encoded:
            return []
        inputs = self._collate(encoded)
        gen_kwargs: dict = dict(max_new_tokens=settings.max_new_tokens,
                                pad_token_id=self.tokenizer.pad_token_id)
        if settings.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.stop:
            gen_kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        output = self.loaded.model.generate(**inputs, **gen_kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        eos_ids = self._eos_ids()
        answers = []
        for row in range(len(encoded)):
            new = output[row, prompt_len:].tolist()
            finish = "length"
            if any(t in eos_ids for t in new):
                new = new[: min(new.index(t) for t in eos_ids if t in new)]
                finish = "stop"
            new = [t for t in new if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for s in settings.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            answers.append(Answer(text.strip(), len(encoded[row].input_ids), len(new), finish))
        return answers

    def _eos_ids(self) -> set[int]:
        eos = self.loaded.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids
