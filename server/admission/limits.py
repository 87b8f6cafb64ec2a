"""Checking a generation request against the served model and the server's maxima.

Owns: `check_model_name` / `check_model` (the model name, with the aliases `vllm serve
<path>` clients send, and n within max_n), `check_thor_limits` (client-settable THOR options within the
server's maxima and the sandbox's own per-execution limit) and `sampling` (the
request's sampling with the checkpoint's defaults, within the n x max_tokens cap, as
the engine accepts it). Each refusal is a 400 (404 for an unknown model) naming the
parameter and the limit.

Does not own: request shapes (protocol.py and each surface's protocol.py), rate limits (admission/guards.py) or running the
request (streaming.py).
"""

from __future__ import annotations

from server.errors import ApiError
from server.protocol import SamplingRequest
from server.state import ServerState
from thor_engine.config import SamplingOptions, ThorConfig
from thor_engine.engine import InvalidParameter


def check_model_name(state: ServerState, model: str | None) -> None:
    """404 `model_not_found` unless `model` names the served model. `vllm serve <path>` clients
    send the model path (or the preset the server was started with); None means "the one"."""
    if model is None:
        return
    names = {state.model_name, state.engine.model_name, state.settings.model, *state.engine.model_aliases}
    if model not in names:
        raise ApiError(
            404,
            f"The model `{model}` does not exist. This server serves `{state.model_name}`.",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def check_model(state: ServerState, body: SamplingRequest) -> None:
    check_model_name(state, body.model)
    if body.n > state.settings.max_n:
        raise ApiError(400, f"n must be at most {state.settings.max_n}", param="n")


def check_thor_limits(state: ServerState, cfg: ThorConfig) -> None:
    s = state.settings
    if cfg.max_tool_calls > s.max_tool_calls_limit:
        raise ApiError(
            400,
            f"thor.max_tool_calls is {cfg.max_tool_calls}; this server allows at most "
            f"{s.max_tool_calls_limit} (max_tool_calls_limit)",
            param="thor.max_tool_calls",
        )
    if cfg.self_correction.max_retries > s.max_retries_limit:
        raise ApiError(
            400,
            f"thor.self_correction.max_retries is {cfg.self_correction.max_retries}; this "
            f"server allows at most {s.max_retries_limit} (max_retries_limit)",
            param="thor.self_correction.max_retries",
        )
    limit = state.sandbox_max_timeout_s
    if limit is not None and cfg.observation.timeout_s > limit:
        raise ApiError(
            400,
            f"thor.observation.timeout_s is {cfg.observation.timeout_s}; the sandbox allows at "
            f"most {limit:g} s per execution (its max_timeout_s)",
            param="thor.observation.timeout_s",
        )


def sampling(state: ServerState, body: SamplingRequest, max_tokens: int, param: str) -> SamplingOptions:
    """The request's sampling (with the checkpoint's defaults), within the server's n x max_tokens cap."""
    limit = state.settings.max_request_tokens
    if body.n * max_tokens > limit:
        raise ApiError(
            400,
            f"n x {param} is {body.n} x {max_tokens} = {body.n * max_tokens} tokens; this server "
            f"allows at most {limit} per request (max_request_tokens): lower n or {param}",
            param=param,
        )
    try:
        options = body.sampling(max_tokens, state.engine.generation_defaults)
        state.engine.check_sampling(options)
    except InvalidParameter as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc
    return options
