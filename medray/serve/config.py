"""The Serve application's config: the `args` block of a `serve run` / RayService application."""

from __future__ import annotations

import hashlib
import os

from pydantic import Field, model_validator

from medray.config import StrictModel
from medray.engines.types import MAX_NEW_TOKENS
from medray.engines import EngineName
from medray.engines.vllm_sizing import VLLMOptions


class Autoscaling(StrictModel):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    """Requests per replica the autoscaler aims for; batching wants this above 1."""
    upscale_delay_s: float = Field(10, ge=0)
    """How long load must stay high before a replica is added."""
    downscale_delay_s: float = Field(300, ge=0)
    """How long load must stay low before a replica is removed (model loads are slow)."""

    @model_validator(mode="after")
    def _check(self):
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Model and adapter names; no ':' because clients address an adapter as '<model>:<adapter>'."""


class ModelSpec(StrictModel):
    name: str = Field(pattern=NAME)
    """The name clients send as `model`."""
    uri: str
    """Model URI: a directory, s3://bucket/prefix or tiny://family."""
    engine: EngineName = "hf"
    """hf: medray's engine over transformers (static batches through @serve.batch); vllm:
    vLLM's async engine (requests join the running batch at the next step; the GPU engine)."""
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    """engine vllm: context length, sequences per step, the KV-cache budget (full: requests
    wait, they are not refused)."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """PEFT adapters on this base: name -> adapter directory (local or s3://). Clients send
    `model: "<name>:<adapter>"`; adapters load on first use."""
    max_loaded_adapters: int = Field(4, ge=1)
    """Adapters resident per replica; the least recently used one is unloaded beyond this."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Concurrent requests merged into one generate call."""
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=5)
    """How long a request may wait for others to fill a batch."""
    stream_interval_s: float = Field(0.05, ge=0, le=1)
    """A streamed request's text is sent in pieces at most this often (the first piece at
    once): one message per token, over the replica -> ingress -> proxy hops, cost more than
    the tokens took to generate. ray.serve.llm's stream_batching_interval_ms does the same
    (50 ms). 0 sends every token as it comes."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Requests one replica holds at once (running and waiting for its batch). None: twice
    max_batch_size, at least 16, so the batcher always has the next batch at hand."""
    max_queued_requests: int = Field(256, ge=1)
    """Requests each ingress replica lets wait for a free model replica. Past it, a request is
    answered 503 with Retry-After at once (the openai SDK retries those), instead of waiting
    without end while the autoscaler catches up. In one replica (ServeConfig.one_replica):
    the requests each replica lets wait for a free slot of its own (max_ongoing_requests)."""
    request_timeout_s: float = Field(300, gt=0)
    """A request still unanswered after this long gets a 504, and stops: a waiting request
    leaves the queue, a streamed one stops generating."""
    max_surge_percent: int = Field(0, ge=0, le=100)
    """Extra replicas, as a percentage of the running count (rounded up: at least one), that a
    redeploy may start before it stops old ones: the old replicas serve until their
    replacements are ready, then drain. Only where the cluster has room for them, or an
    autoscaler adds it: without room the redeploy waits, the old replicas serving, until
    there is some (a bench on a full 2-CPU cluster waited forever). 0 (Serve's default) stops
    old replicas first, draining them; requests then wait for the new ones, within their
    time limit."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    gpus_per_replica: float = Field(0, ge=0)
    cpus_per_replica: float = Field(0.5, gt=0)

    def ongoing_limit(self) -> int:
        if self.max_ongoing_requests:
            return self.max_ongoing_requests
        from medray.engines import ENGINES

        # hf: two batches' worth; vLLM: what its steps hold (it queues the rest itself, bounded by its KV cache).
        return ENGINES[self.engine].ongoing_limit(self)

    @model_validator(mode="after")
    def _check_adapters(self):
        import re

        bad = [a for a in self.adapters if not re.match(NAME, a)]
        if bad:
            raise ValueError(f"adapter names must match {NAME}: {bad}")
        return self


class JobsConfig(StrictModel):
    """The asynchronous batch-job API (POST /v1/jobs): where records live and what jobs may touch."""

    store: str
    """Prefix (s3:// or a directory every replica sees) that holds one JSON record per job."""
    allowed_input_prefixes: list[str] = Field(default_factory=list)
    """Prefixes a job may read images or manifests from."""
    allowed_output_prefixes: list[str] = Field(default_factory=list)
    """Prefixes a job may write results into."""
    allowed_dicomweb_servers: list[str] = Field(default_factory=list)
    """DICOMweb service roots (`dicomweb://HOST:PORT/ROOT`) a job's input may search (a PACS);
    its credentials come from MEDRAY_DICOMWEB_USER/PASSWORD or MEDRAY_DICOMWEB_TOKEN where the
    job runs, never from a job."""
    batch_size: int = Field(8, ge=1)
    rows_per_shard: int = Field(64, ge=1)
    max_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    """CPUs per generation actor. Jobs share the cluster with the serving replicas: leave
    room for both, or the pipeline waits for CPUs that replicas hold."""
    cpus_per_task: float = Field(0.5, gt=0)
    """CPUs per read/decode task."""
    preprocess_tasks: int | None = Field(None, ge=1)
    """Read/decode tasks at once per job; default 2 per generation actor (as in `medray infer`)."""
    gpus_per_actor: float = Field(0, ge=0)
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    """Upper bound a job may ask for."""
    runner_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each job's runner (the pipeline's driver) asks for, to place it on
    nodes that last, e.g. {"on_demand": 0.01} on a cluster whose other nodes are spot
    instances. Empty: the runner goes where Ray puts it (usually beside the ingress). A lost
    runner is restarted by the next GET of the job, and resumes from its shards."""

    def pipeline_resources(self) -> dict:
        """The InferConfig fields the server, not the client, decides for every job."""
        return self.model_dump(include={"batch_size", "rows_per_shard", "max_actors", "cpus_per_actor",
                                        "cpus_per_task", "preprocess_tasks", "gpus_per_actor"})


class Limits(StrictModel):
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_images: int = Field(4, ge=0)
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_tokens: int = Field(512, ge=1, le=MAX_NEW_TOKENS)
    """The most tokens a chat request may ask for (max_tokens)."""
    default_max_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    """Tokens a chat request that names no max_tokens may generate (at most max_tokens)."""
    max_prompt_chars: int = Field(16_000, ge=1)


class Ingress(StrictModel):
    """The API deployment in front of the models: cheap per request, so few replicas."""

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    """Requests one ingress replica holds at once. Serve's default (5) would cap how many
    requests ever reach a model at once, and with it the batch size."""
    target_ongoing_requests: float = Field(64, gt=0)
    cpus_per_replica: float = Field(0.1, gt=0)
    max_surge_percent: int = Field(0, ge=0, le=100)
    """As a model's max_surge_percent, for the ingress replicas."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica, to pin the ingress to nodes that stay (for example
    `{on-demand: 0.01}` with on-demand nodes started with `--resources='{"on-demand": 1}'`).
    Requests in flight at an ingress replica whose node is lost get a 500 from Serve's proxy;
    those at a lost model replica get medray's 503 and can be retried."""
    separate: bool = False
    """An app of one model on an engine that computes off the event loop (vllm) runs as one
    deployment whose replicas are the ingress and the model both (ServeConfig.one_replica),
    sized by the model's settings; the settings above are then refused. True keeps the
    ingress a deployment of its own (ingress replicas on other nodes than the model's)."""


class ServeConfig(StrictModel):
    models: list[ModelSpec] = Field(min_length=1)
    api_keys: list[str] = Field(default_factory=list)
    """Bearer tokens, each as its digest `sha256:<64 hex>` (`medray key-digest` prints it), so a
    config file holds no secret; a plain key works too. MEDRAY_API_KEYS (comma-separated, plain
    or digests) in the environment of the processes that run the app adds to them. At least
    one is required."""
    allowed_s3_prefixes: list[str] = Field(default_factory=list)
    """s3:// prefixes that image URLs may point into; empty allows no s3:// images."""
    allow_http_images: bool = False
    """Fetching http(s) image URLs is off by default (SSRF)."""
    allowed_dicomweb_servers: list[str] = Field(default_factory=list)
    """DICOMweb service roots (`dicomweb://HOST:PORT/ROOT`) whose instances a chat request may
    name as its image_url (fetched by the ingress with WADO-RS, under the image limits; the
    credentials from MEDRAY_DICOMWEB_USER/PASSWORD or MEDRAY_DICOMWEB_TOKEN where it runs)."""
    limits: Limits = Field(default_factory=Limits)
    ingress: Ingress = Field(default_factory=Ingress)
    jobs: JobsConfig | None = None
    """The batch-job API; without it POST /v1/jobs answers 404."""

    @model_validator(mode="after")
    def _check(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        # By value, not by fields set: the app's config reaches each replica dumped in full.
        ignored = sorted(name for name, field in Ingress.model_fields.items() if name != "separate"
                         and getattr(self.ingress, name) != field.get_default(call_default_factory=True))
        if ignored and self.one_replica():
            spec = self.models[0]
            raise ValueError(
                f"ingress.{', ingress.'.join(ignored)} set, but this app of one model on engine {spec.engine} runs "
                "as one deployment whose replicas are the ingress and the model both, sized by the model's "
                f"settings ({spec.name}: autoscaling, cpus_per_replica, gpus_per_replica): remove the ingress "
                "block, or set ingress.separate: true for an ingress deployment of its own")
        return self

    def one_replica(self) -> bool:
        """Whether the app is one deployment whose replicas are the ingress and the model both:
        one model, on an engine that computes off the event loop (Engine.frees_loop), unless
        ingress.separate. Requests then skip the ingress -> model hop through Ray, as
        ray.serve.llm's direct streaming makes its LLMServer the ingress: under `vllm bench
        serve` that hop and the streamed items over it took about half of both processes' CPU
        (bench/serve_peer.py --profile)."""
        from medray.engines import ENGINES

        return len(self.models) == 1 and not self.ingress.separate and ENGINES[self.models[0].engine].frees_loop

    def model(self, name: str) -> tuple[ModelSpec, str | None]:
        """'<model>' or '<model>:<adapter>' -> (spec, adapter name); KeyError says what exists."""
        base, _, adapter = name.partition(":")
        for spec in self.models:
            if spec.name == base and (not adapter or adapter in spec.adapters):
                return spec, adapter or None
        raise KeyError(f"model {name!r} does not exist; GET /v1/models lists them")

    def model_ids(self) -> list[str]:
        return [i for m in self.models for i in [m.name] + [f"{m.name}:{a}" for a in m.adapters]]

    def keys(self) -> set[str]:
        """The accepted keys as SHA-256 hex digests (a presented key is hashed and looked up)."""
        env = [k.strip() for k in os.environ.get("MEDRAY_API_KEYS", "").split(",") if k.strip()]
        digests = {key_digest(k).removeprefix("sha256:") for k in [*self.api_keys, *env]}
        if not digests:
            import socket

            # The usual cause: the variable was set for the client (`MEDRAY_API_KEYS=... serve run`),
            # while Serve builds and runs the app in the cluster's processes.
            raise ValueError(
                f"no API keys where the app runs (host {socket.gethostname()}). MEDRAY_API_KEYS is read by "
                "the cluster's processes, not by the command that submitted the config: set it where the "
                "Ray nodes start (MEDRAY_API_KEYS=... ray start ..., or a Kubernetes Secret), list digests "
                "in api_keys (`medray key-digest` prints one), or start the app with `medray serve`, which "
                "passes your MEDRAY_API_KEYS on as digests")
        return digests


def key_digest(key: str) -> str:
    """`sha256:<hex>` for a plain key; a digest is returned as it is (lower-cased)."""
    key = key.strip()
    if key.lower().startswith("sha256:"):
        digest = key[7:].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError("an api_keys digest is 'sha256:' and 64 hex digits")
        return "sha256:" + digest
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
