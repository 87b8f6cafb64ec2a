"""Counting the tokens the engine generates for each HTTP request, however the request ends.

Owns: `TokenMeter` (one per request), `MeteredBackend` (a generation backend wrapper
that adds every generated token to the meter of the request it runs for) and
`metered` (an async-iterator wrapper that makes a meter current while the engine's
event stream advances). Rate limits charge what the meter counted in a `finally`, so
a client that disconnects mid-stream, a request that fails, and plain
`/v1/completions` all pay for the tokens the engine produced, discarded
self-correction attempts included (the same count as the decoder's
`Final.usage.generated_tokens`).

How a token finds its meter: `metered()` sets a context variable around each step of
the event stream; the engine calls the backend in that step, or in tasks it creates
there (which copy the context), so `MeteredBackend.generate` sees the meter.

Does not own: the backend itself, the rate-limit buckets (server/store) or deciding
what to charge (streaming.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class TokenMeter:
    """Tokens generated so far for one request (all samples, all engine calls)."""

    generated: int = 0


_CURRENT: ContextVar[TokenMeter | None] = ContextVar("thor_token_meter", default=None)


async def metered(events: AsyncIterator[T], meter: TokenMeter) -> AsyncIterator[T]:
    """`events`, with `meter` current while each item is produced; closes `events` when done."""
    async with contextlib.aclosing(events) as evs:  # type: ignore[type-var]
        it = evs.__aiter__()
        while True:
            token = _CURRENT.set(meter)
            try:
                item = await it.__anext__()
            except StopAsyncIteration:
                return
            finally:
                _CURRENT.reset(token)
            yield item


class MeteredBackend:
    """A generation backend that counts generated tokens into the current request's meter.

    Everything but `generate` is the wrapped backend's own (attributes are delegated)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def generate(
        self, prompt_token_ids: Sequence[int], params: Any, request_id: str, **kwargs: Any
    ) -> AsyncIterator[Any]:
        meter = _CURRENT.get()
        async with contextlib.aclosing(self._inner.generate(prompt_token_ids, params, request_id, **kwargs)) as gen:
            async for chunk in gen:
                if meter is not None:
                    meter.generated += len(chunk.token_ids)
                yield chunk
