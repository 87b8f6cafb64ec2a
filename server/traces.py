"""`GET /v1/traces/{trace_id}`: a stored trace, to the client that made it.

Owns: looking a trace up for its owner (the key id, or the client address on an open
server); another client's trace is a 404 exactly like a missing one.
Does not own: auth (admission/guards.py), storing traces (streaming.py) or the store.
"""

from __future__ import annotations

from typing import Any

from server.admission.guards import ClientKeyDep, v1_router
from server.errors import ApiError
from server.state import StateDep

router = v1_router()


@router.get("/v1/traces/{trace_id}")
async def trace(trace_id: str, state: StateDep, owner: ClientKeyDep) -> dict[str, Any]:
    found = await state.store.trace_get(trace_id, owner=owner)
    if found is None:
        raise ApiError(
            404,
            f"no trace with id {trace_id!r} for this API key (traces are kept "
            f"{state.settings.trace_ttl_s}s; `thor.trace: false` stores none)",
            type="not_found_error",
            param="trace_id",
        )
    return found
