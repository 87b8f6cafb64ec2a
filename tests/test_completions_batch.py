"""Batched prompts and `echo` on `POST /v1/completions`, end to end: the real server process,
real vLLM (CPU) with the tiny TIR model, the real sandbox; the official `openai` SDK and raw
httpx as clients; bodies and stream chunks validated against OpenAI's published schema.

What vLLM's own server does is the reference: a batch's choice `index` is prompt index x n +
sample index, usage sums the prompts, `echo` prepends each prompt (and with `logprobs` its
tokens' logprobs, the first one null), `max_tokens: 0` with `echo` returns the prompt alone
(what lm-evaluation-harness's loglikelihood requests read)."""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any

import httpx
import openai
import pytest

from tests.support.openapi import validate
from tests.support.thor_server import run_server, tiny_server_args
from tests.support.vllm_server import vllm_process, wait_healthy

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.sandbox]

MODEL = "tiny-tir"
# one key per test: rate limits are per key, so each test starts with a full token bucket
KEYS = [f"batch-key-{i}" for i in range(28)]  # the last four: the rate-limit tests
_next_key = itertools.count()
TOKENS_PER_MINUTE = 4000
MAX_BATCH = 8
MAX_REQUEST_TOKENS = 4096
PROMPTS = ["I will compute", "Compute 17*23.", "The answer is"]


@pytest.fixture(scope="module")
def servers(tiny_tir_model, sandbox):
    """Our server and vLLM's own OpenAI server on the same model (the reference), started together."""
    args = [*tiny_server_args(tiny_tir_model, MODEL, sandbox_url=sandbox.url), "--tokens-per-minute"]
    args += [str(TOKENS_PER_MINUTE), *itertools.chain.from_iterable(("--api-key", k) for k in KEYS)]
    env = {"THOR_MAX_BATCH_PROMPTS": str(MAX_BATCH), "THOR_MAX_REQUEST_TOKENS": str(MAX_REQUEST_TOKENS)}
    with vllm_process(tiny_tir_model) as (vllm_url, proc, log_path):
        with run_server(args, env=env) as srv:
            wait_healthy(vllm_url, proc, log_path)
            yield srv, vllm_url


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture
def key() -> str:
    return KEYS[next(_next_key)]


@pytest.fixture
def client(server, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def post(server, key: str, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(server.url + path, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=180)


def ok(server, key: str, body: dict[str, Any]) -> dict[str, Any]:
    r = post(server, key, body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, key: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed request (after checking it ends with [DONE])."""
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=180,
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def check_schema(body: dict[str, Any], *, echo: bool = False) -> None:
    """Validate against OpenAI's CreateCompletionResponse. OpenAI's schema types every
    `token_logprobs` item as a number and every `top_logprobs` item as an object, but its API
    (and vLLM) send null for an echoed prompt's first token, which has no context to be scored
    in: that null is checked here (first token of an echoed choice, nowhere else) and stands in
    as 0.0 / {} for the schema check. A stream chunk's null finish_reason (the schema describes
    whole responses) stands in as "length"."""
    body = copy.deepcopy(body)
    for c in body["choices"]:
        lp = c.get("logprobs")
        if lp is not None:
            nulls = [i for i, v in enumerate(lp["token_logprobs"]) if v is None]
            null_tops = [i for i, v in enumerate(lp["top_logprobs"]) if v is None]
            expected = [0] if echo and lp["tokens"] and lp["text_offset"][0] == 0 else []
            assert nulls == null_tops == expected, (nulls, null_tops, expected)
            for i in nulls:
                lp["token_logprobs"][i], lp["top_logprobs"][i] = 0.0, {}
        if c["finish_reason"] is None:
            c["finish_reason"] = "length"
    validate(body, "CreateCompletionResponse")


def assemble(chunks: list[dict[str, Any]], count: int, *, echo: bool = False) -> tuple[list[dict], dict]:
    """Per choice index: the stream's text, logprobs, finish and stop reasons concatenated; and usage."""
    *deltas, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]
    acc = [
        {
            "index": i,
            "text": "",
            "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []},
            "finish_reason": None,
            "stop_reason": None,
        }
        for i in range(count)
    ]
    seen: set[int] = set()
    for chunk in deltas:
        assert chunk["object"] == "text_completion" and chunk["id"] == deltas[0]["id"]
        check_schema(chunk, echo=echo and chunk["choices"][0]["index"] not in seen)
        (c,) = chunk["choices"]
        a = acc[c["index"]]
        assert a["finish_reason"] is None, "nothing after a choice's last chunk"
        seen.add(c["index"])
        a["text"] += c["text"]
        for k, v in (c["logprobs"] or {}).items():
            a["logprobs"][k] += v
        a["finish_reason"], a["stop_reason"] = c["finish_reason"], c["stop_reason"]
    assert seen == set(range(count))
    return acc, usage_chunk["usage"]


def tokenize(server, key: str, text: str) -> list[int]:
    r = post(server, key, {"model": MODEL, "prompt": text, "add_special_tokens": False}, path="/tokenize")
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def close(a: list[float | None], b: list[float | None], tol: float = 0.05) -> bool:
    return len(a) == len(b) and all(
        x is not None and y is not None and abs(x - y) <= tol for x, y in zip(a, b, strict=True)
    )


# --- batched prompts ---------------------------------------------------------------------------


def test_batched_text_prompts_are_each_prompt_in_index_order(server, key, client):
    base = {"model": MODEL, "max_tokens": 10, "temperature": 0, "logprobs": 1}
    singles = [ok(server, key, {**base, "prompt": p}) for p in PROMPTS]
    resp = client.completions.create(prompt=PROMPTS, n=2, **base)
    body = resp.model_dump(mode="json", exclude_unset=True)
    check_schema(body)
    assert [c["index"] for c in body["choices"]] == list(range(2 * len(PROMPTS)))
    for k, single in enumerate(singles):
        for j in range(2):
            c = body["choices"][k * 2 + j]
            assert c["text"] == single["choices"][0]["text"] and c["text"], (k, j, c)
            assert c["logprobs"]["tokens"] == single["choices"][0]["logprobs"]["tokens"]
            assert close(c["logprobs"]["token_logprobs"], single["choices"][0]["logprobs"]["token_logprobs"])
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)  # each prompt once, not x n
    assert usage["completion_tokens"] == 2 * sum(s["usage"]["completion_tokens"] for s in singles)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_token_id_batch_equals_text_batch(server, key):
    base = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    texts = ok(server, key, {**base, "prompt": PROMPTS})
    ids = ok(server, key, {**base, "prompt": [tokenize(server, key, p) for p in PROMPTS]})
    check_schema(ids)
    assert [c["text"] for c in ids["choices"]] == [c["text"] for c in texts["choices"]]
    assert ids["usage"] == texts["usage"]
    one = ok(server, key, {**base, "prompt": [PROMPTS[1]]})  # a batch of one is that prompt's response
    assert [c["text"] for c in one["choices"]] == [texts["choices"][1]["text"]]


def test_batched_stream_equals_non_stream_with_echo_and_n(server, key, client):
    request = {
        "model": MODEL,
        "prompt": PROMPTS,
        "max_tokens": 8,
        "temperature": 0.8,
        "seed": 11,
        "n": 2,
        "logprobs": 2,
        "echo": True,
    }
    body = ok(server, key, request)
    check_schema(body, echo=True)
    count = 2 * len(PROMPTS)
    assert [c["index"] for c in body["choices"]] == list(range(count))
    for c in body["choices"]:
        assert c["text"].startswith(PROMPTS[c["index"] // 2])
    chunks = stream(server, key, request)
    streamed, usage = assemble(chunks, count, echo=True)
    assert usage == body["usage"]
    for choice in body["choices"]:
        assert streamed[choice["index"]] == {
            k: choice[k] for k in ("index", "text", "logprobs", "finish_reason", "stop_reason")
        }
    # each choice's first chunk carries its prompt; chunks of different choices interleave
    firsts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        c = chunk["choices"][0]
        firsts.setdefault(c["index"], c["text"])
    assert all(firsts[i].startswith(PROMPTS[i // 2]) for i in range(count))
    # the SDK's stream reads the same text per index
    sdk: dict[int, str] = {}
    for ch in client.completions.create(stream=True, **request):
        for c in ch.choices:
            sdk[c.index] = sdk.get(c.index, "") + c.text
    assert sdk == {c["index"]: c["text"] for c in body["choices"]}


# --- echo ----------------------------------------------------------------------------------------


def test_echo_prepends_prompt_and_its_logprobs(server, key, client):
    prompt = "Compute 17*23. I will compute"
    base = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
    plain = ok(server, key, base)["choices"][0]
    resp = client.completions.create(echo=True, **base)
    body = resp.model_dump(mode="json", exclude_unset=True)
    check_schema(body, echo=True)
    (c,) = body["choices"]
    assert c["text"] == prompt + plain["text"]
    lp = c["logprobs"]
    n_prompt = len(tokenize(server, key, prompt))
    assert body["usage"]["prompt_tokens"] == n_prompt
    assert len(lp["tokens"]) == n_prompt + body["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == c["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # no context for the first token
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert all(lp["tokens"][i] in lp["top_logprobs"][i] for i in range(1, len(lp["tokens"])))
    assert lp["tokens"][n_prompt:] == plain["logprobs"]["tokens"]
    assert close(lp["token_logprobs"][n_prompt:], plain["logprobs"]["token_logprobs"])
    no_lp = ok(server, key, {**base, "echo": True, "logprobs": None})["choices"][0]
    assert no_lp["text"] == c["text"] and no_lp["logprobs"] is None


def test_echo_max_tokens_zero_scores_the_prompt_as_generation_scored_it(server, key):
    """lm-eval's loglikelihood: score a context + continuation by echoing it without generating.
    A greedy continuation's own logprobs (from generating it) must come back as the echoed
    prompt's logprobs for those tokens, each the top alternative at its position."""
    context = tokenize(server, key, "Compute 17*23.")
    gen = ok(
        server,
        key,
        {"model": MODEL, "prompt": context, "max_tokens": 6, "temperature": 0, "logprobs": 1, "return_token_ids": True},
    )["choices"][0]
    continuation = gen["token_ids"]
    assert len(continuation) == 6
    ids = context + continuation
    body = ok(server, key, {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    check_schema(body, echo=True)
    (c,) = body["choices"]
    detok = post(server, key, {"model": MODEL, "tokens": ids}, path="/detokenize").json()["prompt"]
    assert c["text"] == detok  # the prompt alone: nothing generated is sent
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) and body["usage"]["prompt_tokens"] == len(ids)
    scored = lp["token_logprobs"][len(context) :]
    assert close(scored, gen["logprobs"]["token_logprobs"]), (scored, gen["logprobs"]["token_logprobs"])
    for i in range(len(context), len(ids)):  # greedy: each continuation token was the most likely one
        assert math.isclose(lp["token_logprobs"][i], max(lp["top_logprobs"][i].values()), abs_tol=1e-6)
    streamed, usage = assemble(
        stream(server, key, {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}),
        1,
        echo=True,
    )
    assert streamed[0]["text"] == c["text"] and streamed[0]["logprobs"] == lp
    assert usage == body["usage"]


def test_lm_eval_loglikelihood_request_shape(server, key):
    """What lm-eval 0.4.13's local-completions sends for loglikelihood: a batch of token-id
    prompts, echo, max_tokens 1, logprobs 1, temperature 0, a seed; it reads
    token_logprobs[ctxlen:-1] of the choices sorted by index."""
    ctx = tokenize(server, key, "Question: 2 + 2 =")
    a, b = tokenize(server, key, " 4"), tokenize(server, key, " 5")
    body = ok(
        server,
        key,
        {
            "model": MODEL,
            "prompt": [ctx + a, ctx + b],
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": 1,
            "seed": 1234,
            "echo": True,
        },
    )
    check_schema(body, echo=True)
    for choice, cont in zip(body["choices"], (a, b), strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ctx) + len(cont) + 1  # + the generated token, as vLLM sends it
        part = lp["token_logprobs"][len(ctx) : -1]
        assert len(part) == len(cont) and all(isinstance(v, float) and v <= 0 for v in part)


# --- the same bodies as vLLM's own server ----------------------------------------------------------


def _openai_fields(body: dict[str, Any]) -> dict[str, Any]:
    """What both servers send: choices' OpenAI fields and usage's counts (vLLM adds its raw
    `prompt_logprobs` to a choice and null token details to usage)."""
    keys = ("index", "text", "logprobs", "finish_reason", "stop_reason")
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {
        "choices": [{k: c[k] for k in keys} for c in body["choices"]],
        "usage": {k: body["usage"][k] for k in counts},
    }


def _same(ours: Any, ref: Any, path: str = "") -> None:
    """Equal, logprob values within 0.02 (two engines, two batch compositions), keys and tokens exactly."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict) and ours.keys() == ref.keys(), (path, ours, ref)
        for k in ref:
            _same(ours[k], ref[k], f"{path}.{k}")
    elif isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref), (path, ours, ref)
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            _same(a, b, f"{path}[{i}]")
    elif isinstance(ref, float) and "logprob" in path:
        assert isinstance(ours, float) and abs(ours - ref) <= 0.02, (path, ours, ref)
    else:
        assert ours == ref, (path, ours, ref)


@pytest.mark.parametrize(
    "extra",
    [
        {"prompt": PROMPTS, "max_tokens": 6, "logprobs": 2, "echo": True},  # vLLM refuses greedy n > 1
        {"prompt": PROMPTS[:2], "max_tokens": 0, "logprobs": 1, "echo": True},
        {"prompt": [[40, 686, 12564], [785, 4226, 374]], "max_tokens": 1, "logprobs": 1, "echo": True},
        {"prompt": PROMPTS[0], "max_tokens": 5, "echo": True},
    ],
    ids=["batch-echo-logprobs", "echo-max-tokens-0", "lm-eval-loglikelihood", "echo-no-logprobs"],
)
def test_batch_and_echo_bodies_equal_vllms(servers, key, tiny_tir_model, extra):
    """The same request to vLLM 0.32's own OpenAI server and to ours gives the same choices
    (index order, echoed text, tokens, text offsets, null first-token logprobs, top_logprobs'
    keys, finish and stop reasons) and the same usage; streamed, the same text per index."""
    thor, vllm_url = servers
    body = {"temperature": 0, "seed": 5, **extra}
    ref = httpx.post(vllm_url + "/v1/completions", json={**body, "model": str(tiny_tir_model)}, timeout=180)
    assert ref.status_code == 200, ref.text
    ours = ok(thor, key, {**body, "model": MODEL})
    check_schema(ours, echo=True)
    _same(_openai_fields(ours), _openai_fields(ref.json()))
    count = len(ours["choices"])
    with httpx.stream(
        "POST", vllm_url + "/v1/completions", json={**body, "model": str(tiny_tir_model), "stream": True}, timeout=180
    ) as r:
        ref_text: dict[int, str] = {}
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    ref_text[c["index"]] = ref_text.get(c["index"], "") + c["text"]
    streamed, _ = assemble(stream(thor, key, {**body, "model": MODEL}), count, echo=True)
    assert {a["index"]: a["text"] for a in streamed} == ref_text


# --- what is refused -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,param,needle",
    [
        ({"prompt": ["x"] * (MAX_BATCH + 1)}, "prompt", "at most 8"),
        ({"prompt": [[100] * 5, [100] * 2100]}, "prompt", "prompt[1]"),
        ({"prompt": []}, "prompt", "empty"),
        ({"prompt": [[5], []]}, "prompt", "empty"),
        ({"prompt": ["a", [1, 2]]}, "prompt", "mixes texts and token-id lists"),
        ({"prompt": ["a", "b"], "thor": {}}, "prompt", "batch of prompts"),
        ({"echo": True, "thor": {}}, "echo", "plain completions only"),
        ({"max_tokens": 0}, "max_tokens", "echo"),
        ({"echo": True, "return_token_ids": True}, "echo", "prompt_token_ids"),
        ({"prompt": ["a"] * MAX_BATCH, "max_tokens": 600}, "max_tokens", "number of prompts"),
        ({"max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
        # echo's work: 2 x 300 prompt tokens x n 2 x (1 + 5 logprobs) = 7200 > 4096, though n x max_tokens is 0
        (
            {"prompt": [[100] * 300] * 2, "n": 2, "echo": True, "logprobs": 5, "max_tokens": 0},
            "echo",
            "max_request_tokens",
        ),
    ],
)
def test_bad_batch_and_echo_inputs_are_400_naming_the_field(server, key, extra, param, needle):
    r = post(server, key, {"model": MODEL, "prompt": "I will compute", "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()
    validate(err, "ErrorResponse")
    assert err["error"]["param"] == param, err
    assert needle and needle in err["error"]["message"], err
    if needle == "prompt[1]":  # the batch's second prompt is longer than the context
        assert err["error"]["code"] == "context_length_exceeded"


def test_rate_limit_admission_counts_echo_work(server):
    """Echo sends every prompt token with its top logprobs for each choice: admission debits that
    work (300 tokens x n 2 x (1 + 5) = 3600 of the 4000-token bucket), so the same key's next
    request of 1000 prompt tokens waits; the same prompt without echo leaves room for it (the control)."""
    echo_key, plain_key = KEYS[-3], KEYS[-4]
    base = {"model": MODEL, "prompt": [[100] * 300], "n": 2, "temperature": 1.0, "seed": 1}
    after = {"model": MODEL, "prompt": [[100] * 1000], "max_tokens": 1}
    assert post(server, plain_key, {**base, "max_tokens": 1}).status_code == 200
    assert post(server, plain_key, after).status_code == 200
    r = post(server, echo_key, {**base, "max_tokens": 0, "echo": True, "logprobs": 5})
    assert r.status_code == 200, r.text
    assert [len(c["logprobs"]["tokens"]) for c in r.json()["choices"]] == [300, 300]
    r = post(server, echo_key, after)
    assert r.status_code == 429, r.text
    validate(r.json(), "ErrorResponse")


def test_rate_limit_admission_counts_every_prompt_of_a_batch(server):
    """Admission is checked against the prompt tokens of the whole batch: a batch of three
    1800-token prompts overdraws a 4000-token bucket, so the same key's next request waits;
    one such prompt leaves room for it (the control)."""
    batch_key, single_key = KEYS[-1], KEYS[-2]
    long = [100] * 1800
    base = {"model": MODEL, "max_tokens": 1, "temperature": 0}
    assert post(server, single_key, {**base, "prompt": [long]}).status_code == 200
    assert post(server, single_key, {**base, "prompt": "I will compute"}).status_code == 200
    assert post(server, batch_key, {**base, "prompt": [long] * 3}).status_code == 200
    r = post(server, batch_key, {**base, "prompt": "I will compute"})
    assert r.status_code == 429, r.text
    validate(r.json(), "ErrorResponse")
    assert int(r.headers["Retry-After"]) >= 1
