"""The Ray Serve application: model deployments behind an OpenAI-compatible FastAPI ingress.

`build_app(args)` is the application builder that `serve run` and a RayService call with
the `args` block of the config. It binds one model deployment per configured model
(medray.serve.model, on the engine its spec names), one `Metrics` deployment, and the `Api`
ingress here; or, for one model on an engine that frees the event loop, the `Api` ingress
alone, each replica holding the model (ServeConfig.one_replica). The ingress authenticates,
validates and decodes requests, so a bad request gets its 4xx before it costs any model
time; it also runs the batch-job API and serves the web page. Here: the routes and the error
handlers; the gate in front of them is gate.py's, the routes' bodies are plain objects
(chat.py, job_api.py), schemas and errors are openai_api.py's.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (Request, the
# body model) on the ingress methods, which Serve wraps. `@serve.ingress` also pickles the
# app (routes included) when the class is defined, so everything the routes call must be
# importable (chat.py, job_api.py, openai_api.py) or defined above the class.
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from ray import serve

from medray import storage
from medray.engines import ENGINES

from .chat import Chat
from .config import ServeConfig
from .gate import Gate
from .images import PreviewRequest
from .job_api import JobApi
from .jobs import JobRequest
from .metrics import Metrics
from .local import LocalHandle
from .model import ModelDeployment, ModelServer, check_adapters
from .openai_api import ApiError, ChatRequest, error_response

log = logging.getLogger(__name__)


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


app.add_middleware(Gate)


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
    """The routes; their bodies are Chat's (chat.py) and JobApi's (job_api.py)."""

    def __init__(self, config: dict, models: dict, metrics=None):
        """`models`: name -> the model deployment's handle, or its spec (a dict) to run the
        model in this replica (build_app's "one replica")."""
        self.config = ServeConfig.model_validate(config)
        self.metrics = metrics
        self.created = int(time.time())
        from medray.serve._replica import STATE

        from .metrics import MetricsBuffer

        STATE.update(config=self.config, keys=self.config.keys(),
                     metrics=MetricsBuffer(metrics) if metrics is not None else None)
        self.servers = {name: ModelServer(m, metrics) for name, m in models.items() if isinstance(m, dict)}
        models = {name: LocalHandle(self.servers[name]) if name in self.servers else m for name, m in models.items()}
        self.chat_api = Chat(self.config, models)
        self.job_api = JobApi(self.config, self.chat_api.model)

    def __del__(self):
        for server in getattr(self, "servers", {}).values():  # the engine process stops with the replica
            server.shutdown()

    async def model_call(self, model: str, method: str):
        """A model replica's `info` or `recent_batch_sizes`, asked through the ingress, for a
        handle (`serve.get_deployment_handle("Api", app)`): it reaches the model in either
        shape of the app, its own deployment or this replica (ServeConfig.one_replica)."""
        if method not in ("info", "recent_batch_sizes"):
            raise ValueError(f"model_call asks info or recent_batch_sizes, not {method!r}")
        return await getattr(self.chat_api.models[model], method).remote()

    @app.get("/", include_in_schema=False)
    async def page(self):
        return HTMLResponse(PAGE.read_text())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        loading = [name for name, ready in (await self.chat_api.readiness()).items() if not ready]
        if loading:
            return error_response(503, f"not ready: model(s) {', '.join(loading)} still loading", kind="server_error")
        return {"status": "ready", "models": sorted(self.chat_api.models)}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(self):
        if self.metrics is None:
            raise ApiError(404, "metrics are off")
        body = await self.metrics.render.remote()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        return await self.chat_api.models_list(self.created)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        return await self.chat_api.complete(body)

    @app.post("/v1/jobs", status_code=202)
    async def submit_job(self, body: JobRequest):
        return await self.job_api.submit(body)

    @app.get("/v1/jobs/health")
    async def jobs_health(self) -> dict:
        return await self.job_api.health()

    @app.get("/v1/jobs/{job_id}/answers")
    async def job_answers(self, job_id: str):
        return await self.job_api.answers(job_id)

    @app.get("/v1/jobs/{job_id}/report")
    async def job_report(self, job_id: str):
        return await self.job_api.report(job_id)

    @app.post("/v1/images/preview")
    async def preview(self, body: PreviewRequest):
        return await self.job_api.preview(body.url)

    @app.get("/v1/dicomweb/studies")
    async def pacs_studies(self, url: str, limit: int = Query(50, ge=1, le=200), offset: int = Query(0, ge=0)):
        return await self.job_api.studies(url, limit, offset)

    @app.get("/v1/jobs")
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
        return await self.job_api.list(limit, after)

    @app.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str) -> dict:
        return await self.job_api.get(job_id)

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str) -> dict:
        return await self.job_api.cancel(job_id)


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


def _model_options(spec, own_thread: bool) -> dict:
    """Serve options of a deployment that runs model `spec`."""
    a, engine = spec.autoscaling, ENGINES[spec.engine]
    return dict(
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
                            "metrics_interval_s": 1.0, "look_back_period_s": 5.0},
        # An engine in its own environment when it has one (vLLM's: MEDRAY_VLLM_PYTHON).
        ray_actor_options={"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica,
                           "runtime_env": _user_code(own_thread, engine.runtime_env())},
        max_ongoing_requests=spec.ongoing_limit(), max_queued_requests=spec.max_queued_requests,
        # A replica that is stopped (redeploy, downscale) takes no new requests and waits
        # for the ones it holds; none runs longer than its time limit.
        graceful_shutdown_timeout_s=spec.request_timeout_s + 5, graceful_shutdown_wait_loop_s=0.5,
        max_surge_percent=spec.max_surge_percent,
    )


def build_app(args: dict[str, Any]):
    """Application builder for `serve run medray.serve:build_app` and RayService."""
    config = ServeConfig.model_validate(args)
    config.keys()  # fail at deploy time, not on the first request, when no key is set
    for spec in config.models:
        check_adapters(spec)  # an adapter the replicas cannot batch fails the deploy, not requests
        engine = ENGINES[spec.engine]
        if not engine.installed():  # refused here, at deploy time, not in a replica
            raise RuntimeError(f"model {spec.name} asks for engine {spec.engine}, which is not installed here: "
                               f"{engine.install_hint}")
        engine.check_options_of(spec.uri, spec)  # a length over the model's context: here, not in a replica

    metrics = Metrics.bind()
    if config.one_replica():
        spec = config.models[0]
        # On Serve's loop: the engine computes off it, and the ingress only awaits (USER_CODE_THREAD).
        return Api.options(**_model_options(spec, own_thread=False)).bind(
            config.model_dump(), {spec.name: spec.model_dump()}, metrics)
    models = {}
    for spec in config.models:
        models[spec.name] = ModelDeployment.options(
            name=f"model-{spec.name}", **_model_options(spec, own_thread=True),
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
