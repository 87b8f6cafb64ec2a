"""A `GenerationBackend` over an OpenAI-compatible `/v1/completions` endpoint (plain vLLM, a THOR server).

Owns: `CompletionsBackend`, which lets the THOR decoder (`thor_engine`) run client-side
against a server that only generates: each engine request of the decoder becomes one
streaming `POST /v1/completions` whose prompt is the token ids (`prompt: [ids]`), with
every `GenParams` field mapped onto the request (OpenAI's fields and vLLM's extra sampling
fields), and whose output token ids are recovered exactly with vLLM's `return_token_ids`
(vLLM >= 0.10.2; our THOR server's plain completions too): `token_ids` in each stream
chunk's choice, `prompt_token_ids` in the first. Closing a stream aborts the request (vLLM
aborts a request whose client disconnects). Finish reasons map onto `GenChunk`'s
(`stop`, `length`, `abort`), `stop_reason` passes through. `CompletionsBackend.open`
checks the endpoint before anything runs: it answers, serves the model, reports its
context length (`max_model_len` in `/v1/models`, or a given one), returns token ids, and
tokenises text as the local tokenizer does.

Errors: `TargetError` (targets.py) when the endpoint cannot serve this loop at all
(unreachable, refused key, unknown model, another tokenizer), its subclass
`ClientLoopUnavailable` when the endpoint works but not for this loop (no token ids, no
completions API, no tokenizer given or found: plain chat may still serve CoT); `InvalidParameter`
when it refuses one request's value (a 400); `EndpointError` when one request failed
server-side (a 5xx, an error event in the stream): that sample fails, the run goes on.

Does not own: the TIR loop (thor_engine.decoder), the target that runs it (client_loop.py),
or which tokenizer to use (the caller gives a local path or hub id; without one, the endpoint's
model path when it is a directory on this machine).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

import httpx

from thor_engine.backend import EngineUnavailable, GenChunk, GenParams, InvalidParameter
from thor_engine.backends.vllm_backend import engine_seed

from .targets import TargetError, _served_models

__all__ = [
    "NO_TOKEN_IDS",
    "ClientLoopUnavailable",
    "CompletionsBackend",
    "EndpointError",
    "base_url",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

NO_TOKEN_IDS = (
    "this endpoint does not support return_token_ids (vLLM >= 0.10.2 does): use --endpoint-kind chat for plain CoT"
)

#: Text whose tokenisation the endpoint and the local tokenizer must agree on (think tags, digits, LaTeX, code,
#: non-ASCII).
TOKENIZER_PROBE = "<think>Tokenizer check: 12345 * 678 = \\boxed{8369910}.</think>\n```python\nprint('ü', 3.14)\n```\n"

_FINISH: dict[str, Literal["stop", "length", "abort"]] = {"stop": "stop", "length": "length", "abort": "abort"}


class ClientLoopUnavailable(TargetError):
    """The endpoint answers but cannot run the client-side loop: it returns no token ids, has no
    completions API, or no tokenizer is at hand. Plain chat (CoT) may still work there."""


class EndpointError(RuntimeError):
    """One request failed on the endpoint (a 5xx, an error event in the stream): one sample fails."""


def base_url(url: str) -> str:
    """The server root of an endpoint URL (`http://host:8000/v1` and `http://host:8000` are the same)."""
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def load_tokenizer(path: str) -> tuple[Any, frozenset[int]]:
    """A Hugging Face tokenizer from a local directory (or a hub id) and the token ids that end
    generation: the tokenizer's EOS plus the checkpoint's `eos_token_id`s (config.json,
    generation_config.json), as vLLM stops on them."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TargetError(
            f"could not load a tokenizer from {path!r} ({type(exc).__name__}: {exc}): pass --tokenizer with the "
            "served model's directory or preset"
        ) from exc
    eos: set[int] = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for load in (AutoConfig.from_pretrained, GenerationConfig.from_pretrained):
        try:
            value = getattr(load(path), "eos_token_id", None)
        except (OSError, ValueError):  # a tokenizer-only directory has neither file
            continue
        eos.update([value] if isinstance(value, int) else [v for v in value or () if isinstance(v, int)])
    if not eos:
        raise TargetError(f"the tokenizer at {path!r} has no EOS token: the decoder cannot tell where a sample ends")
    return tok, frozenset(eos)


def _error_message(r: httpx.Response) -> tuple[str, str | None]:
    """An OpenAI / vLLM error body's message and param (or the raw text)."""
    try:
        data = r.json()
    except ValueError:
        return r.text[:300], None
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err)[:500], err.get("param")
    return str(err)[:500], None


class CompletionsBackend:
    """`GenerationBackend` over `/v1/completions` with token ids. Create with `CompletionsBackend.open(...)`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        model: str,
        tokenizer: Any,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._eos = eos_token_ids
        # fields added to every request (an endpoint's own options); the sampling fields take precedence
        self.extra_body = dict(extra_body or {})
        self._live: set[str] = set()
        self._aborted: set[str] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        tokenizer: str | None,
        api_key: str | None = None,
        model: str | None = None,
        max_model_len: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout_s: float = 1800.0,
        max_connections: int = 256,
    ) -> AsyncIterator[CompletionsBackend]:
        """Connect, pick the model, and check the endpoint can run the client-side loop (see the module doc).

        `tokenizer`: a local directory or hub id with the served model's tokenizer (None: the endpoint's
        model path, where it is a directory on this machine, as `vllm serve <dir>` reports it).
        `max_model_len`: the context length when the endpoint does not report one (else the smaller)."""
        base = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        ) as client:
            entry = await _model_entry(client, base, model)
            served = str(entry["id"])
            reported = entry.get("max_model_len")
            lengths = [int(v) for v in (reported, max_model_len) if isinstance(v, int) and v > 0]
            if not lengths:
                raise TargetError(
                    f"endpoint {base} does not report its context length (max_model_len in /v1/models): "
                    "pass max_model_len (--max-model-len)"
                )
            tok, eos = load_tokenizer(tokenizer or _local_model_dir(entry, base))
            backend = cls(client, served, tok, min(lengths), eos, extra_body)
            await backend._probe(base)
            log.info(
                "endpoint %s: model %s, context %d, client-side loop over /v1/completions", base, served, min(lengths)
            )
            yield backend

    async def _probe(self, base: str) -> None:
        """One 1-token completion of a text prompt: token ids come back, and the endpoint's tokenisation
        of the prompt equals the local tokenizer's (with or without the special tokens it adds)."""
        body = {
            **self.extra_body,
            "model": self.model,
            "prompt": TOKENIZER_PROBE,
            "max_tokens": 1,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        r = await self._post(base, body)
        choice = (r.get("choices") or [{}])[0]
        if choice.get("token_ids") is None or choice.get("prompt_token_ids") is None:
            raise ClientLoopUnavailable(f"{base}: {NO_TOKEN_IDS}")
        remote = list(choice["prompt_token_ids"])
        local = [self._tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=s) for s in (True, False)]
        if remote not in local:
            raise TargetError(
                f"the local tokenizer does not tokenise text as endpoint {base} does (model {self.model}): "
                f"endpoint {remote[:12]}..., local {local[1][:12]}...; pass --tokenizer with the served model's "
                "directory or preset"
            )

    async def _post(self, base: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post("/v1/completions", json=body)
        except httpx.TransportError as exc:
            raise TargetError(f"endpoint {base} is unreachable: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise self._http_error(r)
        return r.json()

    def _http_error(self, r: httpx.Response) -> Exception:
        message, param = _error_message(r)
        where = f"{self.client.base_url}/v1/completions"
        if r.status_code == 400 and (param == "return_token_ids" or "return_token_ids" in message):
            return ClientLoopUnavailable(f"{where}: {NO_TOKEN_IDS} (it answered: {message})")
        if r.status_code in (401, 403):
            return TargetError(f"{where} refused the API key ({r.status_code}): pass --api-key ({message})")
        if r.status_code in (404, 405):
            return ClientLoopUnavailable(
                f"{where} answered {r.status_code} ({message}): no completions API for model {self.model}; "
                "use --endpoint-kind chat for plain CoT"
            )
        if r.status_code == 400:
            return InvalidParameter(param, f"{where} refused the request: {message}")
        return EndpointError(f"{where} answered {r.status_code}: {message}")

    # --- GenerationBackend -------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def request_body(self, prompt_token_ids: list[int], params: GenParams) -> dict[str, Any]:
        """The `/v1/completions` body of one engine request. The sampling fields a checkpoint's
        generation_config.json may default (temperature, top_p, top_k, min_p, penalties) are always
        sent, so the endpoint's defaults never change a sample; the others only where not neutral."""
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "prompt": list(prompt_token_ids),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k > 0 else -1,
            "min_p": params.min_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "include_stop_str_in_output": params.include_stop_str_in_output,
            "stream": True,
            "return_token_ids": True,
        }
        if params.seed is not None:
            body["seed"] = engine_seed(params.seed)
        if params.stop:
            body["stop"] = list(params.stop)
        if params.min_tokens:
            body["min_tokens"] = min(params.min_tokens, params.max_tokens)
        if params.logit_bias:
            body["logit_bias"] = {str(t): float(b) for t, b in params.logit_bias.items()}
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.ignore_eos:
            body["ignore_eos"] = True
        if not params.skip_special_tokens:
            body["skip_special_tokens"] = False
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
            body["return_tokens_as_token_ids"] = True  # top_logprobs keyed "token_id:N"
        return body

    def check_structured_outputs(self, structured: Mapping[str, Any]) -> None:
        """The client-side loop sends no structured-output constraint: refused, named."""
        raise InvalidParameter(
            "structured_outputs", "a constrained answer needs the engine in process or a THOR server, not this loop"
        )

    async def generate(
        self, prompt_token_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[GenChunk]:
        """Stream one request. Closing this iterator closes the HTTP stream, which aborts it server-side."""
        if params.structured_outputs:
            self.check_structured_outputs(params.structured_outputs)
        body = self.request_body(prompt_token_ids, params)
        self._live.add(request_id)
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise self._http_error(r)
                async for event in _sse_events(r):
                    for choice in event.get("choices") or ():
                        yield self._chunk(choice)
                    if request_id in self._aborted:
                        yield GenChunk(token_ids=[], text="", finished=True, finish_reason="abort")
                        return
        except httpx.TransportError as exc:
            raise TargetError(
                f"endpoint {self.client.base_url} stopped answering: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._live.discard(request_id)
            self._aborted.discard(request_id)

    def _chunk(self, choice: dict[str, Any]) -> GenChunk:
        ids = choice.get("token_ids")
        if ids is None:
            raise ClientLoopUnavailable(f"{self.client.base_url}: {NO_TOKEN_IDS}")
        reason = choice.get("finish_reason")
        finished = reason is not None
        return GenChunk(
            token_ids=[int(t) for t in ids],
            text=choice.get("text") or "",
            finished=finished,
            # other servers' reasons (content_filter...) end the request without a usable stop: an abort
            finish_reason=_FINISH.get(reason, "abort") if finished else None,
            stop_reason=choice.get("stop_reason") if finished else None,
            logprobs=_logprobs(choice.get("logprobs"), ids),
        )

    async def abort(self, request_id: str) -> None:
        """Abort a running request: its stream ends (and closes) at the next event it receives."""
        if request_id in self._live:
            self._aborted.add(request_id)

    async def num_unfinished_requests(self) -> int:
        """Requests this client still has open streams for."""
        return len(self._live)

    async def check_health(self) -> None:
        try:
            r = await self.client.get("/health")
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"endpoint {self.client.base_url} is unreachable: {exc}") from exc
        if r.status_code != 200:
            raise EngineUnavailable(f"endpoint {self.client.base_url}/health answered {r.status_code}")

    @property
    def model_path(self) -> str:
        """The model's name on the endpoint (what requests send)."""
        return self.model


async def _model_entry(client: httpx.AsyncClient, base: str, model: str | None) -> dict[str, Any]:
    """The endpoint's `/v1/models` entry of `model` (None: the first it serves)."""
    entries = [m for m in await _served_models(client) if isinstance(m, dict) and "id" in m]
    if not entries:
        raise TargetError(f"endpoint {base} serves no model")
    if model is None:
        return entries[0]
    for m in entries:
        if model in (m["id"], m.get("root")):
            return m
    served = ", ".join(str(m["id"]) for m in entries)
    raise TargetError(f"endpoint {base} does not serve model {model!r}; it serves: {served}")


def _local_model_dir(entry: dict[str, Any], base: str) -> str:
    for name in (entry.get("root"), entry.get("id")):
        if isinstance(name, str) and Path(name).is_dir():
            return name
    raise ClientLoopUnavailable(
        f"endpoint {base} serves {entry['id']!r}, which is not a model directory on this machine: pass --tokenizer "
        "(the served model's directory or preset) so the client-side loop can tokenise"
    )


async def _sse_events(r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON `data:` events of a server-sent-event stream, up to `[DONE]`; an error event raises."""
    data: list[str] = []
    async for line in r.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
            continue
        if line or not data:  # comments (`: keep-alive`), other fields, blank lines between events
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict) and ("error" in event or event.get("object") == "error"):
            err = event.get("error", event)
            message = err.get("message", err) if isinstance(err, dict) else err
            raise EndpointError(f"{r.url} failed mid-stream: {message}")
        yield event
    if data and "\n".join(data) != "[DONE]":
        raise EndpointError(f"{r.url}: the stream ended inside an event")


def _logprobs(lp: dict[str, Any] | None, ids: list[int]) -> list[dict[int, Any]] | None:
    """vLLM's `return_tokens_as_token_ids` logprobs (top_logprobs keyed `token_id:N`) as the engine's
    per-token {token id: logprob}, the sampled token included."""
    if not lp:
        return None
    out: list[dict[int, Any]] = []
    tops = lp.get("top_logprobs") or [None] * len(ids)
    own = lp.get("token_logprobs") or [None] * len(ids)
    for tid, top, value in zip(ids, tops, own, strict=False):
        entry = {_token_id(k): float(v) for k, v in (top or {}).items() if _token_id(k) is not None}
        if value is not None:
            entry.setdefault(int(tid), float(value))
        out.append(entry)  # type: ignore[arg-type]
    return out


def _token_id(key: str) -> int | None:
    prefix = "token_id:"
    if key.startswith(prefix) and key[len(prefix) :].lstrip("-").isdigit():
        return int(key[len(prefix) :])
    return None
