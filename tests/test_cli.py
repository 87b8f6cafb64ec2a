"""`python -m thor_engine` and `python -m server` as scripts and supervisors use them:
stdout that is JSON lines only, the local sandbox at its fixed address, and no
orphaned sandbox or jails when the parent is SIGKILLed. Real processes throughout:
vLLM (tiny TIR model), the sandbox service, nsjail."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.thor_server import run_server

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.sandbox


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so that no process binding port 0 (other
    sandboxes and servers started meanwhile) can take it before the code under test binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(condition: Callable[[], object], what: str, deadline_s: float = 120.0) -> object:
    """Poll until `condition()` is truthy; fail naming `what` if it never is."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.2)


def healthy(url: str) -> dict | None:
    try:
        r = httpx.get(url + "/health", timeout=2)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sandbox_processes(launcher: psutil.Process, sandbox_url: str) -> list[int]:
    """The sandbox service the launcher started and its jails (nsjail workers)."""
    [service] = [p for p in launcher.children(recursive=True) if "thor_sandbox" in " ".join(p.cmdline())]
    workers = [w["pid"] for w in healthy(sandbox_url)["workers"]]  # type: ignore[index]
    assert workers and all(w in [c.pid for c in service.children()] for w in workers)
    return [service.pid, *workers]


def sigkill_and_expect_no_orphans(proc: subprocess.Popen, sandbox_url: str) -> None:
    launcher = psutil.Process(proc.pid)
    pids = sandbox_processes(launcher, sandbox_url)
    others = [p.pid for p in launcher.children(recursive=True) if p.pid not in pids]
    proc.send_signal(signal.SIGKILL)  # as a supervisor does when SIGTERM is not enough
    proc.wait()
    try:
        wait_for(lambda: not any(alive(p) for p in pids), f"sandbox service and jails {pids} exit with their parent")
        assert healthy(sandbox_url) is None
        # and everything else it started: vLLM's engine core and worker (gigabytes) and the orphan guard
        wait_for(lambda: not any(alive(p) for p in others), f"the parent's other processes {others} exit with it")
    finally:
        for pid in pids + others:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "thor_engine", *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_json_mode_stdout_carries_json_lines_only(tiny_tir_model, sandbox):
    # -v: vLLM logs at INFO, which its own handler writes to stdout unless we stop it
    proc = cli(
        "--json",
        "-v",
        "--model",
        str(tiny_tir_model),
        "--sandbox-url",
        sandbox.url,
        "--max-model-len",
        "1024",
        "--max-tokens",
        "200",
        "Compute 17*23.",
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = out.splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a non-JSON line on stdout: {line!r}")
    assert events and events[-1]["type"] == "final", events[-1:]
    assert "INFO" in err  # vLLM's log lines were there; they went to stderr


def test_cli_local_sandbox_at_fixed_port_dies_with_a_sigkilled_cli(tiny_tir_model):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = cli(
        "--model",
        str(tiny_tir_model),
        "--max-model-len",
        "1024",
        "Compute 17*23.",
        env={"THOR_LOCAL_SANDBOX_PORT": str(port)},
    )
    try:
        wait_for(lambda: healthy(url) or proc.poll() is not None, "the CLI's local sandbox answers")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        # SandboxFusion's address form (trailing slash) is answered directly at the fixed address
        r = httpx.post(url + "/run_code/", json={"code": "print(6*7)"}, follow_redirects=False)
        assert r.status_code == 200 and r.json()["run_result"]["stdout"] == "42\n"
        sigkill_and_expect_no_orphans(proc, url)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_sandbox_refuses_to_start_without_its_parent(tmp_path):
    # the race PR_SET_PDEATHSIG cannot cover: the launcher died before the service asked for it
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = {
        **os.environ,
        "THOR_SANDBOX_PARENT_PID": str(gone.pid),
        "THOR_SANDBOX_PORT": "0",
        "THOR_SANDBOX_STATE_DIR": str(tmp_path),
    }
    r = subprocess.run(
        [str(ROOT / ".venv-sandbox/bin/python"), "-m", "thor_sandbox"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3 and f"parent process {gone.pid} is already gone" in r.stderr


def test_launcher_sigkilled_mid_snippet_leaves_nothing_running(tmp_path):
    # the launcher API itself, with a snippet running in a jail when the parent dies
    port = free_port()
    script = tmp_path / "launcher.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio
        from thor_engine.cli.local_sandbox import sandbox_at

        async def main():
            async with sandbox_at(None, port={port}) as url:
                print(url, flush=True)
                await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url == f"http://127.0.0.1:{port}"
        snippet = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
            import httpx
            httpx.post("{url}/run_code", json={{"code": "import time; time.sleep(600)", "run_timeout": 60}},
                       timeout=120)
        """),
            ]
        )
        wait_for(lambda: any(w["busy"] for w in healthy(url)["workers"]), "a snippet is running")  # type: ignore[index]
        sigkill_and_expect_no_orphans(proc, url)
        snippet.kill()
        snippet.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_local_sandbox_limits_and_sigkill(tiny_tir_model):
    """`make serve` without a sandbox URL: the local sandbox at its fixed port, named in the
    banner; a tool timeout beyond the sandbox's limit is a 400; nothing survives a SIGKILL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["--model", str(tiny_tir_model), "--served-model-name", "tiny-tir", "--max-model-len", "1024"]
    with run_server(args, env={"THOR_LOCAL_SANDBOX_PORT": str(port)}) as srv:
        assert f"Sandbox at {url}" in wait_for(lambda: "Sandbox at" in srv.log() and srv.log(), "the banner")
        limit = healthy(url)["limits"]["max_timeout_s"]  # type: ignore[index]
        body = {
            "model": "tiny-tir",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Compute 17*23."}],
            "thor": {"observation": {"timeout_s": limit + 1}},
        }
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "thor.observation.timeout_s" and f"at most {limit:g} s" in err["message"]
        body["thor"] = {"observation": {"timeout_s": limit}}
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
        body["thor"] = {"observation": {"keep_head": 300}}  # head + tail beyond max_chars: a 400, not a 500
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "keep_head (300) + keep_tail (128) exceed max_chars" in r.text, r.text
        sigkill_and_expect_no_orphans(srv.process, url)
