"""The end of the write path: encoded documents into one namespace of a store.

What every writer decides alike is decided here once: whether a document is stored unchanged
(`unchanged`), whether the store would refuse it (`refusal`, checked before anything is
compressed), and how a document too large for one transaction is written.

A large document is written in parts: each batch of its spans is committed on its own, as a
document of a parts namespace (``("icmem-parts", <hash of namespace and id>)``) that no reader of
the document's namespace looks at, and `MemoryStore.assemble_document` then moves every part's
spans into the document in one transaction. So an interrupted run keeps the finished parts and the
next one continues after them (`DocumentWriter.parts_done`); readers never see a half-written
document: until it is assembled, searches and listings show the version stored before (or none).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from icmem.documents import TextDocument
from icmem.encoding import DocumentEncoder, StageClock

if TYPE_CHECKING:
    from icmem.chunking import Span
    from icmem.store import AddedDocument, DocumentRecord, MemoryStore, SpanRecord

PARTS_ROOT = "icmem-parts"  # first label of every parts namespace
DEFAULT_BATCH_SPANS = 64  # spans compressed together and committed at once


def unchanged(document: TextDocument, stored: Mapping[str, str]) -> bool:
    """Whether `document` is stored already with the same content (`stored`: id -> hash, as
    `DocumentWriter.stored_hashes` gives), so that writing it again can be skipped."""
    return document.document_id is not None and stored.get(document.document_id) == (
        document.content_hash
    )


def refusal(document: TextDocument) -> str | None:
    """Why the store would refuse `document` (its id, source, metadata or text), or None."""
    from icmem.store import DocumentRecord, InvalidRecordError

    try:
        DocumentRecord(
            spans=(),
            source=document.source,
            metadata=document.metadata,
            content_hash=document.content_hash,
            id=document.document_id,
        )
    except InvalidRecordError as exc:
        return str(exc)
    return None


class DocumentWriter:
    """Writes records into one namespace of a store, whole or in parts."""

    def __init__(self, store: MemoryStore, namespace: Sequence[str]) -> None:
        """The namespace is checked here, before any work (the store's rule and message)."""
        from icmem.store.namespaces import validate_namespace

        self.store = store
        self.namespace = validate_namespace(namespace)

    def stored_hashes(self, document_ids: Sequence[str] | None = None) -> dict[str, str]:
        """id -> content hash of the documents stored in the namespace (only those of
        `document_ids` when given)."""
        if document_ids is None:
            stored = self.store.list_documents(self.namespace, exact=True)
        else:
            stored = self.store.get_documents(document_ids, namespace=self.namespace)
        return {info.id: info.content_hash for info in stored}

    def write(self, records: Sequence[DocumentRecord]) -> list[AddedDocument]:
        """Store whole documents in one transaction, replacing those with the same ids."""
        return self.store.upsert(records, namespace=self.namespace) if records else []

    def parts_namespace(self, document: TextDocument) -> tuple[str, str]:
        """Where the parts of `document` wait until they are assembled."""
        key = json.dumps([list(self.namespace), document.document_id], ensure_ascii=False)
        return (PARTS_ROOT, hashlib.sha256(key.encode("utf-8")).hexdigest()[:32])

    def unfinished_parts(self) -> set[tuple[str, ...]]:
        """The parts namespaces in the store: documents (of any namespace) whose writing
        stopped before they were assembled."""
        return set(self.store.list_namespaces((PARTS_ROOT,)))

    def drop_parts(self, document: TextDocument) -> None:
        """Delete the committed parts of `document` (of a version that is not written)."""
        self.store.delete(namespace=self.parts_namespace(document))

    def parts_done(self, document: TextDocument) -> int:
        """How many spans of `document` (from its first) an earlier run committed as parts.
        Parts of another version of the document, or that do not follow one another, are
        deleted and 0 returned: the document is then written from its start."""
        where = self.parts_namespace(document)
        done = 0
        for part in sorted(self.store.list_documents(where, exact=True), key=lambda p: int(p.id)):
            if part.content_hash != document.content_hash or int(part.id) != done:
                self.drop_parts(document)
                return 0
            done += part.span_count
        return done

    def write_part(self, document: TextDocument, spans: Sequence[SpanRecord]) -> None:
        """Commit the next spans of `document` (they carry their positions in it)."""
        from icmem.store import DocumentRecord

        record = DocumentRecord(
            spans=spans,
            source=document.source,
            content_hash=document.content_hash,
            id=f"{spans[0].position:010d}",
        )
        self.store.upsert([record], namespace=self.parts_namespace(document))

    def assemble(self, document: TextDocument) -> AddedDocument:
        """Make the committed parts `document`, replacing a stored one, in one transaction."""
        from icmem.store import DocumentRecord

        header = DocumentRecord(
            spans=(),
            source=document.source,
            metadata=document.metadata,
            content_hash=document.content_hash,
            id=document.document_id,
        )
        return self.store.assemble_document(
            header, parts_namespace=self.parts_namespace(document), namespace=self.namespace
        )


class BatchedWriter:
    """Compresses and writes documents `batch_spans` spans at a time: small documents share a
    transaction, and a larger one is written in parts of `batch_spans` spans, continuing after
    the parts an interrupted run committed. Nothing is compressed twice."""

    def __init__(
        self,
        encoder: DocumentEncoder,
        writer: DocumentWriter,
        *,
        batch_spans: int = DEFAULT_BATCH_SPANS,
        timings: dict[str, float] | None = None,
        on_spans: Callable[[int], object] = lambda count: None,
    ) -> None:
        """`timings` accumulates seconds per stage ("compress", "embed", "write"); `on_spans`
        is told how many spans each commit wrote (a progress bar)."""
        if isinstance(batch_spans, bool) or not isinstance(batch_spans, int) or batch_spans < 1:
            raise ValueError(f"batch_spans={batch_spans!r}; use 1 or more")
        self.encoder, self.writer, self.batch_spans = encoder, writer, batch_spans
        self.timings, self.on_spans = timings, on_spans
        self.pending: list[tuple[TextDocument, list[Span]]] = []
        self.added: list[AddedDocument] = []
        self.spans = 0  # spans compressed and committed
        self.tokens = 0  # tokens in those spans

    def add(self, document: TextDocument, spans: list[Span]) -> None:
        """Queue a document with its spans; writes when a batch is full."""
        if len(spans) > self.batch_spans:
            self._write_in_parts(document, spans)
            return
        self.pending.append((document, spans))
        if sum(len(s) for _, s in self.pending) >= self.batch_spans:
            self.flush()

    def flush(self) -> None:
        """Write what is queued."""
        if not self.pending:
            return
        records = self.encoder.encode(self.pending, timings=self.timings)
        with StageClock(self.timings)("write"):
            self.added += self.writer.write(records)
        self._count([span for _, spans in self.pending for span in spans])
        self.pending.clear()

    def _write_in_parts(self, document: TextDocument, spans: list[Span]) -> None:
        if document.document_id is None:  # the parts need a name to be found by
            document = replace(document, document_id=uuid.uuid4().hex)
        clock = StageClock(self.timings)
        with clock("write"):
            done = self.writer.parts_done(document)
        for start in range(done, len(spans), self.batch_spans):
            piece = spans[start : start + self.batch_spans]
            records = self.encoder.span_records(piece, self.timings)
            with clock("write"):
                self.writer.write_part(document, records)
            self._count(piece)
        with clock("write"):
            self.added.append(self.writer.assemble(document))

    def _count(self, spans: Sequence[Span]) -> None:
        self.spans += len(spans)
        self.tokens += sum(span.token_count for span in spans)
        self.on_spans(len(spans))
