"""The generation engine: chat messages (+ images) in, answers out, batched.

One engine serves the batch pipeline, the Serve deployment and the demo, so a prompt is
rendered and decoded the same way everywhere.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from medray.models import LoadedModel, render_chat
from medray.models.processing import encode_prompt

log = logging.getLogger(__name__)


# The generation limits, defined once: batch options, job requests and the chat API check
# their own fields against these.
MAX_NEW_TOKENS = 4096
MAX_TEMPERATURE = 2.0


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
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}]")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Request:
    messages: list[dict]
    images: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
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
    and pixels to the GPU actors. The model's image rule and prompt tokenization apply
    (medray.models.processing).
    """
    prompt = render_chat(processor, request.messages, add_generation_prompt=True)
    enc = encode_prompt(processor, prompt, request.images)
    return Encoded(enc.input_ids, enc.pixel_values)


class GenerationEngine:
    """Batched generation over a LoadedModel."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # A model's own stop strings (generation_config.json: LLaVA-Med v1's "###") end every
        # answer, besides those a request names.
        self.model_stop = tuple(getattr(loaded.model.generation_config, "stop_strings", None) or ())

    def _stops(self, settings: GenerationSettings) -> tuple[str, ...]:
        return settings.stop + tuple(s for s in self.model_stop if s not in settings.stop)

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
    def generate_encoded(self, encoded: Sequence[Encoded], settings: GenerationSettings = GenerationSettings(),
                         adapters: Sequence[str | None] | None = None,
                         deadlines: Sequence[float | None] | None = None) -> list[Answer]:
        """Generate for a batch. `adapters` names a loaded PEFT adapter per row (None: the base
        model); rows with different adapters share one generate call (PEFT mixed batches).
        A row stops at its deadline (time.monotonic(); None: none), with what it has so far;
        the call ends when every row has."""
        if not encoded:
            return []
        inputs = self._collate(encoded)
        kwargs = self._generate_kwargs(settings, adapters)
        if deadlines is not None and any(d is not None for d in deadlines):
            kwargs["stopping_criteria"] = _deadline_criteria(deadlines)
        output = self.loaded.model.generate(**inputs, **kwargs)
        prompt_len = inputs["input_ids"].shape[1]
        return [self._answer(output[row, prompt_len:].tolist(), len(encoded[row].input_ids), settings)
                for row in range(len(encoded))]

    def stream(self, encoded: Encoded, settings: GenerationSettings = GenerationSettings(),
               adapter: str | None = None, cancel: threading.Event | None = None) -> Iterator[str | Answer]:
        """Generate one answer token by token: yields text deltas, then the final Answer.

        The deltas add up to exactly `Answer.text` (the same text `generate_encoded` returns),
        so text that might still turn out to be trailing space or the start of a stop string
        is held back until it is certain. Setting `cancel` (or closing the iterator) stops
        generation at the next token.
        """
        cancel = cancel or threading.Event()
        tokens: queue.Queue = queue.Queue()
        failure: list[BaseException] = []
        inputs = self._collate([encoded])
        kwargs = self._generate_kwargs(settings, [adapter])
        kwargs["streamer"] = _QueueStreamer(tokens)
        kwargs["stopping_criteria"] = _cancel_criteria(cancel)

        @torch.inference_mode()
        def run():
            try:
                self.loaded.model.generate(**inputs, **kwargs)
            except BaseException as e:  # re-raised in the consuming thread
                failure.append(e)
            finally:
                tokens.put(None)

        thread = threading.Thread(target=run, name="medray-stream", daemon=True)
        thread.start()
        new: list[int] = []
        sent = ""
        hold = max((len(s) for s in self._stops(settings)), default=1) - 1
        eos = self._eos_ids()
        try:
            while (item := tokens.get()) is not None:
                new.extend(item)
                if any(t in eos for t in item):
                    continue  # the end: the final answer below carries the rest
                text = self._visible(new, settings)
                if text is None:  # a stop string appeared: generation ends with it
                    cancel.set()
                    continue
                # Hold back trailing space and a possible stop-string prefix, and never emit
                # half a multi-byte character (the tokenizer shows it as U+FFFD).
                safe = text.rstrip()
                safe = safe[: max(len(sent), len(safe) - hold)] if hold else safe
                if "\ufffd" in safe[len(sent):]:
                    continue
                if len(safe) > len(sent) and safe.startswith(sent):
                    yield safe[len(sent):]
                    sent = safe
            if failure:
                raise failure[0]
            answer = self._answer(new, len(encoded.input_ids), settings)
            if answer.text.startswith(sent) and len(answer.text) > len(sent):
                yield answer.text[len(sent):]
            yield answer
        finally:
            cancel.set()
            thread.join()

    def _visible(self, new: list[int], settings: GenerationSettings) -> str | None:
        """The answer text so far, or None once it contains a stop string."""
        text = self.tokenizer.decode([t for t in new if t != self.tokenizer.pad_token_id],
                                     skip_special_tokens=True).lstrip()
        return None if any(s in text for s in self._stops(settings)) else text

    def _generate_kwargs(self, settings: GenerationSettings, adapters: Sequence[str | None] | None) -> dict:
        kwargs: dict = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stops = self._stops(settings)
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=self.tokenizer)
        if adapters is not None and hasattr(self.loaded.model, "peft_config"):
            # Named per row, so base rows skip whatever adapter happens to be active.
            kwargs["adapter_names"] = [a or "__base__" for a in adapters]
        return kwargs

    def _answer(self, new: list[int], prompt_tokens: int, settings: GenerationSettings) -> Answer:
        eos_ids = self._eos_ids()
        finish = "length"
        if any(t in eos_ids for t in new):
            new = new[: min(new.index(t) for t in eos_ids if t in new)]
            finish = "stop"
        new = [t for t in new if t != self.tokenizer.pad_token_id]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in self._stops(settings):
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return Answer(text.strip(), prompt_tokens, len(new), finish)

    def _eos_ids(self) -> set[int]:
        eos = self.loaded.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


class _QueueStreamer:
    """A transformers streamer that hands each step's token ids to a queue (the prompt skipped)."""

    def __init__(self, out: queue.Queue):
        self.out, self.prompt_seen = out, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.out.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _deadline_criteria(deadlines: Sequence[float | None]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    ends = torch.tensor([float("inf") if d is None else d for d in deadlines], dtype=torch.float64)

    class PastDeadline(StoppingCriteria):
        # Per row: a row past its deadline is done (transformers pads it from then on).
        def __call__(self, input_ids, scores, **kwargs):
            return (ends < time.monotonic()).to(input_ids.device)

    return StoppingCriteriaList([PastDeadline()])


def _cancel_criteria(cancel: threading.Event):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])
