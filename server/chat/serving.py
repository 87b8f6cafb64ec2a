"""`POST /v1/chat/completions`: a chat request through the THOR engine, or plain.

Owns: turning a ChatCompletionRequest into the engine's prompt (chat template, TIR
instructions with THOR tools on, function `tools` for the template, template refusals
as 400s naming `messages`), the THOR config and sampling (max_tokens clamped to the
context as vLLM does), and the trace summary; then hands the engine's events to
streaming.respond with a ThorBuilder. With THOR on:
- a `response_format` (json_object, json_schema) or a forced call (tool_choice "required" or
  a named function) runs the loop, then the answer under vLLM's structured-output constraint
  (thor_engine/final_answer.py): `content` (or `tool_calls`) holds only that answer, the
  trajectory is the reasoning field; a schema the engine cannot compile is a 400 before any
  generation;
- function `tools` with tool_choice `auto` or `none` put the tools in the prompt (`auto`:
  `</tool_call>` is a stop string and the ThorBuilder turns the calls the answer ends with
  into `tool_calls`; with a response_format too, a call ends the turn without the JSON);
- `logprobs` is a 400 naming it and saying to send `thor: {"enabled": false}`.
Requests with THOR off that ask for `logprobs`, a `response_format` or function `tools` go
to the engine's plain generation (the JSON format or forced call as a structured-output
constraint) and a PlainChatBuilder. Refused as they cannot work: a forced call with a
response_format, `auto` on a model whose template writes no calls, a constrained output on a
reasoning model with thinking on and THOR off.
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
from thor_engine.final_answer import FinalAnswer, call_answer, json_answer
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
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    json_format = body.response_format is not None and body.response_format.type != "text"
    if tools and body.logprobs:
        raise ApiError(
            400,
            'logprobs needs THOR\'s tools off: send `thor: {"enabled": false}` (extra_body in the SDKs). With THOR '
            "on, the answer follows tool outputs the model did not write, which have no logprobs",
            param="logprobs",
        )
    if choice == "auto" and body.tools and not state.engine.function_calls.supports_auto:
        raise ApiError(
            400,
            'tool_choice "auto" needs a model whose chat template writes function calls (<tool_call>); this '
            'one does not: send tool_choice "required" or a named function (the call is then forced)',
            param="tool_choice",
        )
    if forced and json_format:
        raise ApiError(
            400,
            'response_format cannot be combined with tool_choice "required" or a named function (the call '
            "itself is the constrained output); omit one of them",
            param="response_format",
        )
    # THOR on with client functions (auto): Python runs server-side, a call to a client function ends the turn
    mixed = tools and bool(body.tools) and choice in ("auto", "none")
    # THOR on with a JSON format or a forced call: the loop, then the answer under the constraint
    final = _final_answer(body, choice) if tools and (json_format or forced) else None
    if final is not None:  # a schema the engine cannot compile: refused now, not after the reasoning
        try:
            state.engine.check_structured_outputs(final.structured_outputs)
        except InvalidParameter as exc:
            param = "tools" if forced else "response_format"
            raise ApiError(400, f"{param}: {exc}", param=param) from exc
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
    if (
        not tools
        and (forced or json_format)
        and state.engine.reasoning_model
        and state.engine.thinking(prompt) != "closed"
    ):
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
    if plain and not tools:
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
        forced_choice=_dumped(choice) if forced else None,
        structured=final is not None,
    )
    events = state.engine.stream(
        prompt, cfg, options, n=body.n, vote=bool(opts and opts.vote), request_id=rid, final=final
    )
    summary = {
        "route": "/v1/chat/completions",
        "n": body.n,
        "stream": body.stream,
        "thor": cfg.model_dump(),
        "max_tokens": max_tokens,
        "messages": len(body.messages),
        "final_answer": final.model_dump() if final else None,
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


def _dumped(choice: str | NamedToolChoice) -> str | dict[str, Any]:
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


def _final_answer(body: ChatCompletionRequest, choice: str | NamedToolChoice) -> FinalAnswer:
    """The constrained answer after the THOR loop: the forced call's JSON, or the response format's."""
    if choice == "required" or isinstance(choice, NamedToolChoice):
        final = call_answer(body.function_tools() or [], _dumped(choice), body.parallel_tool_calls)
    else:
        fmt = body.response_format
        assert fmt is not None and fmt.type != "text"
        schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
        final = json_answer(schema, name=fmt.json_schema.name if fmt.json_schema is not None else None)
    # with client functions offered (auto), a call to one ends the turn: no answer after it
    return final.model_copy(update={"not_after": (TOOL_CALL_END,)}) if choice == "auto" else final


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
    tool_choice = _dumped(choice)
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
