"""Which memory namespace an agent run reads and writes: taken from its runtime context."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

from icmem.store.namespaces import validate_namespace
from langgraph.store.base import BaseStore

NamespaceFor = Callable[[Any], Sequence[str]]


class MemoryContext(TypedDict, total=False):
    """The run context the memory middleware and tools read: `create_agent(...,
    context_schema=MemoryContext)`, then `agent.invoke(..., context={"user_id": "u1"})`."""

    user_id: str
    thread_id: str


def user_namespace(runtime: Any) -> tuple[str, ...]:
    """`("memories", user_id)` from the run's context: `agent.invoke(..., context={"user_id":
    ...})`, or a context object with a `user_id` attribute. Every user gets their own
    namespace, so one user's memories are never recalled for another."""
    user = context_value(runtime, "user_id")
    if not isinstance(user, str) or not user:
        raise ValueError(
            "memory needs to know whose it is: invoke the agent with context={'user_id': ...} "
            "(a non-empty string), or give the middleware and tools namespace=<a function of "
            f"the runtime>; got user_id={user!r}"
        )
    return ("memories", user)


def thread_of(runtime: Any) -> str | None:
    """The run's thread: the context's `thread_id`, else the checkpointer's thread."""
    thread = context_value(runtime, "thread_id")
    if thread is None:
        info = getattr(runtime, "execution_info", None)
        thread = getattr(info, "thread_id", None)
        if thread is None:
            config = getattr(runtime, "config", None) or {}
            thread = config.get("configurable", {}).get("thread_id")
    return None if thread is None else str(thread)


def context_value(runtime: Any, name: str) -> Any:
    context = getattr(runtime, "context", None)
    if isinstance(context, Mapping):
        return context.get(name)
    return getattr(context, name, None)


def resolve_namespace(namespace_for: NamespaceFor, runtime: Any) -> tuple[str, ...]:
    """The run's namespace, checked by the store's one rule (a string is refused, never split
    into one-letter labels)."""
    return validate_namespace(namespace_for(runtime))


def resolve_store(memory: BaseStore | None, runtime: Any) -> BaseStore:
    store = memory if memory is not None else getattr(runtime, "store", None)
    if store is None:
        raise ValueError(
            "no memory store: pass one to the middleware or tools, or build the agent with "
            "create_agent(..., store=ICAEMemory(...))"
        )
    return store


def item_text(value: Mapping[str, Any]) -> str:
    """What a remembered item says: its `text`, or the whole value as JSON."""
    text = value.get("text")
    return text if isinstance(text, str) else json.dumps(value, ensure_ascii=False)
