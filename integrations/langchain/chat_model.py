"""A LangChain chat model that answers from compressed memory, not from raw text.

Each call recalls the spans nearest to the last human message and answers the whole
conversation (system prompt and every turn, laid out with the model's chat template) after
their memory slots, through `MemoryPipeline.reply`, the pipeline's one recall-then-decode path.
When recall finds nothing, the base model answers alone and the answer says so: its text starts
with `icmem.pipeline.NO_MEMORY_NOTICE` and `response_metadata["memory"]` is "none"
(`memory="none"` asks for the plain model, without recall or notice). Content the model cannot
read (images, audio, files) is refused by name, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from icmem.integrations.langchain import tool_calls
from icmem.integrations.langchain.content import readable_text
from icmem.store import SearchHit
from icmem.store.namespaces import validate_namespace
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LangSmithParams, ModelProfile
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
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from icmem.memory_forms import MemoryForm
from icmem.pipeline import DEFAULT_NAMESPACE, MemoryPipeline, Reply

# Settings a single call may override: invoke(..., max_tokens=4, namespace=(...), k=2, ...)
_PER_CALL = ("max_tokens", "temperature", "stop", "namespace", "k", "filter", "memory")
# Set by bind_tools (and with_structured_output, which binds its schema as a forced tool), and
# `documents`: spans a retriever already found, read from their slots instead of recalling.
_CALL_ONLY = (
    "tools",
    "tool_choice",
    "ls_structured_output_format",
    "structured_output",
    "documents",
)


class ChatICAE(BaseChatModel):
    """Answer a conversation from the memory slots of the spans recalled for its last human
    message."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    pipeline: MemoryPipeline
    namespace: tuple[str, ...] = DEFAULT_NAMESPACE
    k: int = Field(default=4, gt=0)
    filter: dict[str, Any] | None = None
    # "text": the recalled spans' raw text instead; "none": the plain model, no recall
    memory: MemoryForm = "slots"
    model_name: str = Field(default="icae", alias="model")
    max_tokens: int = Field(default=256, gt=0)
    temperature: float | None = None
    stop: list[str] | None = None
    streaming: bool = False  # when True, invoke() streams through callbacks as tokens arrive
    timeout: float | None = None  # accepted for API parity; generation is local
    max_retries: int = 0  # accepted for API parity; generation is local

    def __init__(self, **data: Any) -> None:
        # The store's one namespace rule and its message, not a pydantic type error (and never
        # a string silently split into one-letter labels).
        if "namespace" in data:
            data["namespace"] = validate_namespace(data["namespace"])
        super().__init__(**data)

    @property
    def _llm_type(self) -> str:
        return "icmem-icae"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "k": self.k, "namespace": self.namespace}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "icmem"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Offer ``tools`` to the model (listed in the system prompt). ``tool_choice`` "any",
        "required" or a tool's name forces a call, decoded under the tools' JSON schemas so it
        always parses; "auto" (default) lets the model answer or call; "none" hides the tools."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        choice = tool_calls.normalise_choice(tool_choice, formatted)
        if "ls_structured_output_format" in kwargs:  # LangChain drops it before _generate
            kwargs["structured_output"] = True
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def _resolve_model_profile(self) -> ModelProfile:
        """What LangChain can rely on: text in and out, tools (forced calls always parse) and
        structured output. Conversations of any length (LM-Infinite, and recall for older turns);
        one user message may be at most the pipeline's `max_input_tokens`."""
        return ModelProfile(
            name=self.model_name,
            open_weights=True,
            text_inputs=True,
            image_inputs=False,
            audio_inputs=False,
            pdf_inputs=False,
            video_inputs=False,
            text_outputs=True,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=False,
            structured_output=True,
            temperature=True,
        )

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
        content, calls, invalid = _read_calls(text, kwargs.get("tools"), kwargs.get("tool_choice"))
        if kwargs.get("structured_output") and invalid and not calls:
            # LangChain's structured-output parsers would turn this into None without a word.
            limit = kwargs.get("max_tokens", self.max_tokens)
            raise OutputParserException(
                f"the structured answer reached max_tokens={limit}: {invalid[0]['error']} "
                "(ChatICAE(max_tokens=...) or .bind(max_tokens=...))",
                llm_output=text,
            )
        message = AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
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
        if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
            # A call is only known once its text is complete: one chunk carries it whole.
            message = self._generate(messages, stop, run_manager, **kwargs).generations[0].message
            assert isinstance(message, AIMessage)  # what _generate answers with
            yield ChatGenerationChunk(message=_as_chunk(message))
            return
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
        unknown = sorted(set(overrides) - set(_PER_CALL) - set(_CALL_ONLY))
        if unknown:
            raise TypeError(
                f"ChatICAE does not take {unknown} per call; it takes {list(_PER_CALL)} "
                "(and tools through bind_tools)"
            )
        settings = {name: overrides.get(name, getattr(self, name)) for name in _PER_CALL}
        conversation = [_turn(m) for m in messages]
        query = _last_human_text(messages)
        tools, choice = overrides.get("tools") or [], overrides.get("tool_choice", "auto")
        schema = None
        if tools and choice != "none":
            forced = choice != "auto"
            conversation = _with_system(conversation, tool_calls.tools_prompt(tools, forced))
            if forced:
                schema = tool_calls.forced_call_schema(tools, choice)
        sampling = {"temperature": settings["temperature"]} if settings["temperature"] else {}
        reply = self.pipeline.reply(
            conversation,
            query=query,
            namespace=validate_namespace(settings["namespace"]),
            k=settings["k"],
            filter=settings["filter"],
            max_new_tokens=settings["max_tokens"],
            memory=settings["memory"],
            json_schema=schema,
            span_ids=_span_ids(overrides.get("documents")),
            **sampling,
        )
        stops = [] if schema else stop or settings["stop"] or []
        return reply, _answer_text(reply, stops, run_manager)

    def _metadata(self, hits: list[SearchHit], reply: Reply) -> dict[str, Any]:
        sources = [
            {"document_id": h.document_id, "span_id": h.span_id, "score": h.score} for h in hits
        ]
        return {
            "model_name": self.model_name,
            "memory": reply.memory,
            "memory_slots": reply.memory_slots,
            # None: the pieces were not read to their end, so a stop string ended them.
            "finish_reason": reply.finish_reason or "stop",
            "sources": sources,
        }

    def _usage(self, reply: Reply, text: str) -> UsageMetadata:
        """Input counts every position the decoder read: the prompt and the memory slots; output
        what it wrote (not the no-memory notice before it)."""
        written = text.removeprefix(reply.notice)  # (a stop string never cuts the notice)
        output = len(self.pipeline.token_ids(written)) if written else 0
        read = reply.prompt_tokens + reply.memory_slots
        # The token details are optional: langchain_core marks them typing.NotRequired, which
        # mypy checking for Python 3.10 (our floor; pyproject [tool.mypy]) cannot resolve.
        return UsageMetadata(  # type: ignore[typeddict-item]
            input_tokens=read, output_tokens=output, total_tokens=read + output
        )


def _answer_text(
    reply: Reply, stops: list[str], run_manager: CallbackManagerForLLMRun | None
) -> Iterator[str]:
    """The answer: the no-memory notice (which no stop string may cut: the model did not write
    it), then the decoded text up to a stop string."""
    yield from _emit(reply.notice, run_manager)
    yield from _until_stop(reply.pieces, stops, run_manager)


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
            return readable_text(message)
    raise ValueError("ChatICAE needs at least one human message to answer")


def _turn(message: BaseMessage) -> dict[str, str]:
    """A LangChain message as a chat-template turn (content the model cannot read refused)."""
    text = readable_text(message)
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": text}
    if isinstance(message, HumanMessage):
        return {"role": "user", "content": text}
    if isinstance(message, AIMessage):
        calls = tool_calls.render_calls(message.tool_calls) if message.tool_calls else ""
        return {"role": "assistant", "content": text + calls}
    if isinstance(message, ToolMessage):
        # Chat templates of small models have no tool role; the result reads as a user turn.
        return {"role": "user", "content": tool_calls.render_result(text)}
    return {"role": "user", "content": text}


def _with_system(conversation: list[dict[str, str]], section: str) -> list[dict[str, str]]:
    """The conversation with ``section`` at the end of its system prompt (added if none)."""
    if conversation and conversation[0]["role"] == "system":
        first = {"role": "system", "content": f"{conversation[0]['content']}\n\n{section}"}
        return [first, *conversation[1:]]
    return [{"role": "system", "content": section}, *conversation]


def _read_calls(
    text: str, tools: list[dict[str, Any]] | None, choice: str | None
) -> tuple[str, list, list]:
    """``(content, tool_calls, invalid_tool_calls)`` of an answer (see tool_calls)."""
    if not tools or choice == "none":
        return text, [], []
    if choice not in (None, "auto"):
        calls, invalid = tool_calls.parse_forced(text)
        return "", calls, invalid
    return tool_calls.parse_free(text, tools)


def _as_chunk(message: AIMessage) -> AIMessageChunk:
    return AIMessageChunk(
        content=message.content,
        tool_call_chunks=[
            # "type" is optional (typing.NotRequired, unresolved for Python 3.10: see _usage).
            {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}  # type: ignore[typeddict-item]
            for i, c in enumerate(message.tool_calls)
        ],
        invalid_tool_calls=message.invalid_tool_calls,
        response_metadata=message.response_metadata,
        usage_metadata=message.usage_metadata,
    )


def _span_ids(documents: Sequence[Document] | None) -> list[int] | None:
    """The span ids of retrieved documents (``ICAERetriever`` puts them in the metadata)."""
    if documents is None:
        return None
    found = [doc.metadata.get("span_id") for doc in documents]
    ids = [i for i in found if isinstance(i, int)]
    if len(ids) != len(found):
        raise ValueError(
            "documents= takes the documents ICAERetriever returns (metadata['span_id'] names "
            "their stored spans); for other documents put their text in the prompt instead"
        )
    return ids
