"""The transformers engine (`hf`): chat messages (+ images) in, answers out, batched, over
transformers' generate. The embedded default on CPU, and what runs what vLLM cannot.

`GenerationEngine` is its batch engine (medray.engines.protocol.BatchEngine): the batch
pipeline, `medray ask` and the demo call it, and the Serve replica drives it through
hf_serving.py. One generation thread per engine, and streaming by steps, live here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Iterator, Sequence

import torch

from medray.models import LoadedModel, render_chat

from .encoding import encode_request
from .types import Answer, Encoded, GenerationSettings, Request, new_text

log = logging.getLogger(__name__)


def load_engine(model: str, adapter: str | None = None, adapters: dict[str, str] | None = None,
                options=None) -> GenerationEngine:
    """The hf batch engine over a model URI, with `adapter` (PEFT's "default") and the named
    `adapters` loaded beside it for mixed batches. `options`: none (the registry's loaders
    share one signature; the hf engine's sizing is the pipeline's batch size)."""
    from medray.models import load_model
    from medray.models.loading import attach_adapter

    loaded = load_model(model, adapter=adapter)
    for name, uri in (adapters or {}).items():
        loaded.model = attach_adapter(loaded.model, uri, name)
    return GenerationEngine(loaded)


class GenerationEngine:
    """Batched generation over a LoadedModel."""

    continuous = False
    """It runs static batches: the pipeline hands it `batch_size` rows a call."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # A model's own stop strings (generation_config.json: LLaVA-Med v1's "###") end every
        # answer, besides those a request names.
        self.model_stop = tuple(getattr(loaded.model.generation_config, "stop_strings", None) or ())
        self.pad_id = self.tokenizer.pad_token_id  # read per token: the tokenizer's attribute is slow
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._worker_thread: threading.Thread | None = None
        self.streams_running = 0
        """stream_batch calls under way: their steps wait for their consumer."""

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Run `fn` on the engine's one generation thread. Every model call of the engine runs
        there (generate, streamed steps, adapter loads through a server), so that a process
        has one thread doing torch work. Each thread that runs torch ops gets an OpenMP team
        of its own, and two teams spinning on 2 cores halved the speed of both: measured,
        one generate call took 40-65 ms on a single thread, and 120-170 ms, on whichever
        thread, once a second thread had run one (tiny LLaVA, 32 rows x 16 tokens)."""
        if self._worker is None:
            def mark():
                self._worker_thread = threading.current_thread()

            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medray-generate",
                                                                 initializer=mark)
        return self._worker.submit(fn, *args, **kwargs)

    def _on_worker(self, fn, *args, **kwargs):
        if threading.current_thread() is self._worker_thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

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

    def generate_encoded(self, encoded: Sequence[Encoded], settings: GenerationSettings = GenerationSettings(),
                         adapters: Sequence[str | None] | None = None,
                         deadlines: Sequence[float | None] | None = None) -> list[Answer]:
        """Generate for a batch. `adapters` names a loaded PEFT adapter per row (None: the base
        model); rows with different adapters share one generate call (PEFT mixed batches).
        A row stops at its deadline (time.monotonic(); None: none), with what it has so far;
        the call ends when every row has. Runs on the generation thread (`submit`); the
        caller waits. An async caller awaits `submit(engine.generate_encoded, ...)` instead."""
        return self._on_worker(self._generate_encoded, encoded, settings, adapters, deadlines)

    @torch.inference_mode()
    def _generate_encoded(self, encoded, settings, adapters, deadlines) -> list[Answer]:
        if not encoded:
            return []
        inputs = self._collate(encoded)
        kwargs = self._generate_kwargs(settings, adapters)
        if deadlines is not None and any(d is not None for d in deadlines):
            ends = [float("inf") if d is None else d for d in deadlines]
            kwargs["stopping_criteria"] = _rows_done_criteria(ends, [settings.max_new_tokens] * len(encoded),
                                                              inputs["input_ids"].shape[1])
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
        for events in self.stream_batch([encoded], settings, [adapter], [cancel or threading.Event()]):
            yield from events[0]

    def stream_batch(self, encoded: Sequence[Encoded], settings: GenerationSettings = GenerationSettings(),
                     adapters: Sequence[str | None] | None = None,
                     cancels: Sequence[threading.Event] | None = None,
                     deadlines: Sequence[float | None] | None = None,
                     max_new_tokens: Sequence[int] | None = None) -> Iterator[list[list[str | Answer]]]:
        """Generate for a batch token by token, in one generate call: yields once per step a
        list with, for each row, its events since the last step (text deltas as in `stream`,
        then, once, the row's Answer; nothing after). A row ends at its EOS, a stop string, its
        own `max_new_tokens` (default: the settings'), its `cancels` event or its deadline,
        and gets its Answer at once, without waiting for the batch's longest row.

        Generation runs on the generation thread (`submit`), at most two steps ahead of the
        consumer: a consumer that blocks on this iterator (a Serve replica's event loop) lets
        it compute, and between steps the consumer has the GIL to itself. Closing the
        iterator stops every row. The consumer must be another thread.
        """
        if threading.current_thread() is self._worker_thread:
            raise RuntimeError("stream_batch consumed on the generation thread would wait for itself")
        n = len(encoded)
        cancels = list(cancels) if cancels is not None else [threading.Event() for _ in range(n)]
        limits = list(max_new_tokens) if max_new_tokens is not None else [settings.max_new_tokens] * n
        ends = [float("inf") if d is None else d for d in (deadlines or [None] * n)]
        longest = max(limits)
        inputs = self._collate(encoded)
        width = inputs["input_ids"].shape[1]
        kwargs = self._generate_kwargs(settings.model_copy(update={"max_new_tokens": longest}), adapters)
        steps: queue.Queue = queue.Queue(maxsize=2)
        kwargs["streamer"] = _QueueStreamer(steps)
        kwargs["stopping_criteria"] = _rows_done_criteria(ends, limits, width, cancels)
        failure: list[BaseException] = []

        @torch.inference_mode()
        def run():
            try:
                self.loaded.model.generate(**inputs, **kwargs)
            except BaseException as e:  # re-raised in the consuming thread
                failure.append(e)
            finally:
                steps.put(None)

        rows = [_RowText(self, settings, len(e.input_ids), limit) for e, limit in zip(encoded, limits)]
        running = self.submit(run)
        self.streams_running += 1
        try:
            while (step := steps.get()) is not None:
                out = []
                now = time.monotonic()
                for row, token, cancel, end in zip(rows, step, cancels, ends):
                    if not row.done and cancel.is_set():  # stopped from outside: nobody wants its rest
                        row.done = True
                    events = [] if row.done else row.finish() if now > end else row.push(token)
                    if row.done:
                        cancel.set()  # the generate call stops this row at its next step
                    out.append(events)
                yield out
            if failure:
                raise failure[0]
            yield [row.finish() if not row.done else [] for row in rows]
        finally:
            for cancel in cancels:
                cancel.set()
            while not running.done():  # let a producer blocked on a full queue finish
                try:
                    steps.get(timeout=0.05)
                except queue.Empty:
                    pass
            self.streams_running -= 1

    def _visible(self, new: list[int], settings: GenerationSettings) -> str | None:
        """The answer text so far, or None once it contains a stop string."""
        text = self.tokenizer.decode([t for t in new if t != self.pad_id],
                                     skip_special_tokens=True).lstrip()
        return None if any(s in text for s in self._stops(settings)) else text

    def _generate_kwargs(self, settings: GenerationSettings, adapters: Sequence[str | None] | None) -> dict:
        kwargs: dict = dict(settings.transformers_kwargs(), pad_token_id=self.tokenizer.pad_token_id)
        if settings.sampled and settings.seed is not None:
            torch.manual_seed(settings.seed)
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
        new = [t for t in new if t != self.pad_id]
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


class _RowText:
    """One streamed row: its new token ids, the text sent so far, and when it is done."""

    def __init__(self, engine: GenerationEngine, settings: GenerationSettings, prompt_tokens: int, limit: int):
        self.engine, self.settings, self.prompt_tokens, self.limit = engine, settings, prompt_tokens, limit
        self.new: list[int] = []
        self.sent = ""
        self.done = False
        self.hold = max((len(x) for x in engine._stops(settings)), default=1) - 1
        self.eos = engine._eos_ids()

    def push(self, token: int) -> list[str | Answer]:
        """One step's token; returns the text that became certain, and the Answer at the end."""
        self.new.append(token)
        if token in self.eos or len(self.new) >= self.limit:
            return self.finish()
        text = self.engine._visible(self.new, self.settings)
        if text is None:  # a stop string appeared: the row ends with it
            return self.finish()
        delta = new_text(text, self.sent, self.hold)  # hold: a stop string may be starting
        if not delta:
            return []
        self.sent += delta
        return [delta]

    def finish(self) -> list[str | Answer]:
        self.done = True
        answer = self.engine._answer(self.new, self.prompt_tokens, self.settings)
        tail = [answer.text[len(self.sent):]] if answer.text.startswith(self.sent) and len(answer.text) > len(
            self.sent) else []
        return tail + [answer]


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


def _rows_done_criteria(ends: Sequence[float], limits: Sequence[int], width: int,
                        cancels: Sequence[threading.Event] = ()):
    """Per row: past its deadline (time.monotonic()), at its own token limit, or cancelled
    (the client left, or a stream's text is complete). transformers pads a done row from
    then on, and ends the call when every row is done."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    limit = torch.tensor(limits)
    end = torch.tensor(ends, dtype=torch.float64)

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = (end < time.monotonic()) | (limit <= input_ids.shape[1] - width)
            if cancels:
                done |= torch.tensor([c.is_set() for c in cancels])
            return done.to(input_ids.device)

    return StoppingCriteriaList([RowsDone()])
