"""Start the real THOR server (`python -m server`) as a subprocess for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ThorServer:
    url: str
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


#: the served name of the tiny TIR model on the shared `tiny_server` (tests/conftest.py)
TINY_SERVED = "tiny"


def tiny_server_args(
    model: Path | str, served_name: str, *, sandbox_url: str | None = None, max_model_len: int = 2048
) -> list[str]:
    """`python -m server` flags for a test model under a served name (plus a sandbox URL)."""
    args = ["--model", str(model), "--served-model-name", served_name, "--max-model-len", str(max_model_len)]
    return args + (["--sandbox-url", sandbox_url] if sandbox_url else [])


def make_serve_args(sandbox_url: str) -> list[str]:
    """`python -m server` flags as `make serve` gives them, read from the Makefile's serve recipe
    (the default preset, so its served name, and the context length), minus `--host` and
    `$(SERVE_ARGS)`, on the given sandbox instead of the local one."""
    recipe = [line for line in (ROOT / "Makefile").read_text().splitlines() if " -m server " in line]
    if len(recipe) != 1:
        raise RuntimeError(f"expected one `python -m server` line in the Makefile (make serve), found {len(recipe)}")
    words = shlex.split(recipe[0].split(" -m server ", 1)[1])
    args: list[str] = []
    skip = False
    for word in words:
        if skip or word.startswith("$("):
            skip = False
            continue
        if word == "--host":
            skip = True
            continue
        args.append(word)
    return [*args, "--sandbox-url", sandbox_url]


@contextlib.contextmanager
def run_server(
    args: list[str], env: dict[str, str] | None = None, ready_timeout: float = 240.0
) -> Iterator[ThorServer]:
    tmp = Path(tempfile.mkdtemp(prefix="thor-server-"))
    log_path = tmp / "server.log"
    log_file = open(log_path, "w")
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TQDM_DISABLE": "1", **(env or {})}
    cmd = [sys.executable, "-m", "server", "--port", "0", "--enforce-eager", "--dtype", "bfloat16", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + ready_timeout
        url = None
        while url is None:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=30)
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-5000:]}")
            if line.startswith("THOR_SERVER_LISTENING"):
                url = "http://" + line.split()[1]
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        # keep draining stdout (vLLM logs there) so the pipe never fills
        import threading

        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server never became healthy:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.2)
        yield ThorServer(url=url, process=proc, log_path=log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()
