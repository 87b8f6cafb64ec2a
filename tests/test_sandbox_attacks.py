"""Attack battery against the real sandbox (nsjail): each attack is contained, then a
normal snippet runs correctly on the same (single-worker) pool."""

from __future__ import annotations

import signal
import socket
import textwrap
import threading

import httpx
import pytest

from tests.conftest import CANARY
from tests.support.sandbox_service import ROOT

pytestmark = pytest.mark.sandbox


def run(svc, code: str, timeout: float | None = None, **extra) -> dict:
    snippet = {"code": textwrap.dedent(code), **extra}
    if timeout is not None:
        snippet["timeout"] = timeout
    resp = httpx.post(svc.url + "/v1/execute", json={"snippets": [snippet]}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["results"][0]


def assert_still_serves(svc) -> None:
    r = run(svc, "import sympy; print(sympy.factor('x**2-1'), 6*7)")
    assert r["outcome"] == "ok", r
    assert r["stdout"] == "(x - 1)*(x + 1) 42\n"


def restarts(svc) -> float:
    text = httpx.get(svc.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("thor_sandbox_worker_restarts_total{")
    )


def test_identity_is_unprivileged(sandbox_one):
    r = run(
        sandbox_one,
        """
        import os
        print(os.getuid(), os.geteuid(), os.getgid())
        print(open('/proc/self/uid_map').read().split())
        print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])
    """,
    )
    lines = r["stdout"].splitlines()
    assert lines[0] == "1000 1000 1000"
    assert lines[1] == "['1000', '65534', '1']"  # never host uid 0
    assert int(lines[2], 16) == 0  # no capabilities
    assert_still_serves(sandbox_one)


def test_socket_to_loopback_and_host_listener(sandbox_one):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(3)
    port = listener.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        try:
            accepted.append(listener.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    r = run(
        sandbox_one,
        f"""
        import socket
        for host, port in [("127.0.0.1", {port}), ("127.0.0.1", 8080), ("10.0.0.1", 80)]:
            s = socket.socket(); s.settimeout(1)
            try:
                s.connect((host, port)); print("CONNECTED", host, port)
            except OSError as e:
                print("refused", host, port, type(e).__name__)
    """,
    )
    t.join()
    listener.close()
    assert "CONNECTED" not in r["stdout"], r
    assert r["stdout"].count("refused") == 3
    assert accepted == []
    assert_still_serves(sandbox_one)


def test_dns_lookup_fails(sandbox_one):
    r = run(
        sandbox_one,
        """
        import socket
        try:
            print(socket.getaddrinfo("pypi.org", 443))
        except OSError as e:
            print("no dns:", type(e).__name__)
        print(sorted(n for _, n in socket.if_nameindex()))
    """,
    )
    assert r["stdout"].startswith("no dns:"), r
    assert r["stdout"].splitlines()[1] == "['lo']"
    assert_still_serves(sandbox_one)


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", "/root", str(ROOT), str(ROOT / "README.md"), "/home"])
def test_host_files_invisible(sandbox_one, path):
    r = run(
        sandbox_one,
        f"""
        import os
        print(os.path.exists({path!r}))
        try:
            open({path!r}).read(); print("READ")
        except OSError as e:
            print(type(e).__name__)
    """,
    )
    assert r["stdout"].splitlines()[0] == "False", r
    assert "READ" not in r["stdout"]
    assert_still_serves(sandbox_one)


def test_proc_is_private_and_worker_unreadable(sandbox_one):
    r = run(
        sandbox_one,
        """
        import os
        pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        print(pids[0], len(pids))
        for what in ('/proc/1/environ', '/proc/1/mem', '/proc/1/fd/0', '/proc/1/cmdline'):
            try:
                data = open(what, 'rb').read(4096); print(what, 'READ', data[:80])
            except OSError as e:
                print(what, type(e).__name__)
    """,
    )
    lines = r["stdout"].splitlines()
    assert lines[0] == "1 2", r  # only the worker (pid 1) and this snippet exist in the jail
    for line in lines[1:4]:
        assert "READ" not in line, line  # the worker is non-dumpable: no environ, memory or fds
    assert CANARY not in r["stdout"]
    assert_still_serves(sandbox_one)


def test_environment_does_not_leak(sandbox_one):
    r = run(sandbox_one, "import os; print(dict(os.environ))")
    assert CANARY not in r["stdout"]
    assert "THOR_CANARY_SECRET" not in r["stdout"]
    assert "THOR_SANDBOX" not in r["stdout"]
    assert "'HOME': '/tmp'" in r["stdout"]
    assert_still_serves(sandbox_one)


@pytest.mark.parametrize(
    "target", ["/x", "/opt/python/evil.py", "/usr/lib/evil", "/proc/sys/kernel/hostname", "/dev/evil"]
)
def test_writes_outside_tmp_fail(sandbox_one, target):
    r = run(
        sandbox_one,
        f"""
        try:
            open({target!r}, 'w').write('x'); print("WROTE")
        except OSError as e:
            print(type(e).__name__)
    """,
    )
    assert "WROTE" not in r["stdout"], r
    assert_still_serves(sandbox_one)


def test_fork_bomb_is_contained(sandbox_one):
    r = run(
        sandbox_one,
        """
        import os
        n = 0
        while True:
            try:
                os.fork(); n += 1
            except OSError:
                pass
    """,
        timeout=3,
    )
    # the loop never ends by itself: only the jail's timeout kill (SIGKILL, or SIGXCPU at the CPU limit) stops it
    assert r["outcome"] == "timeout" and r["signal"] in (signal.SIGKILL, signal.SIGXCPU), r
    assert_still_serves(sandbox_one)


def test_allocating_4gb_is_oom(sandbox_one):
    r = run(sandbox_one, "x = bytearray(4 * 1024**3); print('allocated')")
    assert r["outcome"] == "oom", r
    assert "allocated" not in r["stdout"]
    assert_still_serves(sandbox_one)


def test_infinite_loop_times_out(sandbox_one):
    r = run(sandbox_one, "while True: pass", timeout=1.5)
    assert r["outcome"] == "timeout", r
    assert r["signal"] in (signal.SIGKILL, signal.SIGXCPU) and r["exit_code"] is None, r  # killed, not left running
    assert_still_serves(sandbox_one)


def test_sleep_past_timeout(sandbox_one):
    r = run(sandbox_one, "import time; print('start', flush=True); time.sleep(30); print('end')", timeout=1)
    assert r["outcome"] == "timeout", r
    # output before the kill is kept; the wall-clock kill (SIGKILL) came before the sleep ended
    assert r["stdout"] == "start\n" and r["signal"] == signal.SIGKILL and r["exit_code"] is None, r
    assert_still_serves(sandbox_one)


def test_printing_10mb_is_capped(sandbox_one):
    r = run(sandbox_one, "import sys; sys.stdout.write('a' * 10_000_000); print('END')")
    assert r["outcome"] == "output_capped", r
    assert r["stdout_truncated"] is True
    assert len(r["stdout"]) == 64 * 1024
    assert_still_serves(sandbox_one)


def test_stderr_flood_is_capped(sandbox_one):
    r = run(sandbox_one, "import sys\nwhile True: sys.stderr.write('e' * 4096)")
    assert r["outcome"] == "output_capped", r
    assert r["stderr_truncated"] is True and len(r["stderr"]) == 64 * 1024
    assert_still_serves(sandbox_one)


def test_dangerous_syscalls_denied(sandbox_one):
    r = run(
        sandbox_one,
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        SYS = {"ptrace": 101, "mount": 165, "bpf": 321, "unshare": 272, "perf_event_open": 298}
        print("ptrace", libc.syscall(SYS["ptrace"], 16, 1, 0, 0), ctypes.get_errno())  # PTRACE_ATTACH pid 1
        print("mount", libc.mount(b"none", b"/tmp", b"tmpfs", 0, None), ctypes.get_errno())
        print("bpf", libc.syscall(SYS["bpf"], 0, 0, 0), ctypes.get_errno())
        try:
            os.unshare(os.CLONE_NEWUSER); print("unshare OK")
        except OSError as e:
            print("unshare", e.errno)
        try:
            os.unshare(os.CLONE_NEWNET); print("unshare-net OK")
        except OSError as e:
            print("unshare-net", e.errno)
    """,
    )
    out = r["stdout"]
    assert "ptrace -1 1" in out, r
    assert "mount -1 1" in out
    assert "bpf -1 1" in out
    assert "unshare 1" in out and "unshare-net 1" in out
    assert "OK" not in out
    assert_still_serves(sandbox_one)


def test_detached_child_does_not_outlive_snippet(sandbox_one):
    r = run(
        sandbox_one,
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(1)
                open('/tmp/ghost', 'w').write('alive')
                time.sleep(60)
            os._exit(0)
        print("parent exits")
    """,
    )
    assert r["outcome"] == "ok" and r["stdout"] == "parent exits\n"
    nxt = run(
        sandbox_one,
        """
        import os, time
        time.sleep(1.5)
        print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.path.exists('/tmp/ghost'))
    """,
    )
    pids, ghost = nxt["stdout"].rsplit(" ", 1)
    assert ghost.strip() == "False", nxt
    assert len(eval(pids)) == 2, nxt  # the worker and this snippet only
    assert_still_serves(sandbox_one)


def test_signals_to_worker_are_ignored(sandbox_one):
    before = restarts(sandbox_one)
    r = run(
        sandbox_one,
        """
        import os, signal
        for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGSTOP):
            try:
                os.kill(1, sig)
            except OSError as e:
                print("kill", sig, type(e).__name__)
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
        print("survived")
    """,
    )
    # PID 1 (the jail's worker) has no handlers, so in-namespace signals to it are dropped without
    # an error; Linux's kill(-1) spares the caller: the snippet and the worker both live on
    assert (r["outcome"], r["stdout"]) == ("ok", "survived\n"), r
    assert_still_serves(sandbox_one)
    assert restarts(sandbox_one) == before  # no worker had to be replaced


def test_tmp_files_do_not_leak_between_snippets(sandbox_one):
    r = run(
        sandbox_one,
        """
        import os
        open('/tmp/secret.txt', 'w').write('from the previous snippet')
        os.makedirs('/tmp/d/e', exist_ok=True); open('/tmp/d/e/f', 'w').write('x')
        os.chmod('/tmp/d/e', 0o000); os.chmod('/tmp/d', 0o500)
        print(sorted(os.listdir('/tmp')))
    """,
    )
    assert r["stdout"] == "['d', 'secret.txt']\n", r
    nxt = run(sandbox_one, "import os; print(os.listdir('/tmp'))")
    assert nxt["stdout"] == "[]\n", nxt
    assert_still_serves(sandbox_one)


def test_module_state_does_not_leak_between_snippets(sandbox_one):
    run(sandbox_one, "import sympy, math; sympy.LEAK = 1; math.pi = 3")
    r = run(sandbox_one, "import sympy, math; print(hasattr(sympy, 'LEAK'), math.pi)")
    assert r["stdout"] == "False 3.141592653589793\n", r


def test_filling_tmp_is_bounded(sandbox_one):
    # one growing file: the file-size limit (16 MB by default) kills it with SIGXFSZ
    r = run(
        sandbox_one,
        """
        data = b'x' * (1024 * 1024)
        with open('/tmp/big', 'wb') as f:
            while True:
                f.write(data); f.flush()
    """,
        timeout=5,
    )
    assert (r["outcome"], r["signal"]) == ("error", signal.SIGXFSZ), r
    # many files under that limit: the /tmp tmpfs (64 MB by default) is full, ENOSPC
    r = run(
        sandbox_one,
        """
        import errno
        data = b'x' * (1024 * 1024)
        n = 0
        try:
            while True:
                with open(f'/tmp/f{n}', 'wb') as f:
                    f.write(data)
                n += 1
        except OSError as e:
            print('stopped', n <= 64, errno.errorcode[e.errno])
    """,
        timeout=5,
    )
    assert (r["outcome"], r["stdout"]) == ("ok", "stopped True ENOSPC\n"), r
    assert_still_serves(sandbox_one)
