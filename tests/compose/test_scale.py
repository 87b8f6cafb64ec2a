"""The scale-out shape (deploy/docker-compose.scale.yml), started for real on the cpu profile.

After tests/compose/test_stack.py, scripts/compose-test.sh re-ups the stack with the scale
override (and deploy/docker-compose.scale-cpu.yml): two server replicas behind the HAProxy
load balancer, which takes the published port, two sandbox replicas, one Redis, and
Prometheus discovering every replica through Docker's DNS. These checks, in file order:

- Prometheus scrapes each replica as its own target, and the load balancer;
- the load balancer spreads requests over both server replicas, and the servers' tool calls
  (through its sandbox frontend) over both sandbox replicas;
- the rate limits and the tool cache are shared through Redis: a client's budget is one
  budget whichever replica serves it, and a replica serves from the cache a result that
  the other replica computed;
- a replica that stops is routed around without a failed request, and Prometheus's `up`
  (what the ThorServerDown alert reads) shows the stopped one.
"""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from tests.compose.test_stack import (
    ROOT,
    Stack,
    chat,
    completion,
    compose,
    metric_total,
    query,
    redis_cli,
    stack_from_env,
)

REPLICAS = 2
SCRAPE_WAIT_S = 120


@pytest.fixture(scope="module")
def stack() -> Stack:
    if os.environ.get("THOR_STACK_SCALED") != "1":
        pytest.fail("no scaled-out stack (THOR_STACK_SCALED unset): run these checks with `make compose-test`")
    return stack_from_env()


def replica_metrics(service: str, index: int, port: int) -> str:
    """One replica's own /metrics, read inside its container (replicas publish no port)."""
    url = f"http://127.0.0.1:{port}/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode())"
    return compose("exec", "-T", "--index", str(index), service, "python", "-c", code)


def per_replica(stack: Stack, name: str, **labels: str) -> list[float]:
    """A server metric on each server replica."""
    return [
        metric_total(replica_metrics(stack.server_service, i, 8000), name, **labels) for i in range(1, REPLICAS + 1)
    ]


def test_prometheus_scrapes_every_replica_and_the_load_balancer(stack):
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while True:
        targets = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        up: dict[str, int] = {}
        for t in targets:
            up[t["labels"]["job"]] = up.get(t["labels"]["job"], 0) + (t["health"] == "up")
        if up == {"thor-server": REPLICAS, "thor-sandbox": REPLICAS, "thor-lb": 1, "prometheus": 1}:
            break
        assert time.monotonic() < deadline, f"targets up per job: {up}"
        time.sleep(2)


def test_the_load_balancer_spreads_requests_over_the_replicas(stack):
    route = {"route": "/v1/completions"}
    before = per_replica(stack, "thor_requests_total", **route)
    codes = [completion(stack, stack.key).status_code for _ in range(10)]
    assert codes == [200] * 10, codes
    served = [b - a for a, b in zip(before, per_replica(stack, "thor_requests_total", **route), strict=True)]
    assert sum(served) == 10 and min(served) >= 2, f"requests per replica: {served}"


def test_a_clients_rate_limit_is_one_budget_across_replicas(stack):
    redis_cli("FLUSHDB")  # fresh buckets
    limit = int(os.environ.get("THOR_REQUESTS_PER_MINUTE", "20"))
    route = {"route": "/v1/completions", "status": "200"}
    before = per_replica(stack, "thor_requests_total", **route)
    start, codes = time.monotonic(), []
    while 429 not in codes and len(codes) < 2 * REPLICAS * limit:
        codes.append(completion(stack, stack.limited_key).status_code)
    elapsed = time.monotonic() - start
    served = [b - a for a, b in zip(before, per_replica(stack, "thor_requests_total", **route), strict=True)]
    # one bucket: `limit` at once plus its refill while we sent (limit per minute); one
    # bucket per replica would admit `limit` on each replica (REPLICAS x limit in all)
    admitted = codes.count(200)
    assert 429 in codes, f"never refused after {admitted} requests in {elapsed:.0f} s"
    assert admitted <= limit + elapsed * limit / 60 + 1 < REPLICAS * limit, (admitted, elapsed, codes)
    assert min(served) >= 1, f"both replicas served the client: {served}"


def test_a_tool_result_computed_by_one_replica_is_served_from_cache_by_the_other(stack):
    redis_cli("FLUSHDB")
    client_kw = {"headers": {"Authorization": f"Bearer {stack.key}"}, "timeout": 300}
    route = {"route": "/v1/chat/completions"}
    before = per_replica(stack, "thor_requests_total", **route)
    hits_before = per_replica(stack, "thor_tool_cache_hits_total")
    cached = []
    for _ in range(3):
        r = httpx.post(stack.url + "/v1/chat/completions", json=chat(max_tokens=400), **client_kw)
        assert r.status_code == 200, r.text
        calls = r.json()["thor"]["choices"][0]["tool_calls"]
        assert calls and "56211" in calls[0]["stdout"], calls
        cached.append(calls[0]["cached"])
    served = [b - a for a, b in zip(before, per_replica(stack, "thor_requests_total", **route), strict=True)]
    hits = [b - a for a, b in zip(hits_before, per_replica(stack, "thor_tool_cache_hits_total"), strict=True)]
    assert cached == [False, True, True], cached
    assert min(served) >= 1, f"chat requests per replica: {served}"
    # both replicas served, only the first request ran the code: the replica that did not
    # serve it answered from the result the other one stored in Redis
    assert sum(hits) == 2, (served, hits)


def sandbox_executions(index: int) -> float:
    """thor_sandbox_executions_total of one sandbox replica."""
    return metric_total(replica_metrics("sandbox", index, 8080), "thor_sandbox_executions_total")


def test_tool_calls_are_balanced_over_the_sandbox_replicas(stack):
    """The servers' --sandbox-url is the load balancer's sandbox frontend: calls spread per call."""
    before = [sandbox_executions(i) for i in range(1, REPLICAS + 1)]
    code = """
import httpx
with httpx.Client(timeout=60) as c:  # one kept-alive connection, as a server's pool has
    for i in range(8):
        r = c.post("http://lb:8080/v1/execute", json={"snippets": [{"code": f"print({i} * 7)"}]})
        assert r.status_code == 200 and r.json()["results"][0]["stdout"] == f"{i * 7}\\n", r.text
print("ok")
"""
    assert compose("exec", "-T", stack.server_service, "python", "-", stdin=code).strip() == "ok"
    ran = [b - a for a, b in zip(before, [sandbox_executions(i) for i in range(1, REPLICAS + 1)], strict=True)]
    assert sum(ran) == 8 and min(ran) >= 2, f"snippets per sandbox replica: {ran}"


def test_a_stopped_replica_is_routed_around(stack):
    project = os.environ.get("COMPOSE_PROJECT_NAME", "thor")
    name = f"{project}-{stack.server_service}-1"
    subprocess.run(["docker", "stop", "--time", "5", name], cwd=ROOT, check=True, capture_output=True, timeout=60)
    codes = [completion(stack, stack.key).status_code for _ in range(8)]
    assert codes == [200] * 8, f"with {name} stopped: {codes}"
    # Prometheus sees the stopped replica down (ThorServerDown fires per replica after its `for:`)
    deadline = time.monotonic() + SCRAPE_WAIT_S
    # (instances discovered through DNS are addresses; a series of an earlier static target
    # may linger in a kept Prometheus volume)
    replicas = 'up{job="thor-server", instance=~"[0-9.]+:8000"}'
    while not query(stack, f"{replicas} == 0"):
        assert time.monotonic() < deadline, "Prometheus never saw the stopped replica down"
        time.sleep(2)
    assert len(query(stack, f"{replicas} == 1")) == REPLICAS - 1
