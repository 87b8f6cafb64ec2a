"""Finding or starting a sandbox service for local use (CLI, `make serve`).

Owns: checking whether a sandbox answers at a URL and, when none does, starting
the repository's own service (`.venv-sandbox/bin/python -m thor_sandbox`, built by
`make sandbox-env`) on a free port for the lifetime of the caller, and stopping it.

Does not own: the sandbox (sandbox_image/) or its isolation; production
deployments run the service separately (compose, `make sandbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

log = logging.getLogger("thor_engine.local_sandbox")

REPO_ROOT = Path(__file__).resolve().parents[1]


class LocalSandboxError(RuntimeError):
    pass


async def is_up(url: str) -> bool:
    transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:")) if url.startswith("unix:") else None
    base = "http://sandbox" if url.startswith("unix:") else url
    try:
        async with httpx.AsyncClient(base_url=base, transport=transport, timeout=2) as http:
            return (await http.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.asynccontextmanager
async def sandbox_at(url: str | None, *, spawn: bool = True, pool_size: int = 2) -> AsyncIterator[str]:
    """Yield a URL where a healthy sandbox answers: `url` if it is up, else a spawned local one."""
    if url and await is_up(url):
        yield url
        return
    if not spawn:
        raise LocalSandboxError(f"no sandbox answers at {url}; start one with `make sandbox`")
    python = REPO_ROOT / ".venv-sandbox" / "bin" / "python"
    jail_python = REPO_ROOT / ".cache" / "jail-python"
    if not python.exists() or not jail_python.exists():
        raise LocalSandboxError(
            f"no sandbox answers at {url} and the local one is not built: run `make sandbox-env` "
            "(or start a sandbox and pass its URL)"
        )
    env = {
        **os.environ,
        "THOR_SANDBOX_PORT": "0",
        "THOR_SANDBOX_POOL_SIZE": str(pool_size),
        "THOR_SANDBOX_JAIL_PYTHON_HOME": str(jail_python),
        "THOR_SANDBOX_LOG_LEVEL": os.environ.get("THOR_SANDBOX_LOG_LEVEL", "WARNING"),
    }
    proc = await asyncio.create_subprocess_exec(
        str(python), "-m", "thor_sandbox", cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        # its own session: a Ctrl-C at the terminal reaches only us, and we stop it in order
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("THOR_SANDBOX_LISTENING"):
            await proc.wait()
            raise LocalSandboxError(f"the local sandbox did not start (exit {proc.returncode}); see its log above")
        local = "http://" + line.split()[1]
        for _ in range(600):
            if await is_up(local):
                break
            if proc.returncode is not None:
                raise LocalSandboxError(f"the local sandbox exited ({proc.returncode})")
            await asyncio.sleep(0.1)
        else:
            raise LocalSandboxError("the local sandbox never became healthy")
        log.info("started a local sandbox at %s", local)
        yield local
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
