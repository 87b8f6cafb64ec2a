"""`POST /v1/responses` and `GET /v1/responses/{id}`: OpenAI's Responses API through the THOR engine.

Owns: turning a CreateResponseRequest into the engine's prompt (`instructions` as the
system message, the conversation of `previous_response_id` looked up for its client, then
the input items; THOR's tool-use instructions when `code_interpreter` is on), the THOR
config and sampling, and storing the response (with `store: true`, as a trace bound to the
client's key, kept `trace_ttl_s`: `GET /v1/responses/{id}` returns it and
`previous_response_id` continues it (an unknown one: a 400, `previous_response_not_found`, as
OpenAI answers), `GET /v1/responses/{id}/input_items` lists its input and `DELETE` forgets it
(not the copies of its conversation in responses that continued it); another client's
response is a 404 exactly like a missing one). Streams are framed as the Responses API does (named events, no `[DONE]`).

Does not own: the request shape (responses/protocol.py), the output items and events
(responses/builder.py), running and streaming (streaming.py), auth and rate limits (admission/guards.py).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.responses import Response

from server.admission.guards import ClientKeyDep, LimiterDep, v1_router
from server.admission.limits import check_model, check_thor_limits, sampling
from server.errors import ApiError
from server.responses.builder import ResponsesBuilder
from server.responses.protocol import CreateResponseRequest
from server.state import ServerState, StateDep
from server.streaming import StreamFormat, respond
from thor_engine.engine import InvalidParameter, PromptTooLong
from thor_engine.prompting import TIR_INSTRUCTIONS

router = v1_router()


def _not_found(response_id: str, state: ServerState, param: str) -> ApiError:
    """A 404 for the response in the path; for `previous_response_id`, a 400 as OpenAI answers it
    (`invalid_request_error`, code `previous_response_not_found`): the request names a bad id."""
    kept = f"(responses are kept {state.settings.trace_ttl_s}s when created with store: true)"
    if param == "previous_response_id":
        return ApiError(
            400,
            f"Previous response with id {response_id!r} not found for this API key {kept}",
            param=param,
            code="previous_response_not_found",
        )
    return ApiError(
        404,
        f"no response with id {response_id!r} for this API key {kept}",
        type="not_found_error",
        param=param,
        code="response_not_found",
    )


async def _stored(state: ServerState, response_id: str, owner: str, param: str) -> dict[str, Any]:
    found = await state.store.trace_get(response_id, owner=owner)
    if found is None or not isinstance(found.get("response"), dict):
        raise _not_found(response_id, state, param)
    if param == "previous_response_id" and found["response"].get("status") == "failed":
        raise ApiError(
            400,
            f"response {response_id!r} failed ({found['response'].get('error')}): there is no turn to continue; "
            "send its input again without previous_response_id",
            param=param,
        )
    return found


@router.post("/v1/responses")
async def create_response(
    body: CreateResponseRequest, request: Request, state: StateDep, limiter: LimiterDep
) -> Response:
    check_model(state, body)
    history: list[dict[str, str]] = []
    if body.previous_response_id is not None:
        history = list(
            (await _stored(state, body.previous_response_id, limiter.key, "previous_response_id"))["conversation"]
        )
    conversation = history + body.input_messages()
    if not conversation:
        raise ApiError(400, "input is empty: send a string or at least one message", param="input")
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    opts = body.thor_options(state.engine.reasoning_model)
    cfg = opts.to_config(state.settings.thor)
    tools = opts.enabled and cfg.max_tool_calls > 0  # no call allowed: the code interpreter is off
    check_thor_limits(state, cfg)
    final = body.final_answer()
    if final is not None:  # a schema the engine cannot compile: refused now, not after the reasoning
        try:
            state.engine.check_structured_outputs(final.structured_outputs)
        except InvalidParameter as exc:
            raise ApiError(400, f"text.format: {exc}", param="text.format") from exc
    try:  # template and tokeniser run on the engine's render thread, off the event loop
        prompt = await state.engine.prepare_chat(
            messages,
            tir_instructions=TIR_INSTRUCTIONS if tools else None,
            tir_mode=opts.tir_mode(state.settings.tir_instructions),
            chat_template_kwargs=body.template_kwargs(),
        )
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param="input", code="context_length_exceeded") from exc
    except InvalidParameter as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="input") from exc
    max_tokens = state.engine.max_tokens_for(prompt, body.max_output_tokens, state.settings.default_max_tokens)
    options = sampling(state, body, max_tokens, "max_output_tokens")
    await limiter.admit(prompt.num_tokens)
    rid = "resp_" + uuid.uuid4().hex
    store = body.store and opts.trace and state.settings.trace_ttl_s > 0
    builder = ResponsesBuilder(
        response_id=rid,
        model=body.model or state.model_name,
        params=body.response_fields(options, tools_on=tools, store=store),
        tools_enabled=tools,
        reasoning_model=state.engine.reasoning_model,
        metrics=state.metrics,
        conversation=conversation,
        input_items=body.input_items(),
        code_languages=cfg.code_languages,
        structured=final is not None,
    )
    events = state.engine.stream(prompt, cfg, options, n=1, request_id=rid, final=final)
    summary = {
        "route": "/v1/responses",
        "stream": body.stream,
        "thor": cfg.model_dump(),
        "max_tokens": max_tokens,
        "previous_response_id": body.previous_response_id,
        "final_answer": final.model_dump() if final else None,
    }
    return await respond(
        state,
        request,
        limiter,
        builder,
        events,
        stream=body.stream,
        include_usage=False,
        summary=summary if store else None,
        stream_format=StreamFormat(
            named_events=True, done_sentinel=False, opening=builder.opening, error=builder.failure_events
        ),
    )


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, state: StateDep, owner: ClientKeyDep) -> dict[str, Any]:
    return (await _stored(state, response_id, owner, "response_id"))["response"]


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: StateDep, owner: ClientKeyDep) -> dict[str, Any]:
    """Forget a stored response (it can no longer be retrieved or continued). A later response that
    continued it (`previous_response_id`) stored its own copy of the conversation, the deleted turn
    included, and keeps it: delete that one too to forget the turn."""
    await _stored(state, response_id, owner, "response_id")
    if not await state.store.trace_delete(response_id, owner=owner):
        raise ApiError(
            503,
            "the response store is unavailable: nothing was deleted; retry later",
            type="service_unavailable",
            code="store_unavailable",
        )
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def input_items(
    response_id: str,
    state: StateDep,
    owner: ClientKeyDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    """The input items of a stored response, as OpenAI lists them (newest first by default)."""
    items = list((await _stored(state, response_id, owner, "response_id")).get("input_items", []))
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise ApiError(400, f"after: no input item {after!r} in response {response_id!r}", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
