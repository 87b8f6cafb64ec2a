"""Structured answers with THOR on, through the official OpenAI SDK's parse helpers, against the
shared `make serve`-like server on the default model: the THOR loop writes and runs its Python,
then the answer is generated under vLLM's structured-output constraint (two phases, one request).

Checked: `chat.completions.parse` and `responses.parse` return the pydantic object (and the
trajectory is in the reasoning field / reasoning and code_interpreter_call items); stream equals
non-stream for both phases; a request cut before its answer says so (`length`, which the SDK's
parse turns into its LengthFinishReasonError); a schema the engine cannot compile is a 400
before any generation; logprobs with THOR on stay a 400 naming the field. A forced named function
comes back as `tool_calls` through instructor's TOOLS mode (tests/test_client_libraries.py);
`required` and the builders' rules are in tests/test_final_answer.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.support.openapi import validate
from thor_engine.models.provision import PRESETS

pytestmark = [pytest.mark.vllm, pytest.mark.sandbox, pytest.mark.slow]

MODEL = PRESETS["default"].name
QUESTION = "What is 123*457? Use Python."
ASK = [{"role": "user", "content": QUESTION}]
SAMPLING = {"temperature": 0, "seed": 7, "max_tokens": 400}


class Product(BaseModel):
    answer: int


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def reasoning_of(message: Any) -> str:
    extra = message.model_extra or {}
    return extra.get("reasoning_content") or extra.get("reasoning") or ""


def test_chat_parse_returns_the_pydantic_object_after_running_code(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Product, **SAMPLING)
    message = completion.choices[0].message
    assert message.parsed == Product(answer=56211), (message.content, reasoning_of(message)[-500:])
    assert json.loads(message.content) == {"answer": 56211}  # content is only the constrained answer
    assert completion.choices[0].finish_reason == "stop"
    reasoning = reasoning_of(message)
    assert "```python" in reasoning and "56211" in reasoning  # the code it ran and its output
    thor = completion.model_extra["thor"]["choices"][0]
    assert thor["tools"]["ok"] >= 1 and thor["finish_reason"] == "stop"
    usage = completion.usage
    assert usage.completion_tokens_details.reasoning_tokens > 0
    assert usage.completion_tokens > usage.completion_tokens_details.reasoning_tokens  # the answer's tokens


def test_responses_parse_returns_the_pydantic_object_with_code_interpreter_items(client):
    response = client.responses.parse(
        model=MODEL,
        input=QUESTION,
        text_format=Product,
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
        temperature=0,
        max_output_tokens=400,
    )
    assert response.status == "completed"
    assert response.output_parsed == Product(answer=56211)
    kinds = [item.type for item in response.output]
    assert "code_interpreter_call" in kinds and kinds[-1] == "message", kinds
    assert json.loads(response.output_text) == {"answer": 56211}
    calls = [item for item in response.output if item.type == "code_interpreter_call"]
    assert any("56211" in (out.logs or "") for call in calls for out in call.outputs or [])


def _stream(server, payload: dict[str, Any]) -> tuple[str, str, str | None]:
    content = reasoning = ""
    finish = None
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**payload, "stream": True}, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            validate(chunk, "CreateChatCompletionStreamResponse")
            for c in chunk["choices"]:
                content += c["delta"].get("content") or ""
                reasoning += c["delta"].get("reasoning_content") or c["delta"].get("reasoning") or ""
                finish = c["finish_reason"] or finish
    return content, reasoning, finish


def test_stream_equals_non_stream_for_both_phases(server):
    payload = {"model": MODEL, "messages": ASK, **SAMPLING, "response_format": {"type": "json_object"}}
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    message = body["choices"][0]["message"]
    json.loads(message["content"])
    content, reasoning, finish = _stream(server, payload)
    assert (content, finish) == (message["content"], body["choices"][0]["finish_reason"])
    assert reasoning == (message.get("reasoning_content") or message.get("reasoning"))


def test_a_request_cut_before_its_answer_says_so(client, server):
    payload = {
        "model": MODEL,
        "messages": ASK,
        "temperature": 0,
        "max_tokens": 24,
        "response_format": {"type": "json_object"},
    }
    body = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=300).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"]["content"], choice
    assert body["usage"]["completion_tokens"] <= 24
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Product, temperature=0, max_tokens=24)


def generated_tokens(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("thor_generated_tokens_total "))


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/v1/chat/completions",
         {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "response_format"),
        ("/v1/chat/completions",
         {"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
          "tool_choice": "required"},
         "tools"),
        ("/v1/responses", {"input": QUESTION, "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "bogus"}}}},
         "text.format"),
        ("/v1/chat/completions", {"messages": ASK, "logprobs": True, "response_format": {"type": "json_object"}}, "logprobs"),
    ],
)  # fmt: skip
def test_what_cannot_work_is_a_400_before_any_generation(server, path, extra, param):
    before = generated_tokens(server)
    budget = "max_tokens" if "messages" in extra else "max_output_tokens"
    r = httpx.post(server.url + path, json={"model": MODEL, budget: 400, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    validate(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param, r.json()
    assert generated_tokens(server) == before  # refused before the engine generated anything
