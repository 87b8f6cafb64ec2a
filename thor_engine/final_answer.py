"""The constrained final answer: a structured answer after tool-integrated reasoning.

Owns: `FinalAnswer`, what the decoder does once a trajectory ends by itself (phase 2): it
continues the same token trajectory with a short instruction (injected text, as observations
are) and generates the answer under a structured-output constraint (vLLM's
`StructuredOutputsParams` fields: a JSON schema, a non-empty JSON object, or a forced function call's
schema); and the instructions for those three shapes. With the tools off there is no phase 1:
the constrained answer is the whole output, as plain structured generation.

Does not own: running either phase (decoder.py), the constraint's enforcement (vLLM's
structured outputs, xgrammar on CPU), or how a server shows the answer (content, tool calls).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from thor_engine.function_calls import forced_call_schema


class FinalAnswer(BaseModel):
    """Phase 2 of a request: after the loop, `instruction` is injected and the answer is generated
    under `structured_outputs`. Phase 2 runs only when phase 1 ended by the model's own stop (not by
    max_tokens, the context, a budget or an abort); its tokens count in usage and the request's budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: vLLM's structured-output constraint, e.g. {"json": schema}
    structured_outputs: dict[str, Any]
    #: text injected after the model's reasoning (its end-of-turn token dropped), before the answer
    instruction: str = ""
    #: stop strings that end the turn without an answer phase (a client function call's closing tag)
    not_after: tuple[str, ...] = ()


def _compact(schema: Any) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


#: The constraint for a `json_object` answer: any JSON object with at least one member, its names not
#: empty. After a worked solution `{}` is never the answer, yet under a grammar with no free whitespace
#: the default model closed the brace at once (instructor's JSON mode, whose schema is in the system
#: message), and with one member required it wrote `{"":{"answer":56211}}`: names must be written.
#:
#: The instructions end by opening a ```json block, as the model opens JSON itself, and ask for one line
#: (the grammar allows no free whitespace). Measured on the default model after a worked solution
#: (vLLM, greedy, this constraint): "Final answer, as a JSON object:" gave the schema of instructor's
#: system message, `{".value":56211}` and `{".0":15}`; this wording gave `{"answer":56211}` (instructor),
#: `{"answer":56211}` and `{"answer":15}`.
NON_EMPTY_OBJECT: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": True,
    "propertyNames": {"minLength": 1},
}


def json_answer(schema: Mapping[str, Any] | None, *, name: str | None = None) -> FinalAnswer:
    """A JSON answer: matching `schema` (a `response_format` json_schema), or any non-empty JSON object."""
    if schema is None:
        return FinalAnswer(
            structured_outputs={"json": copy.deepcopy(NON_EMPTY_OBJECT)},  # callers may mutate theirs
            instruction="\n\nFinal answer, as one line of JSON:\n```json\n",
        )
    label = f" `{name}`" if name else ""
    return FinalAnswer(
        structured_outputs={"json": dict(schema)},
        instruction=f"\n\nFinal answer, as one line of JSON matching the schema{label} {_compact(schema)}:\n```json\n",
    )


def call_answer(
    tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any], parallel_tool_calls: bool | None = None
) -> FinalAnswer:
    """A forced function call as the answer (`tool_choice` "required" or a named function): the
    constraint is the one vLLM forces (`forced_call_schema`), the instruction names the function(s)."""
    schema = forced_call_schema(tools, choice, parallel_tool_calls)
    if isinstance(choice, Mapping):
        name = choice["function"]["name"]
        instruction = f"\n\nFinal answer: the arguments of the function `{name}`, as JSON {_compact(schema)}:\n"
    else:
        names = ", ".join(f"`{t['function']['name']}`" for t in tools)
        instruction = (
            f"\n\nFinal answer: the function call, as a JSON list of "
            f'{{"name": ..., "parameters": {{...}}}} objects (functions: {names}):\n'
        )
    return FinalAnswer(structured_outputs={"json": schema}, instruction=instruction)
