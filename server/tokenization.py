"""`POST /tokenize` and `POST /detokenize`, as vLLM's server names and shapes them.

Owns: the two routes, their requests (`TokenizeRequest`, `DetokenizeRequest`) (authenticated like /v1: they run the model's tokenizer; each request
counted against its client's rate limits before any work) and their answers: `count`,
`max_model_len`, `tokens` (and `token_strs` on request) for /tokenize, `prompt` for
/detokenize, serialised off the event loop. Inputs longer than the context are 400s as vLLM
answers them (`context_length_exceeded` naming `prompt` or `messages`; `tokens` for
/detokenize), refused by their length alone before any tokeniser runs when they cannot fit.
Chat messages are rendered by the model's template exactly as sent (THOR adds its
instructions only when it generates).
Does not own: tokenisation itself (`ThorEngine.tokenize` / `detokenize`, on its render
thread, which also bounds their inputs), rate limits (admission/guards.py) or the chat messages' shape (chat/protocol.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Depends
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.admission.guards import rate_limiter, v1_router
from server.admission.limits import check_model_name
from server.chat.protocol import ChatMessage
from server.errors import ApiError
from server.state import StateDep
from thor_engine.engine import InvalidParameter, PromptTooLong


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: `prompt` (raw text) or `messages` (rendered by the chat template as
    given, without THOR's instructions), never both."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # vLLM's defaults: special tokens for raw text, none on top of the template for messages
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either `prompt` (text) or `messages` (a conversation), not both or neither")
        if self.continue_final_message and self.add_generation_prompt and self.messages is not None:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        if self.prompt is not None and (self.continue_final_message or self.chat_template_kwargs):
            raise ValueError("continue_final_message and chat_template_kwargs apply to `messages` only")
        return self

    def chat_messages(self) -> list[dict[str, Any]] | None:
        if self.messages is None:
            return None
        return [m.for_template() for m in self.messages]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=1)


async def _json(answer: dict[str, Any]) -> Response:
    """`answer` as a JSON response, encoded on a worker thread (an answer of many tokens is big)."""
    body = await asyncio.to_thread(lambda: json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode())
    return Response(body, media_type="application/json")


router = v1_router()


@router.post("/tokenize", dependencies=[Depends(rate_limiter)])
async def tokenize(body: TokenizeRequest, state: StateDep) -> Response:
    check_model_name(state, body.model)
    messages = body.chat_messages()
    add_special = body.add_special_tokens if body.add_special_tokens is not None else messages is None
    try:
        ids, strs = await state.engine.tokenize(
            text=body.prompt,
            messages=messages,
            add_special_tokens=add_special,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs,
            return_token_strs=body.return_token_strs,
        )
    except PromptTooLong as exc:
        param = "prompt" if messages is None else "messages"
        raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from exc
    except InvalidParameter as exc:  # the chat template refused the conversation, bad template kwargs
        raise ApiError(400, str(exc), param=exc.param) from exc
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}
    if strs is not None:
        answer["token_strs"] = strs
    return await _json(answer)


@router.post("/detokenize", dependencies=[Depends(rate_limiter)])
async def detokenize(body: DetokenizeRequest, state: StateDep) -> Response:
    check_model_name(state, body.model)
    try:
        return await _json({"prompt": await state.engine.detokenize(body.tokens)})
    except InvalidParameter as exc:  # more ids than the context, ids outside the vocabulary
        raise ApiError(400, str(exc), param=exc.param) from exc
