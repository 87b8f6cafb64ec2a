"""`GET /v1/models` and `GET /v1/models/{model}`: the one model this server serves.

Owns: the model card (served name, context length, the model it was loaded from) and the
list holding it; retrieving it by any name `check_model_name` accepts, 404 otherwise.
Does not own: auth (admission/guards.py) or which names a request may use (admission/limits.py).
"""

from __future__ import annotations

import time
from typing import Any

from server.admission.guards import v1_router
from server.admission.limits import check_model_name
from server.state import ServerState, StateDep

router = v1_router()


def model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "thor",
        "max_model_len": state.engine.max_model_len,
        "root": state.engine.model_name,
    }


@router.get("/v1/models")
async def models(state: StateDep) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state)]}


# `:path`: hub ids contain a slash (the SDK's models.retrieve("Qwen/...") sends it as is)
@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, state: StateDep) -> dict[str, Any]:
    check_model_name(state, model)
    return model_card(state)
