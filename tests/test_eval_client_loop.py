"""The evaluation harness's client-side THOR loop over `/v1/completions` (trainer/evaluate/client_loop.py).

Against two real endpoints serving the tiny TIR model: a plain vLLM OpenAI server
(`python -m vllm.entrypoints.openai.api_server`) and our THOR server's plain completions.
On both, `ClientLoopTarget` runs the memorised problems through the real decoder and the
real sandbox and must give what the in-process decoder gives on this model (greedy: the
memorised completion, its tool calls and observations; tests/test_tiny_tir_model.py
checks the in-process side). Also: our server's `return_token_ids` output equals vLLM's,
closing a stream aborts the request on vLLM, and the clear errors of an endpoint that
refuses token ids or does not answer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.thor_server import TINY_SERVED
from tests.support.tiny_tir_model import TIR_PROBLEMS, TirProblem
from tests.support.vllm_server import free_port, vllm_process, wait_healthy
from thor_engine.backend import GenParams
from thor_engine.config import SamplingOptions
from trainer.evaluate.client_loop import ClientLoopTarget, open_client_loop
from trainer.evaluate.modes import MODES
from trainer.evaluate.remote_backend import NO_TOKEN_IDS, ClientLoopUnavailable, CompletionsBackend
from trainer.evaluate.targets import Generation, TargetError

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.sandbox]

PROBLEMS = [p for p in TIR_PROBLEMS if p.kind in ("single", "two_call")]
SERVED = TINY_SERVED  # our server's name for the model (the shared tiny_server); vLLM serves it under its path


@dataclass
class Endpoints:
    vllm: str  # plain vLLM, model id = the model directory
    thor: str  # our THOR server, model "tiny"
    vllm_log: Path  # vLLM's log (it logs each abort: --enable-log-requests)


@pytest.fixture(scope="module")
def endpoints(request: pytest.FixtureRequest, tiny_tir_model: Path) -> Iterator[Endpoints]:
    """Plain vLLM, started here, and our THOR server (the session's shared `tiny_server`, which
    starts while vLLM loads if it is not up yet)."""
    with vllm_process(tiny_tir_model) as (vllm_url, proc, log_path):
        thor = request.getfixturevalue("tiny_server")
        wait_healthy(vllm_url, proc, log_path)
        yield Endpoints(vllm=vllm_url, thor=thor.url, vllm_log=log_path)


async def _run_problems(target: ClientLoopTarget) -> list[Generation]:
    mode = MODES["thor"]
    return await asyncio.gather(
        *(target.generate(mode, mode.messages(p.prompt), SamplingOptions(max_tokens=256)) for p in PROBLEMS)
    )


def _assert_memorised(p: TirProblem, gen: Generation) -> None:
    """What the in-process decoder gives on this model (test_tiny_tir_model): the memorised trajectory,
    each code block run for real in the sandbox, its observation injected, the answer extracted."""
    assert gen.text == p.completion, p.name
    assert gen.answer == p.answer, p.name
    assert gen.finish_reason == "stop", p.name
    assert [c.code for c in gen.tool_calls] == p.code_blocks, p.name
    assert [c.observation for c in gen.tool_calls] == p.observations, p.name
    assert [c.call for c in gen.tool_calls] == list(range(p.rounds)), p.name
    for c in gen.tool_calls:
        assert c.ok and c.committed and c.outcome == "ok" and c.language == "python", (p.name, c)
        assert c.duration_s > 0, (p.name, c)  # a sandbox run took place
    assert gen.tools.calls == gen.tools.ok == p.rounds and gen.tools.failed == gen.tools.backtracks == 0, p.name
    u = gen.usage
    assert u.discarded_tokens == 0 and 0 < u.generated_tokens < u.completion_tokens, (p.name, u)
    assert u.observation_tokens > 0 and u.prompt_tokens > 0, (p.name, u)


async def test_client_loop_on_plain_vllm(endpoints: Endpoints, sandbox, tiny_tir_model: Path) -> None:
    # no tokenizer given: vLLM reports the model's directory, which is on this machine
    async with open_client_loop(endpoints.vllm, sandbox_url=sandbox.url) as target:
        assert target.kind == "openai-completions" and target.model == tiny_tir_model.name
        # every mode but a JSON answer (this loop sends no structured-output constraint)
        assert {m.name for m in MODES.values() if not target.supports(m)} == {"thor-json", "json"}
        assert target.engine.max_model_len == 2048  # from vLLM's /v1/models
        gens = await _run_problems(target)
    for p, gen in zip(PROBLEMS, gens, strict=True):
        _assert_memorised(p, gen)


async def test_client_loop_on_thor_plain_completions(endpoints: Endpoints, sandbox, tiny_tir_model: Path) -> None:
    async with open_client_loop(
        endpoints.thor, model=SERVED, tokenizer=str(tiny_tir_model), sandbox_url=sandbox.url
    ) as target:
        assert target.model == SERVED
        gens = await _run_problems(target)
    for p, gen in zip(PROBLEMS, gens, strict=True):
        _assert_memorised(p, gen)


def _collect_stream(url: str, body: dict) -> tuple[list[dict], str]:
    """The choices of each stream chunk, and the raw stream."""
    choices, raw = [], []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            raw.append(line)
            if line.startswith("data: ") and line != "data: [DONE]":
                choices += httpx.Response(200, content=line[6:]).json()["choices"]
    return choices, "\n".join(raw)


def test_thor_server_returns_token_ids_where_vllm_does(endpoints: Endpoints, tiny_tir_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tir_model)
    prompt = "I will compute this with Python.\n```python\nprint(17*23)\n```\n"
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True, "ignore_eos": True}
    results = {}
    for name, url, model in (("vllm", endpoints.vllm, str(tiny_tir_model)), ("thor", endpoints.thor, SERVED)):
        r = httpx.post(url + "/v1/completions", json={**body, "model": model}, timeout=120)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert tok.decode(choice["token_ids"]) == choice["text"], name
        assert len(choice["token_ids"]) == 12, name
        stream, raw = _collect_stream(url, {**body, "model": model})
        # prompt_token_ids on the first chunk only; the chunks' token_ids add up to the non-stream ones
        assert stream[0]["prompt_token_ids"] == choice["prompt_token_ids"], (name, raw)
        assert all(c.get("prompt_token_ids") is None for c in stream[1:]), (name, raw)
        assert [t for c in stream for t in c["token_ids"]] == choice["token_ids"], (name, raw)
        assert "".join(c["text"] for c in stream) == choice["text"], (name, raw)
        results[name] = (choice["prompt_token_ids"], choice["token_ids"], choice["text"])
    assert results["thor"] == results["vllm"]
    assert results["vllm"][0] == tok.encode(prompt)
    # without return_token_ids our server's body is as before: no token id fields
    r = httpx.post(endpoints.thor + "/v1/completions", json={**body, "model": SERVED, "return_token_ids": None})
    assert r.status_code == 200 and "token_ids" not in r.json()["choices"][0]


def _aborted(log_path: Path) -> list[str]:
    """The request ids vLLM logged as aborted (AsyncLLM.abort, with --enable-log-requests)."""
    return re.findall(r"Aborted request\(s\) (\S+?)\.?$", log_path.read_text(errors="replace"), re.M)


async def test_closing_the_stream_aborts_the_request_on_vllm(endpoints: Endpoints, tiny_tir_model: Path) -> None:
    async with CompletionsBackend.open(endpoints.vllm, tokenizer=str(tiny_tir_model)) as backend:
        before = len(_aborted(endpoints.vllm_log))
        prompt = backend.tokenizer.encode("Compute 17*23.")
        params = GenParams(max_tokens=1800, ignore_eos=True, temperature=1.0, seed=3)
        gen = backend.generate(prompt, params, "abort-test")
        first = await anext(gen)
        assert first.token_ids and not first.finished
        assert await backend.num_unfinished_requests() == 1
        await gen.aclose()  # what the decoder does when it leaves a round early
        assert await backend.num_unfinished_requests() == 0
        # vLLM aborts the request (had it run on, it would have finished as "length", never logged)
        deadline = time.monotonic() + 120
        while len(_aborted(endpoints.vllm_log)) == before:
            assert time.monotonic() < deadline, "vLLM never aborted the request after its stream was closed"
            await asyncio.sleep(0.2)


async def test_endpoint_refusing_token_ids_is_a_clear_error(endpoints: Endpoints, sandbox, tiny_tir_model) -> None:
    # our server refuses return_token_ids on THOR completions (a trajectory includes tool outputs): a real
    # endpoint that cannot give token ids for this request
    with pytest.raises(ClientLoopUnavailable) as err:
        async with open_client_loop(
            endpoints.thor,
            model=SERVED,
            tokenizer=str(tiny_tir_model),
            sandbox_url=sandbox.url,
            extra_body={"thor": {"max_tool_calls": 2}},
        ):
            pass
    assert NO_TOKEN_IDS in str(err.value) and "--endpoint-kind chat" in str(err.value)


async def test_no_tokenizer_at_hand_is_a_clear_error(endpoints: Endpoints, sandbox) -> None:
    # our server's model name is not a directory here: the loop cannot tokenise without --tokenizer
    with pytest.raises(ClientLoopUnavailable, match="pass --tokenizer"):
        async with open_client_loop(endpoints.thor, model=SERVED, sandbox_url=sandbox.url):
            pass


async def test_another_tokenizer_is_a_clear_error(endpoints: Endpoints, think_tokenizer, tmp_path: Path) -> None:
    # the same vocabulary plus think tags as single tokens: the endpoint's model splits them
    think_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TargetError, match="does not tokenise text as endpoint") as err:
        async with CompletionsBackend.open(endpoints.vllm, tokenizer=str(tmp_path)):
            pass
    assert not isinstance(err.value, ClientLoopUnavailable)  # a wrong --tokenizer: no fallback to chat


async def test_unreachable_endpoint_is_a_clear_error(tiny_tir_model: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TargetError, match=f"endpoint {re.escape(url)} is unreachable"):
        async with open_client_loop(url, tokenizer=str(tiny_tir_model)):
            pass
