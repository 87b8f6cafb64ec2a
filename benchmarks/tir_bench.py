"""Tool-integrated reasoning benchmark: our server-side THOR loop vs a client-side loop on the same server.

    make bench-tir          # i.e. .venv/bin/python benchmarks/tir_bench.py
    .venv/bin/python benchmarks/tir_bench.py --quick --no-save   # smoke run: prints, saves nothing

Owns: measuring what a user gains by running the THOR loop in the server instead of in their
own script, and how close the server comes to the physical limit (generation + sandbox
time). Does not own: the decoder, the server, or accuracy figures (trainer.evaluate).

Setup: one sandbox service and one THOR server (`python -m server --model M --seed 0
--max-model-len L --sandbox-url <that sandbox>`, tool-result cache off) started once; both
loops run on them with the reference's settings (at most 10 executions, 1024 new tokens per
problem, greedy, self-correction off, the reference observation rules):

(a) server-side: one streaming `POST /v1/chat/completions` per problem, the problem as the
    user message, `thor: {max_tool_calls, self_correction: false, observation: {profile:
    reference}}`; the server renders the prompt, runs the code and streams everything.
(b) client-side, written the way the reference scripts do it: the prompt rendered here with
    the model's chat template and THOR's instructions (the text the server renders), then
    rounds of raw `POST /v1/completions` with that text, `stop: ["```"]` and
    `include_stop_str_in_output`; when the text has just closed a ```python block, the code
    goes to the sandbox's `POST /run_code`, the output block (the same observation rules)
    is appended to the text, and the whole text is sent again. After 10 executions the stop
    string is dropped and the model runs to its end.

In `--rounds` rounds (default 3), at each concurrency (default 1, 4, 16) both loops solve
the same problems (the first `max(--min-problems, 2 x concurrency)` of GSM8K, or
`--problems-per-level`, each followed by `--user-suffix`, default "Use Python.": without it the
default model answers most GSM8K problems without writing code), in an order that alternates between rounds (server, client /
client, server), so drift in the machine's speed favours neither. Per run: problems per
minute, engine-generated tokens per second, accuracy (math-verify against the gold answer),
prefix-cache hit rate (vLLM's counters), and the wall time split into
- generation: time with at least one request in the engine (the server's own clock,
  `thor_engine_busy_seconds_total`, server/activity.py), divided into prefill and decode
  in the proportion of vLLM's per-request prefill and decode time;
- sandbox not overlapped: code running while the engine had nothing to do (server-side:
  the server's clock; client-side: the client's `/run_code` calls outside all of its
  `/v1/completions` requests, an upper bound on the engine-idle part);
- overhead: the rest, wall minus both: everything that is neither the engine nor the
  sandbox (HTTP, rendering, the loop's own Python, waiting on each other). The goal for
  the server-side loop is at most 5% of wall time.
Per round and concurrency: server-side / client-side problems per minute; reported as the
median over rounds with min and max (goal: >= 1.0 at every concurrency, equal accuracy).

`--profile` (on in `make bench-tir`): after the rounds, one more server-side run at the
highest concurrency while py-spy records the server (benchmarks/profiling.py); it is in no
comparison, and the busiest functions are printed and saved.

Results are saved only from a quiet machine and a clean tree (the rules of
server_bench.py: `--no-save` prints only, `--force REASON` saves and records why). Prints
Markdown tables; saves JSON (default benchmarks/results/tir.json) with machine info,
provenance and every run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.profiling import print_top, py_spy, top_frames  # noqa: E402 (needs the path above)
from benchmarks.server_bench import (  # noqa: E402
    f,
    machine_info,
    provenance_gate,
    round_order,
    spread,
    vllm_env,
)
from tests.support.sandbox_service import run_sandbox  # noqa: E402
from tests.support.thor_server import ThorServer, run_server  # noqa: E402
from thor_engine.answer.extraction import extract_boxed  # noqa: E402
from thor_engine.config import ObservationConfig  # noqa: E402
from thor_engine.observation import injection, judge  # noqa: E402
from thor_engine.prompting import TIR_INSTRUCTIONS, with_tir_instructions  # noqa: E402

LOOPS = ("server", "client")
PYTHON_FENCES = ("python", "py", "python3", "py3")
QUICK_MODEL = ROOT / ".cache" / "models" / "tiny-tir"
#: the reference's observation rules (no notebook echo), on both loops
OBSERVATION = ObservationConfig(profile="reference")
#: vLLM's and our counters read before and after every run
COUNTERS = {
    "engine_busy_s": "thor_engine_busy_seconds",
    "sandbox_only_s": "thor_sandbox_only_seconds",
    "prefill_s": "vllm:request_prefill_time_seconds",
    "decode_s": "vllm:request_decode_time_seconds",
    "cache_queries": "vllm:prefix_cache_queries",
    "cache_hits": "vllm:prefix_cache_hits",
    "generated_tokens": "vllm:generation_tokens",
    "prompt_tokens": "vllm:prompt_tokens",
}


@dataclass
class Problem:
    id: str
    question: str
    gold: str


@dataclass
class Solved:
    """One problem solved by one loop."""

    id: str
    text: str = ""  # everything the client received, in order (for the answer)
    seconds: float = 0.0
    executions: int = 0
    error: str | None = None
    correct: bool | None = None
    # client-side only: its /v1/completions requests and /run_code calls, monotonic (start, end)
    completions: list[tuple[float, float]] = field(default_factory=list)
    sandbox: list[tuple[float, float]] = field(default_factory=list)


# --- the two loops -----------------------------------------------------------------------------------------


async def server_side(http: httpx.AsyncClient, url: str, model: str, p: Problem, args: argparse.Namespace) -> Solved:
    out = Solved(p.id)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": p.question}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "thor": {
            "max_tool_calls": args.max_tool_calls,
            "self_correction": False,
            "observation": {"profile": "reference"},
            "trace": False,
        },
    }
    parts: list[str] = []
    t0 = time.monotonic()
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                for key in ("reasoning_content", "reasoning", "content"):
                    if delta.get(key):
                        parts.append(delta[key])
                if (delta.get("thor") or {}).get("type") == "tool_result":
                    out.executions += 1
    out.seconds = time.monotonic() - t0
    out.text = "".join(parts)
    return out


def closed_python_block(text: str) -> str | None:
    """The code of a ```python block `text` has just closed (it ends with its closing fence), else None."""
    if not text.endswith("```") or text.count("```") % 2:
        return None  # not at a fence, or at an opening one
    start = text.rfind("```", 0, len(text) - 3)
    info, _, code = text[start + 3 : -3].partition("\n")
    return code if info.strip().lower() in PYTHON_FENCES else None


async def run_code(http: httpx.AsyncClient, sandbox_url: str, code: str) -> str:
    r = await http.post(
        sandbox_url + "/run_code", json={"code": code, "language": "python", "run_timeout": OBSERVATION.timeout_s}
    )
    r.raise_for_status()
    res = r.json().get("run_result") or {}
    obs = judge(res.get("return_code"), res.get("stdout") or "", res.get("stderr") or "", OBSERVATION)
    return obs.text


async def client_side(
    http: httpx.AsyncClient, url: str, sandbox_url: str, model: str, prompt: str, p: Problem, args: argparse.Namespace
) -> Solved:
    out = Solved(p.id)
    text, generated = "", 0
    t0 = time.monotonic()
    while generated < args.max_tokens:
        body = {
            "model": model,
            "prompt": prompt + text,
            "max_tokens": args.max_tokens - generated,
            "temperature": 0,
            "stop": ["```"] if out.executions < args.max_tool_calls else [],
            "include_stop_str_in_output": True,
        }
        c0 = time.monotonic()
        r = await http.post(url + "/v1/completions", json=body)
        out.completions.append((c0, time.monotonic()))
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}: {r.text[:300]}"
            break
        res = r.json()
        choice = res["choices"][0]
        text += choice["text"]
        generated += res["usage"]["completion_tokens"]
        if choice["finish_reason"] != "stop" or choice.get("stop_reason") != "```":
            break  # EOS or max_tokens
        code = closed_python_block(text)
        if code is None:
            continue  # an opening fence, or a block that is not Python: generate on
        s0 = time.monotonic()
        obs = await run_code(http, sandbox_url, code)
        out.sandbox.append((s0, time.monotonic()))
        out.executions += 1
        text += injection(obs, text.endswith("\n"))
    out.seconds = time.monotonic() - t0
    out.text = text
    return out


# --- one run: one loop at one concurrency -----------------------------------------------------------------


async def scrape(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    """The counters of COUNTERS from the server's /metrics, summed over their labels."""
    text = (await http.get(url + "/metrics")).text
    totals = dict.fromkeys(COUNTERS, 0.0)
    by_family = {v: k for k, v in COUNTERS.items()}
    for fam in text_string_to_metric_families(text):
        key = by_family.get(fam.name)
        if key is None:
            continue
        for s in fam.samples:
            if s.name in (fam.name + "_total", fam.name + "_sum"):
                totals[key] += s.value
    return totals


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def minus_length(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of the union of `intervals` outside the union of `cover`."""
    return union_length(intervals + cover) - union_length(cover)


async def run_loop(
    loop: str,
    problems: list[Problem],
    concurrency: int,
    srv_url: str,
    sandbox_url: str,
    model: str,
    prompts: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as http:
        before = await scrape(http, srv_url)
        queue: asyncio.Queue[Problem] = asyncio.Queue()
        for p in problems:
            queue.put_nowait(p)
        solved: list[Solved] = []

        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                if loop == "server":
                    s = await server_side(http, srv_url, model, p, args)
                else:
                    s = await client_side(http, srv_url, sandbox_url, model, prompts[p.id], p, args)
                solved.append(s)
                print(f"    {loop} c={concurrency} {p.id}: {s.seconds:.1f}s, {s.executions} runs", flush=True)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - t0
        after = await scrape(http, srv_url)
    d = {k: after[k] - before[k] for k in COUNTERS}
    if loop == "client":  # the server never saw these executions: the client's own intervals
        d["sandbox_only_s"] = minus_length(
            [iv for s in solved for iv in s.sandbox], [iv for s in solved for iv in s.completions]
        )
    gen = d["engine_busy_s"]
    prefill_share = d["prefill_s"] / (d["prefill_s"] + d["decode_s"]) if d["prefill_s"] + d["decode_s"] else 0.0
    overhead = wall - gen - d["sandbox_only_s"]
    return {
        "loop": loop,
        "concurrency": concurrency,
        "problems": len(problems),
        "wall_s": wall,
        "problems_per_min": 60 * len(problems) / wall,
        "generated_tokens": d["generated_tokens"],
        "generated_tok_s": d["generated_tokens"] / wall,
        "prompt_tokens": d["prompt_tokens"],
        "prefix_cache_hit_rate": d["cache_hits"] / d["cache_queries"] if d["cache_queries"] else float("nan"),
        "generation_s": gen,
        "prefill_s": gen * prefill_share,
        "decode_s": gen * (1 - prefill_share),
        "sandbox_not_overlapped_s": d["sandbox_only_s"],
        "overhead_s": overhead,
        "overhead_share": overhead / wall,
        "executions": sum(s.executions for s in solved),
        "errors": [f"{s.id}: {s.error}" for s in solved if s.error],
        "solved": [{k: v for k, v in asdict(s).items() if k not in ("completions", "sandbox", "text")} for s in solved],
        "texts": {s.id: s.text for s in solved},
    }


# --- problems and prompts ------------------------------------------------------------------------------------


def load_problems(args: argparse.Namespace, n: int) -> list[Problem]:
    if args.quick:
        from tests.support.tiny_tir_model import TIR_PROBLEMS

        base = [Problem(t.name, t.prompt, t.answer) for t in TIR_PROBLEMS]
        return [
            Problem(f"{p.id}-{i // len(base)}", p.question, p.gold) for i, p in enumerate(base * (n // len(base) + 1))
        ][:n]
    from trainer.evaluate.benchmarks import load_benchmark

    suffix = f"\n{args.user_suffix}" if args.user_suffix else ""
    return [Problem(p.id, p.problem + suffix, p.answer) for p in load_benchmark(args.benchmark)[:n]]


def render_prompts(model_dir: str, problems: list[Problem]) -> dict[str, str]:
    """The prompt text of each problem as the reference renders it: chat template + THOR's instructions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return {
        p.id: tok.apply_chat_template(
            with_tir_instructions([{"role": "user", "content": p.question}], TIR_INSTRUCTIONS),
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in problems
    }


def score(runs: list[dict[str, Any]], golds: dict[str, str]) -> None:
    from thor_engine.answer.verification import AnswerChecker

    with AnswerChecker() as checker:
        for run in runs:
            for s in run["solved"]:
                pred = extract_boxed(run["texts"][s["id"]])
                s["answer"] = pred
                s["correct"] = pred is not None and checker.answers_match(pred, golds[s["id"]])
            run["correct"] = sum(bool(s["correct"]) for s in run["solved"])


# --- summary ---------------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]], levels: list[int], n_rounds: int) -> dict[str, Any]:
    by = {(r["round"], r["loop"], r["concurrency"]): r for r in runs}
    out: dict[str, Any] = {}
    for c in levels:
        ratios, same_answer = [], []
        for rn in range(n_rounds):
            s, cl = by.get((rn, "server", c)), by.get((rn, "client", c))
            if s and cl:
                ratios.append(s["problems_per_min"] / cl["problems_per_min"])
                answers = {x["id"]: x["answer"] for x in cl["solved"]}
                same_answer.append(sum(x["answer"] == answers.get(x["id"]) for x in s["solved"]))
        per_loop = {}
        for loop in LOOPS:
            rs = [by[(rn, loop, c)] for rn in range(n_rounds) if (rn, loop, c) in by]
            per_loop[loop] = {
                key: statistics.median(r[key] for r in rs)
                for key in (
                    "problems_per_min",
                    "generated_tok_s",
                    "wall_s",
                    "generation_s",
                    "prefill_s",
                    "decode_s",
                    "sandbox_not_overlapped_s",
                    "overhead_s",
                    "overhead_share",
                    "prefix_cache_hit_rate",
                )
            } | {"correct": [r["correct"] for r in rs], "problems": rs[0]["problems"] if rs else 0}
        out[str(c)] = {"server_over_client": spread(ratios), "same_answer_per_round": same_answer, **per_loop}
    return out


def print_tables(res: dict[str, Any]) -> None:
    print("\n### Server-side vs client-side THOR loop (medians over rounds)\n")
    print(
        "| concurrency | loop | problems/min | gen tok/s | wall s | prefill s | decode s | sandbox (not overlapped) s "
        "| overhead s (share) | prefix-cache hits | correct per round |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for c, lv in res["summary"].items():
        for loop in LOOPS:
            x = lv[loop]
            print(
                f"| {c} | {loop}-side | {f(x['problems_per_min'], 2)} | {f(x['generated_tok_s'])} | "
                f"{f(x['wall_s'])} | {f(x['prefill_s'])} | {f(x['decode_s'])} | "
                f"{f(x['sandbox_not_overlapped_s'], 2)} | {f(x['overhead_s'], 2)} ({f(100 * x['overhead_share'])}%) | "
                f"{f(100 * x['prefix_cache_hit_rate'])}% | {x['correct']} / {x['problems']} |"
            )
    print("\n| concurrency | server-side / client-side problems/min: median (min-max) | same answer per round |")
    print("| ---: | ---: | --- |")
    for c, lv in res["summary"].items():
        r = lv["server_over_client"]
        print(f"| {c} | **{f(r['median'], 3)}** ({f(r['min'], 3)}-{f(r['max'], 3)}) | {lv['same_answer_per_round']} |")


# --- main ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_server(args: argparse.Namespace, sandbox_url: str) -> Iterator[ThorServer]:
    env = {**vllm_env(args.kvcache_gb), "THOR_TOOL_CACHE_TTL_S": "0"}
    cmd = ["--model", args.model, "--max-model-len", str(args.max_model_len), "--seed", "0"]
    cmd += ["--sandbox-url", sandbox_url, "--log-level", "WARNING"]
    print(f"  starting the THOR server with {args.model} ...", flush=True)
    with run_server(cmd, env=env, ready_timeout=900) as srv:
        yield srv


async def served_name(url: str) -> str:
    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(url + "/v1/models")).json()["data"][0]["id"]


def run_benchmark(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    n_max = max(args.problems_per_level or max(args.min_problems, 2 * c) for c in levels)
    problems = load_problems(args, n_max)
    golds = {p.id: p.gold for p in problems}
    res: dict[str, Any] = {"runs": [], "loadavg_after_round": []}
    t_start = time.perf_counter()
    with run_sandbox({"THOR_SANDBOX_POOL_SIZE": str(args.sandbox_pool)}) as sbx, start_server(args, sbx.url) as srv:
        model = asyncio.run(served_name(srv.url))
        from trainer.evaluate.targets import resolve_model

        prompts = render_prompts(args.model if Path(args.model).is_dir() else resolve_model(args.model), problems)
        # warm-up: one problem through each loop (first-request costs belong to no run)
        for loop in LOOPS:
            asyncio.run(run_loop(loop, problems[:1], 1, srv.url, sbx.url, model, prompts, args))
        for rn in range(args.rounds):
            for c in levels:
                n = args.problems_per_level or max(args.min_problems, 2 * c)
                for loop in round_order(list(args.order.split(",")), rn):
                    print(f"  round {rn}, concurrency {c}, {loop}-side loop, {n} problems", flush=True)
                    run = asyncio.run(run_loop(loop, problems[:n], c, srv.url, sbx.url, model, prompts, args))
                    run["round"] = rn
                    res["runs"].append(run)
            res["loadavg_after_round"].append(os.getloadavg())
        if args.profile:  # one more server-side run at the top level, recorded, counted in no comparison
            c = max(levels)
            n = args.problems_per_level or max(args.min_problems, 2 * c)
            with py_spy(srv.process.pid, args.profile_dir / f"server-c{c}.txt") as raw:
                run = asyncio.run(run_loop("server", problems[:n], c, srv.url, sbx.url, model, prompts, args))
            res["profile"] = {"concurrency": c, "raw": str(raw), "wall_s": run["wall_s"], **top_frames(raw)}
    score(res["runs"], golds)
    res["summary"] = summarise(res["runs"], levels, args.rounds)
    res["total_s"] = time.perf_counter() - t_start
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="preset, model directory or hub id")
    ap.add_argument("--benchmark", default="gsm8k", help="a benchmark name or JSONL path (trainer.evaluate's)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--min-problems", type=int, default=4, help="problems per level: max(this, 2 x concurrency)")
    ap.add_argument("--problems-per-level", type=int, default=None, help="the same count at every level")
    ap.add_argument("--rounds", type=int, default=3, help="each runs both loops at every level, order alternating")
    ap.add_argument("--order", default="server,client", help="which loop goes first in round 0")
    ap.add_argument(
        "--user-suffix",
        default="Use Python.",
        help="appended to each problem on a new line ('' for none): the default model writes code for GSM8K only "
        "when asked",
    )
    ap.add_argument("--max-tokens", type=int, default=1024, help="new tokens per problem (reference: 1024)")
    ap.add_argument("--max-tool-calls", type=int, default=10, help="executions per problem (reference: 10)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kvcache-gb", default="4")
    ap.add_argument("--sandbox-pool", type=int, default=4)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one more server-side run at the highest concurrency, recorded with py-spy and "
        "counted in no comparison (top frames printed and saved; the raw profile goes to --profile-dir)",
    )
    ap.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "thor-profiles")
    ap.add_argument("--quick", action="store_true", help="smoke run: the tiny TIR model, levels 1,4, 1 round")
    ap.add_argument("--max-load-per-cpu", type=float, default=0.25)
    ap.add_argument(
        "--wait-quiet-s",
        type=float,
        default=300,
        help="wait up to this long for the load average to fall below the limit before judging the machine",
    )
    ap.add_argument("--force", metavar="REASON", help="save although the tree is dirty or the machine loaded")
    ap.add_argument("--no-save", action="store_true", help="run and print, save nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tir.json")
    if ap.parse_known_args()[0].quick:
        ap.set_defaults(model=str(QUICK_MODEL), concurrency="1,4", rounds=1, max_tokens=320, max_model_len=2048)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if sorted(args.order.split(",")) != sorted(LOOPS):
        sys.exit(f"--order must name both loops, e.g. server,client (got {args.order!r})")
    if args.force is not None and not args.force.strip():
        sys.exit("--force needs a reason (it is recorded with the results)")

    git, load_before, problems = provenance_gate(args)
    if args.quick:
        from tests.support.tiny_tir_model import build_tiny_tir_model

        build_tiny_tir_model(QUICK_MODEL, ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct")
    res = run_benchmark(args, levels)
    res = {
        "smoke_run": args.quick,
        "machine": machine_info(),
        "provenance": {
            **git,
            "loadavg_before": load_before,
            "loadavg_end": os.getloadavg(),
            "quiet_machine_and_clean_tree": not problems,
            "problems": problems,
            "forced": args.force,
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **res,
    }
    if args.quick:
        print("\n**SMOKE RUN (--quick): tiny TIR model, small counts; figures are not benchmark results.**")
    print_tables(res)
    if "profile" in res:
        print_top(
            f"py-spy: the server under the server-side loop at concurrency {res['profile']['concurrency']}",
            res["profile"],
        )
    for problem in problems:
        print(f"NOT A QUIET RUN: {problem}")
    if args.no_save:
        print(f"not saved (--no-save) ({res['total_s']:.0f}s)")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {args.out} ({res['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
