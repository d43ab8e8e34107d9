"""LangChain-native classes over icmem's public API.

- `ChatICAE`: a chat model that answers from the memory slots of recalled spans.
- `ICAERetriever`: a retriever returning the recalled spans as documents.
- `ICAEMemory`: a chat message history kept as compressed memory that survives restarts.
- `slot_rag_chain`: retriever then ChatICAE reading the retrieved spans' slots (one search).
"""

from .chat_model import ChatICAE
from .memory import ICAEMemory
from .rag import slot_rag_chain
from .retriever import ICAERetriever

__all__ = ["ChatICAE", "ICAEMemory", "ICAERetriever", "slot_rag_chain"]
