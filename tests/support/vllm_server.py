"""vLLM's own OpenAI server as a test peer: started in its own process group, waited for, killed.

Owns: `vllm_process` (a plain `python -m vllm.entrypoints.openai.api_server` on a free port,
with request logging, killed as a group at the end) and `wait_healthy`. Used where our server
is compared with vLLM's on the same model.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import require_vllm

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_process(model: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A plain vLLM OpenAI server in its own process group (killed as a group at the end)."""
    require_vllm()
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="vllm-server-")) / "server.log"
    log = open(log_path, "wb")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--enable-log-requests",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}", proc, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # the engine core, should it outlive the server
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 400.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n{log_path.read_text()[-5000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM server never became healthy:\n{log_path.read_text()[-5000:]}")
        time.sleep(0.5)
