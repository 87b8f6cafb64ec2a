"""The client libraries people build on, pointed at the shared `make serve`-like server (default
model, THOR on, nothing else changed: base_url and any key), each asked "What is 123*457?" and
checked by the library's own parsed result, not by a 200.

- pydantic-ai: `Agent(output_type=int)` on its chat-completions model (it forces a call to its
  `final_result` tool: THOR's loop runs, then the call is generated under the tool's schema);
- instructor: JSON mode (`response_format` json_object, its schema in the system message) and
  TOOLS mode (a named forced function: `tool_calls`, no content, `finish_reason` stop);
- LangChain `ChatOpenAI`: `with_structured_output` (json_schema);
- the OpenAI Agents SDK: `CodeInterpreterTool` through the Responses API.

The OpenAI SDK's own `parse` helpers on both APIs are in tests/test_structured_answers.py.

Each asserts the library's own parsed result (56211, computed by code the sandbox ran), not only a
200. In `make test`: the files that share the default-model server run on one worker
(tests/conftest.py), so this file costs its requests only (about 150 s on a slow day).
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from pydantic import BaseModel

from thor_engine.models.provision import PRESETS

pytestmark = [pytest.mark.vllm, pytest.mark.sandbox, pytest.mark.slow]

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
    product, completion = client.chat.completions.create_with_completion(
        model=MODEL,
        response_model=Product,
        max_retries=0,  # instructor's own retry: a first answer that does not parse must fail the test
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=400,
    )
    assert isinstance(product, Product) and product.answer == ANSWER  # instructor returns a subclass
    message = completion.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content") or ""
    assert "```python" in reasoning and "56211" in reasoning, reasoning[-500:]  # the code ran before the answer
    if mode == "TOOLS":  # a named forced function (tool_choice {"function": {"name": "Product"}}), as OpenAI answers it
        (call,) = message.tool_calls
        assert call.function.name == "Product" and message.content is None
        assert completion.choices[0].finish_reason == "stop"


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
