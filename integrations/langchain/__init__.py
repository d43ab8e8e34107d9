"""LangChain-native classes over icmem's public API.

- `ChatICAE`: a chat model that answers from the memory slots of recalled spans.
- `ICAERetriever`: a retriever returning the recalled spans as documents.
- `ICAEMemory`: a chat message history kept as compressed memory that survives restarts.
"""

from .chat_model import ChatICAE
from .memory import ICAEMemory
from .retriever import ICAERetriever

__all__ = ["ChatICAE", "ICAEMemory", "ICAERetriever"]
