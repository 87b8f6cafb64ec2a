"""`POST /v1/completions`: text prompts, through the THOR engine (`thor` given) or plain.

Owns: the prompts and sampling of a CompletionRequest; with `thor` the engine's THOR
events for its one prompt go to a ThorBuilder (kind "completion", the whole trajectory
in `text`), without it the engine's plain generation of every prompt of a batch (choice
index = prompt index x n + sample index, each prompt length-checked and clamped on its own,
logprobs, include_stop_str_in_output, `echo` with the prompt tokens' logprobs, vLLM's
`max_tokens: 0` with `echo`) goes to a PlainCompletionBuilder; both through the same
streaming.respond. The checks that need settings or several fields: at most
`max_batch_prompts` prompts, prompts x n x max_tokens within `max_request_tokens`, and so is
`echo`'s work (prompt tokens x n x (1 + logprobs): what it sends back), no batch
and no `echo` with `thor` (one trajectory per request; its text is not the prompt's
continuation alone), `max_tokens: 0` only with `echo`. Admission (after the checks; the request
itself is counted on arrival) debits every prompt's tokens, or echo's work when larger.
Does not own: auth and rate limits (admission/guards.py), request checks (admission/limits.py), running
and streaming the request (streaming.py) or rendering it (the builders).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from server.admission.guards import LimiterDep, v1_router
from server.admission.limits import check_model, check_thor_limits, sampling
from server.completions.plain import PlainCompletionBuilder
from server.completions.protocol import CompletionRequest
from server.errors import ApiError
from server.state import ServerState, StateDep
from server.streaming import respond
from server.thor.builder import ThorBuilder
from thor_engine.engine import PlainChunk, Prompt, PromptTooLong
from thor_engine.streams import merge

router = v1_router()


def _check_fields(state: ServerState, body: CompletionRequest) -> None:
    """What no single field says: batch size, `thor` with a batch or `echo`, `max_tokens: 0`."""
    count, limit = len(body.prompts()), state.settings.max_batch_prompts
    if count > limit:
        raise ApiError(
            400,
            f"prompt is a batch of {count} prompts; this server takes at most {limit} per request "
            "(max_batch_prompts): split the batch over several requests",
            param="prompt",
        )
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400,
            "max_tokens 0 generates nothing and returns nothing: it is only valid with echo: true "
            "(the prompt and, with logprobs, its tokens' logprobs); send max_tokens of at least 1",
            param="max_tokens",
        )
    if body.echo and body.return_token_ids:
        raise ApiError(
            400,
            "echo with return_token_ids is not supported: the prompt's tokens are already in "
            "prompt_token_ids; drop echo (or return_token_ids)",
            param="echo",
        )
    if body.thor is None:
        return
    if body.batched and count > 1:
        raise ApiError(
            400,
            "a batch of prompts is served without `thor` only (plain generation): THOR runs one tool-integrated "
            "trajectory set per request; send one prompt per request (concurrently) or drop `thor`",
            param="prompt",
        )
    if body.echo:
        raise ApiError(
            400,
            "echo is supported on plain completions only (without `thor`): a THOR trajectory's text includes "
            "tool outputs the model did not generate; drop echo (the prompt is what you sent)",
            param="echo",
        )
    if body.return_token_ids:
        raise ApiError(
            400,
            "return_token_ids is supported on plain completions only (without `thor`): a THOR trajectory's "
            "text includes tool outputs the model did not generate",
            param="return_token_ids",
        )


def _echo_work(body: CompletionRequest, prompt_tokens: int) -> int:
    """What `echo` sends back: every prompt token, with logprobs its top logprobs too, for each of
    the n choices (0 without echo)."""
    return prompt_tokens * body.n * (1 + (body.logprobs or 0)) if body.echo else 0


async def _prepare(state: ServerState, body: CompletionRequest) -> list[Prompt]:
    """Each prompt tokenised and length-checked (a batch's errors say which prompt)."""
    raw = body.prompts()
    prompts = []
    for k, p in enumerate(raw):
        where = f"prompt[{k}]: " if body.batched and len(raw) > 1 else ""
        try:
            prompts.append(await state.engine.prepare_text(p))
        except PromptTooLong as exc:
            raise ApiError(400, where + str(exc), param="prompt", code="context_length_exceeded") from exc
        except ValueError as exc:
            raise ApiError(400, where + str(exc), param="prompt") from exc
    return prompts


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: StateDep, limiter: LimiterDep) -> Response:
    check_model(state, body)
    _check_fields(state, body)
    if body.thor is not None:
        check_thor_limits(state, body.thor.to_config(state.settings.thor))
    prompts = await _prepare(state, body)
    rid = "cmpl-" + uuid.uuid4().hex
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # max_tokens 0 (echo only): the engine generates one token that is not sent, as vLLM does
    budgets = [state.engine.max_tokens_for(p, body.max_tokens) for p in prompts]
    total = sum(budgets) * body.n
    limit = state.settings.max_request_tokens
    if len(prompts) > 1 and total > limit:
        raise ApiError(
            400,
            f"prompts x n x max_tokens is {total} tokens; this server allows at most "
            f"{limit} per request (max_request_tokens): lower max_tokens, n "
            "or the number of prompts",
            param="max_tokens",
        )
    prompt_tokens = sum(p.num_tokens for p in prompts)
    echoed = _echo_work(body, prompt_tokens)
    if echoed > limit:
        raise ApiError(
            400,
            f"echo returns every prompt token (with logprobs, each with its top logprobs) for each of the n "
            f"choices: prompt tokens x n x (1 + logprobs) is {prompt_tokens} x {body.n} x "
            f"{1 + (body.logprobs or 0)} = {echoed}; this server allows at most {limit} per request "
            "(max_request_tokens): lower logprobs or n, send fewer or shorter prompts, or drop echo",
            param="echo",
        )
    options = [sampling(state, body, b, "max_tokens") for b in budgets]
    await limiter.admit(max(prompt_tokens, echoed))  # the request itself was counted on arrival
    if body.thor is not None:
        prompt = prompts[0]
        cfg = body.thor.to_config(state.settings.thor)
        builder = ThorBuilder(
            kind="completion",
            response_id=rid,
            model=body.model,
            n=body.n,
            reasoning_fields=state.settings.reasoning_fields,
            tools_enabled=True,
            reasoning_model=False,
            metrics=state.metrics,
        )
        events = state.engine.stream(prompt, cfg, options[0], n=body.n, vote=body.thor.vote, request_id=rid)
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
    echo = None
    if body.echo:  # the prompt as sent; token ids as their text (vLLM detokenises them the same way)
        echo = [p if isinstance(p, str) else await state.engine.detokenize(p) for p in body.prompts()]
    plain = PlainCompletionBuilder(
        response_id=rid,
        model=body.model,
        n=body.n,
        prompt_tokens=sum(p.num_tokens for p in prompts),
        logprobs=body.logprobs,
        metrics=state.metrics,
        return_token_ids=bool(body.return_token_ids),
        num_prompts=len(prompts),
        echo=echo,
        echo_only=body.echo and body.max_tokens == 0,
    )

    def one(k: int) -> AsyncIterator[PlainChunk]:
        return state.engine.generate_plain(
            prompts[k],
            options[k],
            n=body.n,
            logprobs=body.logprobs,
            include_stop_str_in_output=body.include_stop_str_in_output,
            request_id=rid,
            prompt_logprobs=body.logprobs if body.echo else None,
            first_index=k * body.n,
        )

    chunks = one(0) if len(prompts) == 1 else merge([functools.partial(one, k) for k in range(len(prompts))])
    return await respond(
        state, request, limiter, plain, chunks, stream=body.stream, include_usage=include_usage, summary=None
    )
