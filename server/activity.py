"""How much of the server's time the engine and the sandbox were working: its utilisation clock.

Owns: `ActivityClock`, which keeps two running totals of wall time on the monotonic clock:
`generation_s`, time with at least one generation request in the engine (from its
submission until its last output reached the server's event loop), and `tool_only_s`, time
with at least one code execution in the sandbox and no generation running. Everything else
is time the server spent on neither: waiting for clients, or its own work between the
engine and the sandbox (decoding events, rendering, tokenising observations). The
wrappers `ClockedBackend` and `ClockedExecutor` time the engine's generation requests and
the sandbox's executions (a tool-cache hit is not an execution); `ActivityCollector`
exposes the totals on `/metrics` as `thor_engine_busy_seconds_total` and
`thor_sandbox_only_seconds_total`, read at scrape time so a long generation shows as it
runs.

What it measures and what not: the engine core runs in its own process; the clock sees it
from the server's side, so a generation ends when its last output is consumed, not when the
engine core produced it (a busy event loop delays that by its own lag). It counts only the
work of this process: a client that calls the sandbox directly (a client-side tool loop)
is invisible to it. Operators read `rate(thor_engine_busy_seconds_total[1m])` as the engine's
busy fraction; benchmarks/tir_bench.py uses the totals to split a run's wall time.

Does not own: the engine, the sandbox, or the other metrics (metrics.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from thor_engine.tools import ToolExecutor, ToolResult


@dataclass(frozen=True)
class ActivityTotals:
    generation_s: float  # at least one generation request in the engine
    tool_only_s: float  # at least one code execution, no generation
    elapsed_s: float  # since the clock started


class ActivityClock:
    """Union time of generation and of sandbox work on one event loop (not thread-safe: one loop)."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._start = self._last = now()
        self._generating = 0
        self._executing = 0
        self._generation_s = 0.0
        self._tool_only_s = 0.0

    def _advance(self) -> None:
        t = self._now()
        dt, self._last = t - self._last, t
        if self._generating:
            self._generation_s += dt
        elif self._executing:
            self._tool_only_s += dt

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        self._advance()
        self._generating += 1
        try:
            yield
        finally:
            self._advance()
            self._generating -= 1

    @contextlib.contextmanager
    def executing(self) -> Iterator[None]:
        self._advance()
        self._executing += 1
        try:
            yield
        finally:
            self._advance()
            self._executing -= 1

    def totals(self) -> ActivityTotals:
        self._advance()
        return ActivityTotals(self._generation_s, self._tool_only_s, self._last - self._start)


class ClockedBackend:
    """A generation backend whose requests count as generation on `clock`.

    Everything but `generate` is the wrapped backend's own (attributes are delegated)."""

    def __init__(self, inner: Any, clock: ActivityClock) -> None:
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def generate(
        self, prompt_token_ids: Sequence[int], params: Any, request_id: str, **kwargs: Any
    ) -> AsyncIterator[Any]:
        with self._clock.generating():
            async with contextlib.aclosing(self._inner.generate(prompt_token_ids, params, request_id, **kwargs)) as gen:
                async for chunk in gen:
                    yield chunk


class ClockedExecutor:
    """A tool executor whose executions count as sandbox work on `clock`."""

    def __init__(self, inner: ToolExecutor, clock: ActivityClock) -> None:
        self._inner = inner
        self._clock = clock

    async def execute(self, code: str, *, timeout_s: float, echo_last_expression: bool) -> ToolResult:
        with self._clock.executing():
            return await self._inner.execute(code, timeout_s=timeout_s, echo_last_expression=echo_last_expression)


class ActivityCollector(Collector):
    """The clock's totals as Prometheus counters, read at scrape time."""

    def __init__(self, clock: ActivityClock) -> None:
        self._clock = clock

    def collect(self) -> Iterator[CounterMetricFamily]:
        t = self._clock.totals()
        yield CounterMetricFamily(
            "thor_engine_busy_seconds",
            "Wall time with at least one generation request in the engine.",
            value=t.generation_s,
        )
        yield CounterMetricFamily(
            "thor_sandbox_only_seconds",
            "Wall time with code running in the sandbox and no generation in the engine.",
            value=t.tool_only_s,
        )
