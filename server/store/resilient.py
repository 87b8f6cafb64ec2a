"""`ResilientStore`: a `Store` over a backend that can fail, which never fails or stalls a request.

Owns: the circuit breaker and degradation policy around a raising backend
(`RedisBackend`), and `RedisStore`, the two assembled. Every backend call has a hard
time bound; after a connection failure the store is "down" and skips the backend
entirely, probing it again once per `retry_interval_s` (1 s) with the next real
operation (or any `ping()`); the first success brings it back (logged once). While
down: cache reads miss, cache and trace writes are dropped, trace reads miss, rate
limits fail open (allowed) or closed (denied, limit "store_unavailable"), token
charges are dropped. A backend that answers with an error (Redis OOM, READONLY, an
undecodable value) degrades that one operation without opening the circuit. Every
degraded operation is counted in `errors_total[op]` and reported to `on_error(op)`;
logging is one line per outage plus a summary at most once a minute.

Does not own: the backend's operations and key layout (redis_backend.py), the
interface (base.py), metric objects (the caller binds `on_error` to Prometheus).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from server.store.base import STORE_UNAVAILABLE, RateDecision, check_limits, check_owner, trace_for, trace_record
from server.store.redis_backend import RedisBackend

log = logging.getLogger("server.store")

T = TypeVar("T")


class RaisingBackend(Protocol):
    """What `ResilientStore` wraps: store operations that raise on trouble, with trace records
    (`base.trace_record`) stored as they are, and the exception types that mean which trouble."""

    name: str
    op_timeout_s: float
    connection_errors: tuple[type[BaseException], ...]
    refusal_errors: tuple[type[BaseException], ...]

    async def cache_get(self, key: str) -> dict[str, Any] | None: ...
    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None: ...
    async def trace_put(self, trace_id: str, record: dict[str, Any], ttl_s: float, *, owner: str) -> int: ...
    async def trace_get(self, trace_id: str) -> dict[str, Any] | None: ...
    async def trace_delete(self, trace_id: str, *, owner: str) -> None: ...
    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision: ...
    async def charge_tokens(self, key: str, tokens: int) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


class _Failed:
    """Marker: the backend operation did not happen (down, timed out or refused)."""


_FAILED = _Failed()


class ResilientStore:
    """A `Store` over a raising backend: bounded calls, circuit breaker, fail-open/closed limits."""

    def __init__(
        self,
        backend: RaisingBackend,
        *,
        rate_limit_fail_open: bool = True,
        retry_interval_s: float = 1.0,
        fail_closed_retry_after_s: float = 1.0,
        log_every_s: float = 60.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.backend = backend
        self._fail_open = rate_limit_fail_open
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
        return f"{self.backend.name} down" if self._down_since is not None else f"{self.backend.name} ok"

    def _count(self, op: str) -> None:
        self.errors_total[op] = self.errors_total.get(op, 0) + 1
        if self.on_error is not None:
            try:
                self.on_error(op)
            except Exception:  # a metrics hook must never break a request
                log.exception("store on_error hook failed")

    def _log_limited(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log < self._log_every_s:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar messages suppressed)" if self._suppressed else ""
        log.warning(message + suffix, *args)
        self._last_log, self._suppressed = now, 0

    def _mark_down(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        self._next_probe = now + self._retry_interval_s
        if self._down_since is None:
            self._down_since = now
            self._degraded_in_outage = 0
            self.outages_total += 1
            log.warning(
                "%s unreachable during %s (%s: %s): cache bypassed, traces dropped, rate limits fail %s; "
                "retrying every %.1fs",
                self.backend.name,
                op,
                type(exc).__name__,
                exc,
                "open" if self._fail_open else "closed",
                self._retry_interval_s,
            )
            self._last_log = now

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "%s recovered after %.1fs (%d operations degraded meanwhile)",
                self.backend.name,
                time.monotonic() - self._down_since,
                self._degraded_in_outage,
            )
            self._down_since = None

    def _degraded(self, op: str) -> None:
        self._count(op)
        if self._down_since is not None:
            self._degraded_in_outage += 1
            self._log_limited(
                "%s still down for %.0fs: %d operations degraded",
                self.backend.name,
                time.monotonic() - self._down_since,
                self._degraded_in_outage,
            )

    async def _run(self, op: str, call: Callable[[], Awaitable[T]], *, probe: bool = False) -> T | _Failed:
        """Run one backend call with a hard time bound; never raises for backend trouble."""
        is_probe = False
        if self._down_since is not None and not probe:
            if self._probing or time.monotonic() < self._next_probe:
                self._degraded(op)
                return _FAILED
            self._probing = is_probe = True
        try:
            async with asyncio.timeout(self.backend.op_timeout_s):
                result = await call()
        except self.backend.connection_errors as exc:
            self._mark_down(op, exc)
            self._degraded(op)
            return _FAILED
        except self.backend.refusal_errors as exc:  # the backend is there but refused (OOM, READONLY, bad value)
            self._mark_up()
            self._degraded(op)
            self._log_limited("%s error during %s: %s: %s", self.backend.name, op, type(exc).__name__, exc)
            return _FAILED
        finally:
            if is_probe:
                self._probing = False
        self._mark_up()
        return result

    # -- interface

    async def ping(self) -> bool:
        return (await self._run("ping", self.backend.ping, probe=True)) is True

    async def close(self) -> None:
        await self.backend.close()

    async def cache_get(self, key: str) -> dict[str, Any] | None:
        value = await self._run("cache_get", lambda: self.backend.cache_get(key))
        return None if isinstance(value, _Failed) else value

    async def cache_set(self, key: str, value: dict[str, Any], ttl_s: float) -> None:
        await self._run("cache_set", lambda: self.backend.cache_set(key, value, ttl_s))

    async def trace_put(self, trace_id: str, trace: dict[str, Any], ttl_s: float, *, owner: str) -> None:
        record = trace_record(trace, owner)
        evicted = await self._run("trace_put", lambda: self.backend.trace_put(trace_id, record, ttl_s, owner=owner))
        if evicted == -1:
            log.warning("trace %s not kept: it alone exceeds the per-client trace quota", trace_id)

    async def trace_get(self, trace_id: str, *, owner: str) -> dict[str, Any] | None:
        check_owner(owner)
        record = await self._run("trace_get", lambda: self.backend.trace_get(trace_id))
        return None if isinstance(record, _Failed) else trace_for(record, owner)

    async def trace_delete(self, trace_id: str, *, owner: str) -> bool:
        """Only the owner's trace is deleted (read first: the record names its owner); a backend that
        is down deletes nothing and says so (False)."""
        if await self.trace_get(trace_id, owner=owner) is None:
            return False
        deleted = await self._run("trace_delete", lambda: self.backend.trace_delete(trace_id, owner=owner))
        return not isinstance(deleted, _Failed)

    async def rate_limit(
        self, key: str, *, requests_per_min: int | None, tokens_per_min: int | None, tokens: int = 0
    ) -> RateDecision:
        check_limits(requests_per_min, tokens_per_min, tokens)
        if requests_per_min is None and tokens_per_min is None:
            return RateDecision(True)
        result = await self._run(
            "rate_limit",
            lambda: self.backend.rate_limit(
                key, requests_per_min=requests_per_min, tokens_per_min=tokens_per_min, tokens=tokens
            ),
        )
        if isinstance(result, _Failed):
            if self._fail_open:
                return RateDecision(True)
            return RateDecision(False, self._fail_closed_retry_after_s, STORE_UNAVAILABLE)
        return result

    async def charge_tokens(self, key: str, tokens: int) -> None:
        if tokens <= 0:
            return
        await self._run("charge_tokens", lambda: self.backend.charge_tokens(key, tokens))


class RedisStore(ResilientStore):
    """The Redis-backed store shared by replicas: `RedisBackend` inside a `ResilientStore`."""

    def __init__(
        self,
        url: str,
        *,
        rate_limit_fail_open: bool = True,
        key_prefix: str = "thor:",
        socket_timeout_s: float = 0.25,
        trace_quota_bytes: int = 16 * 1024 * 1024,
        retry_interval_s: float = 1.0,
        fail_closed_retry_after_s: float = 1.0,
        log_every_s: float = 60.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            RedisBackend(
                url, key_prefix=key_prefix, socket_timeout_s=socket_timeout_s, trace_quota_bytes=trace_quota_bytes
            ),
            rate_limit_fail_open=rate_limit_fail_open,
            retry_interval_s=retry_interval_s,
            fail_closed_retry_after_s=fail_closed_retry_after_s,
            log_every_s=log_every_s,
            on_error=on_error,
        )
