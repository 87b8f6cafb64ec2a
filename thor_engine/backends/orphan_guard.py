"""Never leave the engine's processes behind when the process that owns them is killed.

Owns: `guard_processes(pids)`, which hands a list of process ids to a small watchdog
process. The watchdog holds the read end of a pipe whose write end only the owner
has; when the owner exits in any way (a clean exit, an exception, SIGKILL from a
supervisor), the kernel closes that end, the watchdog reads EOF and SIGKILLs every
guarded process that is still the same process (pid and start time both match, so a
reused pid is never hit). vLLM runs its engine core (and, on CPU, a worker) as
processes of its own that outlive a SIGKILLed parent, holding gigabytes of memory:
the vLLM backend guards them right after the engine starts.

Does not own: starting or stopping the engine (vllm_backend.py) or the sandbox
(the CLI launcher ties the local sandbox to its parent itself). Linux and macOS;
the watchdog ignores SIGINT/SIGTERM so a Ctrl-C to the terminal's process group
cannot stop it before it has done its job.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterable

log = logging.getLogger("thor_engine.orphan_guard")

_WATCHDOG = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
import psutil
guarded = {}
for line in sys.stdin:  # one "pid create_time" per line; EOF = the owner is gone
    pid, created = line.split()
    guarded[int(pid)] = float(created)
for pid, created in guarded.items():
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - created) < 0.01:
            p.kill()
    except psutil.Error:
        pass
"""


class OrphanGuard:
    """One watchdog per owner process; `add()` more pids at any time."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._owner = os.getpid()

    def add(self, pids: Iterable[int]) -> list[int]:
        import psutil

        lines, added = [], []
        for pid in pids:
            try:
                lines.append(f"{pid} {psutil.Process(pid).create_time()!r}\n")
                added.append(pid)
            except psutil.Error:
                continue
        if not lines:
            return []
        if self._proc is None or self._owner != os.getpid():
            self._owner = os.getpid()
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
                close_fds=True,
            )
        assert self._proc.stdin is not None
        self._proc.stdin.writelines(lines)
        self._proc.stdin.flush()
        return added

    def close(self) -> None:
        """The owner is done with the guarded processes: the watchdog checks them once and exits."""
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
            self._proc = None


_GUARD = OrphanGuard()


def guard_processes(pids: Iterable[int]) -> list[int]:
    """Kill these processes when this process exits, however it exits. Returns the pids guarded."""
    return _GUARD.add(pids)


def children_started_since(t0: float) -> list[int]:
    """Descendants of this process created at or after `t0` (time.time()): what a call just spawned."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.create_time() >= t0 - 0.5:
                out.append(child.pid)
        except psutil.Error:
            continue
    return out
