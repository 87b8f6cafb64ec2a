"""`GET /openapi.json`, `/docs` and `/redoc`: the API's schema and its viewers, behind the server's auth.

Owns: the three routes FastAPI would otherwise serve to anyone (api_server.py turns its own off).
They are on a `v1_router`, so with API keys configured they need a key like /v1 does (a
401, or a 429 once an address is throttled, otherwise); an open server serves them openly.
Does not own: the schema itself (FastAPI builds it from the routes) or auth (admission/guards.py).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from server.admission.guards import v1_router

router = v1_router()

OPENAPI_URL = "/openapi.json"


@router.get(OPENAPI_URL, include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=request.app.title + " - Swagger UI")


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=request.app.title + " - ReDoc")
