"""The model deployment: one replica holds one base model, its PEFT adapters, and a batcher.

Concurrent requests are merged into one generate call by `@serve.batch`; rows that name
different adapters still share that call (PEFT mixed-adapter batches), so multi-LoRA
serving costs no extra passes. Streamed requests are batched the same way, by a second
batcher whose generate call hands out tokens step by step.

One module, though long: the transformers and vLLM deployments share the batchers and the
request checks; issue #40 puts them behind one deployment and one engine seam.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager

from ray import serve

from medray.infer import Answer, GenerationSettings, Request

from .config import ModelSpec

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
        from peft import PeftModel

        from medray.models.loading import resolve_adapter_uri

        self._writer_waiting += 1
        try:
            while self._readers:
                await asyncio.sleep(0.005)
            if name in self.resident:  # another caller loaded it meanwhile
                return
            path = str(resolve_adapter_uri(self.uris[name]))

            def load():  # on the generation thread, as every model call (GenerationEngine.submit)
                if isinstance(self.loaded.model, PeftModel):
                    self.loaded.model.load_adapter(path, adapter_name=name)
                else:
                    self.loaded.model = PeftModel.from_pretrained(self.loaded.model, path, adapter_name=name)
                self.loaded.model.eval()

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


def adapter_problem(name: str, uri: str, model: str) -> str | None:
    """Why the transformers engine cannot serve this PEFT adapter beside the base model and
    its sibling adapters, or None when it can.

    A replica batches rows for different adapters (and the base model) into one generate
    call, which PEFT does only for LoRA on Linear, Embedding and Conv layers. An adapter that
    also carries fully trained modules (`modules_to_save`: the projector in LLaVA's LoRA
    recipes, BabyDoctor's included) or LoRA on raw parameters (`target_parameters`: fused MoE
    experts) makes every mixed call fail, the base model's rows too. So such an adapter is
    refused when the deployment starts, never on a request.
    """
    from medray.models.loading import ModelLoadError, adapter_extras, read_adapter_config

    try:
        extras = adapter_extras(read_adapter_config(uri))
    except ModelLoadError as e:
        return f"adapter {name!r}: {e}"
    if extras is None:
        return None
    return (f"adapter {name!r} of model {model!r} ({uri}) {extras}. Rows of different adapters share one "
            "generate call, which batches LoRA layers only, so this adapter would break every request to the "
            "model. Serve the stage's merged export instead (set lora.merge: true; `medray train` writes the "
            "merged model in the stage directory, beside adapter/) as a model of its own, or train the adapter "
            "with those modules frozen")


def model_digests(spec: ModelSpec) -> dict:
    """The content digests (medray.provenance) of a spec's model and adapters, taken when the
    replica starts: the ingress names them on every answer, since a URI may hold other weights
    tomorrow."""
    from medray.provenance import digest_model

    return {"model": digest_model(spec.uri), "adapters": {n: digest_model(u) for n, u in spec.adapters.items()}}


def check_adapters(spec: ModelSpec) -> None:
    """Refuse a model spec whose adapters its engine cannot run (adapter_problem on hf,
    adapter_problem_for_vllm on vLLM), when the deployment is built."""
    from medray.infer.vllm_engine import adapter_problem_for_vllm

    if spec.engine == "hf":
        problems = [p for name, uri in spec.adapters.items() if (p := adapter_problem(name, uri, spec.name))]
    else:
        problems = [f"adapter {name!r} of model {spec.name!r} ({uri}) cannot run on vLLM: {p}. Serve the stage's "
                    "merged export (lora.merge: true) as a model of its own"
                    for name, uri in spec.adapters.items() if (p := adapter_problem_for_vllm(uri))]
    if problems:
        raise ValueError("; ".join(problems))


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


@serve.deployment
class ModelServer:
    """One model; concurrent requests are batched into one generate call."""

    def __init__(self, spec: dict, metrics=None):
        from medray.infer import GenerationEngine
        from medray.models import load_model

        self.spec = ModelSpec.model_validate(spec)
        check_adapters(self.spec)  # before the model load: a refused adapter fails fast
        self.engine = GenerationEngine(load_model(self.spec.uri))
        self.digests = model_digests(self.spec)
        self.family = self.engine.loaded.family
        self.adapters = AdapterCache(self.engine, self.spec.adapters, self.spec.max_loaded_adapters)
        for batcher in (self.batch, self.stream_batch):
            batcher.set_max_batch_size(self.spec.max_batch_size)
            batcher.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        from .metrics import MetricsBuffer

        self.metrics = MetricsBuffer(metrics) if metrics is not None else None
        self.ongoing = 0
        # Open while no streamed batch runs. Serve's batcher forms the next batch from the first
        # request that arrives, plus what comes within batch_wait_timeout_s, even while one
        # runs; a streamed batch leaves the event loop free between its steps, so it took
        # requests one or two at a time (measured: 2.5 per batch against 9.2 for non-streamed
        # ones). Waiting here, requests enter the batcher together when the running batch ends.
        self.stream_gate = asyncio.Event()
        self.stream_gate.set()
        self.replica = serve.get_replica_context().replica_id.unique_id

    def info(self) -> dict:
        return {"family": self.family.name, "kind": self.family.kind, "ongoing": self.ongoing,
                "adapters": {"configured": sorted(self.spec.adapters), "resident": list(self.adapters.resident),
                             "loads": self.adapters.loads}, "digests": self.digests}

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes[-1000:])

    def _report(self, **fields) -> None:
        if self.metrics is not None:  # buffered; sent once a second
            self.metrics.model(model=self.spec.name, replica=self.replica, **fields)

    async def generate(self, request: Request, settings: GenerationSettings, adapter: str | None,
                       time_limit_s: float | None = None) -> Answer:
        """`time_limit_s`: what is left of the request's time; past it the row stops generating.
        The ingress cancels the call then too, but a running batch holds this replica's event
        loop, so the cancellation would only land when the whole batch is done: the deadline
        inside the generate call is what frees the row's slot in time."""
        self.ongoing += 1
        self._report(queue_depth=self.ongoing)
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        try:
            # Positional, always all four: @serve.batch lists each argument across the calls.
            result = await self.batch(request, settings, adapter, deadline)
            if isinstance(result, Exception):  # this request's group failed in the batch
                raise result
            return result
        finally:
            self.ongoing -= 1
            self._report(queue_depth=self.ongoing)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def batch(self, requests: list[Request], settings: list[GenerationSettings],
                    adapters: list[str | None], deadlines: list[float | None]) -> list:
        self.batch_sizes.append(len(requests))
        results = await self._generate_batch(requests, settings, adapters, deadlines)
        self._report(batch_size=len(requests), generated_tokens=sum(r.completion_tokens for r in results
                                                                    if isinstance(r, Answer)))
        return results

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
        groups: dict[GenerationSettings, list[int]] = {}
        for i, s in enumerate(settings):  # one generate call per distinct decoding setting
            groups.setdefault(s, []).append(i)
        fail = results.__setitem__
        for group_settings, rows in groups.items():
            idx, encoded = self._encode_rows(requests, rows, fail)
            if not idx:
                continue
            try:
                async with self.adapters.use([adapters[i] for i in idx]) as failed:
                    idx, encoded = _without_failed(idx, encoded, adapters, failed, fail)
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
                    results[i] = e
        return results

    async def stream(self, request: Request, settings: GenerationSettings, adapter: str | None,
                     time_limit_s: float | None = None):
        """Yields messages, each a list of events: text (str), then at the end the Answer with
        the usage counts. A message holds what came in over up to stream_interval_s (the
        first goes at once, the Answer with the text before it): each is a hop to the
        ingress and one to the proxy, and a step of Serve's batcher for every stream.
        Concurrent streams share generate calls (stream_batch). Generation stops after
        `time_limit_s`, as in `generate`, and when the caller goes away."""
        self.ongoing += 1
        self._report(queue_depth=self.ongoing)
        cancel = threading.Event()
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        try:
            await self.stream_gate.wait()
            async for events in self.stream_batch(request, settings, adapter, deadline, cancel):
                message: list = []  # consecutive text merged
                for event in events:
                    if isinstance(event, Exception):
                        raise event
                    if isinstance(event, Answer):
                        self._report(generated_tokens=event.completion_tokens)
                    if isinstance(event, str) and message and isinstance(message[-1], str):
                        message[-1] += event
                    else:
                        message.append(event)
                if message:
                    yield message
        finally:
            cancel.set()  # a caller that left: its row stops at the next step
            self.ongoing -= 1
            self._report(queue_depth=self.ongoing)

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
        self._report(batch_size=n)
        finished = [False] * n
        pending: dict[int, list] = {}  # events not sent yet, per request
        interval, sent_at = self.spec.stream_interval_s, 0.0

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

        groups: dict[GenerationSettings, list[int]] = {}
        for i, s in enumerate(settings):
            groups.setdefault(s.model_copy(update={"max_new_tokens": 1}), []).append(i)
        fail = lambda i, e: pending.__setitem__(i, [e])  # noqa: E731
        for key, idx in groups.items():
            rows, encoded = self._encode_rows(requests, idx, fail)
            if not rows:
                continue
            try:
                async with self.adapters.use([adapters[i] for i in rows]) as failed:
                    rows, encoded = _without_failed(rows, encoded, adapters, failed, fail)
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


@serve.deployment
class VLLMModelServer:
    """One model on vLLM's async engine (`engine: vllm`), with the calls of ModelServer, so
    the ingress does not know which engine answers. No @serve.batch here: vLLM batches
    continuously, so each request joins the running batch at the engine's next step and
    leaves at its own last one, streamed and non-streamed alike. Each request names its own
    adapter; a request cancelled by the ingress (a client gone, its time limit) is aborted."""

    def __init__(self, spec: dict, metrics=None):
        from medray.infer.vllm_engine import AsyncVLLMEngine

        self.spec = ModelSpec.model_validate(spec)
        check_adapters(self.spec)
        self.engine = AsyncVLLMEngine(self.spec.uri, self.spec.adapters, self.spec.vllm,
                                      self.spec.max_loaded_adapters)
        self.digests = model_digests(self.spec)
        self.family = self.engine.family
        from .metrics import MetricsBuffer

        self.metrics = MetricsBuffer(metrics) if metrics is not None else None
        self.ongoing = 0
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __del__(self):
        # Serve calls this when the replica stops (redeploy, downscale), after it has drained:
        # vLLM's engine process stops now, not when it notices its parent has gone.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def info(self) -> dict:
        return {"family": self.family.name, "kind": self.family.kind, "ongoing": self.ongoing, "engine": "vllm",
                "adapters": {"configured": sorted(self.spec.adapters), "resident": sorted(self.spec.adapters),
                             "loads": 0}, "digests": self.digests, "scheduler": self.engine.scheduler.as_dict()}

    def recent_batch_sizes(self) -> list[int]:
        return []  # vLLM's batch changes every step; there are no batches to count

    def _report(self, **fields) -> None:
        if self.metrics is not None:  # with the scheduler's state at vLLM's latest step
            state = self.engine.scheduler
            self.metrics.model(model=self.spec.name, replica=self.replica, engine_waiting=state.waiting,
                               kv_cache_usage=state.kv_cache_usage, **fields)

    async def generate(self, request: Request, settings: GenerationSettings, adapter: str | None,
                       time_limit_s: float | None = None) -> Answer:
        self.ongoing += 1
        self._report(queue_depth=self.ongoing)
        try:
            # Past the limit the wait is cancelled, and with it the request inside vLLM.
            answer = await asyncio.wait_for(self.engine.generate(request, settings, adapter), time_limit_s)
            self._report(generated_tokens=answer.completion_tokens)
            return answer
        finally:
            self.ongoing -= 1
            self._report(queue_depth=self.ongoing)

    async def stream(self, request: Request, settings: GenerationSettings, adapter: str | None,
                     time_limit_s: float | None = None):
        """Messages as ModelServer.stream sends them: text gathered over stream_interval_s
        (the first at once), the last with the Answer."""
        self.ongoing += 1
        self._report(queue_depth=self.ongoing)
        deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        interval, sent_at, message = self.spec.stream_interval_s, 0.0, []
        events = self.engine.stream(request, settings, adapter, interval_s=interval)
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    event = await asyncio.wait_for(events.__anext__(), left)
                except StopAsyncIteration:
                    break
                if isinstance(event, Answer):
                    self._report(generated_tokens=event.completion_tokens)
                    yield message + [event]
                    return
                if message and isinstance(message[-1], str):
                    message[-1] += event
                else:
                    message.append(event)
                now = time.monotonic()
                if now - sent_at >= interval:
                    yield message
                    message, sent_at = [], now
        finally:
            await events.aclose()  # a caller that left, or the time limit: vLLM aborts the request
            self.ongoing -= 1
            self._report(queue_depth=self.ongoing)
