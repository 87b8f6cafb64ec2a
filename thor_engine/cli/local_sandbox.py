"""Finding or starting a sandbox service for a local run (the CLI, `make serve`).

Owns: using a given sandbox URL, or else the local sandbox address
`http://127.0.0.1:<port>` (port 8080 by default, `THOR_LOCAL_SANDBOX_PORT`, the
address SandboxFusion clients use): reusing a THOR sandbox that already answers
there, or starting the checkout's own service (`.venv-sandbox/bin/python -m
thor_sandbox`, built by `make sandbox-env`) there for the caller's lifetime. The
started service is tied to this process (`--parent-pid`: PR_SET_PDEATHSIG plus a
parent watch), so it and its jails die with us even when we are SIGKILLed.

Does not own: the sandbox (sandbox_image/) or its isolation; production
deployments run the service separately (compose, `make sandbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

log = logging.getLogger("thor_engine.cli.local_sandbox")

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_HOST = "127.0.0.1"
DEFAULT_LOCAL_PORT = 8080


class LocalSandboxError(RuntimeError):
    pass


def local_port() -> int:
    """The local sandbox port: `THOR_LOCAL_SANDBOX_PORT`, else 8080."""
    raw = os.environ.get("THOR_LOCAL_SANDBOX_PORT", str(DEFAULT_LOCAL_PORT))
    try:
        port = int(raw)
    except ValueError:
        raise LocalSandboxError(f"THOR_LOCAL_SANDBOX_PORT={raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise LocalSandboxError(f"THOR_LOCAL_SANDBOX_PORT={port} is not between 1 and 65535")
    return port


def local_url(port: int) -> str:
    return f"http://{LOCAL_HOST}:{port}"


async def is_up(url: str) -> bool:
    """True when a THOR sandbox answers healthy at `url` (`http://...` or `unix:/path`)."""
    transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix:")) if url.startswith("unix:") else None
    base = "http://sandbox" if url.startswith("unix:") else url
    try:
        async with httpx.AsyncClient(base_url=base, transport=transport, timeout=2) as http:
            resp = await http.get("/health")
            return resp.status_code == 200 and "workers_ready" in resp.json()
    except (httpx.HTTPError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOCAL_HOST, port))
        except OSError:
            return False
    return True


@contextlib.asynccontextmanager
async def sandbox_at(url: str | None, *, port: int | None = None, pool_size: int = 2) -> AsyncIterator[str]:
    """Yield the URL of a healthy sandbox for the duration of the block.

    `url` given: it must answer (nothing is started). No `url`: the local address
    127.0.0.1:`port` (default `local_port()`): a THOR sandbox already there is reused,
    otherwise one is started there and stopped when the block ends.
    """
    if url:
        if await is_up(url):
            yield url
            return
        raise LocalSandboxError(
            f"no sandbox answers at {url}; start one (`make sandbox`) or leave the sandbox URL unset to "
            "start a local one"
        )
    port = local_port() if port is None else port
    address = local_url(port)
    if await is_up(address):
        log.info("using the sandbox already running at %s", address)
        yield address
        return
    python = REPO_ROOT / ".venv-sandbox" / "bin" / "python"
    jail_python = REPO_ROOT / ".cache" / "jail-python"
    if not python.exists() or not jail_python.exists():
        raise LocalSandboxError(
            "the local sandbox is not built: run `make sandbox-env` (or start a sandbox and pass its URL)"
        )
    if not _port_free(port):
        raise LocalSandboxError(
            f"port {port} is taken by something that is not a healthy THOR sandbox: free it, or choose another "
            "local sandbox port (THOR_LOCAL_SANDBOX_PORT, --local-sandbox-port), or pass a sandbox URL"
        )
    env = {
        **os.environ,
        "THOR_SANDBOX_HOST": LOCAL_HOST,
        "THOR_SANDBOX_PORT": str(port),
        "THOR_SANDBOX_POOL_SIZE": str(pool_size),
        "THOR_SANDBOX_JAIL_PYTHON_HOME": str(jail_python),
        "THOR_SANDBOX_PARENT_PID": str(os.getpid()),
        "THOR_SANDBOX_LOG_LEVEL": os.environ.get("THOR_SANDBOX_LOG_LEVEL", "WARNING"),
    }
    proc = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "thor_sandbox",
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        # its own session: a Ctrl-C at the terminal reaches only us, and we stop it in order
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith("THOR_SANDBOX_LISTENING"):
            await proc.wait()
            raise LocalSandboxError(f"the local sandbox did not start (exit {proc.returncode}); see its log above")
        for _ in range(600):
            if await is_up(address):
                break
            if proc.returncode is not None:
                raise LocalSandboxError(f"the local sandbox exited ({proc.returncode})")
            await asyncio.sleep(0.1)
        else:
            raise LocalSandboxError("the local sandbox never became healthy")
        log.info("started a local sandbox at %s", address)
        yield address
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
