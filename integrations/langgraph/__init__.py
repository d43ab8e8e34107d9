"""LangGraph-native long-term memory over an icmem store.

- `ICAEMemory`: a LangGraph `BaseStore` (`create_agent(model, store=memory)`,
  `graph.compile(store=memory)`) whose items are compressed into memory slots.
- `ICAEMemoryMiddleware`: recalls memory before each model call and writes each turn.
- `make_memory_tools`: `remember`, `recall` and `forget` tools for an agent.

Each is imported on first use: the store needs langgraph, the middleware and tools also
langchain (`pip install "icmem[langchain]"` installs both).
"""

from typing import TYPE_CHECKING, Any

from icmem.integrations.extras import import_on_use

if TYPE_CHECKING:
    from .context import MemoryContext, user_namespace
    from .middleware import ICAEMemoryMiddleware
    from .store import ICAEMemory
    from .tools import make_memory_tools

__all__ = [
    "ICAEMemory",
    "ICAEMemoryMiddleware",
    "MemoryContext",
    "make_memory_tools",
    "user_namespace",
]

_ON_USE = {
    "ICAEMemory": f"{__name__}.store",
    "ICAEMemoryMiddleware": f"{__name__}.middleware",
    "MemoryContext": f"{__name__}.context",
    "make_memory_tools": f"{__name__}.tools",
    "user_namespace": f"{__name__}.context",
}


def __getattr__(name: str) -> Any:
    return import_on_use(__name__, _ON_USE, name)
