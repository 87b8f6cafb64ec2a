"""Executing a code block: the executor protocol and its sandbox implementation.

Owns: the `ToolExecutor` interface the decoder awaits (so sandbox calls never
block the event loop and can be cancelled), the result type it returns, and
`SandboxExecutor`, which runs code on the sandbox service through its async
client with a `SandboxPolicy`: a busy spell or a dead worker is retried a bounded
number of times, then becomes an observation with outcome `sandbox_error` (or, if
configured, fails the request); a sandbox that cannot be reached at all (after the
client's own connection retries) fails the request, since no call could run; and at most `max_concurrent_per_request` calls of
one request run at once (`sandbox_request_scope`), so one request's n samples
cannot take every worker. The server may wrap an executor (e.g. with a result
cache); the decoder does not care.

Does not own: observation rules (observation.py) or the sandbox itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from thor_sandbox.client import SandboxBusy, SandboxClient, SandboxError, SandboxRequestError, SandboxUnreachable
from thor_sandbox.protocol import Snippet

log = logging.getLogger("thor_engine.tools")


@dataclass(frozen=True)
class ToolResult:
    exit_code: int | None
    stdout: str
    stderr: str
    outcome: str  # ok, error, timeout, oom, output_capped, sandbox_error
    duration_s: float
    cached: bool = False


class ToolExecutor(Protocol):
    async def execute(self, code: str, *, timeout_s: float, echo_last_expression: bool) -> ToolResult:
        """Run one independent snippet. Must not raise for failures of the code itself."""


@dataclass(frozen=True)
class SandboxPolicy:
    """What a tool call does when the sandbox itself (not the code) fails.

    `busy_retries`: further attempts after a busy spell (503 after the client's own
    retries) or a worker that died mid-snippet, waiting `retry_backoff_s`, doubled
    each time (at most `max_backoff_s`). When they are spent: `on_sandbox_error`
    `observe` gives the model an observation (outcome `sandbox_error`) so the other
    samples and this trajectory carry on; `fail` raises, failing the request. A
    sandbox that is unreachable (`SandboxUnreachable`) always raises: it is an
    outage for every call, not a spell of one.
    `max_concurrent_per_request`: calls of one request (all its samples) in flight
    at once, inside a `sandbox_request_scope`.
    """

    busy_retries: int = 3
    retry_backoff_s: float = 1.0
    max_backoff_s: float = 10.0
    on_sandbox_error: Literal["observe", "fail"] = "observe"
    max_concurrent_per_request: int = 4

    def __post_init__(self) -> None:
        if self.busy_retries < 0:
            raise ValueError(f"busy_retries must be >= 0 (got {self.busy_retries})")
        if self.retry_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("retry_backoff_s and max_backoff_s must be >= 0")
        if self.on_sandbox_error not in ("observe", "fail"):
            raise ValueError(f"on_sandbox_error must be 'observe' or 'fail' (got {self.on_sandbox_error!r})")
        if self.max_concurrent_per_request < 1:
            raise ValueError(f"max_concurrent_per_request must be >= 1 (got {self.max_concurrent_per_request})")


# The calls-in-flight limit of the request whose task tree we are in (None: no limit).
_request_slots: contextvars.ContextVar[asyncio.Semaphore | None] = contextvars.ContextVar(
    "thor_sandbox_request_slots", default=None
)


def sandbox_request_scope(max_concurrent: int) -> None:
    """Start a request's scope: sandbox calls made from this task, and from every task it
    creates afterwards (a request's samples), share `max_concurrent` slots.

    Call it at the start of the task that serves one request (a route handler, a CLI run),
    before the decoder's sample tasks exist. The scope ends with that task's context;
    there is nothing to close.
    """
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1 (got {max_concurrent})")
    _request_slots.set(asyncio.Semaphore(max_concurrent))


class SandboxExecutor:
    """Runs code on the THOR sandbox service (`make sandbox`) under a `SandboxPolicy`."""

    def __init__(self, client: SandboxClient, policy: SandboxPolicy | None = None) -> None:
        self._client = client
        self.policy = policy or SandboxPolicy()

    async def execute(self, code: str, *, timeout_s: float, echo_last_expression: bool) -> ToolResult:
        if not code.strip():
            return ToolResult(1, "", "SyntaxError: the code block is empty", "error", 0.0)
        slots = _request_slots.get()
        if slots is None:
            return await self._execute(code, timeout_s, echo_last_expression)
        async with slots:
            return await self._execute(code, timeout_s, echo_last_expression)

    async def _execute(self, code: str, timeout_s: float, echo: bool) -> ToolResult:
        t0 = time.monotonic()
        try:
            snippet = Snippet(code=code, timeout=timeout_s, echo_last_expression=echo)
        except ValueError as exc:  # the snippet itself is unacceptable (e.g. NUL bytes)
            return ToolResult(1, "", f"ValueError: {exc}", "error", 0.0)
        delay = self.policy.retry_backoff_s
        for attempt in range(self.policy.busy_retries + 1):
            try:
                [r] = await self._client.execute([snippet])
            except SandboxRequestError as exc:  # e.g. a block over the size limit: the model sees why
                return ToolResult(1, "", f"RuntimeError: {exc}", "error", time.monotonic() - t0)
            except SandboxUnreachable:  # down: nothing can run; the request fails (the server says 503)
                raise
            except SandboxError as exc:  # busy after the client's retries, the worker died, a read timeout
                if attempt < self.policy.busy_retries:
                    log.warning(
                        "sandbox failed (%s); retry %d of %d in %.1fs",
                        exc,
                        attempt + 1,
                        self.policy.busy_retries,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.policy.max_backoff_s)
                    continue
                if self.policy.on_sandbox_error == "fail":
                    raise
                kind = "was busy" if isinstance(exc, SandboxBusy) else "failed"
                # detail first; the last line (what the reference rules show the model) is the summary
                message = (
                    f"{exc}\nSandboxError: the code could not be run: the sandbox {kind} "
                    f"({attempt + 1} attempts); this is not an error in the code"
                )
                log.error("sandbox call gave up after %d attempts: %s", attempt + 1, exc)
                return ToolResult(None, "", message, "sandbox_error", time.monotonic() - t0)
            return ToolResult(r.exit_code, r.stdout, r.stderr, r.outcome.value, r.duration_s)
        raise AssertionError("unreachable: the loop returns or raises")
