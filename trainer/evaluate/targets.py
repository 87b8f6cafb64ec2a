"""Evaluation targets: where a sample is generated, behind one small interface.

Owns: `Target` (generate one sample of one problem in one mode and return a
`Generation`: the whole text, the answer the decoder extracted, the finish reason, every
tool call with its outcome, usage), and its implementations:

- `InProcessTarget`: a model directory or preset run through `thor_engine` on vLLM
  exactly as the server runs it (same `ThorEngine`, same sandbox service, same prompts);
- `ThorServerTarget`: a THOR server's `/v1/chat/completions`; the loop runs server-side
  and the tool events are read from the response's `thor` object;
- `ChatTarget`: any other OpenAI-compatible chat endpoint (plain vLLM, a hosted API):
  chain of thought only, there is no tool loop to run there.

`TargetError` is what a caller reports in one line: the target cannot serve at all (an
endpoint that does not answer, a model that does not exist, a dead engine).

Does not own: scoring (runner.py), prompts and settings per mode (modes.py), or the
decoder itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from thor_engine.answer import extract_boxed
from thor_engine.config import SamplingOptions
from thor_engine.events import Backtrack, CodeBlock, Final, TextDelta, ToolCall
from thor_engine.final_answer import json_answer

from .modes import Mode
from .records import ToolCallRecord, ToolTotals, UsageRecord

__all__ = [
    "ChatTarget",
    "Generation",
    "InProcessTarget",
    "Target",
    "TargetError",
    "ThorServerTarget",
    "is_thor_server",
    "open_endpoint",
    "resolve_model",
]

log = logging.getLogger(__name__)


class TargetError(RuntimeError):
    """The target cannot serve (unreachable, missing model, dead engine): the run stops."""


@dataclass
class Generation:
    text: str
    answer: str | None
    finish_reason: str
    tool_calls: list[ToolCallRecord]
    tools: ToolTotals
    usage: UsageRecord


class Target(Protocol):
    kind: str
    model: str

    def supports(self, mode: Mode) -> bool: ...

    async def generate(self, mode: Mode, messages: list[dict[str, str]], sampling: SamplingOptions) -> Generation:
        """One sample. Raises TargetError when the target cannot serve any more."""
        ...


# --- in process ------------------------------------------------------------------------


def resolve_model(model: str, log_line: Any = log.info) -> str:
    """A preset name (provisioned on first use), an existing model directory, or a hub id."""
    from thor_engine.models.provision import PRESETS, ProvisionError, ensure_model

    if model in PRESETS:
        try:
            return str(ensure_model(model, log=log_line))
        except ProvisionError as exc:
            raise TargetError(f"model preset {model!r} could not be provisioned: {exc}") from exc
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TargetError(f"model directory {model} has no config.json: not a Hugging Face checkpoint")
        return str(path.resolve())
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise TargetError(
            f"model {model!r} does not exist: pass a preset ({', '.join(PRESETS)}), a model directory, "
            "or a Hugging Face hub id (where a hub is reachable)"
        )
    return model


class InProcessTarget:
    """The THOR loop in this process: `ThorEngine` on vLLM + the sandbox service."""

    kind = "in-process"

    def __init__(self, engine: Any, model: str) -> None:
        self.engine = engine
        self.model = model

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        model: str,
        *,
        sandbox_url: str | None = None,
        sandbox_port: int | None = None,
        sandbox_pool: int = 4,
        max_model_len: int = 4096,
        max_num_seqs: int | None = None,
        enforce_eager: bool = True,
        dtype: str = "bfloat16",
        seed: int = 0,
    ) -> AsyncIterator[InProcessTarget]:
        from thor_engine.backends.vllm_backend import EngineOptions, VllmBackend
        from thor_engine.cli.local_sandbox import LocalSandboxError, sandbox_at
        from thor_engine.engine import ThorEngine
        from thor_engine.tools import SandboxExecutor, SandboxPolicy
        from thor_sandbox.client import SandboxClient

        path = resolve_model(model)
        async with contextlib.AsyncExitStack() as stack:
            try:
                url = await stack.enter_async_context(
                    sandbox_at(sandbox_url, port=sandbox_port, pool_size=sandbox_pool)
                )
            except LocalSandboxError as exc:
                raise TargetError(f"no sandbox: {exc}") from exc
            client = await stack.enter_async_context(SandboxClient(url))
            try:
                backend = await VllmBackend.start(
                    EngineOptions(
                        model=path,
                        dtype=dtype,
                        max_model_len=max_model_len,
                        enforce_eager=enforce_eager,
                        max_num_seqs=max_num_seqs,
                        seed=seed,
                    )
                )
            except Exception as exc:  # vLLM raises many kinds; one line for the operator
                raise TargetError(f"vLLM could not load model {model!r} ({path}): {type(exc).__name__}: {exc}") from exc
            stack.callback(backend.shutdown)
            name = Path(path).name if path.startswith("/") else path  # a resolved directory, else a hub id
            engine = ThorEngine(backend, SandboxExecutor(client, SandboxPolicy(max_concurrent_per_request=1)), name)
            yield cls(engine, name)

    def supports(self, mode: Mode) -> bool:
        return True

    async def generate(self, mode: Mode, messages: list[dict[str, str]], sampling: SamplingOptions) -> Generation:
        from thor_engine.backend import EngineUnavailable
        from thor_engine.tools import sandbox_request_scope

        sandbox_request_scope(1)
        prompt = await self.engine.prepare_chat(
            messages, tir_instructions=mode.tir_instructions if mode.tools else None
        )
        sampling = sampling.model_copy(update={"max_tokens": self.engine.max_tokens_for(prompt, sampling.max_tokens)})
        calls: list[ToolCallRecord] = []
        pending: dict[int, CodeBlock] = {}
        final: Final | None = None
        # a JSON answer: the loop, then the answer under the constraint, as the server's chat route asks it
        constrained = None if mode.answer_schema is None else json_answer(mode.answer_schema, name="answer")
        answer_text = ""
        try:
            async for ev in self.engine.stream(prompt, mode.config, sampling, final=constrained):
                if isinstance(ev, TextDelta) and ev.constrained:
                    answer_text += ev.text
                elif isinstance(ev, CodeBlock):
                    pending[ev.execution] = ev
                elif isinstance(ev, ToolCall):
                    block = pending.pop(ev.execution, None)
                    calls.append(
                        ToolCallRecord(
                            call=ev.call,
                            attempt=ev.attempt,
                            language=block.language if block else "python",
                            code=block.code if block else "",
                            ok=ev.ok,
                            outcome=ev.outcome,
                            committed=ev.committed,
                            observation=ev.observation,
                            duration_s=ev.duration_s,
                        )
                    )
                elif isinstance(ev, Backtrack):
                    pass  # counted in Final.tools
                elif isinstance(ev, Final):
                    final = ev
        except EngineUnavailable as exc:
            raise TargetError(f"the vLLM engine died: {exc}") from exc
        if final is None:
            raise RuntimeError("the decoder ended without a Final event")
        t, u = final.tools, final.usage
        return Generation(
            text=final.text,
            answer=final.answer if constrained is None else mode.structured_answer(answer_text),
            finish_reason=final.finish_reason.value,
            tool_calls=calls,
            tools=ToolTotals(
                calls=t.calls,
                ok=t.ok,
                failed=t.failed,
                backtracks=t.backtracks,
                not_executed=t.not_executed,
                duration_s=t.duration_s,
            ),
            usage=UsageRecord(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                generated_tokens=u.generated_tokens,
                discarded_tokens=u.discarded_tokens,
                observation_tokens=u.observation_tokens,
            ),
        )


# --- endpoints -------------------------------------------------------------------------


class _Endpoint:
    def __init__(self, client: httpx.AsyncClient, model: str) -> None:
        self.client = client
        self.model = model

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post(path, json=body)
        except httpx.TransportError as exc:
            raise TargetError(
                f"endpoint {self.client.base_url} stopped answering: {type(exc).__name__}: {exc}"
            ) from exc
        if r.status_code in (401, 403, 404):  # the endpoint refuses every sample; others fail one sample
            raise TargetError(f"{self.client.base_url}{path} answered {r.status_code}: {r.text[:300]}")
        r.raise_for_status()
        return r.json()

    @staticmethod
    def _sampling_body(sampling: SamplingOptions) -> dict[str, Any]:
        body: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.max_tokens is not None:
            body["max_tokens"] = sampling.max_tokens
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body


class ThorServerTarget(_Endpoint):
    """A THOR server: the loop runs there; tool calls come back in the response's `thor` object."""

    kind = "thor-server"

    def supports(self, mode: Mode) -> bool:
        return True

    async def generate(self, mode: Mode, messages: list[dict[str, str]], sampling: SamplingOptions) -> Generation:
        body = {
            "model": self.model,
            "messages": messages,
            **self._sampling_body(sampling),
            "thor": {**mode.server_options, "trace": False},
        }
        if mode.response_format is not None:
            body["response_format"] = mode.response_format
        data = await self._post("/v1/chat/completions", body)
        choice = data["choices"][0]
        msg = choice["message"]
        reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
        content = msg.get("content") or ""
        if "thor" not in data:  # THOR off with a response_format: plain generation, no `thor` object
            return _plain_generation(data, reasoning, content, mode.structured_answer(content))
        thor = data["thor"]["choices"][0]
        tools = thor.get("tools") or {}
        usage = thor.get("usage") or {}
        return Generation(
            text=reasoning + content,
            answer=thor.get("answer") if mode.response_format is None else mode.structured_answer(content),
            finish_reason=thor.get("finish_reason") or choice["finish_reason"],
            tool_calls=[
                ToolCallRecord(
                    call=c["call"],
                    attempt=c.get("attempt", 0),
                    language=c.get("language", "python"),
                    code=c.get("code", ""),
                    ok=bool(c.get("ok")),
                    outcome=c.get("outcome", "unknown"),
                    committed=bool(c.get("committed", True)),
                    observation=c.get("observation", ""),
                    duration_s=float(c.get("duration_s") or 0.0),
                )
                for c in thor.get("tool_calls", [])
            ],
            tools=ToolTotals(**{k: tools[k] for k in ToolTotals.model_fields if k in tools}),
            usage=UsageRecord(**{k: usage[k] for k in UsageRecord.model_fields if k in usage}),
        )


class ChatTarget(_Endpoint):
    """Any OpenAI-compatible chat endpoint: chain of thought only (no tools to run there)."""

    kind = "openai-chat"

    def supports(self, mode: Mode) -> bool:
        return not mode.tools

    async def generate(self, mode: Mode, messages: list[dict[str, str]], sampling: SamplingOptions) -> Generation:
        body = {"model": self.model, "messages": messages, **self._sampling_body(sampling)}
        if mode.response_format is not None:
            body["response_format"] = mode.response_format
        data = await self._post("/v1/chat/completions", body)
        msg = data["choices"][0]["message"]
        reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
        content = msg.get("content") or ""
        if mode.response_format is not None:
            answer = mode.structured_answer(content)
        else:
            answer = extract_boxed(content) or extract_boxed(reasoning)
        return _plain_generation(data, reasoning, content, answer)


def _plain_generation(data: dict[str, Any], reasoning: str, content: str, answer: str | None) -> Generation:
    """A chat completion without a `thor` object (no tool loop ran) as a `Generation`."""
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    return Generation(
        text=reasoning + content,
        answer=answer,
        finish_reason=choice.get("finish_reason") or "unknown",
        tool_calls=[],
        tools=ToolTotals(),
        usage=UsageRecord(
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0),
            generated_tokens=usage.get("completion_tokens", 0),
        ),
    )


def _base(url: str) -> str:
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _served_models(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    base = str(client.base_url).rstrip("/")
    try:
        r = await client.get("/v1/models")
    except httpx.TransportError as exc:
        raise TargetError(f"endpoint {base} is unreachable: {type(exc).__name__}: {exc}") from exc
    if r.status_code in (401, 403):
        raise TargetError(f"endpoint {base} refused the API key ({r.status_code}): pass --api-key")
    if r.status_code != 200:
        raise TargetError(f"endpoint {base}/v1/models answered {r.status_code}: {r.text[:200]}")
    try:
        return list(r.json()["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"endpoint {base}/v1/models did not answer an OpenAI model list") from exc


async def is_thor_server(url: str, *, api_key: str | None) -> bool:
    """Whether the endpoint is a THOR server (its `/v1/models` says `owned_by: "thor"`)."""
    async with httpx.AsyncClient(base_url=_base(url), headers=_headers(api_key), timeout=30) as c:
        return any(m.get("owned_by") == "thor" for m in await _served_models(c))


@contextlib.asynccontextmanager
async def open_endpoint(
    url: str, *, api_key: str | None, model: str | None, kind: str = "auto", timeout_s: float = 1800.0
) -> AsyncIterator[ThorServerTarget | ChatTarget]:
    """Connect to an endpoint, check it answers, pick its model, and tell a THOR server from others.

    `kind`: "thor" (the loop runs server-side), "chat" (plain CoT), or "auto" (a THOR server
    says so in `GET /v1/models` with `owned_by: "thor"`; anything else gets plain chat)."""
    base = _base(url)
    timeout = httpx.Timeout(timeout_s, connect=10)
    async with httpx.AsyncClient(base_url=base, headers=_headers(api_key), timeout=timeout) as c:
        t0 = time.monotonic()
        models = await _served_models(c)
        ids = [m.get("id") for m in models]
        if model is None:
            if not ids:
                raise TargetError(f"endpoint {base} serves no model")
            model = ids[0]
        elif model not in ids:
            raise TargetError(f"endpoint {base} does not serve model {model!r}; it serves: {', '.join(map(str, ids))}")
        owner = next((m.get("owned_by") for m in models if m.get("id") == model), None)
        if kind == "auto":
            kind = "thor" if owner == "thor" else "chat"
        log.info("endpoint %s: model %s (%s), answered in %.2fs", base, model, kind, time.monotonic() - t0)
        target: ThorServerTarget | ChatTarget = (ThorServerTarget if kind == "thor" else ChatTarget)(c, model)
        yield target
