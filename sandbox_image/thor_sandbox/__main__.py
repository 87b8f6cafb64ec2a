"""`python -m thor_sandbox`: start the sandbox service in the foreground.

Owns: command-line flags (each overrides the matching THOR_SANDBOX_* setting),
logging set-up, the start-up isolation check (refuse to start without nsjail
isolation; there is no insecure fallback), and serving one app on TCP and,
optionally, a Unix socket, and (with `--parent-pid`) ending with the process that
launched it: PR_SET_PDEATHSIG plus a watch on the parent pid, so a launcher killed
with SIGKILL leaves no orphaned service or jails behind. Does not own: the API
(app.py) or the pool (pool.py).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .jail import IsolationUnavailable, build_config, check_isolation, prepare_cgroups, worker_argv, write_config
from .metrics import SandboxMetrics
from .pool import WorkerPool
from .settings import SandboxSettings
from .worker import JailWorker, config_path_for

log = logging.getLogger("thor_sandbox")

PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 1.0


def parse_args(argv: list[str] | None) -> dict[str, object]:
    p = argparse.ArgumentParser(
        prog="python -m thor_sandbox",
        description="THOR sandbox service: nsjail-isolated warm Python workers behind an HTTP API. "
        "Every flag can also be set as an environment variable THOR_SANDBOX_<NAME>.",
    )
    p.add_argument("--host", help="TCP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8080; 0 = pick a free port and print it)")
    p.add_argument("--unix-socket", type=Path, help="also serve on this Unix socket path")
    p.add_argument("--pool-size", type=int, help="number of warm workers (default 2)")
    p.add_argument("--max-queue", type=int, help="requests allowed to wait for a worker (default 64)")
    p.add_argument("--default-timeout-s", type=float, help="per-snippet wall-clock timeout (default 10)")
    p.add_argument("--memory-limit-mb", type=int, help="per-snippet memory limit (default 1024)")
    p.add_argument("--jail-python-home", type=Path, help="Python 3.12 prefix mounted in the jail")
    p.add_argument(
        "--parent-pid",
        type=int,
        help="exit when this process dies (launchers pass their own pid; default: run until stopped)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    args = vars(p.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def _bind_sockets(settings: SandboxSettings) -> list[socket.socket]:
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto says TCP; without it Nagle + delayed ACK add ~40 ms to every response.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((settings.host, settings.port))
    socks = [tcp]
    if settings.unix_socket:
        path = settings.unix_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        uds.bind(str(path))
        os.chmod(path, 0o660)
        socks.append(uds)
    for s in socks:
        s.listen(2048)
        s.set_inheritable(True)
    return socks


def tie_to_parent(parent_pid: int) -> bool:
    """Ask the kernel for SIGTERM when our parent dies; False if it is already gone."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent_pid


async def _watch_parent(parent_pid: int, server: uvicorn.Server) -> None:
    # Belt and braces for PR_SET_PDEATHSIG (which follows the parent *thread*): once we
    # are reparented, the launcher is gone and so must we be (the pool kills the jails).
    while not server.should_exit:
        if os.getppid() != parent_pid:
            log.warning("launcher (pid %d) is gone: shutting down", parent_pid)
            server.should_exit = True
            return
        await asyncio.sleep(PARENT_POLL_S)


async def _serve(server: uvicorn.Server, sockets: list[socket.socket], parent_pid: int | None) -> None:
    watch = asyncio.create_task(_watch_parent(parent_pid, server)) if parent_pid else None
    try:
        await server.serve(sockets=sockets)
    finally:
        if watch is not None:
            watch.cancel()


def main(argv: list[str] | None = None) -> int:
    settings = SandboxSettings(**parse_args(argv))  # type: ignore[arg-type]
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if settings.parent_pid is not None and not tie_to_parent(settings.parent_pid):
        log.critical("parent process %d is already gone; not starting", settings.parent_pid)
        return 3
    settings = settings.model_copy(update={"jail_python_home": settings.jail_python_home.resolve()})
    state_dir = settings.state_dir.resolve()
    cgroups = prepare_cgroups(settings)
    config_path = write_config(build_config(settings, cgroups), config_path_for(state_dir))
    try:
        isolation = check_isolation(settings, config_path)
    except IsolationUnavailable as exc:
        log.critical("refusing to start without isolation: %s", exc)
        return 2
    log.info("isolation check passed: %s", isolation)
    argv_worker = worker_argv(settings, config_path)

    def pool_factory(metrics: SandboxMetrics) -> WorkerPool:
        return WorkerPool(settings, lambda: JailWorker(argv_worker), metrics)

    app = create_app(settings, pool_factory, isolation)
    sockets = _bind_sockets(settings)
    host, port = sockets[0].getsockname()[:2]
    where = f"http://{host}:{port}" + (f" and unix:{settings.unix_socket}" if settings.unix_socket else "")
    log.info("sandbox service listening on %s", where)
    print(f"THOR_SANDBOX_LISTENING {host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=settings.log_level.lower(), access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        asyncio.run(_serve(server, sockets, settings.parent_pid))
    except KeyboardInterrupt:
        pass
    finally:
        if settings.unix_socket and settings.unix_socket.exists():
            settings.unix_socket.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
