"""The Responses API's items and stream events from the decoder's events, case by case.

Properties, for every trajectory of tests/test_stream_equality.py (one call, backtracks by
tokens and by step, two calls and a stop string, no code; a reasoning-style tokenizer with
<think>, a backtrack inside it and a thinking budget), with the code interpreter on and off,
with self-correction on and off:
- every event matches its schema in OpenAI's spec, numbered 0, 1, 2...;
- the stream's items (`response.output_item.done`) are the non-stream response's output, and
  each item's deltas add up to its text (and a call's code deltas to its code);
- text self-correction discards never reaches an item or a delta;
- nothing is lost: the items, rendered back as a conversation turn, hold every character of
  the trajectory (think tags aside);
- with self-correction off, the code streams while it is written (before its block closes).

Here: the decoder (scripted backend, real sandbox) through `ResponsesBuilder`, run twice (one
stream, one not) per case. The same on the real server (vLLM, the tiny TIR model, the `openai`
SDK) is tests/test_responses_api.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from server.metrics import ServerMetrics
from server.responses.builder import ResponsesBuilder
from server.responses.protocol import CreateResponseRequest, items_to_messages
from tests.support.openapi import response_event_schemas, validate
from tests.support.scripted_backend import ScriptedBackend
from tests.test_responses_api import without_ids
from tests.test_stream_equality import CASES, THINK_CASES, continuing
from thor_engine.config import SamplingOptions, SelfCorrectionConfig, ThorConfig
from thor_engine.decoder import ThorDecoder
from thor_engine.events import Final
from thor_engine.prompting import render_chat

pytestmark = pytest.mark.sandbox


async def run(tokenizer, executor, make_responder, cfg: ThorConfig, *, tools: bool) -> tuple[list[dict], dict, Final]:
    """One trajectory through a ResponsesBuilder: (the stream's events, the final response, Final)."""
    dec = ThorDecoder(ScriptedBackend(tokenizer, make_responder()), executor)
    if not tools:
        cfg = cfg.model_copy(update={"max_tool_calls": 0})
    builder = ResponsesBuilder(
        response_id="resp_x",
        model="m",
        params=CreateResponseRequest(input="What is 6*7?").response_fields(
            SamplingOptions(), tools_on=tools, store=False
        ),
        tools_enabled=tools,
        reasoning_model=dec.reasoning_model,
        metrics=ServerMetrics(),
        code_languages=cfg.code_languages,
    )
    events = builder.opening()
    final = None
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    async for ev in dec.stream(prompt, cfg, SamplingOptions(max_tokens=400, stop=("END",), temperature=0.0)):
        if isinstance(ev, Final):
            final = ev
        events.extend(builder.feed(ev))
    assert final is not None
    return events, builder.response(), final


def items_from_stream(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"}
    return [done[i] for i in range(len(done))]


def squeeze(text: str) -> list[str]:
    return sorted(text.replace("<think>", "").replace("</think>", "").replace(" ", "").replace("\n", ""))


async def check(tokenizer, executor, case, *, tools: bool, self_correction: bool) -> None:
    make, cfg_kw, never = case
    cfg = ThorConfig(**cfg_kw)
    if not self_correction:
        cfg = cfg.model_copy(update={"self_correction": SelfCorrectionConfig(enabled=False)})
    events, _, final = await run(tokenizer, executor, make, cfg, tools=tools)
    _, body, final2 = await run(tokenizer, executor, make, cfg, tools=tools)
    assert final.text == final2.text  # the two runs are the same trajectory

    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for ev in events:
        validate(ev, response_event_schemas()[ev["type"]])
    validate(body, "Response")
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    streamed = items_from_stream(events)
    assert without_ids(streamed) == without_ids(body["output"]) == without_ids(events[-1]["response"]["output"])

    for item in streamed:  # each item's deltas add up to its text
        if item["type"] == "code_interpreter_call":
            kind, text = "code_interpreter_call_code", item["code"]
        else:
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            text = item["content"][0]["text"]
        deltas = [
            e["delta"] for e in events if e.get("item_id") == item["id"] and e["type"] == f"response.{kind}.delta"
        ]
        assert "".join(deltas) == text

    if not tools:
        assert all(i["type"] != "code_interpreter_call" for i in streamed)
    if never is not None and tools and self_correction:
        shown = "".join(e.get("delta", "") for e in events) + repr(streamed)
        assert never not in shown
    # nothing lost: the items as a conversation turn hold the whole trajectory
    [turn] = items_to_messages(body["output"])
    assert squeeze(turn["content"]) == squeeze(final.text)
    if tools:
        calls = [i for i in body["output"] if i["type"] == "code_interpreter_call"]
        committed = [a for a in body["thor"]["tool_calls"] if a["committed"]]
        assert [c["code"] for c in calls] == [a["code"] for a in committed]


@pytest.mark.parametrize("self_correction", [True, False], ids=["sc", "no-sc"])
@pytest.mark.parametrize("tools", [True, False], ids=["tools", "plain"])
@pytest.mark.parametrize("name", sorted(CASES))
async def test_items_and_events(tokenizer, executor, name, tools, self_correction):
    await check(tokenizer, executor, CASES[name], tools=tools, self_correction=self_correction)


@pytest.mark.parametrize("self_correction", [True, False], ids=["sc", "no-sc"])
@pytest.mark.parametrize("tools", [True, False], ids=["tools", "plain"])
@pytest.mark.parametrize("name", sorted(THINK_CASES))
async def test_items_and_events_reasoning_model(think_tokenizer, executor, name, tools, self_correction):
    await check(think_tokenizer, executor, THINK_CASES[name], tools=tools, self_correction=self_correction)


async def test_code_streams_before_its_block_closes(tokenizer, executor):
    """Self-correction off: the call's first code delta comes before the code is complete."""
    cfg = ThorConfig(self_correction=SelfCorrectionConfig(enabled=False))
    events, body, _ = await run(tokenizer, executor, CASES["one-call"][0], cfg, tools=True)
    kinds = [e["type"] for e in events]
    first_delta = kinds.index("response.code_interpreter_call_code.delta")
    assert (
        kinds.index("response.reasoning_text.done")
        < first_delta
        < kinds.index("response.code_interpreter_call_code.done")
    )
    deltas = [e["delta"] for e in events if e["type"] == "response.code_interpreter_call_code.delta"]
    assert len(deltas) > 1 and "".join(deltas) == "print(6*7)\n"
    assert [i["type"] for i in body["output"]] == ["reasoning", "code_interpreter_call", "message"]
    assert body["output"][2]["content"][0]["text"] == "So \\boxed{42}."


async def test_reasoning_model_items(think_tokenizer, executor):
    """<think> text is reasoning, the text after </think> is the message, the tags go nowhere."""
    _, body, _ = await run(think_tokenizer, executor, THINK_CASES["think-tools"][0], ThorConfig(), tools=True)
    assert [i["type"] for i in body["output"]] == ["reasoning", "code_interpreter_call", "reasoning", "message"]
    assert body["output"][0]["content"][0]["text"] == "\nLet me compute.\n"
    assert body["output"][1]["outputs"] == [{"type": "logs", "logs": "42"}]
    assert body["output"][3]["content"][0]["text"] == "The answer is \\boxed{42}."
    assert "<think>" not in repr(body["output"])


@pytest.mark.parametrize(
    ("reasoning", "thor", "reasoning_model", "budget"),
    [
        ({"effort": "low"}, None, True, 2048),
        ({"effort": "high"}, None, True, 32768),
        ({"effort": "max"}, None, True, None),
        ({"effort": "low"}, {"thinking_budget": 100}, True, 100),  # the request's own thor option wins
        ({"effort": "low"}, None, False, None),  # no <think> to budget
        (None, None, True, None),
    ],
)
def test_reasoning_effort_is_the_thinking_budget(reasoning, thor, reasoning_model, budget):
    req = CreateResponseRequest(input="x", tools=[{"type": "code_interpreter"}], reasoning=reasoning, thor=thor)
    assert req.thor_options(reasoning_model).thinking_budget == budget
    if reasoning:  # it reaches the chat template as chat's reasoning_effort does
        assert req.template_kwargs() == {"reasoning_effort": reasoning["effort"], "enable_thinking": True}


def test_tool_switches():
    on = CreateResponseRequest(input="x", tools=[{"type": "code_interpreter"}], max_tool_calls=3)
    assert on.code_interpreter() and on.thor_options(False).enabled and on.thor_options(False).max_tool_calls == 3
    for off in (
        CreateResponseRequest(input="x"),
        CreateResponseRequest(input="x", tools=[{"type": "code_interpreter"}], tool_choice="none"),
        CreateResponseRequest(input="x", tools=[{"type": "code_interpreter"}], thor={"enabled": False}),
    ):
        assert not off.code_interpreter() and not off.thor_options(False).enabled


# --- storing and ending a stream (server/streaming.py with this builder) ---------------------


def _state(store) -> Any:
    """The server state `respond` reads (settings, store, metrics); no engine: the events are given."""
    from server.settings import ServerSettings
    from server.state import ServerState

    return ServerState(
        settings=ServerSettings(),
        engine=None,  # type: ignore[arg-type]
        store=store,
        sandbox=None,  # type: ignore[arg-type]
        metrics=ServerMetrics(),
        model_name="m",
        api_keys=None,  # type: ignore[arg-type]
    )


async def stream_through_respond(state, events, *, key: str = "client-a", tools: bool = True):
    """`respond` as the Responses route calls it, streaming: (the builder, the SSE body iterator)."""
    from server.admission.guards import RateLimiter
    from server.streaming import StreamFormat, respond

    builder = ResponsesBuilder(
        response_id="resp_" + key,
        model="m",
        params=CreateResponseRequest(input="What is 6*7?").response_fields(
            SamplingOptions(), tools_on=tools, store=True
        ),
        tools_enabled=tools,
        reasoning_model=False,
        metrics=state.metrics,
        conversation=[{"role": "user", "content": "What is 6*7?"}],
    )
    resp = await respond(
        state,
        None,  # type: ignore[arg-type]  # streaming never reads the request
        RateLimiter(state, key),
        builder,
        events,
        stream=True,
        include_usage=False,
        summary={"route": "/v1/responses"},
        stream_format=StreamFormat(
            named_events=True, done_sentinel=False, opening=builder.opening, error=builder.failure_events
        ),
    )
    return builder, resp.body_iterator


async def test_a_stream_is_stored_before_its_terminal_event(tokenizer, executor):
    """A client that closes the stream the moment `response.completed` arrives (the SDK does) finds
    the response stored: the engine's stream may take a while to end after its last event, and the
    store write must not wait for that."""
    import asyncio

    from server.store import MemoryStore

    dec = ThorDecoder(ScriptedBackend(tokenizer, CASES["one-call"][0]()), executor)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])

    async def engine_events():
        async for ev in dec.stream(prompt, ThorConfig(), SamplingOptions(max_tokens=400, temperature=0.0)):
            yield ev
        await asyncio.sleep(3600)  # the engine winds down (aborts, frees its KV cache) after Final

    state = _state(MemoryStore())
    builder, body = await stream_through_respond(state, engine_events())
    seen = ""
    async for piece in body:
        seen += piece
        if "event: response.completed" in piece:
            break
    await body.aclose()  # the client closed on the terminal event
    stored = await state.store.trace_get(builder.id, owner="client-a")
    assert stored is not None and stored["response"]["status"] == "completed"


# --- chained reasoning ---------------------------------------------------------------------------

# Qwen3's handling of earlier turns: an assistant message's text up to its last </think> is the
# thinking of a finished turn, and the template drops it (real reasoning-model templates do this).
THINK_STRIPPING_TEMPLATE = """\
{%- for message in messages %}
    {%- set content = message['content'] %}
    {%- if message['role'] == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


async def test_chained_thinking_is_stripped_as_chat_history_is(think_tokenizer, tokenizer, executor):
    """Turn 2 of a reasoning model, continued from turn 1's output items, is the prompt chat renders
    for the same history: the thinking (and the calls in it) goes back inside <think>...</think>, so
    the template strips it, as it strips chat's; the answer stays."""
    import copy

    from tests.test_stream_equality import build, message_fields

    tok = copy.copy(think_tokenizer)
    tok.chat_template = THINK_STRIPPING_TEMPLATE
    make = THINK_CASES["think-tools"][0]
    _, body, _ = await run(think_tokenizer, executor, make, ThorConfig(), tools=True)
    _, chat, _ = await build(think_tokenizer, executor, make, ThorConfig(), kind="chat", tools=True, stream=False)
    [chat_message] = message_fields(chat.response(), "chat")
    assert chat_message["reasoning"]  # chat returned the thinking apart from the answer
    question, follow = {"role": "user", "content": "What is 6*7?"}, {"role": "user", "content": "And 6*8?"}
    by_items = [question, *items_to_messages(body["output"]), follow]
    by_chat = [question, {"role": "assistant", "content": chat_message["content"]}, follow]
    n_items = len(render_chat(tok, by_items, tir_instructions=None))
    n_chat = len(render_chat(tok, by_chat, tir_instructions=None))
    assert n_items == n_chat
    # the thinking items say so, and come back as the model wrote them (tags and all)
    thinking = [i for i in body["output"] if i["type"] == "reasoning"]
    assert thinking and all(i.get("encrypted_content") == "thor:thinking" for i in thinking)
    [turn] = items_to_messages(body["output"])
    assert turn["content"].startswith("<think>\nLet me compute.\n```python\nprint(6*7)\n```\n")
    assert turn["content"].endswith("It is 42.\n</think>\n\nThe answer is \\boxed{42}.")
    # a model without <think> writes no thinking items: its reasoning is its prose, kept as it is
    _, plain, _ = await run(tokenizer, executor, CASES["one-call"][0], ThorConfig(), tools=True)
    assert all("encrypted_content" not in i for i in plain["output"])
    assert "<think>" not in items_to_messages(plain["output"])[0]["content"]


# --- failures ------------------------------------------------------------------------------------


def sse_events(text: str) -> list[dict[str, Any]]:
    """The named events of an SSE body, each checked against its schema in OpenAI's spec."""
    import json

    events = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        name, data = lines
        ev = json.loads(data.removeprefix("data: "))
        assert name == f"event: {ev['type']}"
        validate(ev, response_event_schemas()[ev["type"]])
        events.append(ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


async def test_a_failed_stream_ends_with_response_failed(tokenizer, executor):
    """The engine fails mid-stream: the stream says so with `error`, then `response.failed` (status
    `failed`, its `error`), which the SDK parses as the failed response; nothing is stored."""
    from openai.types.responses import ResponseFailedEvent, ResponseStreamEvent
    from pydantic import TypeAdapter

    from server.store import MemoryStore

    dec = ThorDecoder(ScriptedBackend(tokenizer, CASES["no-code"][0]()), executor)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])

    async def failing_engine():
        n = 0
        cfg = ThorConfig(max_tool_calls=0)
        async for ev in dec.stream(prompt, cfg, SamplingOptions(max_tokens=400, temperature=0.0)):
            yield ev
            n += 1
            if n == 3:
                raise RuntimeError("the engine died")

    state = _state(MemoryStore())
    builder, body = await stream_through_respond(state, failing_engine(), tools=False)
    events = sse_events("".join([piece async for piece in body]))
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    validate(failed, "Response")
    parsed = TypeAdapter(ResponseStreamEvent).validate_python(events[-1])
    assert isinstance(parsed, ResponseFailedEvent) and parsed.response.error is not None
    # the item that was open when it failed is closed, incomplete
    assert [i["status"] for i in failed["output"]] == ["incomplete"]
    assert await state.store.trace_get(builder.id, owner="client-a") is None


class AbortingBackend(ScriptedBackend):
    """The engine aborts its request after a few tokens (vLLM's finish reason "abort")."""

    async def generate(self, prompt_token_ids, params, request_id):
        from thor_engine.backend import GenChunk

        n = 0
        async for chunk in super().generate(prompt_token_ids, params, request_id):
            if n == 4:
                yield GenChunk([], "", True, "abort")
                return
            yield chunk
            n += 1


async def test_an_engine_abort_is_a_failed_response_never_a_completed_one(tokenizer, executor):
    from server.store import MemoryStore

    dec = ThorDecoder(AbortingBackend(tokenizer, CASES["no-code"][0]()), executor)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    state = _state(MemoryStore())
    builder, body = await stream_through_respond(
        state, dec.stream(prompt, ThorConfig(), SamplingOptions(max_tokens=400, temperature=0.0))
    )
    events = sse_events("".join([piece async for piece in body]))
    assert events[-1]["type"] == "response.failed"
    assert builder.response()["status"] == "failed" and builder.response()["error"]["code"] == "server_error"
    validate(builder.response(), "Response")
    stored = await state.store.trace_get(builder.id, owner="client-a")
    assert stored is not None and stored["response"]["status"] == "failed"


async def test_call_events_say_failed_and_never_run(tokenizer, executor):
    """One call allowed, self-correction off: the first call fails (it ran: `interpreting`, then its
    item `failed`, never `.completed`), the second is refused (never run: neither `interpreting`
    nor `.completed`; its item `incomplete`)."""
    from server.store import MemoryStore

    trajectory = (
        "A.\n```python\nprint(1/0)\n```\n```output\nx\n```\nB.\n```python\nprint(2)\n```\n```output\nx\n```\n"
        "So \\boxed{2}."
    )
    dec = ThorDecoder(ScriptedBackend(tokenizer, continuing(trajectory)), executor)
    cfg = ThorConfig(max_tool_calls=1, self_correction=SelfCorrectionConfig(enabled=False))
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    _, body = await stream_through_respond(
        _state(MemoryStore()), dec.stream(prompt, cfg, SamplingOptions(max_tokens=400, temperature=0.0))
    )
    events = sse_events("".join([piece async for piece in body]))
    calls = [i for i in events[-1]["response"]["output"] if i["type"] == "code_interpreter_call"]
    assert [c["status"] for c in calls] == ["failed", "incomplete"]

    def kinds(call: dict) -> list[str]:
        return [e["type"].rsplit(".", 1)[1] for e in events if e.get("item_id") == call["id"]]

    assert "interpreting" in kinds(calls[0]) and "completed" not in kinds(calls[0])
    assert "interpreting" not in kinds(calls[1]) and "completed" not in kinds(calls[1])
