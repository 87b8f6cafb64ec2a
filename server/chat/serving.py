"""`POST /v1/chat/completions`: a chat request through the THOR engine, or plain.

Owns: turning a ChatCompletionRequest into the engine's prompt (chat template, TIR
instructions with THOR tools on, function `tools` for the template, template refusals
as 400s naming `messages`), the THOR config and sampling (max_tokens clamped to the
context as vLLM does), and the trace summary; then hands the engine's events to
streaming.respond with a ThorBuilder. Requests with THOR off that ask for
`logprobs`, a `response_format` or function `tools` go to the engine's plain generation
(the JSON format or forced call as a structured-output constraint) and a
PlainChatBuilder. With THOR on, function `tools` with tool_choice `auto` or `none` run
the THOR loop with the tools in the prompt (`auto`: `</tool_call>` is a stop string and
the ThorBuilder turns the calls the answer ends with into `tool_calls`); logprobs, a
response_format and a forced call are 400s naming them and saying to send
`thor: {"enabled": false}`, as are the combinations that cannot work (a forced call with
a response_format, `auto` on a model whose template writes no calls, a constrained output
on a reasoning model with thinking on).
Does not own: auth and rate limits (admission/guards.py), request checks (admission/limits.py), running
and streaming the request (streaming.py) or rendering it (thor/builder.py).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.admission.guards import LimiterDep, RateLimiter, v1_router
from server.admission.limits import check_model, check_thor_limits, sampling
from server.chat.plain import PlainChatBuilder
from server.chat.protocol import ChatCompletionRequest, NamedToolChoice
from server.errors import ApiError
from server.state import ServerState, StateDep
from server.streaming import respond
from server.thor.builder import ThorBuilder
from thor_engine.config import SamplingOptions
from thor_engine.engine import InvalidParameter, PlainChunk, Prompt, PromptTooLong
from thor_engine.function_calls import TOOL_CALL_END, forced_call_schema
from thor_engine.prompting import TIR_INSTRUCTIONS

router = v1_router()


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep, limiter: LimiterDep
) -> Response:
    check_model(state, body)
    opts = body.thor
    tools = opts is None or opts.enabled
    plain = body.plain_features()
    choice = body.effective_tool_choice()
    # THOR on with client functions: Python runs server-side, a call to a client function ends the turn
    mixed = tools and plain == ["tools"] and choice in ("auto", "none")
    if tools and plain == ["tools"] and not mixed:
        raise ApiError(
            400,
            'with THOR\'s tools on, tool_choice must be "auto" or "none": forcing a function call would keep the '
            'model from writing its Python; send thor: {"enabled": false} to force a call',
            param="tool_choice",
        )
    if plain and tools and not mixed:
        raise ApiError(
            400,
            f'{plain[0]} needs THOR\'s tools off: send `thor: {{"enabled": false}}` (extra_body in the SDKs). '
            "With THOR on, the answer follows tool outputs the model did not write and its own Python tool runs "
            "server-side, so token logprobs, response_format and client function tools apply to plain chat only",
            param=plain[0],
        )
    if choice == "auto" and plain and not state.engine.function_calls.supports_auto:
        raise ApiError(
            400,
            'tool_choice "auto" needs a model whose chat template writes function calls (<tool_call>); this '
            'one does not: send tool_choice "required" or a named function (the call is then forced)',
            param="tool_choice",
        )
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and body.response_format is not None and body.response_format.type != "text":
        raise ApiError(
            400,
            'response_format cannot be combined with tool_choice "required" or a named function (the call '
            "itself is the constrained output); omit one of them",
            param="response_format",
        )
    cfg = opts.to_config(state.settings.thor) if opts else state.settings.thor
    check_thor_limits(state, cfg)
    tir_mode = opts.tir_mode(state.settings.tir_instructions) if opts else state.settings.tir_instructions
    try:  # template and tokeniser run on the engine's render thread, off the event loop
        prompt = await state.engine.prepare_chat(
            body.chat_messages(),
            tir_instructions=TIR_INSTRUCTIONS if tools else None,
            tir_mode=tir_mode,
            chat_template_kwargs=body.template_kwargs(),
            tools=body.function_tools(),
        )
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from exc
    except InvalidParameter as exc:  # the chat template refused the conversation, bad template kwargs
        raise ApiError(400, str(exc), param=exc.param) from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    # as vLLM: asking for more than the context leaves is clamped, not refused
    max_tokens = state.engine.max_tokens_for(prompt, body.effective_max_tokens(), state.settings.default_max_tokens)
    options = sampling(state, body, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    constrained = forced or (body.response_format is not None and body.response_format.type != "text")
    if plain and constrained and state.engine.reasoning_model and state.engine.thinking(prompt) != "closed":
        param = "tool_choice" if forced else "response_format"
        raise ApiError(
            400,
            f"{param} on a reasoning model with thinking on would constrain its thinking too, which vLLM's "
            'structured outputs cannot skip here: send chat_template_kwargs {"enable_thinking": false}, or omit it',
            param=param,
        )
    await limiter.admit(prompt.num_tokens)
    rid = "chatcmpl-" + uuid.uuid4().hex
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if plain and not mixed:
        return await _plain_chat(state, request, limiter, body, prompt, options, rid, include_usage)
    parser = state.engine.function_calls if mixed and choice == "auto" else None
    if parser is not None:  # the turn ends where the model closes a call to a client function
        options = options.model_copy(update={"stop": (*options.stop, TOOL_CALL_END)})
    builder = ThorBuilder(
        kind="chat",
        response_id=rid,
        model=body.model,
        n=body.n,
        reasoning_fields=state.settings.reasoning_fields,
        tools_enabled=tools,
        reasoning_model=state.engine.reasoning_model,
        metrics=state.metrics,
        function_calls=parser,
        function_names=[t["function"]["name"] for t in body.function_tools() or []],
    )
    events = state.engine.stream(prompt, cfg, options, n=body.n, vote=bool(opts and opts.vote), request_id=rid)
    summary = {
        "route": "/v1/chat/completions",
        "n": body.n,
        "stream": body.stream,
        "thor": cfg.model_dump(),
        "max_tokens": max_tokens,
        "messages": len(body.messages),
    }
    return await respond(
        state,
        request,
        limiter,
        builder,
        events,
        stream=body.stream,
        include_usage=include_usage,
        summary=summary if opts is None or opts.trace else None,
    )


async def _plain_chat(
    state: ServerState,
    request: Request,
    limiter: RateLimiter,
    body: ChatCompletionRequest,
    prompt: Prompt,
    options: SamplingOptions,
    rid: str,
    include_usage: bool,
) -> Response:
    """THOR off with logprobs, response_format or function tools: plain generation on the chat
    prompt, under vLLM's structured outputs for a JSON format or a forced call."""
    choice = body.effective_tool_choice()
    tool_choice: str | dict[str, Any] = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    structured = body.response_format.structured_outputs() if body.response_format else None
    if choice == "required" or isinstance(choice, NamedToolChoice):
        tools = body.function_tools() or []
        structured = {"json": forced_call_schema(tools, tool_choice, body.parallel_tool_calls)}
    thinking = state.engine.thinking(prompt)
    top = (body.top_logprobs or 0) if body.logprobs else None
    builder = PlainChatBuilder(
        response_id=rid,
        model=body.model,
        n=body.n,
        prompt_tokens=prompt.num_tokens,
        top_logprobs=top,
        tool_choice=tool_choice if body.tools else "none",
        parser=state.engine.function_calls if choice == "auto" and body.tools else None,
        metrics=state.metrics,
        reasoning_model=state.engine.reasoning_model,
        in_think=thinking == "open",
        reasoning_fields=state.settings.reasoning_fields,
    )
    chunks = state.engine.generate_plain(
        prompt, options, n=body.n, logprobs=top, request_id=rid, structured_outputs=structured
    )
    if structured is not None:  # the engine refuses a schema it cannot compile: name the field that sent it
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        chunks = _naming(chunks, "tools" if forced else "response_format")
    summary = {
        "route": "/v1/chat/completions",
        "n": body.n,
        "stream": body.stream,
        "thor": None,
        "plain": body.plain_features(),
        "max_tokens": options.max_tokens,
        "messages": len(body.messages),
    }
    trace = body.thor is None or body.thor.trace
    return await respond(
        state,
        request,
        limiter,
        builder,
        chunks,
        stream=body.stream,
        include_usage=include_usage,
        summary=summary if trace else None,
    )


async def _naming(chunks: AsyncIterator[PlainChunk], param: str) -> AsyncIterator[PlainChunk]:
    """`chunks`, with an engine refusal that names no field attributed to `param`."""
    try:
        async with contextlib.aclosing(chunks) as items:  # type: ignore[type-var]
            async for item in items:
                yield item
    except InvalidParameter as exc:
        if exc.param is not None:
            raise
        raise InvalidParameter(param, f"{param}: {exc}") from exc
