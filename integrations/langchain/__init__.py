"""LangChain-native classes over icmem's public API.

- `ChatICAE`: a chat model that answers from the memory slots of recalled spans.
- `ICAERetriever`: a retriever returning the recalled spans as documents.
- `slot_rag_chain`: retriever then ChatICAE reading the retrieved spans' slots (one search).
- `ICAEVectorStore`: a vector store whose documents are compressed into memory slots.
- `ICAEEmbeddings` / `LangChainEmbedder`: icmem's embedder as LangChain `Embeddings`, and any
  `Embeddings` as a pipeline's embedder.
- `ICAEChatMessageHistory`: a chat message history kept as compressed memory.
- `ICAEMemory`: the LangGraph store (from `icmem.integrations.langgraph`), re-exported.
"""

from icmem.integrations.langgraph import ICAEMemory

from .chat_model import ChatICAE
from .embeddings import ICAEEmbeddings, LangChainEmbedder
from .memory import ICAEChatMessageHistory
from .rag import slot_rag_chain
from .retriever import ICAERetriever
from .vectorstore import ICAEVectorStore

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
