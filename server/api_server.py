"""The FastAPI application: its lifespan, middleware, error handlers and routers.

Owns: `create_app`, which wires the pieces together: the lifespan builds the server
state (engine, store, sandbox client, via the `build` callable) and puts it on
`app.state`, and closes it at shutdown; the metrics live on `app.state` from the
start (so /metrics answers while the server starts); the pure-ASGI middleware
(middleware.py: body-size limit, JSON content type, request metrics); the OpenAI
error handlers (errors.py); and the routers of the surfaces (chat/, completions/, responses/, model_cards.py,
tokenization.py, traces.py, api_docs.py: /v1 routes, /tokenize, /detokenize and
the API schema and docs behind the auth dependency, /health and /metrics open).

Does not own: any route (the surfaces' serving modules), auth and rate limits (admission/guards.py), running and
streaming requests (streaming.py), response rendering (thor/builder.py,
completions/plain.py), the engine (thor_engine.engine.ThorEngine), the store
(server/store/), key digests and client ids (admission/keys.py), token counting
(admission/metering.py) or request shapes (protocol.py and each surface's protocol.py). Knows nothing of tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI

from server import api_docs, model_cards, operations, tokenization, traces, unmatched
from server.chat import serving as chat
from server.completions import serving as completions
from server.errors import install_handlers
from server.metrics import ServerMetrics
from server.middleware import BodyLimitMiddleware, FrameMiddleware
from server.responses import serving as responses
from server.settings import ServerSettings
from server.state import STATE_ATTR, Build, ServerState

log = logging.getLogger("server")

__all__ = ["Build", "ServerState", "create_app", "v1_routers"]

#: the surfaces, each behind the `authenticate` dependency (their routers are `v1_router`s):
#: the /v1 API, vLLM's /tokenize and /detokenize, and the API's /openapi.json, /docs and /redoc
v1_routers: list[APIRouter] = [
    chat.router,
    completions.router,
    responses.router,
    model_cards.router,
    tokenization.router,
    traces.router,
    api_docs.router,
]


def create_app(settings: ServerSettings, build: Build, metrics: ServerMetrics | None = None) -> FastAPI:
    """`build(metrics)` creates the engine, store and sandbox client and returns (state, close)."""
    metrics = metrics or ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state, close = await build(metrics)
        setattr(app.state, STATE_ATTR, state)
        if not state.api_keys:
            log.warning("no API key configured: the API is open to anyone who can reach it")
        log.info("serving %s (context %d tokens)", state.model_name, state.engine.max_model_len)
        try:
            yield
        finally:
            await close()

    # /openapi.json, /docs and /redoc are api_docs.py's, behind the server's auth like /v1
    app = FastAPI(
        title="THOR reasoning server",
        version="0.1.0",
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(FrameMiddleware, metrics=metrics)
    for router in v1_routers:
        app.include_router(router)
    app.include_router(operations.router)  # /health, /metrics, /version: open to anyone who can reach it
    app.include_router(unmatched.router)  # last: every /v1 path the routes above do not match
    return app
