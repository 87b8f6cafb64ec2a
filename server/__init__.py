"""The THOR API server: OpenAI's HTTP API over the THOR engine. Knows nothing of tokens.

Laid out by API surface, as vLLM's `entrypoints/openai/` is; each module's docstring says
what it owns. One request's walk: `api_server.py` (the app) -> the surface's `serving.py`
(checks, prompt, engine call) -> `streaming.respond` (JSON body or SSE) -> the surface's
builder (engine events -> wire objects).

- `__main__.py`: `python -m server`, flags, assembling engine, sandbox and store.
- `api_server.py`: `create_app`: lifespan, middleware, error handlers, the routers.
- `settings.py`, `state.py`: configuration; the running state routes depend on.
- Surfaces, each with its request checks, route and builder:
  - `chat/`: `POST /v1/chat/completions` (`protocol.py` wire types, `serving.py` route,
    `plain.py` the THOR-off builder: logprobs, response_format, function tools);
  - `completions/`: `POST /v1/completions` (`protocol.py`, `serving.py`, `plain.py`);
  - `responses/`: OpenAI's Responses API (`protocol.py`, `serving.py`, `builder.py`);
  - `tokenization.py` (/tokenize, /detokenize), `model_cards.py` (/v1/models), `traces.py`
    (/v1/traces/{id}), `operations.py` (/health, /metrics, /version), `api_docs.py`
    (/openapi.json, /docs, /redoc), `unmatched.py` (every other /v1 request).
- Shared by the surfaces:
  - `protocol.py`: the `thor` options object and the sampling fields every request has;
  - `thor/`: the THOR builder of chat and completions (`builder.py`) and the tool-call
    records every THOR response shows (`records.py`);
  - `streaming.py`: the one non-stream path and the one SSE path (framing, keep-alives);
  - `admission/`: API keys (`keys.py`), auth and rate-limit dependencies (`guards.py`), the
    model and limit checks (`limits.py`), token metering (`metering.py`);
  - `errors.py` (OpenAI-shaped errors), `middleware.py` (body limit, request metrics),
    `metrics.py` and `activity.py` (Prometheus metrics, the utilisation clock),
    `tool_cache.py` (the shared tool-result cache), `store/` (memory or Redis).
"""
