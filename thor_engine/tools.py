"""Executing a code block: the executor protocol and its sandbox implementation.

Owns: the `ToolExecutor` interface the decoder awaits (so sandbox calls never
block the event loop and can be cancelled), the result type it returns, and
`SandboxExecutor`, which runs code on the sandbox service through its async
client. The server may wrap an executor (e.g. with a result cache); the decoder
does not care.

Does not own: observation rules (observation.py) or the sandbox itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from thor_sandbox.client import SandboxClient, SandboxRequestError
from thor_sandbox.protocol import Snippet


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


class SandboxExecutor:
    """Runs code on the THOR sandbox service (`make sandbox`)."""

    def __init__(self, client: SandboxClient) -> None:
        self._client = client

    async def execute(self, code: str, *, timeout_s: float, echo_last_expression: bool) -> ToolResult:
        t0 = time.monotonic()
        if not code.strip():
            return ToolResult(1, "", "SyntaxError: the code block is empty", "error", 0.0)
        try:
            [r] = await self._client.execute(
                [Snippet(code=code, timeout=timeout_s, echo_last_expression=echo_last_expression)]
            )
        except SandboxRequestError as exc:  # e.g. a block over the size limit: the model sees why
            return ToolResult(1, "", f"RuntimeError: {exc}", "error", time.monotonic() - t0)
        except ValueError as exc:  # the snippet itself is unacceptable (e.g. NUL bytes)
            return ToolResult(1, "", f"ValueError: {exc}", "error", time.monotonic() - t0)
        return ToolResult(r.exit_code, r.stdout, r.stderr, r.outcome.value, r.duration_s)
