"""`POST /v1/chat/completions`: a chat request through the THOR engine.

Owns: turning a ChatCompletionRequest into the engine's prompt (chat template, TIR
instructions with THOR tools on, template refusals as 400s naming `messages`), the
THOR config and sampling (max_tokens clamped to the context as vLLM does), and the
trace summary; then hands the engine's events to generation.respond with a
ResponseBuilder.
Does not own: auth and rate limits (guards.py), request checks (checks.py), running
and streaming the request (generation.py) or rendering it (responses.py).
"""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response

from thor_engine.engine import InvalidParameter, PromptTooLong
from thor_engine.prompting import TIR_INSTRUCTIONS

from ..checks import check_model, check_thor_limits, sampling
from ..errors import ApiError
from ..generation import respond
from ..guards import LimiterDep, v1_router
from ..protocol import ChatCompletionRequest
from ..responses import ResponseBuilder
from ..state import StateDep

router = v1_router()


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, state: StateDep, limiter: LimiterDep
) -> Response:
    check_model(state, body)
    opts = body.thor
    tools = opts is None or opts.enabled
    cfg = opts.to_config(state.settings.thor) if opts else state.settings.thor
    check_thor_limits(state, cfg)
    tir_mode = opts.tir_mode(state.settings.tir_instructions) if opts else state.settings.tir_instructions
    try:  # template and tokeniser run on the engine's render thread, off the event loop
        prompt = await state.engine.prepare_chat(
            body.chat_messages(),
            tir_instructions=TIR_INSTRUCTIONS if tools else None,
            tir_mode=tir_mode,
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
    options = sampling(state, body, max_tokens, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    await limiter.admit(prompt.num_tokens)
    rid = "chatcmpl-" + uuid.uuid4().hex
    builder = ResponseBuilder(
        kind="chat",
        response_id=rid,
        model=body.model,
        n=body.n,
        reasoning_fields=state.settings.reasoning_fields,
        tools_enabled=tools,
        reasoning_model=state.engine.reasoning_model,
        metrics=state.metrics,
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
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
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
