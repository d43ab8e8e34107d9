"""How often the default model calls tools correctly through ChatICAE: free calls (the model
decides, its answer parsed for ``<tool_call>`` tags) and forced calls (``tool_choice="any"``,
decoded under the tools' JSON schemas), each scored for a parsed call, the right tool,
arguments valid for the tool's schema, and the argument values the request asks for.

Two memories: none (an empty namespace, the base model answers alone) and slots (one short
document recalled as memory slots, read through the shipped ICAE's ``[FT]`` prefix).

    .venv/bin/python benchmarks/tool_call_rate.py --save
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from typing import Literal

import torch
from icae_common import emit
from icmem.integrations.langchain import ChatICAE
from langchain_core.tools import tool
from pydantic import ValidationError

from icmem.pipeline import MemoryPipeline


@tool
def get_weather(city: str) -> str:
    """Today's weather in a city."""
    return "sunny"


@tool
def set_alarm(
    day: Literal["monday", "tuesday", "wednesday", "thursday", "friday"], hour: int
) -> str:
    """Set an alarm clock for a weekday at an hour of the day (0-23)."""
    return "set"


@tool
def convert_currency(amount: float, source: str, target: str) -> str:
    """Convert an amount of money from a source currency to a target currency (ISO codes)."""
    return "converted"


TOOLS = [get_weather, set_alarm, convert_currency]

# (request, tool, argument values the request states: a string value is matched as a
# case-insensitive substring, a number exactly)
REQUESTS: list[tuple[str, str, dict]] = [
    ("What is the weather in Paris?", "get_weather", {"city": "paris"}),
    ("Is it raining in Tokyo right now?", "get_weather", {"city": "tokyo"}),
    ("Tell me today's weather for Berlin.", "get_weather", {"city": "berlin"}),
    ("How warm is it in Madrid today?", "get_weather", {"city": "madrid"}),
    ("Wake me up on monday at 7.", "set_alarm", {"day": "monday", "hour": 7}),
    ("Set an alarm for friday at 9 o'clock.", "set_alarm", {"day": "friday", "hour": 9}),
    ("I need an alarm on wednesday at 6.", "set_alarm", {"day": "wednesday", "hour": 6}),
    ("Alarm please: tuesday, 8 in the morning.", "set_alarm", {"day": "tuesday", "hour": 8}),
    (
        "Convert 100 USD to EUR.",
        "convert_currency",
        {"amount": 100, "source": "usd", "target": "eur"},
    ),
    (
        "How many yen is 50 GBP?",
        "convert_currency",
        {"amount": 50, "source": "gbp", "target": "jpy"},
    ),
    (
        "Change 20 EUR into CHF.",
        "convert_currency",
        {"amount": 20, "source": "eur", "target": "chf"},
    ),
    (
        "What are 75 CAD in USD?",
        "convert_currency",
        {"amount": 75, "source": "cad", "target": "usd"},
    ),
]

MEMORY_TEXT = (
    "The travel desk books trips for the team. Alarms are set on weekdays only, and prices are "
    "quoted in the traveller's own currency."
)


def score(message, tool_name: str, expected: dict) -> dict:
    """What one answer got right, step by step."""
    calls = message.tool_calls
    row = {"call": bool(calls), "invalid": len(message.invalid_tool_calls)}
    if not calls:
        return {**row, "right_tool": False, "valid_args": False, "right_values": False}
    call = calls[0]
    by_name = {t.name: t for t in TOOLS}
    row["right_tool"] = call["name"] == tool_name
    try:
        by_name[call["name"]].args_schema.model_validate(call["args"])
        row["valid_args"] = True
    except (ValidationError, KeyError):
        row["valid_args"] = False
    row["right_values"] = row["right_tool"] and all(
        str(want).lower() in str(call["args"].get(key, "")).lower()
        if isinstance(want, str)
        else call["args"].get(key) == want
        for key, want in expected.items()
    )
    return row


def rates(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "requests": n,
        "parsed_call": round(sum(r["call"] for r in rows) / n, 3),
        "right_tool": round(sum(r["right_tool"] for r in rows) / n, 3),
        "schema_valid_args": round(sum(r["call"] and r["valid_args"] for r in rows) / n, 3),
        "right_values": round(sum(r["right_values"] for r in rows) / n, 3),
        "answers_with_invalid_calls": sum(bool(r["invalid"]) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    pipeline = MemoryPipeline.open(tempfile.mkdtemp(prefix="icmem-tool-rate-"), create=True)
    pipeline.ingest(MEMORY_TEXT, namespace=("bench", "slots"), document_id="desk")
    memories = {"none": ("bench", "empty"), "slots": ("bench", "slots")}
    result: dict = {
        "benchmark": "tool_call_rate",
        "model": pipeline.icae.config.base_model,
        "prompt_layout": "tools one JSON schema a line in <tools>, one call as a JSON object in "
        "<tool_call>",
        "tools": [t.name for t in TOOLS],
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "runs": {},
        "examples": {},
    }
    for memory, namespace in memories.items():
        chat = ChatICAE(pipeline=pipeline, namespace=namespace, k=1, max_tokens=args.max_tokens)
        for mode, choice in (("free", "auto"), ("forced", "any")):
            bound = chat.bind_tools(TOOLS, tool_choice=choice)
            rows = []
            for request, tool_name, expected in REQUESTS:
                message = bound.invoke(request)
                rows.append(score(message, tool_name, expected))
                if len(rows) <= 2:
                    shown = message.tool_calls or message.invalid_tool_calls or message.content
                    result["examples"].setdefault(f"{memory}/{mode}", []).append(
                        {"request": request, "answer": str(shown)[:200]}
                    )
            result["runs"][f"{memory}/{mode}"] = rates(rows)
            print(memory, mode, result["runs"][f"{memory}/{mode}"], flush=True)
    result["total_s"] = round(time.perf_counter() - started, 1)
    emit("tool_call_rate", result, args.save)


if __name__ == "__main__":
    main()
