"""A chat message history kept as compressed memory, for chains that use one.

Each message becomes one document in the history's namespace: its text is compressed into memory
slots (so `ChatICAE` and `ICAERetriever` over the same namespace recall it like any other
document) and the message itself is kept in the document's metadata, so the history reads back
exactly, in order, from any process that opens the same store.

A message's id is its write time in nanoseconds (its place in the history) followed by random
bits, so no two writers, and no write after a delete, can ever reuse an id and overwrite a
message. The namespace must be a history's own: one with other namespaces below it would recall
their documents too, so it is refused.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from icmem.integrations.langchain.content import readable_text
from icmem.store.namespaces import validate_namespace
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from icmem.pipeline import MemoryPipeline, TextDocument

if TYPE_CHECKING:
    from icmem.store import DocumentInfo

_PREFIX = "msg-"


class ICAEChatMessageHistory(BaseChatMessageHistory):
    """A chat message history in exactly one namespace of an icmem store, such as
    `(tenant, agent, thread)`. (Before LangGraph stores, this class was `ICAEMemory`.)"""

    def __init__(self, pipeline: MemoryPipeline, namespace: Sequence[str]) -> None:
        self.pipeline = pipeline
        self.namespace = validate_namespace(namespace)
        self._check_namespace()

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return messages_from_dict([doc.metadata["message"] for doc in self._message_documents()])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        self._check_namespace()
        start = time.time_ns()
        documents = [
            TextDocument(
                document_id=f"{_PREFIX}{start + i:020d}-{uuid.uuid4().hex}",
                texts=(f"{message.type}: {readable_text(message)}",),
                metadata={"at": start + i, "message": message_to_dict(message)},
            )
            for i, message in enumerate(messages)
        ]
        if documents:
            self.pipeline.write_documents(documents, namespace=self.namespace)

    def clear(self) -> None:
        ids = [doc.id for doc in self._message_documents()]
        if ids:
            self.pipeline.delete_documents(ids, namespace=self.namespace)

    async def aget_messages(self) -> list[BaseMessage]:
        return await asyncio.to_thread(lambda: self.messages)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        await asyncio.to_thread(self.add_messages, messages)

    async def aclear(self) -> None:
        await asyncio.to_thread(self.clear)

    def _message_documents(self) -> list[DocumentInfo]:
        documents = self.pipeline.list_documents(self.namespace, exact=True)
        mine = [doc for doc in documents if doc.id.startswith(_PREFIX) and _is_message(doc)]
        # Histories written before time-ordered ids carry a count ("seq") instead; they sort
        # first, as they were written first.
        return sorted(mine, key=lambda doc: (_written_at(doc), doc.id))

    def _check_namespace(self) -> None:
        below = [ns for ns in self.pipeline.namespaces(self.namespace) if ns != self.namespace]
        if below:
            raise ValueError(
                f"chat history namespace {self.namespace!r} has other namespaces below it "
                f"({below[:3]}); recalling it would mix their documents into this history. "
                "Give each history its own namespace, such as (tenant, agent, thread)"
            )
        for depth in range(1, len(self.namespace)):
            prefix = self.namespace[:depth]
            if any(_is_message(d) for d in self.pipeline.list_documents(prefix, exact=True)):
                raise ValueError(
                    f"namespace {prefix!r} above {self.namespace!r} holds a chat history, which "
                    "would recall this one's messages too; put the histories side by side "
                    f"(such as {(*prefix, 'thread-1')!r}), not one inside another"
                )


def _written_at(document: DocumentInfo) -> int:
    return document.metadata.get("at", document.metadata.get("seq"))


def _is_message(document: DocumentInfo) -> bool:
    metadata = document.metadata
    return "message" in metadata and ("at" in metadata or "seq" in metadata)
