"""How ChatICAE shows tools to the model and reads its calls back.

The tools' JSON schemas go inside ``<tools></tools>`` in the system prompt, a call is written as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (a JSON list of calls in one tag is
read too), and a tool's result comes back in ``<tool_response>`` tags (the template has no tool
role, so it is a user turn). A second layout closer to SmolLM2's function-calling data (one JSON
list of tools, calls as a list) was measured and dropped: free calls stayed at 0/12 and greedy
structured answers ran past ``max_tokens`` inside strings (benchmarks/results/
tool_call_rate_list_layout.json). A forced call (``tool_choice``) is decoded under a JSON schema
that admits exactly the allowed tools' calls, so it always parses; a free answer is parsed for
calls and anything malformed lands in ``invalid_tool_calls`` (see the README for the rates).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall
from langchain_core.messages.tool import invalid_tool_call

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def tools_prompt(tools: Sequence[Mapping[str, Any]], forced: bool) -> str:
    """The system-prompt section that lists ``tools`` (OpenAI tool dicts)."""
    schemas = "\n".join(json.dumps(t["function"]) for t in tools)
    how = (
        "Answer with only the call, as a JSON object"
        if forced
        else 'To call a tool, answer with only <tool_call>{"name": <tool name>, "arguments": '
        "<arguments>}</tool_call>; otherwise answer in plain text"
    )
    intro = "You can call these tools, described as JSON schemas:"
    return f"{intro}\n<tools>\n{schemas}\n</tools>\n{how}."


def forced_call_schema(tools: Sequence[Mapping[str, Any]], choice: str) -> dict[str, Any]:
    """A JSON schema whose values are exactly the calls ``choice`` allows: ``"any"`` (any of
    ``tools``) or one tool's name."""
    allowed = [t for t in tools if choice == "any" or t["function"]["name"] == choice]
    if not allowed:
        names = [t["function"]["name"] for t in tools]
        raise ValueError(f"tool_choice={choice!r} names no bound tool; bound tools: {names}")
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def normalise_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> str:
    """LangChain's spellings of ``tool_choice`` as ``"auto"``, ``"none"``, ``"any"`` or a name."""
    if tool_choice in (None, "auto"):
        return "auto"
    if tool_choice in ("any", "required") or tool_choice is True:
        return "any"
    if tool_choice == "none":
        return "none"
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if isinstance(name, str):
            tool_choice = name
    names = [t["function"]["name"] for t in tools]
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise ValueError(
        f"tool_choice={tool_choice!r} is not understood; use 'auto', 'none', 'any' or "
        f"'required', or the name of a bound tool ({names})"
    )


def parse_forced(text: str) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """The call a forced (schema-constrained) answer holds."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as error:  # cut by max_tokens before the value closed
        return [], [_invalid(text, f"the call was cut short ({error}); raise max_tokens")]
    return [_call(call["name"], call["arguments"])], []


def parse_free(
    text: str, tools: Sequence[Mapping[str, Any]]
) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split a free answer into its text and the calls it writes in ``<tool_call>`` tags."""
    names = {t["function"]["name"] for t in tools}
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for raw in TOOL_CALL.findall(text):
        try:
            found = json.loads(raw)
        except json.JSONDecodeError as error:
            invalid.append(_invalid(raw, f"not JSON: {error}"))
            continue
        for call in found if isinstance(found, list) else [found]:
            if not isinstance(call, dict) or not isinstance(call.get("arguments", {}), dict):
                invalid.append(_invalid(raw, "a call is an object with name and arguments"))
            elif call.get("name") not in names:
                invalid.append(_invalid(raw, f"unknown tool {call.get('name')!r}"))
            else:
                calls.append(_call(call["name"], call.get("arguments", {})))
    return TOOL_CALL.sub("", text).strip(), calls, invalid


def render_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """An AI turn's calls written back the way the model writes them (for the history)."""
    return "".join(
        f"<tool_call>{json.dumps({'name': c['name'], 'arguments': c['args']})}</tool_call>"
        for c in calls
    )


def render_result(text: str) -> str:
    """A tool's result as the model reads it (in a user turn)."""
    return f"<tool_response>\n{text}\n</tool_response>"


def _call(name: str, args: dict[str, Any]) -> ToolCall:
    return ToolCall(name=name, args=args, id=f"call_{uuid.uuid4().hex[:24]}", type="tool_call")


def _invalid(raw: str, error: str) -> InvalidToolCall:
    return invalid_tool_call(name=None, args=raw, id=f"call_{uuid.uuid4().hex[:24]}", error=error)
