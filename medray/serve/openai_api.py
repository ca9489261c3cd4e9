"""The OpenAI-compatible surface: request schemas, errors in OpenAI's format, and the SSE
chunk stream of `stream=true`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from ray.exceptions import NodeDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException

from medray.engines.types import GENERATION_FIELDS, Answer, GenerationFields, GenerationSettings, RequestRejected

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error for the client, rendered in OpenAI's error format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_response(status: int, message: str, *, param=None, code=None, kind="invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def last_line(e: BaseException) -> str:
    """An exception's own message, from a model replica too: without the traceback and type
    Ray puts around it (a RayTaskError carries the replica's exception as `cause`)."""
    lines = str(getattr(e, "cause", None) or e).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:300]


# A replica (or its node) that died under a request: 503 and retry.
REPLICA_LOST = (RayActorError, NodeDiedError, RayServeException)


def failure(e: BaseException, model: str, time_limit_s: float) -> ApiError:
    """What went wrong while a request waited on its model, for the client: one mapping for
    answers (a status) and streams (an error event, the 200 being sent). The request's faults
    are 400s; the server's are 500, or 503 when a replica went away or the queue is full
    (retry), or 504 past the time limit."""
    if isinstance(e, asyncio.TimeoutError):
        log.warning("request to %s over its time limit (%.0f s)", model, time_limit_s)
        return ApiError(504, f"no answer from model {model!r} within {time_limit_s:g} s, its time limit; the request "
                             "was stopped. Retry later, or ask for fewer tokens", kind="timeout", code="timeout")
    if isinstance(e, BackPressureError):
        # Serve's queue for this model (max_queued_requests) is full: the caller should come
        # back shortly, and the openai SDK does so for a 503 on its own.
        return ApiError(503, f"model {model!r} is busy: its queue is full; retry after a moment",
                        kind="server_error", code="overloaded", headers={"Retry-After": "1"})
    if isinstance(e, REPLICA_LOST):  # never the request's fault
        log.warning("model replica lost: %s", type(e).__name__)
        return ApiError(503, f"the model replica serving {model!r} went away; retry the request "
                             "(Serve is replacing it)", kind="server_error", headers={"Retry-After": "1"})
    if isinstance(e, RequestRejected):  # its messages do not render into a prompt for this model, or do not fit it
        return ApiError(400, f"the model could not answer this request: {last_line(e)}")
    return server_fault(model, e)  # failed in the replica's code, on a request it had accepted


def server_fault(model: str, e: BaseException) -> ApiError:
    """A 500 for what failed in a model replica's code on a request it had accepted (the model
    ran out of memory, a bug): the server's fault, said to be so, never the request's. The
    openai SDK retries a 500 on its own. Logged with the exception's type only: its message
    may quote the request."""
    cause = getattr(e, "cause", None) or e  # Ray's RayTaskError carries the replica's exception
    log.error("model %s failed on a request: %s", model, type(cause).__name__)
    return ApiError(500, f"model {model!r} failed on the server ({type(cause).__name__}); the request was not at "
                         "fault: retry it, and if it fails again, tell the operator", kind="server_error")


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


class StreamOptions(BaseModel):
    include_usage: bool = False


# The generation settings OpenAI names its own way: max_tokens (or max_completion_tokens) for
# max_new_tokens, and stop as a string or a list of up to 4. Every other one is taken as
# GenerationFields declares it, under its own name (ChatRequest below).
OPENAI_NAMED = ("max_new_tokens", "stop")
MAX_STOPS = 4


# OpenAI's fields that would change what comes back, which medray does not implement: each is
# refused with a 400 naming it unless it holds its no-op value, so that no client gets a
# silently different answer (one choice where it asked for three, text where it asked for
# JSON). Any other field medray does not know is ignored, as vLLM's own server ignores it
# (OpenAI's refuses it): clients send `user`, `metadata` and the like, which change nothing.
NOT_SUPPORTED: dict[str, tuple[tuple, str]] = {
    "n": ((1,), "medray answers one choice per request; send n requests"),
    "best_of": ((1,), "medray answers one choice per request"),
    "logprobs": ((False,), "log probabilities are not returned"),
    "top_logprobs": ((0,), "log probabilities are not returned"),
    "tools": (([],), "tool calls are not supported"),
    "tool_choice": (("none", "auto"), "tool calls are not supported"),
    "functions": (([],), "function calls are not supported"),
    "response_format": (({"type": "text"},), "only text answers are supported (no JSON mode or schema)"),
    "presence_penalty": ((0, 0.0), "use repetition_penalty (vLLM's name) instead"),
    "frequency_penalty": ((0, 0.0), "use repetition_penalty (vLLM's name) instead"),
    "logit_bias": (({},), "logit biases are not supported"),
}


class _ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept only to be checked (NOT_SUPPORTED), then ignored
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def to_settings(self, *, default_max_tokens: int, limit: int) -> GenerationSettings:
        """The request's generation settings (OpenAI's names turned into medray's), or an
        ApiError (400, naming the field) for a value the server does not take."""
        for name, value in (self.model_extra or {}).items():
            if name in NOT_SUPPORTED and value is not None and value not in NOT_SUPPORTED[name][0]:
                raise ApiError(400, f"{name} is not supported: {NOT_SUPPORTED[name][1]}", param=name)
        max_tokens = self.max_completion_tokens or self.max_tokens or min(default_max_tokens, limit)
        if max_tokens > limit:
            raise ApiError(400, f"max_tokens may be at most {limit}", param="max_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOPS or any(not s for s in stop):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
        try:
            return GenerationSettings(max_new_tokens=max_tokens, stop=tuple(stop),
                                      **{name: getattr(self, name) for name in GENERATION_FIELDS
                                         if name not in OPENAI_NAMED})
        except ValidationError as e:  # the fields are each valid; together they are not (min_tokens)
            error = e.errors()[0]
            raise ApiError(400, error["msg"].removeprefix("Value error, "),
                           param=str(error["loc"][0]) if error["loc"] else None) from None


ChatRequest = create_model(
    "ChatRequest", __base__=_ChatRequest, __doc__="The body of POST /v1/chat/completions (OpenAI's).",
    **{name: (field.annotation, field) for name, field in GenerationFields.model_fields.items()
       if name not in OPENAI_NAMED})


def usage_of(answer) -> dict:
    """OpenAI's usage object for an engine Answer."""
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


async def sse_chunks(events, completion_id: str, model: str, include_usage: bool, first=None,
                     deadline: float | None = None, time_limit_s: float = 0.0):
    """OpenAI's chunk stream: a role delta, content deltas, a finish chunk, [DONE].

    `events` yields messages (lists of events: text, then the Answer). `first` is a message
    the caller already took from `events` (to answer errors with a status before the stream
    starts). Past `deadline` (time.monotonic()), the replica is told
    to stop and the stream ends with an error event: the 200 is sent by then, so a 504 can
    no longer be.
    """
    created = int(time.time())

    def chunk(delta: dict, finish=None, usage=None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def render(event) -> list[str]:
        if isinstance(event, str):
            return [chunk({"content": event})]
        return [chunk({}, event.finish_reason)] + ([chunk({}, usage=usage_of(event))] if include_usage else [])

    async def rest():
        if first is not None:
            yield first
        iterator = events.__aiter__()
        while True:
            try:  # a timeout per message, not around the loop: a cancel must not land at the yield
                async with asyncio.timeout_at(deadline):  # no task per message, as wait_for makes
                    message = await iterator.__anext__()
            except StopAsyncIteration:
                return
            yield message

    # Each replica message (a list of events) goes out as one write: the final one with [DONE].
    out = chunk({"role": "assistant", "content": ""})
    try:
        async for message in rest():
            out += "".join(line for event in message for line in render(event))
            if not any(isinstance(event, Answer) for event in message):
                yield out
                out = ""
    except asyncio.CancelledError:  # the client went away; the replica stops generating
        events.cancel()
        raise
    except Exception as e:  # the status line is sent already: reported in the stream, as OpenAI does
        if isinstance(e, asyncio.TimeoutError):
            events.cancel()
        error = failure(e, model, time_limit_s)
        out += f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
    yield out + "data: [DONE]\n\n"
