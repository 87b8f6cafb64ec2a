"""Run a real, throwaway `redis-server` for tests: free port, temp dir, no persistence.

The server can be stopped and started again on the same port (outage tests), and
paused with SIGSTOP (a Redis that accepts connections but never answers).
`count_redis_traffic` counts what redis-py clients send towards Redis (connection
attempts, commands written), so outage tests assert "no round trip" instead of timing
operations. It does not fake or intercept Redis: every call still goes to the real server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed port; `start`/`stop` may be repeated."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        found = binary or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(found).exists():
            raise RuntimeError("redis-server not found: run scripts/apt-deps.sh (Debian package redis-server)")
        self.binary = found
        self.port = port or _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="thor-redis-"))
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            return
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.log_path),
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        proc, self.process = self.process, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)  # in case it was paused
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, the server never answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def run_redis(port: int | None = None) -> Iterator[RedisServer]:
    """A started redis-server (its `.url` is what clients need) until the block ends."""
    server = RedisServer(port)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@dataclass
class RedisTraffic:
    """What redis-py (asyncio) clients sent towards Redis while counting."""

    connects: int = 0  # connection attempts (socket connect + handshake), failed or not
    commands: int = 0  # commands written to a connection (including health-check PINGs)

    @property
    def total(self) -> int:
        return self.connects + self.commands


@contextlib.contextmanager
def count_redis_traffic() -> Iterator[RedisTraffic]:
    """Count connection attempts and commands of every redis.asyncio connection in the block.

    Wraps `connect_check_health` (counted only when the connection is not yet open) and
    `send_packed_command` of `redis.asyncio.connection.AbstractConnection`; the real methods
    still run, so the store under test talks to the real server (or fails to).
    """
    from redis.asyncio.connection import AbstractConnection

    traffic = RedisTraffic()
    connect = AbstractConnection.connect_check_health
    send = AbstractConnection.send_packed_command

    async def counting_connect(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        if not self.is_connected:
            traffic.connects += 1
        return await connect(self, *args, **kwargs)

    async def counting_send(self: AbstractConnection, *args: Any, **kwargs: Any) -> Any:
        traffic.commands += 1
        return await send(self, *args, **kwargs)

    AbstractConnection.connect_check_health = counting_connect  # type: ignore[method-assign]
    AbstractConnection.send_packed_command = counting_send  # type: ignore[method-assign]
    try:
        yield traffic
    finally:
        AbstractConnection.connect_check_health = connect  # type: ignore[method-assign]
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
