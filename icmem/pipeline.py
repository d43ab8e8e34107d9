"""The layer that joins the ICAE, the embedder and the store: ingest text, recall, answer.

Nothing below knows how the others work inside: the ICAE turns token ids into slots and slots
into text, the embedder turns text into vectors, and the store keeps bytes, vectors and rows.

Multi-span memory order: the slots of the recalled spans are concatenated grouped by document
(documents in order of their best hit) and, inside a document, in reading order (span position),
so the decoder sees each document's spans in the order they were written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icmem.chunking import DecodeErrors, read_utf8
from icmem.documents import DEFAULT_NAMESPACE, TextDocument
from icmem.encoding import DocumentEncoder
from icmem.errors import ConversationError
from icmem.icae.slots import MemorySlots
from icmem.ingest import IngestReport, ReadOptions, ingest_paths
from icmem.memory_forms import MEMORY_FORMS, MemoryForm
from icmem.memory_text import with_context
from icmem.store.errors import InvalidRecordError
from icmem.writing import DEFAULT_BATCH_SPANS, BatchedWriter, DocumentWriter, refusal, unchanged

if TYPE_CHECKING:
    import numpy as np

    from icmem.embedding import TextEmbedder
    from icmem.icae.decoder import TextStream
    from icmem.icae.model import ICAE
    from icmem.store import (
        AddedDocument,
        DocumentInfo,
        MemoryStore,
        SearchHit,
        StoreStats,
    )


@dataclass(frozen=True)
class Recall:
    """Recalled spans and their slots, both in multi-span memory order."""

    hits: list[SearchHit]
    memory: list[MemorySlots]


@dataclass(frozen=True)
class Answer:
    text: str
    hits: list[SearchHit]  # empty when recall found nothing and the base model answered alone


@dataclass(frozen=True)
class Reply:
    """A streamed answer: the hits its memory came from, the text pieces as they are decoded,
    and what the decoder read (prompt tokens and memory slots)."""

    hits: list[SearchHit]
    pieces: TextStream
    prompt_tokens: int
    memory_slots: int
    memory: str  # "slots", "text", or "none" (recall found nothing, or none was asked for)
    notice: str = ""  # what the answer says first when recall found nothing (NO_MEMORY_NOTICE)

    def text_pieces(self) -> Iterator[str]:
        """The answer as a reader gets it: the notice, if any, then what the model writes."""
        if self.notice:
            yield self.notice
        yield from self.pieces

    @property
    def finish_reason(self) -> str | None:
        """Once the pieces are read: "stop", "length", or "repetition" (the answer began
        repeating itself and was cut; see ``Sampling.repeat_stop``)."""
        return self.pieces.finish_reason


Conversation = str | Sequence[Mapping[str, str]]
# The first words of an answer that had memory to read but found nothing in it: a user reading
# the reply, not only one reading its metadata, must know it was not answered from memory.
NO_MEMORY_NOTICE = "(Nothing in memory matched this; the model answers on its own.)\n"


class MemoryPipeline:
    """Long memory over one store: `ingest` documents, then `recall` or `ask` by query."""

    def __init__(
        self,
        icae: ICAE,
        store: MemoryStore,
        embedder: TextEmbedder,
        *,
        codec: str = "bf16",
        batch_size: int = 8,
        conversations: int = 8,
        window: int | None = None,
        max_input_tokens: int | None = None,
    ) -> None:
        """`codec` encodes stored slots (one of `icmem.codec.CODECS`); `conversations` decoder
        states are kept for reuse by the next turn (0: none); `window` is LM-Infinite's local
        window (default: the model's pretraining length); `max_input_tokens` is the longest
        user message `reply` accepts (default: the window), because the decoder would see only
        the last window of a longer one and answer from a fragment."""
        from icmem.icae.conversation import PromptCache

        self.icae, self.store, self.embedder = icae, store, embedder
        self.encoder = DocumentEncoder(icae, embedder, codec=codec, batch_size=batch_size)
        self.prompt_cache = PromptCache(conversations, window=window)
        self.max_input_tokens = max_input_tokens or window or icae.max_positions

    @classmethod
    def open(
        cls,
        store: str | os.PathLike[str],
        *,
        icae: ICAE | str | os.PathLike[str] | None = None,
        embedder: TextEmbedder | str | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        create: bool = False,
        **options: Any,
    ) -> MemoryPipeline:
        """Open a store and load the models that read and write it.

        A store directory that holds no store is refused unless `create=True`, so a mistyped
        path fails instead of answering from a new, empty memory. (A database URL names a
        database that exists already; its tables are created on first use.)

        `icae` is an `ICAE`, a checkpoint directory, or None for the shipped default;
        `embedder` a `TextEmbedder`, a model name or directory, or any object with `embed(texts)`
        and `dim` (such as `icmem.integrations.langchain.LangChainEmbedder` over a LangChain
        `Embeddings`).
        """
        from icmem.embedding import DEFAULT_EMBEDDER, TextEmbedder
        from icmem.icae.model import ICAE
        from icmem.store import MemoryStore

        if not create:
            check_store_exists(store)
        if not isinstance(icae, ICAE):
            icae = ICAE.from_pretrained(icae)
        if embedder is None or isinstance(embedder, str | os.PathLike):
            embedder = TextEmbedder.load(embedder or DEFAULT_EMBEDDER)
        opened = MemoryStore.open(
            store, dim=embedder.dim, index_dir=index_dir, model_fingerprint=icae.fingerprint
        )
        return cls(icae, opened, embedder, **options)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> MemoryPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ingest(
        self,
        text: str,
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        document_id: str | None = None,
        source: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> AddedDocument | None:
        """Compress and store one document (replacing one with the same id); None if empty.
        A long text is committed in parts and continues after them when called again (see
        `icmem.writing`)."""
        document = TextDocument.from_text(text, document_id, source=source, metadata=metadata)
        writer = DocumentWriter(self.store, namespace)
        _refuse_unstorable([document])
        spans = self.encoder.chunk(document)
        if not spans:
            return None
        batched = BatchedWriter(self.encoder, writer)
        batched.add(document, spans)
        batched.flush()
        return batched.added[0]

    def ingest_file(
        self,
        path: str | os.PathLike[str],
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        document_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        errors: DecodeErrors = "strict",
    ) -> AddedDocument | None:
        """Like `ingest` for a UTF-8 file; the id defaults to the path."""
        text = "".join(read_utf8(Path(path), errors))
        return self.ingest(
            text,
            namespace=namespace,
            document_id=document_id or str(path),
            source=str(path),
            metadata=metadata,
        )

    def ingest_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        options: ReadOptions | None = None,
        batch_spans: int = DEFAULT_BATCH_SPANS,
        progress: bool = True,
    ) -> IngestReport:
        """Ingest files and folders (txt, md, html, pdf, jsonl), each file under its path as id;
        resumable (`icmem.ingest.ingest_paths`; `options`: which files and how to read them).

        A file already stored with the same content is skipped, and a large one continues after
        the parts already committed, so a batch that was interrupted continues where it stopped
        and a re-run only compresses what changed. A file that cannot be read is reported in
        `IngestReport.unreadable`, one of a format not read in `IngestReport.unsupported`, and
        the rest are ingested.
        """
        return ingest_paths(
            paths,
            self.encoder,
            DocumentWriter(self.store, namespace),
            options=options or ReadOptions(),
            batch_spans=batch_spans,
            progress=progress,
        )

    def recall(
        self,
        query: str,
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        k: int = 4,
        filter: Mapping[str, Any] | None = None,
    ) -> Recall:
        """The `k` spans nearest to `query` and their slots, in multi-span memory order."""
        vector = self.embedder.embed([query])[0]
        hits = self.store.search(vector, k, namespace=namespace, filter=filter)
        return self._memory_of(hits, namespace)

    def memory_of_spans(
        self, span_ids: Sequence[int], *, namespace: Sequence[str] = DEFAULT_NAMESPACE
    ) -> Recall:
        """Spans already retrieved (their ids, as `ICAERetriever` documents carry them) and
        their slots, in multi-span memory order: decoding from them needs no second search."""
        return self._memory_of(self.store.get_spans(span_ids, namespace=namespace), namespace)

    def _memory_of(self, hits: list[SearchHit], namespace: Sequence[str]) -> Recall:
        hits = memory_order(hits)
        stored = self.store.get_slots([hit.span_id for hit in hits], namespace=namespace)
        # A damaged blob is left out by the store (with a warning): drop its hit too, so that
        # hits and memory stay aligned.
        kept = {slots.span_id: slots for slots in stored}
        hits = [hit for hit in hits if hit.span_id in kept]
        memory = [
            MemorySlots.from_bytes(
                kept[hit.span_id].blob,
                self.icae.fingerprint,
                span_id=str(hit.span_id),
                token_count=kept[hit.span_id].token_count,
            )
            for hit in hits
        ]
        return Recall(hits=hits, memory=memory)

    def reply(
        self,
        conversation: Conversation,
        *,
        query: str | None = None,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        k: int = 4,
        filter: Mapping[str, Any] | None = None,
        max_new_tokens: int = 128,
        memory: MemoryForm = "slots",
        json_schema: Mapping[str, Any] | None = None,
        span_ids: Sequence[int] | None = None,
        **sampling: Any,
    ) -> Reply:
        """Recall for `query` and stream the answer to `conversation` from that memory.

        No silent answers: `memory="none"` is the plain base model (no recall); otherwise, when
        recall finds nothing, `notice` is `NO_MEMORY_NOTICE`, which `text_pieces`, `ask` and
        `stream_answer` put before the answer (not under `json_schema`, whose answer must
        parse), so the reader knows it did not come from memory; `pieces` stay what the model
        writes. A user message longer than `max_input_tokens` is refused before any work.

        `conversation` is a question or a whole conversation (`role`/`content` dicts, system
        prompt and every turn). `query` defaults to the question, or to the conversation's last
        user message. `memory="slots"` decodes after the recalled spans' memory slots;
        `memory="text"` gives the base model the same spans' stored text in the system prompt
        instead (the uncompressed baseline, and a fallback while slots are weak). When recall
        finds nothing, the base model answers alone (`hits` is empty). With `json_schema` the
        answer is decoded under that schema (it parses, unless `max_new_tokens` cuts it). With
        `span_ids` (spans a retriever already found) the answer reads those spans instead of
        recalling (`query`, `k` and `filter` are then unused). `sampling` takes `Sampling` fields
        over `REPLY_SAMPLING` (greedy, and a reply that repeats itself is cut with
        `finish_reason == "repetition"`; `repeat_stop=0` turns that off). The one
        recall-then-decode path: `ask`, `stream_answer` and the LangChain chat model all answer
        through it.
        """
        if memory not in MEMORY_FORMS:
            raise ConversationError(f"memory={memory!r}; use 'slots', 'text' or 'none'")
        last_user = conversation if isinstance(conversation, str) else _last_user_text(conversation)
        if query is None:
            if last_user is None:
                raise ConversationError(
                    "the conversation has no user message to recall memory for; add one or pass "
                    "query="
                )
            query = last_user
        self.check_input_length(last_user or "")
        if memory == "none":
            recalled = Recall(hits=[], memory=[])
        elif span_ids is not None:
            recalled = self.memory_of_spans(span_ids, namespace=namespace)
        else:
            recalled = self.recall(query, namespace=namespace, k=k, filter=filter)
        slots = recalled.memory
        # No notice under a schema: the answer must parse.
        quiet = memory == "none" or bool(recalled.hits) or json_schema is not None
        if memory == "text" and recalled.hits:
            conversation = with_context(conversation, [hit.text for hit in recalled.hits])
            slots = []
        from icmem.icae.decoder import REPLY_SAMPLING

        if max_new_tokens < 1:
            raise ConversationError(f"max_new_tokens={max_new_tokens}; use 1 or more")
        constraint = None
        if json_schema is not None:
            from icmem.constrained import JsonConstraint

            constraint = JsonConstraint(
                json_schema,
                self.icae.tokenizer,
                self.icae.vocab_size,
                self.icae.stop_ids,
            )
        settings = REPLY_SAMPLING.with_overrides(**sampling)
        tokens = self.prompt_cache.generate(
            self.icae, slots, conversation, max_new_tokens, settings, constraint
        )
        pieces = self.icae.decoder.text(tokens)
        return Reply(
            hits=recalled.hits,
            pieces=pieces,
            prompt_tokens=len(self.prompt_cache.prompt_ids(self.icae, conversation)),
            memory_slots=sum(m.num_slots for m in slots),
            memory=memory if recalled.hits else "none",
            notice="" if quiet else NO_MEMORY_NOTICE,
        )

    def check_input_length(self, message: str) -> None:
        """Refuse a user message longer than `max_input_tokens`: the decoder would read only
        its last window and answer from a fragment, slowly and without a word."""
        if self.max_input_tokens is None:
            return
        tokens = len(self.icae.tokenize(message))
        if tokens > self.max_input_tokens:
            raise ConversationError(
                f"the user message is {tokens} tokens, more than the {self.max_input_tokens} "
                "this model reads at once: it would see only the end of it. Put long text into "
                "memory (MemoryPipeline.ingest, or `icmem ingest FILE`) and ask about it in a "
                "short message"
            )

    def ask(
        self,
        question: Conversation,
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        k: int = 4,
        filter: Mapping[str, Any] | None = None,
        max_new_tokens: int = 128,
        memory: MemoryForm = "slots",
        **sampling: Any,
    ) -> Answer:
        """Answer `question` (or a conversation) from the memory of the `k` nearest spans."""
        reply = self.reply(
            question,
            namespace=namespace,
            k=k,
            filter=filter,
            max_new_tokens=max_new_tokens,
            memory=memory,
            **sampling,
        )
        return Answer(text="".join(reply.text_pieces()), hits=reply.hits)

    def stream_answer(
        self,
        question: Conversation,
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        k: int = 4,
        filter: Mapping[str, Any] | None = None,
        max_new_tokens: int = 128,
        memory: MemoryForm = "slots",
        **sampling: Any,
    ) -> Iterator[str]:
        """`ask`, yielding text pieces as they are decoded."""
        yield from self.reply(
            question,
            namespace=namespace,
            k=k,
            filter=filter,
            max_new_tokens=max_new_tokens,
            memory=memory,
            **sampling,
        ).text_pieces()

    def token_ids(self, text: str) -> list[int]:
        """The decoder's token ids of plain text (to count tokens the way the model does)."""
        return self.icae.tokenize(text)

    # ------------------------------------------------------------------ documents as records
    # Operations the LangGraph store, the vector store and the chat history build on: whole
    # documents addressed by id (several texts each, possibly none), read back with their
    # metadata, and spans found by text or by vector. Adapters use these instead of reaching
    # into the store, the ICAE or the embedder.

    def write_documents(
        self, documents: Sequence[TextDocument], *, namespace: Sequence[str]
    ) -> list[AddedDocument]:
        """Store documents in exactly one namespace, replacing any with the same ids.

        Each text of a document is chunked on its own (a field never bleeds into the next one's
        span) and the spans of many documents are compressed together. A document whose texts
        are unchanged since it was stored keeps its spans and slots: only its metadata is
        replaced, so re-writing a value's non-indexed fields never re-encodes anything. A
        document with no text is stored without spans: it can be read back and listed, never
        recalled.
        """
        from icmem.store import AddedDocument

        writer = DocumentWriter(self.store, namespace)
        _refuse_unstorable(documents)
        stored = writer.stored_hashes([str(d.document_id) for d in documents])
        kept = {d.document_id: dict(d.metadata) for d in documents if unchanged(d, stored)}
        self.store.update_metadata(kept, namespace=writer.namespace)
        batched = BatchedWriter(self.encoder, writer)
        for document in documents:
            if document.document_id not in kept:
                batched.add(document, self.encoder.chunk(document))
        batched.flush()
        added = {a.id: a for a in batched.added}
        return [
            added.get(str(d.document_id)) or AddedDocument(id=str(d.document_id), span_ids=())
            for d in documents
        ]

    def update_metadata(
        self, updates: Mapping[str, Mapping[str, Any]], *, namespace: Sequence[str]
    ) -> int:
        """Replace stored documents' metadata without touching their spans."""
        return self.store.update_metadata(updates, namespace=namespace)

    def get_documents(
        self, document_ids: Sequence[str], *, namespace: Sequence[str]
    ) -> list[DocumentInfo]:
        """Documents of exactly this namespace by id, in the order asked; unknown ids left out."""
        return self.store.get_documents(document_ids, namespace=namespace)

    def list_documents(
        self,
        namespace: Sequence[str],
        *,
        exact: bool = False,
        filter: Mapping[str, Any] | None = None,
        filter_root: Sequence[str] = (),
    ) -> list[DocumentInfo]:
        """Documents under a namespace prefix (or of exactly that namespace), oldest first;
        with ``filter``, only those whose metadata matches it (``MemoryStore.list_documents``)."""
        return self.store.list_documents(
            namespace, exact=exact, filter=filter, filter_root=filter_root
        )

    def delete_documents(
        self, document_ids: Sequence[str] | None = None, *, namespace: Sequence[str]
    ) -> int:
        """Delete documents by id from exactly one namespace, or (no ids) everything under a
        namespace prefix; returns how many were deleted."""
        return self.store.delete(namespace=namespace, document_ids=document_ids)

    def stats(self, namespace: Sequence[str] | None = None) -> StoreStats:
        """Counts and sizes of what the store holds, in all or under one namespace prefix."""
        return self.store.stats(namespace)

    def reconstruct(self, memory: Sequence[MemorySlots]) -> str:
        """The text recalled memory stands for, decoded from its slots (the ``[AE]`` task)."""
        return self.icae.reconstruct(memory)

    def namespaces(
        self,
        prefix: Sequence[str] | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        filter_root: Sequence[str] = (),
    ) -> list[tuple[str, ...]]:
        """Every namespace holding or having held documents, optionally under a prefix; sorted.
        With ``filter``, only those holding a document whose metadata matches it."""
        return self.store.list_namespaces(prefix, filter=filter, filter_root=filter_root)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Retrieval vectors of texts, one row each, from the embedder the store was built with."""
        return self.embedder.embed(list(texts))

    def search(
        self,
        query: str | np.ndarray,
        *,
        namespace: Sequence[str] = DEFAULT_NAMESPACE,
        k: int = 4,
        filter: Mapping[str, Any] | None = None,
    ) -> list[SearchHit]:
        """The `k` spans nearest to a query text (or an already embedded query), best first,
        without their slots: what a retriever or a store search needs."""
        vector = self.embed([query])[0] if isinstance(query, str) else query
        return self.store.search(vector, k, namespace=namespace, filter=filter)


def _refuse_unstorable(documents: Sequence[TextDocument]) -> None:
    """Raise the store's error for the first document it would refuse, before any work."""
    for document in documents:
        reason = refusal(document)
        if reason is not None:
            raise InvalidRecordError(reason)


def memory_order(hits: Sequence[SearchHit]) -> list[SearchHit]:
    """Multi-span memory order (see the module docstring): documents in the order of their
    best hit (``hits`` come best first), each document's spans in reading order."""
    rank: dict[tuple, int] = {}
    for hit in hits:
        rank.setdefault((tuple(hit.namespace), hit.document_id), len(rank))
    return sorted(hits, key=lambda h: (rank[(tuple(h.namespace), h.document_id)], h.position))


def check_store_exists(store: str | os.PathLike[str]) -> None:
    """Refuse a store directory that holds no store (see `MemoryPipeline.open`'s `create`)."""
    from icmem.store.database import DATABASE_FILE
    from icmem.store.errors import NotAStoreError

    text = os.fspath(store)
    if "://" not in text and not (Path(text) / DATABASE_FILE).is_file():
        raise NotAStoreError(
            f"no memory store at {text}: check the path, or create the store "
            f"(`icmem ingest FILES --store {text}`, or MemoryPipeline.open(..., create=True))"
        )


def _last_user_text(conversation: Sequence[Mapping[str, str]]) -> str | None:
    for message in reversed(conversation):
        if message.get("role") == "user":
            return message.get("content", "")
    return None
