"""`RedisBackend`: the store's operations on Redis, shared by every replica using the same URL.

Owns: the Redis key layout (`<prefix>cache:<key>`, `<prefix>trace:<id>`,
`<prefix>rl:<digest of the client id>`), JSON encoding of values, the rate-limit
token buckets as one atomic Lua script on Redis's own clock, and the Redis client
with short socket timeouts and one immediate retry (a pooled connection may be stale
after a Redis restart).

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

from .base import RateDecision, check_limits

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
redis.call('PEXPIRE', KEYS[1], math.ceil(full_in * 1000) + 1000)
return {1, '0', ''}
"""


class CorruptValue(ValueError):
    """A stored value that is not a JSON object (written by something else, or truncated)."""


class RedisBackend:
    """Store operations on one Redis; raises on any Redis trouble (see the module docstring)."""

    name = "redis"

    def __init__(self, url: str, *, key_prefix: str = "thor:", socket_timeout_s: float = 0.25) -> None:
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
        self._prefix = key_prefix

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    def _rate_key(self, key: str) -> str:
        # client ids are not secrets, but nothing a client sent is written to Redis as it is
        return self._key("rl", hashlib.sha256(key.encode()).hexdigest()[:32])

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

    async def trace_put(self, trace_id: str, record: dict[str, Any], ttl_s: float) -> None:
        await self._set_json(self._key("trace", trace_id), record, ttl_s)

    async def trace_get(self, trace_id: str) -> dict[str, Any] | None:
        return await self._get_json(self._key("trace", trace_id))

    async def trace_delete(self, trace_id: str) -> None:
        await self._client.delete(self._key("trace", trace_id))

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision:
        check_limits(requests_per_min, tokens_per_min, tokens)
        args = [requests_per_min or 0, tokens_per_min or 0, tokens, 0]
        allowed, wait, limit = await self._script(keys=[self._rate_key(key)], args=args)
        if int(allowed):
            return RateDecision(True)
        return RateDecision(False, float(wait), str(limit))

    async def charge_tokens(self, key: str, tokens: int) -> None:
        await self._script(keys=[self._rate_key(key)], args=[0, 0, tokens, 1])
