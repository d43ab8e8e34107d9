"""A LangChain chat model that answers from compressed memory, not from raw text.

Each call recalls the spans nearest to the last human message, concatenates their memory slots
(see `icmem.pipeline` for the order) and lets the ICAE decoder answer after them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from icmem.store import SearchHit
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from icmem.pipeline import DEFAULT_NAMESPACE, MemoryPipeline


class ChatICAE(BaseChatModel):
    """Answer the latest human message from the memory slots of recalled spans."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    pipeline: MemoryPipeline
    namespace: tuple[str, ...] = DEFAULT_NAMESPACE
    k: int = Field(default=4, gt=0)
    model_name: str = Field(default="icae", alias="model")
    max_tokens: int = Field(default=256, gt=0)
    temperature: float | None = None
    stop: list[str] | None = None
    streaming: bool = False  # when True, invoke() streams through callbacks as tokens arrive
    timeout: float | None = None  # accepted for API parity; generation is local
    max_retries: int = 0  # accepted for API parity; generation is local

    @property
    def _llm_type(self) -> str:
        return "icmem-icae"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "k": self.k, "namespace": self.namespace}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "icmem"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        return params

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        hits, pieces = self._answer(messages, stop, run_manager)
        message = AIMessage(content="".join(pieces), response_metadata=self._metadata(hits))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        hits, pieces = self._answer(messages, stop, run_manager)
        for piece in pieces:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        final = AIMessageChunk(content="", response_metadata=self._metadata(hits))
        yield ChatGenerationChunk(message=final)

    def _answer(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
    ) -> tuple[list[SearchHit], Iterator[str]]:
        question = _last_human_text(messages)
        recalled = self.pipeline.recall(question, namespace=self.namespace, k=self.k)
        if not recalled.memory:
            return [], iter(())
        sampling = {"temperature": self.temperature} if self.temperature else {}
        pieces = self.pipeline.icae.generate(
            recalled.memory, question, max_new_tokens=self.max_tokens, stream=True, **sampling
        )
        return recalled.hits, _until_stop(pieces, stop or self.stop or [], run_manager)

    def _metadata(self, hits: list[SearchHit]) -> dict[str, Any]:
        sources = [
            {"document_id": h.document_id, "span_id": h.span_id, "score": h.score} for h in hits
        ]
        return {"model_name": self.model_name, "sources": sources}


def _until_stop(
    pieces: Iterator[str], stops: list[str], run_manager: CallbackManagerForLLMRun | None
) -> Iterator[str]:
    """Pass text through until a stop string appears (it and what follows are dropped).

    A tail that could still grow into a stop string is held back until the next piece decides.
    """
    held = ""
    for piece in pieces:
        held += piece
        cut = min((held.find(s) for s in stops if s in held), default=-1)
        if cut >= 0:
            yield from _emit(held[:cut], run_manager)
            return
        partial = max(
            (n for s in stops for n in range(1, len(s)) if held.endswith(s[:n])), default=0
        )
        yield from _emit(held[: len(held) - partial], run_manager)
        held = held[len(held) - partial :]
    yield from _emit(held, run_manager)


def _emit(text: str, run_manager: CallbackManagerForLLMRun | None) -> Iterator[str]:
    if text:
        if run_manager:
            run_manager.on_llm_new_token(text)
        yield text


def _last_human_text(messages: list[BaseMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            return message.text
    raise ValueError("ChatICAE needs at least one human message to answer")
