"""The constrained final answer (thor_engine/final_answer.py) in the decoder: phase 1 (the THOR
loop with the real sandbox) then phase 2 (the instruction injected, one request under the
structured-output constraint), with a scripted backend (real Qwen tokenizer, vLLM's stop and
EOS semantics) so every request's prompt and parameters can be checked exactly.

The constraint itself is vLLM's: tests/test_structured_answers.py runs it on the real engine.
"""

from __future__ import annotations

import json

import pytest

from server.metrics import ServerMetrics
from server.responses.builder import ResponsesBuilder
from server.responses.protocol import CreateResponseRequest
from server.thor.builder import ThorBuilder
from tests.support.scripted_backend import ScriptedBackend
from tests.test_decoder import fixed_model, prompt_ids
from thor_engine.config import SamplingOptions, ThorConfig
from thor_engine.decoder import ThorDecoder, collect, finals
from thor_engine.events import FinishReason, TextDelta
from thor_engine.final_answer import NON_EMPTY_OBJECT, FinalAnswer, call_answer, json_answer

pytestmark = pytest.mark.sandbox

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
PHASE1 = "Let me compute.\n```python\nprint(123*457)\n```\n```output\n56211\n```\nSo the product is \\boxed{56211}."
JSON = '{"answer": 56211}'
QUESTION = "What is 123*457?"


def two_phase_model(final: FinalAnswer, answer: str = JSON):
    """Writes PHASE1 and, once the instruction is in the prompt, `answer`."""
    phase1 = fixed_model(PHASE1)

    def respond(prompt: str) -> str:
        return answer if prompt.endswith(final.instruction) else phase1(prompt)

    return respond


async def run(tokenizer, executor, responder, final, cfg=None, max_tokens=600):
    backend = ScriptedBackend(tokenizer, responder)
    dec = ThorDecoder(backend, executor)
    sampling = SamplingOptions(max_tokens=max_tokens)
    events = await collect(dec.stream(prompt_ids(tokenizer), cfg or ThorConfig(), sampling, final=final))
    return backend, events


async def test_the_answer_continues_the_trajectory_under_the_constraint(tokenizer, executor):
    final = json_answer(SCHEMA, name="Product")
    backend, events = await run(tokenizer, executor, two_phase_model(final), final)
    *loop, last = backend.requests
    assert all(r.params.structured_outputs is None for r in loop) and len(loop) == 2  # code round, then answer
    assert last.params.structured_outputs == {"json": SCHEMA}
    # the same token trajectory: phase 1's tokens without the end-of-turn token, then the instruction
    assert last.prompt_token_ids[: len(loop[-1].prompt_token_ids)] == loop[-1].prompt_token_ids
    assert tokenizer.eos_token_id not in last.prompt_token_ids[len(prompt_ids(tokenizer)) :]
    assert last.prompt_text.endswith("\\boxed{56211}." + final.instruction)

    (fin,) = finals(events)
    assert fin.finish_reason is FinishReason.stop
    assert fin.answer_text == JSON and json.loads(fin.answer_text) == {"answer": 56211}
    assert fin.answer == "56211"  # THOR's own answer: phase 1's boxed one
    assert fin.text.endswith("\\boxed{56211}." + final.instruction + JSON)
    injected = [e for e in events if isinstance(e, TextDelta) and e.source == "injected"]
    assert "".join(e.text for e in injected) == final.instruction
    after = events[events.index(injected[-1]) + 1 :]
    answer = [e for e in after if isinstance(e, TextDelta)]
    assert "".join(e.text for e in answer) == JSON
    assert all(e.channel == "answer" and e.source == "model" and not e.retractable for e in answer)
    # usage: both phases, the instruction as injected tokens, the dropped end-of-turn as discarded
    instruction_tokens = len(tokenizer.encode(final.instruction, add_special_tokens=False))
    assert fin.usage.injected_tokens == instruction_tokens
    assert fin.usage.engine_requests == 3 and fin.usage.discarded_tokens == 1
    assert (
        fin.usage.completion_tokens
        == len(last.prompt_token_ids)
        - len(prompt_ids(tokenizer))
        + len(tokenizer.encode(JSON, add_special_tokens=False))
        + 1
    )  # phase 2's own end-of-turn


async def test_no_answer_phase_after_a_cut(tokenizer, executor):
    """Phase 1 cut by max_tokens: no constrained request; the response says it was cut."""
    final = json_answer(SCHEMA)
    backend, events = await run(tokenizer, executor, two_phase_model(final), final, max_tokens=12)
    assert all(r.params.structured_outputs is None for r in backend.requests)
    (fin,) = finals(events)
    assert fin.finish_reason is FinishReason.length
    assert not any(isinstance(e, TextDelta) and e.source == "injected" for e in events)


async def test_the_answer_phase_is_bounded_by_what_is_left(tokenizer, executor):
    """max_tokens spent in the answer: the constrained request asked only for what was left."""
    final = json_answer(SCHEMA)
    probe, _ = await run(tokenizer, executor, two_phase_model(final), final)
    used = len(probe.requests[-1].prompt_token_ids) - len(prompt_ids(tokenizer))
    backend, events = await run(tokenizer, executor, two_phase_model(final), final, max_tokens=used + 3)
    assert backend.requests[-1].params.structured_outputs == {"json": SCHEMA}
    assert backend.requests[-1].params.max_tokens == 3
    (fin,) = finals(events)
    assert fin.finish_reason is FinishReason.length and fin.usage.completion_tokens == used + 3


async def test_with_tools_off_the_answer_is_the_whole_output(tokenizer, executor):
    final = json_answer(None)
    backend, events = await run(
        tokenizer,
        executor,
        lambda prompt: '{"x": 1}',
        final,
        cfg=ThorConfig(max_tool_calls=0, on_tool_budget="continue"),
    )
    (req,) = backend.requests
    assert req.params.structured_outputs == {"json": NON_EMPTY_OBJECT}
    assert req.prompt_token_ids == prompt_ids(tokenizer)
    (fin,) = finals(events)
    assert fin.answer_text == '{"x": 1}' and fin.finish_reason is FinishReason.stop
    assert fin.usage.injected_tokens == 0


def test_instructions_name_the_shape():
    assert json_answer(None).structured_outputs == {"json": NON_EMPTY_OBJECT}
    assert "`Product`" in json_answer(SCHEMA, name="Product").instruction
    tools = [
        {"type": "function", "function": {"name": "submit", "parameters": SCHEMA}},
        {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
    ]
    named = call_answer(tools, {"type": "function", "function": {"name": "submit"}})
    assert named.structured_outputs == {"json": SCHEMA} and "`submit`" in named.instruction
    required = call_answer(tools, "required", parallel_tool_calls=False)
    assert required.structured_outputs["json"]["maxItems"] == 1
    assert "`submit`, `other`" in required.instruction
    with pytest.raises(ValueError, match="forces no call"):
        call_answer(tools, "auto")


# --- through the server's builders (chat and Responses): stream == non-stream, where each text goes ---


async def built(tokenizer, executor, responder, final, *, stream: bool, max_tokens: int = 600, forced=None):
    backend = ScriptedBackend(tokenizer, responder)
    dec = ThorDecoder(backend, executor)
    builder = ThorBuilder(
        kind="chat",
        response_id="x",
        model="m",
        n=1,
        reasoning_fields="reasoning_content",
        tools_enabled=True,
        reasoning_model=False,
        metrics=ServerMetrics(),
        include_usage=stream,
        forced_choice=forced,
        structured=True,
    )
    chunks = []
    async for ev in dec.stream(
        prompt_ids(tokenizer), ThorConfig(), SamplingOptions(max_tokens=max_tokens), final=final
    ):
        chunks.extend(builder.feed(ev))
    return chunks, builder


def streamed_message(chunks) -> dict:
    msg = {"content": "", "reasoning_content": "", "tool_calls": [], "finish_reason": None}
    for chunk in chunks:
        for c in chunk["choices"]:
            msg["content"] += c["delta"].get("content") or ""
            msg["reasoning_content"] += c["delta"].get("reasoning_content") or ""
            msg["tool_calls"] += c["delta"].get("tool_calls") or []
            msg["finish_reason"] = c["finish_reason"] or msg["finish_reason"]
    return msg


@pytest.mark.parametrize("case", ["json", "named-call", "required-call", "cut"])
async def test_chat_stream_equals_non_stream_and_content_is_only_the_answer(tokenizer, executor, case):
    tools = [{"type": "function", "function": {"name": "submit", "parameters": SCHEMA}}]
    forced = {"named-call": {"type": "function", "function": {"name": "submit"}}, "required-call": "required"}.get(case)
    final = call_answer(tools, forced) if forced else json_answer(SCHEMA)
    answer = '[{"name": "submit", "parameters": {"answer": 56211}}]' if case == "required-call" else JSON
    max_tokens = 12 if case == "cut" else 600
    chunks, _ = await built(tokenizer, executor, two_phase_model(final, answer), final, stream=True,
                            max_tokens=max_tokens, forced=forced)  # fmt: skip
    _, builder = await built(tokenizer, executor, two_phase_model(final, answer), final, stream=False,
                             max_tokens=max_tokens, forced=forced)  # fmt: skip
    body = builder.response()
    (choice,) = body["choices"]
    message = choice["message"]
    live = streamed_message(chunks)
    assert live["finish_reason"] == choice["finish_reason"]
    assert live["content"] == (message["content"] or "") and live["reasoning_content"] == message["reasoning_content"]
    assert [c["function"] for c in live["tool_calls"]] == [c["function"] for c in message.get("tool_calls", [])]
    if case == "cut":
        assert choice["finish_reason"] == "length" and not message["content"] and "tool_calls" not in message
        assert message["reasoning_content"]  # what phase 1 wrote is reasoning, never the answer
        return
    assert message["reasoning_content"].endswith("\\boxed{56211}." + final.instruction)
    assert "```python\nprint(123*457)\n```" in message["reasoning_content"]
    if case == "json":
        assert message["content"] == JSON and choice["finish_reason"] == "stop"
        # the answer streamed as generated (not held to the end): more than one content delta
        assert sum(1 for ch in chunks for c in ch["choices"] if c["delta"].get("content")) > 1
    else:
        assert message["content"] is None
        (call,) = message["tool_calls"]
        assert call["function"]["name"] == "submit" and json.loads(call["function"]["arguments"]) == {"answer": 56211}
        assert choice["finish_reason"] == ("stop" if case == "named-call" else "tool_calls")


async def test_responses_message_is_only_the_answer(tokenizer, executor):
    """The response is built from exactly the events the stream sent: one run checks both."""
    final = json_answer(SCHEMA)
    backend = ScriptedBackend(tokenizer, two_phase_model(final))
    dec = ThorDecoder(backend, executor)
    builder = ResponsesBuilder(
        response_id="resp_x",
        model="m",
        params=CreateResponseRequest(input=QUESTION, text={"format": {"type": "json_object"}}).response_fields(
            SamplingOptions(), tools_on=True, store=False
        ),
        tools_enabled=True,
        reasoning_model=False,
        metrics=ServerMetrics(),
        structured=True,
    )
    events = builder.opening()
    async for ev in dec.stream(prompt_ids(tokenizer), ThorConfig(), SamplingOptions(max_tokens=600), final=final):
        events += builder.feed(ev)
        events += builder.end_batch()
    response = builder.response()
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["reasoning", "code_interpreter_call", "reasoning", "message"], kinds
    assert response["output"][-1]["content"][0]["text"] == JSON
    last_reasoning = response["output"][2]["content"][0]["text"]
    assert last_reasoning.endswith("\\boxed{56211}." + final.instruction)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert deltas == JSON
