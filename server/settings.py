"""Server configuration: `python -m server` flags and `THOR_*` environment variables.

Owns: every setting of the API server with its default (engine arguments in
vLLM's vocabulary, sandbox and store endpoints, API keys, rate limits, THOR
defaults for requests that do not say otherwise). Does not own: applying them
(api_server.py, the surfaces, admission/limits.py, admission/guards.py, __main__.py) or the engine's own option types (thor_engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.admission.keys import ApiKeys, normalize_key, read_key_file
from thor_engine.config import RepetitionConfig, ThorConfig


class ServerSettings(BaseSettings):
    """Env prefix `THOR_`, e.g. THOR_MODEL, THOR_API_KEY (comma-separated), THOR_REDIS_URL."""

    model_config = SettingsConfigDict(
        env_prefix="THOR_", env_nested_delimiter="__", extra="ignore", protected_namespaces=()
    )

    # --- engine (vLLM's names)
    model: str = Field(default="default", description="A preset (default, quality, small), an HF directory or hub id.")
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enforce_eager: bool = False
    seed: int = 0
    max_num_seqs: int | None = Field(default=None, ge=1)
    block_size: int | None = Field(default=None, ge=1, description="KV cache block size (CPU default here: 32).")

    # --- HTTP
    host: str = Field(
        default="127.0.0.1", description="Bind address. A non-loopback address needs an API key (or allow_open_remote)."
    )
    allow_open_remote: bool = Field(
        default=False,
        description="Allow serving without API keys on a non-loopback address (only on a network you trust: "
        "anyone who reaches it can use the model and the sandbox).",
    )
    forwarded_allow_ips: str | None = Field(
        default=None,
        description="Proxies trusted to set X-Forwarded-For (uvicorn's forwarded_allow_ips); none = the client "
        "address is the socket's peer, so a client cannot pick its own rate-limit bucket.",
    )
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted Bearer keys (kept as sha256 digests once read; `sha256:<hex>` entries accepted); "
        "none = open server. An empty key is an error.",
    )
    api_key_file: Path | None = Field(default=None, description="A file with one API key (or sha256:<hex>) per line.")
    auth_failures_per_minute: int | None = Field(
        default=20, ge=1, description="Failed-auth attempts allowed per client address and minute (then 429)."
    )
    max_n: int = Field(default=16, ge=1, description="Largest n per request.")
    reasoning_fields: Literal["both", "reasoning", "reasoning_content"] = Field(
        default="both",
        description="Which field carries the reasoning trace: current vLLM's `reasoning`, the older "
        "`reasoning_content` that many clients read, or both.",
    )

    # --- sandbox and store
    sandbox_url: str | None = Field(
        default=None,
        description="Sandbox service URL; none = the local sandbox address 127.0.0.1:<local_sandbox_port> "
        "(a THOR sandbox already there is used, otherwise one is started there with the server).",
    )
    local_sandbox_port: int = Field(
        default=8080, ge=1, le=65535, description="Port of the local sandbox address (SandboxFusion clients use 8080)."
    )
    sandbox_busy_retries: int = Field(
        default=3,
        ge=0,
        description="Further attempts of a tool call after a sandbox "
        "busy spell or worker death (backoff 1 s, doubling, at most 10 s).",
    )
    sandbox_error_policy: Literal["observe", "fail"] = Field(
        default="observe",
        description="When the retries are spent: `observe` gives the model a `sandbox_error` "
        "observation (the other samples carry on); `fail` fails the request (503).",
    )
    sandbox_max_concurrent_per_request: int = Field(
        default=4, ge=1, description="Sandbox calls one request (all its samples) may have in flight at once."
    )
    redis_url: str | None = Field(default=None, description="Redis for cache, rate limits, traces; none = in-memory.")
    rate_limit_fail_open: bool = Field(default=True, description="When Redis is down: allow (true) or refuse.")
    tool_cache_ttl_s: int = Field(default=24 * 3600, ge=0, description="0 disables the tool-result cache.")
    trace_ttl_s: int = Field(default=24 * 3600, ge=0, description="0 disables trace storage.")
    trace_memory_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Bound on the in-memory trace store (past it: expired traces, then the biggest holder's oldest).",
    )
    trace_quota_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Per client (API key id, or address on an open server): the most bytes of stored traces and "
        "responses it holds, in memory or Redis; a new one evicts that client's own oldest.",
    )

    # --- rate limits per API key id (or per client address on an open server); generated tokens,
    # discarded ones included, are charged when a request ends however it ends
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)

    # --- THOR defaults for requests that do not set them
    thor: ThorConfig = ThorConfig()
    default_max_tokens: int = Field(default=2048, ge=1)
    repetition_guard: bool = Field(
        default=False,
        description="End looping trajectories early by default (thor.repetition with its defaults, finish_reason "
        "`length`, thor's `repetition`); requests may still set thor.repetition (false turns it off).",
    )
    tir_instructions: Literal["append", "if_no_system", "off"] = Field(
        default="append",
        description="Where THOR's tool-use instructions go when tools are on: appended to the "
        "client's system message (or added as one), only when the client sent none, or never. Requests may "
        "override with thor.tir_instructions.",
    )

    # --- server-side maxima for what a client may ask (400 naming the parameter beyond them)
    max_tool_calls_limit: int = Field(default=32, ge=0, description="Largest thor.max_tool_calls a request may set.")
    max_retries_limit: int = Field(
        default=8, ge=0, description="Largest thor.self_correction.max_retries a request may set."
    )
    max_request_tokens: int = Field(
        default=131072,
        ge=1,
        description="Largest n x max_tokens (after clamping to the context) per request, and largest echo: "
        "prompt tokens x n x (1 + logprobs).",
    )
    max_batch_prompts: int = Field(
        default=128, ge=1, description="Most prompts one /v1/completions request may batch (larger: a 400)."
    )
    max_request_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body (larger: 413)."
    )
    sse_keepalive_s: float = Field(
        default=15.0,
        ge=0,
        description="Send an SSE `: keep-alive` comment when a "
        "stream has been silent this long (long tool calls); 0 disables.",
    )

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _repetition_default(self) -> ServerSettings:
        if self.repetition_guard and self.thor.repetition is None:
            self.thor = self.thor.model_copy(update={"repetition": RepetitionConfig()})
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServerSettings:
        if self.thor.max_tool_calls > self.max_tool_calls_limit:
            raise ValueError(
                f"thor.max_tool_calls ({self.thor.max_tool_calls}) exceeds max_tool_calls_limit "
                f"({self.max_tool_calls_limit}): lower the default or raise the limit"
            )
        if self.thor.self_correction.max_retries > self.max_retries_limit:
            raise ValueError(
                f"thor.self_correction.max_retries ({self.thor.self_correction.max_retries}) exceeds "
                f"max_retries_limit ({self.max_retries_limit}): lower the default or raise the limit"
            )
        return self

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):  # THOR_API_KEY=a,b (an empty entry stays, to be refused below)
            return v.split(",")
        return v

    @field_validator("api_key", mode="after")
    @classmethod
    def _digest_keys(cls, v: list[str]) -> list[str]:
        # only digests are kept: the settings object never holds a key in clear
        return [normalize_key(k, "--api-key / THOR_API_KEY") for k in v]

    def api_keys(self) -> ApiKeys:
        """Every accepted key as digests (flags, env, key file); ValueError for a key file without keys."""
        digests = list(self.api_key)
        if self.api_key_file:
            digests += read_key_file(self.api_key_file)
        return ApiKeys(digests)
