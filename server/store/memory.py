"""`MemoryStore`: the in-process `Store` of a single replica.

Owns: a TTL + LRU bounded mapping for cached tool results, the trace store, and the token
buckets of the rate limits, all on a monotonic clock. Traces (stored responses) are bounded
per owner (the client id) by `trace_quota_bytes`, the total size of the owner's JSON texts:
a new trace evicts that owner's own oldest, never another owner's; a trace larger than the
quota is not kept. They are also bounded in all by `max_trace_bytes` (and `max_traces`), so
a server cannot run out of memory however many owners store: past that bound, expired
traces go first, then the oldest of the owner holding the most bytes. Rate-limit entries are
a separate mapping (traces never evict them), bounded by count and forgotten once their
buckets are full again.

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

from server.store.base import RateDecision, check_limits, check_owner, trace_for, trace_record

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


class _Traces:
    """Trace id -> (owner, expiry, JSON text), with each owner's traces in insertion order and their
    sizes, bounded per owner (`quota_bytes`) and in all (`max_bytes`, `max_entries`)."""

    def __init__(self, *, max_entries: int, max_bytes: int, quota_bytes: int) -> None:
        if min(max_entries, max_bytes, quota_bytes) < 1:
            raise ValueError(
                f"trace bounds must be >= 1, got max_entries={max_entries}, max_bytes={max_bytes}, "
                f"quota_bytes={quota_bytes}"
            )
        self._max, self._max_bytes, self._quota = max_entries, max_bytes, quota_bytes
        self._data: OrderedDict[str, tuple[str, float, str]] = OrderedDict()  # insertion order
        self._owned: dict[str, OrderedDict[str, int]] = {}  # owner -> its trace ids -> sizes, oldest first
        self._owner_bytes: dict[str, int] = {}
        self._bytes = 0

    def get(self, key: str, now: float) -> tuple[str, str] | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= now:
            self.delete(key)
            return None
        return item[0], item[2]

    def put(self, key: str, owner: str, text: str, expires: float, now: float) -> str | None:
        """Store `text` for `owner`; None when kept, else why not (it alone exceeds a bound)."""
        self.delete(key)
        size = len(text)  # json.dumps output is ASCII (ensure_ascii): characters == bytes
        if size > min(self._quota, self._max_bytes):
            return f"its {size} bytes exceed the per-client trace quota ({self._quota}) or the store's bound"
        own = self._owned.setdefault(owner, OrderedDict())
        while own and self._owner_bytes.get(owner, 0) + size > self._quota:
            self.delete(next(iter(own)))  # the owner's own oldest: never another owner's
        own = self._owned.setdefault(owner, OrderedDict())
        while self._data and (self._bytes + size > self._max_bytes or len(self._data) + 1 > self._max):
            oldest = next(iter(self._data))
            if self._data[oldest][1] <= now:
                self.delete(oldest)  # expired ones first (one TTL for all: the oldest expire first)
                continue
            biggest = max(self._owner_bytes, key=self._owner_bytes.__getitem__)
            self.delete(next(iter(self._owned[biggest])))
        own = self._owned.setdefault(owner, OrderedDict())
        self._data[key] = (owner, expires, text)
        own[key] = size
        self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size
        self._bytes += size
        return None

    def delete(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is None:
            return
        owner, _, text = item
        self._bytes -= len(text)
        own = self._owned[owner]
        own.pop(key, None)
        self._owner_bytes[owner] -= len(text)
        if not own:
            del self._owned[owner], self._owner_bytes[owner]

    def owner_bytes(self, owner: str) -> int:
        return self._owner_bytes.get(owner, 0)

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
        trace_quota_bytes: int = 16 * 1024 * 1024,
        max_traces: int = 100_000,
        max_rate_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._cache = _TTLCache(max_cache_entries)
        self._traces = _Traces(max_entries=max_traces, max_bytes=max_trace_bytes, quota_bytes=trace_quota_bytes)
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

    def owner_trace_bytes(self, owner: str) -> int:
        """Size of the traces `owner` holds now (bounded by `trace_quota_bytes`)."""
        return self._traces.owner_bytes(owner)

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
        now = self._clock()
        refused = self._traces.put(trace_id, owner, text, now + ttl_s, now)
        if refused is not None:
            log.warning("trace %s not kept: %s", trace_id, refused)

    async def trace_get(self, trace_id: str, *, owner: str) -> dict[str, Any] | None:
        check_owner(owner)
        found = self._traces.get(trace_id, self._clock())
        return None if found is None else trace_for(json.loads(found[1]), owner)

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
