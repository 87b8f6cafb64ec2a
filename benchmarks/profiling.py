"""Sampling a running server with py-spy while a benchmark loads it, and summarising where its time goes.

Owns: `py_spy` (a context manager that records one process with `py-spy record --format raw
--nonblocking`, so the process is never paused, for as long as the block runs) and
`top_frames` (the collapsed stacks summarised: the functions the process was running
itself, "self", and those on the stack, "total", as shares of all samples, with the
samples of idle threads and of the event loop's wait removed so the shares are of work).
Does not own: starting servers or load (server_bench.py, tir_bench.py).

py-spy (PyPI `py-spy`, in the `test` extra) needs ptrace rights over the process: root or
`kernel.yama.ptrace_scope = 0`. A benchmark asked to profile fails when it cannot.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: frames that mean "waiting, not working": the event loop's selector, thread pools' idle waits
IDLE = re.compile(
    r"^(select|poll|epoll_wait|_worker|wait|_wait_for_tstate_lock|get) \((selectors|threading|queue|concurrent)"
)
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")


def py_spy_path() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: `pip install py-spy` (it is in the project's test extra)")
    return found


@contextlib.contextmanager
def py_spy(pid: int, out: Path, rate: int = 200) -> Iterator[Path]:
    """Record `pid` into `out` (collapsed stacks) while the block runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # --gil: only samples where a thread holds the GIL, i.e. Python work (uvloop's wait in epoll drops out)
    cmd = [py_spy_path(), "record", "-p", str(pid), "-o", str(out), "--format", "raw", "-r", str(rate), "--gil"]
    proc = subprocess.Popen([*cmd, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached before the load starts
    if proc.poll() is not None:
        raise RuntimeError(f"py-spy could not record pid {pid}: {proc.stderr.read() if proc.stderr else ''}")
    t0 = time.monotonic()
    try:
        yield out
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        # what top_frames needs to say how much of the time the process held the GIL
        out.with_suffix(".meta.json").write_text(json.dumps({"rate": rate, "seconds": time.monotonic() - t0}))


def _short(frame: str) -> str:
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    else:
        file = file.split("/work/main/", 1)[-1] if "/work/" in file else file
    return f"{m['func']} ({file})"


def top_frames(raw: Path, n: int = 20) -> dict[str, Any]:
    """Self and total shares of the busiest functions in a py-spy raw (collapsed) profile."""
    self_: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames or IDLE.match(frames[-1].strip()):
            idle += int(count)
            continue
        c = int(count)
        busy += c
        short = [_short(f) for f in frames]
        self_[short[-1]] += c
        for name in set(short):
            total[name] += c

    def shares(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": k, "share": v / busy} for k, v in counter.most_common(n)] if busy else []

    meta_path = raw.with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    expected = meta.get("rate", 0) * meta.get("seconds", 0)
    return {
        "seconds": meta.get("seconds"),
        "rate_hz": meta.get("rate"),
        # samples with the GIL held / samples the rate would take: how busy the process's Python was
        "gil_held_share": busy / expected if expected else None,
        "busy_samples": busy,
        "idle_samples": idle,
        "self": shares(self_),
        "total": shares(total),
        "total_all": [{"frame": k, "share": v / busy} for k, v in total.most_common()] if busy else [],
    }


def print_top(title: str, summary: dict[str, Any], n: int = 12) -> None:
    held = summary.get("gil_held_share")
    print(
        f"\n#### {title}: {summary['busy_samples']} samples holding the GIL over {summary.get('seconds') or 0:.1f} s"
        + (f" (the GIL held {100 * held:.0f}% of the time)" if held is not None else "")
        + "\n"
    )
    print("| self % | function (file) |")
    print("| ---: | --- |")
    for row in summary["self"][:n]:
        print(f"| {100 * row['share']:.1f} | `{row['frame']}` |")
    ours = [
        r
        for r in summary["total_all"]
        if r["frame"].split("(")[-1].startswith(("server/", "thor_engine/")) and "__main__" not in r["frame"]
    ]
    print("\n| total % (on the stack) | our function (file) |")
    print("| ---: | --- |")
    for row in ours[:n]:
        print(f"| {100 * row['share']:.1f} | `{row['frame']}` |")
