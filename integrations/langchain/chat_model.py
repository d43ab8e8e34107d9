"""A LangChain chat model that answers from compressed memory, not from raw text.

Each call recalls the spans nearest to the last human message and answers the whole
conversation (system prompt and every turn, laid out with the model's chat template) after
their memory slots, through `MemoryPipeline.reply`, the pipeline's one recall-then-decode path.
When recall finds nothing, the base model answers alone and `response_metadata["memory"]` says
so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from icmem.store import SearchHit
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field

from icmem.pipeline import DEFAULT_NAMESPACE, MemoryPipeline, Reply

# Settings a single call may override: invoke(..., max_tokens=4, namespace=(...), k=2, ...)
_PER_CALL = ("max_tokens", "temperature", "stop", "namespace", "k", "filter", "memory")


class ChatICAE(BaseChatModel):
    """Answer a conversation from the memory slots of the spans recalled for its last human
    message."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    pipeline: MemoryPipeline
    namespace: tuple[str, ...] = DEFAULT_NAMESPACE
    k: int = Field(default=4, gt=0)
    filter: dict[str, Any] | None = None
    memory: Literal["slots", "text"] = "slots"  # "text": the recalled spans' raw text instead
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

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the decoder's own tokenizer (offline, no hub)."""
        return self.pipeline.token_ids(text)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        reply, pieces = self._reply(messages, stop, run_manager, kwargs)
        text = "".join(pieces)
        message = AIMessage(
            content=text,
            response_metadata=self._metadata(reply.hits, reply),
            usage_metadata=self._usage(reply, text),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        reply, pieces = self._reply(messages, stop, run_manager, kwargs)
        text = ""
        for piece in pieces:
            text += piece
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        final = AIMessageChunk(
            content="",
            response_metadata=self._metadata(reply.hits, reply),
            usage_metadata=self._usage(reply, text),
        )
        yield ChatGenerationChunk(message=final)

    def _reply(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        overrides: Mapping[str, Any],
    ) -> tuple[Reply, Iterator[str]]:
        unknown = sorted(set(overrides) - set(_PER_CALL))
        if unknown:
            raise TypeError(
                f"ChatICAE does not take {unknown} per call; it takes {list(_PER_CALL)}"
            )
        settings = {name: overrides.get(name, getattr(self, name)) for name in _PER_CALL}
        conversation = [_turn(m) for m in messages]
        query = _last_human_text(messages)
        sampling = {"temperature": settings["temperature"]} if settings["temperature"] else {}
        reply = self.pipeline.reply(
            conversation,
            query=query,
            namespace=tuple(settings["namespace"]),
            k=settings["k"],
            filter=settings["filter"],
            max_new_tokens=settings["max_tokens"],
            memory=settings["memory"],
            **sampling,
        )
        stops = stop or settings["stop"] or []
        return reply, _until_stop(reply.pieces, stops, run_manager)

    def _metadata(self, hits: list[SearchHit], reply: Reply) -> dict[str, Any]:
        sources = [
            {"document_id": h.document_id, "span_id": h.span_id, "score": h.score} for h in hits
        ]
        return {
            "model_name": self.model_name,
            "memory": reply.memory,
            "memory_slots": reply.memory_slots,
            "sources": sources,
        }

    def _usage(self, reply: Reply, text: str) -> UsageMetadata:
        """Input counts every position the decoder read: the prompt and the memory slots."""
        output = len(self.pipeline.token_ids(text)) if text else 0
        read = reply.prompt_tokens + reply.memory_slots
        return UsageMetadata(input_tokens=read, output_tokens=output, total_tokens=read + output)


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


def _turn(message: BaseMessage) -> dict[str, str]:
    """A LangChain message as a chat-template turn."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": message.text}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": message.text}
    if isinstance(message, AIMessage):
        return {"role": "assistant", "content": message.text}
    if isinstance(message, ToolMessage):
        # Chat templates of small models have no tool role; the result reads as a user turn.
        return {
            "role": "user",
            "content": f"[result of tool {message.name or 'call'}] {message.text}",
        }
    return {"role": "user", "content": message.text}
