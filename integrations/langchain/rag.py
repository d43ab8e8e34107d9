"""A RAG chain that reads retrieved spans from their memory slots instead of stuffing their
text into the prompt: one search (the retriever's), then decoding from compressed memory."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough

from .chat_model import ChatICAE
from .retriever import ICAERetriever


def slot_rag_chain(retriever: ICAERetriever, chat: ChatICAE) -> Runnable[str, AIMessage]:
    """``question -> AIMessage``: ``retriever`` finds the spans, ``chat`` answers from their
    slots (``response_metadata["sources"]`` names them)."""

    def answer(inputs: dict[str, Any]) -> AIMessage:
        return chat.invoke(inputs["question"], documents=inputs["documents"])

    found = RunnableParallel(documents=retriever, question=RunnablePassthrough())
    return found | RunnableLambda(answer)
