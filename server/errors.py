"""OpenAI-shaped errors: every 4xx/5xx body is `{"error": {message, type, param, code}}`.

Owns: the `ApiError` exception the routes raise, the FastAPI handlers that turn
it, validation errors, HTTP errors and unexpected exceptions into that body, and
`generation_error`, the client-facing error for a failure while the engine generates
(sandbox down or failing, a value the engine refused, the engine gone).
Does not own: deciding when a request is wrong (the protocol modules, admission/limits.py, admission/guards.py,
the routes) or where an error goes once a stream has started (streaming.py).
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from thor_engine.engine import EngineUnavailable, InvalidParameter
from thor_sandbox.client import SandboxError, SandboxUnavailable

log = logging.getLogger("server.errors")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers
    )


def generation_error(exc: Exception) -> ApiError | None:
    """The client-facing error for a failure while generating (None: an unexpected one)."""
    if isinstance(exc, SandboxUnavailable):
        return ApiError(
            503,
            f"the code sandbox is unavailable: {exc}",
            type="service_unavailable",
            code="sandbox_unavailable",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, SandboxError):
        return ApiError(502, f"the code sandbox failed: {exc}", type="server_error", code="sandbox_error")
    if isinstance(exc, InvalidParameter):  # the engine refused a value
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, str(exc), type="service_unavailable", code="engine_unavailable")
    return None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "bytes"})


def _union_member(part: object) -> bool:
    """Pydantic puts the union member it tried into an error's location (`prompt.str`,
    `thor.self_correction.ThorSelfCorrection.max_retries`, `x.literal['a','b']`): not a field."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or "[" in part or re.fullmatch(r"[A-Z][A-Za-z0-9]*", part) is not None


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(p)]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif first.get("type") == "missing" and not loc:
            msg = "the request body is empty: send a JSON object"
        elif param:
            msg = f"{param}: {msg}"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        return JSONResponse(error_body(msg + more, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be decoded: send UTF-8 encoded JSON"
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        return JSONResponse(error_body(f"internal server error: {type(exc).__name__}", "server_error"), status_code=500)
