"""A scripted generation backend for deterministic unit tests of the decoder loop.

Owns: replaying the continuation a test's `responder` returns for each request,
token by token with a real tokenizer, with vLLM's semantics for stop strings
(checked on the detokenised text, kept in the output, generation ends with the
token that completes one), `max_tokens`, EOS and aborts. It records every
request so tests can inspect prompts, parameters and aborts. When a request asks
for log-probabilities (`GenParams.logprobs`), each token comes with vLLM's shape,
`{token id: Logprob}`, holding `scripted_logprob(token id)`: a value a test can
recompute from the id alone, so any misalignment of ids and log-probs shows.

Does not own: anything a production path uses. It is never a default: the
server and CLI build only the vLLM backend.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from thor_engine.backend import GenChunk, GenParams

Responder = Callable[[str], str]


@dataclass(frozen=True)
class ScriptedLogprob:
    """vLLM's `Logprob` shape: the decoder reads `.logprob`."""

    logprob: float
    rank: int = 1
    decoded_token: str | None = None


def scripted_logprob(token_id: int) -> float:
    """The log-probability the scripted "model" reports for sampling `token_id` (in [-1.0, -0.001])."""
    return -(1 + token_id % 1000) / 1000


@dataclass
class ScriptedRequest:
    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str
    params: GenParams
    aborted: bool = False
    finished: bool = False
    output_text: str = ""


@dataclass
class ScriptedBackend:
    """`responder(prompt_text) -> continuation`: the text "the model" writes next (EOS appended)."""

    tokenizer: Any
    responder: Responder
    max_model_len: int = 8192
    delay_s: float = 0.0
    requests: list[ScriptedRequest] = field(default_factory=list)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({self.tokenizer.eos_token_id})

    async def generate(
        self, prompt_token_ids: list[int], params: GenParams, request_id: str
    ) -> AsyncIterator[GenChunk]:
        prompt_text = self.tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
        req = ScriptedRequest(request_id, list(prompt_token_ids), prompt_text, params)
        self.requests.append(req)
        ids = self.tokenizer.encode(self.responder(prompt_text), add_special_tokens=False)
        ids.append(self.tokenizer.eos_token_id)
        want_lp = params.logprobs is not None
        text_so_far = ""
        emitted = 0
        try:
            for i, tid in enumerate(ids):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                else:
                    await asyncio.sleep(0)
                full = self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
                delta = full[len(text_so_far) :]
                n = i + 1
                cached = 0 if emitted == 0 else None
                lp = [{tid: ScriptedLogprob(scripted_logprob(tid))}] if want_lp else None
                if tid == self.tokenizer.eos_token_id:
                    req.finished = True
                    yield GenChunk([tid], "", True, "stop", None, cached, lp)
                    return
                for stop in params.stop:
                    pos = full.find(stop, max(0, len(text_so_far) - len(stop)))
                    if pos >= 0:
                        cut = full[: pos + len(stop)] if params.include_stop_str_in_output else full[:pos]
                        req.finished = True
                        req.output_text = cut
                        yield GenChunk([tid], cut[len(text_so_far) :], True, "stop", stop, cached, lp)
                        return
                text_so_far = full
                req.output_text = full
                done = n >= params.max_tokens
                yield GenChunk([tid], delta, done, "length" if done else None, None, cached, lp)
                emitted += 1
                if done:
                    req.finished = True
                    return
        finally:
            if not req.finished:
                req.aborted = True

    def check_structured_outputs(self, structured: Any) -> None:
        """A script has no grammar: any constraint is accepted (and not enforced)."""

    async def abort(self, request_id: str) -> None:
        for r in self.requests:
            if r.request_id == request_id and not r.finished:
                r.aborted = True

    async def num_unfinished_requests(self) -> int:
        return sum(1 for r in self.requests if not r.finished and not r.aborted)
