"""`POST /tokenize` and `POST /detokenize`, as vLLM's server names and shapes them.

Owns: the two routes (authenticated like /v1: they run the model's tokenizer) and their
answers: `count`, `max_model_len`, `tokens` (and `token_strs` on request) for /tokenize,
`prompt` for /detokenize. Chat messages are rendered by the model's template exactly as
sent (THOR adds its instructions only when it generates).
Does not own: tokenisation itself (`ThorEngine.tokenize` / `detokenize`, on its render
thread) or request shapes (protocol.py).
"""

from __future__ import annotations

from typing import Any

from thor_engine.engine import InvalidParameter

from ..checks import check_model_name
from ..errors import ApiError
from ..guards import v1_router
from ..protocol import DetokenizeRequest, TokenizeRequest
from ..state import StateDep

router = v1_router()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: StateDep) -> dict[str, Any]:
    check_model_name(state, body.model)
    messages = body.chat_messages()
    add_special = body.add_special_tokens if body.add_special_tokens is not None else messages is None
    try:
        ids = await state.engine.tokenize(
            text=body.prompt,
            messages=messages,
            add_special_tokens=add_special,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs,
        )
    except InvalidParameter as exc:  # the chat template refused the conversation, bad template kwargs
        raise ApiError(400, str(exc), param=exc.param) from exc
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}
    if body.return_token_strs:
        answer["token_strs"] = state.engine.token_strings(ids)
    return answer


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: StateDep) -> dict[str, Any]:
    check_model_name(state, body.model)
    try:
        return {"prompt": await state.engine.detokenize(body.tokens)}
    except InvalidParameter as exc:  # ids outside the vocabulary
        raise ApiError(400, str(exc), param=exc.param) from exc
