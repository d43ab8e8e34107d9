"""Conversation history kept as compressed memory, so an agent's memory survives restarts.

Each message becomes one document in the thread's namespace: its text is compressed into memory
slots (so `ChatICAE` and `ICAERetriever` over the same namespace recall it like any other
document) and the message itself is kept in the document's metadata, so the history reads back
exactly, in order, from any process that opens the same store.
"""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from icmem.pipeline import MemoryPipeline

_PREFIX = "msg-"


class ICAEMemory(BaseChatMessageHistory):
    """A chat message history stored in an icmem store under one (tenant, agent, thread)."""

    def __init__(self, pipeline: MemoryPipeline, namespace: Sequence[str]) -> None:
        self.pipeline = pipeline
        self.namespace = tuple(namespace)

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        documents = self._message_documents()
        return messages_from_dict([doc.metadata["message"] for doc in documents])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        seq = len(self._message_documents())
        for message in messages:
            self.pipeline.ingest(
                f"{message.type}: {message.text}",
                namespace=self.namespace,
                document_id=f"{_PREFIX}{seq:09d}",
                metadata={"seq": seq, "message": message_to_dict(message)},
            )
            seq += 1

    def clear(self) -> None:
        ids = [doc.id for doc in self._message_documents()]
        if ids:
            self.pipeline.store.delete(namespace=self.namespace, document_ids=ids)

    def _message_documents(self) -> list:
        documents = self.pipeline.store.list_documents(self.namespace, exact=True)
        mine = [doc for doc in documents if doc.id.startswith(_PREFIX) and "seq" in doc.metadata]
        return sorted(mine, key=lambda doc: doc.metadata["seq"])
