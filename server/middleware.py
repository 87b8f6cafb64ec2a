"""The pure-ASGI middleware: what must run around every request, before any route.

Owns: `BodyLimitMiddleware` (request bodies over the limit refused with a 413 in
OpenAI's error shape before anything parses them) and `FrameMiddleware` (every POST
body under /v1 read as JSON whatever Content-Type the client sent; request counts by
route and status, latency to the end of the response, requests in flight). Both are
pure ASGI, so streams and disconnects pass through untouched.

Does not own: auth and rate limits (admission/guards.py, as route dependencies), errors raised
by routes (errors.py) or the metric definitions (metrics.py).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse

from server.errors import error_body
from server.metrics import ServerMetrics

KNOWN_ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/responses/{id}",
    "/v1/responses/{id}/input_items",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/traces/{id}",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    "/version",
}
#: POST routes whose body is JSON whatever Content-Type a client sent
JSON_POST_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413 in OpenAI's error shape before anything
    parses them: by Content-Length when sent, else counted as the body arrives. The accepted
    body is replayed to the app; later receive() calls (disconnects) pass straight through."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, int(length))
            return
        chunks: list[bytes] = []
        size = 0
        replay: list[dict] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                replay.append(message)
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                replay.append({"type": "http.request", "body": b"".join(chunks), "more_body": False})
                break

        async def replayed() -> dict:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        msg = (
            f"the request body is larger than this server's limit of {self.max_bytes} bytes "
            f"(max_request_body_bytes; {size} bytes seen): send a smaller request"
        )
        resp = JSONResponse(error_body(msg, "invalid_request_error", code="request_too_large"), status_code=413)
        await resp(scope, receive, send)


class FrameMiddleware:
    """JSON bodies, request counts, latency to the end of the response, in-flight."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = path
        if path.startswith("/v1/traces/"):
            route = "/v1/traces/{id}"
        elif path.startswith("/v1/responses/"):
            route = "/v1/responses/{id}/input_items" if path.endswith("/input_items") else "/v1/responses/{id}"
        elif path.startswith("/v1/models/"):
            route = "/v1/models/{model}"
        if route not in KNOWN_ROUTES:
            route = "other"
        if method == "POST" and path.startswith(JSON_POST_PREFIXES):
            # every POST body is JSON, whatever Content-Type a client sent (curl -d sends a form type)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")
            ]
        status = 500
        t0 = time.monotonic()

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.monotonic() - t0)
