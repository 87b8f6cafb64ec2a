"""Wire protocol of the sandbox service: request and response models.

Owns: the JSON shapes of `POST /v1/execute` (our batch API), `POST /run_code`
(SandboxFusion-compatible) and `GET /health`, with their input validation.
Does not own: limits' configured values (settings.py), execution (pool.py), or
transport (app.py, client.py). Shared by the service and its Python client, so it
depends on pydantic only and runs on Python >= 3.11.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Hard ceiling on any snippet's wall-clock timeout accepted by the API (seconds);
#: the service's configured maximum may be lower.
ABSOLUTE_MAX_TIMEOUT_S = 300.0


class Outcome(str, Enum):
    """How one snippet ended, as the service judges it (never nsjail's flags)."""

    ok = "ok"  # exit code 0
    error = "error"  # non-zero exit code or killed by a signal it raised itself
    timeout = "timeout"  # wall-clock or CPU time limit hit
    oom = "oom"  # memory limit hit (MemoryError or killed by the memory cgroup)
    output_capped = "output_capped"  # stdout or stderr exceeded the cap; killed


def _check_code(code: str) -> str:
    if not code.strip():
        raise ValueError("code is empty: send at least one non-blank line of Python")
    try:
        code.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"code is not valid UTF-8 text (unpaired surrogate at position {exc.start})") from exc
    if "\x00" in code:
        raise ValueError("code contains a NUL character, which Python source cannot hold")
    return code


class Snippet(BaseModel):
    """One stateless piece of Python to run in a fresh process."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Python source; runs as __main__ in a fresh forked process.")
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=ABSOLUTE_MAX_TIMEOUT_S,
        description="Wall-clock limit in seconds; the service default when omitted.",
    )
    echo_last_expression: bool = Field(
        default=False,
        description="Print repr() of the value of a trailing expression statement, as a notebook cell does.",
    )
    stdin: str | None = Field(default=None, description="Text fed to the snippet's standard input.")

    @field_validator("code")
    @classmethod
    def _valid_code(cls, v: str) -> str:
        return _check_code(v)


class ExecuteRequest(BaseModel):
    """`POST /v1/execute`: run a batch of independent snippets; results come back in order."""

    model_config = ConfigDict(extra="forbid")

    snippets: list[Snippet] = Field(min_length=1, description="Snippets to run, independently and concurrently.")


class ExecutionResult(BaseModel):
    """The result of one snippet."""

    outcome: Outcome
    ok: bool = Field(description="True iff the snippet exited with code 0.")
    exit_code: int | None = Field(description="Process exit code; None when killed by a signal.")
    signal: int | None = Field(default=None, description="Signal that ended the process, if any.")
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    duration_s: float = Field(description="Wall time of the snippet inside the jail.")
    queue_s: float = Field(default=0.0, description="Time spent waiting for a free worker.")


class ExecuteResponse(BaseModel):
    results: list[ExecutionResult]


# --- SandboxFusion-compatible /run_code ------------------------------------------------


class RunCodeRequest(BaseModel):
    """SandboxFusion's `RunCodeRequest`, reduced to what a stateless Python sandbox can honour.

    `files` and `fetch_files` are accepted for compatibility but must be empty.
    """

    model_config = ConfigDict(extra="ignore")

    code: str
    language: str = "python"
    compile_timeout: float = Field(default=10.0, ge=0, le=ABSOLUTE_MAX_TIMEOUT_S)
    run_timeout: float = Field(default=10.0, gt=0, le=ABSOLUTE_MAX_TIMEOUT_S)
    memory_limit_MB: int = Field(default=-1, ge=-1, description="-1 = the service default")
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list)
    echo_last_expression: bool = Field(
        default=False, description="Extension: notebook-style echo of a trailing expression (off by default)."
    )

    @field_validator("code")
    @classmethod
    def _valid_code(cls, v: str) -> str:
        return _check_code(v)

    @field_validator("language")
    @classmethod
    def _python_only(cls, v: str) -> str:
        if v.lower() not in ("python", "python3"):
            raise ValueError(f"language {v!r} is not supported: this sandbox runs only 'python'")
        return "python"

    @field_validator("files")
    @classmethod
    def _no_files(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        if v:
            raise ValueError("files are not supported: snippets are stateless; inline the data in the code")
        return v

    @field_validator("fetch_files")
    @classmethod
    def _no_fetch(cls, v: list[str]) -> list[str]:
        if v:
            raise ValueError("fetch_files is not supported: snippets are stateless; print what you need")
        return v


class CommandRunResult(BaseModel):
    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeResponse(BaseModel):
    status: Literal["Success", "Failed", "SandboxError"]
    message: str = ""
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


class WorkerStatus(BaseModel):
    """One live worker. `id` grows by one for every worker the pool ever started, so a
    replaced worker shows up as a new id (and a new pid)."""

    id: int
    pid: int | None
    busy: bool


class SandboxLimits(BaseModel):
    """The per-snippet limits a client must respect (and that shape every result)."""

    default_timeout_s: float
    max_timeout_s: float
    memory_limit_mb: int
    max_output_bytes: int
    max_code_bytes: int
    max_stdin_bytes: int
    max_processes: int
    max_open_files: int
    max_file_size_mb: int
    tmp_size_mb: int
    max_batch: int


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "degraded"]
    workers_total: int
    workers_ready: int
    workers_busy: int
    queue_depth: int
    isolation: str
    workers: list[WorkerStatus] = Field(default_factory=list, description="The live workers (ids grow on replacement).")
    limits: SandboxLimits | None = Field(default=None, description="Per-snippet limits (None from older services).")
    versions: dict[str, str] = Field(
        default_factory=dict, description="Service, worker-script and jail-library versions that shape results."
    )
    fingerprint: str | None = Field(
        default=None,
        description="Digest of `versions` and `limits`: two services with the same fingerprint give the same "
        "result for the same deterministic snippet (what a result cache should key on).",
    )


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx from the service has this body."""

    error: ErrorBody
