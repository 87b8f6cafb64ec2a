"""Server configuration: `python -m server` flags and `THOR_*` environment variables.

Owns: every setting of the API server with its default (engine arguments in
vLLM's vocabulary, sandbox and store endpoints, API keys, rate limits, THOR
defaults for requests that do not say otherwise). Does not own: applying them
(app.py, __main__.py) or the engine's own option types (thor_engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from thor_engine.config import ThorConfig


class ServerSettings(BaseSettings):
    """Env prefix `THOR_`, e.g. THOR_MODEL, THOR_API_KEY (comma-separated), THOR_REDIS_URL."""

    model_config = SettingsConfigDict(env_prefix="THOR_", env_nested_delimiter="__", extra="ignore",
                                      protected_namespaces=())

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
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Accepted Bearer keys; none = open server.")
    api_key_file: Path | None = Field(default=None, description="A file with one API key per line.")
    max_n: int = Field(default=16, ge=1, description="Largest n per request.")
    reasoning_fields: Literal["both", "reasoning", "reasoning_content"] = Field(
        default="both",
        description="Which field carries the reasoning trace: current vLLM's `reasoning`, the older "
        "`reasoning_content` that many clients read, or both.",
    )

    # --- sandbox and store
    sandbox_url: str | None = Field(default=None, description="Sandbox service URL; none = start a local one.")
    redis_url: str | None = Field(default=None, description="Redis for cache, rate limits, traces; none = in-memory.")
    rate_limit_fail_open: bool = Field(default=True, description="When Redis is down: allow (true) or refuse.")
    tool_cache_ttl_s: int = Field(default=24 * 3600, ge=0, description="0 disables the tool-result cache.")
    trace_ttl_s: int = Field(default=24 * 3600, ge=0, description="0 disables trace storage.")

    # --- rate limits per API key (or per client address on an open server)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)

    # --- THOR defaults for requests that do not set them
    thor: ThorConfig = ThorConfig()
    default_max_tokens: int = Field(default=2048, ge=1)
    tir_instructions: Literal["append", "if_no_system", "off"] = Field(
        default="append", description="Where THOR's tool-use instructions go when tools are on: appended to the "
        "client's system message (or added as one), only when the client sent none, or never. Requests may "
        "override with thor.tir_instructions.")

    # --- server-side maxima for what a client may ask (400 naming the parameter beyond them)
    max_tool_calls_limit: int = Field(default=32, ge=0, description="Largest thor.max_tool_calls a request may set.")
    max_retries_limit: int = Field(default=8, ge=0,
                                   description="Largest thor.self_correction.max_retries a request may set.")
    max_request_tokens: int = Field(default=131072, ge=1,
                                    description="Largest n x max_tokens (after clamping to the context) per request.")
    max_request_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024,
                                        description="Largest request body (larger: 413).")
    sse_keepalive_s: float = Field(default=15.0, ge=0, description="Send an SSE `: keep-alive` comment when a "
                                   "stream has been silent this long (long tool calls); 0 disables.")

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ServerSettings:
        if self.thor.max_tool_calls > self.max_tool_calls_limit:
            raise ValueError(f"thor.max_tool_calls ({self.thor.max_tool_calls}) exceeds max_tool_calls_limit "
                             f"({self.max_tool_calls_limit}): lower the default or raise the limit")
        if self.thor.self_correction.max_retries > self.max_retries_limit:
            raise ValueError(f"thor.self_correction.max_retries ({self.thor.self_correction.max_retries}) exceeds "
                             f"max_retries_limit ({self.max_retries_limit}): lower the default or raise the limit")
        return self

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    def all_api_keys(self) -> set[str]:
        keys = set(self.api_key)
        if self.api_key_file:
            keys |= {ln.strip() for ln in self.api_key_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
        return keys
