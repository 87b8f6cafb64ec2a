"""The compose stack's CPU profile, started for real (`make compose-test`), checked from outside.

scripts/compose-test.sh builds the images, runs `docker compose --profile cpu up -d --wait`
and then these tests, in file order, against the running containers:

- the server's /health (vLLM engine, sandbox container, Redis container);
- a streamed chat completion through the official `openai` SDK, every chunk validated
  against OpenAI's published schema, whose tool round really ran in the sandbox container;
- the tool-result cache and the rate limits, shown to live in the Redis container (flush
  or delete its keys and the server's behaviour changes accordingly), and a Redis outage
  (`docker compose pause redis`) degrading the server instead of failing it;
- the sandbox's isolation from inside the stack: the attack battery's network and
  filesystem cases run in the sandbox container's jails, with the stack's real neighbours
  (server, Redis, the internet) as targets, plus back-pressure (queue full -> 503);
- Prometheus (its own container) scraping the server and the sandbox, and every Grafana
  dashboard query and every alert expression returning data from that live scrape.

Grafana's image cannot be fetched here; its provisioning is checked by tests/test_deploy.py.
Outside `make compose-test` these tests fail at once (no stack): they are not collected
by `make test` (pyproject's norecursedirs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.openapi import validate
from tests.test_deploy import DASHBOARD, rule_exprs, substitute
from tests.test_deploy import dashboard_exprs as all_dashboard_exprs

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What is 123*457? Use Python."
# Prometheus scrapes every 15 s; rates need two samples. Waits end when the data is there;
# this bound only stops a hung check.
SCRAPE_WAIT_S = 150


@dataclass(frozen=True)
class Stack:
    url: str
    prometheus: str
    key: str
    limited_key: str
    server_service: str


def stack_from_env() -> Stack:
    """The running stack as scripts/compose-test.sh describes it in the environment."""
    names = ["THOR_STACK_URL", "THOR_STACK_PROMETHEUS", "THOR_STACK_KEY", "THOR_STACK_LIMITED_KEY"]
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.fail(f"no running stack ({', '.join(missing)} unset): run these checks with `make compose-test`")
    return Stack(
        url=os.environ["THOR_STACK_URL"],
        prometheus=os.environ["THOR_STACK_PROMETHEUS"],
        key=os.environ["THOR_STACK_KEY"],
        limited_key=os.environ["THOR_STACK_LIMITED_KEY"],
        server_service=os.environ.get("THOR_STACK_SERVER_SERVICE", "server-cpu"),
    )


@pytest.fixture(scope="module")
def stack() -> Stack:
    return stack_from_env()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.key, max_retries=0, timeout=300)


def compose(*args: str, stdin: str | None = None, timeout: float = 300) -> str:
    """`docker compose ARGS` on the stack (project and profile from the environment); stdout."""
    proc = subprocess.run(
        ["docker", "compose", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"docker compose {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def redis_cli(*args: str) -> str:
    return compose("exec", "-T", "redis", "redis-cli", *args)


def redis_keys(pattern: str) -> list[str]:
    return redis_cli("--scan", "--pattern", pattern).split()


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (with these labels) in a Prometheus text exposition."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def metric(url: str, name: str, **labels: str) -> float:
    return metric_total(httpx.get(url + "/metrics", timeout=10).text, name, **labels)


def chat(**kw) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, **kw}


# --- the server, the engine and the sandbox container ---------------------------------------


def test_health_covers_engine_sandbox_and_redis(stack):
    r = httpx.get(stack.url + "/health", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok", body
    assert body["engine"]["status"] == "ok" and body["engine"]["model"] == "Qwen2.5-Coder-0.5B-Instruct"
    assert body["sandbox"]["status"] == "ok" and body["sandbox"]["workers_ready"] >= 1
    assert body["store"] == {"status": "redis ok", "ok": True}


def test_api_needs_a_key(stack):
    r = httpx.get(stack.url + "/v1/models", timeout=10)
    assert r.status_code == 401, r.text
    r = httpx.get(stack.url + "/v1/models", headers={"Authorization": f"Bearer {stack.key}"}, timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "Qwen2.5-Coder-0.5B-Instruct"


def test_streamed_chat_runs_a_tool_round_in_the_sandbox_container(stack, client):
    redis_cli("FLUSHDB")  # an empty tool cache, also when the checks run again on a kept stack
    before = metric(stack.url, "thor_tool_calls_total")
    stream = client.chat.completions.create(**chat(max_tokens=400), stream=True, stream_options={"include_usage": True})
    reasoning, content, events, usage = "", "", [], None
    for chunk in stream:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            extra = ch.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            content += ch.delta.content or ""
            if "thor" in extra:
                events.append(extra["thor"])
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["tool_call", "tool_result"], events
    call, result = events[0], events[1]
    assert "123" in call["code"] and "457" in call["code"], call
    assert result["ok"] and "56211" in result["observation"], result
    assert not result.get("cached"), "the first run of this code must execute, not come from the cache"
    assert "```output\n" in reasoning and "56211" in reasoning
    assert usage is not None and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert metric(stack.url, "thor_tool_calls_total") >= before + 1


# --- Redis: the tool cache, the rate limits, an outage ----------------------------------------


def tool_calls(client) -> list[dict]:
    resp = client.chat.completions.create(**chat(max_tokens=400))
    return resp.model_extra["thor"]["choices"][0]["tool_calls"]


def test_tool_results_are_cached_in_the_redis_container(stack, client):
    assert redis_keys("thor:cache:*"), "the first tool round left no cache entry in Redis"
    hits = metric(stack.url, "thor_tool_cache_hits_total")
    calls = tool_calls(client)  # the same greedy request: the same code
    assert calls and calls[0]["cached"] and "56211" in calls[0]["stdout"], calls
    assert metric(stack.url, "thor_tool_cache_hits_total") == hits + len([c for c in calls if c["cached"]])
    # the cache is Redis's: emptied there, the same code runs in the sandbox again
    redis_cli("FLUSHDB")
    calls = tool_calls(client)
    assert calls and not calls[0]["cached"] and "56211" in calls[0]["stdout"], calls
    assert redis_keys("thor:cache:*")


def completion(stack, key: str) -> httpx.Response:
    return httpx.post(
        stack.url + "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "default", "prompt": "1+1=", "max_tokens": 1, "temperature": 0},
        timeout=60,
    )


def test_rate_limits_are_counted_in_the_redis_container(stack):
    limit = int(os.environ.get("THOR_REQUESTS_PER_MINUTE", "20"))
    start, codes = time.monotonic(), []
    while 429 not in codes and len(codes) < 3 * limit:
        codes.append(completion(stack, stack.limited_key).status_code)
    elapsed = time.monotonic() - start
    admitted = codes.count(200)
    assert 429 in codes, f"{limit} requests/min never refused after {admitted} requests in {elapsed:.0f} s"
    # `limit` at once plus the bucket's refill while we sent (limit per minute): on a slow day
    # the requests take long enough for the refill to matter
    assert limit - 1 <= admitted <= limit + elapsed * limit / 60 + 1, (admitted, elapsed, codes)
    refused = completion(stack, stack.limited_key)
    assert refused.status_code == 429 and refused.headers.get("retry-after"), refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # the other key has its own bucket
    assert completion(stack, stack.key).status_code == 200
    # the buckets are Redis keys: deleted there, the exhausted client is admitted again
    buckets = redis_keys("thor:rl:*")
    assert len(buckets) >= 2, buckets
    redis_cli("DEL", *buckets)
    assert completion(stack, stack.limited_key).status_code == 200


def test_a_redis_outage_degrades_instead_of_failing(stack, client):
    errors = metric(stack.url, "thor_store_errors_total")
    compose("pause", "redis")
    try:
        health = httpx.get(stack.url + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
        calls = tool_calls(client)  # cache and limiter unreachable: served anyway, uncached
        assert calls and not calls[0]["cached"] and "56211" in calls[0]["stdout"], calls
    finally:
        compose("unpause", "redis")
    assert metric(stack.url, "thor_store_errors_total") > errors
    deadline = time.monotonic() + 60
    while httpx.get(stack.url + "/health", timeout=30).json()["status"] != "ok":
        assert time.monotonic() < deadline, "the server did not see Redis come back"
        time.sleep(1)


# --- the sandbox container's isolation, from inside the stack ---------------------------------

# Runs in the server's container (on the backend network, as the server is): resolves the
# stack's service names, then sends PAYLOAD's snippets to the sandbox and prints its answer.
EXECUTE = """
import json, os, socket, sys, httpx
if sys.argv[1:] == ["resolve"]:
    print(json.dumps({n: socket.gethostbyname(n) for n in ("server", "redis", "sandbox", "prometheus")}))
else:
    r = httpx.post("http://sandbox:8080/v1/execute", json=json.loads(os.environ["PAYLOAD"]), timeout=120)
    print(json.dumps({"status": r.status_code, "body": r.json()}))
"""


def in_server(stack, *args: str, payload: dict | None = None) -> dict:
    env = ["-e", f"PAYLOAD={json.dumps(payload)}"] if payload is not None else []
    out = compose("exec", "-T", *env, stack.server_service, "python", "-", *args, stdin=EXECUTE)
    return json.loads(out)


def run_in_jail(stack, code: str, **extra) -> dict:
    answer = in_server(stack, payload={"snippets": [{"code": code, **extra}]})
    assert answer["status"] == 200, answer
    return answer["body"]["results"][0]


@pytest.fixture(scope="module")
def neighbours(stack) -> dict[str, str]:
    return in_server(stack, "resolve")


def test_jailed_code_reaches_no_neighbour_and_no_internet(stack, neighbours):
    targets = [
        ("127.0.0.1", 8080),  # the sandbox service itself
        (neighbours["sandbox"], 8080),
        (neighbours["server"], 8000),
        (neighbours["redis"], 6379),
        (neighbours["prometheus"], 9090),
        ("1.1.1.1", 443),
        ("8.8.8.8", 53),
    ]
    code = f"""
import socket
for host, port in {targets!r}:
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect((host, port)); print("CONNECTED", host, port)
    except OSError as e:
        print("refused", host, port, type(e).__name__)
try:
    print(socket.getaddrinfo("redis", 6379)); print("RESOLVED")
except OSError as e:
    print("no dns:", type(e).__name__)
print(sorted(n for _, n in socket.if_nameindex()))
"""
    r = run_in_jail(stack, code)
    assert r["outcome"] == "ok", r
    assert "CONNECTED" not in r["stdout"] and "RESOLVED" not in r["stdout"], r["stdout"]
    assert r["stdout"].count("refused") == len(targets), r["stdout"]
    assert r["stdout"].splitlines()[-1] == "['lo']"


def test_the_sandbox_container_itself_has_no_route_out(stack, neighbours):
    code = """
import socket
for host, port in [("1.1.1.1", 443), ("8.8.8.8", 53)]:
    try:
        socket.create_connection((host, port), timeout=3); print("CONNECTED", host)
    except OSError as e:
        print("no route", host, type(e).__name__)
"""
    out = compose("exec", "-T", "sandbox", "python", "-", stdin=code)
    assert "CONNECTED" not in out and out.count("no route") == 2, out


@pytest.mark.parametrize(
    "path",
    [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/home",
        "/opt/service",  # the service's own virtual environment
        "/run/thor-sandbox",  # the service's nsjail configs
        "/sys/fs/cgroup",
        "/proc/1/environ",
    ],
)
def test_jailed_code_sees_no_container_files(stack, path):
    r = run_in_jail(
        stack,
        f"""
import os
print(os.path.exists({path!r}))
try:
    open({path!r}).read(); print("READ")
except OSError as e:
    print(type(e).__name__)
""",
    )
    assert "READ" not in r["stdout"], r
    if not path.startswith("/proc"):
        assert r["stdout"].splitlines()[0] == "False", r


@pytest.mark.parametrize("target", ["/x", "/opt/python/evil.py", "/usr/lib/evil", "/etc/evil", "/dev/evil"])
def test_jailed_code_cannot_write_outside_tmp(stack, target):
    r = run_in_jail(stack, f"open({target!r}, 'w').write('x'); print('WROTE')")
    assert "WROTE" not in r["stdout"] and r["outcome"] == "error", r


def test_jailed_identity_is_unprivileged(stack):
    r = run_in_jail(
        stack,
        "import os\nprint(os.getuid(), os.getgid())\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
        "print(' '.join(open('/proc/self/uid_map').read().split()))",
    )
    uid, caps, uid_map = r["stdout"].splitlines()
    assert uid == "1000 1000" and int(caps, 16) == 0, r
    inside, outside, _count = uid_map.split()
    assert inside == "1000" and outside != "0", uid_map  # never the container's root


def test_a_runaway_snippet_is_killed_and_its_worker_replaced(stack):
    r = run_in_jail(stack, "while True: pass", timeout=1)
    assert r["outcome"] == "timeout", r
    r = run_in_jail(stack, "import sympy; print(sympy.factor('x**2-1'))")
    assert r["outcome"] == "ok" and r["stdout"] == "(x - 1)*(x + 1)\n", r


def test_a_full_queue_is_refused_with_503(stack):
    """More snippets than workers plus queue (THOR_SANDBOX_MAX_QUEUE in compose-test.sh): some are
    refused at once with 503 and Retry-After, the rest run."""
    pool = int(os.environ.get("THOR_SANDBOX_POOL_SIZE", "4"))
    queue = int(os.environ.get("THOR_SANDBOX_MAX_QUEUE", "64"))
    burst = pool + queue + 6
    code = f"""
import asyncio, httpx
async def one(c):
    r = await c.post("http://sandbox:8080/v1/execute",
                     json={{"snippets": [{{"code": "import time; time.sleep(2)"}}]}}, timeout=120)
    return r.status_code, r.headers.get("retry-after")
async def main():
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections={burst})) as c:
        print(json.dumps(await asyncio.gather(*[one(c) for _ in range({burst})])))
asyncio.run(main())
"""
    out = compose("exec", "-T", stack.server_service, "python", "-", stdin="import json\n" + code)
    answers = json.loads(out)  # [status, retry-after] pairs
    refused = [a for a in answers if a[0] == 503]
    assert refused and all(a[1] for a in refused), answers
    assert len([a for a in answers if a[0] == 200]) >= pool, answers


# --- Prometheus: the live scrape ------------------------------------------------------------


def query(stack, expr: str) -> list:
    r = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def test_prometheus_scrapes_the_server_and_the_sandbox(stack):
    targets = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
    assert health == {"thor-server": ("up", ""), "thor-sandbox": ("up", ""), "prometheus": ("up", "")}, health
    assert {t["scrapeUrl"] for t in targets if t["labels"]["job"].startswith("thor-")} == {
        "http://server:8000/metrics",
        "http://sandbox:8080/metrics",
    }


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(title, substitute(expr)) for title, expr in all_dashboard_exprs(json.loads(DASHBOARD.read_text()))]


def test_every_dashboard_query_returns_data_from_the_live_scrape(stack):
    """The traffic above (tool calls, cache hits, 429s, store errors, a timeout, 503s) has
    given every panel something to show; rates need two scrapes after it."""
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        empty = [f"{title}: {expr}" for title, expr in dashboard_exprs() if not query(stack, expr)]
        if not empty:
            break
        assert time.monotonic() < deadline, "dashboard queries without data from the live scrape:\n" + "\n".join(empty)
        time.sleep(3)
    statuses = {r["metric"]["status"] for r in query(stack, "sum by (status) (rate(thor_requests_total[5m]))")}
    assert {"200", "429"} <= statuses, statuses
    outcomes = {r["metric"]["outcome"] for r in query(stack, "sum by (outcome) (thor_sandbox_executions_total)")}
    assert {"ok", "error", "timeout"} <= outcomes, outcomes


def left_hand_side(expr: str) -> str:
    """An alert expression without its final threshold comparison (`... > 0.05` -> `...`)."""
    return re.sub(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.e+-]+\s*$", "", expr.strip())


def test_every_alert_rule_loads_and_its_expression_has_data(stack):
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        missing = [name for name, expr in rule_exprs() if not query(stack, left_hand_side(expr))]
        if rules and all(r["health"] == "ok" for r in rules.values()) and not missing:
            break
        assert time.monotonic() < deadline, (
            f"rules {[(n, r['health'], r.get('lastError')) for n, r in rules.items()]}, no data: {missing}"
        )
        time.sleep(3)
    assert set(rules) == {name for name, _ in rule_exprs()}
    # a healthy stack: the outage alerts are quiet
    assert rules["ThorServerDown"]["state"] == "inactive" and rules["ThorSandboxDown"]["state"] == "inactive"
