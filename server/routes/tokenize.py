"""`POST /tokenize` and `POST /detokenize`, as vLLM's server names and shapes them.

Owns: the two routes (authenticated like /v1: they run the model's tokenizer; each request
counted against its client's rate limits before any work) and their answers: `count`,
`max_model_len`, `tokens` (and `token_strs` on request) for /tokenize, `prompt` for
/detokenize, serialised off the event loop. Inputs longer than the context are 400s as vLLM
answers them (`context_length_exceeded` naming `prompt` or `messages`; `tokens` for
/detokenize), refused by their length alone before any tokeniser runs when they cannot fit.
Chat messages are rendered by the model's template exactly as sent (THOR adds its
instructions only when it generates).
Does not own: tokenisation itself (`ThorEngine.tokenize` / `detokenize`, on its render
thread, which also bounds their inputs), rate limits (guards.py) or request shapes (protocol.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Depends
from fastapi.responses import Response

from thor_engine.engine import InvalidParameter, PromptTooLong

from ..checks import check_model_name
from ..errors import ApiError
from ..guards import rate_limiter, v1_router
from ..protocol import DetokenizeRequest, TokenizeRequest
from ..state import StateDep

router = v1_router()


async def _json(answer: dict[str, Any]) -> Response:
    """`answer` as a JSON response, encoded on a worker thread (an answer of many tokens is big)."""
    body = await asyncio.to_thread(lambda: json.dumps(answer, ensure_ascii=False, separators=(",", ":")).encode())
    return Response(body, media_type="application/json")


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
