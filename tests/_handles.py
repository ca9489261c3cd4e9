"""Test helper: call a Serve deployment's method from the test process, as a driver.

Under Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which medray's
local instances run; medray.raycluster) a handle's router runs on the event loop it was first
used on, so a plain `handle.m.remote().result()` from synchronous test code fails ("No event
loop running"), and a loop per call fails the second time (the router is kept per deployment,
bound to the first, closed loop). So every call goes to one loop that lives in a thread.
"""

from __future__ import annotations

import asyncio
import threading

_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _running_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            _thread = threading.Thread(target=_loop.run_forever, name="serve-handles", daemon=True)
            _thread.start()
        return _loop


def close() -> None:
    """Stop the loop, and with it the routers of the handles made on it, before Ray shuts
    down: a router pushes metrics every few seconds, and one that ran after ray.shutdown()
    called Ray, whose auto-init then started a new local Ray as pytest exited."""
    global _loop, _thread
    with _lock:
        loop, thread, _loop, _thread = _loop, _thread, None, None
    if loop is not None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def replica_call(deployment: str, app: str, method: str, *args, timeout: float = 60):
    from ray import serve

    async def call():
        handle = serve.get_deployment_handle(deployment, app_name=app)
        return await getattr(handle, method).remote(*args)

    return asyncio.run_coroutine_threadsafe(call(), _running_loop()).result(timeout)
