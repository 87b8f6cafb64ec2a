"""`GET /v1/models`: the one model this server serves.

Owns: the model list (served name, context length, the model it was loaded from).
Does not own: auth (guards.py) or which names a request may use (checks.py).
"""

from __future__ import annotations

import time
from typing import Any

from ..guards import v1_router
from ..state import StateDep

router = v1_router()


@router.get("/v1/models")
async def models(state: StateDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": state.model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "thor",
                "max_model_len": state.engine.max_model_len,
                "root": state.engine.model_name,
            }
        ],
    }
