"""ChatICAE with tools: forced calls and structured output always parse (schema-constrained
decoding), free answers are parsed for calls, and create_agent runs a tool loop."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from icmem.integrations.langchain import ChatICAE
from icmem.integrations.langchain.tool_calls import normalise_choice, parse_free
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel
from test_langchain import NS, shared_pipeline
from tiny_models import tiny_tokenizer

from icmem.constrained import ConstraintError, JsonConstraint

CALLS: list[dict] = []


@tool
def set_alarm(day: Literal["monday", "friday"], loud: bool) -> str:
    """Set an alarm for a day."""
    CALLS.append({"day": day, "loud": loud})
    return f"alarm set for {day}"


@tool
def lights(on: bool) -> str:
    """Switch the lights."""
    return "ok"


class Verdict(BaseModel):
    """A yes/no verdict with a level."""

    verdict: Literal["yes", "no"]
    level: Literal["low", "high"]
    sure: bool


def chat(**kwargs) -> ChatICAE:
    settings = {"max_tokens": 128, **kwargs}  # the tiny tokenizer spends a token per character
    return ChatICAE(pipeline=shared_pipeline(), namespace=NS, k=1, **settings)


@pytest.mark.parametrize("seed", range(4))
def test_constrained_decoding_gives_valid_json_from_random_logits(seed):
    tokenizer = tiny_tokenizer()
    schema = Verdict.model_json_schema()
    constraint = JsonConstraint(schema, tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(80):
        logits = constraint.mask_(torch.randn(len(tokenizer), generator=generator))
        token = int(logits.argmax())
        constraint.accept(token)
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    assert constraint.finished
    Verdict.model_validate_json(tokenizer.decode(out))  # raises if the value does not fit


def test_a_token_outside_the_schema_is_refused():
    tokenizer = tiny_tokenizer()
    constraint = JsonConstraint({"type": "boolean"}, tokenizer, len(tokenizer), [2])
    with pytest.raises(ConstraintError, match="does not fit the schema"):
        constraint.accept(tokenizer.convert_tokens_to_ids("{"))


def test_forced_tool_call_always_parses_and_runs():
    model = chat().bind_tools([set_alarm, lights], tool_choice="set_alarm")
    message = model.invoke("Wake me up on friday, loudly.")
    (call,) = message.tool_calls
    assert call["name"] == "set_alarm" and message.invalid_tool_calls == []
    assert set_alarm.invoke(call["args"]).startswith("alarm set for ")
    chunks = list(model.stream("Wake me up."))
    assert chunks[0].tool_call_chunks[0]["name"] == "set_alarm"


def test_any_choice_calls_one_of_the_tools():
    message = chat().bind_tools([set_alarm, lights], tool_choice="any").invoke("Lights off.")
    (call,) = message.tool_calls
    assert call["name"] in {"set_alarm", "lights"}


def test_structured_output_returns_the_schema():
    verdict = chat().with_structured_output(Verdict).invoke("Is Paris in France?")
    assert isinstance(verdict, Verdict)


@pytest.mark.parametrize("include_raw", [False, True])
def test_a_structured_answer_cut_by_max_tokens_raises_instead_of_returning_none(include_raw):
    structured = chat(max_tokens=3).with_structured_output(Verdict, include_raw=include_raw)
    with pytest.raises(OutputParserException, match=r"max_tokens=3: the call was cut short"):
        structured.invoke("Is Paris in France?")


def test_unknown_tool_choice_is_refused():
    with pytest.raises(ValueError, match=r"names no bound tool|not understood"):
        chat().bind_tools([lights], tool_choice="set_alarm")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("required", "any"),
        ("any", "any"),
        ("none", "none"),
        ({"type": "function", "function": {"name": "lights"}}, "lights"),
        ("lights", "lights"),
    ],
)
def test_tool_choice_spellings(choice, expected):
    assert normalise_choice(choice, [convert_to_openai_tool(lights)]) == expected


def test_free_answers_are_parsed_for_calls():
    tools = [convert_to_openai_tool(t) for t in (set_alarm, lights)]
    text = (
        'Sure. <tool_call>{"name": "lights", "arguments": {"on": true}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{"name": </tool_call>'
    )
    content, calls, invalid = parse_free(text, tools)
    assert content == "Sure."
    assert [(c["name"], c["args"]) for c in calls] == [("lights", {"on": True})]
    assert [i["error"].split(":")[0] for i in invalid] == ["unknown tool 'nope'", "not JSON"]


def test_tool_history_reaches_the_model_as_text(monkeypatch):
    pipeline = shared_pipeline()
    seen = []
    real = pipeline.prompt_cache.generate

    def spy(icae, memory, conversation, max_new_tokens, sampling, constraint=None):
        seen.append(conversation)
        return real(icae, memory, conversation, max_new_tokens, sampling, constraint)

    monkeypatch.setattr(pipeline.prompt_cache, "generate", spy)
    call = {"name": "lights", "args": {"on": True}, "id": "call_1", "type": "tool_call"}
    chat(max_tokens=2).bind_tools([lights]).invoke(
        [
            HumanMessage("Lights on."),
            AIMessage("", tool_calls=[call]),
            ToolMessage("ok", tool_call_id="call_1", name="lights"),
        ]
    )
    (conversation,) = seen
    assert "<tools>" in conversation[0]["content"] and conversation[0]["role"] == "system"
    assert json.loads(conversation[2]["content"][len("<tool_call>") : -len("</tool_call>")]) == {
        "name": "lights",
        "arguments": {"on": True},
    }
    assert conversation[3] == {"role": "user", "content": "<tool_response>\nok\n</tool_response>"}
    text, calls, invalid = parse_free(conversation[2]["content"], [convert_to_openai_tool(lights)])
    assert (text, [(c["name"], c["args"]) for c in calls], invalid) == (
        "",
        [("lights", {"on": True})],
        [],
    )


def test_create_agent_runs_a_tool_loop():
    """The agent's first model call is forced to call a tool (a 135M model rarely calls one
    unprompted); the tool runs, its result goes back to the model, and the agent ends."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def first_call_forced(request, handler):
        if not any(isinstance(m, ToolMessage) for m in request.messages):
            request = request.override(tool_choice="set_alarm")
        return handler(request)

    CALLS.clear()
    agent = create_agent(chat(), tools=[set_alarm], middleware=[first_call_forced])
    state = agent.invoke({"messages": [HumanMessage("Wake me on monday.")]})
    assert len(CALLS) >= 1
    kinds = [type(m).__name__ for m in state["messages"]]
    assert kinds[:3] == ["HumanMessage", "AIMessage", "ToolMessage"]
    assert isinstance(state["messages"][-1], AIMessage)
