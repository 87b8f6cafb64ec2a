"""`RedisBackend`: the store's operations on Redis, shared by every replica using the same URL.

Owns: the Redis key layout (`<prefix>cache:<key>`, `<prefix>trace:<id>`,
`<prefix>tq:<digest of the owner>` (an owner's trace ids by age and their sizes),
`<prefix>rl:<digest of the client id>`, `<prefix>rl-full` (when each bucket is full
again)), JSON encoding of values, the rate-limit token buckets and the per-owner trace
quota as atomic Lua scripts on Redis's own clock, and the Redis client with short socket
timeouts and one immediate retry (a pooled connection may be stale after a Redis restart).

Eviction: cached tool results and traces carry TTLs; rate-limit buckets carry none (a
bucket is deleted by the script once it is full again, which equals an absent one), so
under `maxmemory` with a `volatile-*` policy (deploy: `volatile-lru`) Redis evicts stored
content, never rate-limit state. What stops one client evicting another's stored
responses is the quota: `trace_put` keeps an owner's traces within `trace_quota_bytes`
by deleting that owner's own oldest first (a trace larger than the quota is refused).
The scripts name keys they derive (a bucket or trace of the same prefix) besides KEYS:
fine on one Redis, not on Redis Cluster.

Does not own: what happens when Redis is down, slow or refusing: every method here
raises (`connection_errors` for an unreachable or hung Redis, `refusal_errors` for a
Redis that answered with an error or an undecodable value), and `ResilientStore`
(resilient.py) turns that into degraded answers. `RedisStore` in resilient.py is
the two together.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from typing import Any

from server.store.base import RateDecision, check_limits

# Both buckets of one key live in one hash: r/rts (requests level, last update),
# t/tts/tcap (tokens level, last update, capacity for later charges). Time is Redis's
# own clock, so replicas with skewed clocks agree. Numbers cross the Lua boundary as
# strings (a Lua number returned to Redis is truncated to an integer).
_RATE_LIMIT_LUA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local charge_only = ARGV[4] == '1'
local h = redis.call('HMGET', KEYS[1], 'r', 'rts', 't', 'tts', 'tcap')
local function level(v, ts, cap)
  if not v then return cap end
  local lv = tonumber(v) + (now - tonumber(ts)) * cap / 60
  if lv > cap then lv = cap end
  return lv
end
if charge_only then
  if not h[5] then return {1, '0', ''} end
  tpm = tonumber(h[5])
  local t = level(h[3], h[4], tpm) - tokens
  redis.call('HSET', KEYS[1], 't', tostring(t), 'tts', tostring(now))
else
  local wait, limit = 0, ''
  local r, t
  if rpm > 0 then
    r = level(h[1], h[2], rpm)
    if r < 1 then wait = (1 - r) * 60 / rpm; limit = 'requests' end
  end
  if tpm > 0 then
    t = level(h[3], h[4], tpm)
    local need = math.min(math.max(tokens, 1), tpm)
    if t < need then
      local w = (need - t) * 60 / tpm
      if w > wait then wait = w; limit = 'tokens' end
    end
  end
  if limit ~= '' then return {0, tostring(wait), limit} end
  if rpm > 0 then
    redis.call('HSET', KEYS[1], 'r', tostring(r - 1), 'rts', tostring(now), 'rcap', tostring(rpm))
  end
  if tpm > 0 then
    redis.call('HSET', KEYS[1], 't', tostring(t - tokens), 'tts', tostring(now), 'tcap', tostring(tpm))
  end
end
-- forget the key once both buckets are full again (an absent key is a full bucket)
local v = redis.call('HMGET', KEYS[1], 'r', 'rts', 'rcap', 't', 'tts', 'tcap')
local full_in = 0
if v[1] and v[3] then
  local cap = tonumber(v[3])
  full_in = math.max(full_in, (cap - level(v[1], v[2], cap)) * 60 / cap)
end
if v[4] and v[6] then
  local cap = tonumber(v[6])
  full_in = math.max(full_in, (cap - level(v[4], v[5], cap)) * 60 / cap)
end
-- no TTL (a volatile key could be evicted under memory pressure, resetting a client's limits):
-- the bucket is deleted once it is full again, by whichever call comes next
redis.call('ZADD', KEYS[2], now + full_in + 1, KEYS[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 16)
for _, key in ipairs(due) do
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[2], key)
end
return {1, '0', ''}
"""

# A trace and its owner's quota: KEYS = trace key, the owner's index (a hash: trace id ->
# "<seq> <bytes>", plus "#total" and "#seq"). ARGV = trace id, JSON text, ttl ms, quota bytes,
# the trace key prefix. The owner's oldest traces are deleted until the new one fits (one TTL for
# all: the oldest are also the first to expire; expired or evicted ones only count until then).
# Returns the number of traces evicted, or -1 when the trace alone exceeds the quota.
_TRACE_PUT_LUA = """
local id, text, ttl, quota, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local size = string.len(text)
if size > quota then return -1 end
local function forget(tid)
  local entry = redis.call('HGET', KEYS[2], tid)
  if not entry then return end
  local bytes = tonumber(string.match(entry, ' (%d+)$'))
  redis.call('HINCRBY', KEYS[2], '#total', -bytes)
  redis.call('HDEL', KEYS[2], tid)
end
forget(id)
local total = tonumber(redis.call('HGET', KEYS[2], '#total') or '0')
local evicted = 0
if total + size > quota then
  local entries = redis.call('HGETALL', KEYS[2])
  local order = {}
  for i = 1, #entries, 2 do
    local tid = entries[i]
    if string.sub(tid, 1, 1) ~= '#' then
      table.insert(order, {tonumber(string.match(entries[i + 1], '^(%d+) ')), tid})
    end
  end
  table.sort(order, function(a, b) return a[1] < b[1] end)
  for _, e in ipairs(order) do
    if total + size <= quota then break end
    forget(e[2])
    redis.call('DEL', prefix .. e[2])
    total = tonumber(redis.call('HGET', KEYS[2], '#total') or '0')
    evicted = evicted + 1
  end
end
local seq = redis.call('HINCRBY', KEYS[2], '#seq', 1)
redis.call('HSET', KEYS[2], id, seq .. ' ' .. size)
redis.call('HINCRBY', KEYS[2], '#total', size)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('SET', KEYS[1], text, 'PX', ttl)
return evicted
"""

# Delete a trace and its entry in its owner's index: KEYS = trace key, the owner's index; ARGV = id.
_TRACE_DELETE_LUA = """
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if entry then
  redis.call('HINCRBY', KEYS[2], '#total', -tonumber(string.match(entry, ' (%d+)$')))
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return redis.call('DEL', KEYS[1])
"""


class CorruptValue(ValueError):
    """A stored value that is not a JSON object (written by something else, or truncated)."""


class RedisBackend:
    """Store operations on one Redis; raises on any Redis trouble (see the module docstring)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "thor:",
        socket_timeout_s: float = 0.25,
        trace_quota_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.connection_errors: tuple[type[BaseException], ...] = (
            RedisConnectionError,
            RedisTimeoutError,
            OSError,
            asyncio.TimeoutError,
        )
        self.refusal_errors: tuple[type[BaseException], ...] = (RedisError, CorruptValue)
        # hard bound for one operation: connect + one command
        self.op_timeout_s = 2 * socket_timeout_s + 0.1
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=10,
            decode_responses=True,
        )
        self._script = self._client.register_script(_RATE_LIMIT_LUA)
        self._trace_put = self._client.register_script(_TRACE_PUT_LUA)
        self._trace_delete = self._client.register_script(_TRACE_DELETE_LUA)
        self._prefix = key_prefix
        self._full_key = f"{key_prefix}rl-full"
        if trace_quota_bytes < 1:
            raise ValueError(f"trace_quota_bytes must be >= 1, got {trace_quota_bytes}")
        self.trace_quota_bytes = trace_quota_bytes

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    def _rate_key(self, key: str) -> str:
        # client ids are not secrets, but nothing a client sent is written to Redis as it is
        return self._key("rl", hashlib.sha256(key.encode()).hexdigest()[:32])

    def _quota_key(self, owner: str) -> str:
        return self._key("tq", hashlib.sha256(owner.encode()).hexdigest()[:32])

    async def _get_json(self, redis_key: str) -> dict[str, Any] | None:
        text = await self._client.get(redis_key)
        if text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise CorruptValue(f"undecodable value at {redis_key}") from exc
        if not isinstance(value, dict):
            raise CorruptValue(f"value at {redis_key} is not a JSON object")
        return value

    async def _set_json(self, redis_key: str, value: dict[str, Any], ttl_s: float) -> None:
        text = json.dumps(value)  # TypeError for non-JSON values: a caller bug, raised as in MemoryStore
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        await self._client.set(redis_key, text, px=ttl_ms)

    async def ping(self) -> bool:
        return bool(await self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()

    async def cache_get(self, key: str) -> dict[str, Any] | None:
        return await self._get_json(self._key("cache", key))

    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        await self._set_json(self._key("cache", key), value, ttl_s)

    async def trace_put(self, trace_id: str, record: dict[str, Any], ttl_s: float, *, owner: str) -> int:
        """Store `owner`'s trace within the owner's quota; the number of the owner's oldest traces it
        evicted, or -1 when it alone exceeds the quota (not stored)."""
        text = json.dumps(record)  # TypeError for non-JSON values: a caller bug, raised as in MemoryStore
        args = [trace_id, text, max(1, math.ceil(ttl_s * 1000)), self.trace_quota_bytes, self._key("trace", "")]
        return int(await self._trace_put(keys=[self._key("trace", trace_id), self._quota_key(owner)], args=args))

    async def trace_get(self, trace_id: str) -> dict[str, Any] | None:
        return await self._get_json(self._key("trace", trace_id))

    async def trace_delete(self, trace_id: str, *, owner: str) -> None:
        await self._trace_delete(keys=[self._key("trace", trace_id), self._quota_key(owner)], args=[trace_id])

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision:
        check_limits(requests_per_min, tokens_per_min, tokens)
        args = [requests_per_min or 0, tokens_per_min or 0, tokens, 0]
        allowed, wait, limit = await self._script(keys=[self._rate_key(key), self._full_key], args=args)
        if int(allowed):
            return RateDecision(True)
        return RateDecision(False, float(wait), str(limit))

    async def charge_tokens(self, key: str, tokens: int) -> None:
        await self._script(keys=[self._rate_key(key), self._full_key], args=[0, 0, tokens, 1])
