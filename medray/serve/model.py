"""The model deployment: one replica holds one base model, its PEFT adapters, and a batcher.

Concurrent requests are merged into one generate call by `@serve.batch`; rows that name
different adapters still share that call (PEFT mixed-adapter batches), so multi-LoRA
serving costs no extra passes. Streaming requests run one per call, token by token, beside
the batches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager

from ray import serve

from medray.infer import Answer, GenerationSettings, Request

from .config import ModelSpec

log = logging.getLogger(__name__)


class AdapterCache:
    """PEFT adapters loaded on demand into one base model, at most `capacity` at a time (LRU).

    Generation reads the adapter set and loading changes it, so they are ordered by a
    readers-writer lock: any number of generate calls at once, or one load/unload alone.
    An adapter in use by a running generation is never unloaded.
    """

    def __init__(self, loaded, uris: dict[str, str], capacity: int):
        self.loaded, self.uris, self.capacity = loaded, uris, capacity
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.in_use: dict[str, int] = {}
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self.loads = 0

    @contextmanager
    def use(self, names: list[str | None]):
        """Make `names` resident and keep them so while the block runs (a generate call)."""
        wanted = sorted({n for n in names if n})
        with self._cond:
            for name in wanted:  # claimed first, so loading one cannot evict another we need
                self.in_use[name] = self.in_use.get(name, 0) + 1
            try:
                for name in wanted:  # loads happen under the write side, one at a time
                    if name not in self.resident:
                        self._load(name)
                    self.resident.move_to_end(name)
            except BaseException:
                for name in wanted:
                    self.in_use[name] -= 1
                raise
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                for name in wanted:
                    self.in_use[name] -= 1
                self._evict()
                self._cond.notify_all()

    def _load(self, name: str) -> None:
        from peft import PeftModel

        from medray.models.loading import resolve_adapter_uri

        while self._readers or self._writing:
            self._cond.wait()
        self._writing = True
        try:
            path = str(resolve_adapter_uri(self.uris[name]))
            if isinstance(self.loaded.model, PeftModel):
                self.loaded.model.load_adapter(path, adapter_name=name)
            else:
                self.loaded.model = PeftModel.from_pretrained(self.loaded.model, path, adapter_name=name)
            self.loaded.model.eval()
            self.resident[name] = None
            self.loads += 1
            log.info("loaded adapter %s", name)
        finally:
            self._writing = False
            self._cond.notify_all()
        self._evict()

    def _evict(self) -> None:
        # Called with the condition held; unloading waits until no generation runs.
        while len(self.resident) > self.capacity:
            victim = next((n for n in self.resident if not self.in_use.get(n)), None)
            if victim is None or self._readers:
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
    import json

    from medray import storage

    try:
        cfg = json.loads(storage.read_bytes(uri.rstrip("/") + "/adapter_config.json"))
    except Exception as e:
        return f"adapter {name!r} ({uri}) has no readable adapter_config.json ({type(e).__name__}): not a PEFT adapter"
    where = f"adapter {name!r} of model {model!r} ({uri})"
    if cfg.get("peft_type", "LORA") != "LORA":
        return f"{where} is a {cfg.get('peft_type')} adapter; the server batches LoRA adapters only"
    if cfg.get("modules_to_save"):
        return (f"{where} trains {sorted(cfg['modules_to_save'])} in full beside its LoRA (PEFT modules_to_save), "
                "as LLaVA's LoRA recipes do for the projector. Rows of different adapters share one generate "
                "call, and PEFT can batch only LoRA layers, so this adapter would break every request to the "
                "model. Serve the stage's merged export instead (set lora.merge: true; `medray train` writes the "
                "merged model in the stage directory, beside adapter/) as a model of its own, or train the "
                "adapter with those modules frozen")
    if cfg.get("target_parameters"):
        return (f"{where} puts LoRA on parameters {sorted(cfg['target_parameters'])} (fused MoE experts), which "
                "PEFT cannot batch with other adapters. Serve the stage's merged export (lora.merge: true) as a "
                "model of its own")
    return None


def check_adapters(spec: ModelSpec) -> None:
    """Refuse a model spec whose adapters this server cannot run (adapter_problem)."""
    problems = [p for name, uri in spec.adapters.items() if (p := adapter_problem(name, uri, spec.name))]
    if problems:
        raise ValueError("; ".join(problems))


@serve.deployment
class ModelServer:
    """One model; concurrent requests are batched into one generate call."""

    def __init__(self, spec: dict, metrics=None):
        from medray.infer import GenerationEngine
        from medray.models import load_model

        self.spec = ModelSpec.model_validate(spec)
        check_adapters(self.spec)  # before the model load: a refused adapter fails fast
        self.engine = GenerationEngine(load_model(self.spec.uri))
        self.family = self.engine.loaded.family
        self.adapters = AdapterCache(self.engine.loaded, self.spec.adapters, self.spec.max_loaded_adapters)
        self.batch.set_max_batch_size(self.spec.max_batch_size)
        self.batch.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        from .metrics import MetricsBuffer

        self.metrics = MetricsBuffer(metrics) if metrics is not None else None
        self.ongoing = 0
        self.replica = serve.get_replica_context().replica_id.unique_id

    def info(self) -> dict:
        return {"family": self.family.name, "kind": self.family.kind, "ongoing": self.ongoing,
                "adapters": {"configured": sorted(self.spec.adapters), "resident": list(self.adapters.resident),
                             "loads": self.adapters.loads}}

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
        # Generation runs on the replica's event loop, blocking it, on purpose: requests that
        # arrive meanwhile wait in Serve's queue and are taken all at once as the next batch.
        # In a thread, the Python-heavy generate loop and the request intake fought over the
        # GIL: measured 2-5 requests per batch and 94 req/s, against 11-28 and 171 req/s here
        # (tiny LLaVA, 32 concurrent callers, 2 CPUs). Health checks wait at most one batch.
        results = self._generate_batch(requests, settings, adapters, deadlines)
        self._report(batch_size=len(requests), generated_tokens=sum(r.completion_tokens for r in results
                                                                    if isinstance(r, Answer)))
        return results

    def _generate_batch(self, requests: list[Request], settings: list[GenerationSettings],
                        adapters: list[str | None], deadlines: list[float | None]) -> list:
        results: list = [None] * len(requests)
        groups: dict[GenerationSettings, list[int]] = {}
        for i, s in enumerate(settings):  # one generate call per distinct decoding setting
            groups.setdefault(s, []).append(i)
        for group_settings, idx in groups.items():
            names = [adapters[i] for i in idx]
            try:
                encoded = [self.engine.encode(requests[i]) for i in idx]
                with self.adapters.use(names):
                    answers = self.engine.generate_encoded(encoded, group_settings, names,
                                                           [deadlines[i] for i in idx])
                for i, a in zip(idx, answers):
                    results[i] = a
            except Exception as e:  # this group's requests fail; the other groups still answer
                log.warning("generation failed for %d requests: %s: %s", len(idx), type(e).__name__, e)
                for i in idx:
                    results[i] = e
        return results

    async def stream(self, request: Request, settings: GenerationSettings, adapter: str | None,
                     time_limit_s: float | None = None):
        """Yields text deltas (str), then the final Answer with the usage counts. Generation
        stops after `time_limit_s`, as in `generate`."""
        self.ongoing += 1
        self._report(queue_depth=self.ongoing)
        cancel = threading.Event()
        timer = threading.Timer(time_limit_s, cancel.set) if time_limit_s is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def drive():
            # One thread owns the whole generation, adapter lease included, so a client that
            # goes away only sets `cancel`: the thread stops at the next token and cleans up.
            try:
                encoded = self.engine.encode(request)
                with self.adapters.use([adapter]):
                    for event in self.engine.stream(encoded, settings, adapter, cancel):
                        loop.call_soon_threadsafe(events.put_nowait, event)
            except Exception as e:
                loop.call_soon_threadsafe(events.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, None)

        threading.Thread(target=drive, name="medray-stream", daemon=True).start()
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, Answer):
                    self._report(batch_size=1, generated_tokens=event.completion_tokens)
                yield event
        finally:
            cancel.set()
            if timer is not None:
                timer.cancel()
            self.ongoing -= 1
            self._report(queue_depth=self.ongoing)
