"""`remember`, `recall` and `forget`: tools an agent calls to manage its long-term memory.

They act in the run's user namespace (from the runtime context, as the middleware does), so a
tool call can never read or delete another user's memories. `forget` deletes only an id of the
shape the tools and the middleware give out that names a memory that exists; anything else (a
model once called it with `memory_id=');'`) is refused with a reason and deletes nothing.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from langchain.tools import ToolRuntime, tool
from langchain_core.tools import BaseTool
from langgraph.store.base import BaseStore

from .context import NamespaceFor, item_text, resolve_namespace, resolve_store, user_namespace

# `remember` gives memory-<hex>; the middleware keys a turn turn-<message id>.
MEMORY_ID = re.compile(r"(memory|turn)-[\w.:-]{1,240}")


def make_memory_tools(
    memory: BaseStore | None = None,
    *,
    namespace: NamespaceFor = user_namespace,
    k: int = 4,
) -> list[BaseTool]:
    """The `remember`, `recall` and `forget` tools over `memory` (default: the agent's store)."""

    @tool
    def remember(content: str, runtime: ToolRuntime[Any, Any]) -> str:
        """Save a fact worth remembering in later conversations. Returns its memory id."""
        key = f"memory-{uuid.uuid4().hex}"
        store = resolve_store(memory, runtime)
        store.put(resolve_namespace(namespace, runtime), key, {"text": content}, index=["text"])
        return key

    @tool
    def recall(query: str, runtime: ToolRuntime[Any, Any]) -> str:
        """Search long-term memory. Returns the best matches, one per line, as `id: text`."""
        store = resolve_store(memory, runtime)
        items = store.search(resolve_namespace(namespace, runtime), query=query, limit=k)
        if not items:
            return "no memories found"
        return "\n".join(f"{item.key}: {item_text(item.value)}" for item in items)

    @tool
    def forget(memory_id: str, runtime: ToolRuntime[Any, Any]) -> str:
        """Delete one memory by the id `remember` or `recall` gave (memory-... or turn-...)."""
        store = resolve_store(memory, runtime)
        scope = resolve_namespace(namespace, runtime)
        if not MEMORY_ID.fullmatch(memory_id) or store.get(scope, memory_id) is None:
            return (
                f"refused: {memory_id!r} is not the id of one of your memories, so nothing was "
                "deleted; call recall to see the ids (memory-... or turn-...)"
            )
        store.delete(scope, memory_id)
        return f"forgot {memory_id}"

    return [remember, recall, forget]
