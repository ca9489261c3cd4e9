"""The gate in front of every route of the ingress: API keys on /v1/, the body-size limit, and
request metrics. app.py adds it to the FastAPI app.
"""

from __future__ import annotations

import hashlib
import time

from starlette.datastructures import Headers

from .config import ServeConfig
from .openai_api import error_response


class Gate:
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



def _key_ok(header: str, keys: set[str]) -> bool:
    """`Authorization: Bearer <key>` with a key whose SHA-256 digest is configured."""
    scheme, _, token = header.partition(" ")
    return (scheme.lower() == "bearer" and bool(token.strip())
            and hashlib.sha256(token.strip().encode()).hexdigest() in keys)
