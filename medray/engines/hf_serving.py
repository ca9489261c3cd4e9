"""The hf engine in a Serve replica: concurrent requests merged into generate calls by Serve's
`@serve.batch`, the transformers engine's way of batching (it runs static batches; vLLM's
engine batches continuously itself). Rows that name different adapters still share a call
(PEFT mixed-adapter batches), so multi-LoRA serving costs no extra passes; adapters load on
demand into an LRU (AdapterCache). Streamed requests are batched the same way, by a second
batcher whose generate call hands out tokens step by step.

Runs inside a Serve replica only (Serve's batcher asks for the replica's context).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

from ray import serve

from .protocol import Report, ServingSpec
from .types import Answer, GenerationSettings, Request

log = logging.getLogger(__name__)


class AdapterCache:
    """PEFT adapters loaded on demand into one base model, at most `capacity` at a time (LRU).

    Generation reads the adapter set and loading changes it, so they are ordered as readers
    and a writer: any number of generate calls at once (a batch, streamed batches stepping in
    turn), or one load/unload alone. Everything runs on the replica's event loop,
    so waiting is awaiting: a load that waits for a streamed batch to finish must not block
    the loop, which that batch needs to advance. A waiting load holds new readers back, so a
    steady stream of requests cannot starve it. An adapter in use is never unloaded.
    """

    def __init__(self, engine, uris: dict[str, str], capacity: int):
        self.engine, self.loaded, self.uris, self.capacity = engine, engine.loaded, uris, capacity
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.in_use: dict[str, int] = {}
        self._readers = 0
        self._writer_waiting = 0
        self.loads = 0

    @asynccontextmanager
    async def use(self, names: list[str | None]):
        """Make `names` resident and keep them so while the block runs (a generate call).
        Gives the adapters that failed to load, by name, with why: their rows fail alone, and
        the base model's and the other adapters' rows go on."""
        wanted = sorted({n for n in names if n})
        for name in wanted:  # claimed first, so loading one cannot evict another we need
            self.in_use[name] = self.in_use.get(name, 0) + 1
        failed: dict[str, Exception] = {}
        try:
            for name in wanted:
                if name not in self.resident:
                    try:
                        await self._load(name)
                    except Exception as e:  # its files went missing or bad since the start: the server's fault
                        log.error("adapter %s failed to load: %s", name, type(e).__name__)
                        failed[name] = e
                        continue
                self.resident.move_to_end(name)
            while self._writer_waiting:
                await asyncio.sleep(0.005)
        except BaseException:
            self._release(wanted)
            raise
        self._readers += 1
        try:
            yield failed
        finally:
            self._readers -= 1
            self._release(wanted)

    def _release(self, wanted: list[str]) -> None:
        for name in wanted:
            self.in_use[name] -= 1
        self._evict()

    async def _load(self, name: str) -> None:
        from medray.models.loading import attach_adapter

        self._writer_waiting += 1
        try:
            while self._readers:
                await asyncio.sleep(0.005)
            if name in self.resident:  # another caller loaded it meanwhile
                return
            def load():  # on the generation thread, as every model call (GenerationEngine.submit)
                self.loaded.model = attach_adapter(self.loaded.model, self.uris[name], name)

            await asyncio.wrap_future(self.engine.submit(load))
            self.resident[name] = None
            self.loads += 1
            log.info("loaded adapter %s", name)
        finally:
            self._writer_waiting -= 1
        self._evict()

    def _evict(self) -> None:
        # Unloading changes the model: only while no generation runs; otherwise later.
        while len(self.resident) > self.capacity and not self._readers:
            victim = next((n for n in self.resident if not self.in_use.get(n)), None)
            if victim is None:
                return  # everything resident is busy: unload later
            self.loaded.model.delete_adapter(victim)
            del self.resident[victim]
            log.info("unloaded adapter %s", victim)


def _groups(settings: list[GenerationSettings], key=lambda s: s) -> dict[GenerationSettings, list[int]]:
    """Row indices by their settings (under `key`): rows that decode alike share a generate call."""
    groups: dict[GenerationSettings, list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault(key(s), []).append(i)
    return groups


def _without_failed(rows: list[int], encoded: list, adapters: list, failed: dict, fail) -> tuple[list[int], list]:
    """The rows (and their encodings) whose adapter loaded; `fail(i, e)` with the load's error
    for each of the others (AdapterCache.use gives `failed`)."""
    kept = []
    for i, e in zip(rows, encoded):
        if adapters[i] in failed:
            fail(i, failed[adapters[i]])
        else:
            kept.append((i, e))
    return [i for i, _ in kept], [e for _, e in kept]


class HFServingEngine:
    """The hf engine behind the ServingEngine protocol (medray.engines.protocol)."""

    def __init__(self, spec: ServingSpec, report: Report):
        from medray.models import load_model

        from .hf import GenerationEngine

        self.engine = GenerationEngine(load_model(spec.uri))
        self.family = self.engine.loaded.family
        self.report = report
        self.adapters = AdapterCache(self.engine, spec.adapters, spec.max_loaded_adapters)
        for batcher in (self.batch, self.stream_batch):
            batcher.set_max_batch_size(spec.max_batch_size)
            batcher.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.interval_s = spec.stream_interval_s
        # Open while no streamed batch runs. Serve's batcher forms the next batch from the first
        # request that arrives, plus what comes within batch_wait_timeout_s, even while one
        # runs; a streamed batch leaves the event loop free between its steps, so it took
        # requests one or two at a time (measured: 2.5 per batch against 9.2 for non-streamed
        # ones). Waiting here, requests enter the batcher together when the running batch ends.
        self.stream_gate = asyncio.Event()
        self.stream_gate.set()

    def state(self) -> dict:
        return {"adapters": {"configured": sorted(self.adapters.uris), "resident": list(self.adapters.resident),
                             "loads": self.adapters.loads}}

    def gauges(self) -> dict:
        return {}

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes[-1000:])

    def shutdown(self) -> None:
        pass  # everything it holds is in this process

    async def generate(self, request: Request, settings: GenerationSettings, adapter: str | None,
                       deadline: float | None) -> Answer:
        """A running batch holds this replica's event loop, so a cancellation would only land
        when the whole batch is done: the deadline inside the generate call is what frees the
        row's slot in time."""
        # Positional, always all four: @serve.batch lists each argument across the calls.
        result = await self.batch(request, settings, adapter, deadline)
        if isinstance(result, Exception):  # this request's group failed in the batch
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def batch(self, requests: list[Request], settings: list[GenerationSettings],
                    adapters: list[str | None], deadlines: list[float | None]) -> list:
        self.batch_sizes.append(len(requests))
        self.report(batch_size=len(requests))
        return await self._generate_batch(requests, settings, adapters, deadlines)

    @asynccontextmanager
    async def _ready_rows(self, requests: list[Request], rows: list[int], adapters: list[str | None], fail):
        """(rows, encodings) of the rows of one group that encode and whose adapters loaded,
        those adapters kept resident while the block runs (a generate call); `fail(i, e)` for
        each of the others, which fail alone."""
        rows, encoded = self._encode_rows(requests, rows, fail)
        if not rows:
            yield [], []
            return
        async with self.adapters.use([adapters[i] for i in rows]) as failed:
            yield _without_failed(rows, encoded, adapters, failed, fail)

    def _encode_rows(self, requests: list[Request], rows: list[int], fail) -> tuple[list[int], list]:
        """The rows whose requests encode, with their encodings; `fail(i, e)` for each that does
        not (RequestRejected), so it fails alone and the others still share a generate call."""
        kept, encoded = [], []
        for i in rows:
            try:
                encoded.append(self.engine.encode(requests[i]))
                kept.append(i)
            except Exception as e:
                fail(i, e)
        return kept, encoded

    async def _generate_batch(self, requests: list[Request], settings: list[GenerationSettings],
                              adapters: list[str | None], deadlines: list[float | None]) -> list:
        results: list = [None] * len(requests)
        fail = results.__setitem__
        for group_settings, idx in _groups(settings).items():  # one generate call per distinct setting
            try:
                async with self._ready_rows(requests, idx, adapters, fail) as (idx, encoded):
                    if not idx:
                        continue
                    call = (encoded, group_settings, [adapters[i] for i in idx], [deadlines[i] for i in idx])
                    if self.engine.streams_running:
                        # A streamed batch is stepping on the generation thread, and its steps
                        # wait for this event loop to take them: wait without blocking it.
                        answers = await asyncio.wrap_future(self.engine.submit(self.engine.generate_encoded, *call))
                    else:
                        # Otherwise the call blocks the event loop until it is done, on purpose:
                        # requests that arrive meanwhile wait in Serve's queue and are taken all
                        # at once as the next batch. With the loop free, request intake and the
                        # Python-heavy generate loop fought over the GIL: measured 22.6 req/s
                        # against 49.8 blocking (tiny LLaVA, 32 clients, 2 CPUs, median of 3).
                        # Health checks wait at most one batch.
                        answers = self.engine.generate_encoded(*call)
                for i, a in zip(idx, answers):
                    results[i] = a
            except Exception as e:  # this group's requests fail; the other groups still answer
                log.warning("generation failed for %d requests: %s: %s", len(idx), type(e).__name__, e)
                for i in idx:
                    if results[i] is None:  # not one that failed alone before
                        results[i] = e
        return results

    async def stream(self, request: Request, settings: GenerationSettings, adapter: str | None,
                     deadline: float | None):
        """Messages as the protocol says. A message is a hop to the ingress and one to the proxy,
        and a step of Serve's batcher for every stream, so the batch sends one per
        stream_interval_s for all its streams at once. Concurrent streams share generate calls
        (stream_batch). A caller that goes away stops its row at the next step."""
        cancel = threading.Event()
        try:
            await self.stream_gate.wait()
            async for events in self.stream_batch(request, settings, adapter, deadline, cancel):
                yield events
        finally:
            cancel.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def stream_batch(self, requests: list[Request], settings: list[GenerationSettings],
                           adapters: list[str | None], deadlines: list[float | None],
                           cancels: list[threading.Event]):
        """Streamed requests batched as the others are: one generate call per group of rows
        that decode alike (each row keeps its own max_tokens). Yields, per step, one list of
        events per request; a request whose Answer went out gets StopIteration next, so its
        stream closes without waiting for the longest row.

        Each step is taken on the event loop, blocking it while the step computes, as `batch`
        does and for the same reason; between steps the loop sends chunks and takes requests.
        """
        self.stream_gate.clear()
        try:
            async for frame in self._stream_frames(requests, settings, adapters, deadlines, cancels):
                yield frame
        finally:
            self.stream_gate.set()

    async def _stream_frames(self, requests, settings, adapters, deadlines, cancels):
        n = len(requests)
        self.batch_sizes.append(n)
        self.report(batch_size=n)
        finished = [False] * n
        pending: dict[int, list] = {}  # events not sent yet, per request
        interval, sent_at = self.interval_s, 0.0

        def frame(updates: dict[int, list]) -> list:
            out = []
            for i in range(n):
                if finished[i]:
                    out.append(StopIteration)
                    continue
                events = pending.pop(i, []) + updates.get(i, [])
                finished[i] = any(isinstance(e, (Answer, Exception)) for e in events)
                out.append(events)
            return out

        fail = lambda i, e: pending.__setitem__(i, [e])  # noqa: E731
        # Grouped without max_new_tokens: each row keeps its own, within one call.
        for key, rows in _groups(settings, lambda s: s.model_copy(update={"max_new_tokens": 1})).items():
            try:
                async with self._ready_rows(requests, rows, adapters, fail) as (rows, encoded):
                    if not rows:
                        continue
                    steps = self.engine.stream_batch(
                        encoded, key.model_copy(update={"max_new_tokens": max(settings[i].max_new_tokens for i in rows)}),
                        [adapters[i] for i in rows], [cancels[i] for i in rows], [deadlines[i] for i in rows],
                        [settings[i].max_new_tokens for i in rows])
                    try:
                        for step in steps:
                            for i, events in zip(rows, step):
                                if events:
                                    pending.setdefault(i, []).extend(events)
                            # A frame goes out at the first step, then at most every
                            # stream_interval_s, and when a row ends (its stream closes then).
                            now = time.monotonic()
                            if pending and (now - sent_at >= interval or any(
                                    isinstance(e, (Answer, Exception)) for i in rows for e in pending.get(i, ()))):
                                yield frame({})
                                sent_at = now
                            # Serve's batcher resumes this generator at once, so without this the
                            # loop would never run between steps: chunks would reach no client
                            # until the whole call ended.
                            await asyncio.sleep(0)
                    finally:
                        steps.close()
            except Exception as e:  # this group's requests fail; the other groups still answer
                log.warning("streamed generation failed for %d requests: %s: %s", len(rows), type(e).__name__, e)
                yield frame({i: [e] for i in rows if not finished[i]})
        if pending:
            yield frame({})
