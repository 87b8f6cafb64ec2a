"""Merging several async streams into one, with cancellation that reaches every source.

Owns: `merge`, which runs each source in its own task and yields items as they
arrive; an exception in any source is re-raised to the consumer; when the consumer
stops (or is cancelled), every source is cancelled and closed, so engine requests
and sandbox calls behind them are aborted. Also `cancel_and_wait`, the one way a
consumer here stops the tasks it started: each is cancelled once and left to finish
its own cleanup, however often the consumer is cancelled meanwhile. Does not own:
what the sources are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


async def merge(sources: Sequence[Callable[[], AsyncIterator[T]]]) -> AsyncIterator[T]:
    """Yield the items of all `sources()` interleaved in arrival order."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(make: Callable[[], AsyncIterator[T]]) -> None:
        try:
            async with contextlib.aclosing(make()) as it:  # type: ignore[type-var]
                async for item in it:
                    await queue.put(item)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(exc)
        finally:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in sources]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        await cancel_and_wait(tasks)


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` once and wait until every one has ended; if the caller is cancelled while
    it waits, it still waits, then re-raises that cancellation.

    Not `await asyncio.gather(*tasks)`: gather passes each cancellation of its caller on to the
    tasks, and a caller inside an anyio cancel scope (Starlette's, when a stream's client
    disconnects) is cancelled again on every turn of the event loop. Those repeated
    cancellations reach the tasks in the middle of their own cleanup, even where it is shielded
    (httpx closing a sandbox connection under an anyio shield): the connection stays open, the
    sandbox never sees its client leave and runs the call to its timeout. `asyncio.wait` never
    cancels what it waits for."""
    for t in tasks:
        t.cancel()
    cancelled: asyncio.CancelledError | None = None
    # done-ness read from the tasks themselves, never from what `wait` returns: a caller that is
    # cancelled on every turn of the loop would never see a `wait` complete
    while pending := [t for t in tasks if not t.done()]:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError as exc:
            cancelled = exc
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: a task that failed on its way out is not reported as "never retrieved"
    if cancelled is not None:
        raise cancelled
