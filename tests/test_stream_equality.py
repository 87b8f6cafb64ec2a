"""Streaming equals non-streaming, and a plain client never sees discarded text (issue 7, S3).

Property: for chat and completions, with and without tools, with backtracks, for a plain and a
reasoning-style tokenizer, concatenating a stream's deltas gives exactly the non-stream message,
field by field; and text that self-correction discards never reaches the plain fields (no
retraction is ever needed by a client that ignores `thor` events).

Here: the decoder (scripted backend, real sandbox) through the server's `ThorBuilder`,
run twice (one stream, one not) per case. The same property on the real server (vLLM, tiny
TIR model, official `openai` SDK) is `tests/test_server.py::test_server_stream_equals_non_stream`.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from server.metrics import ServerMetrics
from server.thor.builder import ThorBuilder
from tests.support.scripted_backend import ScriptedBackend
from thor_engine.config import RepetitionConfig, SamplingOptions, SelfCorrectionConfig, ThorConfig
from thor_engine.decoder import ThorDecoder
from thor_engine.events import Final
from thor_engine.prompting import render_chat

pytestmark = pytest.mark.sandbox

ASSISTANT = "<|im_start|>assistant\n"


def done_text(prompt: str) -> str:
    return prompt.split(ASSISTANT)[-1]


def continuing(full: str) -> Callable[[str], str]:
    """A model that writes `full`, going on from wherever the trajectory stands (outputs aside)."""
    import re

    strip = re.compile(r"```output\n.*?\n```\n", re.S)
    target = strip.sub("", full)

    def respond(prompt: str) -> str:
        done = strip.sub("", done_text(prompt))
        return target[len(done) :] if target.startswith(done) else ""

    return respond


def self_correcting(first: str, second: str, after: str) -> Callable[[str], str]:
    """First attempt `first` (fails), every resample `second`, then `after` once an output is in."""
    attempts = {"n": 0}

    def respond(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return after
        attempts["n"] += 1
        full = first if attempts["n"] == 1 else second
        return full[len(done) :] if full.startswith(done) else full

    return respond


REASONING = "".join(f"Step {i}: think about the problem.\n" for i in range(12))

CASES: dict[str, tuple[Callable[[], Callable[[str], str]], dict, str | None]] = {
    # name: (responder factory, ThorConfig kwargs, text that must never reach a plain client)
    "one-call": (
        lambda: continuing("Compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\nSo \\boxed{42}."),
        {},
        None,
    ),
    "backtrack-tokens": (
        lambda: self_correcting(
            REASONING + "```python\nprint(1/0)\n```\n", REASONING + "```python\nprint(6*7)\n```\n", "Thus \\boxed{42}."
        ),
        {"self_correction": SelfCorrectionConfig(backtrack_tokens=20)},
        "1/0",
    ),
    "backtrack-step": (
        lambda: self_correcting(
            "Plan.\n\nBad idea here.\n\n```python\nprint(undefined_name)\n```\n",
            "Plan.\n\nGood idea.\n\n```python\nprint(5)\n```\n",
            "\\boxed{5}",
        ),
        {"self_correction": SelfCorrectionConfig(mode="step")},
        "Bad idea",
    ),
    "two-calls-and-stop": (
        lambda: continuing(
            "A.\n```python\nprint(1)\n```\n```output\n1\n```\nB.\n```python\n"
            "print(2)\n```\n```output\n2\n```\nAnswer \\boxed{2}. END more"
        ),
        {},
        "END",
    ),
    "no-code": (lambda: continuing("Just reasoning, no code.\n\nSo \\boxed{3}."), {}, None),
    "repetition": (  # the guard ends the loop after the call: the looping text is kept (as the answer)
        lambda: continuing("Compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\nSo " + "the answer is 42. " * 60),
        {"repetition": RepetitionConfig()},
        None,
    ),
}

THINK_CASES: dict[str, tuple[Callable[[], Callable[[str], str]], dict, str | None]] = {
    "think-tools": (
        lambda: continuing(
            "<think>\nLet me compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\n"
            "It is 42.\n</think>\n\nThe answer is \\boxed{42}."
        ),
        {},
        None,
    ),
    "think-backtrack": (
        lambda: self_correcting(
            "<think>\n" + REASONING + "```python\nprint(1/0)\n```\n",
            "<think>\n" + REASONING + "```python\nprint(6*7)\n```\n",
            "Fine.\n</think>\n\n\\boxed{42}",
        ),
        {"self_correction": SelfCorrectionConfig(backtrack_tokens=15)},
        "1/0",
    ),
    "think-budget": (lambda: continuing("<think>\n" + "hmm " * 200), {"thinking_budget": 40}, None),
}


async def build(
    tokenizer, executor, make_responder, cfg: ThorConfig, *, kind: str, tools: bool, stream: bool, n: int = 1
) -> tuple[list[dict], ThorBuilder, list[Final]]:
    backend = ScriptedBackend(tokenizer, make_responder())
    dec = ThorDecoder(backend, executor)
    if not tools:
        cfg = cfg.model_copy(update={"max_tool_calls": 0})
    builder = ThorBuilder(
        kind=kind,
        response_id="x",
        model="m",
        n=n,
        reasoning_fields="reasoning_content",
        tools_enabled=tools,
        reasoning_model=dec.reasoning_model,
        metrics=ServerMetrics(),
        include_usage=stream,
    )
    chunks: list[dict] = []
    finals: list[Final] = []
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    sampling = SamplingOptions(max_tokens=400, stop=("END",), temperature=0.5 if n > 1 else 0.0, seed=3)
    async for ev in dec.stream(prompt, cfg, sampling, n=n):
        if isinstance(ev, Final):
            finals.append(ev)
        chunks.extend(builder.feed(ev))
    return chunks, builder, sorted(finals, key=lambda f: f.sample)


def accumulate(chunks: list[dict], kind: str, n: int) -> list[dict[str, str]]:
    fields = [{"content": "", "reasoning": ""} for _ in range(n)]
    for chunk in chunks:
        assert "usage" in chunk  # include_usage: `usage` is on every chunk (null until the last)
        for choice in chunk["choices"]:
            f = fields[choice["index"]]
            if kind == "chat":
                f["content"] += choice["delta"].get("content") or ""
                f["reasoning"] += choice["delta"].get("reasoning_content") or ""
            else:
                f["content"] += choice["text"]
    return fields


def message_fields(body: dict, kind: str) -> list[dict[str, str]]:
    if kind == "chat":
        return [
            {"content": c["message"]["content"], "reasoning": c["message"].get("reasoning_content") or ""}
            for c in body["choices"]
        ]
    return [{"content": c["text"], "reasoning": ""} for c in body["choices"]]


async def check(tokenizer, executor, case, *, kind: str, tools: bool, n: int = 1) -> None:
    make, cfg_kw, never = case
    cfg = ThorConfig(**cfg_kw)
    chunks, _, finals = await build(tokenizer, executor, make, cfg, kind=kind, tools=tools, stream=True, n=n)
    _, body_builder, finals2 = await build(tokenizer, executor, make, cfg, kind=kind, tools=tools, stream=False, n=n)
    assert [f.text for f in finals] == [f.text for f in finals2]  # the two runs are the same trajectory
    streamed = accumulate(chunks, kind, n)
    assert streamed == message_fields(body_builder.response(), kind)
    for fields, final in zip(streamed, finals, strict=True):
        if never is not None and tools:
            assert never not in fields["content"] + fields["reasoning"]
        if kind == "completion":
            assert fields["content"] == final.text
        elif tools or body_builder.reasoning_model:
            assert fields["content"] == final.answer_text
            # nothing lost: every character of the trajectory is in one of the two fields
            # (think tags and the answer's leading whitespace aside)
            visible = final.text.replace("<think>", "").replace("</think>", "")
            assert sorted((fields["reasoning"] + fields["content"]).replace(" ", "").replace("\n", "")) == sorted(
                visible.replace(" ", "").replace("\n", "")
            )
        else:
            assert fields["content"] == final.text


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kind,tools", [("chat", True), ("chat", False), ("completion", True)])
async def test_stream_equals_non_stream(tokenizer, executor, name, kind, tools):
    await check(tokenizer, executor, CASES[name], kind=kind, tools=tools)


@pytest.mark.parametrize("name", sorted(THINK_CASES))
@pytest.mark.parametrize("kind,tools", [("chat", True), ("chat", False), ("completion", True)])
async def test_stream_equals_non_stream_reasoning_model(think_tokenizer, executor, name, kind, tools):
    await check(think_tokenizer, executor, THINK_CASES[name], kind=kind, tools=tools)


async def test_stream_equals_non_stream_n2(tokenizer, executor):
    await check(tokenizer, executor, CASES["backtrack-tokens"], kind="chat", tools=True, n=2)


async def test_answer_is_not_sent_twice(tokenizer, executor):
    chunks, _, [_final] = await build(
        tokenizer, executor, CASES["one-call"][0], ThorConfig(), kind="chat", tools=True, stream=True
    )
    [fields] = accumulate(chunks, "chat", 1)
    assert fields["content"] == "So \\boxed{42}."
    assert "boxed" not in fields["reasoning"]
    assert fields["reasoning"] == "Compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\n"


def test_plain_completion_logprob_offsets_do_not_depend_on_chunking() -> None:
    """Plain /v1/completions: the engine groups tokens into chunks as timing allows, and a
    chunk's text can lag its tokens (the detokeniser holds a lone space or a partial character
    back). The logprobs, offsets included, must not depend on that grouping, or a stream and
    the same request without streaming disagree."""
    from server.completions.plain import PlainCompletionBuilder
    from thor_engine.engine import PlainChunk

    tokens = [(" ", -1.5, [(" ", -1.5)]), ("3", -0.1, [("3", -0.1)]), ("36", -0.2, [("36", -0.2)])]
    held_back = [
        PlainChunk(0, "", logprobs=tokens[:1], completion_tokens=1),
        PlainChunk(0, " 3", logprobs=tokens[1:2], completion_tokens=2),
        PlainChunk(0, "36", finished=True, finish_reason="length", logprobs=tokens[2:], completion_tokens=3),
    ]
    together = [PlainChunk(0, " 336", finished=True, finish_reason="length", logprobs=tokens, completion_tokens=3)]

    def run(chunks: list[PlainChunk]) -> tuple[dict, list[dict]]:
        builder = PlainCompletionBuilder(
            response_id="cmpl-1", model="m", n=1, prompt_tokens=4, logprobs=1, metrics=ServerMetrics()
        )
        sent = [chunk for c in chunks for chunk in builder.feed(c)]
        return builder.response(), sent

    split_body, split_stream = run(held_back)
    whole_body, _ = run(together)
    assert split_body["choices"] == whole_body["choices"]
    assert whole_body["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2]
    assert split_body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    # the stream's chunks, concatenated, are the non-stream choice
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in split_stream:
        for k, v in chunk["choices"][0]["logprobs"].items():
            streamed[k] += v
    assert streamed == split_body["choices"][0]["logprobs"]
    assert "".join(c["choices"][0]["text"] for c in split_stream) == split_body["choices"][0]["text"] == " 336"


CALL_TURN = (
    "Compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\nSending it.\n"
    '<tool_call>\n{"name": "send_answer", "arguments": {"value": 42}}\n'
)


async def client_call_turn(
    tokenizer, executor, text: str, *, stream: bool, offered: tuple[str, ...] = ("send_answer",), max_tokens: int = 400
) -> tuple[dict, list[dict], Final]:
    """A THOR turn with client functions `offered` (tool_choice auto) where the model writes `text`:
    the non-stream body and the stream chunks, through the server's builder."""
    from thor_engine.function_calls import TOOL_CALL_END, FunctionCallParser

    dec = ThorDecoder(ScriptedBackend(tokenizer, continuing(text)), executor)
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
        function_calls=FunctionCallParser(tokenizer),
        function_names=offered,
    )
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7? Send it."}])
    sampling = SamplingOptions(max_tokens=max_tokens, stop=(TOOL_CALL_END,), temperature=0.0)
    chunks = [c for ev in [e async for e in dec.stream(prompt, ThorConfig(), sampling)] for c in builder.feed(ev)]
    return builder.response(), chunks, builder.choices[0].final


def completion_ids(final: Final) -> list[int]:
    return [t for seg in final.trajectory["segments"] if seg["kind"] != "prompt" for t in seg["token_ids"]]


@pytest.mark.parametrize("stream", [True, False])
async def test_client_function_call_ends_a_thor_turn(tokenizer, executor, stream):
    """THOR on with client functions: the model runs its Python, then calls a client function;
    the call (up to the `</tool_call>` stop string) becomes `tool_calls`, never `content`."""
    from thor_engine.function_calls import TOOL_CALL_END

    text = CALL_TURN + TOOL_CALL_END + " junk"
    body, chunks, _ = await client_call_turn(tokenizer, executor, text, stream=stream)
    message = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    [tc] = message["tool_calls"]
    assert tc["type"] == "function" and tc["function"]["name"] == "send_answer"
    assert json.loads(tc["function"]["arguments"]) == {"value": 42}
    assert message["content"] == "Sending it."
    assert "```output\n42\n```" in message["reasoning_content"]
    assert body["thor"]["choices"][0]["tool_calls"][0]["stdout"] == "42\n"  # the Python ran server-side
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == "Sending it."  # the call's text never reached content
    [sent] = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert [{k: v for k, v in t.items() if k != "index"} for t in sent] == message["tool_calls"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("case", ["not_offered", "cut_by_max_tokens"])
async def test_only_finished_calls_to_offered_functions_are_tool_calls(tokenizer, executor, case):
    """Mixed mode reports a client call only when the model finished it (not a call that
    max_tokens cut right after its JSON, which vLLM's parser would still read) and only to a
    function the request offered (a model may name any); otherwise the text stays the answer."""
    from thor_engine.function_calls import TOOL_CALL_END

    if case == "not_offered":
        text = CALL_TURN + TOOL_CALL_END
        body, chunks, _ = await client_call_turn(tokenizer, executor, text, stream=True, offered=("f",))
        finish = "stop"
    else:
        # max_tokens ends the turn right after the call's JSON, before the model could close it
        text = CALL_TURN + "more" + TOOL_CALL_END
        _, _, whole = await client_call_turn(tokenizer, executor, text, stream=True)
        ids = completion_ids(whole)
        cut = next(k for k in range(len(ids)) if "42}}" in tokenizer.decode(ids[:k]))
        body, chunks, _ = await client_call_turn(tokenizer, executor, text, stream=True, max_tokens=cut)
        finish = "length"
    choice = body["choices"][0]
    assert body["thor"]["choices"][0]["tool_calls"][0]["stdout"] == "42\n"  # the Python still ran
    assert choice["finish_reason"] == finish and "tool_calls" not in choice["message"], choice
    assert choice["message"]["content"].startswith('Sending it.\n<tool_call>\n{"name": "send_answer"')
    assert choice["message"]["content"].rstrip().endswith('"arguments": {"value": 42}}')
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == choice["message"]["content"]
