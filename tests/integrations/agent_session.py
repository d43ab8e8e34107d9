"""One agent session over an on-disk ICAEMemory, run as its own process by the agent tests:
`python agent_session.py STORE USER MESSAGE...` sends each message to a fresh `create_agent`
agent as USER and prints the answers as JSON, one per message."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from icmem.integrations.langgraph import ICAEMemory, ICAEMemoryMiddleware, MemoryContext
from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph_fixtures import fresh_pipeline


class EchoSystemPrompt(BaseChatModel):
    """A stand-in for any chat model: it answers with the system prompt it was given, so a test
    sees exactly which memories reached the model."""

    @property
    def _llm_type(self) -> str:
        return "echo-system-prompt"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        system = next((m.text for m in messages if isinstance(m, SystemMessage)), "")
        return ChatResult(generations=[ChatGeneration(message=AIMessage(system or "(nothing)"))])

    def bind_tools(self, tools: Any, **kwargs: Any) -> EchoSystemPrompt:
        return self


def answers(memory: ICAEMemory, user: str, messages: list[str]) -> list[str]:
    agent = create_agent(
        EchoSystemPrompt(),
        store=memory,
        middleware=[ICAEMemoryMiddleware()],
        context_schema=MemoryContext,
    )
    replies = []
    for message in messages:
        state = agent.invoke({"messages": [HumanMessage(message)]}, context={"user_id": user})
        replies.append(state["messages"][-1].text)
    return replies


if __name__ == "__main__":
    store, user, *messages = sys.argv[1:]
    with ICAEMemory(fresh_pipeline(Path(store))) as memory:
        print(json.dumps(answers(memory, user, messages)))
