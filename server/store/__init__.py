"""Shared state of server replicas: tool-result cache, per-client rate limits, trace store.

Owns: choosing a backend from configuration (`create_store`) and re-exporting the
package's public names, so `from server.store import Store, MemoryStore, ...` is the
one import callers need. The parts:

- base.py: the `Store` interface, `RateDecision`, rate-limit semantics, trace owners;
- cacheable.py: `tool_cache_key`, `is_cacheable` (what may be cached, under which key);
- memory.py: `MemoryStore` (in-process, one replica; traces bounded per client and in all);
- redis_backend.py: `RedisBackend` (Redis operations, key layout, the Lua buckets);
- resilient.py: `ResilientStore` (degradation when the backend is down) and
  `RedisStore` (Redis behind it, shared by every replica using the same URL).

Does not own: HTTP (status codes, Retry-After headers), tokens (callers pass token
counts), the engine or the sandbox, metric objects (the caller binds `on_error`).
"""

from __future__ import annotations

from collections.abc import Callable

from server.store.base import STORE_UNAVAILABLE, RateDecision, Store
from server.store.cacheable import is_cacheable, tool_cache_key
from server.store.memory import MemoryStore
from server.store.redis_backend import RedisBackend
from server.store.resilient import RedisStore, ResilientStore

__all__ = [
    "STORE_UNAVAILABLE",
    "MemoryStore",
    "RateDecision",
    "RedisBackend",
    "RedisStore",
    "ResilientStore",
    "Store",
    "create_store",
    "is_cacheable",
    "tool_cache_key",
]


def create_store(
    redis_url: str | None,
    *,
    rate_limit_fail_open: bool = True,
    key_prefix: str = "thor:",
    on_error: Callable[[str], None] | None = None,
    max_cache_entries: int = 10_000,
    max_trace_bytes: int = 64 * 1024 * 1024,
    trace_quota_bytes: int = 16 * 1024 * 1024,
) -> MemoryStore | RedisStore:
    """RedisStore when a URL is given (shared by replicas), MemoryStore otherwise. Either keeps
    each client's traces within `trace_quota_bytes` (its own oldest evicted first)."""
    if redis_url:
        return RedisStore(
            redis_url,
            rate_limit_fail_open=rate_limit_fail_open,
            key_prefix=key_prefix,
            on_error=on_error,
            trace_quota_bytes=trace_quota_bytes,
        )
    return MemoryStore(
        max_cache_entries=max_cache_entries, max_trace_bytes=max_trace_bytes, trace_quota_bytes=trace_quota_bytes
    )
