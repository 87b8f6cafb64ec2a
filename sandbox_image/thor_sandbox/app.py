"""HTTP API of the sandbox service (FastAPI).

Owns: routes (`POST /v1/execute`, `POST /run_code`, `GET /health`, `GET /metrics`),
request limits that depend on settings (code size, timeout ceiling, batch size),
mapping pool errors to HTTP (busy -> 503 + Retry-After), and the error body every
4xx/5xx carries: `{"error": {"type": ..., "message": ...}}`.

Does not own: execution (pool.py), the jail (jail.py), or process start-up
(__main__.py). The app gets its pool from `create_app`, never from a global.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import SandboxMetrics
from .pool import Busy, PoolClosed, WorkerPool
from .protocol import (
    CommandRunResult,
    ExecuteRequest,
    ExecuteResponse,
    ExecutionResult,
    HealthResponse,
    Outcome,
    RunCodeRequest,
    RunCodeResponse,
    Snippet,
)
from .settings import SandboxSettings
from .worker import WorkerDied

log = logging.getLogger("thor_sandbox.app")


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


def _error(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            msg = f"request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})"
            loc = "body"
        if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
            msg, loc = "request body is empty: send a JSON object", "body"
        parts.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def create_app(
    settings: SandboxSettings,
    pool_factory: Callable[[SandboxMetrics], WorkerPool],
    isolation: str,
    metrics: SandboxMetrics | None = None,
) -> FastAPI:
    """Build the service app. The pool is created and started in the app's lifespan."""
    metrics = metrics or SandboxMetrics()
    state: dict[str, WorkerPool] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = pool_factory(metrics)
        await pool.start()
        state["pool"] = pool
        log.info(
            "sandbox ready: %d workers, isolation: %s, limits: timeout %.0fs (max %.0fs), memory %d MB, "
            "output %d bytes per stream",
            settings.pool_size, isolation, settings.default_timeout_s, settings.max_timeout_s,
            settings.memory_limit_mb, settings.max_output_bytes,
        )
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(
        title="THOR sandbox",
        version="0.1.0",
        description="nsjail-isolated warm Python worker pool for tool-integrated reasoning.",
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def _json_bodies(request: Request, call_next):  # type: ignore[no-untyped-def]
        # Every POST body is JSON, whatever Content-Type the client sent (curl -d sends a form type).
        if request.method == "POST":
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            request.scope["headers"] = headers + [(b"content-type", b"application/json")]
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.bad_requests.labels(route=request.url.path).inc()
        return _error(400, "invalid_request", _describe_validation(exc))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if 400 <= exc.status < 500 and exc.status not in (429,):
            metrics.bad_requests.labels(route=request.url.path).inc()
        return _error(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body could not be decoded: it must be UTF-8 encoded JSON"
        if 400 <= exc.status_code < 500:
            metrics.bad_requests.labels(route=request.url.path).inc()
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return _error(exc.status_code, kind, message, dict(exc.headers or {}))

    def _pool() -> WorkerPool:
        pool = state.get("pool")
        if pool is None:
            raise ApiError(503, "unavailable", "the sandbox pool is not running", {"Retry-After": "5"})
        return pool

    def _check_limits(snippet: Snippet) -> None:
        size = len(snippet.code.encode("utf-8"))
        if size > settings.max_code_bytes:
            raise ApiError(
                413, "code_too_large",
                f"code is {size} bytes; the limit is {settings.max_code_bytes} (THOR_SANDBOX_MAX_CODE_BYTES)",
            )
        if snippet.timeout is not None and snippet.timeout > settings.max_timeout_s:
            raise ApiError(
                400, "invalid_request",
                f"timeout {snippet.timeout}s exceeds this service's maximum of {settings.max_timeout_s}s",
            )
        if snippet.stdin is not None and len(snippet.stdin.encode("utf-8", "replace")) > settings.max_stdin_bytes:
            raise ApiError(413, "stdin_too_large", f"stdin exceeds {settings.max_stdin_bytes} bytes")

    async def _run(run: Callable[[], object]) -> object:
        try:
            return await run()  # type: ignore[misc]
        except Busy as exc:
            raise ApiError(503, "busy", str(exc), {"Retry-After": str(int(exc.retry_after_s))}) from exc
        except PoolClosed as exc:
            raise ApiError(503, "unavailable", str(exc), {"Retry-After": "5"}) from exc
        except WorkerDied as exc:
            raise ApiError(
                500, "sandbox_error", f"the worker running this snippet died and was replaced: {exc}"
            ) from exc

    @app.post("/v1/execute", response_model=ExecuteResponse)
    async def execute(body: ExecuteRequest) -> ExecuteResponse:
        """Run a batch of independent snippets concurrently; results come back in order."""
        if len(body.snippets) > settings.max_batch:
            raise ApiError(
                413, "batch_too_large",
                f"{len(body.snippets)} snippets in one request; the limit is {settings.max_batch}",
            )
        for s in body.snippets:
            _check_limits(s)
        t0 = time.monotonic()
        pool = _pool()
        results = await _run(lambda: pool.run_many(body.snippets))
        metrics.request_duration.labels(route="/v1/execute").observe(time.monotonic() - t0)
        return ExecuteResponse(results=results)  # type: ignore[arg-type]

    @app.post("/run_code", response_model=RunCodeResponse)
    async def run_code(body: RunCodeRequest) -> RunCodeResponse:
        """SandboxFusion-compatible single execution (echo of the last expression is off by default)."""
        snippet = Snippet(
            code=body.code, timeout=body.run_timeout, stdin=body.stdin,
            echo_last_expression=body.echo_last_expression,
        )
        _check_limits(snippet)
        memory_mb = body.memory_limit_MB if body.memory_limit_MB > 0 else None
        if memory_mb is not None and memory_mb > settings.memory_limit_mb:
            raise ApiError(
                400, "invalid_request",
                f"memory_limit_MB {memory_mb} exceeds this service's maximum of {settings.memory_limit_mb}",
            )
        t0 = time.monotonic()
        pool = _pool()
        result: ExecutionResult = await _run(lambda: pool.run(snippet, memory_mb))  # type: ignore[assignment]
        metrics.request_duration.labels(route="/run_code").observe(time.monotonic() - t0)
        return _to_fusion(result)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        pool = state.get("pool")
        ready = pool.ready if pool else 0
        body = HealthResponse(
            status="ok" if ready == settings.pool_size else ("degraded" if ready else "starting"),
            workers_total=settings.pool_size,
            workers_ready=ready,
            workers_busy=pool.busy if pool else 0,
            queue_depth=pool.queue_depth if pool else 0,
            isolation=isolation,
        )
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _to_fusion(result: ExecutionResult) -> RunCodeResponse:
    status = "TimeLimitExceeded" if result.outcome is Outcome.timeout else "Finished"
    run = CommandRunResult(
        status=status,
        execution_time=result.duration_s,
        return_code=result.exit_code if result.exit_code is not None else (128 + (result.signal or 0)),
        stdout=result.stdout,
        stderr=result.stderr,
    )
    message = "" if result.ok else {
        Outcome.error: "the code exited with an error",
        Outcome.timeout: "the code hit its time limit",
        Outcome.oom: "the code ran out of memory",
        Outcome.output_capped: "the code's output exceeded the cap and it was stopped",
    }.get(result.outcome, result.outcome.value)
    return RunCodeResponse(status="Success" if result.ok else "Failed", message=message, run_result=run)
