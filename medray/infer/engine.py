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


class GenerationEngine:
    """Batched generation over a LoadedModel."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Decoder-only models must be left-padded so every row's last token is its prompt's.
        self.tokenizer.padding_side = "left"

    def prompt(self, messages: list[dict]) -> str:
        return render_chat(self.loaded.processor, messages, add_generation_prompt=True)

    def _inputs(self, requests: Sequence[Request]) -> dict:
        prompts = [self.prompt(r.messages) for r in requests]
        images = [img for r in requests for img in r.images]
        proc = self.loaded.processor
        if images:
            inputs = proc(text=prompts, images=images, padding=True, add_special_tokens=False,
                          return_tensors="pt")
        else:
            inputs = self.tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
        device = self.loaded.device
        dtype = next(self.loaded.model.parameters()).dtype
        out = {}
        for k, v in inputs.items():
            if not torch.is_tensor(v):
                continue
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() and dtype.is_floating_point else v
        return out

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], settings: GenerationSettings = GenerationSettings()) -> list[Answer]:
        if not requests:
            return []
        inputs = self._inputs(requests)
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
        answers = []
        for row in range(len(requests)):
            new = output[row, prompt_len:].tolist()
            eos_ids = self._eos_ids()
            finish = "length"
            if any(t in eos_ids for t in new):
                new = new[: min(new.index(t) for t in eos_ids if t in new)]
                finish = "stop"
            new = [t for t in new if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for s in settings.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            prompt_tokens = int(inputs["attention_mask"][row].sum())
            answers.append(Answer(text.strip(), prompt_tokens, len(new), finish))
        return answers

    def _eos_ids(self) -> set[int]:
        eos = self.loaded.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids
