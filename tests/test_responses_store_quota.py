"""One client cannot evict another's stored responses or rate-limit state (issue 21).

The in-memory store and a real redis-server configured as the compose file configures it
(its `--maxmemory-policy`, a small `maxmemory`): a client that floods stored responses
evicts only its own oldest (the per-client quota), another client's response and its
rate-limit bucket survive; when many clients together fill Redis, Redis evicts stored
content (it carries TTLs), never a rate-limit bucket (it carries none).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from server.store import MemoryStore, RedisStore, Store
from tests.support.redis_server import RedisServer, run_redis
from tests.support.store_flood import flood_store

ROOT = Path(__file__).resolve().parents[1]
QUOTA = 256 * 1024


def compose_redis_flags() -> dict[str, str]:
    """The redis service's `--flag value` pairs in docker-compose.yml."""
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    return {flag: value for flag, value in itertools.pairwise(command) if str(flag).startswith("--")}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with run_redis() as server:
        yield server


async def limited_redis(server: RedisServer, headroom: int) -> None:
    """The deployed eviction policy, and `headroom` bytes of memory above what Redis uses now."""
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.flushall()
        used = (await client.info("memory"))["used_memory"]
        await client.config_set("maxmemory-policy", compose_redis_flags()["--maxmemory-policy"])
        await client.config_set("maxmemory", str(used + headroom))
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore(trace_quota_bytes=QUOTA, max_trace_bytes=4 * 1024 * 1024)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    await limited_redis(server, 4 * 1024 * 1024)
    s = RedisStore(server.url, key_prefix=f"quota-{uuid.uuid4().hex[:8]}:", trace_quota_bytes=QUOTA)
    yield s
    await s.close()


def test_compose_redis_never_evicts_keys_without_a_ttl() -> None:
    """Rate-limit buckets carry no TTL: only a `volatile-*` policy leaves them alone."""
    assert compose_redis_flags()["--maxmemory-policy"] in ("volatile-lru", "volatile-lfu", "volatile-ttl")


async def test_one_client_flooding_evicts_only_its_own(store: Store) -> None:
    """Client A stores 300 responses of 20 kB (6 MB, 23x its quota, more than the whole store): its oldest go, its newest stay;
    client B's response and spent rate-limit bucket survive."""
    outcome = await flood_store(store, flooders=1, traces=300, trace_bytes=20_000)
    assert outcome.victim_response_kept and outcome.victim_limits_kept
    assert outcome.flooder_latest_kept and not outcome.flooder_oldest_kept
    if isinstance(store, MemoryStore):
        assert store.trace_bytes <= QUOTA + 64 * 1024  # A within its quota (B's one small trace besides)


async def test_many_clients_filling_the_store_never_evict_rate_limits(store: Store) -> None:
    """30 clients at their quota each (7.5 MB) overflow the store (4 MB): stored responses are
    evicted (the biggest holders' oldest in memory, Redis's volatile keys), rate-limit state never."""
    outcome = await flood_store(store, flooders=30, traces=13, trace_bytes=20_000)
    assert outcome.victim_limits_kept
    assert outcome.flooder_latest_kept
    if isinstance(store, MemoryStore):  # the victim holds least: the memory store evicts it last
        assert outcome.victim_response_kept and store.trace_bytes <= 4 * 1024 * 1024


async def test_a_response_larger_than_the_quota_is_not_kept(store: Store) -> None:
    await store.trace_put("resp_small", {"x": "y"}, ttl_s=60, owner="client-c")
    await store.trace_put("resp_huge", {"x": "y" * (QUOTA + 1)}, ttl_s=60, owner="client-c")
    assert await store.trace_get("resp_huge", owner="client-c") is None
    assert await store.trace_get("resp_small", owner="client-c") == {"x": "y"}  # it evicted nothing


async def test_deleting_frees_quota(store: Store) -> None:
    """A deleted response no longer counts: after deleting, a client fills its quota again without
    evicting what it kept."""
    owner = f"client-d-{uuid.uuid4().hex[:6]}"
    payload = "z" * (QUOTA // 4)
    for i in range(3):
        await store.trace_put(f"resp_d{i}", {"x": payload}, ttl_s=60, owner=owner)
    assert await store.trace_delete("resp_d1", owner=owner)
    assert await store.trace_delete("resp_d2", owner=owner)
    for i in range(3, 5):
        await store.trace_put(f"resp_d{i}", {"x": payload}, ttl_s=60, owner=owner)
    assert [await store.trace_get(f"resp_d{i}", owner=owner) is not None for i in (0, 3, 4)] == [True] * 3
