"""Engine benchmark: the THOR decoder on real vLLM (CPU) with the real sandbox (nsjail).

Uses the tiny TIR model (tests/support/tiny_tir_model.py: hidden 64, 2 layers, trained
to write memorised tool-integrated trajectories), so every problem runs real tool
rounds at a few hundred tokens per second and the decoder's own overhead is visible.
Measures, in one run, on one engine:

1. Decoder overhead. Wall time of the decoder (greedy, self-correction off) over the
   memorised problems, repeated, vs. what the same work costs without the loop: raw
   vLLM generation of the same number of model tokens from the same prompt (one
   request, fixed max_tokens, ignore_eos, same engine) plus the measured sandbox time
   of the same code blocks (same client). Ratio = decoder / (raw + sandbox), target
   <= 1.10.
2. Prefix-cache hit rate of continuation requests (every request after a tool call):
   sum(cached_prompt_tokens) / sum(cached + prefilled) from Final.usage, target >= 90%.
   vLLM caches whole blocks (128 tokens by default on CPU; --block-size changes it), so
   the partial last block of every continuation is prefilled again; the table also
   gives the best rate block granularity allows.
3. Cost of self-correction on the failing-first-call problem, sampling (temperature
   0.7, seeded: greedy resampling would only repeat itself): backtracks, discarded
   tokens per backtrack, and wall time with self-correction on vs. off.

Prints Markdown tables and saves JSON (benchmarks/results/engine.json).

    make bench-engine          # runs: .venv/bin/python benchmarks/engine_bench.py
    .venv/bin/python benchmarks/engine_bench.py --reps 10 --block-size 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.sandbox_service import ROOT, run_sandbox
from tests.support.tiny_tir_model import TIR_PROBLEMS, TirProblem, build_tiny_tir_model
from thor_engine.config import (
    ObservationConfig,
    SamplingOptions,
    SelfCorrectionConfig,
    ThorConfig,
)
from thor_engine.events import Backtrack, Final, ToolCall
from thor_engine.observation import judge

SC_PROBLEM = "divzero"


def vllm_env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")


async def decode(dec: Any, ids: list[int], cfg: ThorConfig, sampling: SamplingOptions) -> tuple[float, Final, list]:
    t0 = time.perf_counter()
    events = [ev async for ev in dec.stream(ids, cfg, sampling)]
    dt = time.perf_counter() - t0
    final = next(e for e in events if isinstance(e, Final))
    return dt, final, events


async def raw_generate(backend: Any, ids: list[int], n_tokens: int, request_id: str) -> tuple[float, int]:
    """The same engine generating n_tokens from the prompt in one request (no stops, no EOS)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    sp = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    got = 0
    t0 = time.perf_counter()
    async for out in backend.engine.generate(TokensPrompt(prompt_token_ids=ids), sp, request_id):
        got += len(out.outputs[0].token_ids)
    return time.perf_counter() - t0, got


async def sandbox_time(executor: Any, p: TirProblem) -> tuple[float, list[str]]:
    """Client-side wall time of running the problem's code blocks, one after another, and
    their observations (judged by the decoder's rules)."""
    total, outs = 0.0, []
    for code in p.code_blocks:
        t0 = time.perf_counter()
        r = await executor.execute(code, timeout_s=10.0, echo_last_expression=True)
        total += time.perf_counter() - t0
        outs.append(judge(r.exit_code, r.stdout, r.stderr, ObservationConfig()).text)
    return total, outs


def continuation_bound(final: Final, unit: int) -> tuple[int, int]:
    """(prompt tokens of continuation requests, the most of them whole cache blocks can hold).

    Without backtracks, request k+1's prompt is everything up to the end of the k-th
    observation; the engine has seen all of it but the observation (the core may run a
    step past a stop string, so even the last sampled token can be cached), and hits
    land on multiples of `unit`.
    """
    segs = final.trajectory["segments"]  # type: ignore[index]
    total = bound = 0
    length = 0
    for s in segs:
        length += len(s["token_ids"])
        if s["kind"] == "observation":
            total += length
            seen = length - len(s["token_ids"])
            bound += (min(seen, length - 1) // unit) * unit
    return total, bound


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend
    from thor_engine.decoder import ThorDecoder
    from thor_engine.models.provision import ensure_model
    from thor_engine.prompting import render_chat
    from thor_engine.tools import SandboxExecutor
    from thor_sandbox.client import SandboxClient

    tokenizer_source = args.tokenizer or ensure_model("default")
    t0 = time.perf_counter()
    model_dir = build_tiny_tir_model(
        args.model_dir, tokenizer_source, log=lambda m: print(f"[build] {m}", file=sys.stderr, flush=True)
    )
    build_s = time.perf_counter() - t0
    marker = json.loads((model_dir / ".thor-tiny-tir.json").read_text())
    print(f"model {model_dir} ready in {build_s:.1f}s (trained in {marker['train_seconds']}s)", flush=True)

    vllm_env()
    extra = {"block_size": args.block_size} if args.block_size else {}
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "load_avg_start": os.getloadavg(),
        },
        "model": {
            "dir": str(model_dir),
            "build_s": build_s,
            "train_s": marker["train_seconds"],
            "dtype": args.dtype,
            "enforce_eager": True,
        },
        "reps": args.reps,
    }
    with run_sandbox({"THOR_SANDBOX_POOL_SIZE": "2"}) as svc:
        async with SandboxClient(svc.url) as client:
            executor = SandboxExecutor(client)
            t0 = time.perf_counter()
            backend = await VllmBackend.start(
                EngineOptions(
                    model=str(model_dir), dtype=args.dtype, enforce_eager=True, max_model_len=2048, extra=extra
                )
            )
            results["model"]["engine_start_s"] = time.perf_counter() - t0
            try:
                cc = backend.engine.vllm_config.cache_config
                unit = cc.block_size  # one KV cache group: hits land on whole blocks
                results["engine"] = {"block_size": cc.block_size, "block_size_requested": args.block_size}
                dec = ThorDecoder(backend, executor)
                tok = backend.tokenizer
                prompts = {p.name: render_chat(tok, [{"role": "user", "content": p.prompt}]) for p in TIR_PROBLEMS}
                greedy = SamplingOptions(max_tokens=1024)
                off = ThorConfig(self_correction=SelfCorrectionConfig(enabled=False))

                # warm-up: every path once
                for p in TIR_PROBLEMS:
                    _, f, _ = await decode(dec, prompts[p.name], off, greedy)
                    await raw_generate(backend, prompts[p.name], f.usage.generated_tokens, f"warm-{p.name}")
                    await sandbox_time(executor, p)

                # 1 + 2: decoder vs raw generation + sandbox; prefix cache of continuations
                per: dict[str, dict[str, Any]] = {
                    p.name: {
                        "kind": p.kind,
                        "rounds": p.rounds,
                        "decoder_s": [],
                        "raw_s": [],
                        "sandbox_s": [],
                        "tool_s_in_decoder": [],
                        "model_tokens": 0,
                        "requests": 0,
                        "cached": 0,
                        "prefilled": 0,
                        "cont_prompt": 0,
                        "cont_bound": 0,
                        "exact": 0,
                    }
                    for p in TIR_PROBLEMS
                }
                for rep in range(args.reps):
                    print(f"[overhead] rep {rep + 1}/{args.reps}", flush=True)
                    for p in TIR_PROBLEMS:
                        r = per[p.name]
                        n = per[p.name]["model_tokens"] or None
                        raw_first = rep % 2 == 1  # alternate the order: load from other processes varies
                        if raw_first and n:
                            raw_s, got = await raw_generate(backend, prompts[p.name], n, f"raw-{rep}-{p.name}")
                        dt, f, _ = await decode(dec, prompts[p.name], off, greedy)
                        if not (raw_first and n):
                            n = f.usage.generated_tokens
                            raw_s, got = await raw_generate(backend, prompts[p.name], n, f"raw-{rep}-{p.name}")
                        assert got == n == f.usage.generated_tokens, (got, n, f.usage.generated_tokens)
                        sbx_s, outs = await sandbox_time(executor, p)
                        assert outs == p.observations, (outs, p.observations)
                        r["decoder_s"].append(dt)
                        r["raw_s"].append(raw_s)
                        r["sandbox_s"].append(sbx_s)
                        r["tool_s_in_decoder"].append(f.tools.duration_s)
                        r["model_tokens"] = n
                        r["requests"] = f.usage.engine_requests
                        r["exact"] += f.text == p.completion and f.answer == p.answer
                        r["cached"] += f.usage.cached_prompt_tokens
                        r["prefilled"] += f.usage.prefilled_prompt_tokens
                        total, bound = continuation_bound(f, unit)
                        r["cont_prompt"] += total
                        r["cont_bound"] += bound
                tot = {k: sum(sum(r[k]) for r in per.values()) for k in ("decoder_s", "raw_s", "sandbox_s")}
                cached = sum(r["cached"] for r in per.values())
                prefilled = sum(r["prefilled"] for r in per.values())
                cont = sum(r["cont_prompt"] for r in per.values())
                bound = sum(r["cont_bound"] for r in per.values())
                assert cached + prefilled == cont, (cached, prefilled, cont)
                results["overhead"] = {
                    "per_problem": per,
                    "total": {
                        **tot,
                        "ratio": tot["decoder_s"] / (tot["raw_s"] + tot["sandbox_s"]),
                        "model_tokens": args.reps * sum(r["model_tokens"] for r in per.values()),
                        "exact": sum(r["exact"] for r in per.values()),
                        "runs": args.reps * len(TIR_PROBLEMS),
                    },
                }
                results["prefix_cache"] = {
                    "continuation_requests": args.reps * sum(r["requests"] - 1 for r in per.values()),
                    "cached_tokens": cached,
                    "prefilled_tokens": prefilled,
                    "hit_rate": cached / (cached + prefilled),
                    "block_bound_rate": bound / cont,
                    "hit_rate_of_bound": cached / bound if bound else None,
                }

                # 3: self-correction on the failing-first-call problem (sampled, seeded)
                p = next(q for q in TIR_PROBLEMS if q.name == SC_PROBLEM)
                sc_res: dict[str, Any] = {}
                for label, enabled in (("off", False), ("on", True)):
                    cfg = ThorConfig(self_correction=SelfCorrectionConfig(enabled=enabled))
                    runs = []
                    for rep in range(args.sc_reps):
                        sampling = SamplingOptions(max_tokens=1024, temperature=args.sc_temperature, seed=1000 + rep)
                        dt, f, events = await decode(dec, prompts[p.name], cfg, sampling)
                        bts = [e for e in events if isinstance(e, Backtrack)]
                        calls = [e for e in events if isinstance(e, ToolCall)]
                        runs.append(
                            {
                                "wall_s": dt,
                                "backtracks": len(bts),
                                "discarded": f.usage.discarded_tokens,
                                "dropped_per_backtrack": [b.tokens_dropped for b in bts],
                                "generated": f.usage.generated_tokens,
                                "model_tokens": f.usage.model_tokens,
                                "calls": len(calls),
                                "engine_requests": f.usage.engine_requests,
                                "answer_ok": f.answer == p.answer,
                                "exact": f.text == p.completion,
                            }
                        )
                    sc_res[label] = {
                        "runs": runs,
                        "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
                        "backtracks": sum(r["backtracks"] for r in runs),
                        "discarded": sum(r["discarded"] for r in runs),
                        "generated_mean": statistics.fmean(r["generated"] for r in runs),
                        "calls_mean": statistics.fmean(r["calls"] for r in runs),
                        "answer_ok": sum(r["answer_ok"] for r in runs),
                    }
                on, off_ = sc_res["on"], sc_res["off"]
                sc_res["summary"] = {
                    "problem": p.name,
                    "temperature": args.sc_temperature,
                    "reps": args.sc_reps,
                    "backtracks_per_run": on["backtracks"] / args.sc_reps,
                    "discarded_per_backtrack": on["discarded"] / on["backtracks"] if on["backtracks"] else 0.0,
                    "overhead_ratio": on["wall_s_mean"] / off_["wall_s_mean"],
                    "ms_per_backtrack": (
                        1000 * (on["wall_s_mean"] - off_["wall_s_mean"]) / (on["backtracks"] / args.sc_reps)
                    )
                    if on["backtracks"]
                    else None,
                }
                results["self_correction"] = sc_res
                results["machine"]["load_avg_end"] = os.getloadavg()
            finally:
                backend.shutdown()
    return results


def report(res: dict[str, Any]) -> None:
    ov = res["overhead"]
    print()
    print(f"### 1. Decoder overhead (greedy, self-correction off, {res['reps']} reps; times are sums over reps)")
    print()
    print(
        "| problem | kind | tool rounds | model tokens | engine requests | decoder ms | raw gen ms | sandbox ms "
        "| decoder / (raw + sandbox) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in ov["per_problem"].items():
        d, g, s = (1000 * sum(r[k]) for k in ("decoder_s", "raw_s", "sandbox_s"))
        print(
            f"| {name} | {r['kind']} | {r['rounds']} | {r['model_tokens']} | {r['requests']} | {d:.0f} | {g:.0f} "
            f"| {s:.0f} | {d / (g + s):.3f} |"
        )
    t = ov["total"]
    print(
        f"| **all** | | | {t['model_tokens']} | | {1000 * t['decoder_s']:.0f} | {1000 * t['raw_s']:.0f} "
        f"| {1000 * t['sandbox_s']:.0f} | **{t['ratio']:.3f}** |"
    )
    print()
    print(
        f"Trajectories reproduced exactly: {t['exact']}/{t['runs']}. Raw decode rate: "
        f"{t['model_tokens'] / t['raw_s']:.0f} tok/s; decoder end-to-end: {t['model_tokens'] / t['decoder_s']:.0f} "
        "tok/s (incl. sandbox)."
    )
    pc = res["prefix_cache"]
    e = res["engine"]
    print()
    print("### 2. Prefix cache, continuation requests")
    print()
    print(
        "| continuation requests | cached tokens | prefilled tokens | hit rate | whole blocks before the output "
        "| hit / that |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {pc['continuation_requests']} | {pc['cached_tokens']} | {pc['prefilled_tokens']} "
        f"| **{100 * pc['hit_rate']:.1f}%** | {100 * pc['block_bound_rate']:.1f}% "
        f"| {100 * (pc['hit_rate_of_bound'] or 0):.1f}% |"
    )
    print()
    print(
        f"Cache hits land on whole KV blocks of {e['block_size']} tokens "
        f"({'set by --block-size' if e['block_size_requested'] else 'the vLLM CPU default'}). The reference rate "
        "counts the whole blocks of everything before each injected output (what the engine has seen); it can "
        "be beaten slightly when the engine core ran a step past the stop string and its extra token happened "
        "to equal the output block's first token."
    )
    sc = res["self_correction"]
    s = sc["summary"]
    print()
    print(f"### 3. Self-correction cost ({s['problem']}, temperature {s['temperature']}, {s['reps']} seeded reps)")
    print()
    print(
        "| self-correction | mean wall ms | backtracks / run | discarded tokens / backtrack | generated tokens / run "
        "| tool calls / run | right answer |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in ("off", "on"):
        r = sc[label]
        bpr = r["backtracks"] / s["reps"]
        dpb = r["discarded"] / r["backtracks"] if r["backtracks"] else 0
        print(
            f"| {label} | {1000 * r['wall_s_mean']:.0f} | {bpr:.1f} | {dpb:.1f} | {r['generated_mean']:.0f} "
            f"| {r['calls_mean']:.1f} | {r['answer_ok']}/{s['reps']} |"
        )
    mpb = f"{s['ms_per_backtrack']:.0f} ms per backtrack" if s["ms_per_backtrack"] is not None else "no backtracks"
    print()
    print(f"Wall time with self-correction on / off: {s['overhead_ratio']:.2f}x ({mpb}).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the problem set for parts 1 and 2")
    ap.add_argument("--sc-reps", type=int, default=5, help="seeded runs per setting for part 3")
    ap.add_argument("--sc-temperature", type=float, default=0.7)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="vLLM KV block size (CPU default 128; prefix-cache hits land on whole blocks)",
    )
    ap.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "models" / "tiny-tir")
    ap.add_argument("--tokenizer", type=Path, default=None, help="tokenizer source (default: the default model)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine.json")
    ap.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs")
    args = ap.parse_args()
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    res = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, args.out)
    report(res)
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
