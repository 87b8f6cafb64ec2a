"""A tool executor that consults the shared tool-result cache before the sandbox.

Owns: wrapping the engine's `ToolExecutor` so identical, deterministic snippets
run on an identical sandbox are answered from the store. "Identical sandbox" is
the fingerprint the sandbox reports on its `/health` (its versions and limits),
never its URL: two sandboxes that behave alike share entries wherever they listen,
and a sandbox upgraded or reconfigured at the same address does not reuse the old
results. Results of code that uses randomness or time, and timeouts or sandbox
errors, are never cached. Does not own: the store (store/) or execution
(thor_engine.tools).
"""

from __future__ import annotations

import dataclasses
import hashlib

from server.metrics import ServerMetrics
from server.store import Store, is_cacheable, tool_cache_key
from thor_engine.tools import ToolExecutor, ToolResult

UNCACHED_OUTCOMES = {"timeout", "sandbox_error", "oom"}


class CachingExecutor:
    def __init__(
        self, inner: ToolExecutor, store: Store, sandbox_fingerprint: str, ttl_s: int, metrics: ServerMetrics
    ) -> None:
        """`sandbox_fingerprint`: `HealthResponse.fingerprint` of the sandbox `inner` runs on."""
        if not sandbox_fingerprint:
            raise ValueError("sandbox_fingerprint is empty: pass the fingerprint from the sandbox's /health")
        self._inner, self._store, self._ttl, self._metrics = inner, store, ttl_s, metrics
        self._fingerprint = sandbox_fingerprint

    def _key(self, code: str, timeout_s: float, echo: bool) -> str:
        fingerprint = hashlib.sha256(f"{self._fingerprint}|timeout={timeout_s}|echo={echo}".encode()).hexdigest()
        return tool_cache_key(code, fingerprint)

    async def execute(self, code: str, *, timeout_s: float, echo_last_expression: bool) -> ToolResult:
        cacheable = self._ttl > 0 and is_cacheable(code)
        key = self._key(code, timeout_s, echo_last_expression) if cacheable else ""
        if cacheable:
            hit = await self._store.cache_get(key)
            if hit is not None:
                self._metrics.cache_hits.inc()
                return dataclasses.replace(ToolResult(**hit), cached=True, duration_s=0.0)
        result = await self._inner.execute(code, timeout_s=timeout_s, echo_last_expression=echo_last_expression)
        if cacheable and result.outcome not in UNCACHED_OUTCOMES:
            await self._store.cache_set(key, dataclasses.asdict(result), self._ttl)
        return result
