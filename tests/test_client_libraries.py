"""The client libraries people build on, pointed at the shared `make serve`-like server (default
model, THOR on, nothing else changed: base_url and any key), each asked "What is 123*457?" and
checked by the library's own parsed result, not by a 200.

- pydantic-ai: `Agent(output_type=int)` on its chat-completions model (it forces a call to its
  `final_result` tool: THOR's loop runs, then the call is generated under the tool's schema);
- instructor: JSON mode (`response_format`) and TOOLS mode (a named forced function);
- LangChain `ChatOpenAI`: `with_structured_output` (json_schema);
- the OpenAI Agents SDK: `CodeInterpreterTool` through the Responses API.

The OpenAI SDK's own `parse` helpers on both APIs are in tests/test_structured_answers.py.

Measured on 2026-12-07 (`pytest -m "" tests/test_client_libraries.py`): pydantic-ai, instructor
TOOLS, LangChain and the Agents SDK pass; instructor's JSON mode does not yet: with THOR on its
answer is generated under `json_object` after the loop, and the default model (0.5B) wrote `{}`,
then (one member required) `{"":{"answer":56211}}`, then (names required) the schema from
instructor's system message instead of an instance. That case is issue 23's open item.

Marked `long` for now (`make test-long` runs it): about 150 s on a slow day, which `make test` cannot
take yet inside CI's limit (docs/testing.md); it joins `make test` with issue 23's close, against
cuts elsewhere.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from pydantic import BaseModel

from thor_engine.models.provision import PRESETS

pytestmark = [pytest.mark.vllm, pytest.mark.sandbox, pytest.mark.slow, pytest.mark.long]

MODEL = PRESETS["default"].name
QUESTION = "What is 123*457? Use Python."
ANSWER = 123 * 457


class Product(BaseModel):
    answer: int


@pytest.fixture(scope="module")
def base_url(default_server) -> str:
    return default_server.url + "/v1"


def test_pydantic_ai_output_type_int(base_url):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=base_url, api_key="any"))
    agent = Agent(model, output_type=int, model_settings={"temperature": 0, "max_tokens": 400})
    result = agent.run_sync(QUESTION)
    assert result.output == ANSWER, result.all_messages()


@pytest.mark.parametrize("mode", ["JSON", "TOOLS"])
def test_instructor_response_model(base_url, mode):
    import instructor

    client = instructor.from_openai(
        openai.OpenAI(base_url=base_url, api_key="any", max_retries=0, timeout=300), mode=getattr(instructor.Mode, mode)
    )
    product = client.chat.completions.create(
        model=MODEL,
        response_model=Product,
        max_retries=0,  # instructor's own retry: a first answer that does not parse must fail the test
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=400,
    )
    assert isinstance(product, Product) and product.answer == ANSWER  # instructor returns a subclass


def test_langchain_with_structured_output(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=base_url, api_key="any", temperature=0, max_tokens=400, max_retries=0)
    product = llm.with_structured_output(Product, method="json_schema").invoke(QUESTION)
    assert product == Product(answer=ANSWER)


def test_openai_agents_code_interpreter_through_responses(base_url):
    from agents import Agent, CodeInterpreterTool, OpenAIResponsesModel, RunConfig, Runner

    client = openai.AsyncOpenAI(base_url=base_url, api_key="any", max_retries=0, timeout=300)
    agent = Agent(
        name="calculator",
        instructions="Answer with the number only.",
        model=OpenAIResponsesModel(model=MODEL, openai_client=client),
        tools=[CodeInterpreterTool(tool_config={"type": "code_interpreter", "container": {"type": "auto"}})],
    )
    result = asyncio.run(Runner.run(agent, QUESTION, run_config=RunConfig(tracing_disabled=True)))
    assert str(ANSWER) in result.final_output.replace(",", ""), result.final_output
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds, kinds  # the code interpreter call the server ran
