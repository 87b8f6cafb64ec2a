"""The repetition guard (`ThorConfig.repetition`): a looping trajectory ends early with
finish_reason `repetition`, its text kept; everything else is untouched.

The detector alone on synthetic ids (its thresholds exactly, a rebuild from a tail); the
decoder with the scripted backend (real Qwen tokenizer) and the real sandbox; the server's
builders (chat, completions, Responses) and the `thor` request option.
"""

from __future__ import annotations

import re

import pytest

from server.protocol import ThorOptions
from server.settings import ServerSettings
from tests.support.scripted_backend import ScriptedBackend
from tests.test_responses_stream import run as run_responses
from tests.test_stream_equality import CASES, build
from thor_engine.config import RepetitionConfig, SamplingOptions, SelfCorrectionConfig, ThorConfig
from thor_engine.decoder import ThorDecoder, collect, finals
from thor_engine.events import Backtrack, Final, FinishReason, TextDelta, ToolCall
from thor_engine.prompting import render_chat
from thor_engine.repetition import RepetitionDetector

ASSISTANT = "<|im_start|>assistant\n"
GUARD = ThorConfig(repetition=RepetitionConfig())
LOOP = "Let me think about 6*7.\n" + "The answer is 42. " * 150
PLAIN = "".join(f"Step {i}: multiply {i} by {i + 1} to get {i * (i + 1)}.\n" for i in range(25)) + "So \\boxed{42}."


def done_text(prompt: str) -> str:
    return prompt.split(ASSISTANT)[-1]


def continuing(full: str):
    """A model that writes `full`, going on from wherever the trajectory stands (outputs aside)."""
    strip = re.compile(r"```output\n.*?\n```\n", re.S)
    target = strip.sub("", full)

    def respond(prompt: str) -> str:
        done = strip.sub("", done_text(prompt))
        return target[len(done) :] if target.startswith(done) else ""

    return respond


async def run(tokenizer, executor, responder, cfg=GUARD, sampling=None, **kw):
    backend = ScriptedBackend(tokenizer, responder)
    dec = ThorDecoder(backend, executor)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    events = await collect(dec.stream(prompt, cfg, sampling or SamplingOptions(max_tokens=600), **kw))
    return backend, events


def streamed(events, sample: int = 0) -> str:
    out = ""
    for e in events:
        if isinstance(e, TextDelta) and e.sample == sample:
            out += e.text
        elif isinstance(e, Backtrack) and e.sample == sample:
            out = out[: len(out) - e.chars_retracted]
    return out


def comparable(events) -> list[dict]:
    """Events as dicts without wall-clock durations (the only thing two identical runs differ in)."""
    out = []
    for e in events:
        d = e.model_dump()
        d.pop("duration_s", None)
        if isinstance(e, Final):
            d["tools"].pop("duration_s")
        out.append(d)
    return out


# --- the detector alone ----------------------------------------------------------------------


def first_trip(cfg: RepetitionConfig, ids: list[int]) -> int | None:
    det = RepetitionDetector(cfg)
    for k, t in enumerate(ids):
        if det.push(t):
            return k + 1
    return None


def test_trips_exactly_at_min_span_and_min_repeats():
    cfg = RepetitionConfig(min_repeats=4, max_period=200, min_span_tokens=64)
    head = [1000 + i for i in range(10)]  # no repeat
    # a 3-token cycle: 4 copies are not enough, 64 tokens are
    assert first_trip(cfg, head + [1, 2, 3] * 30) == 10 + 64
    # a 40-token unit: 64 tokens are not enough, 4 copies are
    unit = list(range(40))
    assert first_trip(cfg, head + unit * 6) == 10 + 160
    # one token short of either never trips
    assert first_trip(cfg, head + [1, 2, 3] * 21) is None  # 63 tokens
    assert first_trip(cfg, head + unit * 4) == 10 + 160
    assert first_trip(cfg, head + unit * 3 + unit[:39]) is None
    # a unit longer than max_period is not caught
    assert first_trip(RepetitionConfig(max_period=30), unit * 10) is None
    # a broken cycle starts counting again
    assert first_trip(cfg, [1, 2, 3] * 20 + [9] + [1, 2, 3] * 20) is None


def test_tripped_reports_the_shortest_unit():
    det = RepetitionDetector(RepetitionConfig(min_span_tokens=32))
    assert det.feed([7, 8] * 16)
    assert det.tripped == (2, 32)


def test_rebuild_from_a_tail_decides_as_the_whole_sequence():
    """reset(prefix) replays only the prefix's last `window` tokens, yet the detector then trips
    exactly where one fed the whole sequence from the start does (and never during the replay)."""
    import random

    cfg = RepetitionConfig(min_repeats=3, max_period=20, min_span_tokens=30)
    rng = random.Random(5)
    for _ in range(30):
        seq: list[int] = []
        while len(seq) < 400:  # varied text with loops that stop just short of the thresholds
            seq += [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
            unit = [rng.randrange(1000) for _ in range(rng.randrange(1, 21))]
            need = max(3 * len(unit), 30)
            seq += (unit * need)[: need - 1]
        unit = [rng.randrange(1000) for _ in range(rng.randrange(1, 21))]
        seq += unit * 40  # the loop that trips
        whole = first_trip(cfg, seq)
        assert whole is not None and whole > 400
        for cut in (1, 59, 60, 61, 200, rng.randrange(300, whole)):
            det = RepetitionDetector(cfg)
            det.reset(seq[:cut])
            assert det.window == 60 and det.tripped is None
            rest = [det.push(t) for t in seq[cut:]]
            assert cut + rest.index(True) + 1 == whole


def test_ordinary_text_never_trips(tokenizer):
    """This repository's own prose and code (tens of thousands of tokens) hold no loop."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = ["README.md", *sorted(str(p.relative_to(root)) for p in (root / "docs").glob("*.md"))]
    files += ["thor_engine/decoder.py", "server/thor/builder.py"]
    text = "".join((root / p).read_text() for p in files)
    det = RepetitionDetector(RepetitionConfig())
    assert not det.feed(tokenizer.encode(text))


# --- the decoder -----------------------------------------------------------------------------


@pytest.mark.sandbox
async def test_loop_trips_aborts_the_request_and_keeps_its_text(tokenizer, executor):
    backend, events = await run(tokenizer, executor, continuing(LOOP))
    [final] = finals(events)
    assert final.finish_reason is FinishReason.repetition
    assert LOOP.startswith(final.text) and final.text.count("The answer is 42.") >= 8  # the loop is kept
    assert streamed(events) == final.text  # every kept character was streamed
    model_tokens = len(tokenizer.encode(final.text))
    assert final.usage.completion_tokens == final.usage.generated_tokens == final.usage.model_tokens
    assert model_tokens - 2 <= final.usage.completion_tokens <= 64 + 20  # stopped right after 64 looping tokens
    assert final.usage.engine_requests == 1 and backend.requests[0].aborted  # the engine request was aborted
    # off (the default), the same model runs to max_tokens
    _, events = await run(tokenizer, executor, continuing(LOOP), ThorConfig())
    [final] = finals(events)
    assert final.finish_reason is FinishReason.length and final.usage.completion_tokens == 600


@pytest.mark.sandbox
async def test_no_loop_same_events_as_guard_off(tokenizer, executor):
    """A long trajectory with a tool call and no loop: the guard changes nothing at all."""
    full = "Compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\n" + PLAIN
    _, on = await run(tokenizer, executor, continuing(full), GUARD)
    _, off = await run(tokenizer, executor, continuing(full), ThorConfig())
    [final] = finals(on)
    assert final.finish_reason is FinishReason.stop and final.usage.completion_tokens > 600 // 2
    assert comparable(on) == comparable(off)


@pytest.mark.sandbox
async def test_short_loops_do_not_trip(tokenizer, executor):
    """Repeats below min_span_tokens (a rule of `=`, a short chant) are text, not a loop."""
    full = "Header\n" + "= " * 20 + "\nha ha ha ha ha ha ha ha\n" + PLAIN
    _, events = await run(tokenizer, executor, continuing(full))
    [final] = finals(events)
    assert final.finish_reason is FinishReason.stop and final.text == full
    # the same text trips with a lower min_span_tokens: the threshold is what keeps it
    cfg = ThorConfig(repetition=RepetitionConfig(min_span_tokens=8))
    _, events = await run(tokenizer, executor, continuing(full), cfg)
    assert finals(events)[0].finish_reason is FinishReason.repetition


@pytest.mark.sandbox
async def test_loop_inside_a_code_block_trips(tokenizer, executor):
    full = "Compute.\n```python\nx = 1\n" + "x = x + 1\n" * 100 + "print(x)\n```\n\\boxed{101}"
    _, events = await run(tokenizer, executor, continuing(full))
    [final] = finals(events)
    assert final.finish_reason is FinishReason.repetition and final.tools.calls == 0
    assert full.startswith(final.text) and not any(isinstance(e, ToolCall) for e in events)


@pytest.mark.sandbox
async def test_loop_over_many_engine_requests_trips(tokenizer, executor):
    """Non-code blocks end each engine request at their closing fence: the loop spans requests."""
    full = "Table:\n" + "```\n| a | b |\n```\n" * 40
    _, events = await run(tokenizer, executor, continuing(full))
    [final] = finals(events)
    assert final.finish_reason is FinishReason.repetition and full.startswith(final.text)
    assert 4 < final.usage.engine_requests < 15 and final.usage.completion_tokens < 64 + 20


@pytest.mark.sandbox
async def test_discarded_attempts_do_not_count(tokenizer, executor):
    """The model retries the same failing step again and again: the attempts are identical, but
    each is discarded before the next, so the kept trajectory never loops (a detector that saw
    the discarded tokens would find 7 copies of one unit)."""
    attempt = "Check it again. Check it again. Check it again.\n```python\nprint(6/0)\n```\n"

    def responder(prompt: str) -> str:
        done = done_text(prompt)
        if "```output" in done:
            return "So \\boxed{42}."
        full = "Intro.\n\n" + attempt
        return full[len(done) :] if full.startswith(done) else full

    sc = SelfCorrectionConfig(mode="step", max_retries=6)
    cfg = ThorConfig(self_correction=sc, repetition=RepetitionConfig())
    _, events = await run(tokenizer, executor, responder, cfg)
    [final] = finals(events)
    assert final.tools.backtracks == 6 and final.tools.calls == 7  # seven identical attempts, six discarded
    assert final.usage.discarded_tokens > 4 * 20
    assert final.finish_reason is FinishReason.stop and final.answer == "42"


@pytest.mark.sandbox
async def test_kept_text_before_a_backtrack_still_counts(tokenizer, executor):
    """A backtrack rewinds the detector to the kept text, not to nothing: a loop that the kept
    text began and the resample continues trips within fewer than min_span_tokens new tokens."""
    unit = "The answer is 42.\n"
    tries = {"n": 0}

    def responder(prompt: str) -> str:
        tries["n"] += 1
        if tries["n"] == 1:
            return unit * 8 + "```python\nprint(1/0)\n```\n"  # 48 tokens of loop: below the span
        return unit * 40

    cfg = ThorConfig(self_correction=SelfCorrectionConfig(backtrack_tokens=0), repetition=RepetitionConfig())
    backend, events = await run(tokenizer, executor, responder, cfg)
    [final] = finals(events)
    [bt] = [e for e in events if isinstance(e, Backtrack)]
    assert final.finish_reason is FinishReason.repetition
    kept_before = len(backend.requests[1].prompt_token_ids) - len(backend.requests[0].prompt_token_ids)
    resampled = final.usage.completion_tokens - kept_before
    assert kept_before >= 40 and 0 < resampled < 64
    assert bt.tokens_dropped > 0 and backend.requests[1].aborted


@pytest.mark.sandbox
async def test_each_sample_has_its_own_detector(tokenizer, executor):
    backend: ScriptedBackend | None = None

    def responder(prompt: str) -> str:
        assert backend is not None
        sample = int(backend.requests[-1].request_id.split("-")[-2])  # "{rid}-{sample}-{k}"
        return (LOOP if sample == 0 else PLAIN)[len(done_text(prompt)) :]

    backend = ScriptedBackend(tokenizer, responder)
    dec = ThorDecoder(backend, executor)
    prompt = render_chat(tokenizer, [{"role": "user", "content": "What is 6*7?"}])
    sampling = SamplingOptions(max_tokens=900, temperature=0.5, seed=1)
    events = await collect(dec.stream(prompt, GUARD, sampling, n=2, vote=True))
    f0, f1 = finals(events)
    assert f0.finish_reason is FinishReason.repetition and LOOP.startswith(f0.text)
    assert f1.finish_reason is FinishReason.stop and f1.text == PLAIN and f1.answer == "42"
    assert streamed(events, 0) == f0.text and streamed(events, 1) == f1.text


# --- the server ----------------------------------------------------------------------------


@pytest.mark.sandbox
@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_builder_reports_length_and_thors_reason(tokenizer, executor, kind):
    make = lambda: continuing(LOOP)  # noqa: E731
    for stream in (True, False):
        chunks, builder, [final] = await build(tokenizer, executor, make, GUARD, kind=kind, tools=True, stream=stream)
        assert final.finish_reason is FinishReason.repetition
        if stream:
            choices = [c for ch in chunks for c in ch["choices"]]
            assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
            thor = [c.get("thor") or c.get("delta", {}).get("thor") for c in choices]
            answers = [t for t in thor if t and t["type"] == "answer"]
            assert [t["finish_reason"] for t in answers] == ["repetition"]
        else:
            body = builder.response()
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["thor"]["choices"][0]["finish_reason"] == "repetition"
            text = body["choices"][0]["message"]["content"] if kind == "chat" else body["choices"][0]["text"]
            assert "The answer is 42. The answer is 42." in text  # the loop is shown, not cut out


@pytest.mark.sandbox
async def test_responses_api_is_incomplete_like_max_output_tokens(tokenizer, executor):
    events, body, final = await run_responses(tokenizer, executor, lambda: continuing(LOOP), GUARD, tools=True)
    assert final.finish_reason is FinishReason.repetition
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["thor"]["finish_reason"] == "repetition"
    assert events[-1]["type"] == "response.incomplete"


def test_stream_equality_cases_include_a_loop():
    assert CASES["repetition"][1] == {"repetition": RepetitionConfig()}


@pytest.mark.parametrize(
    "thor,base,expected",
    [
        ({}, None, None),
        ({"repetition": True}, None, RepetitionConfig()),
        ({"repetition": False}, RepetitionConfig(min_repeats=3), None),
        ({}, RepetitionConfig(min_repeats=3), RepetitionConfig(min_repeats=3)),
        ({"repetition": True}, RepetitionConfig(min_repeats=3), RepetitionConfig(min_repeats=3)),
        ({"repetition": {"max_period": 50}}, None, RepetitionConfig(max_period=50)),
        (
            {"repetition": {"min_span_tokens": 100}},
            RepetitionConfig(min_repeats=3),
            RepetitionConfig(min_repeats=3, min_span_tokens=100),
        ),
    ],
)
def test_thor_option_to_config(thor, base, expected):
    cfg = ThorOptions.model_validate(thor).to_config(ThorConfig(repetition=base))
    assert cfg.repetition == expected


@pytest.mark.parametrize("bad", [{"min_repeats": 1}, {"max_period": 0}, {"max_period": 1001}, {"nope": 1}, "maybe"])
def test_thor_option_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        ThorOptions.model_validate({"repetition": bad})


def test_server_default(monkeypatch):
    monkeypatch.delenv("THOR_REPETITION_GUARD", raising=False)
    assert ServerSettings().thor.repetition is None
    monkeypatch.setenv("THOR_REPETITION_GUARD", "true")
    assert ServerSettings().thor.repetition == RepetitionConfig()
