"""Every other request under /v1: authenticated first, then answered as the router would.

Owns: the catch-all /v1 route (last in the app, out of the OpenAPI schema). With auth on,
a client without a valid key learns nothing of which /v1 paths and methods exist: it
gets the same 401 (or 429 once its address is throttled) as on a real route. An
authenticated client then gets what Starlette's router gives when no route matches:
405 with Allow for a known path with another method, a redirect for a known path with
or without its trailing slash, 404 otherwise.
Does not own: auth (admission/guards.py) or the real routes (the other modules here).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import URL
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.admission.guards import v1_router

router = v1_router()

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"]


@router.api_route("/v1/{rest:path}", methods=METHODS, include_in_schema=False)
async def unmatched(request: Request) -> Response:
    scope = request.scope
    routes = [r for r in request.app.router.routes if getattr(r, "endpoint", None) is not unmatched]
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.PARTIAL:  # the path exists with other methods
            raise StarletteHTTPException(405, headers={"Allow": ", ".join(getattr(route, "methods", None) or ())})
    path = scope["path"]
    redirect_scope = {**scope, "path": path.rstrip("/") if path.endswith("/") else path + "/"}
    for route in routes:
        match, _ = route.matches(redirect_scope)
        if match != Match.NONE:
            return RedirectResponse(url=str(URL(scope=redirect_scope)))
    raise StarletteHTTPException(404, "Not Found")
