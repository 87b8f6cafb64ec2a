"""Tool execution against the real sandbox (nsjail): observations of stopped snippets,
the sandbox policy (busy retries, `sandbox_error` observations, per-request cap) and
cancellation through the executor."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest
from pydantic import ValidationError

from tests.support.sandbox_service import run_sandbox
from thor_engine.config import REFERENCE_EMPTY_OBSERVATION, ObservationConfig
from thor_engine.observation import judge
from thor_engine.tools import SandboxExecutor, SandboxPolicy, ToolResult, sandbox_request_scope
from thor_sandbox.client import SandboxBusy, SandboxClient, SandboxUnreachable

pytestmark = pytest.mark.sandbox

NOTEBOOK = ObservationConfig(profile="notebook")
REFERENCE = ObservationConfig(profile="reference")
FAST = SandboxPolicy(retry_backoff_s=0.2, max_backoff_s=2.0)


def observe(r: ToolResult, cfg: ObservationConfig) -> str:
    obs = judge(r.exit_code, r.stdout, r.stderr, cfg, outcome=r.outcome)
    assert not obs.ok
    return obs.text


# --- D7: what a stopped snippet's observation says ---------------------------------------


async def test_output_cap_and_memory_kills_are_named_in_the_notebook_profile(sandbox):
    async with SandboxClient(sandbox.url) as client:
        ex = SandboxExecutor(client)
        flood = await ex.execute("print('x' * 10_000_000)", timeout_s=10, echo_last_expression=True)
        hog = await ex.execute("x = bytearray(4 * 1024**3)", timeout_s=10, echo_last_expression=True)
        slow = await ex.execute("while True: pass", timeout_s=1, echo_last_expression=True)
    assert (flood.outcome, hog.outcome, slow.outcome) == ("output_capped", "oom", "timeout")
    assert observe(flood, NOTEBOOK).startswith("OutputLimitError: the code printed more than the sandbox allows")
    assert observe(hog, NOTEBOOK).startswith("MemoryError: the code used more memory than the sandbox allows")
    assert observe(slow, NOTEBOOK) == REFERENCE_EMPTY_OBSERVATION  # a timeout is what the message says
    # the reference profile stays faithful to the reference rules
    assert observe(flood, REFERENCE) == REFERENCE_EMPTY_OBSERVATION
    assert observe(hog, REFERENCE) == "MemoryError"
    assert observe(slow, REFERENCE) == REFERENCE_EMPTY_OBSERVATION
    # without an outcome (an older caller), the reference rules decide in both profiles
    assert judge(flood.exit_code, flood.stdout, flood.stderr, NOTEBOOK).text == REFERENCE_EMPTY_OBSERVATION


def test_truncation_settings_must_fit_max_chars():
    ObservationConfig(max_chars=256, keep_head=128, keep_tail=128)  # the reference's own settings
    with pytest.raises(ValidationError, match=r"keep_head \(200\) \+ keep_tail \(100\) exceed max_chars \(256\)"):
        ObservationConfig(keep_head=200, keep_tail=100)
    with pytest.raises(ValidationError, match="exceed max_chars"):
        ObservationConfig(max_chars=64)  # the default head and tail (128 each) do not fit
    cfg = ObservationConfig(max_chars=20, keep_head=8, keep_tail=12)
    text = "".join(chr(ord("a") + i % 26) for i in range(30))
    obs = judge(0, text, "", cfg)
    assert obs.text == text[:8] + "..." + text[-12:]  # no character shown twice


# --- the sandbox policy --------------------------------------------------------------------


def busy_sandbox():  # type: ignore[no-untyped-def]
    """One worker and no wait queue: a second concurrent snippet gets 503 at once."""
    return run_sandbox({"THOR_SANDBOX_POOL_SIZE": "1", "THOR_SANDBOX_MAX_QUEUE": "0"})


async def hold_the_worker(client: SandboxClient, svc_url: str, seconds: float) -> asyncio.Task:
    task = asyncio.create_task(client.run(f"import time; time.sleep({seconds}); print('held')", timeout=30))
    async with httpx.AsyncClient() as http:
        while not (await http.get(svc_url + "/health")).json()["workers"][0]["busy"]:
            await asyncio.sleep(0.05)
    return task


async def test_busy_spell_is_retried_then_observed_or_failed_as_configured():
    with busy_sandbox() as svc:
        async with SandboxClient(svc.url, retries=0) as client:
            # retried until the worker is free again: the call succeeds
            holder = await hold_the_worker(client, svc.url, 2)
            patient = SandboxExecutor(client, SandboxPolicy(busy_retries=8, retry_backoff_s=0.5, max_backoff_s=4))
            r = await patient.execute("print(6 * 7)", timeout_s=5, echo_last_expression=False)
            assert (r.outcome, r.stdout) == ("ok", "42\n")
            assert (await holder).stdout == "held\n"

            # no retries left: an observation, not an exception that would end every sample
            holder = await hold_the_worker(client, svc.url, 3)
            r = await SandboxExecutor(client, SandboxPolicy(busy_retries=0)).execute(
                "print(1)", timeout_s=5, echo_last_expression=False
            )
            assert r.outcome == "sandbox_error" and r.exit_code is None
            obs = judge(r.exit_code, r.stdout, r.stderr, REFERENCE, outcome=r.outcome)
            assert obs.text.startswith("SandboxError: the code could not be run: the sandbox was busy")
            assert "not an error in the code" in obs.text

            # configured to fail the request instead
            strict = SandboxExecutor(
                client, SandboxPolicy(busy_retries=1, retry_backoff_s=0.1, on_sandbox_error="fail")
            )
            with pytest.raises(SandboxBusy, match="busy"):
                await strict.execute("print(1)", timeout_s=5, echo_last_expression=False)
            await holder


async def test_unreachable_sandbox_fails_the_call_whatever_the_policy():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    async with SandboxClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.05) as client:
        ex = SandboxExecutor(client, SandboxPolicy(on_sandbox_error="observe"))
        with pytest.raises(SandboxUnreachable, match="not reachable"):  # an outage: the server answers 503
            await ex.execute("print(1)", timeout_s=5, echo_last_expression=False)


async def test_worker_death_is_retried_on_a_fresh_worker(sandbox):
    async with SandboxClient(sandbox.url) as client, httpx.AsyncClient() as http:
        ex = SandboxExecutor(client, FAST)
        code = "import time; print('start', flush=True); time.sleep(3); print('done')"
        call = asyncio.create_task(ex.execute(code, timeout_s=10, echo_last_expression=False))
        victim = None
        while victim is None:
            busy = [w for w in (await http.get(sandbox.url + "/health")).json()["workers"] if w["busy"]]
            victim = busy[0]["pid"] if busy else None
            await asyncio.sleep(0.02)
        os.kill(victim, signal.SIGKILL)  # the worker dies mid-snippet (the service answers 500)
        r = await call
        assert (r.outcome, r.stdout) == ("ok", "start\ndone\n")  # rerun from scratch on another worker
        pids = {w["pid"] for w in (await http.get(sandbox.url + "/health")).json()["workers"]}
        assert victim not in pids


async def test_per_request_cap_on_concurrent_sandbox_calls(sandbox):
    code = "import time; a = time.time(); time.sleep(0.5); print(a, time.time())"

    def spans(results: list[ToolResult]) -> list[tuple[float, float]]:
        return sorted(tuple(map(float, r.stdout.split())) for r in results)  # type: ignore[misc]

    def overlapping(s: list[tuple[float, float]]) -> bool:
        return any(s[i + 1][0] < s[i][1] for i in range(len(s) - 1))

    async with SandboxClient(sandbox.url) as client:
        ex = SandboxExecutor(client, SandboxPolicy(max_concurrent_per_request=1))

        async def one_request(calls: int) -> list[ToolResult]:
            sandbox_request_scope(ex.policy.max_concurrent_per_request)  # what the server does per request
            return list(
                await asyncio.gather(
                    *(
                        asyncio.create_task(ex.execute(code, timeout_s=5, echo_last_expression=False))
                        for _ in range(calls)
                    )
                )
            )

        capped = await asyncio.create_task(one_request(3))
        assert not overlapping(spans(capped)), spans(capped)  # one call of this request at a time
        # the cap is per request: two requests still use both workers side by side
        a, b = await asyncio.gather(asyncio.create_task(one_request(1)), asyncio.create_task(one_request(1)))
        assert overlapping(spans(a + b)), spans(a + b)
    with pytest.raises(ValueError, match="max_concurrent_per_request must be >= 1"):
        SandboxPolicy(max_concurrent_per_request=0)


# --- cancellation reaches the sandbox ---------------------------------------------------------


async def test_cancelled_tool_call_frees_its_worker():
    env = {"THOR_SANDBOX_POOL_SIZE": "1", "THOR_SANDBOX_MAX_TIMEOUT_S": "300", "THOR_SANDBOX_QUEUE_TIMEOUT_S": "100"}
    with run_sandbox(env) as svc:
        async with SandboxClient(svc.url, retries=0) as client, httpx.AsyncClient() as http:
            [before] = (await http.get(svc.url + "/health")).json()["workers"]
            ex = SandboxExecutor(client, SandboxPolicy(busy_retries=0))
            call = asyncio.create_task(
                ex.execute("import time; time.sleep(250)", timeout_s=260, echo_last_expression=False)
            )
            while not (await http.get(svc.url + "/health")).json()["workers"][0]["busy"]:
                await asyncio.sleep(0.05)
            call.cancel()  # what closing the decoder's stream does to an in-flight call
            with pytest.raises(asyncio.CancelledError):
                await call
            # the next call gets a fresh worker instead of queueing behind a 250 s sleep
            r = await ex.execute("print('next')", timeout_s=5, echo_last_expression=False)
            assert (r.outcome, r.stdout) == ("ok", "next\n")
            [after] = (await http.get(svc.url + "/health")).json()["workers"]
            assert after["id"] != before["id"]


# --- the tool cache keys on the sandbox's fingerprint ------------------------------------------


async def test_tool_cache_keys_on_the_sandbox_fingerprint_not_its_url(sandbox, sandbox_one):
    from server.__main__ import sandbox_profile
    from server.metrics import ServerMetrics
    from server.settings import ServerSettings
    from server.store import create_store
    from server.tool_cache import CachingExecutor

    store = create_store(None)
    metrics = ServerMetrics()
    code = "print(sum(range(10)))"

    async def run_via(url: str) -> ToolResult:
        async with SandboxClient(url) as client:
            fingerprint, _ = await sandbox_profile(client, ServerSettings())  # what the server's build does
            ex = CachingExecutor(
                SandboxExecutor(client), store, sandbox_fingerprint=fingerprint, ttl_s=60, metrics=metrics
            )
            return await ex.execute(code, timeout_s=5, echo_last_expression=True)

    first = await run_via(sandbox.url)
    assert (first.stdout, first.cached) == ("45\n", False)
    # the same service reached at another address (its Unix socket): the same sandbox, a hit
    again = await run_via(sandbox.uds_url)
    assert (again.stdout, again.cached) == ("45\n", True)
    # a service with other limits (the one-worker fixture's default timeout) does not reuse it
    other = await run_via(sandbox_one.url)
    assert (other.stdout, other.cached) == ("45\n", False)
    await store.close()


async def test_server_refuses_a_default_timeout_beyond_the_sandbox_limit(sandbox):
    from server.__main__ import sandbox_profile
    from server.settings import ServerSettings
    from thor_engine.config import ThorConfig

    settings = ServerSettings(thor=ThorConfig(observation=ObservationConfig(timeout_s=120)))
    async with SandboxClient(sandbox.url) as client:
        with pytest.raises(ValueError, match=r"timeout_s \(120.0 s\) exceeds the sandbox's limit of 60 s"):
            await sandbox_profile(client, settings)
        _, limit = await sandbox_profile(client, ServerSettings())
    assert limit == 60
