"""The two shapes an engine takes, declared: what the batch pipeline calls (`BatchEngine`) and
what a Serve model replica calls (`ServingEngine`). The pipeline and the replica are written
against these alone; which engine runs is the registry's (medray.engines.ENGINES) business.

As Ray's `ray.serve.llm` declares its `LLMEngine` protocol, so that a test double can stand in
for vLLM (tests/test_engines.py runs the Serve replica's logic on one, without Serve).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Callable, ClassVar, Protocol, Sequence

from .types import Answer, Encoded, GenerationSettings, Request, RequestRejected

if TYPE_CHECKING:
    from medray.models.families import Family


class BatchEngine(Protocol):
    """One model (with its adapters) in one batch actor. Made by the registry entry's `batch`
    loader: `load(model, adapter=None, adapters=None, options=None)`."""

    continuous: ClassVar[bool]
    """True: it schedules rows itself (continuous batching), so the pipeline hands it a
    shard's rows at once; False: it runs static batches of the pipeline's batch_size."""

    def generate_encoded(self, encoded: Sequence[Encoded], settings: GenerationSettings = ...,
                         adapters: Sequence[str | None] | None = None,
                         deadlines: Sequence[float | None] | None = None) -> list[Answer | RequestRejected]:
        """One Answer per row, in order; a row the engine refuses (a prompt over its length)
        gets its RequestRejected in its place and fails alone. `adapters`: each row's adapter
        by name (None: the base model); without it, the engine's own `adapter` answers all."""
        ...


class ServingSpec(Protocol):
    """What a serving engine reads of its model's Serve spec (medray.serve.config.ModelSpec)."""

    uri: str
    adapters: dict[str, str]
    max_loaded_adapters: int
    max_batch_size: int
    batch_wait_timeout_s: float
    stream_interval_s: float
    vllm: object


class ServingEngine(Protocol):
    """One model in one Serve replica: concurrent requests in, answers out, each request with its
    own settings and adapter. Made by the registry entry's `serving` class as
    `cls(spec, report)`, where `report(**fields)` takes the engine's own metrics (batch_size).

    The replica (medray.serve.model.ModelServer) keeps the bookkeeping every engine shares: the
    in-flight count, metrics, digests, the deadline from the request's time limit, and the
    merging of stream text. An engine raises RequestRejected for what is the request's fault
    (the ingress answers 400); anything else it raises is the server's (500).
    """

    family: Family

    async def generate(self, request: Request, settings: GenerationSettings, adapter: str | None,
                       deadline: float | None) -> Answer:
        """The answer; past `deadline` (time.monotonic()) the row stops, or the call is cancelled."""
        ...

    def stream(self, request: Request, settings: GenerationSettings, adapter: str | None,
               deadline: float | None) -> AsyncIterator[list[str | Answer | Exception]]:
        """Messages, each a list of events that go to the client together: text deltas that add
        up to the Answer's text, then the Answer, last (or an exception: the replica raises
        it). A message at once, then at most one every spec.stream_interval_s (0: one per
        step); closing the iterator stops generating."""
        ...

    def state(self) -> dict:
        """The engine's part of the replica's `info`: its adapters (configured, resident,
        loads) and whatever it knows of its queue."""
        ...

    def gauges(self) -> dict:
        """Metrics fields the engine adds to every report (vLLM: its queue and KV cache)."""
        ...

    def recent_batch_sizes(self) -> list[int]:
        """Requests per generate call, the latest last ([] for an engine without batches)."""
        ...

    def shutdown(self) -> None:
        """Free what the engine holds beyond this process (vLLM's engine core)."""
        ...


Report = Callable[..., None]
