"""Evaluation throughput benchmark: `python -m trainer.evaluate` in process vs through a THOR server.

    make bench-eval         # i.e. .venv/bin/python benchmarks/eval_bench.py
    .venv/bin/python benchmarks/eval_bench.py --quick --no-save   # smoke run: tiny TIR model, prints, saves nothing

Owns: measuring problems per minute of the evaluation harness on the same model, problems
and settings, once with the THOR loop in the harness's own process (`--model`) and once
through a THOR server (`--endpoint`), and checking both paths gave the same answers. Does
not own: the harness (trainer/evaluate/), the server, or any figure in the paper's tables.

Results are saved only from a quiet machine and a clean tree: the script refuses to start
(before any server runs) when `git status --porcelain` lists anything or the 1-minute load
average is above `--max-load-per-cpu` (0.25) x CPUs. `--no-save` runs and prints without
saving; `--force REASON` saves anyway and records the reason. The JSON records the full
commit (`git rev-parse HEAD`), whether the tree was dirty (and which files), the load
averages before the run and after every round, and whether the run was forced.

Setup: one sandbox service (`--sandbox-pool` workers) shared by both paths, and one THOR
server (`python -m server --model M --port 0 --enforce-eager --dtype bfloat16
--max-model-len L --seed 0 --sandbox-url <that sandbox>`) started once before the first
round and kept up. Every in-process run starts a fresh engine, while the shared server is
fresh only in its first round (later rounds find the earlier prompts in its prefix cache);
`--server-per-round` starts a fresh server for every round, so both paths start cold. The server's tool-result cache is off
(THOR_TOOL_CACHE_TTL_S=0; `--tool-cache` leaves it on): the in-process path has no such
cache, and later rounds would otherwise get earlier rounds' tool results for free. Both
paths get the same VLLM_CPU_* environment (KV cache `--kvcache-gb`) and the same engine
arguments (dtype, eager, max model length, seed 0, the engine's default block size).

Measured, in `--rounds` rounds (default 2) whose order alternates (in-process, server /
server, in-process, ...; `--order` sets round 0's) so drift in the machine's speed favours
neither path: `python -m trainer.evaluate` as a subprocess with the same problems and
sampling flags (default `--benchmarks gsm8k --limit 20 --modes thor --k 1 --max-tokens 1024
--concurrency 8`, greedy), into a fresh run directory each time; in process it loads the
model itself (`--model M --sandbox-url <sandbox>`), through the server it sends every sample
to `--endpoint <server>`. The time is the harness's own `run.json` `wall_s`: the sample loop
only (model loading, problem loading and reports excluded). Per round and path: problems/min,
samples/min and generated tokens/s (the records' `usage.generated_tokens`, discarded
self-correction tokens included, over `wall_s`), accuracy, errors; per round the
server/in-process ratio of each, reported as the median over the rounds with min and max
(target: problems/min ratio median >= 0.95, i.e. the server path is not the bottleneck);
and agreement of the two paths' records sample by sample (same answer, same correctness,
same text; greedy decoding with the same decoder should agree everywhere).

Prints Markdown tables, saves JSON (default benchmarks/results/eval_throughput.json) with
machine info and provenance. The harness, the idle server, the sandbox and vLLM share the
CPUs, hence the quiet-machine rule above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.server_bench import (  # noqa: E402 (needs the path above)
    f,
    machine_info,
    provenance_gate,
    round_order,
    spread,
    vllm_env,
)
from tests.support.sandbox_service import run_sandbox  # noqa: E402
from tests.support.thor_server import ThorServer, run_server  # noqa: E402
from trainer.evaluate.records import RECORDS_FILE, SPEC_FILE, RecordLog, SampleRecord  # noqa: E402

PATHS = ("in-process", "server")
QUICK_MODEL = ROOT / ".cache" / "models" / "tiny-tir"
QUICK_TOKENIZER = ROOT / "models" / "Qwen2.5-Coder-0.5B-Instruct"
#: what the server path must reach: median over rounds of server/in-process problems per minute
TARGET_RATIO = 0.95


@dataclass
class PathRun:
    """One harness invocation: one path in one round."""

    round: int
    path: str
    out_dir: str
    process_s: float  # the whole subprocess: start, model load (in process), samples, reports
    wall_s: float  # run.json runs[-1].wall_s: the sample loop only
    samples: int
    problems: int
    records: int
    errors: int
    correct: int
    generated_tokens: int
    completion_tokens: int
    tool_calls_executed: int
    finish_reasons: dict[str, int]
    problems_per_min: float = 0.0
    samples_per_min: float = 0.0
    generated_tok_s: float = 0.0
    accuracy: float = 0.0

    def __post_init__(self) -> None:
        if self.wall_s > 0:
            self.problems_per_min = self.problems / self.wall_s * 60
            self.samples_per_min = self.samples / self.wall_s * 60
            self.generated_tok_s = self.generated_tokens / self.wall_s
        self.accuracy = self.correct / self.records if self.records else float("nan")


@dataclass
class Agreement:
    """The two paths' records of one round, compared sample by sample."""

    compared: int = 0
    only_one_path: int = 0
    same_answer: int = 0
    same_correct: int = 0
    same_text: int = 0
    differing: list[dict[str, Any]] = field(default_factory=list)  # the first few samples whose answers differ


# --- running the harness ---------------------------------------------------------------------------------


def harness_problem_args(args: argparse.Namespace) -> list[str]:
    """The flags both paths share: problems and sampling (the rest says where samples are generated)."""
    out = ["--benchmarks", args.benchmarks]
    for flag, value in (
        ("--problem-field", args.problem_field),
        ("--answer-field", args.answer_field),
        ("--id-field", args.id_field),
        ("--limit", args.limit),
    ):
        if value is not None:
            out += [flag, str(value)]
    return [
        *out,
        "--modes",
        args.modes,
        "--k",
        str(args.k),
        "--max-tokens",
        str(args.max_tokens),
        "--concurrency",
        str(args.concurrency),
        "--seed",
        "0",
        "--no-progress",
    ]


def target_args(path: str, args: argparse.Namespace, sandbox_url: str, server: ThorServer | None) -> list[str]:
    """Where the samples are generated: the server (`--endpoint`) or this model in the harness's process."""
    if path == "server":
        if server is None:
            raise ValueError("the server path needs a running server")
        return ["--endpoint", server.url]
    return [
        "--model",
        args.model,
        "--sandbox-url",
        sandbox_url,
        "--max-model-len",
        str(args.max_model_len),
        "--dtype",
        args.dtype,
    ]


def load_records(out: Path) -> dict[tuple[str, str, str, int], SampleRecord]:
    """The run's records by key (the last written wins, as the harness's own reports read them)."""
    return {r.key: r for r in RecordLog(out / RECORDS_FILE).load()}


def run_harness(
    path: str, round_no: int, out: Path, cmd_args: list[str], env: dict[str, str], timeout_s: float
) -> tuple[PathRun, dict[tuple[str, str, str, int], SampleRecord]]:
    log_path = out.with_suffix(".log")
    cmd = [sys.executable, "-m", "trainer.evaluate", *cmd_args, "--out", str(out)]
    print(f"  round {round_no} [{path}] python -m trainer.evaluate ... --out {out}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            sys.exit(
                f"round {round_no} [{path}]: the harness ran past --run-timeout {timeout_s:.0f}s; "
                f"log: {log_path}\n{log_path.read_text(errors='replace')[-3000:]}"
            )
    process_s = time.perf_counter() - t0
    if rc != 0:
        sys.exit(
            f"round {round_no} [{path}]: python -m trainer.evaluate exited {rc} (command: {' '.join(cmd)});\n"
            f"log {log_path}:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    timing = json.loads((out / SPEC_FILE).read_text(encoding="utf-8"))["runs"][-1]
    if timing.get("fatal"):
        sys.exit(f"round {round_no} [{path}]: the run stopped early: {timing['fatal']} (log: {log_path})")
    records = load_records(out)
    recs = list(records.values())
    run = PathRun(
        round=round_no,
        path=path,
        out_dir=str(out),
        process_s=process_s,
        wall_s=float(timing["wall_s"]),
        samples=int(timing["samples"]),
        problems=int(timing["problems"]),
        records=len(recs),
        errors=sum(r.error is not None for r in recs),
        correct=sum(r.correct for r in recs),
        generated_tokens=sum(r.usage.generated_tokens for r in recs),
        completion_tokens=sum(r.usage.completion_tokens for r in recs),
        tool_calls_executed=sum(len(r.executed_calls) for r in recs),
        finish_reasons=dict(Counter(r.finish_reason for r in recs)),
    )
    print(
        f"    {run.problems} problems, {run.samples} samples in {run.wall_s:.1f}s (process {process_s:.0f}s): "
        f"{run.problems_per_min:.2f} problems/min, {run.generated_tok_s:.1f} generated tok/s, "
        f"accuracy {run.correct}/{run.records}, errors {run.errors}",
        flush=True,
    )
    return run, records


def agreement(
    a: dict[tuple[str, str, str, int], SampleRecord], b: dict[tuple[str, str, str, int], SampleRecord]
) -> Agreement:
    ag = Agreement(only_one_path=len(a.keys() ^ b.keys()))
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        ag.compared += 1
        ag.same_answer += x.answer == y.answer
        ag.same_correct += x.correct == y.correct
        ag.same_text += x.text == y.text
        if x.answer != y.answer and len(ag.differing) < 10:
            ag.differing.append(
                {
                    "benchmark": key[0],
                    "problem_id": key[1],
                    "mode": key[2],
                    "sample": key[3],
                    "gold": x.gold,
                    "answers": {x.target: x.answer, y.target: y.answer},
                    "correct": {x.target: x.correct, y.target: y.correct},
                }
            )
    return ag


# --- the server ------------------------------------------------------------------------------------------


def server_args(args: argparse.Namespace, sandbox_url: str) -> list[str]:
    """`python -m server` flags besides the `--port 0 --enforce-eager --dtype bfloat16` that run_server adds."""
    extra = [] if args.dtype == "bfloat16" else ["--dtype", args.dtype]  # the later flag wins
    return [
        "--model",
        args.model,
        "--max-model-len",
        str(args.max_model_len),
        "--seed",
        "0",
        "--sandbox-url",
        sandbox_url,
        "--log-level",
        "WARNING",
        *extra,
    ]


@contextlib.contextmanager
def start_server(args: argparse.Namespace, sandbox_url: str, env: dict[str, str]) -> Iterator[ThorServer]:
    print(f"  starting the THOR server with {args.model} ...", flush=True)
    t0 = time.perf_counter()
    with run_server(server_args(args, sandbox_url), env=env, ready_timeout=args.server_timeout) as srv:
        print(f"  ready in {time.perf_counter() - t0:.0f}s at {srv.url}", flush=True)
        yield srv


# --- summary and tables ----------------------------------------------------------------------------------


def summarise(runs: list[PathRun], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r.round, r.path): r for r in runs}
    n = max((r.round for r in runs), default=-1) + 1

    def ratio(key: str) -> dict[str, Any]:
        vals = []
        for i in range(n):
            a, b = getattr(by[(i, "in-process")], key), getattr(by[(i, "server")], key)
            vals.append(b / a if a else float("nan"))
        return spread(vals)

    per_path = {}
    for p in PATHS:
        mine = [r for r in runs if r.path == p]
        per_path[p] = {
            "problems_per_min_median": statistics.median(r.problems_per_min for r in mine),
            "samples_per_min_median": statistics.median(r.samples_per_min for r in mine),
            "generated_tok_s_median": statistics.median(r.generated_tok_s for r in mine),
            "accuracy_per_round": [r.accuracy for r in mine],
            "errors": sum(r.errors for r in mine),
        }
    problems_ratio = ratio("problems_per_min")
    compared = sum(r["agreement"]["compared"] for r in rounds)
    return {
        "per_path": per_path,
        "ratio_server_over_in_process": {
            "problems_per_min": problems_ratio,
            "samples_per_min": ratio("samples_per_min"),
            "generated_tok_s": ratio("generated_tok_s"),
        },
        "target_problems_per_min_ratio": TARGET_RATIO,
        "server_keeps_up": problems_ratio["median"] >= TARGET_RATIO,
        "agreement": {
            "compared": compared,
            "same_answer": sum(r["agreement"]["same_answer"] for r in rounds),
            "same_correct": sum(r["agreement"]["same_correct"] for r in rounds),
            "same_text": sum(r["agreement"]["same_text"] for r in rounds),
            "only_one_path": sum(r["agreement"]["only_one_path"] for r in rounds),
        },
    }


def print_tables(res: dict[str, Any]) -> None:
    cfg = res["config"]
    limit = "" if cfg["limit"] is None else f" limit {cfg['limit']}"
    print(
        f"\n### Evaluation throughput: in process vs THOR server ({cfg['model']}; {cfg['benchmarks']}"
        f"{limit}, modes {cfg['modes']}, k={cfg['k']}, "
        f"max_tokens {cfg['max_tokens']}, concurrency {cfg['concurrency']})\n"
    )
    print(
        "| round | path | problems | samples | wall s | problems/min | samples/min | generated tok/s | accuracy | errors |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in res["runs"]:
        print(
            f"| {r['round']} | {r['path']} | {r['problems']} | {r['samples']} | {f(r['wall_s'])} | "
            f"{f(r['problems_per_min'], 2)} | {f(r['samples_per_min'], 2)} | {f(r['generated_tok_s'])} | "
            f"{r['correct']}/{r['records']} ({f(100 * r['accuracy'])}%) | {r['errors']} |"
        )
    print(
        "\n| round | order | server/in-process problems/min | samples/min | generated tok/s | "
        "same answer | same correctness | same text |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    ratios = res["summary"]["ratio_server_over_in_process"]
    for i, rd in enumerate(res["rounds"]):
        ag = rd["agreement"]
        print(
            f"| {rd['round']} | {', '.join(rd['order'])} | {f(ratios['problems_per_min']['per_round'][i], 3)} | "
            f"{f(ratios['samples_per_min']['per_round'][i], 3)} | {f(ratios['generated_tok_s']['per_round'][i], 3)} | "
            f"{ag['same_answer']}/{ag['compared']} | {ag['same_correct']}/{ag['compared']} | "
            f"{ag['same_text']}/{ag['compared']} |"
        )
    s = res["summary"]
    ag = s["agreement"]

    def med(d: dict[str, Any]) -> str:
        return f"{f(d['median'], 3)} ({f(d['min'], 3)}-{f(d['max'], 3)})"

    print(
        f"| median (min-max) | | {med(ratios['problems_per_min'])} | {med(ratios['samples_per_min'])} | "
        f"{med(ratios['generated_tok_s'])} | {ag['same_answer']}/{ag['compared']} | "
        f"{ag['same_correct']}/{ag['compared']} | {ag['same_text']}/{ag['compared']} |"
    )
    print(
        f"\nserver path keeps up (median problems/min ratio >= {TARGET_RATIO}): "
        f"{'yes' if s['server_keeps_up'] else 'NO'}"
    )
    for p in PATHS:
        pp = s["per_path"][p]
        acc = ", ".join(f"{100 * a:.1f}%" for a in pp["accuracy_per_round"])
        print(
            f"{p}: median {f(pp['problems_per_min_median'], 2)} problems/min, "
            f"{f(pp['generated_tok_s_median'])} generated tok/s; accuracy per round {acc}; errors {pp['errors']}"
        )
    if ag["only_one_path"]:
        print(f"WARNING: {ag['only_one_path']} samples were recorded by one path only")
    for rd in res["rounds"]:
        for d in rd["agreement"]["differing"]:
            print(
                f"differs (round {rd['round']}): {d['benchmark']}/{d['problem_id']} {d['mode']} #{d['sample']}: "
                f"answers {d['answers']} (gold {d['gold']!r})"
            )


# --- main ------------------------------------------------------------------------------------------------


def quick_problems(path: Path) -> None:
    """The tiny TIR model's memorised problems as a JSONL benchmark (fields q / gold / name)."""
    from tests.support.tiny_tir_model import TIR_PROBLEMS

    path.write_text(
        "".join(json.dumps({"name": p.name, "q": p.prompt, "gold": p.answer}) + "\n" for p in TIR_PROBLEMS),
        encoding="utf-8",
    )


def check_problems(args: argparse.Namespace) -> int:
    """Load the problems as the harness will (so bad input fails before any server starts); their count."""
    from trainer.evaluate.benchmarks import BenchmarkError, load_benchmark, select

    total = 0
    try:
        for name in (n.strip() for n in args.benchmarks.split(",") if n.strip()):
            rows = load_benchmark(
                name, problem_field=args.problem_field, answer_field=args.answer_field, id_field=args.id_field
            )
            total += len(select(rows, offset=0, limit=args.limit))
    except BenchmarkError as exc:
        sys.exit(f"problems: {exc}")
    if total == 0:
        sys.exit(f"problems: --benchmarks {args.benchmarks} --limit {args.limit} selects no problem")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="preset, model directory or hub id, for both paths")
    ap.add_argument("--benchmarks", default="gsm8k", help="as the harness's --benchmarks (names or JSONL paths)")
    ap.add_argument("--problem-field", default=None, help="as the harness's (custom files only)")
    ap.add_argument("--answer-field", default=None, help="as the harness's (custom files only)")
    ap.add_argument("--id-field", default=None, help="as the harness's (custom files only)")
    ap.add_argument("--limit", type=int, default=20, help="problems per benchmark")
    ap.add_argument("--modes", default="thor")
    ap.add_argument("--k", type=int, default=1, help="samples per problem (k=1: greedy)")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=8, help="the harness's samples in flight, both paths")
    ap.add_argument("--max-model-len", type=int, default=4096, help="engine context length, both paths")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kvcache-gb", default="4", help="VLLM_CPU_KVCACHE_SPACE for the server and the in-process run")
    ap.add_argument("--sandbox-pool", type=int, default=4, help="workers of the shared sandbox service")
    ap.add_argument("--rounds", type=int, default=2, help="each round runs both paths, the order alternating")
    ap.add_argument("--order", default="in-process,server", help="which path goes first in round 0")
    ap.add_argument("--server-per-round", action="store_true", help="a fresh server for every round")
    ap.add_argument("--tool-cache", action="store_true", help="leave the server's tool-result cache on")
    ap.add_argument("--run-timeout", type=float, default=4 * 3600, help="seconds one harness run may take")
    ap.add_argument("--server-timeout", type=float, default=900, help="seconds the server may take to start")
    ap.add_argument(
        "--work-dir", type=Path, default=None, help="keep the run directories here (default: temp, removed)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run defaults: the tiny TIR model (built if missing) on its memorised problems, 1 round, "
        "max-tokens 320, max-model-len 2048 (explicit flags override)",
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
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_throughput.json")
    if ap.parse_known_args()[0].quick:  # smaller defaults; flags given explicitly still win
        ap.set_defaults(
            model=str(QUICK_MODEL),
            benchmarks=None,  # the tiny model's problems, written below
            limit=None,
            rounds=1,
            max_tokens=320,
            max_model_len=2048,
            kvcache_gb="1",
        )
    args = ap.parse_args()
    order = [s.strip() for s in args.order.split(",")]
    if sorted(order) != sorted(PATHS):
        sys.exit(f"--order must name both paths, e.g. in-process,server (got {args.order!r})")
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    if args.force is not None and not args.force.strip():
        sys.exit(
            "--force needs a reason (it is recorded with the results), e.g. --force 'CI runner, load from its agent'"
        )

    # provenance first: refuse before any server starts if the results could not be saved
    git, load_before, problems = provenance_gate(args)

    with contextlib.ExitStack() as cleanup:
        if args.work_dir is not None:
            work = args.work_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="eval-bench-")))
        if args.quick and args.benchmarks is None:
            if args.model == str(QUICK_MODEL):
                from tests.support.tiny_tir_model import build_tiny_tir_model

                build_tiny_tir_model(QUICK_MODEL, QUICK_TOKENIZER)  # idempotent: returns at once when built
            path = work / "tiny_tir.jsonl"
            quick_problems(path)
            args.benchmarks, args.problem_field, args.answer_field, args.id_field = str(path), "q", "gold", "name"
        n_problems = check_problems(args)
        res = run_benchmark(args, order, work, n_problems, git, load_before, problems)

    if args.quick:
        print("\n**SMOKE RUN (--quick): tiny TIR model, small counts; figures are not benchmark results.**")
    print_tables(res)
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


def run_benchmark(
    args: argparse.Namespace,
    order: list[str],
    work: Path,
    n_problems: int,
    git: dict[str, Any],
    load_before: tuple[float, float, float],
    problems: list[str],
) -> dict[str, Any]:
    env = vllm_env(args.kvcache_gb)
    server_env = {**env, **({} if args.tool_cache else {"THOR_TOOL_CACHE_TTL_S": "0"})}
    harness_env = {**os.environ, **env}
    common = harness_problem_args(args)
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
            "benchmarks": args.benchmarks if not args.quick else "tiny TIR problems (tests.support.tiny_tir_model)",
            "problems_selected": n_problems,
            "limit": args.limit,
            "modes": args.modes,
            "k": args.k,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "max_model_len": args.max_model_len,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "order": order,
            "server_per_round": args.server_per_round,
            "server_tool_cache": args.tool_cache,
            "sandbox_pool": args.sandbox_pool,
            "harness_args_both_paths": common,
            "harness_args_in_process": target_args("in-process", args, "<sandbox>", None),
            "harness_args_server": ["--endpoint", "<server>"],
            "server_args": ["--port", "0", "--enforce-eager", "--dtype", "bfloat16", *server_args(args, "<sandbox>")],
            "env": env,
            "server_env": server_env,
        },
        "server_starts_s": [],
        "runs": [],
        "rounds": [],
    }
    runs: list[PathRun] = []
    t_start = time.perf_counter()
    with run_sandbox({"THOR_SANDBOX_POOL_SIZE": str(args.sandbox_pool)}) as sbx, contextlib.ExitStack() as outer:

        def server_now(stack: contextlib.ExitStack) -> ThorServer:
            t0 = time.perf_counter()
            srv = stack.enter_context(start_server(args, sbx.url, server_env))
            res["server_starts_s"].append(time.perf_counter() - t0)
            return srv

        shared = None if args.server_per_round else server_now(outer)
        for round_no in range(args.rounds):
            with contextlib.ExitStack() as per_round:
                srv = shared or server_now(per_round)
                this_order = round_order(order, round_no)
                records: dict[str, dict[tuple[str, str, str, int], SampleRecord]] = {}
                for path in this_order:
                    out = work / f"round{round_no}-{path}"
                    run, records[path] = run_harness(
                        path,
                        round_no,
                        out,
                        [*common, *target_args(path, args, sbx.url, srv)],
                        harness_env,
                        args.run_timeout,
                    )
                    runs.append(run)
                    res["runs"].append(asdict(run))
            ag = agreement(records["in-process"], records["server"])
            res["rounds"].append({"round": round_no, "order": this_order, "agreement": asdict(ag)})
            res["provenance"]["loadavg_after_round"].append(os.getloadavg())
    res["summary"] = summarise(runs, res["rounds"])
    res["provenance"]["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_start
    return res


if __name__ == "__main__":
    main()
