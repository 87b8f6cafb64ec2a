"""The FastAPI application: routes, auth, rate limits, streaming, traces, health, metrics.

Owns: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/v1/traces/{id}`,
`/health` and `/metrics`; Bearer-key auth on `/v1/*` (keys checked as digests in
constant time, failed attempts throttled per client address); rate limits per key id
(per client address on an open server) from the store, charged with every token the
engine generated when a request ends, however it ends; SSE streaming with FastAPI's
`StreamingResponse` (a client that goes away cancels the stream, which aborts the
engine requests and sandbox calls); aborting non-stream requests whose client
disconnected; storing traces bound to the client that made them (`thor.trace: false`
stores none). Also: `: keep-alive` SSE comments while a stream is silent (long tool
calls) and an error event then `[DONE]` when a started stream fails; a request-body
size limit (413); server-side maxima on client-settable THOR options and n x
max_tokens; max_tokens clamped to the context as vLLM does; the served model's path
accepted as its name (`vllm serve <path>`); `/health` running the engine's own check.

Does not own: the engine (thor_engine.engine.ThorEngine, created by the
`build` callable passed to `create_app`), the store (server/store/), key digests
and client ids (auth.py), token counting (metering.py), request shapes
(protocol.py) or response rendering (responses.py). Knows nothing of tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from thor_engine.config import SamplingOptions, ThorConfig
from thor_engine.engine import EngineUnavailable, InvalidParameter, PromptTooLong, ThorEngine
from thor_engine.prompting import TIR_INSTRUCTIONS
from thor_engine.tools import sandbox_request_scope
from thor_sandbox.client import SandboxClient, SandboxError, SandboxUnavailable

from .auth import KEY_ID_SCOPE, ApiKeys, address_id, client_id
from .errors import ApiError, error_body, install_handlers
from .metering import TokenMeter, metered
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, _SamplingRequest
from .responses import ResponseBuilder
from .settings import ServerSettings
from .store import STORE_UNAVAILABLE, Store

log = logging.getLogger("server")


@dataclass
class ServerState:
    settings: ServerSettings
    engine: ThorEngine
    store: Store
    sandbox: SandboxClient
    metrics: ServerMetrics
    model_name: str
    api_keys: ApiKeys  # digests only; empty = open server
    sandbox_max_timeout_s: float | None = None  # the sandbox's own limit, read from its /health at start


Build = Callable[[ServerMetrics], Awaitable[tuple[ServerState, Callable[[], Awaitable[None]]]]]


def create_app(settings: ServerSettings, build: Build, metrics: ServerMetrics | None = None) -> FastAPI:
    """`build(metrics)` creates the engine, store and sandbox client and returns (state, close)."""
    metrics = metrics or ServerMetrics()
    holder: dict[str, ServerState] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state, close = await build(metrics)
        holder["state"] = state
        if not state.api_keys:
            log.warning("no API key configured: the API is open to anyone who can reach it")
        log.info("serving %s (context %d tokens)", state.model_name, state.engine.max_model_len)
        try:
            yield
        finally:
            await close()

    app = FastAPI(title="THOR reasoning server", version="0.1.0", lifespan=lifespan)
    install_handlers(app)

    def S() -> ServerState:
        state = holder.get("state")
        if state is None:
            raise ApiError(503, "the server is starting", type="service_unavailable")
        return state

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    app.add_middleware(FrameMiddleware, metrics=metrics, holder=holder)

    def _client_key(request: Request) -> str:
        # the key id when auth is on, the client address otherwise: never a string the client
        # picks freely (on an open server every Bearer string would be a fresh bucket)
        return client_id(request.scope)

    background: set[asyncio.Future[None]] = set()

    def _charge(state: ServerState, rate_key: str, tokens: int) -> None:
        """Debit generated tokens from the client's token bucket. Called from `finally` blocks, so
        it runs as its own task: a request cancelled by a disconnect still pays."""
        if not state.settings.tokens_per_minute or tokens <= 0:
            return
        task = asyncio.ensure_future(state.store.charge_tokens(rate_key, tokens))
        background.add(task)
        task.add_done_callback(background.discard)

    async def _rate_limit(state: ServerState, request: Request, tokens: int) -> str:
        key = _client_key(request)
        s = state.settings
        if s.requests_per_minute is None and s.tokens_per_minute is None:
            return key
        decision = await state.store.rate_limit(
            key, requests_per_min=s.requests_per_minute, tokens_per_min=s.tokens_per_minute, tokens=tokens
        )
        if not decision.allowed:
            metrics.rate_limited.inc()
            retry = max(1, int(decision.retry_after_s + 0.999))
            raise ApiError(429, f"rate limit reached ({decision.limit}); retry in {retry}s", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        return key

    def _check_model(state: ServerState, body: _SamplingRequest) -> None:
        # `vllm serve <path>` clients send the model path (or the preset the server was started with)
        names = {state.model_name, state.engine.model_name, state.settings.model, *state.engine.model_aliases}
        if body.model not in names:
            raise ApiError(404, f"The model `{body.model}` does not exist. This server serves `{state.model_name}`.",
                           type="not_found_error", param="model", code="model_not_found")
        if body.n > state.settings.max_n:
            raise ApiError(400, f"n must be at most {state.settings.max_n}", param="n")

    def _check_thor_limits(state: ServerState, cfg: ThorConfig) -> None:
        s = state.settings
        if cfg.max_tool_calls > s.max_tool_calls_limit:
            raise ApiError(400, f"thor.max_tool_calls is {cfg.max_tool_calls}; this server allows at most "
                           f"{s.max_tool_calls_limit} (max_tool_calls_limit)", param="thor.max_tool_calls")
        if cfg.self_correction.max_retries > s.max_retries_limit:
            raise ApiError(400, f"thor.self_correction.max_retries is {cfg.self_correction.max_retries}; this "
                           f"server allows at most {s.max_retries_limit} (max_retries_limit)",
                           param="thor.self_correction.max_retries")
        limit = state.sandbox_max_timeout_s
        if limit is not None and cfg.observation.timeout_s > limit:
            raise ApiError(400, f"thor.observation.timeout_s is {cfg.observation.timeout_s}; the sandbox allows at "
                           f"most {limit:g} s per execution (its max_timeout_s)", param="thor.observation.timeout_s")

    def _sampling(state: ServerState, body: _SamplingRequest, max_tokens: int, param: str) -> SamplingOptions:
        """The request's sampling (with the checkpoint's defaults), within the server's n x max_tokens cap."""
        limit = state.settings.max_request_tokens
        if body.n * max_tokens > limit:
            raise ApiError(400, f"n x {param} is {body.n} x {max_tokens} = {body.n * max_tokens} tokens; this server "
                           f"allows at most {limit} per request (max_request_tokens): lower n or {param}", param=param)
        try:
            sampling = body.sampling(max_tokens, state.engine.generation_defaults)
            state.engine.check_sampling(sampling)
        except InvalidParameter as exc:
            raise ApiError(400, str(exc), param=exc.param) from exc
        return sampling

    # --- running a request -------------------------------------------------------------

    async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    metrics.aborted.inc()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                    raise ApiError(499, "the client closed the request", type="client_closed_request")
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    def _sandbox_error(exc: SandboxError) -> ApiError:
        if isinstance(exc, SandboxUnavailable):
            return ApiError(503, f"the code sandbox is unavailable: {exc}", type="service_unavailable",
                            code="sandbox_unavailable", headers={"Retry-After": "5"})
        return ApiError(502, f"the code sandbox failed: {exc}", type="server_error", code="sandbox_error")

    def _api_error(exc: Exception) -> ApiError | None:
        """The client-facing error for a failure while generating (None: an unexpected one)."""
        if isinstance(exc, SandboxError):
            return _sandbox_error(exc)
        if isinstance(exc, InvalidParameter):  # the engine refused a value
            return ApiError(400, str(exc), param=exc.param)
        if isinstance(exc, EngineUnavailable):
            return ApiError(503, str(exc), type="service_unavailable", code="engine_unavailable")
        return None

    def _stream_error(exc: Exception) -> str:
        """The stream has started: report the failure in-band as an OpenAI error event."""
        err = _api_error(exc)
        if err is None:
            log.error("stream failed", exc_info=exc)
            err = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"

    async def _run(
        state: ServerState, request: Request, builder: ResponseBuilder, events: AsyncIterator[Any],
        stream: bool, include_usage: bool, rate_key: str, summary: dict[str, Any] | None,
    ) -> Response:
        """`summary` None: store no trace (`thor.trace: false`)."""
        builder.include_usage = stream and include_usage  # `"usage": null` on every chunk, as OpenAI does
        sandbox_request_scope(state.settings.sandbox_max_concurrent_per_request)  # this request's samples share it
        meter = TokenMeter()
        events = metered(events, meter)
        tracing = summary is not None and state.settings.trace_ttl_s > 0
        trace_headers = {"X-Thor-Trace-Id": builder.id} if tracing else {}

        def charge() -> None:
            # what the engine generated (discarded attempts included), however the request ended
            finals = sum(c.final.usage.generated_tokens for c in builder.choices if c.final)
            _charge(state, rate_key, max(meter.generated, finals))

        async def finish() -> None:
            if tracing and summary is not None and all(c.final for c in builder.choices):
                await state.store.trace_put(builder.id, builder.trace(summary), state.settings.trace_ttl_s,
                                            owner=rate_key)

        if not stream:
            async def collect() -> None:
                async with contextlib.aclosing(events) as evs:
                    async for ev in evs:
                        builder.feed(ev)

            try:
                await _until_disconnect(request, collect())
            except (SandboxError, InvalidParameter, EngineUnavailable) as exc:
                raise _api_error(exc) from exc  # type: ignore[misc]
            finally:
                charge()
            await finish()
            return JSONResponse(builder.response(), headers=trace_headers)

        async def sse() -> AsyncIterator[str]:
            completed = False
            try:
                async with contextlib.aclosing(with_keepalive(events, state.settings.sse_keepalive_s)) as evs:
                    async for ev in evs:
                        if ev is KEEPALIVE:  # a long tool call: keep proxies and clients from timing out
                            yield ": keep-alive\n\n"
                            continue
                        for chunk in builder.feed(ev):
                            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if include_usage:
                    yield f"data: {json.dumps(builder.usage_chunk())}\n\n"
                completed = True
            except (asyncio.CancelledError, GeneratorExit):
                metrics.aborted.inc()
                raise
            except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
                yield _stream_error(exc)
            if completed:
                await finish()
            yield "data: [DONE]\n\n"

        return StreamingResponse(_then(sse(), charge), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **trace_headers})

    # --- routes --------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state = S()
        _check_model(state, body)
        opts = body.thor
        tools = opts is None or opts.enabled
        cfg = (opts.to_config(state.settings.thor) if opts else state.settings.thor)
        _check_thor_limits(state, cfg)
        tir_mode = opts.tir_mode(state.settings.tir_instructions) if opts else state.settings.tir_instructions
        try:  # template and tokeniser run on the engine's render thread, off the event loop
            prompt = await state.engine.prepare_chat(
                body.chat_messages(), tir_instructions=TIR_INSTRUCTIONS if tools else None, tir_mode=tir_mode,
                chat_template_kwargs=body.template_kwargs(),
            )
        except PromptTooLong as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        except InvalidParameter as exc:  # the chat template refused the conversation, bad template kwargs
            raise ApiError(400, str(exc), param=exc.param) from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        # as vLLM: asking for more than the context leaves is clamped, not refused
        max_tokens = state.engine.max_tokens_for(prompt, body.effective_max_tokens(), state.settings.default_max_tokens)
        sampling = _sampling(state, body, max_tokens,
                             "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        rate_key = await _rate_limit(state, request, prompt.num_tokens)
        rid = "chatcmpl-" + uuid.uuid4().hex
        builder = ResponseBuilder(kind="chat", response_id=rid, model=body.model, n=body.n,
                                  reasoning_fields=state.settings.reasoning_fields, tools_enabled=tools,
                                  reasoning_model=state.engine.reasoning_model, metrics=metrics)
        events = state.engine.stream(prompt, cfg, sampling, n=body.n,
                                     vote=bool(opts and opts.vote), request_id=rid)
        summary = {"route": "/v1/chat/completions", "n": body.n, "stream": body.stream,
                   "thor": cfg.model_dump(), "max_tokens": max_tokens, "messages": len(body.messages)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _run(state, request, builder, events, body.stream, include_usage, rate_key,
                          summary if opts is None or opts.trace else None)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state = S()
        _check_model(state, body)
        if body.thor is not None:
            _check_thor_limits(state, body.thor.to_config(state.settings.thor))
        try:
            prompt = await state.engine.prepare_text(body.single_prompt())
        except PromptTooLong as exc:
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc
        rate_key = await _rate_limit(state, request, prompt.num_tokens)
        rid = "cmpl-" + uuid.uuid4().hex
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        sampling = _sampling(state, body, state.engine.max_tokens_for(prompt, body.max_tokens), "max_tokens")
        if body.thor is not None:
            cfg = body.thor.to_config(state.settings.thor)
            builder = ResponseBuilder(kind="completion", response_id=rid, model=body.model, n=body.n,
                                      reasoning_fields=state.settings.reasoning_fields, tools_enabled=True,
                                      reasoning_model=False, metrics=metrics)
            events = state.engine.stream(prompt, cfg, sampling, n=body.n, vote=body.thor.vote, request_id=rid)
            summary = {"route": "/v1/completions", "n": body.n, "stream": body.stream, "thor": cfg.model_dump()}
            return await _run(state, request, builder, events, body.stream, include_usage, rate_key,
                              summary if body.thor.trace else None)
        return await _plain_completion(state, request, body, prompt, sampling, rid, include_usage, rate_key)

    async def _plain_completion(state: ServerState, request: Request, body: CompletionRequest, prompt: Any,
                                sampling: Any, rid: str, include_usage: bool, rate_key: str) -> Response:
        created = int(time.time())
        texts = [""] * body.n
        finals: list[dict[str, Any]] = [{} for _ in range(body.n)]
        lps: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                      for _ in range(body.n)]
        usage = {"prompt_tokens": prompt.num_tokens, "completion_tokens": 0, "total_tokens": 0}
        counts = [0] * body.n

        def add_logprobs(i: int, entries: list | None) -> dict | None:
            if entries is None:
                return None
            part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for text, lp, tops in entries:
                offset = len(texts[i]) + sum(len(t) for t in part["tokens"])
                for d in (part, lps[i]):
                    d["tokens"].append(text)
                    d["token_logprobs"].append(lp)
                    d["top_logprobs"].append(tops)
                    d["text_offset"].append(offset)
            return part

        def chunk_of(i: int, text: str, lp: dict | None, finish: str | None, stop_reason: Any) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish,
                                 "stop_reason": stop_reason}]}

        meter = TokenMeter()
        gen = metered(state.engine.generate_plain(prompt, sampling, n=body.n, logprobs=body.logprobs,
                                                  include_stop_str_in_output=body.include_stop_str_in_output,
                                                  request_id=rid), meter)

        def charge() -> None:  # however the request ends (rate limits count generated tokens)
            _charge(state, rate_key, max(meter.generated, sum(counts)))

        def account(c: Any) -> None:
            counts[c.index] = c.completion_tokens
            if c.finished:
                finals[c.index] = {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        if not body.stream:
            async def collect() -> None:
                async with contextlib.aclosing(gen) as g:
                    async for c in g:
                        add_logprobs(c.index, c.logprobs)
                        texts[c.index] += c.text
                        account(c)

            try:
                await _until_disconnect(request, collect())
            except (InvalidParameter, EngineUnavailable) as exc:
                raise _api_error(exc) from exc  # type: ignore[misc]
            finally:
                charge()
            usage["completion_tokens"] = sum(counts)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            choices = [{"index": i, "text": texts[i], "logprobs": lps[i] if body.logprobs is not None else None,
                        "finish_reason": finals[i].get("finish_reason"), "stop_reason": finals[i].get("stop_reason")}
                       for i in range(body.n)]
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                                 "choices": choices, "usage": usage})

        async def sse() -> AsyncIterator[str]:
            first = True
            t0 = time.monotonic()
            try:
                async with contextlib.aclosing(gen) as g:
                    async for c in g:
                        if first and c.text:
                            metrics.ttft.observe(time.monotonic() - t0)
                            first = False
                        lp = add_logprobs(c.index, c.logprobs)
                        texts[c.index] += c.text
                        account(c)
                        if c.text or c.finished or lp:
                            yield f"data: {json.dumps(chunk_of(c.index, c.text, lp, c.finish_reason if c.finished else None, c.stop_reason if c.finished else None), ensure_ascii=False)}\n\n"
                metrics.generated_tokens.inc(sum(counts))
                if include_usage:
                    usage["completion_tokens"] = sum(counts)
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield f"data: {json.dumps({'id': rid, 'object': 'text_completion', 'created': created, 'model': body.model, 'choices': [], 'usage': usage})}\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                metrics.aborted.inc()
                raise
            except Exception as exc:  # noqa: BLE001 - the stream has started: an error event, then [DONE]
                yield _stream_error(exc)
            yield "data: [DONE]\n\n"

        return StreamingResponse(_then(sse(), charge), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state = S()
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "thor",
            "max_model_len": state.engine.max_model_len, "root": state.engine.model_name,
        }]}

    @app.get("/v1/traces/{trace_id}")
    async def trace(trace_id: str, request: Request) -> dict[str, Any]:
        state = S()
        # traces belong to the client that made them (its key id, or its address on an open
        # server): another client's trace is indistinguishable from a missing one
        found = await state.store.trace_get(trace_id, owner=_client_key(request))
        if found is None:
            raise ApiError(404, f"no trace with id {trace_id!r} for this API key (traces are kept "
                           f"{state.settings.trace_ttl_s}s; `thor.trace: false` stores none)",
                           type="not_found_error", param="trace_id")
        return found

    @app.get("/health")
    async def health() -> JSONResponse:
        state = holder.get("state")
        if state is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        try:
            sbx = await state.sandbox.health()
            sandbox = {"status": sbx.status, "workers_ready": sbx.workers_ready}
            sandbox_ok = sbx.workers_ready > 0
        except SandboxError as exc:
            sandbox, sandbox_ok = {"status": "down", "error": str(exc)}, False
        try:  # vLLM's own check: fails once its engine core process is gone
            await state.engine.check_health()
            engine: dict[str, Any] = {"status": "ok", "model": state.model_name,
                                      "requests_running": await state.engine.num_unfinished_requests()}
            engine_ok = True
        except Exception as exc:  # noqa: BLE001 - any failure of the check means the engine cannot serve
            engine, engine_ok = {"status": "dead", "model": state.model_name, "error": str(exc)}, False
        store_ok = await state.store.ping()
        up = sandbox_ok and engine_ok
        body = {
            "status": "ok" if up and store_ok else ("degraded" if up else "unavailable"),
            "engine": engine,
            "sandbox": sandbox,
            "store": {"status": state.store.status, "ok": store_ok},
        }
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _then(stream: AsyncIterator[str], done: Callable[[], None]) -> AsyncIterator[str]:
    """`stream`, then `done()` however it ends (completed, failed, or closed by a disconnect)."""
    try:
        async with contextlib.aclosing(stream) as items:  # type: ignore[type-var]
            async for item in items:
                yield item
    finally:
        done()


KEEPALIVE = object()


async def with_keepalive(events: AsyncIterator[Any], interval_s: float) -> AsyncIterator[Any]:
    """`events`, plus `KEEPALIVE` each time `interval_s` passes without one (0: never).

    One producer task pulls the events (so the source runs in a single task however long the
    consumer waits); closing this iterator cancels the producer, which closes the source."""
    if interval_s <= 0:
        async with contextlib.aclosing(events) as evs:  # type: ignore[type-var]
            async for ev in evs:
                yield ev
        return
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue(maxsize=64)

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
            getter = getter or asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
                continue
            is_event, item = getter.result()
            getter = None
            if is_event:
                yield item
            elif item is None:
                return
            else:
                raise item
    finally:
        if getter is not None:
            getter.cancel()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413 in OpenAI's error shape before anything
    parses them: by Content-Length when sent, else counted as the body arrives. The accepted
    body is replayed to the app; later receive() calls (disconnects) pass straight through."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, int(length))
            return
        chunks: list[bytes] = []
        size = 0
        replay: list[dict] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                replay.append(message)
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                replay.append({"type": "http.request", "body": b"".join(chunks), "more_body": False})
                break

        async def replayed() -> dict:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: int) -> None:
        msg = (f"the request body is larger than this server's limit of {self.max_bytes} bytes "
               f"(max_request_body_bytes; {size} bytes seen): send a smaller request")
        resp = JSONResponse(error_body(msg, "invalid_request_error", code="request_too_large"), status_code=413)
        await resp(scope, receive, send)


class FrameMiddleware:
    """Pure ASGI middleware (so streams and disconnects pass through untouched): JSON bodies,
    Bearer-key auth on /v1/*, request counts, latency to the end of the response, in-flight."""

    def __init__(self, app: Any, metrics: ServerMetrics, holder: dict[str, ServerState]) -> None:
        self.app, self.metrics, self.holder = app, metrics, holder

    async def _authenticate(self, scope: dict, state: ServerState) -> Response | None:
        """None when the request carries a configured key (its key id is then put in the scope
        for rate limits and traces); otherwise the 401 to send, or a 429 once the client address
        has used up its failed-attempt allowance (then even a right key waits: guessing gains
        nothing from the answers)."""
        limit = state.settings.auth_failures_per_minute
        failures = "authfail:" + address_id(scope)
        if limit is not None:
            # peek: one unit must be left; failures are debited below
            decision = await state.store.rate_limit(failures, requests_per_min=None, tokens_per_min=limit, tokens=0)
            if not decision.allowed and decision.limit != STORE_UNAVAILABLE:  # a store outage never locks out
                self.metrics.rate_limited.inc()
                retry = max(1, int(decision.retry_after_s + 0.999))
                body = error_body(f"too many failed authentication attempts from this address; retry in {retry}s",
                                  "rate_limit_error", code="rate_limit_exceeded")
                return JSONResponse(body, status_code=429, headers={"Retry-After": str(retry)})
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        found = state.api_keys.identify(presented)
        if found is not None:
            scope.setdefault("state", {})[KEY_ID_SCOPE] = found
            return None
        if limit is not None:
            await state.store.charge_tokens(failures, 1)
        msg = "missing API key: send `Authorization: Bearer <key>`" if not presented else "invalid API key"
        return JSONResponse(error_body(msg, "authentication_error", code="invalid_api_key"), status_code=401)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = "/v1/traces/{id}" if path.startswith("/v1/traces/") else path
        if route not in KNOWN_ROUTES:
            route = "other"
        if method == "POST" and path.startswith("/v1/"):
            # every POST body is JSON, whatever Content-Type a client sent (curl -d sends a form type)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        state = self.holder.get("state")
        if path.startswith("/v1/") and state is not None and state.api_keys:
            refused = await self._authenticate(scope, state)
            if refused is not None:
                self.metrics.requests.labels(route=route, status=str(refused.status_code)).inc()
                await refused(scope, receive, send)
                return
        status = 500
        t0 = time.monotonic()

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.monotonic() - t0)


KNOWN_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/traces/{id}", "/health", "/metrics"}
