"""Async Python client of the sandbox service (what thor_engine uses).

Owns: talking to the service over TCP or a Unix socket with httpx: per-request
timeouts derived from the snippets' own, retries with backoff on connection errors
and on 503 busy (honouring Retry-After), and turning failures into clear
exceptions: `SandboxUnavailable` (the service is down or unreachable:
`SandboxUnreachable`, or stays busy: `SandboxBusy`), `SandboxRequestError` (the
service refused the request; not retried) and `SandboxError` for the rest (a
worker that died mid-snippet: 500).

Does not own: caching, observation formatting or any THOR policy (thor_engine).
Depends only on httpx and pydantic, so it runs in the main (Python 3.11) env.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from types import TracebackType

import httpx

from .protocol import ExecuteRequest, ExecuteResponse, ExecutionResult, HealthResponse, Snippet

log = logging.getLogger("thor_sandbox.client")

DEFAULT_URL = "http://127.0.0.1:8080"


class SandboxError(RuntimeError):
    """Base class of the client's errors."""


class SandboxUnavailable(SandboxError):
    """The sandbox service cannot be reached or stays busy after every retry."""


class SandboxBusy(SandboxUnavailable):
    """Every worker stayed busy (503/429) through all the client's retries."""


class SandboxUnreachable(SandboxUnavailable):
    """No connection to the service could be made (it is down, or the address is wrong)."""


class SandboxRequestError(SandboxError):
    """The service refused the request (4xx); retrying the same request will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"sandbox refused the request ({status}): {message}")
        self.status = status


class SandboxClient:
    """`async with SandboxClient("http://127.0.0.1:8080") as sb: await sb.execute([...])`.

    `url` may be `http://host:port` or `unix:/path/to/socket`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        connect_timeout: float = 5.0,
        overhead_timeout: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self._overhead = overhead_timeout
        self._retries = retries
        self._backoff = backoff_s
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # Small request/response pairs on a kept-alive connection: without TCP_NODELAY,
        # Nagle plus delayed ACKs add ~40 ms to every call.
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        timeout = httpx.Timeout(overhead_timeout, connect=connect_timeout)
        if url.startswith("unix:"):
            transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:"), limits=limits)
            base_url = "http://sandbox"
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=nodelay)
            base_url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout)

    async def __aenter__(self) -> SandboxClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, payload: dict, read_timeout: float) -> httpx.Response:
        delay = self._backoff
        last: str = ""
        for attempt in range(self._retries + 1):
            try:
                resp = await self._http.post(
                    path, json=payload, timeout=httpx.Timeout(read_timeout, connect=self._http.timeout.connect)
                )
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except httpx.TimeoutException as exc:
                raise SandboxUnavailable(
                    f"sandbox at {self.url} did not answer within {read_timeout:.0f}s ({type(exc).__name__})"
                ) from exc
            else:
                if resp.status_code in (429, 503):
                    last = _error_message(resp)
                    retry_after = _retry_after(resp)
                    if attempt < self._retries:
                        await asyncio.sleep(min(retry_after if retry_after is not None else delay, 10.0))
                        delay *= 2
                        continue
                    raise SandboxBusy(f"sandbox at {self.url} is busy after {attempt + 1} attempts: {last}")
                if 400 <= resp.status_code < 500:
                    raise SandboxRequestError(resp.status_code, _error_message(resp))
                if resp.status_code >= 500:
                    raise SandboxError(f"sandbox error ({resp.status_code}): {_error_message(resp)}")
                return resp
            if attempt < self._retries:
                log.debug("sandbox connection failed (%s); retry %d in %.2fs", last, attempt + 1, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise SandboxUnreachable(
            f"sandbox service at {self.url} is not reachable ({last}); start it with `make sandbox` "
            "or point THOR at a running one"
        )

    async def execute(self, snippets: Sequence[Snippet | str]) -> list[ExecutionResult]:
        """Run independent snippets; results in the same order."""
        items = [s if isinstance(s, Snippet) else Snippet(code=s) for s in snippets]
        request = ExecuteRequest(snippets=items)
        longest = max((s.timeout or 10.0) for s in items)
        resp = await self._post(
            "/v1/execute", request.model_dump(exclude_none=True), read_timeout=longest + self._overhead
        )
        return ExecuteResponse.model_validate(resp.json()).results

    async def run(
        self, code: str, *, timeout: float | None = None, echo_last_expression: bool = False
    ) -> ExecutionResult:
        """Run one snippet."""
        (result,) = await self.execute([Snippet(code=code, timeout=timeout, echo_last_expression=echo_last_expression)])
        return result

    async def health(self) -> HealthResponse:
        try:
            resp = await self._http.get("/health")
        except httpx.HTTPError as exc:
            raise SandboxUnavailable(f"sandbox service at {self.url} is not reachable ({exc!r})") from exc
        if resp.status_code not in (200, 503):
            raise SandboxError(f"unexpected /health status {resp.status_code}")
        return HealthResponse.model_validate(resp.json())


def _error_message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except Exception:  # noqa: BLE001 - not our error shape; show the raw text
        return resp.text[:500]


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None
