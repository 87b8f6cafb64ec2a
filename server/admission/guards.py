"""Auth and rate limits as FastAPI dependencies.

Owns: `authenticate` (Bearer-key auth for the `/v1` routers: a configured key puts its
key id in the request state for rate limits and traces; a missing or wrong key is a 401;
failed attempts are throttled per client address, and once an address has used up its
allowance every request from it, right key or not, gets a 429 with Retry-After, so
guessing gains nothing from the answers; a store outage never locks anyone out), and
`rate_limiter`, which counts the request against its client's per-minute limits (its key
id, or its address on an open server) as soon as it is authenticated, before the route does
any work (429 with Retry-After), and hands the route the client's `RateLimiter`: `admit`
debits the prompt tokens once the route knows them, `charge` debits what the engine
generated when the request ends, as its own task so that a cancelled request still pays.
Also `v1_router`, the APIRouter every /v1 route is on: `authenticate` is its dependency,
and its route class authenticates a request whose body FastAPI could not decode (that
error comes before any dependency runs), so an unauthenticated client gets its 401 or
429 whatever it sent.

Does not own: key digests and client ids (admission/keys.py), the buckets (server/store/),
counting the generated tokens (admission/metering.py) or deciding when to charge (streaming.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.admission.keys import KEY_ID_SCOPE, address_id, client_id
from server.errors import ApiError
from server.state import ServerState, StateDep, current_state
from server.store import STORE_UNAVAILABLE


def _retry_after(seconds: float) -> int:
    return max(1, int(seconds + 0.999))


async def authenticate(request: Request, state: StateDep) -> None:
    """Let the request through when the server is open or the request carries a configured key."""
    if not state.api_keys:
        return
    scope = request.scope
    limit = state.settings.auth_failures_per_minute
    failures = "authfail:" + address_id(scope)
    if limit is not None:
        # peek: one unit must be left; failures are debited below
        decision = await state.store.rate_limit(failures, requests_per_min=None, tokens_per_min=limit, tokens=0)
        if not decision.allowed and decision.limit != STORE_UNAVAILABLE:  # a store outage never locks out
            state.metrics.rate_limited.inc()
            retry = _retry_after(decision.retry_after_s)
            raise ApiError(
                429,
                f"too many failed authentication attempts from this address; retry in {retry}s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
    auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    presented = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    found = state.api_keys.identify(presented)
    if found is not None:
        scope.setdefault("state", {})[KEY_ID_SCOPE] = found
        return
    if limit is not None:
        await state.store.charge_tokens(failures, 1)
    msg = "missing API key: send `Authorization: Bearer <key>`" if not presented else "invalid API key"
    raise ApiError(401, msg, type="authentication_error", code="invalid_api_key")


class AuthFirstRoute(APIRoute):
    """An APIRoute that answers a body it cannot decode only to an authenticated client.

    FastAPI decodes the JSON body before it resolves any dependency, so `authenticate` never
    runs for a malformed body; this route runs it then, and the decoding error stands only
    when it lets the request through."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def authenticate_first(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestValidationError, StarletteHTTPException) as exc:
                if _body_undecodable(exc):
                    state = current_state(request)
                    if state is not None:  # while starting, no route authenticates (they answer 503)
                        await authenticate(request, state)
                raise

        return authenticate_first


def _body_undecodable(exc: Exception) -> bool:
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        return bool(errors) and errors[0].get("type") == "json_invalid"
    return isinstance(exc, StarletteHTTPException) and exc.status_code == 400


def v1_router() -> APIRouter:
    """A router for /v1 routes: every request on it is authenticated first."""
    return APIRouter(route_class=AuthFirstRoute, dependencies=[Depends(authenticate)])


class RateLimiter:
    """The rate limits of one client (`key`) for one request."""

    def __init__(self, state: ServerState, key: str) -> None:
        self.state, self.key = state, key

    async def count_request(self) -> None:
        """Count this request (before any work on it: one that ends in a 400 counts too); a 429 with
        Retry-After when the client has no request left, or its token bucket is spent."""
        s = self.state.settings
        await self._decide(s.requests_per_minute, s.tokens_per_minute, 0)

    async def admit(self, tokens: int) -> None:
        """Debit the request's `tokens` prompt tokens (the request itself was counted on arrival);
        a 429 with Retry-After when the client's token bucket cannot cover them."""
        await self._decide(None, self.state.settings.tokens_per_minute, tokens)

    async def _decide(self, requests_per_min: int | None, tokens_per_min: int | None, tokens: int) -> None:
        if requests_per_min is None and tokens_per_min is None:
            return
        decision = await self.state.store.rate_limit(
            self.key, requests_per_min=requests_per_min, tokens_per_min=tokens_per_min, tokens=tokens
        )
        if not decision.allowed:
            self.state.metrics.rate_limited.inc()
            retry = _retry_after(decision.retry_after_s)
            raise ApiError(
                429,
                f"rate limit reached ({decision.limit}); retry in {retry}s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )

    def charge(self, tokens: int) -> None:
        """Debit generated tokens from the client's token bucket. Called from `finally` blocks, so
        it runs as its own task: a request cancelled by a disconnect still pays."""
        if not self.state.settings.tokens_per_minute or tokens <= 0:
            return
        task = asyncio.ensure_future(self.state.store.charge_tokens(self.key, tokens))
        self.state.background.add(task)
        task.add_done_callback(self.state.background.discard)


def client_key(request: Request) -> str:
    """FastAPI dependency: who the request counts as. The key id when auth is on, the client
    address otherwise: never a string the client picks freely (on an open server every Bearer
    string would be a fresh bucket)."""
    return client_id(request.scope)


async def rate_limiter(state: StateDep, key: Annotated[str, Depends(client_key)]) -> RateLimiter:
    """FastAPI dependency: the rate limits of the client this request comes from, with the request
    already counted. FastAPI resolves dependencies before it validates the body, so every
    authenticated request counts, whatever it ends in (a body that fails validation included),
    before the route renders or tokenises anything."""
    limiter = RateLimiter(state, key)
    await limiter.count_request()
    return limiter


#: a route parameter typed `ClientKeyDep` receives who the request counts as
ClientKeyDep = Annotated[str, Depends(client_key)]
#: a route parameter typed `LimiterDep` receives the client's RateLimiter
LimiterDep = Annotated[RateLimiter, Depends(rate_limiter)]
