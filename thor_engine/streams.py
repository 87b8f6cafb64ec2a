"""Merging several async streams into one, with cancellation that reaches every source.

Owns: `merge`, which runs each source in its own task and yields items as they
arrive; an exception in any source is re-raised to the consumer; when the consumer
stops (or is cancelled), every source is cancelled and closed, so engine requests
and sandbox calls behind them are aborted. Does not own: what the sources are.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

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
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
