"""The model deployment: one replica holds one base model and its PEFT adapters, on the engine
its spec names (medray.engines.ENGINES), behind the ServingEngine protocol.

What every engine shares is written here once: the in-flight count and the metrics, the
content digests the ingress names on each answer, the request's time limit turned into a
deadline, and a stream's text merged into messages. How requests are batched is the engine's
(hf: Serve's @serve.batch into generate calls; vllm: its own steps).
"""

from __future__ import annotations

import time

from ray import serve

from medray.engines import ENGINES, Answer, GenerationSettings, Request

from .config import ModelSpec


def model_digests(spec: ModelSpec) -> dict:
    """The content digests (medray.provenance) of a spec's model and adapters, taken when the
    replica starts: the ingress names them on every answer, since a URI may hold other weights
    tomorrow."""
    from medray.provenance import digest_model

    return {"model": digest_model(spec.uri), "adapters": {n: digest_model(u) for n, u in spec.adapters.items()}}


def check_adapters(spec: ModelSpec) -> None:
    """Refuse a model spec whose adapters its engine cannot run beside each other, when the
    deployment is built and when a replica starts: never on a request."""
    from medray.engines import check_adapters as refuse

    refuse(spec.adapters, spec.name, spec.engine)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # built outside a replica (tests/test_engines.py): one name is enough
        return "local"


class ModelServer:
    """One model. `engine_cls`: the ServingEngine class, by default the registry's for the
    spec's engine; tests pass a test double, as Ray's LLMServer tests pass `engine_cls=`."""

    def __init__(self, spec: dict, metrics=None, engine_cls: type | None = None):
        self.spec = ModelSpec.model_validate(spec)
        check_adapters(self.spec)  # before the model load: a refused adapter fails fast
        from .metrics import MetricsBuffer

        self.metrics = MetricsBuffer(metrics) if metrics is not None else None
        self.replica = _replica_id()
        self.ongoing = 0
        self.engine = None  # reports made while it is built carry no gauges
        self.engine = (engine_cls or ENGINES[self.spec.engine].serving_class())(self.spec, self._report)
        self.digests = model_digests(self.spec)

    def __del__(self):
        # Serve calls this when the replica stops (redeploy, downscale), after it has drained:
        # an engine process (vLLM's engine core) stops now, not when it notices its parent has gone.
        self.shutdown()

    def shutdown(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def info(self) -> dict:
        family = self.engine.family
        return {"family": family.name, "kind": family.kind, "ongoing": self.ongoing, "engine": self.spec.engine,
                "digests": self.digests, **self.engine.state()}

    def recent_batch_sizes(self) -> list[int]:
        return self.engine.recent_batch_sizes()

    def _report(self, **fields) -> None:
        if self.metrics is not None:  # buffered; sent once a second
            gauges = self.engine.gauges() if self.engine is not None else {}
            self.metrics.model(model=self.spec.name, replica=self.replica, **gauges, **fields)

    def _started(self, time_limit_s: float | None) -> float | None:
        self.ongoing += 1
        self._report(queue_depth=self.ongoing)
        return None if time_limit_s is None else time.monotonic() + time_limit_s

    def _ended(self) -> None:
        self.ongoing -= 1
        self._report(queue_depth=self.ongoing)

    async def generate(self, request: Request, settings: GenerationSettings, adapter: str | None,
                       time_limit_s: float | None = None) -> Answer:
        """`time_limit_s`: what is left of the request's time (a duration: the ingress's clock
        is another machine's). Past it the row stops generating: the ingress cancels the call
        then too, but a replica busy with a batch would only see that when the batch ends."""
        deadline = self._started(time_limit_s)
        try:
            answer = await self.engine.generate(request, settings, adapter, deadline)
            self._report(generated_tokens=answer.completion_tokens)
            return answer
        finally:
            self._ended()

    async def stream(self, request: Request, settings: GenerationSettings, adapter: str | None,
                     time_limit_s: float | None = None):
        """Yields messages, each a list of events: text (str, consecutive text merged), then at
        the end the Answer with the usage counts. Each message is a hop to the ingress and one
        to the proxy: the engine sends one at once, then at most one every stream_interval_s.
        Generation stops after `time_limit_s`, as in `generate`, and when the caller goes away
        (closing this generator closes the engine's)."""
        deadline = self._started(time_limit_s)
        events = self.engine.stream(request, settings, adapter, deadline)
        try:
            async for batch in events:
                message: list = []
                for event in batch:
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
            await events.aclose()  # a caller that left, or the time limit: the engine stops its row
            self._ended()


ModelDeployment = serve.deployment(ModelServer, name="ModelServer")
"""The Serve deployment of ModelServer; build_app names one per model (`model-<name>`)."""
