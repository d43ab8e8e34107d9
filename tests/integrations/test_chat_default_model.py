"""ChatICAE on the real default model (SmolLM2-135M-Instruct and the shipped ICAE): the standard
LangChain integration suite and an agent's tool loop, where a random tiny model cannot show
whether argument values are read from the question.

The store holds nothing, so recall finds no memory and the base model answers alone: while the
shipped ICAE's ``[FT]`` token is untrained, answers from slots are empty (see
benchmarks/results/slots_text_agreement.json), and these tests are about the chat contract and
the model's own tool calling, not about memory.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
from chat_suite import ChatICAESuite
from icmem.integrations.langchain import ChatICAE
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from icmem.pipeline import MemoryPipeline

pytestmark = pytest.mark.slow

NS = ("tests", "default-model")


@functools.cache
def default_pipeline() -> MemoryPipeline:
    return MemoryPipeline.open(tempfile.mkdtemp(prefix="icmem-default-chat-"), create=True)


class TestChatICAEDefaultModel(ChatICAESuite):
    @property
    def chat_model_params(self) -> dict:
        # room for a structured answer's strings to close (a cut one raises, see test_chat_tools)
        return {"pipeline": default_pipeline(), "namespace": NS, "max_tokens": 160}

    @pytest.mark.xfail(
        reason="SmolLM2-135M rarely calls a tool unprompted (tool_choice auto); see the free-call "
        "rate in benchmarks/results/tool_call_rate.json. Forced calls (tool_choice) always parse",
        strict=True,
    )
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(
        reason="greedy SmolLM2-135M keeps writing the joke's string past max_tokens=160; the cut "
        "answer raises OutputParserException naming max_tokens (as test_chat_tools checks), "
        "where LangChain's parser alone would have returned None",
        strict=True,
    )
    def test_structured_output_optional_param(self, model) -> None:
        super().test_structured_output_optional_param(model)


@tool
def get_weather(city: str) -> str:
    """Today's weather in a city."""
    return f"It is sunny in {city}."


def test_create_agent_completes_a_tool_call_on_the_default_model():
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def first_call_forced(request, handler):
        if not any(isinstance(m, ToolMessage) for m in request.messages):
            request = request.override(tool_choice="any")
        return handler(request)

    chat = ChatICAE(pipeline=default_pipeline(), namespace=NS, max_tokens=48)
    agent = create_agent(chat, tools=[get_weather], middleware=[first_call_forced])
    state = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
    call = state["messages"][1].tool_calls[0]
    assert call["name"] == "get_weather" and "paris" in call["args"]["city"].lower()
    assert isinstance(state["messages"][2], ToolMessage)
    assert isinstance(state["messages"][-1], AIMessage) and state["messages"][-1].content
