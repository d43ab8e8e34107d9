"""MemoryStore: documents, spans, memory slots and embeddings in SQL, found again through FAISS.

The store is three rooms. ``store.database`` holds the connection (engine, directory checks,
schema, migration, error translation) and ``store.queries`` every SQL statement, grouped by
domain; ``store.shards`` holds each namespace's FAISS shard and keeps it in step with the rows;
``MemoryStore`` here is only the transactional API over both, and holds no SQL (every statement
over a caller's ids goes through ``store.id_lists``, every metadata read through
``store.stored_metadata``).

The rows are the truth and every write is one transaction: a document and all of its spans,
slots and embeddings land together or not at all. Each namespace carries a generation counter that
the same transaction increments; the shard of a namespace records the generation it reflects, so
any process (or a reopened store) can tell that its index is behind and catch up. See
``store.records`` for the values passed in and out, ``store.namespaces`` for namespace paths,
``store.index`` for when the index is exact and when it is IVF, and ``store.filters`` for the
metadata filter language.

SQLite runs in WAL mode with a busy timeout and ``BEGIN IMMEDIATE`` for writes: many reader
processes and one writer at a time, none of them losing a write. On Postgres several writers may
work at once; the namespace row lock orders their generations.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from icmem.codec import SlotCodecError

from . import queries
from .database import Database
from .errors import (
    DimensionMismatchError,
    DuplicateDocumentError,
    ForeignSlotsError,
    InvalidRecordError,
    UnknownSpanError,
    warn_damaged,
)
from .filters import compile_filter
from .index import IndexPolicy
from .namespaces import decode_path, validate_namespace
from .records import (
    AddedDocument,
    DocumentInfo,
    DocumentRecord,
    Namespace,
    SearchHit,
    SpanSlots,
    StoreCheck,
    StoreStats,
)
from .shards import Shards, embedding_is_damaged, token_key
from .slots import verify_slot_blob
from .snapshots import NamespaceSnapshots
from .stored_metadata import parse_metadata, warn_damaged_metadata
from .validation import INT64_MAX, MAX_KEY_CHARS, MAX_VECTOR_NORM, check_metadata, check_text

__all__ = ["DuplicateDocumentError", "MemoryStore", "UnknownSpanError"]


@dataclass(frozen=True)
class _PreparedDocument:
    record: DocumentRecord
    key: str
    metadata: dict[str, Any]  # a plain-JSON copy, checked the same way for every backend
    vectors: np.ndarray  # (n_spans, dim) float32
    slot_rows: tuple[dict[str, Any] | None, ...]  # the slot row of each span (or None)


class MemoryStore:
    """Documents with spans, memory slots and embeddings; searched per namespace.

    Open with ``MemoryStore.open(...)``; use as a context manager (or call ``close()``) so the
    index is saved. A store that was not closed is still correct: its index is caught up on open.
    A writer keeps the indexes of the namespaces it writes to current and saves them as it
    writes (at once after training one, else every ``index_save_interval_s`` seconds or more),
    so that readers find them ready even after a writer that was killed.
    """

    def __init__(
        self,
        database: Database,
        shards: Shards,
        *,
        dim: int,
        model_fingerprint: str | None,
    ) -> None:
        self._database = database
        self._index = shards
        self._snapshots = NamespaceSnapshots()
        self.dim = dim
        self.model_fingerprint = model_fingerprint

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path_or_url: str | os.PathLike[str],
        *,
        dim: int,
        index_dir: str | os.PathLike[str] | None = None,
        model_fingerprint: str | None = None,
        read_only: bool = False,
        index_policy: IndexPolicy | None = None,
        busy_timeout_s: float = 30.0,
    ) -> MemoryStore:
        """Open (creating when needed) a store.

        ``path_or_url`` is a directory (``store.sqlite`` plus ``index/`` inside it) or an
        SQLAlchemy URL such as ``postgresql+psycopg://user@host/db``; for a URL, ``index_dir`` says
        where this worker keeps its FAISS files. ``dim`` is the retrieval-embedding length and is
        fixed when the store is created. ``model_fingerprint`` (``icmem.models.model_fingerprint``)
        pins the base model whose slots the store accepts; when omitted the first slots added pin
        it.
        """
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise InvalidRecordError(f"dim must be a positive int, got {dim!r}")
        database, index_path, settings = Database.open(
            path_or_url,
            dim=dim,
            index_dir=index_dir,
            model_fingerprint=model_fingerprint,
            read_only=read_only,
            busy_timeout_s=busy_timeout_s,
        )
        shards = Shards(
            database, dim=dim, index_dir=index_path, policy=index_policy or IndexPolicy()
        )
        return cls(database, shards, dim=dim, model_fingerprint=settings.get("model_fingerprint"))

    def close(self) -> None:
        """Save changed indexes and release connections; the store stays valid on disk."""
        try:
            if not self.read_only:
                self.save_index()
        finally:
            self._database.dispose()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self._database.dialect

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine over the rows, for inspection, backups and connection tuning."""
        return self._database.engine

    @property
    def read_only(self) -> bool:
        return self._database.read_only

    @property
    def database_path(self) -> Path | None:
        """The SQLite database file (None for a URL store)."""
        return self._database.path

    @property
    def index_repairs(self) -> int:
        """Index shards rebuilt or caught up from the rows since open (for tests and stats)."""
        return self._index.repairs

    @property
    def index_save_interval_s(self) -> float:
        """A writer saves the indexes it keeps current at most this many seconds apart."""
        return self._index.save_interval_s

    @index_save_interval_s.setter
    def index_save_interval_s(self, seconds: float) -> None:
        self._index.save_interval_s = seconds

    # ------------------------------------------------------------------ writes

    def add(
        self, documents: Sequence[DocumentRecord], *, namespace: Sequence[str]
    ) -> list[AddedDocument]:
        """Add new documents with their spans in one transaction; an existing id is an error."""
        return self._write_documents(documents, namespace, replace=False)

    def upsert(
        self, documents: Sequence[DocumentRecord], *, namespace: Sequence[str]
    ) -> list[AddedDocument]:
        """Add documents, replacing (all spans of) any document whose id already exists."""
        return self._write_documents(documents, namespace, replace=True)

    def delete(
        self,
        *,
        namespace: Sequence[str],
        document_ids: Iterable[str] | None = None,
    ) -> int:
        """Delete documents by id within a namespace (exactly that one), or (no ids) every
        document under a namespace prefix such as ``(tenant,)``: the namespace itself and every
        namespace below it. Returns the number of documents deleted."""
        ns = validate_namespace(namespace, allow_prefix=document_ids is None)
        keys = None if document_ids is None else _document_keys(document_ids)
        with self._write() as session:
            removed: dict[int, tuple[list[int], int]] = {}  # namespace -> (span ids, old gen)
            deleted_documents = 0
            for row in self._select_namespaces(session, ns, exact=keys is not None):
                if keys is None:
                    deleted_documents += queries.delete_namespace(
                        session, row.id, token_key(row.id, "")
                    )
                    removed[row.id] = ([], row.generation)
                    continue
                doc_ids = list(queries.document_ids(session, row.id, keys).values())
                if doc_ids:
                    span_ids = queries.span_ids_of_documents(session, doc_ids)
                    queries.delete_documents(session, doc_ids)
                    removed[row.id] = (span_ids, queries.bump_generation(session, row.id) - 1)
                    deleted_documents += len(doc_ids)
        for ns_id, (span_ids, old_generation) in removed.items():
            if keys is None:
                self._index.forget(ns_id)
            else:
                self._index.apply_delta(ns_id, remove=span_ids, old_generation=old_generation)
        if keys is not None:
            self._index.keep_current(list(removed))
        return deleted_documents

    def update_metadata(
        self, updates: Mapping[str, Mapping[str, Any]], *, namespace: Sequence[str]
    ) -> int:
        """Replace the metadata of existing documents of exactly one namespace, keeping their
        spans, slots and embeddings: a change that needs no re-encoding (a LangGraph item's
        non-indexed fields, its timestamps) costs one row update, not a new compression.
        Documents that do not exist are skipped; returns the number updated."""
        ns = validate_namespace(namespace)
        if not isinstance(updates, Mapping):
            raise InvalidRecordError(
                f"updates must map document ids to metadata, got {type(updates).__name__}"
            )
        keys = _document_keys(list(updates))
        checked = {
            key: check_metadata(updates[key], f"metadata of document {key!r}") for key in keys
        }
        if not checked:
            return 0
        with self._write() as session:
            rows = self._select_namespaces(session, ns, exact=True)
            if not rows:
                return 0
            ns_id = rows[0].id
            found = queries.document_ids(session, ns_id, checked)
            # The old metadata is never read, so a damaged row is repaired, not an error.
            queries.set_metadata(session, {doc_id: checked[key] for key, doc_id in found.items()})
            # Filter answers are cached per generation: a metadata change must move it on.
            old_generation = queries.bump_generation(session, ns_id) - 1 if found else None
        if old_generation is not None:
            self._index.apply_delta(ns_id, old_generation=old_generation)
            self._index.keep_current([ns_id])
        return len(found)

    def assemble_document(
        self,
        document: DocumentRecord,
        *,
        parts_namespace: Sequence[str],
        namespace: Sequence[str],
    ) -> AddedDocument:
        """Make every span stored in ``parts_namespace`` (under documents of any ids) a span of
        ``document`` (given without spans) in exactly ``namespace``, replacing a document with
        its id there, and drop ``parts_namespace``: all in one transaction.

        This is how a document too large for one transaction is written: its parts are
        committed one by one in a namespace no reader of ``namespace`` looks at (an interrupted
        writer keeps them), and readers of ``namespace`` see the stored version, or none, until
        this call, then the whole new one. The parts' span positions must differ."""
        ns = validate_namespace(namespace)
        parts_ns = validate_namespace(parts_namespace)
        if document.spans or document.id is None or ns[: len(parts_ns)] == parts_ns:
            raise InvalidRecordError(
                "assemble_document takes a document with an id and no spans (its spans are the "
                "parts'), and a parts namespace that is not the document's namespace or above it"
            )
        (prepared,), _ = self._prepare([document])
        with self._write() as session:
            parts = self._select_namespaces(session, parts_ns, exact=True)
            if not parts:
                raise InvalidRecordError(
                    f"no parts of document {document.id!r} are stored in {parts_ns!r}; write "
                    "them first (or write the document whole with upsert)"
                )
            ns_id = queries.ensure_namespace(session, self.dialect, ns)
            queries.bump_generation(session, ns_id)
            doc_id, _ = self._put_document(session, ns_id, prepared, replace=True)
            queries.index_metadata(session, {doc_id: prepared.metadata})
            span_ids = queries.adopt_parts(
                session, parts[0].id, doc_id, ns_id, token_key(parts[0].id, "")
            )
        self._index.forget(parts[0].id)
        self._index.apply_delta(ns_id)  # no delta at hand: caught up from the rows
        self._index.keep_current([ns_id])
        return AddedDocument(id=prepared.key, span_ids=tuple(span_ids))

    # ------------------------------------------------------------------ reads

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        namespace: Sequence[str],
        filter: Mapping[str, Any] | None = None,
        filter_root: Sequence[str] = (),
    ) -> list[SearchHit]:
        """The ``k`` spans with the highest inner product with ``vector``, best first.

        ``namespace`` is a prefix: the spans of that namespace and of every namespace below it
        (``("acme",)`` covers ``("acme", "bot", "t1")``) and never any other are considered,
        also when a metadata ``filter`` is given (see ``store.filters``; ``filter_root`` as for
        ``list_documents``).
        """
        query = self._check_vectors(_one_vector(vector, "query vector"), "query vector")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise InvalidRecordError(f"k must be a positive int, got {k!r}")
        k = int(k)
        ns = validate_namespace(namespace, allow_prefix=True)
        where = compile_filter(filter, self.dialect, filter_root)
        with self._read() as session:
            snapshot = self._snapshots.under(session, ns)
            if not snapshot.rows:
                return []
            allowed = None
            if filter:
                allowed = self._index.allowed_spans(
                    session, snapshot, filter, where, tuple(filter_root)
                )
                if not any(len(ids) for ids in allowed.values()):
                    return []
            top = self._index.search(session, snapshot, query, k, allowed)
            rows = queries.hit_rows(session, [span_id for _, span_id in top], snapshot.ids)
        self._index.save_trained()
        # A span deleted by another process since the index was refreshed is left out.
        return _hits(top, rows, snapshot.names)

    def get_spans(self, span_ids: Sequence[int], *, namespace: Sequence[str]) -> list[SearchHit]:
        """The given spans as hits (score NaN: nothing was searched), in the order asked: how a
        chain that already retrieved spans hands them back to be read from their slots.

        ``namespace`` is a prefix; a span outside it, or gone, raises ``UnknownSpanError``."""
        wanted = _span_ids(span_ids)
        ns = validate_namespace(namespace, allow_prefix=True)
        with self._read() as session:
            namespaces = self._select_namespaces(session, ns)
            rows = queries.hit_rows(session, wanted, [row.id for row in namespaces])
        missing = [i for i in wanted if i not in rows]
        if missing:
            raise UnknownSpanError(
                f"no spans {missing[:10]} under namespace {list(ns)}: they were deleted or "
                "belong to another namespace; retrieve again for current span ids"
            )
        names = {row.id: decode_path(row.path) for row in namespaces}
        return _hits([(float("nan"), i) for i in wanted], rows, names)

    def get_slots(
        self, span_ids: Sequence[int], *, namespace: Sequence[str] | None = None
    ) -> list[SpanSlots]:
        """The encoded memory slots of the given spans, in the order asked, in one query.

        Give ``namespace`` (or a prefix) to refuse spans that live elsewhere. Every blob is
        verified against its checksum; a damaged one is left out of the answer with a
        ``StoreDamageWarning`` (so match the answer to its spans by ``span_id``), and listed by
        ``check()``.
        """
        wanted = _span_ids(span_ids)
        if not wanted:
            return []
        prefix = None
        if namespace is not None:
            prefix = validate_namespace(namespace, allow_prefix=True)
        with self._read() as session:
            found = queries.slot_rows(session, wanted, prefix)
        damaged = {span_id for span_id, row in found.items() if _slot_is_damaged(row)}
        if damaged:
            warn_damaged("slots", sorted(damaged), "left out of the answer", stacklevel=3)
        missing = [i for i in wanted if i not in found]
        if missing:
            raise UnknownSpanError(
                f"no memory slots for span ids {missing[:10]}: they were deleted, never had slots, "
                "or belong to another namespace; search again for current span ids"
            )
        return [
            SpanSlots(
                span_id=i,
                document_id=found[i].key,
                position=found[i].position,
                blob=bytes(found[i].blob),
                codec=found[i].codec,
                shape=(found[i].rows, found[i].cols),
                token_count=found[i].token_count,
            )
            for i in wanted
            if i not in damaged
        ]

    def list_documents(
        self,
        namespace: Sequence[str],
        *,
        exact: bool = False,
        filter: Mapping[str, Any] | None = None,
        filter_root: Sequence[str] = (),
    ) -> list[DocumentInfo]:
        """The documents under a namespace prefix (that namespace and every one below it), or
        with ``exact=True`` of that namespace only, in the order they were first added.
        Documents whose stored metadata is damaged are left out, with a warning.

        ``filter`` keeps the documents whose metadata matches it (``store.filters``), evaluated
        in SQL so that the cost follows the answer; ``filter_root`` makes its keys relative to
        nested metadata (``("item", "value")``: ``"color"`` is ``metadata["item"]["value"]
        ["color"]``)."""
        ns = validate_namespace(namespace, allow_prefix=not exact)
        where = None if filter is None else compile_filter(filter, self.dialect, filter_root)
        with self._read() as session:
            if exact:
                rows = self._select_namespaces(session, ns, exact=True)
                names = {row.id: decode_path(row.path) for row in rows}
            else:
                names = self._snapshots.under(session, ns).names
            if not names:
                rows = []
            elif where is None:
                rows = queries.document_rows(session, list(names))
            else:
                ids = queries.filtered_document_ids(
                    session, self._database.id_aggregate, list(names), where
                )
                rows = queries.document_rows_by_id(session, ids.tolist())
        return _document_infos(rows, names)

    def get_documents(
        self, document_ids: Sequence[str], *, namespace: Sequence[str]
    ) -> list[DocumentInfo]:
        """The documents of exactly this namespace with the given ids, in the order asked;
        ids that are not stored, or whose stored metadata is damaged (with a warning), are left
        out."""
        ns = validate_namespace(namespace)
        keys = _document_keys(document_ids)
        if not keys:
            return []
        with self._read() as session:
            names = {row.id: ns for row in self._select_namespaces(session, ns, exact=True)}
            rows = queries.document_rows(session, list(names), keys) if names else []
        found = {info.id: info for info in _document_infos(rows, names)}
        return [found[key] for key in keys if key in found]

    def list_namespaces(
        self,
        prefix: Sequence[str] | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        filter_root: Sequence[str] = (),
    ) -> list[Namespace]:
        """Every namespace written to and not deleted, optionally under a prefix; sorted.

        With ``filter`` (as for ``list_documents``), only the namespaces holding at least one
        document whose metadata matches it, found in SQL."""
        ns = () if prefix is None else validate_namespace(prefix, allow_prefix=True)
        where = None if filter is None else compile_filter(filter, self.dialect, filter_root)
        with self._read() as session:
            rows = self._select_namespaces(session, ns)
            if where is not None and rows:
                holding = queries.namespaces_holding(
                    session, self._database.id_aggregate, [row.id for row in rows], where
                )
                rows = [row for row in rows if row.id in holding]
        return sorted(decode_path(row.path) for row in rows)

    def stats(self, namespace: Sequence[str] | None = None) -> StoreStats:
        """Counts and byte sizes, of the whole store or of one namespace prefix."""
        ns = () if namespace is None else validate_namespace(namespace, allow_prefix=True)
        with self._read() as session:
            ns_ids = [row.id for row in self._select_namespaces(session, ns)]
            documents, spans, slot_bytes, embedding_bytes = queries.counts(session, ns_ids)
            database_bytes = self._database.nbytes(session)
        return StoreStats(
            namespaces=len(ns_ids),
            documents=int(documents),
            spans=int(spans),
            slot_bytes=int(slot_bytes),
            embedding_bytes=int(embedding_bytes),
            database_bytes=database_bytes,
            index_bytes=self._index.nbytes(),
        )

    def check(self, namespace: Sequence[str] | None = None) -> StoreCheck:
        """Read every stored row (of the store, or of a namespace prefix) and report what is
        damaged: slot blobs that fail their checksum, unusable embeddings, metadata that is not
        JSON and, for a whole SQLite store, pages its ``quick_check`` finds broken. Changes
        nothing; reads every slot blob, so it takes a while on a large store."""
        ns = () if namespace is None else validate_namespace(namespace, allow_prefix=True)
        problems: list[str] = []
        with self._read() as session:
            if not ns:
                problems = self._database.integrity_problems(session)
            namespaces = self._select_namespaces(session, ns)
            names = {row.id: decode_path(row.path) for row in namespaces}
            ns_ids = list(names)
            damaged_slots = [
                row.span_id
                for row in queries.slot_check_rows(session, ns_ids)
                if _slot_is_damaged(row)
            ]
            damaged_embeddings = [
                span_id
                for span_id, vector in queries.embedding_rows(session, ns_ids)
                if embedding_is_damaged(vector, self.dim)
            ]
            invalid_metadata = [
                (names[ns_id], key)
                for ns_id, key in queries.damaged_metadata_keys(session, self.dialect, ns_ids)
            ]
        return StoreCheck(
            damaged_slots=tuple(sorted(damaged_slots)),
            damaged_embeddings=tuple(sorted(damaged_embeddings)),
            invalid_metadata=tuple(invalid_metadata),
            database_problems=tuple(problems),
        )

    # ------------------------------------------------------------------ index upkeep

    def save_index(self) -> None:
        """Write every index changed since the last save; a crash before this only costs a
        catch-up on the next open, never data."""
        self._index.save()

    def rebuild_index(self) -> int:
        """Rebuild every namespace's index from the rows and save it; returns the span count.

        Never needed for correctness (stale or damaged indexes are repaired on use); useful after
        restoring a database backup without its index directory, or to retrain IVF lists."""
        return self._index.rebuild()

    def index_ids(self, namespace: Sequence[str]) -> np.ndarray:
        """The span ids the (refreshed) FAISS index of exactly this namespace holds; sorted."""
        ns = validate_namespace(namespace)
        with self._read() as session:
            rows = self._select_namespaces(session, ns, exact=True)
            if not rows:
                return np.empty(0, np.int64)
            return self._index.ids(session, rows[0].id, rows[0].generation)

    def span_ids(self, namespace: Sequence[str]) -> np.ndarray:
        """The span ids the rows hold for exactly this namespace; sorted."""
        ns = validate_namespace(namespace)
        with self._read() as session:
            rows = self._select_namespaces(session, ns, exact=True)
            if not rows:
                return np.empty(0, np.int64)
            return queries.span_ids_of_namespace(session, rows[0].id)

    # ------------------------------------------------------------------ async

    async def aadd(self, documents: Sequence[DocumentRecord], *, namespace: Sequence[str]):
        return await asyncio.to_thread(self.add, documents, namespace=namespace)

    async def aupsert(self, documents: Sequence[DocumentRecord], *, namespace: Sequence[str]):
        return await asyncio.to_thread(self.upsert, documents, namespace=namespace)

    async def adelete(self, **kwargs: Any) -> int:
        return await asyncio.to_thread(functools.partial(self.delete, **kwargs))

    async def asearch(self, vector: np.ndarray, k: int = 10, **kwargs: Any) -> list[SearchHit]:
        return await asyncio.to_thread(functools.partial(self.search, vector, k, **kwargs))

    async def aget_slots(self, span_ids: Sequence[int], **kwargs: Any) -> list[SpanSlots]:
        return await asyncio.to_thread(functools.partial(self.get_slots, span_ids, **kwargs))

    async def alist_documents(
        self, namespace: Sequence[str], *, exact: bool = False
    ) -> list[DocumentInfo]:
        return await asyncio.to_thread(
            functools.partial(self.list_documents, namespace, exact=exact)
        )

    async def aupdate_metadata(
        self, updates: Mapping[str, Mapping[str, Any]], *, namespace: Sequence[str]
    ) -> int:
        return await asyncio.to_thread(
            functools.partial(self.update_metadata, updates, namespace=namespace)
        )

    async def aget_documents(
        self, document_ids: Sequence[str], *, namespace: Sequence[str]
    ) -> list[DocumentInfo]:
        return await asyncio.to_thread(
            functools.partial(self.get_documents, document_ids, namespace=namespace)
        )

    async def alist_namespaces(self, prefix: Sequence[str] | None = None) -> list[Namespace]:
        return await asyncio.to_thread(self.list_namespaces, prefix)

    async def astats(self, namespace: Sequence[str] | None = None) -> StoreStats:
        return await asyncio.to_thread(self.stats, namespace)

    # ------------------------------------------------------------------ internals

    def _write_documents(
        self, documents: Sequence[DocumentRecord], namespace: Sequence[str], *, replace: bool
    ) -> list[AddedDocument]:
        ns = validate_namespace(namespace)
        prepared, fingerprint = self._prepare(documents)
        if not prepared:
            return []
        results: list[AddedDocument] = []
        with self._write() as session:
            if fingerprint is not None and self.model_fingerprint is None:
                self._pin_fingerprint(session, fingerprint)
            ns_id = queries.ensure_namespace(session, self.dialect, ns)
            old_generation = queries.bump_generation(session, ns_id) - 1
            removed: list[int] = []
            added_ids: list[int] = []
            added_vectors: list[np.ndarray] = []
            metadata: dict[int, dict[str, Any]] = {}
            for doc in prepared:
                doc_id, replaced = self._put_document(session, ns_id, doc, replace=replace)
                metadata[doc_id] = doc.metadata
                removed.extend(replaced)
                span_ids = queries.insert_spans(
                    session, ns_id, doc_id, doc.record.spans, doc.slot_rows, doc.vectors
                )
                results.append(AddedDocument(id=doc.key, span_ids=tuple(span_ids)))
                added_ids.extend(span_ids)
                added_vectors.append(doc.vectors)
            queries.index_metadata(session, metadata, new=not replace)
        if fingerprint is not None and self.model_fingerprint is None:
            self.model_fingerprint = fingerprint
        self._index.apply_delta(
            ns_id,
            remove=removed,
            add_ids=np.asarray(added_ids, np.int64),
            add_vectors=np.concatenate(added_vectors),
            old_generation=old_generation,
        )
        self._index.keep_current([ns_id])
        return results

    def _prepare(
        self, documents: Sequence[DocumentRecord]
    ) -> tuple[list[_PreparedDocument], str | None]:
        """Validate everything before the transaction opens, so bad input changes nothing."""
        if isinstance(documents, DocumentRecord):
            documents = [documents]
        prepared = []
        keys: set[str] = set()
        fingerprints: set[str] = set()
        for doc in documents:
            if not isinstance(doc, DocumentRecord):
                raise InvalidRecordError(
                    f"add takes DocumentRecord values, got {type(doc).__name__}"
                )
            key = doc.id or uuid.uuid4().hex
            if key in keys:
                raise InvalidRecordError(f"document id {key!r} appears twice in one call")
            keys.add(key)
            rows = [self._span_vector(s.embedding, key, s.position) for s in doc.spans]
            vectors = self._check_vectors(
                np.stack(rows) if rows else np.empty((0, self.dim), np.float32),
                f"embedding of document {key!r}",
            )
            slot_rows: list[dict[str, Any] | None] = []
            for span in doc.spans:
                header = self._check_slots(span.slots, key, span.position)
                if header is None or span.slots is None:
                    slot_rows.append(None)
                    continue
                fingerprints.add(header.fingerprint)
                slot_rows.append(
                    {
                        "codec": header.codec,
                        "dtype": "float32",
                        "rows": header.shape[0],
                        "cols": header.shape[1],
                        "model_fingerprint": header.fingerprint,
                        "blob": bytes(span.slots),
                    }
                )
            metadata = check_metadata(doc.metadata, f"metadata of document {key!r}")
            prepared.append(_PreparedDocument(doc, key, metadata, vectors, tuple(slot_rows)))
        if len(fingerprints) > 1:
            raise ForeignSlotsError(
                f"one call mixes slots from several base models {sorted(fingerprints)}; a store "
                "serves one model, so encode every span with the same model"
            )
        return prepared, next(iter(fingerprints), None)

    def _span_vector(self, embedding: Any, key: str, position: int) -> np.ndarray:
        vector = _one_vector(embedding, f"embedding of document {key!r} span {position}")[0]
        if vector.shape != (self.dim,):
            raise DimensionMismatchError(
                f"embedding of document {key!r} span {position} has length {vector.size} but "
                f"this store's embeddings have dim {self.dim}; embed with the store's embedding "
                "model (or open a store of that dim)"
            )
        return vector

    def _check_vectors(self, vectors: Any, what: str) -> np.ndarray:
        try:
            matrix = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidRecordError(f"{what} is not a numeric array: {exc}") from exc
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            got = matrix.shape[-1] if matrix.ndim else matrix.shape
            raise DimensionMismatchError(
                f"{what} has length {got} but this store's embeddings have dim {self.dim}; "
                "embed with the store's embedding model (or open a store of that dim)"
            )
        if not np.isfinite(matrix).all():
            raise InvalidRecordError(
                f"{what} contains NaN or infinity; check the embedding model's output"
            )
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
        if len(norms) and norms.max() > MAX_VECTOR_NORM:
            raise InvalidRecordError(
                f"{what} has norm {norms.max():.3g}, too large: inner products with it overflow "
                f"float32 (the limit is {MAX_VECTOR_NORM:.0e}); normalise the embeddings"
            )
        return np.ascontiguousarray(matrix)

    def _check_slots(self, blob: bytes | None, key: str, position: int) -> Any:
        if blob is None:
            return None
        try:
            header = verify_slot_blob(blob)  # the checksum too: a flipped bit must not be stored
        except SlotCodecError as exc:
            raise InvalidRecordError(
                f"slots of document {key!r} span {position} are not a valid slot blob: {exc}"
            ) from exc
        if self.model_fingerprint is not None and header.fingerprint != self.model_fingerprint:
            raise ForeignSlotsError(
                f"slots of document {key!r} span {position} come from base model "
                f"{header.fingerprint!r} but this store serves {self.model_fingerprint!r}; "
                "re-encode with the store's model or use a separate store for the other model"
            )
        return header

    def _pin_fingerprint(self, session: Session, fingerprint: str) -> None:
        stored = queries.pin_setting(session, self.dialect, "model_fingerprint", fingerprint)
        if stored != fingerprint:
            raise ForeignSlotsError(
                f"this store serves base model {stored!r} (pinned by another process); the "
                f"slots given come from {fingerprint!r}"
            )

    def _put_document(
        self, session: Session, ns_id: int, doc: _PreparedDocument, *, replace: bool
    ) -> tuple[int, list[int]]:
        record = doc.record
        # Only the id is read: a replaced document's old metadata may be damaged, and upsert
        # is how it is repaired.
        existing = queries.document_ids(session, ns_id, [doc.key]).get(doc.key)
        if existing is None:
            doc_id = queries.insert_document(
                session, ns_id, doc.key, record.source, doc.metadata, record.content_hash
            )
            return doc_id, []
        if not replace:
            raise DuplicateDocumentError(
                f"document {doc.key!r} already exists in this namespace; use upsert() to replace "
                "it or delete it first"
            )
        old_spans = queries.span_ids_of_documents(session, [existing])
        queries.replace_document(
            session, existing, record.source, doc.metadata, record.content_hash
        )
        return existing, old_spans

    def _select_namespaces(
        self, session: Session | Connection, ns: tuple[str, ...], *, exact: bool = False
    ) -> list[Any]:
        return queries.select_namespaces(session, ns, exact=exact)

    def _read(self) -> AbstractContextManager[Connection]:
        return self._database.read()

    def _write(self) -> AbstractContextManager[Session]:
        return self._database.write()


def _hits(
    scored: Sequence[tuple[float, int]], rows: Mapping[int, Any], names: Mapping[int, Namespace]
) -> list[SearchHit]:
    """SearchHits of ``(score, span_id)`` pairs whose rows were found, in the order given; a
    span whose document's metadata is damaged is left out, with a warning."""
    hits = []
    damaged: dict[tuple[Namespace, str], None] = {}
    for score, span_id in scored:
        row = rows.get(span_id)
        if row is None:
            continue
        metadata = parse_metadata(row.document_metadata)
        if metadata is None:
            damaged[names[row.namespace_id], row.key] = None
            continue
        hits.append(
            SearchHit(
                span_id=span_id,
                score=float(score),
                document_id=row.key,
                namespace=names[row.namespace_id],
                position=row.position,
                char_start=row.char_start,
                char_end=row.char_end,
                text=row.text,
                metadata=metadata,
                source=row.source,
            )
        )
    if damaged:
        warn_damaged_metadata(list(damaged), stacklevel=4)
    return hits


def _document_infos(rows: Sequence[Any], names: Mapping[int, Namespace]) -> list[DocumentInfo]:
    """DocumentInfos of document rows, in their order; damaged metadata left out, warned of."""
    infos = []
    damaged = []
    for row in rows:
        metadata = parse_metadata(row.document_metadata)
        if metadata is None:
            damaged.append((names[row.namespace_id], row.key))
            continue
        infos.append(
            DocumentInfo(
                id=row.key,
                namespace=names[row.namespace_id],
                source=row.source,
                metadata=metadata,
                content_hash=row.content_hash,
                span_count=int(row.span_count),
            )
        )
    if damaged:
        warn_damaged_metadata(damaged, stacklevel=4)
    return infos


def _numeric(values: Any, what: str) -> np.ndarray:
    """An array of real numbers as float32: complex, text, bool or object input is refused
    rather than silently cast (numpy drops imaginary parts and parses strings)."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{what} is not a numeric array: {exc}") from exc
    if array.dtype.kind == "c":
        raise InvalidRecordError(
            f"{what} is complex ({array.dtype}); embeddings must be real numbers"
        )
    if array.dtype.kind not in "iuf":
        raise InvalidRecordError(
            f"{what} must hold numbers (int or float), got an array of dtype {array.dtype}"
        )
    return array.astype(np.float32)


def _one_vector(values: Any, what: str) -> np.ndarray:
    """One vector as a (1, n) float32 array: a 1-D array, or a single (1, n) row. Anything else
    is refused, never flattened: a (4, 4) array is four vectors, not one of length 16 that
    happens to match a dim-16 store."""
    array = _numeric(values, what)
    if array.ndim == 1:
        return array.reshape(1, -1)
    if array.ndim == 2 and array.shape[0] == 1:
        return array
    raise InvalidRecordError(
        f"{what} must be one vector (a 1-D array), got an array of shape {array.shape}; pass "
        "each vector separately"
    )


def _span_ids(span_ids: Any) -> list[int]:
    if isinstance(span_ids, str | bytes) or not isinstance(span_ids, Iterable):
        raise InvalidRecordError(
            f"span ids must be a list of ints (from search hits), got {type(span_ids).__name__}"
        )
    wanted = []
    for span_id in span_ids:
        if isinstance(span_id, bool) or not isinstance(span_id, int | np.integer):
            raise InvalidRecordError(
                f"span ids are ints (from search hits), got span id {span_id!r}"
            )
        if not 0 < span_id <= INT64_MAX:
            raise InvalidRecordError(f"span id {span_id} is not a valid span id (1 to 2**63 - 1)")
        wanted.append(int(span_id))
    return wanted


def _document_keys(document_ids: Iterable[str]) -> list[str]:
    if isinstance(document_ids, str):
        raise InvalidRecordError("document_ids must be a list of ids, not one string")
    if not isinstance(document_ids, Iterable):
        raise InvalidRecordError(
            f"document_ids must be a list of ids, got {type(document_ids).__name__}"
        )
    keys = list(document_ids)
    if not all(isinstance(k, str) and k for k in keys):
        raise InvalidRecordError(f"document ids must be non-empty strings, got {keys!r}")
    for key in keys:
        check_text(key, "document id", max_chars=MAX_KEY_CHARS)
    return keys


def _slot_is_damaged(row: Any) -> bool:
    """Whether a stored slot blob fails its header or checksum, or disagrees with its row."""
    try:
        header = verify_slot_blob(row.blob)
    except SlotCodecError:
        return True
    return header.codec != row.codec or header.shape != (row.rows, row.cols)
