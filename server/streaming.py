"""Running one generation request: the one non-stream path and the one SSE path.

Owns: `respond`, used by chat, the Responses API, THOR completions and plain completions
alike: it feeds the engine's output (counted by a `TokenMeter`) to the request's response
builder and returns either the non-stream JSON body (the request is aborted when its client
disconnects: a 499) or a `StreamingResponse` framed by a `StreamFormat` (chat and
completions: `data:` lines; the Responses API: named events after its opening ones), with
`: keep-alive` comments while the engine is silent (e.g. during a long tool call), an
in-band error event when a started stream fails, then `[DONE]` where the format has it (the
events ready together are sent in one write: a stream that fell behind catches up at once); a
client that goes away cancels the stream, which aborts the engine requests and sandbox
calls. However the request ends, the client is charged with every token the engine
generated, in a `finally`; a completed request's trace is stored, bound to its client,
unless it asked for none (a stream stores it before sending its terminal event). Also `with_keepalive`.

Does not own: what the chunks and bodies say (the builders: thor/builder.py,
completions/plain.py, chat/plain.py, responses/builder.py), checking the request (admission/limits.py,
admission/guards.py), the engine, or anything about tokens beyond the counts the engine reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.admission.guards import RateLimiter
from server.admission.metering import TokenMeter, metered
from server.errors import ApiError, error_body, generation_error
from server.state import ServerState
from thor_engine.streams import cancel_and_wait
from thor_engine.tools import sandbox_request_scope

log = logging.getLogger("server")


class Builder(Protocol):
    """What `respond` needs of a response builder (responses.ThorBuilder,
    completions.plain.PlainCompletionBuilder, chat.plain.PlainChatBuilder,
    responses.builder.ResponsesBuilder)."""

    id: str
    include_usage: bool

    def feed(self, ev: Any) -> list[dict[str, Any]]:
        """Consume one item of the engine's output; return the stream chunks it produces."""

    def usage_chunk(self) -> dict[str, Any]: ...

    def response(self) -> dict[str, Any]: ...

    def generated_tokens(self) -> int: ...

    def trace(self, request_summary: dict[str, Any]) -> dict[str, Any]: ...

    @property
    def choices(self) -> list[Any]:
        """One state per choice; a finished choice has a truthy `final`."""


@dataclass(frozen=True)
class StreamFormat:
    """How a stream is framed. Chat and completions: `data:` lines, an OpenAI error body on a
    failure, then `data: [DONE]`. The Responses API: each event named (`event: <type>`), opening
    events of its own before the engine's first, its failure events (`error`, `response.failed`),
    and no sentinel."""

    named_events: bool = False
    done_sentinel: bool = True
    opening: Callable[[], list[dict[str, Any]]] | None = None
    error: Callable[[ApiError], list[dict[str, Any]]] | None = None

    def line(self, chunk: dict[str, Any]) -> str:
        data = json.dumps(chunk, ensure_ascii=False)
        return f"event: {chunk['type']}\ndata: {data}\n\n" if self.named_events else f"data: {data}\n\n"


CHAT_STREAM = StreamFormat()


async def respond(
    state: ServerState,
    request: Request,
    limiter: RateLimiter,
    builder: Builder,
    output: AsyncIterator[Any],
    *,
    stream: bool,
    include_usage: bool,
    summary: dict[str, Any] | None,
    stream_format: StreamFormat = CHAT_STREAM,
) -> Response:
    """Run the request; `summary` None stores no trace (`thor.trace: false`, plain completions,
    `store: false` responses)."""
    builder.include_usage = stream and include_usage  # `"usage": null` on every chunk, as OpenAI does
    sandbox_request_scope(state.settings.sandbox_max_concurrent_per_request)  # this request's samples share it
    meter = TokenMeter()
    events = metered(output, meter)
    tracing = summary is not None and state.settings.trace_ttl_s > 0
    trace_headers = {"X-Thor-Trace-Id": builder.id} if tracing else {}

    def charge() -> None:
        # what the engine generated (discarded attempts included), however the request ended
        limiter.charge(max(meter.generated, builder.generated_tokens()))

    async def finish() -> None:
        if tracing and summary is not None and all(c.final for c in builder.choices):
            await state.store.trace_put(
                builder.id, builder.trace(summary), state.settings.trace_ttl_s, owner=limiter.key
            )

    if not stream:

        async def collect() -> None:
            async with contextlib.aclosing(events) as evs:
                async for ev in evs:
                    builder.feed(ev)

        try:
            await until_disconnect(state, request, collect())
        except Exception as exc:
            err = generation_error(exc)
            if err is None:
                raise
            raise err from exc
        finally:
            charge()
        await finish()
        return JSONResponse(builder.response(), headers=trace_headers)

    lines = sse(state, builder, events, include_usage=include_usage, on_complete=finish, fmt=stream_format)
    return StreamingResponse(
        then(lines, charge),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **trace_headers},
    )


async def sse(
    state: ServerState,
    builder: Builder,
    events: AsyncIterator[Any],
    *,
    include_usage: bool,
    on_complete: Callable[[], Awaitable[None]],
    fmt: StreamFormat = CHAT_STREAM,
) -> AsyncIterator[str]:
    """The SSE lines of a stream: the format's opening events, the builder's chunks, keep-alives,
    the usage chunk when asked for, then `[DONE]` (after an error event on a failure) where the
    format has it. `on_complete()` (storing the trace) runs once every choice is final, before the
    batch with the terminal event is sent: a client that closes the stream on that event (the SDK
    on `response.completed`) still finds the response stored."""
    completed = stored = False
    pending: list[str] = []  # lines of the current batch, sent before an error event if a later one fails
    try:
        for chunk in fmt.opening() if fmt.opening else []:
            yield fmt.line(chunk)
        async with contextlib.aclosing(with_keepalive(events, state.settings.sse_keepalive_s)) as batches:
            async for batch in batches:
                if batch is KEEPALIVE:  # a long tool call: keep proxies and clients from timing out
                    yield ": keep-alive\n\n"
                    continue
                # every event that is ready goes out in one write (one ASGI message, one send)
                for ev in batch:
                    pending.extend(fmt.line(chunk) for chunk in builder.feed(ev))
                end_batch = getattr(builder, "end_batch", None)  # a builder that waits for the batch's end
                if end_batch is not None:
                    pending.extend(fmt.line(chunk) for chunk in end_batch())
                if not stored and all(c.final for c in builder.choices):
                    # stored before the terminal event goes out: a client that closes on it finds it stored
                    stored = True
                    await on_complete()
                if pending:
                    lines, pending = "".join(pending), []
                    yield lines
        if include_usage:
            yield fmt.line(builder.usage_chunk())
        completed = True
    except (asyncio.CancelledError, GeneratorExit):
        state.metrics.aborted.inc()
        raise
    except Exception as exc:
        err = generation_error(exc)
        if err is None:
            log.error("stream failed", exc_info=exc)
            err = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
        if pending:
            yield "".join(pending)
        failure = fmt.error(err) if fmt.error else [error_body(err.message, err.type, err.param, err.code)]
        yield "".join(fmt.line(chunk) for chunk in failure)
    if completed and not stored:
        await on_complete()
    if fmt.done_sentinel:
        yield "data: [DONE]\n\n"


async def until_disconnect(state: ServerState, request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; cancelled, and a 499, when the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                state.metrics.aborted.inc()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise ApiError(499, "the client closed the request", type="client_closed_request")
        return task.result()
    finally:
        if not task.done():
            task.cancel()


async def then(stream: AsyncIterator[str], done: Callable[[], None]) -> AsyncIterator[str]:
    """`stream`, then `done()` however it ends (completed, failed, or closed by a disconnect)."""
    try:
        async with contextlib.aclosing(stream) as items:  # type: ignore[type-var]
            async for item in items:
                yield item
    finally:
        done()


KEEPALIVE = object()


async def with_keepalive(events: AsyncIterator[Any], interval_s: float) -> AsyncIterator[Any]:
    """The items of `events` in batches (lists of every item that is ready when the consumer asks,
    so a consumer that fell behind catches up in one step), plus `KEEPALIVE` each time
    `interval_s` passes without one (0: never).

    One producer task pulls the events (so the source runs in a single task however long the
    consumer waits); closing this iterator cancels the producer, which closes the source, and
    waits for it to finish closing (`cancel_and_wait`: a consumer that is cancelled again and
    again, as Starlette's cancel scope does on a disconnect, must not interrupt that close, or
    the sandbox call it holds runs on)."""
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=256)

    async def pump() -> None:
        try:
            async with contextlib.aclosing(events) as evs:  # type: ignore[type-var]
                async for ev in evs:
                    await queue.put((True, ev))
            await queue.put((False, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((False, exc))

    producer = asyncio.create_task(pump())
    getter: asyncio.Future[tuple[bool, Any]] | None = None
    try:
        while True:
            if queue.empty() or getter is not None:
                getter = getter or asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter}, timeout=interval_s if interval_s > 0 else None)
                if not done:
                    yield KEEPALIVE
                    continue
                ready, getter = [getter.result()], None
            else:
                ready = []
            while not queue.empty():
                ready.append(queue.get_nowait())
            batch: list[Any] = []
            for is_event, item in ready:
                if is_event:
                    batch.append(item)
                    continue
                if batch:
                    yield batch
                if item is None:
                    return
                raise item
            yield batch
    finally:
        # cancelled once, then waited for however often this consumer is cancelled meanwhile
        # (Starlette's cancel scope re-cancels it every turn of the loop): see `cancel_and_wait`
        await cancel_and_wait([producer] if getter is None else [producer, getter])
