"""`remember`, `recall` and `forget`: tools an agent calls to manage its long-term memory.

They act in the run's user namespace (from the runtime context, as the middleware does), so a
tool call can never read or delete another user's memories.
"""

from __future__ import annotations

import uuid

from langchain.tools import ToolRuntime, tool
from langchain_core.tools import BaseTool
from langgraph.store.base import BaseStore

from .context import NamespaceFor, item_text, resolve_namespace, resolve_store, user_namespace


def make_memory_tools(
    memory: BaseStore | None = None,
    *,
    namespace: NamespaceFor = user_namespace,
    k: int = 4,
) -> list[BaseTool]:
    """The `remember`, `recall` and `forget` tools over `memory` (default: the agent's store)."""

    @tool
    def remember(content: str, runtime: ToolRuntime) -> str:
        """Save a fact worth remembering in later conversations. Returns its memory id."""
        key = f"memory-{uuid.uuid4().hex}"
        store = resolve_store(memory, runtime)
        store.put(resolve_namespace(namespace, runtime), key, {"text": content}, index=["text"])
        return key

    @tool
    def recall(query: str, runtime: ToolRuntime) -> str:
        """Search long-term memory. Returns the best matches, one per line, as `id: text`."""
        store = resolve_store(memory, runtime)
        items = store.search(resolve_namespace(namespace, runtime), query=query, limit=k)
        if not items:
            return "no memories found"
        return "\n".join(f"{item.key}: {item_text(item.value)}" for item in items)

    @tool
    def forget(memory_id: str, runtime: ToolRuntime) -> str:
        """Delete one memory by the id `remember` or `recall` gave."""
        store = resolve_store(memory, runtime)
        scope = resolve_namespace(namespace, runtime)
        if store.get(scope, memory_id) is None:
            return f"no memory {memory_id!r}"
        store.delete(scope, memory_id)
        return f"forgot {memory_id}"

    return [remember, recall, forget]
