"""LangChain-native classes over icmem's public API.

- `ChatICAE`: a chat model that answers from the memory slots of recalled spans.
- `ICAERetriever`: a retriever returning the recalled spans as documents.
- `slot_rag_chain`: retriever then ChatICAE reading the retrieved spans' slots (one search).
- `ICAEVectorStore`: a vector store whose documents are compressed into memory slots.
- `ICAEEmbeddings` / `LangChainEmbedder`: icmem's embedder as LangChain `Embeddings`, and any
  `Embeddings` as a pipeline's embedder.
- `ICAEChatMessageHistory`: a chat message history kept as compressed memory.
- `ICAEMemory`: the LangGraph store (from `icmem.integrations.langgraph`), re-exported; it is
  imported on first use, so everything else here needs only langchain-core.
"""

from typing import TYPE_CHECKING, Any

from icmem.integrations.extras import import_on_use

from .chat_model import ChatICAE
from .embeddings import ICAEEmbeddings, LangChainEmbedder
from .memory import ICAEChatMessageHistory
from .rag import slot_rag_chain
from .retriever import ICAERetriever
from .vectorstore import ICAEVectorStore

if TYPE_CHECKING:
    from icmem.integrations.langgraph import ICAEMemory

__all__ = [
    "ChatICAE",
    "ICAEChatMessageHistory",
    "ICAEEmbeddings",
    "ICAEMemory",
    "ICAERetriever",
    "ICAEVectorStore",
    "LangChainEmbedder",
    "slot_rag_chain",
]

_ON_USE = {"ICAEMemory": "icmem.integrations.langgraph.store"}


def __getattr__(name: str) -> Any:
    return import_on_use(__name__, _ON_USE, name)
