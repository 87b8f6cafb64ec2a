"""`POST /v1/completions`: a text prompt, through the THOR engine (`thor` given) or plain.

Owns: the prompt and sampling of a CompletionRequest; with `thor` the engine's THOR
events go to a ResponseBuilder (kind "completion", the whole trajectory in `text`),
without it the engine's plain generation (logprobs, include_stop_str_in_output) goes
to a PlainCompletionBuilder; both through the same generation.respond.
Does not own: auth and rate limits (guards.py), request checks (checks.py), running
and streaming the request (generation.py) or rendering it (the builders).
"""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response

from thor_engine.engine import PromptTooLong

from ..checks import check_model, check_thor_limits, sampling
from ..errors import ApiError
from ..generation import respond
from ..guards import LimiterDep, v1_router
from ..plain_responses import PlainCompletionBuilder
from ..protocol import CompletionRequest
from ..responses import ResponseBuilder
from ..state import StateDep

router = v1_router()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep, limiter: LimiterDep) -> Response:
    check_model(state, body)
    if body.thor is not None:
        if body.return_token_ids:
            raise ApiError(
                400,
                "return_token_ids is supported on plain completions only (without `thor`): a THOR trajectory's "
                "text includes tool outputs the model did not generate",
                param="return_token_ids",
            )
        check_thor_limits(state, body.thor.to_config(state.settings.thor))
    try:
        prompt = await state.engine.prepare_text(body.single_prompt())
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from exc
    await limiter.admit(prompt.num_tokens)
    rid = "cmpl-" + uuid.uuid4().hex
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    options = sampling(state, body, state.engine.max_tokens_for(prompt, body.max_tokens), "max_tokens")
    if body.thor is not None:
        cfg = body.thor.to_config(state.settings.thor)
        builder = ResponseBuilder(
            kind="completion",
            response_id=rid,
            model=body.model,
            n=body.n,
            reasoning_fields=state.settings.reasoning_fields,
            tools_enabled=True,
            reasoning_model=False,
            metrics=state.metrics,
        )
        events = state.engine.stream(prompt, cfg, options, n=body.n, vote=body.thor.vote, request_id=rid)
        summary = {"route": "/v1/completions", "n": body.n, "stream": body.stream, "thor": cfg.model_dump()}
        return await respond(
            state,
            request,
            limiter,
            builder,
            events,
            stream=body.stream,
            include_usage=include_usage,
            summary=summary if body.thor.trace else None,
        )
    plain = PlainCompletionBuilder(
        response_id=rid,
        model=body.model,
        n=body.n,
        prompt_tokens=prompt.num_tokens,
        logprobs=body.logprobs,
        metrics=state.metrics,
        return_token_ids=bool(body.return_token_ids),
    )
    chunks = state.engine.generate_plain(
        prompt,
        options,
        n=body.n,
        logprobs=body.logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output,
        request_id=rid,
    )
    return await respond(
        state, request, limiter, plain, chunks, stream=body.stream, include_usage=include_usage, summary=None
    )
