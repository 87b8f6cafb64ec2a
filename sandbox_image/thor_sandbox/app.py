"""HTTP API of the sandbox service (FastAPI).

Owns: routes (`POST /v1/execute`, `POST /run_code`, each also answered with a
trailing slash, `GET /health`, `GET /metrics`), request limits that depend on
settings (code size, timeout ceiling, batch size), stopping a request's snippets
when its client disconnects (the pool then replaces their workers), the health
report (workers, limits, versions and the fingerprint a result cache keys on),
mapping pool errors to HTTP (busy -> 503 + Retry-After), and the error body every
4xx/5xx carries: `{"error": {"type": ..., "message": ...}}`.

Does not own: execution (pool.py), the jail (jail.py), or process start-up
(__main__.py). The app gets its pool from `create_app`, never from a global.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

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
    SandboxLimits,
    Snippet,
)
from .settings import SandboxSettings
from .worker import WorkerDied

log = logging.getLogger("thor_sandbox.app")

T = TypeVar("T")
SERVICE_VERSION = "0.1.0"
WORKER_SCRIPT = Path(__file__).with_name("jail_worker.py")


class _JsonBodies:
    """Every POST body is JSON, whatever Content-Type the client sent (curl -d sends a form type).

    A plain ASGI middleware (not BaseHTTPMiddleware), so routes see the client's own
    `receive` channel and with it the `http.disconnect` of a client that went away.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def limits_of(settings: SandboxSettings) -> SandboxLimits:
    return SandboxLimits(
        default_timeout_s=settings.default_timeout_s,
        max_timeout_s=settings.max_timeout_s,
        memory_limit_mb=settings.memory_limit_mb,
        max_output_bytes=settings.max_output_bytes,
        max_code_bytes=settings.max_code_bytes,
        max_stdin_bytes=settings.max_stdin_bytes,
        max_processes=settings.max_processes,
        max_open_files=settings.max_open_files,
        max_file_size_mb=settings.max_file_size_mb,
        tmp_size_mb=settings.tmp_size_mb,
        max_batch=settings.max_batch,
    )


def fingerprint_of(versions: dict[str, str], limits: SandboxLimits) -> str:
    """Digest of what determines a deterministic snippet's result on this service."""
    blob = json.dumps({"versions": versions, "limits": limits.model_dump()}, sort_keys=True)
    return "sbx-" + hashlib.sha256(blob.encode()).hexdigest()[:32]


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
    limits = limits_of(settings)
    worker_digest = hashlib.sha256(WORKER_SCRIPT.read_bytes()).hexdigest()[:16]

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = pool_factory(metrics)
        await pool.start()
        state["pool"] = pool
        log.info(
            "sandbox ready: %d workers, isolation: %s, limits: timeout %.0fs (max %.0fs), memory %d MB, "
            "output %d bytes per stream",
            settings.pool_size,
            isolation,
            settings.default_timeout_s,
            settings.max_timeout_s,
            settings.memory_limit_mb,
            settings.max_output_bytes,
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

    app.add_middleware(_JsonBodies)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.bad_requests.labels(route=request.url.path).inc()
        return _error(400, "invalid_request", _describe_validation(exc))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if 400 <= exc.status < 500 and exc.status not in (429, 499):
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
                413,
                "code_too_large",
                f"code is {size} bytes; the limit is {settings.max_code_bytes} (THOR_SANDBOX_MAX_CODE_BYTES)",
            )
        if snippet.timeout is not None and snippet.timeout > settings.max_timeout_s:
            raise ApiError(
                400,
                "invalid_request",
                f"timeout {snippet.timeout}s exceeds this service's maximum of {settings.max_timeout_s}s",
            )
        if snippet.stdin is not None and len(snippet.stdin.encode("utf-8", "replace")) > settings.max_stdin_bytes:
            raise ApiError(413, "stdin_too_large", f"stdin exceeds {settings.max_stdin_bytes} bytes")

    async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
        """Run `work`; if the client disconnects first, cancel it (its workers get replaced)."""
        task = asyncio.ensure_future(work)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            metrics.disconnects.labels(route=request.url.path).inc()
            log.info("client of %s went away: its snippets were stopped", request.url.path)
            raise ApiError(499, "client_closed_request", "the client closed the connection before the result")
        finally:
            for t in (task, watcher):
                if not t.done():
                    t.cancel()

    async def _run(request: Request, run: Callable[[], Awaitable[T]]) -> T:
        try:
            return await _unless_disconnected(request, run())
        except Busy as exc:
            raise ApiError(503, "busy", str(exc), {"Retry-After": str(int(exc.retry_after_s))}) from exc
        except PoolClosed as exc:
            raise ApiError(503, "unavailable", str(exc), {"Retry-After": "5"}) from exc
        except WorkerDied as exc:
            raise ApiError(
                500, "sandbox_error", f"the worker running this snippet died and was replaced: {exc}"
            ) from exc

    async def execute(body: ExecuteRequest, request: Request) -> ExecuteResponse:
        """Run a batch of independent snippets concurrently; results come back in order."""
        if len(body.snippets) > settings.max_batch:
            raise ApiError(
                413,
                "batch_too_large",
                f"{len(body.snippets)} snippets in one request; the limit is {settings.max_batch}",
            )
        for s in body.snippets:
            _check_limits(s)
        t0 = time.monotonic()
        pool = _pool()
        results = await _run(request, lambda: pool.run_many(body.snippets))
        metrics.request_duration.labels(route="/v1/execute").observe(time.monotonic() - t0)
        return ExecuteResponse(results=results)

    async def run_code(body: RunCodeRequest, request: Request) -> RunCodeResponse:
        """SandboxFusion-compatible single execution (echo of the last expression is off by default)."""
        snippet = Snippet(
            code=body.code,
            timeout=body.run_timeout,
            stdin=body.stdin,
            echo_last_expression=body.echo_last_expression,
        )
        _check_limits(snippet)
        memory_mb = body.memory_limit_MB if body.memory_limit_MB > 0 else None
        if memory_mb is not None and memory_mb > settings.memory_limit_mb:
            raise ApiError(
                400,
                "invalid_request",
                f"memory_limit_MB {memory_mb} exceeds this service's maximum of {settings.memory_limit_mb}",
            )
        t0 = time.monotonic()
        pool = _pool()
        result: ExecutionResult = await _run(request, lambda: pool.run(snippet, memory_mb))
        metrics.request_duration.labels(route="/run_code").observe(time.monotonic() - t0)
        return _to_fusion(result)

    # SandboxFusion clients post to `/run_code/`: answer both spellings directly (no 307).
    for path in ("/v1/execute", "/v1/execute/"):
        app.add_api_route(
            path, execute, methods=["POST"], response_model=ExecuteResponse, include_in_schema=not path.endswith("/")
        )
    for path in ("/run_code", "/run_code/"):
        app.add_api_route(
            path, run_code, methods=["POST"], response_model=RunCodeResponse, include_in_schema=not path.endswith("/")
        )

    @app.get("/health", response_model=HealthResponse)
    async def health() -> JSONResponse:
        pool = state.get("pool")
        ready = pool.ready if pool else 0
        versions = {"thor_sandbox": SERVICE_VERSION, "worker_script": worker_digest, **(pool.versions if pool else {})}
        body = HealthResponse(
            status="ok" if ready == settings.pool_size else ("degraded" if ready else "starting"),
            workers_total=settings.pool_size,
            workers_ready=ready,
            workers_busy=pool.busy if pool else 0,
            queue_depth=pool.queue_depth if pool else 0,
            isolation=isolation,
            workers=pool.workers() if pool else [],
            limits=limits,
            versions=versions,
            fingerprint=fingerprint_of(versions, limits) if pool else None,
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
    message = (
        ""
        if result.ok
        else {
            Outcome.error: "the code exited with an error",
            Outcome.timeout: "the code hit its time limit",
            Outcome.oom: "the code ran out of memory",
            Outcome.output_capped: "the code's output exceeded the cap and it was stopped",
        }.get(result.outcome, result.outcome.value)
    )
    return RunCodeResponse(status="Success" if result.ok else "Failed", message=message, run_result=run)
