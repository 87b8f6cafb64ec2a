"""API fuzzing with schemathesis from OpenAI's published OpenAPI document, against the live
server (real `python -m server`, real vLLM CPU engine with the tiny TIR model, real sandbox).

Only the operations this server serves: POST /chat/completions, POST /completions,
POST /responses, GET /responses/{response_id} and GET /models. Requests that fit the spec (positive) and requests that break it (negative)
are generated with a fixed Hypothesis seed and a bounded number of examples, so the run is
reproducible and stays within a couple of minutes. Properties: no response is a 5xx, every
error body is in OpenAI's shape (`ErrorResponse` of the same spec), every success is the
operation's JSON object or an SSE stream ending in `data: [DONE]` (the Responses API: in
its `response.completed` or `response.incomplete` event).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.modes import GenerationMode

from tests.support.openapi import validate, validate_response_event
from tests.support.shared_data import schema_path
from tests.support.thor_server import run_server, tiny_server_args

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.sandbox]

MODEL = "tiny-tir"

# (path, method, examples per generation mode): bounded so the whole file runs in ~2 minutes
OPERATIONS = [
    ("/chat/completions", "POST", {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 40}),
    ("/completions", "POST", {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 30}),
    ("/responses", "POST", {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 30}),
    ("/responses/{response_id}", "GET", {GenerationMode.POSITIVE: 5, GenerationMode.NEGATIVE: 5}),
    ("/models", "GET", {GenerationMode.POSITIVE: 5, GenerationMode.NEGATIVE: 5}),
]
#: the types of the Responses stream events the run produced (the test's coverage, in its failure messages)
RESPONSE_EVENTS: Counter[str] = Counter()
SUCCESS_OBJECT = {
    "/chat/completions": "chat.completion",
    "/completions": "text_completion",
    "/responses": "response",
    "/models": "list",
}


@pytest.fixture(scope="module")
def server(tiny_tir_model, sandbox):
    # small budgets keep each generated request quick; the limits are part of what is fuzzed
    env = {"THOR_DEFAULT_MAX_TOKENS": "16", "THOR_MAX_REQUEST_TOKENS": "256", "THOR_MAX_REQUEST_BODY_BYTES": "262144"}
    args = tiny_server_args(tiny_tir_model, MODEL, sandbox_url=sandbox.url, max_model_len=1024)
    with run_server(args, env=env) as srv:
        yield srv


#: schemathesis stops reading an event stream after 20 events by default (its guard against endless
#: streams), which cut a long but well-formed Responses stream before its terminal event; ours end
MAX_STREAM_EVENTS = 100_000


@pytest.fixture(scope="module")
def openai_schema():
    config = SchemathesisConfig.from_dict({"max-stream-events": MAX_STREAM_EVENTS})
    return schemathesis.openapi.from_path(str(schema_path("openai-openapi.yaml")), config=config)


def check_response(path: str, response) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["message"] and body["error"]["type"], body
        return
    assert status == 200, status
    assert not response.stream_cut_short, "the client stopped reading the stream (events or time limit): not judged"
    ctype = response.headers.get("content-type") or [""]  # schemathesis keeps every header as a list
    if (ctype[0] if isinstance(ctype, list) else ctype).startswith("text/event-stream"):
        events = [ln for ln in response.text.split("\n\n") if ln.strip()]
        if path == "/responses":  # named events, no sentinel: the last is the response's end (or an error)
            data = [json.loads(ev.split("data: ", 1)[1]) for ev in events if not ev.startswith(":")]
            for ev in data:  # every event (an `error` event included) is one of the spec's, in its shape
                validate_response_event(ev)
            assert data[-1]["type"] in ("response.completed", "response.incomplete", "response.failed"), events[-3:]
            assert [ev["sequence_number"] for ev in data] == list(range(len(data))), events[:3]
            RESPONSE_EVENTS.update(ev["type"] for ev in data)
            return
        assert events[-1] == "data: [DONE]", events[-3:]
        for ev in events[:-1]:
            if ev.startswith(":"):  # SSE comments (keep-alives)
                continue
            chunk = json.loads(ev.split("data: ", 1)[1])
            if "error" in chunk:  # a failed stream reports in-band, in OpenAI's shape, never a 5xx status
                validate(chunk, "ErrorResponse")
        return
    assert response.json()["object"] == SUCCESS_OBJECT[path], response.text[:300]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("path,method,examples", OPERATIONS, ids=[f"{m} {p}" for p, m, _ in OPERATIONS])
def test_openai_spec_fuzzing_never_5xx(server, openai_schema, path, method, examples, mode):
    operation = openai_schema[path][method]
    statuses: Counter[int] = Counter()
    reasons: Counter[str] = Counter()

    @settings(
        max_examples=examples[mode],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode), ours=st.booleans(), plain=st.booleans())
    def run(case, ours, plain):
        # half the bodies name the served model and (completions) carry one text prompt, so that
        # generation is reached, not only the model check and the batched-prompt refusal; half of
        # those (chat) carry one plain user message, so the other fields reach generation too
        # (generated messages are mostly refused: content parts and roles this server does not take)
        if ours and path == "/responses" and isinstance(case.body, dict):
            # `model` is optional here: name it, and drop what only refuses (no other tool types,
            # no server-side conversations), so half the bodies reach generation
            case.body["model"] = MODEL
            for field in ("conversation", "prompt", "tools", "tool_choice", "background", "top_p", "truncation"):
                case.body.pop(field, None)
            if plain or not case.body.get("input"):
                case.body["input"] = "Compute 17*23."
        elif ours and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
            if path == "/completions" and not isinstance(case.body.get("prompt"), str):
                case.body["prompt"] = "I will compute"
            if path == "/chat/completions" and plain:
                case.body["messages"] = [{"role": "user", "content": "Compute 17*23."}]
        response = case.call(base_url=server.url + "/v1", timeout=120)
        statuses[response.status_code] += 1
        check_response(path, response)
        if response.status_code >= 400:
            reasons[response.json()["error"]["message"][:80]] += 1

    run()
    if mode is GenerationMode.POSITIVE and method == "POST":
        assert statuses[200] > 0, f"no request reached generation: {dict(statuses)}; {reasons.most_common(8)}"
