"""The HTTP routes, one APIRouter per concern; app.py includes them all.

Owns: `v1_routers` (the /v1 routers, vLLM's /tokenize and /detokenize, and the API's
/openapi.json, /docs and /redoc, each behind the `authenticate` dependency),
`ops_router` (/health and /metrics, open to anyone who can reach the server) and
`unmatched_router` (every other /v1 request: authenticated, then a 404/405).
Does not own: the app, its lifespan and middleware (app.py) or what the routes share
(checks.py, guards.py, generation.py, the builders).
"""

from __future__ import annotations

from fastapi import APIRouter

from . import chat, completions, docs, models, ops, responses, tokenize, traces, unmatched

v1_routers: list[APIRouter] = [
    chat.router,
    completions.router,
    responses.router,
    models.router,
    tokenize.router,
    traces.router,
    docs.router,
]
ops_router = ops.router
#: last: it matches every /v1 path the routes above do not
unmatched_router = unmatched.router

__all__ = ["ops_router", "unmatched_router", "v1_routers"]
