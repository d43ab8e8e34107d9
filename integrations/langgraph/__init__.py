"""LangGraph-native long-term memory over an icmem store.

- `ICAEMemory`: a LangGraph `BaseStore` (`create_agent(model, store=memory)`,
  `graph.compile(store=memory)`) whose items are compressed into memory slots.
- `ICAEMemoryMiddleware`: recalls memory before each model call and writes each turn.
- `make_memory_tools`: `remember`, `recall` and `forget` tools for an agent.
"""

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
