"""`server.streaming.with_keepalive`: the events a stream sends, batched when they are ready together."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.streaming import KEEPALIVE, with_keepalive


async def collect(events, interval_s: float, consumer_delay_s: float = 0.0) -> list:
    out = []
    async for batch in with_keepalive(events, interval_s):
        out.append(batch)
        if consumer_delay_s:
            await asyncio.sleep(consumer_delay_s)
    return out


async def fast(n: int):
    for i in range(n):
        yield i
        await asyncio.sleep(0)


async def slow(delays: list[float]):
    for i, d in enumerate(delays):
        await asyncio.sleep(d)
        yield i


def test_a_consumer_that_falls_behind_gets_what_is_ready_in_one_batch_in_order():
    batches = asyncio.run(collect(fast(200), 0, consumer_delay_s=0.01))
    flat = [x for b in batches for x in b]
    assert flat == list(range(200))
    assert len(batches) < 50, len(batches)  # batched: far fewer writes than events
    assert all(b for b in batches)  # never an empty write


def test_keepalive_while_the_source_is_silent_and_nothing_is_lost():
    batches = asyncio.run(collect(slow([0.0, 0.35, 0.0]), 0.1))
    assert [x for b in batches if b is not KEEPALIVE for x in b] == [0, 1, 2]
    assert sum(b is KEEPALIVE for b in batches) >= 2


def test_an_error_comes_after_the_events_before_it():
    async def failing():
        yield 1
        yield 2
        raise ValueError("engine broke")

    async def main() -> list:
        got = []
        with pytest.raises(ValueError, match="engine broke"):
            async for batch in with_keepalive(failing(), 0):
                got.extend(batch)
        return got

    assert asyncio.run(main()) == [1, 2]


def test_closing_early_closes_the_source():
    closed = asyncio.Event()

    async def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def main() -> None:
        gen = with_keepalive(endless(), 0)
        async for _batch in gen:
            break
        await gen.aclose()
        assert closed.is_set()

    asyncio.run(main())


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_cancelled_by_a_cancel_scope_lets_its_source_finish_closing(n):
    """Starlette cancels a stream whose client left through an anyio cancel scope, which cancels
    the stream's task again on every turn of the loop until it ends. The source (the decoder,
    whose sandbox call's httpx connection closes under a shield) is cancelled once and must be
    left to finish closing: the repeated cancellations once reached it through `gather` and cut
    its cleanup short, so the sandbox never saw the client leave. `n` 2: through `merge` too."""
    import anyio

    from thor_engine.streams import merge

    cleaned: list[int] = []

    async def calling(i: int):
        try:
            yield i
            await asyncio.sleep(3600)  # the sandbox call
        finally:
            with anyio.CancelScope(shield=True):  # httpcore closing the connection
                await asyncio.sleep(0.05)
            cleaned.append(i)

    def source():
        return merge([lambda i=i: calling(i) for i in range(n)]) if n > 1 else calling(0)

    async def main() -> None:
        started = asyncio.Event()

        async def stream() -> None:
            async with contextlib.aclosing(with_keepalive(source(), 0)) as batches:
                async for _batch in batches:
                    started.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            await started.wait()
            tg.cancel_scope.cancel()

    asyncio.run(main())
    assert sorted(cleaned) == list(range(n))
