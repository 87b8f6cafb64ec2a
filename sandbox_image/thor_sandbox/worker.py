"""One jailed warm worker, seen from the service: process lifetime and framing.

Owns: starting `nsjail ... jail_worker.py` as an asyncio subprocess, waiting for
its ready frame, sending one snippet at a time and reading the result with a hard
deadline, forwarding nsjail's own log lines to our logger, and killing the whole
jail. Each nsjail is started with PR_SET_PDEATHSIG=SIGKILL, so it (and the jail it
holds) dies with the service even when the service itself is SIGKILLed. Does not own: scheduling or replacement policy (pool.py), or judging
outcomes beyond decoding the frame (pool.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("thor_sandbox.worker")

#: Extra seconds past a snippet's own timeout before the service gives up on the
#: worker itself (the worker enforces the snippet timeout; this catches a wedged worker).
WORKER_GRACE_S = 5.0
MAX_FRAME = 64 * 1024 * 1024
PR_SET_PDEATHSIG = 1
# Loaded once here: the pre-exec hook runs between fork and exec, where dlopen is unsafe.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Pre-exec hook: the kernel SIGKILLs the child when the service (its parent) dies."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class WorkerDied(RuntimeError):
    """The worker process ended or stopped answering; it must be replaced."""


@dataclass
class WorkerInfo:
    preload_s: float = 0.0
    preload_failed: list[str] = field(default_factory=list)
    vm_bytes: int = 0
    versions: dict[str, str] = field(default_factory=dict)


class JailWorker:
    """A long-lived nsjail'd Python that runs snippets one at a time."""

    _ids = 0

    def __init__(self, argv: list[str]) -> None:
        JailWorker._ids += 1
        self.id = JailWorker._ids
        self._argv = argv
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self.snippets_run = 0
        self.info = WorkerInfo()
        self.broken = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self, timeout: float) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=MAX_FRAME,
            preexec_fn=_die_with_parent,
        )
        self._stderr_task = asyncio.create_task(self._forward_stderr())
        try:
            ready = await asyncio.wait_for(self._recv(), timeout)
        except (TimeoutError, WorkerDied) as exc:
            await self.kill()
            raise WorkerDied(f"worker {self.id} did not become ready within {timeout:.0f}s: {exc}") from exc
        if not ready.get("ready"):
            await self.kill()
            raise WorkerDied(f"worker {self.id} sent an unexpected first frame: {ready!r}")
        self.info = WorkerInfo(
            ready.get("preload_s", 0.0),
            ready.get("preload_failed", []),
            ready.get("vm_bytes", 0),
            ready.get("versions", {}),
        )
        if self.info.preload_failed:
            log.warning("worker %d could not preload: %s", self.id, "; ".join(self.info.preload_failed))
        log.debug("worker %d ready (pid %s, preload %.2fs)", self.id, self.pid, self.info.preload_s)

    async def _forward_stderr(self) -> None:
        assert self._proc and self._proc.stderr
        async for raw in self._proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if "no version information available" in line:  # harmless libnl soname notice
                continue
            if line:
                log.warning("worker %d nsjail: %s", self.id, line)

    async def _recv(self) -> dict:
        assert self._proc and self._proc.stdout
        try:
            header = await self._proc.stdout.readexactly(4)
            (length,) = struct.unpack(">I", header)
            if length > MAX_FRAME:
                raise WorkerDied(f"frame of {length} bytes exceeds {MAX_FRAME}")
            body = await self._proc.stdout.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise WorkerDied(f"worker {self.id} exited (code {self._proc.returncode})") from exc
        return json.loads(body)

    async def run(self, request: dict, timeout: float) -> dict:
        """Send one snippet request; return the worker's result frame."""
        if self._proc is None or self._proc.returncode is not None or self.broken:
            raise WorkerDied(f"worker {self.id} is not running")
        assert self._proc.stdin
        data = json.dumps(request).encode("utf-8")
        try:
            self._proc.stdin.write(struct.pack(">I", len(data)) + data)
            await self._proc.stdin.drain()
            result = await asyncio.wait_for(self._recv(), timeout + WORKER_GRACE_S)
        except (TimeoutError, ConnectionError, WorkerDied) as exc:
            self.broken = True
            raise WorkerDied(f"worker {self.id} failed during a snippet: {exc!r}") from exc
        except asyncio.CancelledError:
            # The caller gave up mid-snippet: the frame stream is now out of step.
            self.broken = True
            raise
        self.snippets_run += 1
        return result

    async def kill(self) -> None:
        """Kill nsjail (which takes the whole jail with it) and reap it."""
        self.broken = True
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            log.error("worker %d (pid %s) did not exit after SIGKILL", self.id, proc.pid)
        if self._stderr_task:
            self._stderr_task.cancel()


def config_path_for(state_dir: Path) -> Path:
    return state_dir / "worker.cfg"
