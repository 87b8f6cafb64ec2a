"""The warm worker that runs *inside* the nsjail jail (it is the jail's PID 1).

Owns: importing the scientific stack once, then for each request forking a fresh
child that runs one snippet under per-snippet rlimits, collecting its capped
stdout/stderr, enforcing the wall-clock timeout, and afterwards killing every
process left in the jail and wiping /tmp, so the next snippet starts clean.

Does not own: isolation itself. Namespaces, mounts, seccomp, the uid mapping and
cgroups are nsjail's (configured by jail.py); this file assumes it is already
jailed and must never be run outside a PID namespace (it calls kill(-1)).

Threat model: the snippet is hostile Python. It runs as an unprivileged uid with
no capabilities, cannot ptrace (seccomp) or open /proc/1/fd (this process is
non-dumpable), and cannot kill this process (PID 1 ignores signals it has no
handler for when they come from inside its namespace). Everything it starts is
SIGKILLed after it returns. What it prints is data: the service treats the
response framing as authoritative only because the child never holds our fds.

Protocol on fds 0/1 (moved to private fds at start): frames of a 4-byte
big-endian length + UTF-8 JSON. First frame out is {"ready": true, ...}.
Standard library only; runs on the jail's Python.
"""

import ast
import ctypes
import gc
import io
import json
import linecache
import os
import resource
import selectors
import shutil
import signal
import struct
import sys
import time
import traceback

SNIPPET_FILENAME = "<snippet>"
TMP = "/tmp"
PR_SET_DUMPABLE = 4


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode("utf-8")
    _write_all(fd, struct.pack(">I", len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _vm_size_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _versions() -> dict:
    """Versions of what shapes a snippet's result: the interpreter and the preloaded libraries."""
    found = {"python": sys.version.split()[0]}
    for name in ("numpy", "sympy", "scipy", "mpmath"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if isinstance(version, str):
            found[name] = version
    return found


# --- child side ---------------------------------------------------------------------


def _clean_traceback(exc: BaseException) -> None:
    """Print a traceback that starts at the snippet's own frames (not ours)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != SNIPPET_FILENAME:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb if tb is not None else None)


def _run_snippet(code: str, echo: bool) -> int:
    """Run the snippet as __main__; return the exit code."""
    linecache.cache[SNIPPET_FILENAME] = (len(code), None, code.splitlines(True), SNIPPET_FILENAME)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        tree = ast.parse(code, SNIPPET_FILENAME, "exec")
        tail = None
        if echo and tree.body and isinstance(tree.body[-1], ast.Expr):
            tail = ast.Expression(tree.body.pop().value)
        exec(compile(tree, SNIPPET_FILENAME, "exec"), namespace)
        if tail is not None:
            value = eval(compile(tail, SNIPPET_FILENAME, "eval"), namespace)
            if value is not None:
                print(repr(value))
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code & 0xFF
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - the snippet's own failure, reported as stderr
        _clean_traceback(exc)
        return 1


def _child(req: dict, stdin_fd: int, out_w: int, err_w: int, base_vm: int) -> None:
    """In the forked child: set limits, wire stdio, run, and _exit. Never returns."""
    code = 1
    try:
        os.setsid()
        # Every snippet is a fork of the same warm process: without a fresh seed, numpy's
        # global generator would hand every snippet the same "random" numbers. (The
        # `random` module reseeds itself after fork; numpy does not.)
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            np_random.seed()
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 65536)
        limits = req["limits"]
        cpu = int(limits["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        if limits.get("memory_bytes"):
            mem = base_vm + int(limits["memory_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_bytes"], limits["file_size_bytes"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(TMP)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        sys.argv = [SNIPPET_FILENAME]
        code = _run_snippet(req["code"], bool(req.get("echo")))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a full disk or closed pipe must not hide the exit code
                pass
    except BaseException:  # noqa: BLE001
        code = 1
    os._exit(code)


# --- parent side (PID 1) --------------------------------------------------------------


def _kill_everything_else() -> None:
    """SIGKILL every process in the jail but us (we are PID 1), then reap them all."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _wipe_tmp() -> bool:
    ok = True

    def _onexc(func, path, exc):  # make read-only dirs writable, then retry once
        nonlocal ok
        try:
            os.chmod(os.path.dirname(path) or TMP, 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError:
            ok = False

    for name in os.listdir(TMP):
        path = os.path.join(TMP, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, onexc=_onexc)
            else:
                os.unlink(path)
        except OSError:
            ok = False
    return ok and not os.listdir(TMP)


def _execute(req: dict, base_vm: int) -> dict:
    cap = int(req["limits"]["output_bytes"])
    timeout = float(req["timeout"])
    stdin_path = os.path.join(TMP, ".stdin")
    with open(stdin_path, "wb") as f:
        f.write((req.get("stdin") or "").encode("utf-8"))
    stdin_fd = os.open(stdin_path, os.O_RDONLY)
    os.unlink(stdin_path)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(req, stdin_fd, out_w, err_w, base_vm)
    os.close(stdin_fd)
    os.close(out_w)
    os.close(err_w)

    bufs = {out_r: bytearray(), err_r: bytearray()}
    truncated = {out_r: False, err_r: False}
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ)
    sel.register(err_r, selectors.EVENT_READ)
    pidfd = os.pidfd_open(pid)
    sel.register(pidfd, selectors.EVENT_READ)
    deadline = start + timeout
    timed_out = capped = exited = False
    status = None
    open_pipes = 2
    while open_pipes or not exited:
        remaining = deadline - time.monotonic()
        if remaining <= 0 and not exited:
            timed_out = True
            break
        events = sel.select(timeout=max(remaining, 0) if not exited else 1.0)
        if not events and exited:
            break  # a leftover process still holds the pipes: it is killed below
        for key, _ in events:
            fd = key.fd
            if fd == pidfd:
                sel.unregister(pidfd)
                _, status = os.waitpid(pid, 0)
                exited = True
                # the snippet is over: nothing it started may outlive it (or hold our pipes)
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                open_pipes -= 1
                continue
            room = cap - len(bufs[fd])
            if len(chunk) > room:
                bufs[fd] += chunk[: max(room, 0)]
                truncated[fd] = True
                capped = True
            else:
                bufs[fd] += chunk
        if capped:
            break
    duration = time.monotonic() - start
    sel.close()
    if not exited:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    _kill_everything_else()
    for fd in (out_r, err_r):
        os.close(fd)
    tmp_clean = _wipe_tmp()

    exit_code = os.waitstatus_to_exitcode(status) if status is not None else None
    sig = -exit_code if exit_code is not None and exit_code < 0 else None
    if sig is not None:
        exit_code = None
    stderr = bufs[err_r].decode("utf-8", errors="replace")
    if sig in (signal.SIGXCPU,):
        timed_out = True
    oom = not timed_out and not capped and "MemoryError" in stderr.rstrip().rsplit("\n", 1)[-1]
    return {
        "exit_code": exit_code,
        "signal": sig,
        "stdout": bufs[out_r].decode("utf-8", errors="replace"),
        "stderr": stderr,
        "stdout_truncated": truncated[out_r],
        "stderr_truncated": truncated[err_r],
        "timed_out": timed_out,
        "output_capped": capped,
        "oom": oom,
        "duration_s": duration,
        "recycle": not tmp_clean,
    }


def main() -> None:
    # Private copies of the protocol fds; 0/1 become /dev/null so nothing inherits them.
    rfd = os.dup(0)
    wfd = os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    for fd in (rfd, wfd):
        os.set_inheritable(fd, False)
    # As PID 1 we only receive in-namespace signals we handle: handle none (Python
    # installs a SIGINT handler by default; drop it so a snippet cannot kill us).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # Not dumpable: a same-uid snippet cannot open /proc/1/fd/* or /proc/1/mem.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)

    t0 = time.monotonic()
    failed = []
    for name in filter(None, os.environ.get("THOR_PRELOAD", "").split(",")):
        try:
            __import__(name)
        except Exception as exc:  # noqa: BLE001 - reported to the service, which logs it
            failed.append(f"{name}: {exc}")
    # Move everything imported so far out of the collector's reach: a child's GC then
    # never touches (and copy-on-write faults) the preloaded heap.
    gc.collect()
    gc.freeze()
    base_vm = _vm_size_bytes()
    _send(
        wfd,
        {
            "ready": True,
            "preload_s": time.monotonic() - t0,
            "preload_failed": failed,
            "pid": os.getpid(),
            "uid": os.getuid(),
            "vm_bytes": base_vm,
            "versions": _versions(),
        },
    )
    while True:
        header = _read_exact(rfd, 4)
        if header is None:
            return
        (length,) = struct.unpack(">I", header)
        body = _read_exact(rfd, length)
        if body is None:
            return
        req = json.loads(body)
        try:
            result = _execute(req, base_vm)
        except Exception as exc:  # noqa: BLE001 - worker-side failure: report and ask to be replaced
            _kill_everything_else()
            result = {"internal_error": f"{type(exc).__name__}: {exc}", "recycle": True}
        _send(wfd, result)


if __name__ == "__main__":
    main()
