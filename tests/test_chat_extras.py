"""Chat with THOR off: logprobs, response_format and client function tools (issue 12).

Against the real server on the default model (Qwen2.5-Coder-0.5B-Instruct, whose chat template
renders tools), with the official `openai` SDK as client; every body and stream chunk is
checked against OpenAI's schema, streams against their non-stream twins. The `auto` function
call parsing is also checked on the builder with the model's real tokenizer and vLLM's own
Hermes parser (this 0.5B model does not write `<tool_call>` tags reliably on its own).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from server.chat.plain import PlainChatBuilder
from server.metrics import ServerMetrics
from tests.support.openapi import validate
from thor_engine.engine import PlainChunk
from thor_engine.function_calls import FunctionCallParser
from thor_engine.models.provision import PRESETS

MODEL = PRESETS["default"].name  # the served name of the shared `make serve`-like server
OFF = {"thor": {"enabled": False}}
ASK = [{"role": "user", "content": "What is 2+3? Answer in one short sentence."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


@pytest.fixture(scope="module")
def server(default_server):
    """The session's shared default-model server (tests/conftest.py)."""
    return default_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 12, **OFF, **kw}


def post(server, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=120)


def plain_finish(body: dict[str, Any], max_tokens: int) -> str:
    """The one finish_reason a plain (THOR off) choice may have: `tool_calls` exactly when it
    carries calls, else `length` exactly when it used all of max_tokens, else `stop`."""
    if body["choices"][0]["message"].get("tool_calls"):
        return "tool_calls"
    return "length" if body["usage"]["completion_tokens"] == max_tokens else "stop"


def chat(server, **kw: Any) -> dict[str, Any]:
    r = post(server, body(**kw))
    assert r.status_code == 200, r.text
    out = r.json()
    validate(out, "CreateChatCompletionResponse")
    return out


def stream(server, **kw: Any) -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body(stream=True, **kw), timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            validate(chunk, "CreateChatCompletionStreamResponse")
            chunks.append(chunk)
    return chunks


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's deltas put together as the non-stream choice (tool call ids left out)."""
    content, logprobs, calls, finish = "", None, {}, None
    for ch in chunks:
        for c in ch["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            if c["logprobs"] is not None:
                logprobs = (logprobs or []) + c["logprobs"]["content"]
            for tc in d.get("tool_calls") or []:
                acc = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                acc["name"] += tc.get("function", {}).get("name") or ""
                acc["arguments"] += tc.get("function", {}).get("arguments") or ""
            finish = c["finish_reason"] or finish
    return {"content": content, "logprobs": logprobs, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


def as_accumulated(choice: dict[str, Any]) -> dict[str, Any]:
    msg = choice["message"]
    return {
        "content": msg["content"] or "",
        "logprobs": choice["logprobs"]["content"] if choice["logprobs"] else None,
        "calls": [tc["function"] for tc in msg.get("tool_calls") or []],
        "finish": choice["finish_reason"],
    }


# --- logprobs ------------------------------------------------------------------------------------


def test_logprobs_shape_and_greedy_consistency(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, extra_body=OFF
    )
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens
    # the end-of-turn token ends the choice: its logprob is there, its text is not content
    assert choice.finish_reason == "stop" and entries[-1].token == "<|im_end|>"
    assert "".join(e.token for e in entries[:-1]) == choice.message.content
    for e in entries:
        assert bytes(e.bytes) == e.token.encode()
        assert len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_top_logprobs_are_one_per_token_id(server):
    """Several token ids can decode to the same text (the byte pieces of one character all read
    U+FFFD): each id is its own `top_logprobs` entry, as vLLM sends them, never merged into one
    entry per text (which would return fewer than asked, with one of the ids' logprobs)."""
    ask = [{"role": "user", "content": "Reply with three emoji and nothing else."}]
    out = chat(server, messages=ask, max_tokens=6, logprobs=True, top_logprobs=20)
    entries = out["choices"][0]["logprobs"]["content"]
    assert entries and all(len(e["top_logprobs"]) == 20 for e in entries), [len(e["top_logprobs"]) for e in entries]
    # the case this is about occurs here: some position has alternatives that read the same
    assert any(len({t["token"] for t in e["top_logprobs"]}) < 20 for e in entries)
    for e in entries:
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert lps == sorted(lps, reverse=True)


def test_logprobs_without_top_logprobs(server):
    out = chat(server, logprobs=True)
    entries = out["choices"][0]["logprobs"]["content"]
    assert len(entries) == out["usage"]["completion_tokens"] and all(e["top_logprobs"] == [] for e in entries)
    assert chat(server, logprobs=False)["choices"][0]["logprobs"] is None


def test_logprobs_stream_equals_non_stream(server):
    kw = {"logprobs": True, "top_logprobs": 2, "n": 2, "seed": 7, "temperature": 0.8}
    whole = chat(server, **kw)
    chunks = stream(server, stream_options={"include_usage": True}, **kw)
    *deltas, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"]
    assert all(ch["usage"] is None for ch in deltas)
    for choice in whole["choices"]:
        mine = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == choice["index"]]
        assert accumulate(mine) == as_accumulated(choice)


def test_chat_logprobs_equal_completions_logprobs_on_the_same_tokens(server):
    ids = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": ASK}, timeout=60).json()["tokens"]
    chat_out = chat(server, logprobs=True, top_logprobs=3)
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 12, "temperature": 0, "logprobs": 3},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    cmpl = r.json()["choices"][0]["logprobs"]
    entries = chat_out["choices"][0]["logprobs"]["content"]
    assert chat_out["usage"]["prompt_tokens"] == len(ids)
    assert [e["token"] for e in entries] == cmpl["tokens"]
    assert [e["logprob"] for e in entries] == pytest.approx(cmpl["token_logprobs"], abs=1e-3)
    for e, tops in zip(entries, cmpl["top_logprobs"], strict=True):
        best = sorted(tops.items(), key=lambda kv: kv[1], reverse=True)[:3]
        assert [t["token"] for t in e["top_logprobs"]] == [t for t, _ in best]


# --- response_format -----------------------------------------------------------------------------


class Sum(BaseModel):
    a: int
    b: int
    total: int


def test_json_schema_through_the_sdks_parse(client):
    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Add 2 and 3. Reply in JSON with a, b and total."}],
        response_format=Sum,
        max_tokens=60,
        temperature=0,
        extra_body=OFF,
    )
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Sum)
    jsonschema.validate(json.loads(msg.content), Sum.model_json_schema())


def test_json_schema_stream_equals_non_stream_and_validates(server):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    kw = {"response_format": fmt, "max_tokens": 60, "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    whole = chat(server, **kw)
    assert accumulate(stream(server, **kw)) == as_accumulated(whole["choices"][0])
    assert whole["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(whole["choices"][0]["message"]["content"]), schema)


def test_json_object(server):
    out = chat(
        server,
        response_format={"type": "json_object"},
        max_tokens=60,
        messages=[{"role": "user", "content": "Give a JSON object with your name."}],
    )
    assert out["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


# --- function tools ------------------------------------------------------------------------------


def test_named_function_through_the_sdk(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
        extra_body=OFF,
    )
    choice = r.choices[0]
    # as OpenAI and vLLM: a named function's call finishes with `stop`
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_strict_pydantic_tool_parsed_by_the_sdk(client):
    class Add(BaseModel):
        a: int
        b: int

    r = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Add 2 and 3."}],
        tools=[openai.pydantic_function_tool(Add)],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
        extra_body=OFF,
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    assert all(c.function.name == "Add" and isinstance(c.function.parsed_arguments, Add) for c in calls)


def test_required_stream_equals_non_stream(server):
    kw = {
        "messages": [{"role": "user", "content": "Add 2 and 3."}],
        "tools": [WEATHER, ADD],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 60,
        "logprobs": True,
    }
    whole = chat(server, **kw)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1
    call = choice["message"]["tool_calls"][0]["function"]
    params = {"add": ADD, "get_weather": WEATHER}[call["name"]]["function"]["parameters"]
    jsonschema.validate(json.loads(call["arguments"]), params)
    assert len(choice["logprobs"]["content"]) == whole["usage"]["completion_tokens"]
    assert accumulate(stream(server, **kw)) == as_accumulated(choice)


def test_auto_renders_tools_and_answers_in_schema(server, tokenizer):
    """`auto` (the default with tools): the tools reach the template (the prompt is exactly the
    template's rendering) and whatever the model writes comes back in OpenAI's shape."""
    kw = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER]}
    whole = chat(server, max_tokens=40, **kw)
    text = tokenizer.apply_chat_template(kw["messages"], tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and '"get_weather"' in text
    assert whole["usage"]["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
    choice = whole["choices"][0]
    assert choice["finish_reason"] == plain_finish(whole, 40), whole
    if choice["finish_reason"] != "tool_calls":
        assert choice["message"]["content"] and "tool_calls" not in choice["message"]
    assert accumulate(stream(server, max_tokens=40, **kw)) == as_accumulated(choice)


def test_conversation_with_tool_calls_and_results_renders_through_the_template(server, tokenizer):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    out = chat(server, messages=messages, tools=[WEATHER], max_tokens=20)
    as_template = [
        messages[0],
        {**messages[1], "content": "", "tool_calls": [{**messages[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        messages[2],
    ]  # fmt: skip
    text = tokenizer.apply_chat_template(as_template, tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in text
    assert out["usage"]["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))


def _feed(builder: PlainChatBuilder, pieces: list[str]) -> list[dict[str, Any]]:
    chunks = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunk = PlainChunk(
            index=0, text=piece, finished=last, finish_reason="stop" if last else None, completion_tokens=i + 1
        )
        chunks += builder.feed(chunk)
    return chunks


@pytest.mark.parametrize(
    "pieces,content,calls",
    [
        (
            ["Let me check", ".\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>'],
            "Let me check.\n",
            [{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
        ),
        (
            ['<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n',
             '{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'],
            "",
            [{"name": "add", "arguments": '{"a": 1, "b": 2}'}, {"name": "add", "arguments": '{"a": 3, "b": 4}'}],
        ),
        (["It is 5, not <tool", "s>."], "It is 5, not <tools>.", []),
        (["x <tool_call>\n{broken"], "x <tool_call>\n{broken", []),
    ],
)  # fmt: skip
def test_auto_calls_are_parsed_by_vllms_hermes_parser(tokenizer, pieces, content, calls):
    def builder() -> PlainChatBuilder:
        return PlainChatBuilder(
            response_id="chatcmpl-x",
            model=MODEL,
            n=1,
            prompt_tokens=3,
            top_logprobs=None,
            tool_choice="auto",
            parser=FunctionCallParser(tokenizer),
            metrics=ServerMetrics(),
        )

    b = builder()
    chunks = _feed(b, pieces)
    for ch in chunks:
        validate(ch, "CreateChatCompletionStreamResponse")
    whole = b.response()
    validate(whole, "CreateChatCompletionResponse")
    got = as_accumulated(whole["choices"][0])
    assert got == {"content": content, "logprobs": None, "calls": calls, "finish": "tool_calls" if calls else "stop"}
    assert accumulate(chunks) == got
    # nothing of a call is ever sent as content, even while it may still be text
    sent = [d["content"] for ch in chunks for c in ch["choices"] if (d := c["delta"]).get("content")]
    if calls:
        assert not any("<" in s for s in sent)


# --- what is refused ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
        ({"functions": [ADD["function"]]}, "functions"),
        (
            {"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, extra, param):
    r = post(server, body(**extra))
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": "required"}, "tools"),
    ],
)  # fmt: skip
def test_a_schema_the_engine_cannot_compile_is_a_400_naming_the_field(server, extra, param):
    r = post(server, body(**extra))
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param and "bogus" in r.json()["error"]["message"], r.json()


def test_tool_choice_none_renders_tools_and_calls_nothing(server):
    kw = {"messages": [{"role": "user", "content": "Add 2 and 3."}], "tools": [ADD], "max_tokens": 16}
    none = chat(server, tool_choice="none", **kw)
    auto = chat(server, tool_choice="auto", **kw)
    without = chat(server, messages=kw["messages"], max_tokens=1)
    assert none["usage"]["prompt_tokens"] == auto["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    choice = none["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == plain_finish(none, 16), none
    assert choice["message"]["content"]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"logprobs": True}, "logprobs"),
        ({"tools": [ADD], "logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}, "logprobs": True}, "logprobs"),
    ],
)  # a JSON format and a forced call work with THOR on: tests/test_structured_answers.py
@pytest.mark.parametrize("thor", [None, {"enabled": True}])
def test_thor_on_refuses_plain_only_features_and_says_how(server, extra, param, thor):
    payload = {"model": MODEL, "messages": ASK, "max_tokens": 4, **extra}
    if thor is not None:
        payload["thor"] = thor
    r = post(server, payload)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and '"enabled": false' in err["message"]


def test_thor_on_with_client_functions_runs_python_and_takes_tool_results(client, server, tokenizer):
    """THOR on (the default) with client functions (tool_choice auto): the tools reach the
    template next to THOR's instructions, the model's Python still runs server-side, and a
    conversation carrying a client call and its result continues with THOR on. (The model's own
    call to a client function, which ends the turn with `tool_calls`, is checked on the builder
    with the real decoder: tests/test_stream_equality.py::test_client_function_call_ends_a_thor_turn.)"""
    ask = [{"role": "user", "content": "What is 123*457? Use Python."}]
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[ADD], temperature=0, max_tokens=200)
    validate(r.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    thor = r.model_extra["thor"]["choices"][0]
    # the model's Python ran in the sandbox (self-correction may have retried a failing attempt)
    assert thor["tools"]["calls"] >= 1 and all(c["exit_code"] is not None for c in thor["tool_calls"])
    plain = client.chat.completions.create(model=MODEL, messages=ask, temperature=0, max_tokens=1)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are in the prompt too
    turn = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]  # fmt: skip
    follow = client.chat.completions.create(model=MODEL, messages=turn, tools=[ADD], temperature=0, max_tokens=120)
    validate(follow.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionResponse")
    # OpenAI's finish_reason says what THOR's does: a client call, the model's stop, or a limit
    thor_finish = follow.model_extra["thor"]["choices"][0]["finish_reason"]
    cut = thor_finish in ("length", "context_length", "generation_cap", "repetition")
    expected = "tool_calls" if follow.choices[0].message.tool_calls else ("length" if cut else "stop")
    assert follow.choices[0].finish_reason == expected, (thor_finish, follow.choices[0])
    if thor_finish == "length":
        assert follow.usage.completion_tokens >= 120
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens


@pytest.mark.parametrize(
    "in_think,pieces,reasoning,content,calls",
    [
        (False, ["<think>", "\nLet me", " add.</th", "ink>\n\nIt is", " 5."], "\nLet me add.", "It is 5.", []),
        (True, ["2+3=5</think>", "\n5"], "2+3=5", "5", []),
        (False, ["no thinking here"], "", "no thinking here", []),
        (
            False,
            ["<think>use add</think>\n", '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'],
            "use add",
            "",
            [{"name": "add", "arguments": '{"a": 2, "b": 3}'}],
        ),
    ],
)
def test_reasoning_models_split_at_think_tags_as_the_thor_path(tokenizer, in_think, pieces, reasoning, content, calls):
    b = PlainChatBuilder(
        response_id="chatcmpl-x",
        model=MODEL,
        n=1,
        prompt_tokens=3,
        top_logprobs=None,
        tool_choice="auto",
        parser=FunctionCallParser(tokenizer),
        metrics=ServerMetrics(),
        reasoning_model=True,
        in_think=in_think,
        reasoning_fields="both",
    )
    chunks = _feed(b, pieces)
    for ch in chunks:
        validate(ch, "CreateChatCompletionStreamResponse")
    whole = b.response()
    validate(whole, "CreateChatCompletionResponse")
    msg = whole["choices"][0]["message"]
    assert msg["reasoning_content"] == msg["reasoning"] == reasoning
    assert as_accumulated(whole["choices"][0]) == {
        "content": content,
        "logprobs": None,
        "calls": calls,
        "finish": "tool_calls" if calls else "stop",
    }
    streamed = "".join(c["delta"].get("reasoning_content", "") for ch in chunks for c in ch["choices"])
    assert streamed == reasoning and accumulate(chunks) == as_accumulated(whole["choices"][0])
    assert not any("think>" in c["delta"].get("content", "") for ch in chunks for c in ch["choices"])


def test_engine_tells_where_a_reasoning_prompt_leaves_the_model(think_tokenizer, tokenizer):
    from tests.support.scripted_backend import ScriptedBackend
    from thor_engine.engine import ThorEngine

    thinker = ThorEngine(ScriptedBackend(think_tokenizer, lambda _: ""), None, model_name="t")  # type: ignore[arg-type]
    head = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert thinker.thinking(thinker.text_prompt(head + "<think>\n")) == "open"
    assert thinker.thinking(thinker.text_prompt(head + "<think>\n\n</think>\n\n")) == "closed"
    assert thinker.thinking(thinker.text_prompt(head)) is None  # the model may still open it
    plain = ThorEngine(ScriptedBackend(tokenizer, lambda _: ""), None, model_name="p")  # type: ignore[arg-type]
    assert plain.thinking(plain.text_prompt(head + "<think>\n")) is None  # not a reasoning model
