"""OpenAI's Responses API (`/v1/responses`) end to end: real server process, real vLLM (CPU) with
the tiny TIR model, real sandbox service; the official `openai` SDK (`responses.create`,
`responses.stream`, `responses.retrieve`) and raw httpx as clients; every response body and
every stream event validated against OpenAI's published schema."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    ResponseCodeInterpreterCallCodeDeltaEvent,
    ResponseCodeInterpreterCallCompletedEvent,
    ResponseCodeInterpreterCallInterpretingEvent,
    ResponseCompletedEvent,
    ResponseReasoningTextDeltaEvent,
    ResponseTextDeltaEvent,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.support.openapi import response_event_schemas, validate
from tests.support.thor_server import run_server, tiny_server_args

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.sandbox]

KEY, OTHER_KEY, FLOOD_KEY = "responses-key-1", "responses-key-2", "responses-key-flood"
#: each key's stored responses (THOR_TRACE_QUOTA_BYTES): a few dozen of this file's responses
QUOTA = 256 * 1024
MODEL = "tiny-tir"
MUL = "Compute 17*23."
DIVZERO = "Divide 10 by zero safely."
CODE = [{"type": "code_interpreter", "container": {"type": "auto"}}]
SELF_CORRECT = {"thor": {"self_correction": {"max_retries": 1, "backtrack_tokens": 0}}}


@pytest.fixture(scope="module")
def server(tiny_tir_model, sandbox):
    args = [*tiny_server_args(tiny_tir_model, MODEL, sandbox_url=sandbox.url)]
    args += ["--api-key", KEY, "--api-key", OTHER_KEY, "--api-key", FLOOD_KEY]
    with run_server(args, env={"THOR_TRACE_QUOTA_BYTES": str(QUOTA)}) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def body(prompt: str | list = MUL, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": prompt, "tools": CODE, "temperature": 0, "max_output_tokens": 300, **kw}


def post(server, payload: dict[str, Any], key: str = KEY) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/responses", json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


def stream_events(server, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """A raw SSE stream: each event named as its data's type, validated against its own schema."""
    with httpx.stream(
        "POST",
        server.url + "/v1/responses",
        json={**payload, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln and not ln.startswith(":")]
    assert "data: [DONE]" not in lines  # the Responses API ends with its last event
    events = []
    for name_line, data_line in zip(lines[::2], lines[1::2], strict=True):
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        ev = json.loads(data_line[6:])
        assert ev["type"] == name_line[7:]
        validate(ev, response_event_schemas()[ev["type"]])
        events.append(ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k != "id"} for item in items]


# --- one turn ---------------------------------------------------------------------------------


def test_code_interpreter_items_and_real_usage(server, client):
    r = post(server, body())
    assert r.status_code == 200
    resp = r.json()
    validate(resp, "Response")
    assert resp["object"] == "response" and resp["status"] == "completed" and resp["id"].startswith("resp_")
    reasoning, call, message = resp["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"][0]["text"] == "I will compute this with Python.\n"
    assert call["type"] == "code_interpreter_call" and call["status"] == "completed"
    assert call["code"] == "print(17*23)\n" and call["outputs"] == [{"type": "logs", "logs": "391"}]
    assert message["type"] == "message" and message["content"][0]["text"].endswith("\\boxed{391}.")
    assert resp["thor"]["answer"] == "391" and resp["tools"][0]["type"] == "code_interpreter"
    # usage is the engine's count: the same conversation through chat counts the same tokens
    u = resp["usage"]
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": MUL}], temperature=0, max_tokens=300
    )
    assert u["input_tokens"] == chat.usage.prompt_tokens > 0
    assert u["output_tokens"] == chat.usage.completion_tokens > 0
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert 0 < u["output_tokens_details"]["reasoning_tokens"] < u["output_tokens"]
    assert chat.choices[0].message.content == message["content"][0]["text"]
    # the SDK parses it into its own types
    sdk = client.responses.create(**body())
    assert sdk.output_text == message["content"][0]["text"]
    assert [o.type for o in sdk.output] == ["reasoning", "code_interpreter_call", "message"]


def test_stream_follows_the_published_event_sequence(server):
    events = stream_events(server, body())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert kinds[-1] == "response.completed"
    final = events[-1]["response"]
    validate(final, "Response")
    call = kinds.index("response.code_interpreter_call.in_progress")
    assert kinds[call - 1 : call + 6] == [
        "response.output_item.added",
        "response.code_interpreter_call.in_progress",
        "response.code_interpreter_call_code.delta",
        "response.code_interpreter_call_code.done",
        "response.code_interpreter_call.interpreting",
        "response.code_interpreter_call.completed",
        "response.output_item.done",
    ]
    # every item is added, filled and done at its index; the deltas add up to the done text
    done = {e["output_index"]: e["item"] for e in events if e["type"] == "response.output_item.done"}
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == list(range(len(done)))
    assert [done[i] for i in range(len(done))] == final["output"]
    for kind, field in (("reasoning_text", "reasoning"), ("output_text", "message")):
        text = "".join(e["delta"] for e in events if e["type"] == f"response.{kind}.delta")
        assert text == "".join(p["text"] for item in final["output"] if item["type"] == field for p in item["content"])
    code = "".join(e["delta"] for e in events if e["type"] == "response.code_interpreter_call_code.delta")
    assert code == final["output"][1]["code"] == "print(17*23)\n"
    # the stream and the non-stream response say the same
    non_stream = post(server, body()).json()
    assert without_ids(final["output"]) == without_ids(non_stream["output"])
    assert final["usage"] == non_stream["usage"]


def test_sdk_stream_helpers_parse_every_event(client):
    seen: list[type] = []
    with client.responses.stream(**body()) as stream:
        for event in stream:
            seen.append(type(event))
        final = stream.get_final_response()
    for cls in (
        ResponseReasoningTextDeltaEvent,
        ResponseCodeInterpreterCallCodeDeltaEvent,
        ResponseCodeInterpreterCallInterpretingEvent,
        ResponseCodeInterpreterCallCompletedEvent,
        ResponseTextDeltaEvent,
        ResponseCompletedEvent,
    ):
        assert any(issubclass(t, cls) for t in seen), cls  # the helper's own events subclass the SDK's
    assert final.status == "completed" and final.output_text.endswith("\\boxed{391}.")
    call = final.output[1]
    assert call.type == "code_interpreter_call" and call.outputs[0].logs == "391"
    # create(stream=True) yields the same typed events
    kinds = [e.type for e in client.responses.create(**body(), stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_self_corrected_attempt_never_becomes_an_item(server):
    events = stream_events(server, body(DIVZERO, **SELF_CORRECT))
    final = events[-1]["response"]
    thor = final["thor"]
    attempts = thor["tool_calls"]
    assert attempts[0]["ok"] is False and attempts[0]["committed"] is False
    assert len(thor["backtracks"]) == 1 and thor["backtracks"][0]["chars_retracted"] > 0
    committed = [a for a in attempts if a["committed"]]
    calls = [i for i in final["output"] if i["type"] == "code_interpreter_call"]
    assert len(calls) == len(committed) == len(attempts) - 1
    assert [c["code"] for c in calls] == [a["code"] for a in committed]
    assert [c["status"] for c in calls] == ["completed" if a["ok"] else "failed" for a in committed]
    assert calls[0]["outputs"][0]["logs"].startswith("ZeroDivisionError")
    # nothing the stream sent was taken back: the discarded attempt was never shown
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert len(added) == len(final["output"])
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert reasoning == "".join(i["content"][0]["text"] for i in final["output"] if i["type"] == "reasoning")
    non_stream = post(server, body(DIVZERO, **SELF_CORRECT)).json()
    assert without_ids(non_stream["output"]) == without_ids(final["output"])


def test_code_streams_as_written_when_nothing_can_take_it_back(server):
    """Self-correction off: no backtrack can retract the round, so the prose is sent as reasoning
    the moment the fence opens and the code streams token by token while the model writes it."""
    payload = body(thor={"self_correction": False})
    events = stream_events(server, payload)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.code_interpreter_call_code.delta"]
    assert len(deltas) > 3 and "".join(deltas) == "print(17*23)\n"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.code_interpreter_call_code.delta")
    assert kinds.index("response.code_interpreter_call_code.done") > max(
        i for i, k in enumerate(kinds) if k == "response.code_interpreter_call_code.delta"
    )
    non_stream = post(server, payload).json()
    assert without_ids(non_stream["output"]) == without_ids(events[-1]["response"]["output"])
    # cut inside the code block: the call never ran, and says so
    events = stream_events(server, body(thor={"self_correction": False}, max_output_tokens=14))
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    call = final["output"][-1]
    assert call["type"] == "code_interpreter_call" and call["status"] == "incomplete" and call["outputs"] is None
    assert call["code"] and "print(17*23)\n".startswith(call["code"]) and call["code"] != "print(17*23)\n"
    assert final["thor"]["tools"]["calls"] == 0


@pytest.mark.parametrize("tools", [{}, {"tools": CODE, "tool_choice": "none"}])
def test_without_the_code_interpreter_nothing_runs(server, tools):
    payload = {k: v for k, v in body().items() if k != "tools"} | tools
    resp = post(server, payload).json()
    validate(resp, "Response")
    assert [i["type"] for i in resp["output"]] == ["message"]
    assert resp["tools"] == [] and resp["thor"]["tool_calls"] == []
    assert resp["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    # the model still writes its code block: as text of the answer, never run
    assert "```python" in resp["output"][0]["content"][0]["text"]


def test_max_tool_calls_is_the_budget_and_a_refused_call_is_incomplete(server):
    """One call allowed: the failing first call is committed (a retry could not run), the second is
    refused unrun (status incomplete, the refusal the model read as its output)."""
    resp = post(server, body(DIVZERO, max_tool_calls=1)).json()
    validate(resp, "Response")
    calls = [i for i in resp["output"] if i["type"] == "code_interpreter_call"]
    assert [c["status"] for c in calls][:2] == ["failed", "incomplete"]
    assert "not available" in calls[1]["outputs"][0]["logs"]
    assert resp["thor"]["tools"]["calls"] == 1 and resp["thor"]["tools"]["not_executed"] == 1
    assert resp["max_tool_calls"] == 1
    # max_tool_calls 0: the code interpreter is off
    none = post(server, body(max_tool_calls=0)).json()
    assert [i["type"] for i in none["output"]] == ["message"] and none["thor"]["tools"]["calls"] == 0


def test_max_output_tokens_makes_it_incomplete(server):
    resp = post(server, body(max_output_tokens=5)).json()
    validate(resp, "Response")
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["usage"]["output_tokens"] == 5
    events = stream_events(server, body(max_output_tokens=5))
    assert events[-1]["type"] == "response.incomplete"
    assert without_ids(events[-1]["response"]["output"]) == without_ids(resp["output"])


# --- conversation state -----------------------------------------------------------------------


def test_multi_turn_by_previous_response_id_and_by_items(client):
    first = client.responses.create(**body())
    follow = "Now compute it again."
    by_id = client.responses.create(**body(follow), previous_response_id=first.id)
    items = [
        {"role": "user", "content": MUL},
        *[o.model_dump(exclude_none=True) for o in first.output],
        {"role": "user", "content": follow},
    ]
    by_items = client.responses.create(**body(items))
    # both carry the first turn's reasoning, code, output and answer: the same prompt, the same answer
    assert by_id.usage.input_tokens == by_items.usage.input_tokens
    assert by_id.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert without_ids([o.model_dump() for o in by_id.output]) == without_ids([o.model_dump() for o in by_items.output])
    assert by_id.previous_response_id == first.id
    # stored: retrieved as it was returned, and continued again
    got = client.responses.retrieve(by_id.id)
    assert got.model_dump() == by_id.model_dump()
    third = client.responses.create(**body("And once more."), previous_response_id=by_id.id)
    assert third.usage.input_tokens > by_id.usage.input_tokens + by_id.usage.output_tokens


def test_instructions_are_the_system_message(client):
    plain = client.responses.create(**body())
    told = client.responses.create(**body(), instructions="You are a careful calculator.")
    assert told.instructions == "You are a careful calculator."
    assert told.usage.input_tokens > plain.usage.input_tokens


def test_store_false_and_other_clients_see_nothing(server, client):
    unstored = client.responses.create(**body(), store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    r = post(server, body(previous_response_id=unstored.id))
    # as OpenAI answers an unknown previous_response_id: 400, invalid_request_error, previous_response_not_found
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "previous_response_not_found"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**body(), previous_response_id="resp_does_not_exist")
    stored = client.responses.create(**body())
    other = openai.OpenAI(base_url=server.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(stored.id)
    assert post(server, body(previous_response_id=stored.id), key=OTHER_KEY).status_code == 400
    assert client.responses.retrieve(stored.id).id == stored.id


def test_input_items_and_delete(server, client):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": MUL}]},
    ]
    resp = client.responses.create(**body(items))
    listed = httpx.get(
        f"{server.url}/v1/responses/{resp.id}/input_items", headers={"Authorization": f"Bearer {KEY}"}
    ).json()
    validate(listed, "ResponseItemList")
    assert [i["role"] for i in listed["data"]] == ["user", "developer"]  # newest first, as OpenAI lists them
    assert listed["data"][0]["content"] == [{"type": "input_text", "text": MUL}]
    page = client.responses.input_items.list(resp.id, order="asc", limit=1)
    assert [i.role for i in page.data] == ["developer"] and page.has_more
    rest = client.responses.input_items.list(resp.id, order="asc", after=page.data[0].id)
    assert [i.role for i in rest.data] == ["user"] and not rest.has_more
    # deleting: only its owner can, and afterwards it is gone for retrieval and continuation
    other = openai.OpenAI(base_url=server.url + "/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(resp.id)
    r = httpx.delete(f"{server.url}/v1/responses/{resp.id}", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"id": resp.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)
    assert post(server, body(previous_response_id=resp.id)).status_code == 400


# --- refusals and operations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, 400, "tools"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools"),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"reasoning": {"summary": "auto"}}, 400, "reasoning.summary"),
        ({"text": {"format": {"type": "xml"}}}, 400, "text"),
        ({"background": True}, 400, "background"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, 400, "input"),
        ({"input": [{"role": "robot", "content": "hi"}]}, 400, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"temperature": 3}, 400, "temperature"),
        ({"model": "gpt-4o"}, 404, "model"),
    ],
)
def test_what_cannot_work_is_a_clear_error(server, extra, status, param):
    r = post(server, body(**extra))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_unknown_response_id_is_404_and_route_is_metered(server, client):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_does_not_exist")
    assert httpx.post(server.url + "/v1/responses", json=body()).status_code == 401
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in fam.samples:
            if s.name == "thor_requests_total" and s.labels.get("route") == "/v1/responses":
                total += s.value
    assert total >= 1


# --- stored responses: what is kept ----------------------------------------------------------


def test_metadata_is_bounded_as_openai_bounds_it(server, client):
    """At most 16 pairs, keys <= 64 characters, values <= 512 (OpenAI's `Metadata`); at the bounds it
    is kept and echoed."""
    most = {f"key{i:02d}": "v" * 512 for i in range(16)}
    resp = client.responses.create(**body(max_output_tokens=1), metadata=most)
    assert resp.metadata == most and client.responses.retrieve(resp.id).metadata == most
    for metadata in (
        {f"key{i:02d}": "v" for i in range(17)},
        {"k" * 65: "v"},
        {"key": "v" * 513},
        {f"key{i:02d}": "v" * 600 for i in range(20)},  # what was accepted before
    ):
        r = post(server, body(max_output_tokens=1, metadata=metadata))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "metadata"


def test_input_items_keep_only_what_the_server_reads_and_page_with_repeated_ids(server, client):
    """Earlier output items sent back as input are stored rebuilt from their known fields (unknown
    keys dropped); items that repeat an id get fresh ones, so paging by `after` always ends."""
    first = post(server, body()).json()
    reasoning, call, message = first["output"]
    items = [
        {"role": "user", "content": MUL, "id": "msg_same"},
        {**reasoning, "junk": "x" * 1000},
        {**call, "junk": {"nested": True}, "outputs": [{"type": "logs", "logs": "391", "junk": 1}]},
        {**message, "id": "msg_same"},
        {"role": "user", "content": "Again.", "id": "msg_same"},
    ]
    resp = post(server, body(items, max_output_tokens=1)).json()
    listed = httpx.get(
        f"{server.url}/v1/responses/{resp['id']}/input_items?order=asc",
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    validate(listed, "ResponseItemList")
    assert "junk" not in json.dumps(listed)
    assert listed["data"][2]["outputs"] == [{"type": "logs", "logs": "391"}]
    ids = [i["id"] for i in listed["data"]]
    assert len(set(ids)) == 5 and ids[0] == "msg_same" and ids[1] == reasoning["id"]
    # one item per page: every item once, then the end
    seen, after = [], None
    for _ in range(10):
        page = client.responses.input_items.list(
            resp["id"], order="asc", limit=1, **({"after": after} if after else {})
        )
        seen += [i.id for i in page.data]
        if not page.has_more:
            break
        after = page.data[-1].id
    assert seen == ids


def test_call_events_of_failed_and_refused_calls(server):
    """A failed call ran (`interpreting`) but never `completed`; a refused one never ran (neither)."""
    events = stream_events(server, body(DIVZERO, max_tool_calls=1))
    calls = [i for i in events[-1]["response"]["output"] if i["type"] == "code_interpreter_call"]
    assert [c["status"] for c in calls][:2] == ["failed", "incomplete"]

    def kinds(call: dict) -> list[str]:
        return [e["type"].rsplit(".", 1)[1] for e in events if e.get("item_id") == call["id"]]

    assert "interpreting" in kinds(calls[0]) and "completed" not in kinds(calls[0])
    assert "interpreting" not in kinds(calls[1]) and "completed" not in kinds(calls[1])


async def test_a_key_flooding_stored_responses_evicts_only_its_own(server):
    """40 responses as large as the request limits allow (about 1.5x the key's quota): the flooder
    loses its own oldest, the other key's response is still retrieved and continued."""
    from tests.support.store_flood import flood_stored_responses

    outcome = await flood_stored_responses(server.url, flooder_key=FLOOD_KEY, victim_key=OTHER_KEY, model=MODEL)
    assert outcome.victim_response_kept and outcome.victim_limits_kept
    assert outcome.flooder_latest_kept and not outcome.flooder_oldest_kept


def test_delete_leaves_the_copy_a_later_response_continues(client):
    """Documented: a response made with previous_response_id holds its own copy of the conversation;
    deleting the earlier one does not change what the later one continues."""
    first = client.responses.create(**body(max_output_tokens=20))
    second = client.responses.create(**body("Again.", max_output_tokens=1), previous_response_id=first.id)
    before = client.responses.create(**body("Once more.", max_output_tokens=1), previous_response_id=second.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(**body("x", max_output_tokens=1), previous_response_id=first.id)
    after = client.responses.create(**body("Once more.", max_output_tokens=1), previous_response_id=second.id)
    assert after.usage.input_tokens == before.usage.input_tokens
