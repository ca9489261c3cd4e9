"""A model replica in the ingress's own process, called as a DeploymentHandle is.

`Chat` calls a model through DeploymentHandle's face (`generate.remote`, `info.remote`,
`options(stream=True).stream.remote`). `LocalHandle` gives that face to a `ModelServer` built
in the same process, so one replica can be both the HTTP ingress and the model: the app
build_app makes for a single model on an engine that computes off the event loop (app.py,
"one replica"). Every request then skips the ingress -> model hop, and each streamed message
its trip through Ray, which measured as half the CPU of both processes under `vllm bench
serve` (bench/serve_peer.py --profile). Tests use it to drive Chat without Serve.
"""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace


class _Response:
    """A DeploymentResponse's face: awaitable, cancellable."""

    def __init__(self, coro):
        self.task = asyncio.ensure_future(coro)

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        self.task.cancel()


class _Stream:
    """A DeploymentResponseGenerator's face: an async iterator, cancellable. Cancelling closes
    the replica's generator, whose `finally` stops the engine's row (ModelServer.stream)."""

    def __init__(self, agen):
        self.agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self):
        asyncio.ensure_future(self.agen.aclose())


class LocalHandle:
    """What Chat calls of a DeploymentHandle, on `server` (a ModelServer) in this process."""

    def __init__(self, server, stream: bool = False):
        self.server, self.streaming = server, stream

    def options(self, stream: bool = False):
        return LocalHandle(self.server, stream)

    def __getattr__(self, name: str):
        method = getattr(self.server, name)

        async def call(*args):
            result = method(*args)
            return await result if inspect.isawaitable(result) else result

        if self.streaming:
            return SimpleNamespace(remote=lambda *args: _Stream(method(*args)))
        return SimpleNamespace(remote=lambda *args: _Response(call(*args)))
