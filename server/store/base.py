"""The `Store` interface every backend implements, and the pieces they share.

Owns: the `Store` protocol (tool-result cache, rate limits, traces, health), the
`RateDecision` value, the `STORE_UNAVAILABLE` limit name, argument checks for rate
limits, and the owner-binding of traces (`trace_record` / `trace_for`): a trace is
stored together with the id of the client that created it and is only returned to
that same client id. Every backend keeps each owner's traces within a quota of bytes
(its own oldest evicted first), so one client cannot evict another's; rate-limit state
is never evicted by stored traces. Callers pass client ids (an API key id, a client address),
never secrets.

Does not own: any storage (memory.py, redis_backend.py), degradation when a backend
is down (resilient.py), HTTP, tokens or metrics.

Rate limits are token buckets of one minute's capacity per client id, one bucket for
requests and one for tokens: a bucket holds at most `limit` units, refills
continuously at `limit / 60` units per second, so a burst of one minute's allowance is
possible and afterwards the rate is what the limit says (a sliding window without
window edges). A request is admitted when its request bucket holds one unit and its
token bucket holds the request's tokens (clamped to the bucket size, and at least one
token); `charge_tokens` debits tokens known only afterwards (generated tokens), which
may drive the bucket into debt: later requests wait until it refills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

STORE_UNAVAILABLE = "store_unavailable"


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

    async def trace_put(self, trace_id: str, trace: dict[str, Any], ttl_s: float, *, owner: str) -> None: ...

    async def trace_get(self, trace_id: str, *, owner: str) -> dict[str, Any] | None:
        """The trace stored under `trace_id` by `owner`; None when absent, expired or another owner's."""
        ...

    async def trace_delete(self, trace_id: str, *, owner: str) -> bool:
        """Delete `owner`'s trace `trace_id`; False when there is none (another owner's is left alone)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...

    @property
    def status(self) -> str: ...


def check_limits(requests_per_min: int | None, tokens_per_min: int | None, tokens: int) -> None:
    """ValueError for limits below 1 (None = no limit) or a negative token count."""
    for name, value in (("requests_per_min", requests_per_min), ("tokens_per_min", tokens_per_min)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None (no limit), got {value}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")


def check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner:
        raise ValueError("a trace needs a non-empty owner (the client id that created it)")


def trace_record(trace: dict[str, Any], owner: str) -> dict[str, Any]:
    """What a backend stores for a trace: the trace and its owner's client id."""
    check_owner(owner)
    return {"owner": owner, "trace": trace}


def trace_for(record: dict[str, Any] | None, owner: str) -> dict[str, Any] | None:
    """The trace in a stored record when `owner` created it, else None (another client's: not found)."""
    check_owner(owner)
    if not isinstance(record, dict) or record.get("owner") != owner:
        return None
    trace = record.get("trace")
    return trace if isinstance(trace, dict) else None
