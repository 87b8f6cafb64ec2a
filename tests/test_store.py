"""server.store against both backends: MemoryStore and RedisStore on a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from server.store import (
    STORE_UNAVAILABLE,
    MemoryStore,
    RateDecision,
    RedisStore,
    Store,
    create_store,
    is_cacheable,
    tool_cache_key,
)
from tests.support.redis_server import RedisServer, count_redis_traffic, run_redis


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with run_redis() as server:
        yield server


@pytest.fixture
def outage_redis() -> Iterator[RedisServer]:
    """A private redis-server the test may stop, restart and pause."""
    with run_redis() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    s = RedisStore(server.url, key_prefix=f"test-{uuid.uuid4().hex[:8]}:")
    yield s
    await s.close()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- cache


async def test_cache_roundtrip_and_expiry(store: Store) -> None:
    key = tool_cache_key("print(1)", unique("fp"))
    assert await store.cache_get(key) is None
    value = {"stdout": "1\n", "stderr": "", "exit_code": 0, "nested": {"a": [1, 2.5, None]}}
    await store.cache_set(key, value, ttl_s=0.4)
    assert await store.cache_get(key) == value
    await asyncio.sleep(0.6)
    assert await store.cache_get(key) is None


async def test_cache_values_are_copies(store: Store) -> None:
    key = unique("k")
    value = {"out": [1]}
    await store.cache_set(key, value, ttl_s=30)
    value["out"].append(2)
    got = await store.cache_get(key)
    assert got == {"out": [1]}
    assert got is not None
    got["out"].append(3)
    assert await store.cache_get(key) == {"out": [1]}


async def test_cache_rejects_non_json(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.cache_set(unique("k"), {"x": object()}, ttl_s=30)


def test_tool_cache_key() -> None:
    a = tool_cache_key("print(1)", "sandbox-v1")
    assert a == tool_cache_key("print(1)", "sandbox-v1")
    assert len(a) == 64 and int(a, 16) >= 0
    assert a != tool_cache_key("print(1)", "sandbox-v2")
    assert a != tool_cache_key("print(2)", "sandbox-v1")
    # the fingerprint/code boundary cannot be shifted to forge a collision
    assert tool_cache_key("bc", "a") != tool_cache_key("c", "ab")


@pytest.mark.parametrize(
    ("code", "cacheable"),
    [
        ("from sympy import factor, symbols\nx = symbols('x')\nprint(factor(x**2 - 1))", True),
        ("import sympy as sp\nprint(sp.isprime(97), sp.Rational(1, 3) + 1)", True),
        ("import math\nprint(math.comb(10, 3))", True),
        ("import numpy as np\nprint(np.linalg.det(np.array([[1, 2], [3, 4]])))", True),
        ("time = 3\ndistance = 2 * time\nprint(distance)", True),
        ("operand = 5\nprint(operand)", True),
        ("print(len({1, 2, 3}))", True),
        ("import random\nprint(random.randint(1, 6))", False),
        ("from random import choice\nprint(choice([1, 2]))", False),
        ("import secrets\nprint(secrets.randbelow(10))", False),
        ("import time\nprint(time.time())", False),
        ("from time import perf_counter\nprint(perf_counter())", False),
        ("import datetime\nprint(datetime.datetime.now())", False),
        ("from datetime import date\nprint(date.today())", False),
        ("import uuid\nprint(uuid.uuid4())", False),
        ("import os\nprint(os.urandom(4))", False),
        ("import os\nprint(os.getpid())", False),
        ("import numpy as np\nprint(np.random.rand(3))", False),
        ("import numpy.random\nprint(numpy.random.rand())", False),
        ("from numpy import random\nprint(random.rand())", False),
        ("import numpy as np\nrng = np.random.default_rng(0)\nprint(rng.integers(5))", False),
        ("import numpy as np\nprint(np.datetime64('now'))", False),
        ("from sympy import randprime\nprint(randprime(10, 100))", False),
        ("import sympy\nprint(sympy.randprime(10, 100))", False),
        ("from sympy.matrices import randMatrix\nprint(randMatrix(2))", False),
        ("print(hash('abc'))", False),
        ("print(id(object()))", False),
        ("print(eval('2+3'))", False),
        ("m = __import__('random')\nprint(m.random())", False),
        ("import importlib\nprint(importlib.import_module('math').pi)", False),
        ("import threading\nprint(threading.active_count())", False),
        ("print(1", False),  # does not parse
    ],
)
def test_is_cacheable(code: str, cacheable: bool) -> None:
    assert is_cacheable(code) is cacheable


# --------------------------------------------------------------------------- rate limits


async def test_rate_limit_requests(store: Store) -> None:
    key = unique("api-key")
    for _ in range(3):
        assert (await store.rate_limit(key, requests_per_min=3, tokens_per_min=None)).allowed
    denied = await store.rate_limit(key, requests_per_min=3, tokens_per_min=None)
    assert not denied.allowed
    assert denied.limit == "requests"
    assert 15.0 < denied.retry_after_s <= 20.0  # one request per 20 s refills
    # other keys have their own buckets
    assert (await store.rate_limit(unique("api-key"), requests_per_min=3, tokens_per_min=None)).allowed


async def test_rate_limit_refills(store: Store) -> None:
    key = unique("api-key")
    for _ in range(120):
        assert (await store.rate_limit(key, requests_per_min=120, tokens_per_min=None)).allowed
    denied = await store.rate_limit(key, requests_per_min=120, tokens_per_min=None)
    assert not denied.allowed and 0 < denied.retry_after_s <= 0.5
    await asyncio.sleep(denied.retry_after_s + 0.05)
    assert (await store.rate_limit(key, requests_per_min=120, tokens_per_min=None)).allowed


async def test_rate_limit_tokens_and_charge(store: Store) -> None:
    key = unique("api-key")
    ok = await store.rate_limit(key, requests_per_min=None, tokens_per_min=100, tokens=60)
    assert ok == RateDecision(True, 0.0, None)
    denied = await store.rate_limit(key, requests_per_min=None, tokens_per_min=100, tokens=60)
    assert not denied.allowed and denied.limit == "tokens"
    assert 11.0 < denied.retry_after_s <= 12.0  # 20 missing tokens at 100/min
    # completion tokens known only afterwards drive the bucket into debt
    await store.charge_tokens(key, 90)
    denied = await store.rate_limit(key, requests_per_min=None, tokens_per_min=100, tokens=0)
    assert not denied.allowed and denied.limit == "tokens"
    assert 30.0 < denied.retry_after_s <= 31.0  # -50 -> +1 token at 100/min
    # a request larger than the whole bucket is still possible when the bucket is full
    big = unique("api-key")
    assert (await store.rate_limit(big, requests_per_min=None, tokens_per_min=100, tokens=500)).allowed
    assert not (await store.rate_limit(big, requests_per_min=None, tokens_per_min=100, tokens=1)).allowed


async def test_rate_limit_requests_and_tokens_counted_separately(store: Store) -> None:
    key = unique("api-key")
    assert (await store.rate_limit(key, requests_per_min=2, tokens_per_min=1000, tokens=10)).allowed
    assert (await store.rate_limit(key, requests_per_min=2, tokens_per_min=1000, tokens=10)).allowed
    denied = await store.rate_limit(key, requests_per_min=2, tokens_per_min=1000, tokens=10)
    assert not denied.allowed and denied.limit == "requests"
    key2 = unique("api-key")
    denied = await store.rate_limit(key2, requests_per_min=2, tokens_per_min=10, tokens=10)
    assert denied.allowed
    denied = await store.rate_limit(key2, requests_per_min=2, tokens_per_min=10, tokens=10)
    assert not denied.allowed and denied.limit == "tokens"
    # a denied request is not charged: the request bucket still has its second unit
    assert (await store.rate_limit(key2, requests_per_min=2, tokens_per_min=None)).allowed


async def test_rate_limit_no_limits_and_bad_values(store: Store) -> None:
    assert (await store.rate_limit(unique("k"), requests_per_min=None, tokens_per_min=None, tokens=10**9)).allowed
    await store.charge_tokens(unique("never-seen"), 100)  # nothing to charge: no error
    with pytest.raises(ValueError):
        await store.rate_limit("k", requests_per_min=0, tokens_per_min=None)
    with pytest.raises(ValueError):
        await store.rate_limit("k", requests_per_min=None, tokens_per_min=10, tokens=-1)


async def test_replicas_share_limits(redis_server: RedisServer) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    a = RedisStore(redis_server.url, key_prefix=prefix)
    b = RedisStore(redis_server.url, key_prefix=prefix)
    try:
        key = "shared-key"
        results = []
        for i in range(8):
            replica = a if i % 2 == 0 else b
            results.append((await replica.rate_limit(key, requests_per_min=5, tokens_per_min=None)).allowed)
        assert results == [True] * 5 + [False] * 3
        # tokens charged on one replica are seen by the other
        await a.rate_limit("tok-key", requests_per_min=None, tokens_per_min=100, tokens=10)
        await b.charge_tokens("tok-key", 95)
        assert not (await a.rate_limit("tok-key", requests_per_min=None, tokens_per_min=100)).allowed
        # the cache and traces are shared too
        await a.cache_set("k", {"v": 1}, ttl_s=30)
        assert await b.cache_get("k") == {"v": 1}
        await b.trace_put("t", {"events": []}, ttl_s=30, owner="key:abc")
        assert await a.trace_get("t", owner="key:abc") == {"events": []}
        assert await a.trace_get("t", owner="key:other") is None
    finally:
        await a.close()
        await b.close()


async def test_concurrent_requests_are_atomic(redis_server: RedisServer) -> None:
    stores = [RedisStore(redis_server.url, key_prefix="atomic:") for _ in range(3)]
    key = unique("k")
    try:
        decisions = await asyncio.gather(
            *(stores[i % 3].rate_limit(key, requests_per_min=10, tokens_per_min=None) for i in range(30))
        )
        assert sum(d.allowed for d in decisions) == 10
    finally:
        for s in stores:
            await s.close()


async def test_api_keys_are_not_stored_in_clear(redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    s = RedisStore(redis_server.url, key_prefix="clear:")
    secret = unique("sk-secret")
    await s.rate_limit(secret, requests_per_min=5, tokens_per_min=5)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = [k async for k in client.scan_iter("clear:*")]
        assert keys and not any(secret in k for k in keys)
    finally:
        await client.aclose()
        await s.close()


async def test_redis_buckets_carry_no_ttl_and_are_forgotten_once_full(redis_server: RedisServer) -> None:
    """No TTL (under `volatile-lru` a key with one may be evicted, resetting a client's limits); a
    bucket that is full again (the same as an absent one) is deleted by a later call."""
    import asyncio

    import redis.asyncio as aioredis

    s = RedisStore(redis_server.url, key_prefix="nottl:")
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await s.rate_limit("client-1", requests_per_min=600, tokens_per_min=None)  # full again in 0.1 s
        [bucket] = [k async for k in client.scan_iter("nottl:rl:*")]
        assert await client.pttl(bucket) == -1
        await asyncio.sleep(1.3)
        assert await client.exists(bucket)  # nothing ran since
        await s.rate_limit("client-2", requests_per_min=600, tokens_per_min=None)
        assert not await client.exists(bucket)
    finally:
        await client.aclose()
        await s.close()


async def test_memory_rate_limit_with_clock() -> None:
    now = [1000.0]
    s = MemoryStore(clock=lambda: now[0])
    assert (await s.rate_limit("k", requests_per_min=1, tokens_per_min=None)).allowed
    denied = await s.rate_limit("k", requests_per_min=1, tokens_per_min=None)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(60.0)
    now[0] += 30
    denied = await s.rate_limit("k", requests_per_min=1, tokens_per_min=None)
    assert denied.retry_after_s == pytest.approx(30.0)
    now[0] += 30
    assert (await s.rate_limit("k", requests_per_min=1, tokens_per_min=None)).allowed


# --------------------------------------------------------------------------- traces


async def test_traces_with_ttl(store: Store) -> None:
    trace_id = unique("trace")
    assert await store.trace_get(trace_id, owner="key:a") is None
    trace = {"id": trace_id, "events": [{"type": "tool_result", "ok": True, "ms": 12.5}], "text": "é∑"}
    await store.trace_put(trace_id, trace, ttl_s=0.4, owner="key:a")
    assert await store.trace_get(trace_id, owner="key:a") == trace
    await asyncio.sleep(0.6)
    assert await store.trace_get(trace_id, owner="key:a") is None


async def test_traces_are_bound_to_their_owner(store: Store) -> None:
    trace_id = unique("trace")
    await store.trace_put(trace_id, {"secret": "the prompt"}, ttl_s=30, owner="key:0123abcd")
    assert await store.trace_get(trace_id, owner="key:0123abcd") == {"secret": "the prompt"}
    # another client id (or another kind of id with the same text) does not find it
    assert await store.trace_get(trace_id, owner="key:ffffffff") is None
    assert await store.trace_get(trace_id, owner="addr:0123abcd") is None
    with pytest.raises(ValueError, match="owner"):
        await store.trace_put(unique("t"), {}, ttl_s=30, owner="")
    with pytest.raises(ValueError, match="owner"):
        await store.trace_get(trace_id, owner="")


async def test_trace_delete_only_by_its_owner(store: Store) -> None:
    trace_id = unique("trace")
    await store.trace_put(trace_id, {"kept": True}, ttl_s=30, owner="key:a")
    assert await store.trace_delete(trace_id, owner="key:b") is False  # another client's: left alone
    assert await store.trace_get(trace_id, owner="key:a") == {"kept": True}
    assert await store.trace_delete(trace_id, owner="key:a") is True
    assert await store.trace_get(trace_id, owner="key:a") is None
    assert await store.trace_delete(trace_id, owner="key:a") is False  # gone: nothing to delete


async def test_memory_store_is_bounded() -> None:
    s = MemoryStore(max_cache_entries=3)
    for i in range(5):
        await s.cache_set(f"k{i}", {"i": i}, ttl_s=60)
    assert [await s.cache_get(f"k{i}") for i in range(5)] == [None, None, {"i": 2}, {"i": 3}, {"i": 4}]
    # reads refresh recency: k2 survives the next insert, k3 is evicted
    await s.cache_get("k2")
    await s.cache_set("k5", {"i": 5}, ttl_s=60)
    assert await s.cache_get("k2") == {"i": 2}
    assert await s.cache_get("k3") is None


async def test_memory_traces_are_bounded_by_bytes() -> None:
    s = MemoryStore(max_trace_bytes=10_000)
    payload = "x" * 3_000  # each stored trace is a little over 3 kB of JSON
    for i in range(6):
        await s.trace_put(f"t{i}", {"i": i, "text": payload}, ttl_s=60, owner="o")
        assert s.trace_bytes <= 10_000
    # only the newest three fit: the oldest were evicted first
    kept = [i for i in range(6) if await s.trace_get(f"t{i}", owner="o") is not None]
    assert kept == [3, 4, 5]
    # a trace larger than the whole bound is not kept (and evicts nothing)
    await s.trace_put("huge", {"text": "y" * 20_000}, ttl_s=60, owner="o")
    assert await s.trace_get("huge", owner="o") is None
    assert [i for i in range(6) if await s.trace_get(f"t{i}", owner="o") is not None] == [3, 4, 5]
    # replacing a trace releases the bytes of the old one
    before = s.trace_bytes
    await s.trace_put("t5", {"i": 5}, ttl_s=60, owner="o")
    assert s.trace_bytes < before


async def test_status_ping_and_factory(redis_server: RedisServer) -> None:
    mem = create_store(None)
    assert isinstance(mem, MemoryStore) and isinstance(mem, Store)
    assert mem.status == "memory" and await mem.ping()
    red = create_store(redis_server.url, rate_limit_fail_open=False)
    try:
        assert isinstance(red, RedisStore) and isinstance(red, Store)
        assert await red.ping()
        assert red.status == "redis ok"
    finally:
        await red.close()


# --------------------------------------------------------------------------- outage


async def test_outage_and_recovery(outage_redis: RedisServer) -> None:
    events: list[str] = []
    # s never probes by itself during this test (retry interval of an hour): what it sends to
    # Redis during the outage is exactly what the circuit breaker lets through
    s = RedisStore(outage_redis.url, key_prefix="outage:", on_error=events.append, retry_interval_s=3600)
    closed = RedisStore(outage_redis.url, key_prefix="outage:", rate_limit_fail_open=False)
    try:
        await s.cache_set("k", {"v": 1}, ttl_s=60)
        assert await s.cache_get("k") == {"v": 1}
        assert (await closed.rate_limit("key", requests_per_min=100, tokens_per_min=None)).allowed

        outage_redis.stop()

        with count_redis_traffic() as first:
            assert await s.cache_get("k") is None
        # the first failure tries Redis once plus the one immediate retry, then opens the circuit
        assert first.total >= 1 and first.connects <= 2 and first.commands <= 2
        assert s.status == "redis down"
        with count_redis_traffic() as degraded:
            await s.cache_set("k2", {"v": 2}, ttl_s=60)  # skipped, does not raise
            await s.trace_put("t", {"e": 1}, ttl_s=60, owner="o")  # dropped
            assert await s.trace_get("t", owner="o") is None
            assert (await s.rate_limit("key", requests_per_min=1, tokens_per_min=None)).allowed  # fail open
            assert (await s.rate_limit("key", requests_per_min=1, tokens_per_min=None)).allowed
            await s.charge_tokens("key", 10)
        assert degraded.total == 0  # answered from the open circuit: no connection attempt at all
        denied = await closed.rate_limit("key", requests_per_min=100, tokens_per_min=None)
        assert not denied.allowed and denied.limit == STORE_UNAVAILABLE and denied.retry_after_s > 0
        assert s.status == "redis down" and closed.status == "redis down"
        assert not await s.ping()
        assert s.errors_total["cache_get"] >= 1 and s.errors_total["cache_set"] >= 1
        assert s.errors_total["rate_limit"] == 2 and s.errors_total["trace_put"] == 1
        assert s.outages_total == 1
        assert events.count("rate_limit") == 2 and "cache_get" in events

        # many requests during the outage send nothing to Redis (the store does not retry each time)
        with count_redis_traffic() as storm:
            for _ in range(200):
                assert await s.cache_get("k") is None
        assert storm.total == 0
        assert s.errors_total["cache_get"] == 201

        outage_redis.start()  # same port, empty (no persistence)

        assert await s.ping()  # a probe goes through the open circuit and closes it
        assert s.status == "redis ok"
        await s.cache_set("k3", {"v": 3}, ttl_s=60)
        assert await s.cache_get("k3") == {"v": 3}
        assert s.outages_total == 1
        # the Lua script is reloaded transparently (Redis lost its script cache)
        assert (await s.rate_limit("new", requests_per_min=1, tokens_per_min=None)).allowed
        assert not (await s.rate_limit("new", requests_per_min=1, tokens_per_min=None)).allowed
        # the fail-closed store (default 1 s retry interval) recovers by its own periodic probe;
        # the bound below is a liveness limit for a hung test, not a speed requirement
        deadline = time.monotonic() + 60.0
        while not (await closed.rate_limit("key", requests_per_min=100, tokens_per_min=None)).allowed:
            assert time.monotonic() < deadline, "fail-closed store never probed Redis again"
            await asyncio.sleep(0.2)
        assert closed.status == "redis ok"
    finally:
        await s.close()
        await closed.close()


async def test_hung_redis_times_out(outage_redis: RedisServer) -> None:
    """A Redis that accepts connections but never answers (SIGSTOP) costs one timed-out call."""
    s = RedisStore(outage_redis.url, key_prefix="hung:", retry_interval_s=3600)  # probes only via ping()
    try:
        await s.cache_set("k", {"v": 1}, ttl_s=60)
        outage_redis.pause()
        with count_redis_traffic() as traffic:
            assert await s.cache_get("k") is None  # written, never answered: times out
            assert s.status == "redis down" and s.errors_total == {"cache_get": 1}
            sent = traffic.total
            assert (await s.rate_limit("key", requests_per_min=1, tokens_per_min=None)).allowed
            await s.trace_put("t", {}, ttl_s=60, owner="o")
        assert sent >= 1 and traffic.total == sent  # the next calls did not wait on the hung server
        assert s.errors_total == {"cache_get": 1, "rate_limit": 1, "trace_put": 1}
        outage_redis.resume()
        assert await s.ping()  # the probe closes the circuit
        assert s.status == "redis ok"
        assert await s.cache_get("k") == {"v": 1}
    finally:
        outage_redis.resume()
        await s.close()


async def test_unreachable_at_start(outage_redis: RedisServer) -> None:
    """A store created while Redis is down works (degraded) and connects once Redis appears."""
    outage_redis.stop()
    s = RedisStore(outage_redis.url, key_prefix="late:")
    try:
        assert await s.cache_get("k") is None
        assert (await s.rate_limit("key", requests_per_min=1, tokens_per_min=None)).allowed
        outage_redis.start()  # returns once the server answers PING
        assert await s.ping()
        await s.cache_set("k", {"v": 1}, ttl_s=60)
        assert await s.cache_get("k") == {"v": 1}
    finally:
        await s.close()


async def test_refused_and_corrupt_values_degrade_one_operation(redis_server: RedisServer) -> None:
    """A Redis that answers with garbage degrades that read only; the circuit stays closed."""
    import redis.asyncio as aioredis

    prefix = f"corrupt-{uuid.uuid4().hex[:8]}:"
    s = RedisStore(redis_server.url, key_prefix=prefix)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await client.set(f"{prefix}trace:bad", "{not json")
        await client.set(f"{prefix}cache:list", "[1, 2]")
        assert await s.trace_get("bad", owner="o") is None
        assert await s.cache_get("list") is None
        assert s.errors_total == {"trace_get": 1, "cache_get": 1}
        assert s.status == "redis ok" and s.outages_total == 0
        await s.cache_set("fine", {"v": 1}, ttl_s=30)
        assert await s.cache_get("fine") == {"v": 1}
    finally:
        await client.aclose()
        await s.close()
