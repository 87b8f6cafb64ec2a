"""The THOR loop run client-side against an OpenAI-compatible `/v1/completions` endpoint.

Owns: `ClientLoopTarget` (kind "openai-completions"): the same `ThorEngine` as the in-process
target (same decoder, same prompts rendered with the served model's chat template, same
sandbox service), with the engine replaced by a remote one (`CompletionsBackend`: each
engine request of the decoder is one streaming completion of token ids). It runs every
mode, tools included, on any server that returns token ids (vLLM >= 0.10.2, our THOR
server's plain completions). `open_client_loop` connects, checks the endpoint, and starts
(or uses) the sandbox exactly as `InProcessTarget.open` does.

Does not own: the remote backend (remote_backend.py), what a sample's `Generation` holds
(built by `InProcessTarget.generate`, reused here, not duplicated), the modes, or choosing
this target over plain chat (the CLI: trainer/evaluate/__main__.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from thor_engine.config import SamplingOptions

from .modes import Mode
from .remote_backend import CompletionsBackend
from .targets import Generation, InProcessTarget, TargetError, resolve_model

__all__ = ["ClientLoopTarget", "open_client_loop", "resolve_tokenizer"]


class ClientLoopTarget:
    """`ThorEngine` over a `CompletionsBackend`: the THOR loop here, generation on the endpoint."""

    kind = "openai-completions"

    def __init__(self, engine: Any, model: str, endpoint: str) -> None:
        self.engine = engine
        self.model = model
        self.endpoint = endpoint
        self._loop = InProcessTarget(engine, model)  # one event-to-Generation path for both targets

    def supports(self, mode: Mode) -> bool:
        return mode.answer_schema is None  # this loop sends no structured-output constraint

    async def generate(self, mode: Mode, messages: list[dict[str, str]], sampling: SamplingOptions) -> Generation:
        """One sample, as `InProcessTarget.generate` makes it. Raises TargetError when the endpoint stops serving."""
        return await self._loop.generate(mode, messages, sampling)


def resolve_tokenizer(tokenizer: str | None) -> str | None:
    """A `--tokenizer` value as a path: a directory as is, a preset provisioned (`resolve_model`),
    else a hub id; None leaves it to the endpoint's model path (remote_backend)."""
    if tokenizer is None:
        return None
    if Path(tokenizer).is_dir():
        return str(Path(tokenizer).resolve())
    return resolve_model(tokenizer)


@contextlib.asynccontextmanager
async def open_client_loop(
    url: str,
    *,
    api_key: str | None = None,
    model: str | None = None,
    tokenizer: str | None = None,
    sandbox_url: str | None = None,
    sandbox_port: int | None = None,
    sandbox_pool: int = 4,
    max_model_len: int | None = None,
    extra_body: Mapping[str, Any] | None = None,
    timeout_s: float = 1800.0,
) -> AsyncIterator[ClientLoopTarget]:
    """Connect to `url` (checked: see `CompletionsBackend.open`), start or use the sandbox, and yield the target.

    `tokenizer`: the served model's tokenizer (a preset name or a directory; None: the endpoint's model
    path when it is a directory here). Raises TargetError when the endpoint or the sandbox cannot serve."""
    from thor_engine.cli.local_sandbox import LocalSandboxError, sandbox_at
    from thor_engine.engine import ThorEngine
    from thor_engine.tools import SandboxExecutor, SandboxPolicy
    from thor_sandbox.client import SandboxClient

    async with contextlib.AsyncExitStack() as stack:
        # the endpoint first: it fails fast, before a sandbox is started
        backend = await stack.enter_async_context(
            CompletionsBackend.open(
                url,
                tokenizer=resolve_tokenizer(tokenizer),
                api_key=api_key,
                model=model,
                max_model_len=max_model_len,
                extra_body=extra_body,
                timeout_s=timeout_s,
            )
        )
        try:
            sandbox = await stack.enter_async_context(
                sandbox_at(sandbox_url, port=sandbox_port, pool_size=sandbox_pool)
            )
        except LocalSandboxError as exc:
            raise TargetError(f"no sandbox: {exc}") from exc
        client = await stack.enter_async_context(SandboxClient(sandbox))
        name = Path(backend.model).name if backend.model.startswith("/") else backend.model  # as in process
        engine = ThorEngine(backend, SandboxExecutor(client, SandboxPolicy(max_concurrent_per_request=1)), name)
        stack.callback(engine.shutdown)
        yield ClientLoopTarget(engine, name, str(backend.client.base_url))
