"""Shared state of server replicas: tool-result cache, per-key rate limits, trace store.

Owns: one `Store` interface with two implementations chosen by configuration
(`create_store`): `MemoryStore` (in-process, one replica) and `RedisStore` (Redis,
shared by every replica pointing at the same URL). Also the two helpers that decide
what may be cached: `tool_cache_key` and `is_cacheable`.

Does not own: HTTP (status codes, Retry-After headers), tokens (callers pass token
counts), the engine or the sandbox, metric objects (the lead binds `errors_total` /
`on_error` to Prometheus).

Rate limits are token buckets of one minute's capacity per API key, one bucket for
requests and one for tokens: a bucket holds at most `limit` units, refills
continuously at `limit / 60` units per second, so a burst of one minute's allowance is
possible and afterwards the rate is what the limit says (a sliding window without
window edges). A request is admitted when its request bucket holds one unit and its
token bucket holds the request's tokens (clamped to the bucket size, and at least one
token); `charge_tokens` debits tokens known only afterwards (completion tokens), which
may drive the bucket into debt: later requests wait until it refills.

Resilience of `RedisStore`: a Redis that is down, slow or failing never fails or stalls
a request. Sockets time out after `socket_timeout_s` (0.25 s); after a connection
failure the store is "down" and skips Redis entirely, probing it again once per
`retry_interval_s` (1 s) with the next real operation; the first success brings it
back (logged once). While down: cache reads miss, cache and trace writes are dropped,
trace reads miss, rate limits fail open (allowed) or closed (denied, limit
"store_unavailable"). Every degraded operation is counted in `errors_total[op]` and
reported to `on_error(op)`; logging is one line per outage plus a summary at most
once a minute.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_UNAVAILABLE = "store_unavailable"


# --------------------------------------------------------------------------- cache keys


def tool_cache_key(code: str, sandbox_fingerprint: str) -> str:
    """sha256 over a version tag, the sandbox fingerprint and the code (hex digest)."""
    h = hashlib.sha256(b"thor-tool-result-v1\0")
    fp = sandbox_fingerprint.encode()
    h.update(len(fp).to_bytes(8, "big") + fp)
    h.update(code.encode())
    return h.hexdigest()


# Modules whose import makes a snippet's output depend on time, randomness, the process
# or the outside world.
_NONDETERMINISTIC_MODULES = frozenset({
    "random", "secrets", "time", "datetime", "uuid", "timeit", "tempfile", "zoneinfo",
    "threading", "multiprocessing", "concurrent", "asyncio", "subprocess", "socket",
    "urllib", "http", "requests", "httpx", "resource", "gc", "tracemalloc", "psutil",
    "faker", "hypothesis",
})
# Attribute or name references that read randomness, clocks or process identity without
# importing one of the modules above (os.urandom, np.random.rand, sympy.randprime, ...).
_NONDETERMINISTIC_NAMES = frozenset({
    "urandom", "getrandbits", "getpid", "getppid", "times", "shuffle", "default_rng",
    "uuid1", "uuid4", "now", "utcnow", "today", "perf_counter", "perf_counter_ns",
    "monotonic", "monotonic_ns", "process_time", "time_ns", "token_bytes", "token_hex",
})
# Builtins whose result varies between runs: hash() of str/bytes (PYTHONHASHSEED),
# id() (addresses), input(); and dynamic code the check cannot see into.
_NONDETERMINISTIC_CALLS = frozenset({"hash", "id", "input", "eval", "exec", "compile", "__import__"})


def _nondeterministic_identifier(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("rand") or "random" in lowered or name in _NONDETERMINISTIC_NAMES


def is_cacheable(code: str) -> bool:
    """Whether a snippet's execution result may be cached (a conservative AST check).

    Not cacheable when the snippet does not parse, imports a module from
    `_NONDETERMINISTIC_MODULES` (random, secrets, time, datetime, uuid, threading,
    subprocess, network, ...; also `import numpy.random`, `from numpy import random`),
    references an identifier starting with "rand" or containing "random"
    (np.random.*, sympy.randprime, randMatrix, random_poly, SystemRandom, ...) or one of
    `_NONDETERMINISTIC_NAMES` (os.urandom, os.getpid, .now(), .today(), ...), uses the
    strings "now"/"today" (np.datetime64("now")), or calls hash(), id(), input(),
    eval(), exec(), compile(), __import__() or importlib.

    False positives only cost a cache miss. Known residual cases it cannot see: the
    printed order of a set of strings (depends on PYTHONHASHSEED) and default reprs
    with memory addresses (`<object at 0x...>`); callers should also cache only real
    results (not timeouts or sandbox failures).
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in _NONDETERMINISTIC_MODULES or parts[0] == "importlib" or any(
                    _nondeterministic_identifier(p) for p in parts
                ):
                    return False
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if parts[0] in _NONDETERMINISTIC_MODULES or parts[0] == "importlib":
                return False
            if any(_nondeterministic_identifier(p) for p in parts):
                return False
            if any(_nondeterministic_identifier(a.name) for a in node.names):
                return False
        elif isinstance(node, ast.Name):
            if _nondeterministic_identifier(node.id):
                return False
            if isinstance(node.ctx, ast.Load) and node.id in _NONDETERMINISTIC_CALLS:
                return False
        elif isinstance(node, ast.Attribute):
            if _nondeterministic_identifier(node.attr):
                return False
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.strip().lower() in {"now", "today"}:
                return False
    return True


# --------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class RateDecision:
    """Outcome of `Store.rate_limit`: `limit` names the exhausted bucket when denied
    ("requests", "tokens", or "store_unavailable" when Redis is down and failing closed)."""

    allowed: bool
    retry_after_s: float = 0.0
    limit: str | None = None


@runtime_checkable
class Store(Protocol):
    """Shared server state; every method is safe to call when the backend is down."""

    async def cache_get(self, key: str) -> dict[str, Any] | None: ...

    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None: ...

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision: ...

    async def charge_tokens(self, key: str, tokens: int) -> None: ...

    async def trace_put(self, trace_id: str, trace: dict[str, Any], ttl_s: float) -> None: ...

    async def trace_get(self, trace_id: str) -> dict[str, Any] | None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...

    @property
    def status(self) -> str: ...


def _check_limits(requests_per_min: int | None, tokens_per_min: int | None, tokens: int) -> None:
    for name, value in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None (no limit), got {value}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")


# --------------------------------------------------------------------------- memory


class _TTLCache:
    """LRU-bounded mapping of key -> (expiry on the monotonic clock, JSON text)."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, key: str, now: float) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    def set(self, key: str, text: str, expires: float) -> None:
        self._data[key] = (expires, text)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class _Bucket:
    """Token bucket of one minute's capacity; `level` may go negative (debt)."""

    capacity: int
    level: float
    updated: float

    def refill(self, capacity: int, now: float) -> float:
        self.capacity = capacity
        self.level = min(float(capacity), self.level + (now - self.updated) * capacity / 60.0)
        self.updated = now
        return self.level

    def full_at(self) -> float:
        return self.updated + (self.capacity - self.level) * 60.0 / self.capacity


@dataclass
class _Limits:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None

    def full_at(self) -> float:
        """When both buckets are full again: from then on the entry equals an absent one."""
        return max((b.full_at() for b in (self.requests, self.tokens) if b is not None), default=0.0)


class MemoryStore:
    """In-process store for a single replica: TTL + LRU bounded dicts, monotonic clock."""

    def __init__(
        self, *, max_cache_entries: int = 10_000, max_traces: int = 1_000, max_rate_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._cache = _TTLCache(max_cache_entries)
        self._traces = _TTLCache(max_traces)
        self._limits: OrderedDict[str, _Limits] = OrderedDict()
        self._max_rate_keys = max_rate_keys
        self._calls = 0
        self.errors_total: dict[str, int] = {}  # always empty: kept for the same metrics binding
        self.on_error: Callable[[str], None] | None = None

    @property
    def status(self) -> str:
        return "memory"

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def cache_get(self, key: str) -> dict[str, Any] | None:
        text = self._cache.get(key, self._clock())
        return None if text is None else json.loads(text)

    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        self._cache.set(key, json.dumps(value), self._clock() + ttl_s)

    async def trace_put(self, trace_id: str, trace: dict[str, Any], ttl_s: float) -> None:
        self._traces.set(trace_id, json.dumps(trace), self._clock() + ttl_s)

    async def trace_get(self, trace_id: str) -> dict[str, Any] | None:
        text = self._traces.get(trace_id, self._clock())
        return None if text is None else json.loads(text)

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision:
        _check_limits(requests_per_min, tokens_per_min, tokens)
        if requests_per_min is None and tokens_per_min is None:
            return RateDecision(True)
        now = self._clock()
        self._sweep(now)
        entry = self._limits.get(key) or _Limits()
        waits: list[tuple[float, str]] = []
        if requests_per_min is not None:
            entry.requests = entry.requests or _Bucket(requests_per_min, float(requests_per_min), now)
            level = entry.requests.refill(requests_per_min, now)
            if level < 1.0:
                waits.append(((1.0 - level) * 60.0 / requests_per_min, "requests"))
        if tokens_per_min is not None:
            entry.tokens = entry.tokens or _Bucket(tokens_per_min, float(tokens_per_min), now)
            level = entry.tokens.refill(tokens_per_min, now)
            need = float(min(max(tokens, 1), tokens_per_min))
            if level < need:
                waits.append(((need - level) * 60.0 / tokens_per_min, "tokens"))
        if waits:
            wait, limit = max(waits)
            return RateDecision(False, wait, limit)
        if requests_per_min is not None and entry.requests is not None:
            entry.requests.level -= 1.0
        if tokens_per_min is not None and entry.tokens is not None:
            entry.tokens.level -= tokens
        self._remember(key, entry)
        return RateDecision(True)

    async def charge_tokens(self, key: str, tokens: int) -> None:
        entry = self._limits.get(key)
        if tokens <= 0 or entry is None or entry.tokens is None:
            return
        entry.tokens.refill(entry.tokens.capacity, self._clock())
        entry.tokens.level -= tokens
        self._remember(key, entry)

    def _remember(self, key: str, entry: _Limits) -> None:
        self._limits[key] = entry
        self._limits.move_to_end(key)
        while len(self._limits) > self._max_rate_keys:
            self._limits.popitem(last=False)

    def _sweep(self, now: float) -> None:
        """Every 1024 calls, forget keys whose buckets are full again (same as absent)."""
        self._calls += 1
        if self._calls % 1024:
            return
        for key in [k for k, e in self._limits.items() if e.full_at() <= now]:
            del self._limits[key]


# --------------------------------------------------------------------------- redis

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

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)


class _Failed:
    """Marker: the Redis operation did not happen (down, timed out or errored)."""


_FAILED = _Failed()


class RedisStore:
    """Redis-backed store shared by replicas; degrades to bypass when Redis is unreachable."""

    def __init__(
        self,
        url: str,
        *,
        rate_limit_fail_open: bool = True,
        key_prefix: str = "thor:",
        socket_timeout_s: float = 0.25,
        retry_interval_s: float = 1.0,
        fail_closed_retry_after_s: float = 1.0,
        log_every_s: float = 60.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._redis_error: type[Exception] = RedisError
        self._connection_errors: tuple[type[BaseException], ...] = (
            RedisConnectionError, RedisTimeoutError, *_CONNECTION_ERRORS,
        )
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # one immediate retry: a pooled connection may be stale after a Redis restart
            retry=Retry(NoBackoff(), 1),
            health_check_interval=10,
            decode_responses=True,
        )
        self._script = self._client.register_script(_RATE_LIMIT_LUA)
        self._prefix = key_prefix
        self._fail_open = rate_limit_fail_open
        self._op_timeout_s = 2 * socket_timeout_s + 0.1  # hard bound: connect + one command
        self._retry_interval_s = retry_interval_s
        self._fail_closed_retry_after_s = fail_closed_retry_after_s
        self._log_every_s = log_every_s
        self.on_error = on_error
        self.errors_total: dict[str, int] = {}
        self.outages_total = 0
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._probing = False
        self._degraded_in_outage = 0
        self._last_log = -math.inf
        self._suppressed = 0

    # -- state

    @property
    def status(self) -> str:
        return "redis down" if self._down_since is not None else "redis ok"

    def _count(self, op: str) -> None:
        self.errors_total[op] = self.errors_total.get(op, 0) + 1
        if self.on_error is not None:
            try:
                self.on_error(op)
            except Exception:  # a metrics hook must never break a request
                log.exception("store on_error hook failed")

    def _log_limited(self, message: str, *args: object, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._last_log < self._log_every_s:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar messages suppressed)" if self._suppressed else ""
        log.warning(message + suffix, *args, exc_info=exc)
        self._last_log, self._suppressed = now, 0

    def _mark_down(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        self._next_probe = now + self._retry_interval_s
        if self._down_since is None:
            self._down_since = now
            self._degraded_in_outage = 0
            self.outages_total += 1
            log.warning(
                "redis unreachable during %s (%s: %s): cache bypassed, traces dropped, rate limits fail %s; "
                "retrying every %.1fs", op, type(exc).__name__, exc, "open" if self._fail_open else "closed",
                self._retry_interval_s,
            )
            self._last_log = now

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "redis recovered after %.1fs (%d operations degraded meanwhile)",
                time.monotonic() - self._down_since, self._degraded_in_outage,
            )
            self._down_since = None

    def _degraded(self, op: str) -> None:
        self._count(op)
        if self._down_since is not None:
            self._degraded_in_outage += 1
            self._log_limited(
                "redis still down for %.0fs: %d operations degraded", time.monotonic() - self._down_since,
                self._degraded_in_outage,
            )

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], *, probe: bool = False) -> T | _Failed:
        """Run one Redis call with a hard time bound; never raises for Redis trouble."""
        is_probe = False
        if self._down_since is not None and not probe:
            if self._probing or time.monotonic() < self._next_probe:
                self._degraded(op)
                return _FAILED
            self._probing = is_probe = True
        try:
            async with asyncio.timeout(self._op_timeout_s):
                result = await call()
        except self._connection_errors as exc:
            self._mark_down(op, exc)
            self._degraded(op)
            return _FAILED
        except self._redis_error as exc:  # e.g. OOM, READONLY: Redis is there but refused
            self._mark_up()
            self._degraded(op)
            self._log_limited("redis error during %s: %s: %s", op, type(exc).__name__, exc)
            return _FAILED
        finally:
            if is_probe:
                self._probing = False
        self._mark_up()
        return result

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    async def _get_json(self, op: str, redis_key: str) -> dict[str, Any] | None:
        text = await self._run(op, lambda: self._client.get(redis_key))
        if isinstance(text, _Failed) or text is None:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            self._degraded(op)
            self._log_limited("undecodable value at %s dropped", redis_key)
            return None
        return value if isinstance(value, dict) else None

    async def _set_json(self, op: str, redis_key: str, value: dict[str, Any], ttl_s: float) -> None:
        text = json.dumps(value)  # TypeError for non-JSON values: a caller bug, raised as in MemoryStore
        ttl_ms = max(1, math.ceil(ttl_s * 1000))
        await self._run(op, lambda: self._client.set(redis_key, text, px=ttl_ms))

    # -- interface

    async def ping(self) -> bool:
        return (await self._run("ping", self._client.ping, probe=True)) is True

    async def close(self) -> None:
        await self._client.aclose()

    async def cache_get(self, key: str) -> dict[str, Any] | None:
        return await self._get_json("cache_get", self._key("cache", key))

    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        await self._set_json("cache_set", self._key("cache", key), value, ttl_s)

    async def trace_put(self, trace_id: str, trace: dict[str, Any], ttl_s: float) -> None:
        await self._set_json("trace_put", self._key("trace", trace_id), trace, ttl_s)

    async def trace_get(self, trace_id: str) -> dict[str, Any] | None:
        return await self._get_json("trace_get", self._key("trace", trace_id))

    def _rate_key(self, key: str) -> str:
        # API keys are secrets: only a digest of them is written to Redis
        return self._key("rl", hashlib.sha256(key.encode()).hexdigest()[:32])

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision:
        _check_limits(requests_per_min, tokens_per_min, tokens)
        if requests_per_min is None and tokens_per_min is None:
            return RateDecision(True)
        args = [requests_per_min or 0, tokens_per_min or 0, tokens, 0]
        result = await self._run("rate_limit", lambda: self._script(keys=[self._rate_key(key)], args=args))
        if isinstance(result, _Failed):
            if self._fail_open:
                return RateDecision(True)
            return RateDecision(False, self._fail_closed_retry_after_s, STORE_UNAVAILABLE)
        allowed, wait, limit = result
        if int(allowed):
            return RateDecision(True)
        return RateDecision(False, float(wait), str(limit))

    async def charge_tokens(self, key: str, tokens: int) -> None:
        if tokens <= 0:
            return
        await self._run("charge_tokens", lambda: self._script(keys=[self._rate_key(key)], args=[0, 0, tokens, 1]))


# --------------------------------------------------------------------------- factory


def create_store(
    redis_url: str | None,
    *,
    rate_limit_fail_open: bool = True,
    key_prefix: str = "thor:",
    on_error: Callable[[str], None] | None = None,
    max_cache_entries: int = 10_000,
    max_traces: int = 1_000,
) -> MemoryStore | RedisStore:
    """RedisStore when a URL is given (shared by replicas), MemoryStore otherwise."""
    if redis_url:
        return RedisStore(
            redis_url, rate_limit_fail_open=rate_limit_fail_open, key_prefix=key_prefix, on_error=on_error,
        )
    return MemoryStore(max_cache_entries=max_cache_entries, max_traces=max_traces)
