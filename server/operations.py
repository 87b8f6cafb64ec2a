"""`GET /health`, `GET /metrics` and `GET /version`: for operators and load balancers, without auth.

Owns: health (the sandbox's workers, vLLM's own engine check and requests running, the
store; 200 when engine and sandbox can serve, "degraded" when only the store is down,
503 otherwise or while starting) and the Prometheus exposition of the server's metrics.
`/version` answers as vLLM's does (`version`: vLLM's version) plus `thor_version`.
Does not own: the metrics themselves (metrics.py, middleware.py, the builders).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.metrics import ServerMetrics
from server.state import current_state
from thor_sandbox.client import SandboxError

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = current_state(request)
    if state is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    try:
        sbx = await state.sandbox.health()
        sandbox = {"status": sbx.status, "workers_ready": sbx.workers_ready}
        sandbox_ok = sbx.workers_ready > 0
    except SandboxError as exc:
        sandbox, sandbox_ok = {"status": "down", "error": str(exc)}, False
    try:  # vLLM's own check: fails once its engine core process is gone
        await state.engine.check_health()
        engine: dict[str, Any] = {
            "status": "ok",
            "model": state.model_name,
            "requests_running": await state.engine.num_unfinished_requests(),
        }
        engine_ok = True
    except Exception as exc:  # noqa: BLE001 - any failure of the check means the engine cannot serve
        engine, engine_ok = {"status": "dead", "model": state.model_name, "error": str(exc)}, False
    store_ok = await state.store.ping()
    up = sandbox_ok and engine_ok
    body = {
        "status": "ok" if up and store_ok else ("degraded" if up else "unavailable"),
        "engine": engine,
        "sandbox": sandbox,
        "store": {"status": state.store.status, "ok": store_ok},
    }
    return JSONResponse(body, status_code=200 if up else 503)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


def thor_version() -> str:
    try:
        return dist_version("thor-server")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


@router.get("/version")
async def version(request: Request) -> JSONResponse:
    state = current_state(request)
    body: dict[str, Any] = {"thor_version": thor_version()}
    if state is None:
        return JSONResponse({"status": "starting", **body}, status_code=503)
    versions = state.engine.versions
    return JSONResponse({"version": versions.get("vllm", "unknown"), **body, "engine": versions})
