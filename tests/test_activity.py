"""The server's utilisation clock (server/activity.py): union time of generation and sandbox work."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from server.activity import ActivityClock, ActivityCollector, ClockedBackend, ClockedExecutor
from thor_engine.tools import ToolResult


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_overlapping_generations_count_once_and_sandbox_only_outside_them():
    now = FakeTime()
    clock = ActivityClock(now)
    now.t += 1  # idle: counts nowhere
    with clock.generating():
        now.t += 2
        with clock.generating():  # a second request overlaps the first: still 1 s per second
            now.t += 3
            with clock.executing():  # code runs while generation runs: generation time
                now.t += 1
        now.t += 1
    with clock.executing():  # code runs and nothing generates: sandbox-only time
        now.t += 4
        with clock.executing():
            now.t += 0.5
    now.t += 2  # idle again
    t = clock.totals()
    assert t.generation_s == 7
    assert t.tool_only_s == 4.5
    assert t.elapsed_s == 14.5


def test_an_exception_still_ends_the_interval():
    now = FakeTime()
    clock = ActivityClock(now)
    try:
        with clock.generating():
            now.t += 1
            raise RuntimeError("engine failed")
    except RuntimeError:
        pass
    now.t += 5
    assert clock.totals().generation_s == 1


class Backend:
    tokenizer = "tok"

    def __init__(self, now: FakeTime) -> None:
        self.now = now

    async def generate(self, ids, params, request_id):
        for _ in range(3):
            self.now.t += 0.25
            yield "chunk"


class Executor:
    def __init__(self, now: FakeTime) -> None:
        self.now = now

    async def execute(self, code, *, timeout_s, echo_last_expression):
        self.now.t += 2
        return ToolResult(0, "1\n", "", "ok", 2.0)


def test_wrappers_time_generation_and_execution_and_exposition_reads_them():
    now = FakeTime()
    clock = ActivityClock(now)
    backend = ClockedBackend(Backend(now), clock)
    executor = ClockedExecutor(Executor(now), clock)

    async def main() -> None:
        assert [c async for c in backend.generate([1], None, "r")] == ["chunk"] * 3
        assert (await executor.execute("print(1)", timeout_s=5, echo_last_expression=False)).stdout == "1\n"

    asyncio.run(main())
    assert backend.tokenizer == "tok"  # everything else is the wrapped backend's
    t = clock.totals()
    assert (t.generation_s, t.tool_only_s) == (0.75, 2.0)
    registry = CollectorRegistry()
    registry.register(ActivityCollector(clock))
    text = generate_latest(registry).decode()
    assert "thor_engine_busy_seconds_total 0.75" in text
    assert "thor_sandbox_only_seconds_total 2.0" in text
