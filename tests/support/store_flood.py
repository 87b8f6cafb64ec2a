"""One client floods the stored responses: does another client's state survive?

`flood_store` drives a `Store` directly (memory or Redis); `flood_stored_responses` does the
same through a running server's `POST /v1/responses` (`store: true`), so a test of hostile
clients can call it against a real server. Both report what the victim still has afterwards;
the caller asserts. Nothing here fakes a store or a server.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from server.store import Store


@dataclass(frozen=True)
class FloodOutcome:
    victim_response_kept: bool  # the victim's stored response is still there
    victim_limits_kept: bool  # the victim's rate-limit bucket still remembers what it spent
    flooder_latest_kept: bool  # the flooder's newest response is kept (it evicts its own oldest)
    flooder_oldest_kept: bool  # ... and its oldest (False: its quota made room)


async def flood_store(
    store: Store,
    *,
    flooders: int = 1,
    traces: int = 200,
    trace_bytes: int = 20_000,
    victim: str = "client-b",
    requests_per_min: int = 3,
) -> FloodOutcome:
    """The victim stores a response and spends its whole request budget; then `flooders` clients
    store `traces` traces of about `trace_bytes` each, and take rate-limit buckets of their own."""
    run = uuid.uuid4().hex[:8]
    victim_trace = f"resp_victim_{run}"
    await store.trace_put(victim_trace, {"output": "the victim's answer"}, ttl_s=600, owner=victim)
    for _ in range(requests_per_min):
        assert (await store.rate_limit(victim, requests_per_min=requests_per_min, tokens_per_min=None)).allowed
    payload = "x" * trace_bytes
    first = last = ""
    for f in range(flooders):
        owner = f"client-a{f}-{run}"
        await store.rate_limit(owner, requests_per_min=requests_per_min, tokens_per_min=None)
        for i in range(traces):
            trace_id = f"resp_flood_{run}_{f}_{i}"
            await store.trace_put(trace_id, {"output": payload, "i": i}, ttl_s=600, owner=owner)
            first, last = (trace_id if (f, i) == (0, 0) else first), trace_id
    last_owner = f"client-a{flooders - 1}-{run}"
    decision = await store.rate_limit(victim, requests_per_min=requests_per_min, tokens_per_min=None)
    return FloodOutcome(
        victim_response_kept=await store.trace_get(victim_trace, owner=victim) is not None,
        victim_limits_kept=not decision.allowed,  # a forgotten bucket would be full again
        flooder_latest_kept=await store.trace_get(last, owner=last_owner) is not None,
        flooder_oldest_kept=await store.trace_get(first, owner=f"client-a0-{run}") is not None,
    )


async def flood_stored_responses(
    base_url: str,
    *,
    flooder_key: str,
    victim_key: str,
    model: str,
    responses: int = 40,
    concurrency: int = 4,
) -> FloodOutcome:
    """Through the server: the victim stores a response; the flooder stores `responses` responses,
    each as large as the request limits allow (16 metadata values of 512 characters, a long input),
    `concurrency` at a time. Rate limits are not exercised here (`victim_limits_kept` is True when
    the victim can still retrieve and continue its response)."""
    big = {f"k{i:02d}": "m" * 512 for i in range(16)}
    text = "Say nothing. " * 50

    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:

        async def create(key: str, **extra: Any) -> dict[str, Any]:
            body = {"model": model, "input": text, "max_output_tokens": 1, "store": True, **extra}
            r = await http.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            return r.json()

        async def exists(key: str, rid: str) -> bool:
            r = await http.get(f"/v1/responses/{rid}", headers={"Authorization": f"Bearer {key}"})
            return r.status_code == 200

        victim = await create(victim_key)
        gate = asyncio.Semaphore(concurrency)

        async def one() -> str:
            async with gate:
                return (await create(flooder_key, metadata=big))["id"]

        ids = [await one()]  # the oldest, created first
        ids += await asyncio.gather(*(one() for _ in range(responses - 1)))
        continued = await http.post(
            "/v1/responses",
            json={"model": model, "input": "Go on.", "max_output_tokens": 1, "previous_response_id": victim["id"]},
            headers={"Authorization": f"Bearer {victim_key}"},
        )
        return FloodOutcome(
            victim_response_kept=await exists(victim_key, victim["id"]),
            victim_limits_kept=continued.status_code == 200,
            flooder_latest_kept=await exists(flooder_key, ids[-1]),
            flooder_oldest_kept=await exists(flooder_key, ids[0]),
        )
