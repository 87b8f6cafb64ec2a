"""`python -m thor_engine`: solve a problem with THOR from the command line.

Owns: the command-line interface for quick use and scripting: the problem from
an argument or stdin, the model (default: the provisioned default model), the
sandbox (a given URL, or the local sandbox address 127.0.0.1:8080, where one is
started for the run when none answers), THOR options as flags, and printing the
trajectory as it streams (`--json`: one event per line). Standard output carries
only that: before anything else runs, file descriptor 1 is pointed at standard
error, so vLLM's log lines (its engine process included) and any stray print go
there, and our output is written to a private duplicate of the original stdout.

Does not own: anything the decoder does. Knows nothing of HTTP beyond the
sandbox URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import TextIO

from .config import ObservationConfig, RepetitionConfig, SamplingOptions, SelfCorrectionConfig, ThorConfig
from .events import Backtrack, Final, TextDelta, ToolCall, Vote


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m thor_engine",
        description="Solve a math problem with tool-integrated, self-correcting reasoning (THOR).",
    )
    p.add_argument("problem", nargs="?", help="the problem (default: read from stdin)")
    p.add_argument(
        "--model", default="default", help="a preset (default, quality, small), a Hugging Face directory, or a hub id"
    )
    p.add_argument("--raw", action="store_true", help="treat the input as a raw prompt (no chat template)")
    p.add_argument("--json", action="store_true", help="print the typed events as JSON lines")
    p.add_argument(
        "--sandbox-url",
        default=os.environ.get("THOR_SANDBOX_URL") or None,
        help="a running sandbox service (URL or unix:/path); default: the local sandbox address, "
        "where one is started for the run when none answers",
    )
    p.add_argument(
        "--local-sandbox-port",
        type=int,
        default=None,
        help="port of the local sandbox address 127.0.0.1:PORT (default: $THOR_LOCAL_SANDBOX_PORT or 8080)",
    )
    p.add_argument(
        "--no-spawn-sandbox",
        action="store_true",
        help="fail instead of starting a local sandbox when none answers at the local address",
    )
    g = p.add_argument_group("THOR options")
    g.add_argument("--max-tool-calls", type=int, default=10)
    g.add_argument("--no-self-correction", action="store_true")
    g.add_argument("--backtrack-mode", choices=("tokens", "step"), default="tokens")
    g.add_argument("--backtrack-tokens", type=int, default=500)
    g.add_argument("--max-retries", type=int, default=4)
    g.add_argument("--profile", choices=("notebook", "reference"), default="notebook")
    g.add_argument("--thinking-budget", type=int, default=None)
    g.add_argument(
        "--stop-on-repetition",
        action="store_true",
        help="end a looping trajectory early (finish reason repetition; ThorConfig.repetition defaults)",
    )
    g.add_argument("-n", type=int, default=1, help="samples (run concurrently)")
    g.add_argument("--vote", action="store_true", help="majority vote over the samples' answers")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=1024, help="new tokens over the whole trajectory")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    e = p.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=4096)
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--no-enforce-eager", action="store_true", help="compile (slower start, faster decode)")
    e.add_argument("-v", "--verbose", action="store_true", help="show engine logs")
    return p.parse_args(argv)


def resolve_model(name: str) -> str:
    from .models.provision import PRESETS, ensure_model

    if name in PRESETS:
        return str(ensure_model(name, log=lambda m: print(m, file=sys.stderr)))
    return name


async def run(args: argparse.Namespace, out: TextIO) -> int:
    from thor_sandbox.client import SandboxClient

    from .backends.vllm_backend import EngineOptions, VllmBackend
    from .cli.local_sandbox import local_port, local_url, sandbox_at
    from .decoder import ThorDecoder
    from .prompting import encode_raw, render_chat
    from .tools import SandboxExecutor, SandboxPolicy, sandbox_request_scope

    problem = args.problem if args.problem is not None else sys.stdin.read()
    if not problem.strip():
        print("error: no problem given (pass it as an argument or on stdin)", file=sys.stderr)
        return 2
    cfg = ThorConfig(
        max_tool_calls=args.max_tool_calls,
        observation=ObservationConfig(profile=args.profile),
        self_correction=SelfCorrectionConfig(
            enabled=not args.no_self_correction,
            mode=args.backtrack_mode,
            backtrack_tokens=args.backtrack_tokens,
            max_retries=args.max_retries,
        ),
        thinking_budget=args.thinking_budget,
        repetition=RepetitionConfig() if args.stop_on_repetition else None,
    )
    sampling = SamplingOptions(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    model = resolve_model(args.model)
    port = args.local_sandbox_port or local_port()
    url = args.sandbox_url or (local_url(port) if args.no_spawn_sandbox else None)
    async with sandbox_at(url, port=port) as url:
        print(f"[sandbox: {url}]", file=sys.stderr)
        backend = await VllmBackend.start(
            EngineOptions(
                model=model,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                enforce_eager=not args.no_enforce_eager,
            )
        )
        try:
            async with SandboxClient(url) as client:
                policy = SandboxPolicy()
                sandbox_request_scope(policy.max_concurrent_per_request)
                dec = ThorDecoder(backend, SandboxExecutor(client, policy))
                tok = backend.tokenizer
                ids = encode_raw(tok, problem) if args.raw else render_chat(tok, [{"role": "user", "content": problem}])
                return await _print_events(dec.stream(ids, cfg, sampling, n=args.n, vote=args.vote), args, out)
        finally:
            backend.shutdown()


async def _print_events(events, args: argparse.Namespace, out: TextIO) -> int:  # type: ignore[no-untyped-def]
    buffers: dict[int, list[str]] = {}
    async for ev in events:
        if args.json:
            out.write(json.dumps(ev.model_dump(mode="json")) + "\n")
            out.flush()
            continue
        if isinstance(ev, TextDelta):
            if args.n == 1:
                out.write(ev.text)
                out.flush()
            else:
                buffers.setdefault(ev.sample, []).append(ev.text)
        elif isinstance(ev, ToolCall) and not ev.committed:
            print(f"\n[tool call {ev.call} failed ({ev.outcome}): {ev.observation}]", file=sys.stderr)
        elif isinstance(ev, Backtrack):
            print(
                f"[self-correction: dropped {ev.tokens_dropped} tokens, resampling (attempt {ev.attempt})]",
                file=sys.stderr,
            )
        elif isinstance(ev, Final):
            if args.n > 1:
                print(f"\n===== sample {ev.sample} =====\n{ev.text}", file=out, flush=True)
            u = ev.usage
            print(
                f"\n\n[sample {ev.sample}: answer {ev.answer!r}, finish {ev.finish_reason.value}, "
                f"tool calls {ev.tools.calls} ({ev.tools.ok} ok), backtracks {ev.tools.backtracks}, "
                f"tokens {u.completion_tokens} (+{u.discarded_tokens} discarded), "
                f"prefix cache {u.cached_prompt_tokens}/{u.cached_prompt_tokens + u.prefilled_prompt_tokens}]",
                file=sys.stderr,
            )
        elif isinstance(ev, Vote):
            print(f"[vote: {ev.answer!r} {ev.counts}]", file=sys.stderr)
    return 0


def _claim_stdout() -> TextIO:
    """Keep the real stdout for our output only; everything else written to fd 1 goes to stderr.

    vLLM logs to stdout (in this process and in its engine process, which inherits fd 1),
    as may any library: re-pointing the descriptor itself, before any of them starts,
    is the one place that catches them all.
    """
    sys.stdout.flush()
    private = os.dup(1)
    os.dup2(2, 1)
    return open(private, "w", encoding="utf-8", buffering=1, closefd=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = _claim_stdout()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return asyncio.run(run(args, out))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
