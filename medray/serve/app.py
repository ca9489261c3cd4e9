"""The Ray Serve application: model deployments behind an OpenAI-compatible FastAPI ingress.

`build_app(args)` is the application builder that `serve run` and a RayService call with
the `args` block of the config. It binds one `ModelServer` deployment per configured model
(medray.serve.model), one `Metrics` deployment, and the `Api` ingress here. The ingress
authenticates, validates and decodes requests, so a bad request gets its 4xx before it costs
any model time; it also runs the batch-job API (medray.serve.jobs) and serves the web page.

Why one file of this size: the ingress class holds every route (Serve builds one FastAPI
app from one class); schemas and image intake live in openai_api.py and images.py.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (Request, the
# body model) on the ingress methods, which Serve wraps. `@serve.ingress` also pickles the
# app (routes included) when the class is defined, so everything the routes call must be
# importable (openai_api.py, images.py) or defined above the class.
import asyncio
import hashlib
import importlib.util
import io
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from starlette.datastructures import Headers

from medray import storage
from medray.infer import RequestRejected
from medray.infer import Request as EngineRequest  # FastAPI's Request is the HTTP request

from .config import ServeConfig
from .jobs import (TERMINAL, JobRequest, JobStore, ensure_runner, new_record, no_node_offers, recover,
                   runner_waits, view)
from .images import PreviewRequest, read_image
from .metrics import Metrics
from .model import ModelServer, VLLMModelServer, check_adapters
from .openai_api import (ApiError, ChatRequest, ContentPart, error_response, last_line, server_fault, sse_chunks,
                         usage_of)

log = logging.getLogger(__name__)

# A replica (or its node) that died under a request: 503 and retry, never the request's fault.
REPLICA_LOST = (RayActorError, NodeDiedError, RayServeException)
# How long /v1/models and /readyz wait for a model replica's answer before calling the model
# loading. A replica that is up answers in milliseconds, unless a batch holds its event loop.
READY_PROBE_S = 1.0


# /docs is served below, not by FastAPI's default, which loads Swagger UI from a CDN: on an
# air-gapped hospital network the page stayed blank ("SwaggerUIBundle is not defined").
app = FastAPI(title="medray", description="OpenAI-compatible chat/VQA and batch jobs for medical VLMs",
              docs_url=None, redoc_url=None)
PAGE = Path(__file__).with_name("static") / "index.html"
# Swagger UI's files as the swagger-ui-py package ships them (Swagger UI 5, which reads the
# OpenAPI 3.1 FastAPI writes). Found without importing the package, which has no use here.
SWAGGER_UI = Path(importlib.util.find_spec("swagger_ui").submodule_search_locations[0]) / "static"
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}


@app.get("/docs", include_in_schema=False)
async def _docs(request: Request):
    root = request.scope.get("root_path", "").rstrip("/")  # under a route_prefix
    return get_swagger_ui_html(openapi_url=root + app.openapi_url, title="medray API",
                               swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/docs/assets/swagger-ui.css", swagger_favicon_url="data:,")


@app.get("/docs/assets/{name}", include_in_schema=False)
async def _docs_asset(name: str):
    if name not in SWAGGER_FILES:
        raise ApiError(404, f"no docs asset {name!r}")
    return FileResponse(SWAGGER_UI / name, media_type=SWAGGER_FILES[name],
                        headers={"Cache-Control": "public, max-age=86400"})


class _Gate:
    """Keys, body size and request metrics, in front of every route.

    A plain ASGI middleware, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware runs
    the route in a task of its own and passes the response, every chunk of a stream included,
    through a memory channel between the two tasks. This one only wraps `send`.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from medray.serve._replica import STATE  # imported here: see _replica's docstring

        started = time.perf_counter()
        config: ServeConfig | None = STATE.get("config")
        headers = Headers(scope=scope)
        size = headers.get("content-length")
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # under a route_prefix
        refusal = None
        if path.startswith("/v1/") and not _key_ok(headers.get("authorization", ""), STATE.get("keys", set())):
            # Every /v1/ route needs a key, checked here, before the body is read or validated:
            # a client without a key learns nothing about the API's schema, and costs nothing.
            refusal = error_response(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                     kind="authentication_error", code="invalid_api_key")
        elif config and size and size.isdigit() and int(size) > config.limits.max_body_bytes:
            # Refused before the body is read: an oversized upload costs nothing.
            refusal = error_response(413, f"request body over {config.limits.max_body_bytes} bytes; "
                                          "send smaller images")

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                # Counted when the response starts (a stream's first byte), as the route is known.
                metrics = STATE.get("metrics")
                if metrics is not None:  # buffered; sent once a second
                    route = scope.get("route")
                    metrics.request(getattr(route, "path", "unmatched"), scope.get("method", ""),
                                    message["status"], time.perf_counter() - started)
            await send(message)

        if refusal is not None:
            return await refusal(scope, receive, send_and_count)
        await self.app(scope, receive, send_and_count)


app.add_middleware(_Gate)


def _key_ok(header: str, keys: set[str]) -> bool:
    """`Authorization: Bearer <key>` with a key whose SHA-256 digest is configured."""
    scheme, _, token = header.partition(" ")
    return (scheme.lower() == "bearer" and bool(token.strip())
            and hashlib.sha256(token.strip().encode()).hexdigest() in keys)


@app.exception_handler(ApiError)
async def _apierror_response(request: Request, exc: ApiError):
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code, kind=exc.kind, headers=exc.headers)


def _storage_unavailable(request: Request, exc: Exception):
    # S3 (job records, s3:// images) unreachable or refusing us: the server's problem, said
    # plainly and without credentials or stack traces.
    log.warning("storage error on %s: %s", request.url.path, type(exc).__name__)
    return error_response(503, f"storage is unavailable ({type(exc).__name__}); try again later", kind="server_error")


for _exc in (storage.StorageError, BotoCoreError, ClientError):
    app.add_exception_handler(_exc, _storage_unavailable)


@app.exception_handler(storage.AccessDenied)
async def _access_denied(request: Request, exc: storage.AccessDenied):
    return error_response(403, str(exc), kind="permission_error")


@app.exception_handler(RequestValidationError)
async def _validationerror_response(request: Request, exc: RequestValidationError):
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and media != "application/json":
        # FastAPI reads a body as JSON only under this header; without it (curl -d sends
        # form encoding) the error would be "Input should be a valid dictionary".
        return error_response(415, f"send the body as JSON with the header 'Content-Type: application/json' "
                                   f"(got {media or 'no Content-Type'}; with curl: -H 'Content-Type: application/json')")
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return error_response(400, f"invalid request: {problems}")


@serve.deployment
@serve.ingress(app)
class Api:
    def __init__(self, config: dict, models: dict, metrics=None):
        self.config = ServeConfig.model_validate(config)
        self.keys = self.config.keys()
        self.models = models  # base model name -> DeploymentHandle
        self.metrics = metrics
        self.created = int(time.time())
        self.jobs = JobStore(self.config.jobs.store) if self.config.jobs else None
        from medray.serve._replica import STATE

        from .metrics import MetricsBuffer

        STATE.update(config=self.config, keys=self.keys,
                     metrics=MetricsBuffer(metrics) if metrics is not None else None)
        self.info: dict = {}  # model name -> its family kind; fixed for a deployment's life
        if self.jobs:
            try:  # jobs left unfinished by an earlier deployment continue
                n = recover(self.jobs, self.config.jobs.runner_resources)
                if n:
                    log.info("looked after %d unfinished jobs", n)
            except Exception:
                log.exception("job recovery failed; GET /v1/jobs/{id} retries it per job")

    # -- helpers (API keys are checked by the middleware, before a route runs)
    def _convert(self, req: ChatRequest, kind: str) -> tuple[list[dict], list]:
        messages, images, chars = [], [], 0
        for i, m in enumerate(req.messages):
            parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
            content = []
            for j, part in enumerate(parts):
                if part.type == "text":
                    chars += len(part.text or "")
                    content.append({"type": "text", "text": part.text or ""})
                else:
                    if part.image_url is None:
                        raise ApiError(400, "image_url part without image_url", param=f"messages.{i}.content.{j}")
                    if kind == "text":
                        raise ApiError(400, f"model {req.model} takes text only", param=f"messages.{i}.content.{j}")
                    images.append(read_image(part.image_url.url, f"messages.{i}.content.{j}.image_url", self.config))
                    content.append({"type": "image"})
            messages.append({"role": m.role, "content": content})
        if len(images) > self.config.limits.max_images:
            raise ApiError(400, f"at most {self.config.limits.max_images} images per request", param="messages")
        if chars > self.config.limits.max_prompt_chars:
            raise ApiError(400, f"prompt over {self.config.limits.max_prompt_chars} characters", param="messages")
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        return messages, images

    def _model(self, name: str):
        try:
            spec, adapter = self.config.model(name)
        except KeyError as e:
            raise ApiError(404, e.args[0], param="model", code="model_not_found") from None
        return spec, adapter

    async def _answer(self, awaitable, response, spec, deadline: float):
        """Await a model replica's answer (or first stream event) within the request's time
        limit: the request's faults become 400, the server's 500 (503 when a replica went away or the
        queue is full, 504 past the time limit)."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            response.cancel()  # leaves the queue, or stops generating; frees the slot either way
            log.warning("request to %s over its time limit (%.0f s)", spec.name, spec.request_timeout_s)
            raise ApiError(504, f"no answer from model {spec.name!r} within {spec.request_timeout_s:g} s; the "
                                "request was stopped. Retry later, or ask for fewer tokens",
                           kind="timeout", code="timeout") from None
        except BackPressureError:
            # Serve's queue for this model (max_queued_requests) is full: the caller should come
            # back shortly, and the openai SDK does so for a 503 on its own.
            raise ApiError(503, f"model {spec.name!r} is busy: its queue is full; retry after a moment",
                           kind="server_error", code="overloaded", headers={"Retry-After": "1"}) from None
        except REPLICA_LOST as e:  # the server's fault (a node or replica went away), not the request's
            log.warning("model replica lost: %s", type(e).__name__)
            raise ApiError(503, f"the model replica serving {spec.name!r} went away; retry the request "
                                "(Serve is replacing it)", kind="server_error", headers={"Retry-After": "1"}) from None
        except StopAsyncIteration:
            return None
        except RequestRejected as e:  # its messages do not render into a prompt for this model, or do not fit it
            raise ApiError(400, f"the model could not answer this request: {last_line(e)}") from None
        except Exception as e:  # failed in the replica's code, on a request it had accepted: the server's fault
            raise server_fault(spec.name, e) from None

    # -- routes
    @app.get("/", include_in_schema=False)
    async def page(self):
        return HTMLResponse(PAGE.read_text())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def _ready(self, name: str) -> bool:
        """Whether model `name` has a replica that answers. Serve brings the ingress up before
        the model replicas have loaded (20 s and more), and a call made meanwhile waits for
        them: asked here with a short time limit, so the answer is "loading", not a wait.
        Once a replica answered, the model stays ready (Serve replaces lost replicas, and
        requests wait for them in its queue)."""
        if name in self.info:
            return True
        spec, _ = self.config.model(name)
        if spec.autoscaling.min_replicas == 0:
            return True  # scaled to zero by design: a request starts a replica; a probe must not
        response = self.models[name].info.remote()
        try:
            self.info[name] = await asyncio.wait_for(response, READY_PROBE_S)
        except asyncio.TimeoutError:
            response.cancel()
            return False
        except REPLICA_LOST:
            return False
        return True

    async def _readiness(self) -> dict[str, bool]:
        """_ready of every model, asked at once: a loading model costs READY_PROBE_S once."""
        return dict(zip(self.models, await asyncio.gather(*map(self._ready, self.models))))

    @app.get("/readyz")
    async def readyz(self):
        loading = [name for name, ready in (await self._readiness()).items() if not ready]
        if loading:
            return error_response(503, f"not ready: model(s) {', '.join(loading)} still loading", kind="server_error")
        return {"status": "ready", "models": sorted(self.models)}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self):
        if self.metrics is None:
            raise ApiError(404, "metrics are off")
        body = await self.metrics.render.remote()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        # `ready` beside the OpenAI fields (clients ignore fields they do not know, as they do
        # vLLM's max_model_len): false while the model's replicas load. A request sent then
        # is not refused; it waits in Serve's queue until a replica is up.
        ready = await self._readiness()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "medray", "ready": ready[name.partition(":")[0]]}
                                           for name in self.config.model_ids()]}

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        spec, adapter = self._model(body.model)
        # Checked before anything else: a bad value is refused without waiting on a replica.
        settings = body.to_settings(default_max_tokens=self.config.limits.default_max_tokens,
                                   limit=self.config.limits.max_tokens)
        handle = self.models[spec.name]
        deadline = time.monotonic() + spec.request_timeout_s
        if spec.name not in self.info:  # asked of a replica once; it queues like any call
            info = handle.info.remote()
            self.info[spec.name] = await self._answer(info, info, spec, deadline)
        kind = self.info[spec.name]["kind"]
        if any(not p.image_url.url.startswith("data:") for m in body.messages if not isinstance(m.content, str)
               for p in m.content if p.image_url is not None):
            # An image from S3 or http(s): read off the event loop, which moves every request
            # of this replica (USER_CODE_THREAD). data: URLs decode in place.
            messages, images = await asyncio.to_thread(self._convert, body, kind)
        else:
            messages, images = self._convert(body, kind)
        # The engine's own typed objects cross the hop to the replica; equal settings are equal
        # (frozen) objects, which is how the replica groups a batch into generate calls.
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = self._digest_headers(spec.name, adapter)
        # The time limit goes with the call, as a duration (the replica's clock is another
        # machine's), and half a second longer: the ingress answers 504 at the limit itself,
        # and a replica that stopped first would have its cut-short answer sent as a 200.
        call = (EngineRequest(messages, images), settings, adapter, spec.request_timeout_s + 0.5)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = handle.options(stream=True).stream.remote(*call)
            # The first event is awaited here, so a full queue, a time-out or a lost replica
            # still gets its status code; after it the 200 is sent and errors go in the stream.
            first = await self._answer(events.__anext__(), events, spec, deadline)
            return StreamingResponse(sse_chunks(events, completion_id, body.model, usage, first, deadline),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        response = handle.generate.remote(*call)
        answer = await self._answer(response, response, spec, deadline)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": usage_of(answer),
        }, headers=headers)

    def _digest_headers(self, model: str, adapter: str | None) -> dict[str, str]:
        """What answered, by content (medray.provenance): the model's digest, and the adapter's
        when the request named one. Taken by the replica at start; the URI alone may point at
        other weights tomorrow."""
        digests = self.info[model].get("digests") or {}
        headers = {"X-Medray-Model-Digest": digests["model"]} if digests.get("model") else {}
        if adapter and digests.get("adapters", {}).get(adapter):
            headers["X-Medray-Adapter-Digest"] = digests["adapters"][adapter]
        return headers

    # -- batch jobs
    def _job_store(self) -> JobStore:
        if self.jobs is None:
            raise ApiError(404, "batch jobs are not configured on this server (set `jobs` in the config)")
        return self.jobs

    def _ensure_runner(self, record: dict) -> dict:
        return ensure_runner(self._job_store(), record, self.config.jobs.runner_resources)

    def _job(self, job_id: str) -> dict:
        record = self._job_store().get(job_id)
        if record is None:
            raise ApiError(404, f"job {job_id!r} does not exist; GET /v1/jobs lists them", param="id")
        return record

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(self, body: JobRequest):
        store, jobs = self._job_store(), self.config.jobs
        spec, adapter = self._model(body.model)
        if not storage.within(body.input, jobs.allowed_input_prefixes):
            raise ApiError(403, f"input {body.input} is outside the allowed input prefixes", param="input",
                           kind="permission_error")
        if body.image_folder and not storage.within(body.image_folder, jobs.allowed_input_prefixes):
            raise ApiError(403, f"image_folder {body.image_folder} is outside the allowed input prefixes",
                           param="image_folder", kind="permission_error")
        if not storage.within(body.output, jobs.allowed_output_prefixes):
            raise ApiError(403, f"output {body.output} is outside the allowed output prefixes", param="output",
                           kind="permission_error")
        if body.max_new_tokens > jobs.max_new_tokens:
            raise ApiError(400, f"max_new_tokens may be at most {jobs.max_new_tokens}", param="max_new_tokens")
        records = body.input.lower().endswith((".jsonl", ".json", ".parquet"))
        if records and not await asyncio.to_thread(storage.exists, body.input):
            raise ApiError(404, f"input manifest {body.input} does not exist", param="input")
        from medray.infer import InferConfig

        try:
            # A job runs on its model's engine, sized as the model is. Rows of a records file
            # may name any of the model's adapters (an `adapter` field), as requests do.
            infer = InferConfig(model=spec.uri, adapter=spec.adapters[adapter] if adapter else None,
                                adapters=spec.adapters if records else {}, engine=spec.engine, vllm=spec.vllm,
                                allowed_image_prefixes=jobs.allowed_input_prefixes,
                                **body.model_dump(exclude={"model"}), **jobs.pipeline_resources())
        except ValidationError as e:
            raise ApiError(400, f"invalid job: {e.errors()[0]['msg']}") from None
        record = new_record(store.new_id(), body, infer.model_dump(mode="json"))

        def submit() -> dict:  # S3 and the GCS: off the event loop, as every job route's store calls
            store.put(record)
            started = self._ensure_runner(record)
            return view(started, waiting=runner_waits(started, jobs.runner_resources))

        return await asyncio.to_thread(submit)

    @app.get("/v1/jobs/health")
    async def jobs_health(self) -> dict:
        """Whether batch jobs can run here, and if not, what to configure: the web page asks
        this first, so a server without a usable job store says why instead of failing."""
        if self.jobs is None:
            return {"available": False, "store": None,
                    "problem": "batch jobs are not configured on this server (set `jobs` in the Serve config)"}
        problem = await asyncio.to_thread(self.jobs.problem)
        return {"available": problem is None, "store": self.jobs.prefix, "problem": problem}

    @app.get("/v1/jobs/{job_id}/answers")
    async def job_answers(self, job_id: str):
        """The job's output rows as JSON lines (a download: a person opens it, a script reads it)."""
        from medray.data.shards import as_values, read_shards

        record = await asyncio.to_thread(self._job, job_id)
        rows = await asyncio.to_thread(read_shards, record["output"])
        body = "".join(json.dumps(as_values(r)) + "\n" for r in sorted(rows, key=lambda r: str(r["id"])))
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="{job_id}-answers.jsonl"'})

    @app.get("/v1/jobs/{job_id}/report")
    async def job_report(self, job_id: str):
        """The job's output as a page: each row's image, question and answer, and its lineage."""
        from medray.report import answers_page

        record = await asyncio.to_thread(self._job, job_id)
        page = await asyncio.to_thread(answers_page, record["output"], f"medray job {job_id}",
                                       image_prefixes=self.config.jobs.allowed_input_prefixes)
        return HTMLResponse(page)

    @app.post("/v1/images/preview")
    async def preview(self, body: PreviewRequest):
        """The image as the server decodes it for the model (a DICOM windowed, a TIFF read), as
        PNG: what a browser cannot draw itself, the page shows from here."""
        image = await asyncio.to_thread(read_image, body.url, "url", self.config)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/v1/jobs")
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
        """The newest jobs first, a page at a time, as OpenAI's list routes page: `limit`, and
        `after` the last id of the page before (`last_id`) while `has_more`."""
        store = self._job_store()
        if after is not None and not store.valid_id(after):
            raise ApiError(400, f"after must be a job id from an earlier page's last_id, not {after[:40]!r}",
                           param="after")
        # Off the event loop: S3 reads here would hold up every chat request on this replica.
        records, more = await asyncio.to_thread(store.list, limit, after)
        resources = self.config.jobs.runner_resources
        waiting = no_node_offers(resources) if resources and any(r["status"] == "queued" for r in records) else None
        return {"object": "list", "data": [view(r, waiting=waiting if r["status"] == "queued" else None)
                                           for r in records],
                "first_id": records[0]["id"] if records else None,
                "last_id": records[-1]["id"] if records else None, "has_more": more}

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str) -> dict:
        store = self._job_store()

        def read() -> dict:
            record = self._ensure_runner(self._job(job_id))  # a job whose runner was lost goes on
            return view(record, cancel_requested=store.cancel_requested(job_id),
                        waiting=runner_waits(record, self.config.jobs.runner_resources))

        return await asyncio.to_thread(read)

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str) -> dict:
        store = self._job_store()

        def cancel() -> dict:
            record = self._job(job_id)
            if record["status"] in TERMINAL:
                raise ApiError(409, f"job {job_id} has already finished ({record['status']}); nothing to cancel",
                               code="job_finished")
            store.request_cancel(job_id)
            record = self._ensure_runner(record)  # without a live runner, this marks it cancelled
            return view(record, cancel_requested=True)

        return await asyncio.to_thread(cancel)


# Where a replica runs its code, read by Serve when the replica's process starts, so it is
# set per deployment, whatever the nodes' environment says (Ray's throughput preset,
# raycluster.SERVE_FAST_PATH_ENV, would put every replica on Serve's loop):
# - the ingress on the event loop that also moves Serve's own requests and stream items: it
#   only awaits, and each hop between two loops cost latency (bench/serve.py, 2 CPUs, median
#   of 3: HTTP + Serve added 7.9 ms at p50 against 9.3 ms with a thread of its own);
# - model replicas on a thread of their own (Serve's default): the hf replica blocks its loop
#   while a batch step computes (model.py says why), and on Serve's loop streamed chunks waited
#   for the steps: streamed req/s fell to 0.61-0.83x the non-streamed, against 0.76-0.94x. The
#   vLLM replica measured no better on Serve's loop (125 against 134 req/s).
USER_CODE_THREAD = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"


def _user_code(own_thread: bool, runtime_env: dict | None = None) -> dict:
    """A deployment's runtime_env with its user-code placement (USER_CODE_THREAD) added."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), USER_CODE_THREAD: "1" if own_thread else "0"}
    return env


def build_app(args: dict[str, Any]):
    """Application builder for `serve run medray.serve:build_app` and RayService."""
    config = ServeConfig.model_validate(args)
    config.keys()  # fail at deploy time, not on the first request, when no key is set
    for spec in config.models:
        check_adapters(spec)  # an adapter the replicas cannot batch fails the deploy, not requests
    from medray.infer.vllm_engine import actor_runtime_env, check_options_for, choose_engine

    metrics = Metrics.bind()
    models = {}
    for spec in config.models:
        a = spec.autoscaling
        # vllm where vLLM is not installed: refused here, at deploy time.
        engine, _ = choose_engine(spec.engine, model=spec.uri)
        if engine == "vllm":
            check_options_for(spec.uri, spec.vllm)  # a length over the model's context: here, not in a replica
        # vLLM's in its own environment when it has one (MEDRAY_VLLM_PYTHON).
        actor_options = {"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica,
                         "runtime_env": _user_code(True, actor_runtime_env() if engine == "vllm" else None)}
        models[spec.name] = (VLLMModelServer if engine == "vllm" else ModelServer).options(
            name=f"model-{spec.name}",
            autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                "target_ongoing_requests": a.target_ongoing_requests,
                                "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
                                "metrics_interval_s": 1.0, "look_back_period_s": 5.0},
            ray_actor_options=actor_options,
            max_ongoing_requests=spec.ongoing_limit(), max_queued_requests=spec.max_queued_requests,
            # A replica that is stopped (redeploy, downscale) takes no new requests and waits
            # for the ones it holds; none runs longer than its time limit.
            graceful_shutdown_timeout_s=spec.request_timeout_s + 5, graceful_shutdown_wait_loop_s=0.5,
            max_surge_percent=spec.max_surge_percent,
            # The ingress logs each request already; a second access-log line per request on
            # the model hop costs latency (a file write each) and tells nothing new.
            logging_config={"enable_access_log": False},
        ).bind(spec.model_dump(), metrics)
    ingress = config.ingress
    return Api.options(
        ray_actor_options={"num_cpus": ingress.cpus_per_replica, "resources": ingress.resources,
                           "runtime_env": _user_code(False)},
        max_surge_percent=ingress.max_surge_percent,
        max_ongoing_requests=ingress.max_ongoing_requests,
        autoscaling_config={"min_replicas": ingress.min_replicas, "max_replicas": ingress.max_replicas,
                            "target_ongoing_requests": ingress.target_ongoing_requests,
                            "metrics_interval_s": 1.0, "look_back_period_s": 5.0},
    ).bind(config.model_dump(), models, metrics)
