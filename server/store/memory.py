"""`MemoryStore`: the in-process `Store` of a single replica.

Owns: TTL + LRU bounded mappings for cached tool results and traces, and the token
buckets of the rate limits, all on a monotonic clock. Traces are bounded by the total
size of their JSON text (`max_trace_bytes`, oldest evicted first) as well as by their
TTL, so a server that keeps every trace of large trajectories cannot run out of
memory; a single trace larger than the whole bound is not kept. Rate-limit entries are
bounded by count and forgotten once their buckets are full again.

Does not own: the interface and the bucket semantics (base.py), shared state across
replicas (redis_backend.py), HTTP or metrics.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import RateDecision, check_limits, check_owner, trace_for, trace_record

log = logging.getLogger(__name__)


class _TTLCache:
    """Mapping of key -> (expiry on the monotonic clock, JSON text), bounded by entry
    count and, optionally, by the total length of the texts; least recently used first out."""

    def __init__(self, max_entries: int, max_bytes: int | None = None) -> None:
        if max_entries < 1 or (max_bytes is not None and max_bytes < 1):
            raise ValueError(f"cache bounds must be >= 1, got max_entries={max_entries}, max_bytes={max_bytes}")
        self._max = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def get(self, key: str, now: float) -> str | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return item[1]

    def set(self, key: str, text: str, expires: float) -> bool:
        """Store `text`; False (and nothing stored) when it alone exceeds the byte bound."""
        self._drop(key)
        size = len(text)  # json.dumps output is ASCII (ensure_ascii): characters == bytes
        if self._max_bytes is not None and size > self._max_bytes:
            return False
        self._data[key] = (expires, text)
        self._bytes += size
        while len(self._data) > self._max or (self._max_bytes is not None and self._bytes > self._max_bytes):
            _, (_, old) = self._data.popitem(last=False)
            self._bytes -= len(old)
        return True

    def delete(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._bytes -= len(item[1])

    @property
    def total_bytes(self) -> int:
        return self._bytes

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
        self,
        *,
        max_cache_entries: int = 10_000,
        max_trace_bytes: int = 64 * 1024 * 1024,
        max_traces: int = 100_000,
        max_rate_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._cache = _TTLCache(max_cache_entries)
        self._traces = _TTLCache(max_traces, max_bytes=max_trace_bytes)
        self._limits: OrderedDict[str, _Limits] = OrderedDict()
        self._max_rate_keys = max_rate_keys
        self._calls = 0
        self.errors_total: dict[str, int] = {}  # always empty: kept for the same metrics binding
        self.on_error: Callable[[str], None] | None = None

    @property
    def status(self) -> str:
        return "memory"

    @property
    def trace_bytes(self) -> int:
        """Total size of the traces held now (bounded by `max_trace_bytes`)."""
        return self._traces.total_bytes

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def cache_get(self, key: str) -> dict[str, Any] | None:
        text = self._cache.get(key, self._clock())
        return None if text is None else json.loads(text)

    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        self._cache.set(key, json.dumps(value), self._clock() + ttl_s)

    async def trace_put(self, trace_id: str, trace: dict[str, Any], ttl_s: float, *, owner: str) -> None:
        text = json.dumps(trace_record(trace, owner))
        if not self._traces.set(trace_id, text, self._clock() + ttl_s):
            log.warning("trace %s not kept: its %d bytes exceed the in-memory trace bound", trace_id, len(text))

    async def trace_get(self, trace_id: str, *, owner: str) -> dict[str, Any] | None:
        check_owner(owner)
        text = self._traces.get(trace_id, self._clock())
        return None if text is None else trace_for(json.loads(text), owner)

    async def trace_delete(self, trace_id: str, *, owner: str) -> bool:
        if await self.trace_get(trace_id, owner=owner) is None:
            return False
        self._traces.delete(trace_id)
        return True

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision:
        check_limits(requests_per_min, tokens_per_min, tokens)
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
