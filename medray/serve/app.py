"""The Ray Serve application: model deployments behind an OpenAI-compatible FastAPI ingress.

`build_app(args)` is the application builder that `serve run` and a RayService call with
the `args` block of the config. One `ModelServer` deployment per configured model merges
concurrent requests into one generate call (`@serve.batch`). The `Api` ingress
authenticates, validates and decodes requests, so a bad request gets its 4xx before it costs
any model time.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (Request, the
# body model) on the ingress methods, which Serve wraps.
import base64
import binascii
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from .config import ModelSpec, ServeConfig

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error for the client, rendered in OpenAI's error format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, *, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


# ----------------------------------------------------------------------------- request models
class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


# ----------------------------------------------------------------------------- model deployment
@serve.deployment
class ModelServer:
    """One model; concurrent requests are batched into one generate call."""

    def __init__(self, spec: dict):
        from medray.infer import GenerationEngine
        from medray.models import load_model

        self.spec = ModelSpec.model_validate(spec)
        self.engine = GenerationEngine(load_model(self.spec.uri))
        self.family = self.engine.loaded.family
        self.generate.set_max_batch_size(self.spec.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    def info(self) -> dict:
        return {"family": self.family.name, "kind": self.family.kind}

    def recent_batch_sizes(self) -> list[int]:
        return list(self.batch_sizes[-1000:])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate(self, items: list[dict]) -> list[dict]:
        from medray.infer import GenerationSettings, Request

        self.batch_sizes.append(len(items))
        results: list[dict | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):  # one generate call per distinct decoding setting
            groups.setdefault(json.dumps(item["settings"], sort_keys=True), []).append(i)
        for key, idx in groups.items():
            settings = GenerationSettings(**{**json.loads(key), "stop": tuple(json.loads(key)["stop"])})
            answers = self.engine.generate([Request(items[i]["messages"], items[i]["images"]) for i in idx],
                                           settings)
            for i, a in zip(idx, answers):
                results[i] = {"text": a.text, "prompt_tokens": a.prompt_tokens,
                              "completion_tokens": a.completion_tokens, "finish_reason": a.finish_reason,
                              "batch_size": len(items)}
        return results


# ----------------------------------------------------------------------------- ingress
app = FastAPI(title="medray", description="OpenAI-compatible chat/VQA for medical VLMs")


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _error(exc.status, exc.message, param=exc.param, code=exc.code, kind=exc.kind)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}"
                         for e in exc.errors())
    return _error(400, f"invalid request: {problems}")


@serve.deployment
@serve.ingress(app)
class Api:
    def __init__(self, config: dict, models: dict):
        self.config = ServeConfig.model_validate(config)
        self.keys = self.config.keys()
        self.models = models  # name -> DeploymentHandle
        self.created = int(time.time())

    # -- helpers
    def _auth(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.keys:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    def _image(self, url: str, param: str):
        from medray import storage
        from medray.data import ImageDecodeError, ImageOptions, load_image

        limits = self.config.limits
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise ApiError(400, "image data URLs must be base64 (data:image/png;base64,...)", param=param)
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "image data URL is not valid base64", param=param) from None
            name = "data-url"
        elif url.startswith("s3://"):
            allowed = self.config.allowed_s3_prefixes
            if not any(url == p.rstrip("/") or url.startswith(p.rstrip("/") + "/") for p in allowed):
                raise ApiError(403, f"{url} is outside the allowed S3 prefixes", param=param,
                               kind="permission_error")
            try:
                if storage.default_storage().size(url) > limits.max_image_bytes:
                    raise ApiError(413, f"image over {limits.max_image_bytes} bytes", param=param)
                data = storage.read_bytes(url)
            except FileNotFoundError:
                raise ApiError(404, f"{url} does not exist", param=param) from None
            name = url
        elif url.startswith(("http://", "https://")):
            if not self.config.allow_http_images:
                raise ApiError(400, "http(s) image URLs are disabled on this server; send a data: URL", param=param)
            data = self._fetch(url, param)
            name = url
        else:
            raise ApiError(400, "image_url must be a data: URL or an s3:// URI", param=param)
        if len(data) > limits.max_image_bytes:
            raise ApiError(413, f"image over {limits.max_image_bytes} bytes", param=param)
        try:
            return load_image(data, name, ImageOptions(max_pixels=limits.max_pixels))
        except ImageDecodeError as e:
            raise ApiError(400, f"{param}: {e.reason}", param=param) from None

    def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        limit = self.config.limits.max_image_bytes
        try:
            with httpx.stream("GET", url, timeout=10.0, follow_redirects=False) as r:
                if r.status_code != 200:
                    raise ApiError(400, f"fetching the image gave HTTP {r.status_code}", param=param)
                data = b""
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > limit:
                        raise ApiError(413, f"image over {limit} bytes", param=param)
                return data
        except httpx.HTTPError as e:
            raise ApiError(400, f"could not fetch the image: {type(e).__name__}", param=param) from None

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
                    images.append(self._image(part.image_url.url, f"messages.{i}.content.{j}.image_url"))
                    content.append({"type": "image"})
            messages.append({"role": m.role, "content": content})
        if len(images) > self.config.limits.max_images:
            raise ApiError(400, f"at most {self.config.limits.max_images} images per request", param="messages")
        if chars > self.config.limits.max_prompt_chars:
            raise ApiError(400, f"prompt over {self.config.limits.max_prompt_chars} characters", param="messages")
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        return messages, images

    # -- routes
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:
            for handle in self.models.values():
                await handle.info.remote()
        except Exception as e:
            return _error(503, f"not ready: {e}", kind="server_error")
        return {"status": "ready", "models": sorted(self.models)}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                            "owned_by": "medray"} for name in sorted(self.models)]}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request, body: ChatRequest):
        self._auth(request)
        size = int(request.headers.get("content-length") or 0)
        if size > self.config.limits.max_body_bytes:
            raise ApiError(413, f"request body over {self.config.limits.max_body_bytes} bytes")
        if body.model not in self.models:
            raise ApiError(404, f"model {body.model!r} does not exist; GET /v1/models lists them", param="model",
                           code="model_not_found")
        if body.stream:
            raise ApiError(400, "stream=true is not supported yet", param="stream")
        max_tokens = body.max_tokens or min(256, self.config.limits.max_tokens)
        if max_tokens > self.config.limits.max_tokens:
            raise ApiError(400, f"max_tokens may be at most {self.config.limits.max_tokens}", param="max_tokens")
        handle = self.models[body.model]
        info = await handle.info.remote()
        messages, images = self._convert(body, info["kind"])
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        settings = {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                    "stop": stop, "seed": body.seed}
        try:
            out = await handle.generate.remote({"messages": messages, "images": images, "settings": settings})
        except Exception as e:  # a template or model refusal: the request asked for something it cannot do
            log.warning("generation failed: %s", type(e).__name__)
            raise ApiError(400, f"the model could not answer this request: {str(e).splitlines()[-1][:300]}")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": out["finish_reason"]}],
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }


def build_app(args: dict[str, Any]):
    """Application builder for `serve run medray.serve:build_app` and RayService."""
    config = ServeConfig.model_validate(args)
    config.keys()  # fail at deploy time, not on the first request, when no key is set
    models = {}
    for spec in config.models:
        a = spec.autoscaling
        models[spec.name] = ModelServer.options(
            name=f"model-{spec.name}",
            autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                "target_ongoing_requests": a.target_ongoing_requests,
                                "metrics_interval_s": 1.0, "look_back_period_s": 5.0},
            ray_actor_options={"num_cpus": spec.cpus_per_replica, "num_gpus": spec.gpus_per_replica},
            max_ongoing_requests=max(2 * spec.max_batch_size, 16),
        ).bind(spec.model_dump())
    return Api.options(ray_actor_options={"num_cpus": 0.1}).bind(config.model_dump(), models)
