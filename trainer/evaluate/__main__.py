"""`python -m trainer.evaluate`: THOR's tables on any model or endpoint.

Owns: the command line (benchmarks, modes, sampling, target, output directory), checking
every input before anything is written (an unknown benchmark, a missing field, an
unreachable endpoint or a model that does not exist is one line on stderr and a non-zero
exit, with no run directory created), `--resume`, `--report-only`, and printing where the
results are. Exit status: 0 done, 1 the target failed (records so far are kept: resume),
2 bad input.

Does not own: any of the work (see the package's modules).

Examples::

    python -m trainer.evaluate --benchmarks gsm8k,math500 --limit 100 --modes thor,thor-nosc,cot
    python -m trainer.evaluate --model quality --benchmarks aime24 --k 4 --modes thor,cot
    python -m trainer.evaluate --endpoint http://localhost:8000 --api-key $KEY --benchmarks amc23
    python -m trainer.evaluate --benchmarks my.jsonl --problem-field q --answer-field a
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .benchmarks import BENCHMARKS, BenchmarkError, Problem, load_benchmark, select
from .modes import MODES, Mode, parse_modes
from .records import RECORDS_FILE, SPEC_FILE, RecordLog, RunSpec

EXIT_OK, EXIT_TARGET, EXIT_INPUT = 0, 1, 2


class InputError(ValueError):
    """Bad command-line input: exit 2 with this message."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Evaluate THOR reasoning (tools + self-correction) against ablations and chain of thought "
        "on math benchmarks, with intervals.",
    )
    t = p.add_argument_group("target (default: the default model, in process)")
    t.add_argument(
        "--model",
        default=None,
        help="a preset (default, quality, small), a model directory or a hub id; "
        "with --endpoint: the served model name (default: the endpoint's first)",
    )
    t.add_argument(
        "--allow-train-overlap",
        action="store_true",
        help="score a checkpoint of ours on problems it was trained on (its thor_training.json lists them)",
    )
    t.add_argument("--endpoint", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000")
    t.add_argument(
        "--api-key",
        default=os.environ.get("THOR_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer key for --endpoint (default: $THOR_API_KEY or $OPENAI_API_KEY)",
    )
    t.add_argument(
        "--endpoint-kind",
        choices=("auto", "thor", "completions", "chat"),
        default="auto",
        help="thor: a THOR server (the loop runs server-side); completions: the THOR loop here over the endpoint's "
        "/v1/completions with token ids (vLLM >= 0.10.2), every mode; chat: plain chat, cot only; auto (default): "
        "thor when /v1/models says owned_by thor, else completions when the endpoint returns token ids and a "
        "tokenizer is at hand, else chat",
    )
    t.add_argument(
        "--tokenizer",
        default=None,
        help="the served model's tokenizer for the client-side loop: a preset or a directory "
        "(default: the endpoint's model path when it is a directory on this machine)",
    )
    b = p.add_argument_group("problems")
    b.add_argument(
        "--benchmarks",
        default="math500",
        help=f"comma-separated: {', '.join(BENCHMARKS)}, or JSONL / dataset paths (default: math500)",
    )
    b.add_argument("--problem-field", default=None, help="problem field of a custom file")
    b.add_argument("--answer-field", default=None, help="gold answer field of a custom file")
    b.add_argument("--id-field", default=None, help="id field of a custom file (default: row number)")
    b.add_argument("--split", default="test", help="split of a saved Hugging Face DatasetDict (default: test)")
    b.add_argument("--offset", type=int, default=0, help="skip this many problems of each benchmark")
    b.add_argument("--limit", type=int, default=None, help="at most this many problems of each benchmark")
    s = p.add_argument_group("modes and sampling")
    s.add_argument(
        "--modes",
        default="thor,cot",
        help=f"comma-separated, compared in one run: {', '.join(MODES)} "
        "(default: thor,cot; each later mode is compared with the first)",
    )
    s.add_argument(
        "--k",
        type=int,
        default=1,
        help="samples per problem (default 1: greedy, what a 2-core machine affords; --k 4 gives Avg@4 at "
        "temperature 0.6 as THOR's Table 1)",
    )
    s.add_argument("--temperature", type=float, default=None, help="default: 0.6 for k > 1, 0 (greedy) for k = 1")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-tokens", type=int, default=2048, help="new tokens per trajectory (default 2048)")
    s.add_argument("--seed", type=int, default=0, help="base of the per-sample seeds (default 0)")
    s.add_argument("--concurrency", type=int, default=8, help="samples in flight at once (default 8)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, help="run directory (default: runs/eval/<model>-<time>)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished samples")
    o.add_argument("--report-only", action="store_true", help="rewrite the reports of --out from its records")
    o.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        default=None,
        help="compare two finished runs (e.g. a model before and after training): accuracy with the paired "
        "difference, code-invocation ratio and call success per mode; writes compare.md/json into AFTER",
    )
    o.add_argument(
        "--rescore", action="store_true", help="with --report-only: score the records again with the current checker"
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = p.add_argument_group("in-process engine")
    e.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length (default 4096; with --endpoint: the endpoint's own)",
    )
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--no-enforce-eager", action="store_true", help="compile (slower start, faster decode)")
    e.add_argument(
        "--sandbox-url",
        default=os.environ.get("THOR_SANDBOX_URL") or None,
        help="a running sandbox service (default: a local one, started for the run if none answers)",
    )
    e.add_argument("--sandbox-pool", type=int, default=4, help="workers of a sandbox started for the run")
    p.add_argument("-v", "--verbose", action="store_true", help="engine and HTTP logs")
    return p.parse_args(argv)


def load_problems(args: argparse.Namespace) -> tuple[list[str], list[Problem]]:
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    if not names:
        raise InputError("--benchmarks is empty")
    problems: list[Problem] = []
    for name in names:
        # the field flags are for files; a named set maps its own fields (gsm8k,my.jsonl --problem-field q works)
        fields = (
            {}
            if name in BENCHMARKS
            else {"problem_field": args.problem_field, "answer_field": args.answer_field, "id_field": args.id_field}
        )
        rows = load_benchmark(name, split=args.split, **fields)
        chosen = select(rows, offset=args.offset, limit=args.limit)
        if not chosen:
            raise InputError(f"benchmark {name}: no problems left after --offset {args.offset} (it has {len(rows)})")
        problems.extend(chosen)
    return names, problems


def check_args(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise InputError(f"--k must be at least 1 (got {args.k})")
    if args.concurrency < 1:
        raise InputError(f"--concurrency must be at least 1 (got {args.concurrency})")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.offset < 0 or (args.limit is not None and args.limit < 1):
        raise InputError("--offset must be >= 0 and --limit >= 1")
    if args.temperature is not None and not 0 <= args.temperature <= 2:
        raise InputError(f"--temperature must be in [0, 2] (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.rescore and not args.report_only:
        raise InputError("--rescore goes with --report-only (it rescores a finished run's records)")
    if (args.resume or args.report_only) and args.out is None:
        raise InputError("--resume and --report-only need --out (the run directory)")


def default_out(model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model)[:60]
    return Path("runs") / "eval" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def refuse_used_out(out: Path) -> None:
    records = out / RECORDS_FILE
    if records.exists() and records.stat().st_size > 0:
        raise InputError(f"{out} already holds records: pass --resume to continue that run, or choose another --out")


def check_out_dir(out: Path, spec: RunSpec, resume: bool) -> None:
    records = out / RECORDS_FILE
    if not resume:
        refuse_used_out(out)
        return
    spec_path = out / SPEC_FILE
    if not spec_path.exists():
        if records.exists():
            raise InputError(f"{out} has records but no {SPEC_FILE}: not a run directory of this tool")
        return  # nothing to resume: a fresh run in that directory
    import json

    try:
        old = RunSpec.model_validate(json.loads(spec_path.read_text(encoding="utf-8"))["spec"])
    except (ValueError, KeyError) as exc:
        raise InputError(f"{spec_path} is unreadable ({exc}); choose another --out") from exc
    diffs = spec.differences(old)
    if diffs:
        raise InputError(
            f"--resume: {out} was made with other settings ({'; '.join(diffs)}); "
            "rerun with the same flags or choose another --out"
        )


def report(out: Path, names: list[str], modes: list[str], seed: int, k: int | None = None) -> list[Path]:
    from .metrics import summarise
    from .report import write_reports
    from .runner import latest_records

    records = latest_records(RecordLog(out / RECORDS_FILE).load())
    if not records:
        raise InputError(f"{out} holds no records to report on")
    benchmarks = list(dict.fromkeys(r.benchmark for r in records))
    order = [b for b in names if b in benchmarks] + [b for b in benchmarks if b not in names]
    modes_seen = list(dict.fromkeys(r.mode for r in records))
    mode_order = [m for m in modes if m in modes_seen] + [m for m in modes_seen if m not in modes]
    summary = summarise(records, modes=mode_order, benchmarks=order, k=k, seed=seed)
    return write_reports(summary, out)


async def open_endpoint_target(args: argparse.Namespace, stack: contextlib.AsyncExitStack) -> tuple[Any, str | None]:
    """The target for --endpoint: a THOR server, the client-side loop over /v1/completions, or plain chat;
    plus why an auto-detected endpoint fell back to plain chat (None when it did not)."""
    from .client_loop import open_client_loop
    from .remote_backend import ClientLoopUnavailable
    from .targets import is_thor_server, open_endpoint

    kind = args.endpoint_kind
    if kind == "auto":
        kind = "thor" if await is_thor_server(args.endpoint, api_key=args.api_key) else "other"
    if kind in ("completions", "other"):
        try:
            target = await stack.enter_async_context(
                open_client_loop(
                    args.endpoint,
                    api_key=args.api_key,
                    model=args.model,
                    tokenizer=args.tokenizer,
                    sandbox_url=args.sandbox_url,
                    sandbox_pool=args.sandbox_pool,
                    max_model_len=args.max_model_len,  # None: the endpoint's own
                )
            )
            return target, None
        except ClientLoopUnavailable as exc:
            if kind == "completions":
                raise
            logging.getLogger(__name__).warning("%s; plain chat instead (cot only)", exc)
            reason: str | None = str(exc)
            kind = "chat"
    else:
        reason = None
    target = await stack.enter_async_context(
        open_endpoint(args.endpoint, api_key=args.api_key, model=args.model, kind=kind)
    )
    return target, reason


async def run(args: argparse.Namespace) -> int:
    from .runner import run_evaluation
    from .targets import InProcessTarget, TargetError

    if args.compare:
        from .compare import compare_runs

        try:
            compare_runs(*args.compare)
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(str(exc)) from exc
        print((args.compare[1] / "compare.md").read_text(encoding="utf-8"))
        return EXIT_OK
    check_args(args)
    try:
        modes: list[Mode] = parse_modes(args.modes)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if args.report_only:
        import json

        spec_path = args.out / SPEC_FILE
        spec = json.loads(spec_path.read_text(encoding="utf-8"))["spec"] if spec_path.exists() else {}
        if not (args.out / RECORDS_FILE).exists():
            raise InputError(f"{args.out} holds no {RECORDS_FILE}: not a run directory of this tool")
        if args.rescore:
            from .runner import rescore

            total, flipped = await rescore(args.out)
            print(f"[evaluate] rescored {total} records: {flipped} changed", file=sys.stderr)
        paths = report(args.out, spec.get("benchmarks", []), [m.name for m in modes], args.seed, spec.get("k"))
        print((args.out / "table.md").read_text(encoding="utf-8"))
        print("\n".join(str(p) for p in paths), file=sys.stderr)
        return EXIT_OK
    names, problems = load_problems(args)
    check_training_overlap(args, problems)
    if args.out is not None and not args.resume:
        refuse_used_out(args.out)  # before a model is loaded
    temperature = args.temperature if args.temperature is not None else (0.6 if args.k > 1 else 0.0)

    async with contextlib.AsyncExitStack() as stack:
        try:
            fallback_reason: str | None = None
            if args.endpoint:
                target, fallback_reason = await open_endpoint_target(args, stack)
            else:
                target = await stack.enter_async_context(
                    InProcessTarget.open(
                        args.model or "default",
                        sandbox_url=args.sandbox_url,
                        sandbox_pool=args.sandbox_pool,
                        max_model_len=args.max_model_len or 4096,
                        max_num_seqs=args.max_num_seqs,
                        enforce_eager=not args.no_enforce_eager,
                        dtype=args.dtype,
                        seed=args.seed,
                    )
                )
        except TargetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_TARGET
        unsupported = [m.name for m in modes if not target.supports(m)]
        if unsupported:
            why = f" ({fallback_reason})" if fallback_reason else ""
            raise InputError(
                f"{target.kind} target {args.endpoint} cannot run mode(s) {', '.join(unsupported)}{why}: tools need "
                "a THOR server, an endpoint with token ids (vLLM) and --tokenizer, or an in-process model; "
                "use --modes cot for plain chat; a JSON answer (thor-json, json) needs a THOR server or an "
                "in-process model (json: any chat endpoint)"
            )
        spec = RunSpec(
            model=target.model,
            target=target.kind,
            benchmarks=names,
            modes=[m.name for m in modes],
            k=args.k,
            temperature=temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
            offset=args.offset,
            limit=args.limit,
        )
        out = args.out or default_out(target.model)
        check_out_dir(out, spec, args.resume)
        print(
            f"[evaluate] {len(problems)} problems x {len(modes)} modes x k={args.k} on {target.kind} "
            f"{target.model}; records: {out / RECORDS_FILE}",
            file=sys.stderr,
            flush=True,
        )
        result = await run_evaluation(
            target,
            problems,
            modes,
            spec,
            out,
            concurrency=args.concurrency,
            resume=args.resume,
            progress=not args.no_progress,
        )
    paths = report(out, names, spec.modes, args.seed, spec.k)
    rate = result.timing.get("problems", 0) / result.wall_s * 60 if result.wall_s > 0 else 0.0
    print(
        f"[evaluate] {result.new} new samples ({result.skipped} already done, {result.errors} errors) in "
        f"{result.wall_s:.0f}s ({rate:.2f} problems/min)",
        file=sys.stderr,
    )
    print((out / "table.md").read_text(encoding="utf-8"))
    print("\n".join(str(p) for p in paths), file=sys.stderr)
    if result.fatal:
        print(
            f"error: the run stopped early: {result.fatal}\n(resume with the same flags and --resume)", file=sys.stderr
        )
        return EXIT_TARGET
    return EXIT_OK


def check_training_overlap(args: argparse.Namespace, problems: list[Problem]) -> None:
    """Refuse (InputError) to evaluate a checkpoint of ours on its own training problems, unless told.

    The check reads ``thor_training.json`` (written by `python -m trainer.sft`) from the model directory:
    ``--model DIR`` in process, or ``--tokenizer DIR`` / a served model directory for an endpoint."""
    from trainer.splits import SplitError, check_no_overlap, read_training_problems

    if args.allow_train_overlap:
        return
    for where in (args.model, getattr(args, "tokenizer", None)):
        if where and Path(where).is_dir():
            trained = read_training_problems(where)
            if trained is not None:
                try:
                    check_no_overlap(problems, trained, model=str(where))
                except SplitError as exc:
                    raise InputError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return asyncio.run(run(args))
    except (InputError, BenchmarkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished samples are kept; continue with the same flags and --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
