"""What the chat routes do, apart from the routes: `Chat` takes a validated OpenAI request and
the model deployments' handles, and returns the response. The ingress (app.py) only routes to
it, so this runs, and is tested, without Serve: any object with DeploymentHandle's calls
(`generate.remote`, `options(stream=True).stream.remote`, `info.remote`) stands in for a
model (tests/test_engines.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from medray.engines.types import Request as EngineRequest

from .config import ServeConfig
from .images import read_image
from .openai_api import REPLICA_LOST, ApiError, ChatRequest, ContentPart, failure, sse_chunks, usage_of

# How long /v1/models and /readyz wait for a model replica's answer before calling the model
# loading. A replica that is up answers in milliseconds, unless a batch holds its event loop.
READY_PROBE_S = 1.0


class Chat:
    def __init__(self, config: ServeConfig, models: dict):
        self.config = config
        self.models = models  # base model name -> DeploymentHandle
        self.info: dict = {}  # model name -> its replica's info (family kind, digests); fixed for its life

    def model(self, name: str):
        """(spec, adapter) of a client's model name, or a 404 naming the field."""
        try:
            return self.config.model(name)
        except KeyError as e:
            raise ApiError(404, e.args[0], param="model", code="model_not_found") from None

    def convert(self, req: ChatRequest, kind: str) -> tuple[list[dict], list]:
        """OpenAI messages as the engines take them (content parts, images decoded), within
        the server's limits."""
        limits = self.config.limits
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
        if len(images) > limits.max_images:
            raise ApiError(400, f"at most {limits.max_images} images per request", param="messages")
        if chars > limits.max_prompt_chars:
            raise ApiError(400, f"prompt over {limits.max_prompt_chars} characters", param="messages")
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", param="messages")
        return messages, images

    async def answer(self, awaitable, response, spec, deadline: float):
        """Await a model replica's answer (or first stream event) within the request's time
        limit; a failure becomes its ApiError (openai_api.failure)."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return None
        except Exception as e:
            if isinstance(e, asyncio.TimeoutError):
                response.cancel()  # leaves the queue, or stops generating; frees the slot either way
            raise failure(e, spec.name, spec.request_timeout_s) from None

    async def ready(self, name: str) -> bool:
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
        except REPLICA_LOST:  # loading again
            return False
        return True

    async def readiness(self) -> dict[str, bool]:
        """`ready` of every model, asked at once: a loading model costs READY_PROBE_S once."""
        return dict(zip(self.models, await asyncio.gather(*map(self.ready, self.models))))

    async def models_list(self, created: int) -> dict:
        # `ready` beside the OpenAI fields (clients ignore fields they do not know, as they do
        # vLLM's max_model_len): false while the model's replicas load. A request sent then
        # is not refused; it waits in Serve's queue until a replica is up.
        ready = await self.readiness()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "medray", "ready": ready[name.partition(":")[0]]}
                                           for name in self.config.model_ids()]}

    async def complete(self, body: ChatRequest):
        """POST /v1/chat/completions: a JSONResponse, or a StreamingResponse of SSE chunks."""
        spec, adapter = self.model(body.model)
        # Checked before anything else: a bad value is refused without waiting on a replica.
        settings = body.to_settings(default_max_tokens=self.config.limits.default_max_tokens,
                                    limit=self.config.limits.max_tokens)
        handle = self.models[spec.name]
        deadline = time.monotonic() + spec.request_timeout_s
        if spec.name not in self.info:  # asked of a replica once; it queues like any call
            info = handle.info.remote()
            self.info[spec.name] = await self.answer(info, info, spec, deadline)
        kind = self.info[spec.name]["kind"]
        if any(not p.image_url.url.startswith("data:") for m in body.messages if not isinstance(m.content, str)
               for p in m.content if p.image_url is not None):
            # An image from S3 or http(s): read off the event loop, which moves every request
            # of this replica (USER_CODE_THREAD). data: URLs decode in place.
            messages, images = await asyncio.to_thread(self.convert, body, kind)
        else:
            messages, images = self.convert(body, kind)
        # The engine's own typed objects cross the hop to the replica; equal settings are equal
        # (frozen) objects, which is how the replica groups a batch into generate calls.
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = self.digest_headers(spec.name, adapter)
        # The time limit goes with the call, as a duration (the replica's clock is another
        # machine's), and half a second longer: the ingress answers 504 at the limit itself,
        # and a replica that stopped first would have its cut-short answer sent as a 200.
        call = (EngineRequest(messages, images), settings, adapter, spec.request_timeout_s + 0.5)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            events = handle.options(stream=True).stream.remote(*call)
            # The first event is awaited here, so a full queue, a time-out or a lost replica
            # still gets its status code; after it the 200 is sent and errors go in the stream.
            first = await self.answer(events.__anext__(), events, spec, deadline)
            return StreamingResponse(sse_chunks(events, completion_id, body.model, usage, first, deadline,
                                                spec.request_timeout_s),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        response = handle.generate.remote(*call)
        answer = await self.answer(response, response, spec, deadline)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}],
            "usage": usage_of(answer),
        }, headers=headers)

    def digest_headers(self, model: str, adapter: str | None) -> dict[str, str]:
        """What answered, by content (medray.provenance): the model's digest, and the adapter's
        when the request named one. Taken by the replica at start; the URI alone may point at
        other weights tomorrow."""
        digests = self.info[model].get("digests") or {}
        headers = {"X-Medray-Model-Digest": digests["model"]} if digests.get("model") else {}
        if adapter and digests.get("adapters", {}).get(adapter):
            headers["X-Medray-Adapter-Digest"] = digests["adapters"][adapter]
        return headers
