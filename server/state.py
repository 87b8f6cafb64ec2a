"""The running server's state and the dependency that hands it to a route.

Owns: `ServerState` (engine, store, sandbox client, metrics, served name, key digests,
the sandbox's own time limit, and the set of background charge tasks), the `Build`
callable type `create_app` takes, and `server_state`, the FastAPI dependency that reads
the state from `app.state` (a 503 while the server is still starting).

Does not own: creating the state (`build`, in __main__.py), putting it on `app.state`
(the lifespan in api_server.py) or anything the routes do with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from server.admission.keys import ApiKeys
from server.errors import ApiError
from server.metrics import ServerMetrics
from server.settings import ServerSettings
from server.store import Store
from thor_engine.engine import ThorEngine
from thor_sandbox.client import SandboxClient

#: the attribute of `app.state` that holds the ServerState once the lifespan has built it
STATE_ATTR = "thor"


@dataclass
class ServerState:
    settings: ServerSettings
    engine: ThorEngine
    store: Store
    sandbox: SandboxClient
    metrics: ServerMetrics
    model_name: str
    api_keys: ApiKeys  # digests only; empty = open server
    sandbox_max_timeout_s: float | None = None  # the sandbox's own limit, read from its /health at start
    # token charges run as their own tasks (so a cancelled request still pays); kept until done
    background: set[asyncio.Future[None]] = field(default_factory=set, repr=False)


Build = Callable[[ServerMetrics], Awaitable[tuple[ServerState, Callable[[], Awaitable[None]]]]]


def current_state(request: Request) -> ServerState | None:
    """The state, or None while the lifespan has not built it yet."""
    return getattr(request.app.state, STATE_ATTR, None)


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the server's state; a 503 while the server is starting."""
    state = current_state(request)
    if state is None:
        raise ApiError(503, "the server is starting", type="service_unavailable")
    return state


#: a route parameter typed `StateDep` receives the server state
StateDep = Annotated[ServerState, Depends(server_state)]
