"""The server against hostile or careless clients and operators: API keys, bind address,
failed-auth throttling, rate-limit identity, token charging however a request ends, and
traces bound to their owner.

Real things only: `python -m server` processes (real vLLM on CPU with the tiny TIR model,
real sandbox service, real redis-server), httpx and the official `openai` SDK as clients,
the scripted backend with the real decoder and sandbox for token metering. Clients use
distinct loopback source addresses (127.0.0.x) where a test needs a client address of
its own: on an open server the address is the client's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.openapi import validate
from tests.support.redis_server import run_redis
from tests.support.thor_server import run_server, tiny_server_args

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-tir"
MUL = "Compute 17*23."
K1, K2, K3 = "sk-first-3f9a7c", "sk-second-81d2e0", "sk-third-55aa01"
TOKENS_PER_MIN = 60  # one token per second refills: debts of 100+ tokens outlast any test step


def chat(text: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def client_at(address: str, **kw) -> httpx.Client:
    """An HTTP client whose connections come from `address` (any 127.0.0.0/8 address works on Linux)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120, **kw)


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def wait_for_metric(url: str, name: str, above: float, **labels: str) -> None:
    deadline = time.monotonic() + 120  # liveness bound for a hung server, not a speed requirement
    while metric(url, name, **labels) <= above:
        assert time.monotonic() < deadline, f"{name}{labels} never went above {above}"
        time.sleep(0.1)


# --------------------------------------------------------------------------- start-up refusals


def start_server(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m server` with a model and a sandbox that do not exist: whatever is refused must be
    refused before either is touched (a server that got past the checks fails on one of them)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("THOR_")}
    full_env.update(env or {})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--model",
            "/nonexistent/model-dir",
            "--sandbox-url",
            "http://127.0.0.1:9",
            "--port",
            "0",
            *args,
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_empty_api_key_flag_is_refused() -> None:
    r = start_server(["--api-key", ""])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--api-key" in r.stderr and "empty" in r.stderr
    assert "Traceback" not in r.stderr and "127.0.0.1:9" not in r.stderr  # refused before anything started


def test_empty_entry_in_env_keys_is_refused() -> None:
    r = start_server([], env={"THOR_API_KEY": "sk-a,,sk-b"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "THOR_API_KEY" in r.stderr and "empty" in r.stderr
    r = start_server([], env={"THOR_API_KEY": ""})
    assert r.returncode == 2 and "empty" in r.stderr, r.stderr[-3000:]


def test_key_file_without_keys_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# nothing but comments\n\n   \n")
    r = start_server(["--api-key-file", str(keys)])
    assert r.returncode == 2, r.stderr[-3000:]
    assert str(keys) in r.stderr and "no API key" in r.stderr
    keys.write_text("sha256:1234\n")
    r = start_server(["--api-key-file", str(keys)])
    assert r.returncode == 2 and "not a sha256 digest" in r.stderr, r.stderr[-3000:]


def test_open_server_binds_loopback_only() -> None:
    r = start_server(["--host", "0.0.0.0"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "refusing to serve without an API key on 0.0.0.0" in r.stderr
    # an API key, or the explicit opt-in, lets the server go on (to fail on the missing sandbox or model)
    for extra, env, said in (
        (["--api-key", K1], None, "API keys: 1 accepted"),
        ([], {"THOR_API_KEY": K1}, "API keys: 1 accepted"),
        (["--allow-open-remote"], None, "no API key on 0.0.0.0"),
    ):
        r = start_server(["--host", "0.0.0.0", *extra], env=env)
        assert r.returncode != 0 and "refusing" not in r.stderr and said in r.stderr, r.stderr[-3000:]
        assert K1 not in r.stderr  # the log names key ids, never keys
    # the default bind address is loopback
    from server.settings import ServerSettings

    assert ServerSettings().host == "127.0.0.1"


def test_image_and_compose_defaults_need_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The container binds 0.0.0.0: its default command refuses to serve without a key."""
    import re

    import yaml

    from server.__main__ import check_access, parse_args
    from server.settings import ServerSettings

    for name in list(os.environ):
        if name.startswith("THOR_"):
            monkeypatch.delenv(name)
    cmd = re.findall(r"^CMD (\[.*\])$", (ROOT / "server" / "Dockerfile").read_text(), re.M)[-1]
    image_args = json.loads(cmd)[3:]  # python -m server ...
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_args = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in compose["services"]["server"]["command"][3:]]
    assert "THOR_API_KEY" in compose["services"]["server"]["environment"]
    assert "THOR_ALLOW_OPEN_REMOTE" in compose["services"]["server"]["environment"]
    for args in (image_args, compose_args):
        settings = ServerSettings(**parse_args(args))
        assert settings.host == "0.0.0.0"
        with pytest.raises(ValueError, match="refusing to serve without an API key"):
            check_access(settings)
        monkeypatch.setenv("THOR_API_KEY", K1)
        assert check_access(ServerSettings(**parse_args(args))).identify(K1)
        monkeypatch.delenv("THOR_API_KEY")
        monkeypatch.setenv("THOR_ALLOW_OPEN_REMOTE", "true")
        assert not check_access(ServerSettings(**parse_args(args)))
        monkeypatch.delenv("THOR_ALLOW_OPEN_REMOTE")


# --------------------------------------------------------------------------- key digests


def test_only_key_digests_are_kept(tmp_path: Path) -> None:
    from server.admission.keys import ApiKeys, key_digest
    from server.settings import ServerSettings

    digest3 = key_digest(K3)
    assert digest3 == "sha256:" + hashlib.sha256(K3.encode()).hexdigest()
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# team keys\n{K2}\n{digest3}\n")
    settings = ServerSettings(api_key=[K1], api_key_file=keyfile)
    keys = settings.api_keys()
    for secret in (K1, K2, K3):
        assert secret not in settings.model_dump_json() and secret not in repr(settings)
        assert secret not in repr(vars(keys))
    ids = [keys.identify(k) for k in (K1, K2, K3)]
    assert all(ids) and len(set(ids)) == 3
    assert ids[2] == "key:" + digest3.removeprefix("sha256:")[:16]
    assert keys.identify("sk-wrong") is None and keys.identify("") is None
    assert keys.identify(digest3) is None  # a digest is not a key
    assert not ApiKeys() and ApiKeys().identify(K1) is None


def test_key_check_compares_every_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: hmac.compare_digest on all configured digests, also after a match."""
    import server.admission.keys as auth

    keys = auth.ApiKeys([auth.key_digest(k) for k in (K1, K2, K3)])
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented in (K1, K2, K3, "sk-wrong"):
        calls.clear()
        keys.identify(presented)
        assert len(calls) == 3


def test_digest_helper_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "server.admission.keys", K1], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "sha256:" + hashlib.sha256(K1.encode()).hexdigest()
    r = subprocess.run([sys.executable, "-m", "server.admission.keys", ""], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "empty" in r.stderr


def test_client_ids() -> None:
    from server.admission.keys import KEY_ID_SCOPE, address_id, client_id

    assert address_id({"client": ("203.0.113.7", 5000)}) == "addr:203.0.113.7"
    assert address_id({"client": ("::ffff:203.0.113.7", 5000)}) == "addr:203.0.113.7"
    # one IPv6 host owns a /64: its addresses are one client
    a = address_id({"client": ("2001:db8:1:2::1", 1)})
    assert a == address_id({"client": ("2001:db8:1:2:ffff::9", 1)}) == "addr:2001:db8:1:2::/64"
    assert a != address_id({"client": ("2001:db8:1:3::1", 1)})
    # the key id from auth wins over the address; headers never count
    scope = {
        "client": ("127.0.0.1", 1),
        "headers": [(b"authorization", b"Bearer x")],
        "state": {KEY_ID_SCOPE: "key:0123456789abcdef"},
    }
    assert client_id(scope) == "key:0123456789abcdef"
    assert client_id({"client": ("127.0.0.1", 1), "headers": [(b"authorization", b"Bearer x")]}) == "addr:127.0.0.1"


# --------------------------------------------------------------------------- token metering


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


@pytest.mark.sandbox
async def test_meter_counts_generated_tokens_of_all_samples_and_discarded_attempts(tokenizer, sandbox) -> None:
    from server.admission.metering import MeteredBackend, TokenMeter, metered
    from tests.support.scripted_backend import ScriptedBackend
    from thor_engine.config import SamplingOptions, SelfCorrectionConfig, ThorConfig
    from thor_engine.engine import ThorEngine
    from thor_engine.events import Final
    from thor_engine.tools import SandboxExecutor
    from thor_sandbox.client import SandboxClient

    def responder(prompt: str) -> str:
        done = prompt.split("<|im_start|>assistant\n")[-1]
        if "```output" not in done:
            return "Let me check.\n```python\nprint(1/0)\n```\n"  # fails: discarded by self-correction
        return "So the answer is \\boxed{4}."

    async with SandboxClient(sandbox.url) as client:
        backend = ScriptedBackend(tokenizer, responder)
        engine = ThorEngine(MeteredBackend(backend), SandboxExecutor(client), model_name="scripted")
        prompt = engine.chat_prompt([{"role": "user", "content": "What is 2+2?"}])
        cfg = ThorConfig(self_correction=SelfCorrectionConfig(enabled=True, max_retries=1, backtrack_tokens=0))
        meter = TokenMeter()
        finals = [
            ev
            async for ev in metered(engine.stream(prompt, cfg, SamplingOptions(max_tokens=300), n=2), meter)
            if isinstance(ev, Final)
        ]
        assert len(finals) == 2
        assert sum(f.usage.discarded_tokens for f in finals) > 0
        assert meter.generated == sum(f.usage.generated_tokens for f in finals) > 0

        # a consumer that stops early: the meter has what the backend produced until then
        early = TokenMeter()
        stream = metered(engine.stream(prompt, cfg, SamplingOptions(max_tokens=300), n=2), early)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        assert early.generated > 0
        assert early.generated < meter.generated
        # other requests' tokens never land on this meter
        assert meter.generated == sum(f.usage.generated_tokens for f in finals)


# --------------------------------------------------------------------------- an open server


@pytest.fixture(scope="module")
def open_server(tiny_tir_model, sandbox) -> Iterator:
    args = [
        *tiny_server_args(tiny_tir_model, MODEL, sandbox_url=sandbox.url),
        "--requests-per-minute",
        "3",
        "--tokens-per-minute",
        str(TOKENS_PER_MIN),
    ]
    with run_server(args) as srv:
        yield srv


def plain(prompt: str = "I will compute", **kw) -> dict:
    return {"model": MODEL, "prompt": prompt, "temperature": 0, **kw}


def test_open_server_limits_by_address_not_by_bearer_string(open_server) -> None:
    url = open_server.url + "/v1/completions"
    limited_before = metric(open_server.url, "thor_rate_limited_total")
    with client_at("127.0.0.2") as http:
        codes = [
            http.post(url, json=plain(max_tokens=2), headers={"Authorization": f"Bearer made-up-{i}"}).status_code
            for i in range(3)
        ]
        assert codes == [200, 200, 200]
        # a fresh Bearer string is not a fresh bucket on an open server
        limited = http.post(url, json=plain(max_tokens=2), headers={"Authorization": "Bearer made-up-4"})
        assert limited.status_code == 429, limited.text
        validate(limited.json(), "ErrorResponse")
        assert (
            limited.json()["error"]["type"] == "rate_limit_error" and "(requests)" in limited.json()["error"]["message"]
        )
        assert int(limited.headers["retry-after"]) >= 1
        # nor is a forged X-Forwarded-For (no proxy is trusted unless configured)
        forged = http.post(url, json=plain(max_tokens=2), headers={"X-Forwarded-For": "198.51.100.9"})
        assert forged.status_code == 429
    # another client address has its own bucket
    with client_at("127.0.0.9") as other:
        assert other.post(url, json=plain(max_tokens=2)).status_code == 200
    assert metric(open_server.url, "thor_rate_limited_total") == limited_before + 2


def test_plain_completion_is_charged_its_generated_tokens(open_server) -> None:
    with client_at("127.0.0.5") as http:
        r = http.post(open_server.url + "/v1/completions", json=plain(max_tokens=150, ignore_eos=True))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 150
        # 150 generated tokens against a 60-per-minute bucket: the next request waits
        nxt = http.post(open_server.url + "/v1/completions", json=plain(max_tokens=1))
        assert nxt.status_code == 429, nxt.text
        assert "(tokens)" in nxt.json()["error"]["message"] and int(nxt.headers["retry-after"]) >= 30


def read_text_chunks(r: httpx.Response, wanted: int) -> int:
    """Read SSE chunks until `wanted` of them carried generated text; return how many did."""
    got = 0
    for line in r.iter_lines():
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if any(c.get("text") for c in chunk.get("choices", [])):
            got += 1
            if got >= wanted:
                break
    return got


@pytest.mark.parametrize("thor", [False, True], ids=["plain", "thor"])
def test_disconnected_stream_is_charged(open_server, thor: bool) -> None:
    """A client that reads part of a stream and goes away pays for what was generated."""
    address = "127.0.0.3" if not thor else "127.0.0.4"
    body = plain("Once upon a time", max_tokens=1000, stream=True, ignore_eos=True, temperature=1.0)
    if thor:
        body["thor"] = {"max_tool_calls": 0}
    done_before = metric(open_server.url, "thor_requests_total", route="/v1/completions", status="200")
    with client_at(address) as http:
        with http.stream("POST", open_server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            assert read_text_chunks(r, 120) == 120  # each chunk carries at least one new token
        # the server has finished with the abandoned request (engine request aborted, response closed)
        wait_for_metric(open_server.url, "thor_requests_total", done_before, route="/v1/completions", status="200")
        nxt = http.post(open_server.url + "/v1/completions", json=plain(max_tokens=1))
        assert nxt.status_code == 429, nxt.text
        assert "(tokens)" in nxt.json()["error"]["message"]


def test_open_server_traces_belong_to_the_client_address(open_server) -> None:
    with client_at("127.0.0.6") as owner, client_at("127.0.0.7") as stranger:
        r = owner.post(open_server.url + "/v1/chat/completions", json=chat(MUL, max_tokens=200))
        assert r.status_code == 200, r.text
        trace_id = r.json()["thor"]["trace_id"]
        assert owner.get(f"{open_server.url}/v1/traces/{trace_id}").status_code == 200
        theirs = stranger.get(f"{open_server.url}/v1/traces/{trace_id}")
        assert theirs.status_code == 404
        validate(theirs.json(), "ErrorResponse")


# --------------------------------------------------------------------------- a server with keys


@pytest.fixture(scope="module")
def redis_srv():
    with run_redis() as r:
        yield r


@pytest.fixture(scope="module")
def keyed_server(tiny_tir_model, sandbox, redis_srv) -> Iterator:
    from server.admission.keys import key_digest

    keyfile = Path(tempfile.mkdtemp(prefix="thor-keys-")) / "keys"
    keyfile.write_text(f"{K2}\n# stored as a digest only:\n{key_digest(K3)}\n")
    args = [
        *tiny_server_args(tiny_tir_model, MODEL, sandbox_url=sandbox.url),
        "--redis-url",
        redis_srv.url,
        "--api-key",
        K1,
        "--api-key-file",
        str(keyfile),
        "--auth-failures-per-minute",
        "3",
        "--requests-per-minute",
        "100",
        "--tokens-per-minute",
        "100000",
    ]
    with run_server(args) as srv:
        yield srv


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_traces_belong_to_the_key_that_made_them(keyed_server) -> None:
    resp = sdk(keyed_server, K1).chat.completions.create(**chat(MUL, max_tokens=200))
    trace_id = resp.model_extra["thor"]["trace_id"]
    mine = httpx.get(f"{keyed_server.url}/v1/traces/{trace_id}", headers={"Authorization": f"Bearer {K1}"})
    assert mine.status_code == 200 and mine.json()["id"] == trace_id
    for other in (K2, K3):  # valid keys, but not the owner's
        theirs = httpx.get(f"{keyed_server.url}/v1/traces/{trace_id}", headers={"Authorization": f"Bearer {other}"})
        assert theirs.status_code == 404, theirs.text
        validate(theirs.json(), "ErrorResponse")


def test_trace_false_stores_no_trace(keyed_server) -> None:
    client = sdk(keyed_server, K1)
    raw = client.chat.completions.with_raw_response.create(
        **chat(MUL, max_tokens=200), extra_body={"thor": {"trace": False}}
    )
    assert "x-thor-trace-id" not in raw.headers
    trace_id = raw.parse().model_extra["thor"]["trace_id"]
    r = httpx.get(f"{keyed_server.url}/v1/traces/{trace_id}", headers={"Authorization": f"Bearer {K1}"})
    assert r.status_code == 404
    # the same request with tracing on is stored (the 404 above is the option, not a failure)
    resp = client.chat.completions.create(**chat(MUL, max_tokens=200), extra_body={"thor": {"trace": True}})
    stored = resp.model_extra["thor"]["trace_id"]
    assert (
        httpx.get(f"{keyed_server.url}/v1/traces/{stored}", headers={"Authorization": f"Bearer {K1}"}).status_code
        == 200
    )


def test_key_file_digests_authenticate(keyed_server) -> None:
    assert [m.id for m in sdk(keyed_server, K3).models.list()] == [MODEL]
    assert [m.id for m in sdk(keyed_server, K2).models.list()] == [MODEL]


def test_redis_holds_no_key_in_clear(keyed_server, redis_srv) -> None:
    import redis

    from server.admission.keys import key_digest, key_id

    for key in (K1, K2):
        resp = sdk(keyed_server, key).chat.completions.create(**chat(MUL, max_tokens=200))
        assert resp.choices[0].finish_reason == "stop"
    r = redis.Redis.from_url(redis_srv.url, decode_responses=True)
    try:
        dump = []
        for k in r.scan_iter("*"):
            kind = r.type(k)
            value = r.get(k) if kind == "string" else json.dumps(r.hgetall(k)) if kind == "hash" else ""
            dump.append(f"{k}={value}")
        text = "\n".join(dump)
        assert "thor:rl:" in text and "thor:trace:" in text
        for secret in (K1, K2):
            assert secret not in text
        owners = {json.loads(r.get(k))["owner"] for k in r.scan_iter("thor:trace:*")}
        assert key_id(key_digest(K1)) in owners and key_id(key_digest(K2)) in owners
    finally:
        r.close()


def test_failed_auth_attempts_are_throttled_per_address(keyed_server) -> None:
    url = keyed_server.url + "/v1/models"
    with client_at("127.0.0.2") as guesser:
        codes = [guesser.get(url, headers={"Authorization": f"Bearer guess-{i}"}).status_code for i in range(3)]
        assert codes == [401, 401, 401]
        throttled = guesser.get(url, headers={"Authorization": "Bearer guess-4"})
        assert throttled.status_code == 429, throttled.text
        validate(throttled.json(), "ErrorResponse")
        assert int(throttled.headers["retry-after"]) >= 1
        assert "failed authentication" in throttled.json()["error"]["message"]
        # while throttled, even the right key gets no answer from this address
        assert guesser.get(url, headers={"Authorization": f"Bearer {K1}"}).status_code == 429
        assert guesser.get(url).status_code == 429  # nor does a request without a key
    # other addresses are not affected
    with client_at("127.0.0.1") as good:
        assert good.get(url, headers={"Authorization": f"Bearer {K1}"}).status_code == 200
        assert good.get(url, headers={"Authorization": "Bearer one-wrong"}).status_code == 401
