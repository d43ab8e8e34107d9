"""Agent middleware that recalls long-term memory before each model call and writes each turn
after the agent has answered.

Recall is per user (the namespace comes from the run's context), so what one user told the agent
is never recalled for another. A `ChatICAE` model recalls for itself: the middleware tells it
which namespace (and how many spans) to recall, and the model reads them in its own `memory=`
form (slots by default). Any other chat model gets the recalled items' text in its system prompt.

What is remembered of a turn: what the user said and what tools returned (not the memory tools'
own results, which are memories already). The model's replies only with `remember_replies=True`,
and never an empty one or one the decoder stopped for repeating itself
(`response_metadata["finish_reason"] == "repetition"`): a bad answer, recalled, is repeated.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langgraph.store.base import BaseStore, SearchItem

from .context import (
    NamespaceFor,
    item_text,
    resolve_namespace,
    resolve_store,
    thread_of,
    user_namespace,
)

MEMORY_HEADER = "What you remember from earlier conversations with this user:"
# The tools of `make_memory_tools`: their results are memories already, never stored again.
MEMORY_TOOLS = frozenset({"remember", "recall", "forget"})


class ICAEMemoryMiddleware(AgentMiddleware):
    """Recall before the model, remember after the agent, in the run's user namespace.

    `memory` defaults to the agent's store (`create_agent(..., store=memory)`); `namespace`
    maps the run's runtime to the namespace to read and write (default `("memories",
    user_id)` from the context); `k` is how many memories to recall; `write=False` only
    recalls; `remember_replies=True` also stores the model's replies (see the module).
    """

    def __init__(
        self,
        memory: BaseStore | None = None,
        *,
        namespace: NamespaceFor = user_namespace,
        k: int = 4,
        write: bool = True,
        remember_replies: bool = False,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.memory, self.namespace, self.k, self.write = memory, namespace, k, write
        self.remember_replies = remember_replies

    # ------------------------------------------------------------------ recall

    def wrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], ModelResponse],
    ) -> ModelResponse:
        query = _last_human_text(request.messages)
        if query is None:
            return handler(request)
        namespace = resolve_namespace(self.namespace, request.runtime)
        if _reads_slots(request.model):
            return handler(self._with_slots(request, namespace))
        store = resolve_store(self.memory, request.runtime)
        items = store.search(namespace, query=query, limit=self.k)
        return handler(_with_text(request, items))

    async def awrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], Awaitable[ModelResponse]],
    ) -> ModelResponse:
        query = _last_human_text(request.messages)
        if query is None:
            return await handler(request)
        namespace = resolve_namespace(self.namespace, request.runtime)
        if _reads_slots(request.model):
            return await handler(self._with_slots(request, namespace))
        store = resolve_store(self.memory, request.runtime)
        items = await store.asearch(namespace, query=query, limit=self.k)
        return await handler(_with_text(request, items))

    def _with_slots(self, request: ModelRequest, namespace: tuple[str, ...]) -> ModelRequest:
        """ChatICAE recalls for the last human message itself; it is told where and how much,
        and reads the memory in the form it was set to (its `memory=`, or a bound override)."""
        settings = {**request.model_settings, "namespace": namespace, "k": self.k}
        return request.override(model_settings=settings)

    # ------------------------------------------------------------------ remember

    def after_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        turn = self._turn(state, runtime)
        if turn is not None:
            resolve_store(self.memory, runtime).put(*turn, index=["text"])
        return None

    async def aafter_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        turn = self._turn(state, runtime)
        if turn is not None:
            await resolve_store(self.memory, runtime).aput(*turn, index=["text"])
        return None

    def _turn(
        self, state: dict[str, Any], runtime: Any
    ) -> tuple[tuple[str, ...], str, dict[str, Any]] | None:
        """The run's last exchange (the last human message, the tools' results after it and, when
        asked, the model's replies) as an item, keyed by the human message's id so a re-run
        overwrites rather than duplicates."""
        if not self.write:
            return None
        messages: Sequence[AnyMessage] = state.get("messages", [])
        start = next(
            (i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], HumanMessage)),
            None,
        )
        if start is None:
            return None
        question = messages[start]
        lines = [f"user: {question.text}"]
        for message in messages[start + 1 :]:
            line = self._remembered_line(message)
            if line:
                lines.append(line)
        value: dict[str, Any] = {"text": "\n".join(lines), "kind": "turn"}
        thread = thread_of(runtime)
        if thread is not None:
            value["thread_id"] = thread
        key = f"turn-{question.id or uuid.uuid4().hex}"
        return resolve_namespace(self.namespace, runtime), key, value

    def _remembered_line(self, message: BaseMessage) -> str | None:
        if isinstance(message, ToolMessage):
            if message.name in MEMORY_TOOLS or not message.text.strip():
                return None
            return f"tool {message.name or 'result'}: {message.text}"
        if isinstance(message, AIMessage) and self.remember_replies and worth_remembering(message):
            return f"assistant: {message.text}"
        return None


def worth_remembering(reply: AIMessage) -> bool:
    """A reply that says something: not empty, not a tool call, and not stopped by the decoder
    for repeating itself."""
    if reply.tool_calls or not reply.text.strip():
        return False
    return reply.response_metadata.get("finish_reason") != "repetition"


def _reads_slots(model: Any) -> bool:
    from icmem.integrations.langchain import ChatICAE

    return isinstance(model, ChatICAE)


def _with_text(request: ModelRequest, items: list[SearchItem]) -> ModelRequest:
    if not items:
        return request
    memory = "\n".join(f"- {item_text(item.value)}" for item in items)
    block = f"{MEMORY_HEADER}\n{memory}"
    current = request.system_message.text if request.system_message else ""
    prompt = f"{current}\n\n{block}" if current else block
    return request.override(system_message=SystemMessage(prompt))


def _last_human_text(messages: Sequence[AnyMessage]) -> str | None:
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            return message.text
    return None
