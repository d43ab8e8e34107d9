"""MemoryStore: documents, spans, memory slots and embeddings in SQL, found again through FAISS.

The rows are the truth and every write is one transaction: a document and all of its spans,
slots and embeddings land together or not at all. Each namespace carries a generation counter that
the same transaction increments; the FAISS index of a namespace records the generation it
reflects, so any process (or a reopened store) can tell that its index is behind and catch up by
comparing id sets, or rebuild it from ``icmem_embeddings`` when the index file is missing or
corrupt. Saved index files carry a token that the database records right after writing them; an
index whose token the database lacks (the database was restored from a backup, or the files come
from another store) is rebuilt, never caught up, since span ids may have been handed out again. See
``store.records`` for the values passed in and out, ``store.index`` for when the index
is exact and when it is IVF, and ``store.filters`` for the metadata filter language.

SQLite runs in WAL mode with a busy timeout and ``BEGIN IMMEDIATE`` for writes: many reader
processes and one writer at a time, none of them losing a write. On Postgres several writers may
work at once; the namespace row lock orders their generations.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    Engine,
    Integer,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    func,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DatabaseError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from icmem import __version__
from icmem.codec import SlotCodecError

from .errors import (
    DamagedStoreError,
    DimensionMismatchError,
    ForeignSlotsError,
    IndexFileError,
    InvalidRecordError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreDamageWarning,
    StoreError,
    StoreFullError,
    StoreReadError,
    StoreWriteError,
)
from .filters import compile_filter
from .index import IndexFiles, IndexPolicy, NamespaceIndex, id_member
from .namespaces import decode_path, encode_path, path_key, prefix_keys, validate_namespace
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
from .schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Base,
    DocumentRow,
    EmbeddingRow,
    NamespacePrefixRow,
    NamespaceRow,
    SchemaVersionRow,
    SettingRow,
    SlotRow,
    SpanRow,
)
from .slots import verify_slot_blob
from .validation import INT64_MAX, MAX_KEY_CHARS, check_metadata, check_text

__all__ = ["DuplicateDocumentError", "MemoryStore", "UnknownSpanError"]

DATABASE_FILE = "store.sqlite"
INDEX_DIR = "index"
_IN_CHUNK = 900  # ids per IN (...) clause, below SQLite's default parameter limit
_FILTER_CACHE_SIZE = 64  # filter answers kept (each one id array per namespace searched)
_PG_INIT_LOCK = 0x1C3E30  # advisory lock key serialising schema creation across workers
# Embeddings longer than this overflow float32 inner products (the product of two norms must stay
# below float32's 3.4e38); real embeddings are unit length or close to it.
MAX_VECTOR_NORM = 1e19


class DuplicateDocumentError(StoreError):
    """``add`` was given a document id that already exists in the namespace."""


class UnknownSpanError(StoreError, KeyError):
    """Span ids were asked for that do not exist (deleted, or outside the given namespace)."""

    def __str__(self) -> str:
        return str(self.args[0])


# Statements on the search path are built once: composing a select() costs more than running it.
_NAMESPACE_COLUMNS = select(NamespaceRow.id, NamespaceRow.path, NamespaceRow.generation)
_ALL_NAMESPACES = _NAMESPACE_COLUMNS.order_by(NamespaceRow.id)


# A prefix matches by equality on the leading characters of the encoded path, never LIKE: the
# encoding is prefix-free per label, so ("a",) cannot match ("ab",) (see store.namespaces).
def _path_starts_with(length: Any, prefix: Any) -> Any:
    # Both positions cast: Postgres has substr(text, integer, integer) only, and a driver may
    # send a Python int as bigint.
    start, length = cast(literal(1), Integer), cast(length, Integer)
    return func.substr(NamespaceRow.path, start, length) == prefix


# Found through the indexed prefix table, and checked against the path itself.
_NAMESPACES_UNDER_PREFIX = (
    _NAMESPACE_COLUMNS.join(NamespacePrefixRow, NamespacePrefixRow.namespace_id == NamespaceRow.id)
    .where(
        NamespacePrefixRow.prefix_key == bindparam("prefix_key"),
        _path_starts_with(bindparam("length"), bindparam("prefix")),
    )
    .order_by(NamespaceRow.id)
)
_NAMESPACE_EXACTLY = _NAMESPACE_COLUMNS.where(NamespaceRow.path_key == bindparam("path_key"))
_HIT_ROWS = (
    select(
        SpanRow.id,
        SpanRow.namespace_id,
        SpanRow.position,
        SpanRow.char_start,
        SpanRow.char_end,
        SpanRow.text,
        DocumentRow.key,
        DocumentRow.metadata_.label("document_metadata"),
        DocumentRow.source,
    )
    .join(DocumentRow, SpanRow.document_id == DocumentRow.id)
    .where(
        SpanRow.id.in_(bindparam("span_ids", expanding=True)),
        SpanRow.namespace_id.in_(bindparam("namespace_ids", expanding=True)),
    )
)


@dataclass(frozen=True)
class _PreparedDocument:
    record: DocumentRecord
    key: str
    metadata: dict[str, Any]  # a plain-JSON copy, checked the same way for every backend
    vectors: np.ndarray  # (n_spans, dim) float32
    slot_headers: tuple[Any, ...]


class MemoryStore:
    """Documents with spans, memory slots and embeddings; searched per namespace.

    Open with ``MemoryStore.open(...)``; use as a context manager (or call ``close()``) so the
    index is saved. A store that was not closed is still correct: its index is caught up on open.
    A writer keeps the indexes of the namespaces it writes to current and saves them at most
    ``index_save_interval_s`` seconds apart while it writes, so readers find them ready.
    """

    index_save_interval_s: float = 60.0

    def __init__(
        self,
        engine: Engine,
        *,
        dim: int,
        index_dir: Path,
        model_fingerprint: str | None,
        read_only: bool,
        policy: IndexPolicy,
        database_path: Path | None,
    ) -> None:
        self._engine = engine
        self.dim = dim
        self.model_fingerprint = model_fingerprint
        self.read_only = read_only
        self.database_path = database_path
        self._files = IndexFiles(index_dir, dim, policy)
        self._policy = policy
        self._shards: dict[int, NamespaceIndex] = {}
        self._dirty: set[int] = set()
        self._lock = threading.RLock()
        self._busy_timeout_s: float | None = None  # set for SQLite stores, to reopen the engine
        self._saved_at = time.monotonic()
        self._filter_cache: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()
        self._span_document_maps: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self.index_repairs = 0  # index shards rebuilt or caught up from the rows, for tests/stats

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
        policy = index_policy or IndexPolicy()
        text = os.fspath(path_or_url)
        database_path = None
        busy_timeout = None
        if "://" in text:
            url = make_url(text)
            if url.get_backend_name() == "sqlite":
                raise NotAStoreError(
                    "give a SQLite store as its directory, not a sqlite:// URL, so its index "
                    "files have a home beside it"
                )
            if index_dir is None:
                raise StoreError(
                    f"a store at {url.render_as_string(hide_password=True)} needs index_dir=... "
                    "(a local directory where this worker keeps the FAISS index files)"
                )
            engine = create_engine(url, pool_pre_ping=True)
        else:
            directory = Path(text)
            index_dir = directory / INDEX_DIR if index_dir is None else index_dir
            database_path = _prepare_directory(directory, read_only)
            if not database_path.exists():
                _create_database(database_path, dim, model_fingerprint, busy_timeout_s)
            elif _is_emptied(database_path):
                # Refused before SQLite opens it: a writable open would write a fresh header.
                raise _not_a_store_any_more(database_path)
            engine = _sqlite_engine(database_path, read_only, busy_timeout_s)
            busy_timeout = busy_timeout_s
        index_path = Path(index_dir)
        if not read_only:
            try:
                index_path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                engine.dispose()
                raise ReadOnlyStoreError(
                    f"cannot create index directory {index_path}: {exc.strerror}; fix its "
                    "permissions or open with read_only=True"
                ) from exc
        try:
            settings = _initialise(
                engine, dim, model_fingerprint, read_only, index_dir=index_path, create=False
            )
        except BaseException:
            engine.dispose()
            raise
        store = cls(
            engine,
            dim=dim,
            index_dir=index_path,
            model_fingerprint=settings.get("model_fingerprint"),
            read_only=read_only,
            policy=policy,
            database_path=database_path,
        )
        store._busy_timeout_s = busy_timeout
        return store

    def close(self) -> None:
        """Save changed indexes and release connections; the store stays valid on disk."""
        try:
            if not self.read_only:
                self.save_index()
        finally:
            self._engine.dispose()

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine over the rows, for inspection, backups and connection tuning."""
        return self._engine

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
                    deleted_documents += session.scalar(
                        select(func.count()).where(DocumentRow.namespace_id == row.id)
                    )
                    session.execute(delete(NamespaceRow).where(NamespaceRow.id == row.id))
                    session.execute(
                        delete(SettingRow).where(SettingRow.key.startswith(_token_key(row.id, "")))
                    )
                    removed[row.id] = ([], row.generation)
                    continue
                doc_ids = list(
                    session.scalars(
                        select(DocumentRow.id).where(
                            DocumentRow.namespace_id == row.id, DocumentRow.key.in_(keys)
                        )
                    )
                )
                if doc_ids:
                    span_ids = self._span_ids_of_documents(session, doc_ids)
                    session.execute(delete(DocumentRow).where(DocumentRow.id.in_(doc_ids)))
                    removed[row.id] = (span_ids, self._bump_generation(session, row.id) - 1)
                    deleted_documents += len(doc_ids)
        with self._lock:
            for ns_id, (span_ids, old_generation) in removed.items():
                if keys is None:
                    self._shards.pop(ns_id, None)
                    self._dirty.discard(ns_id)
                    self._files.remove(_shard_name(ns_id))
                else:
                    self._apply_delta(ns_id, remove=span_ids, old_generation=old_generation)
        if keys is not None:
            self._keep_index_current(list(removed))
        return deleted_documents

    # ------------------------------------------------------------------ reads

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        *,
        namespace: Sequence[str],
        filter: Mapping[str, Any] | None = None,
    ) -> list[SearchHit]:
        """The ``k`` spans with the highest inner product with ``vector``, best first.

        ``namespace`` is a prefix: the spans of that namespace and of every namespace below it
        (``("acme",)`` covers ``("acme", "bot", "t1")``) and never any other are considered,
        also when a metadata ``filter`` is given (see ``store.filters``).
        """
        query = self._check_vectors(_numeric(vector, "query vector").reshape(1, -1), "query vector")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise InvalidRecordError(f"k must be a positive int, got {k!r}")
        k = int(k)
        ns = validate_namespace(namespace, allow_prefix=True)
        where = compile_filter(filter, self.dialect)
        with self._read() as session:
            namespaces = self._select_namespaces(session, ns)
            if not namespaces:
                return []
            ns_ids = [row.id for row in namespaces]
            allowed = None
            if filter:
                allowed = self._allowed_spans(session, namespaces, filter, where)
                if not any(len(ids) for ids in allowed.values()):
                    return []
            scored: list[tuple[float, int]] = []
            with self._lock:
                for row in namespaces:
                    ns_allowed = None if allowed is None else allowed[row.id]
                    if ns_allowed is not None and not len(ns_allowed):
                        continue
                    shard = self._fresh_shard(session, row.id, row.generation)
                    scores, ids = shard.search(query, k, ns_allowed)
                    scored.extend(zip(scores.tolist(), ids.tolist(), strict=True))
            scored.sort(key=lambda pair: (-pair[0], pair[1]))
            top = scored[:k]
            rows = self._hit_rows(session, [span_id for _, span_id in top], ns_ids)
        names = {row.id: decode_path(row.path) for row in namespaces}
        hits = []
        for score, span_id in top:
            row = rows.get(span_id)
            if row is None:  # deleted by another process since the index was refreshed
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
                    metadata=row.document_metadata or {},
                    source=row.source,
                )
            )
        return hits

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
        statement = (
            select(
                SlotRow.span_id,
                SlotRow.blob,
                SlotRow.codec,
                SlotRow.rows,
                SlotRow.cols,
                SpanRow.position,
                SpanRow.token_count,
                DocumentRow.key,
            )
            .join(SpanRow, SlotRow.span_id == SpanRow.id)
            .join(DocumentRow, SpanRow.document_id == DocumentRow.id)
            .where(SlotRow.span_id.in_(sorted(set(wanted))))
        )
        if namespace is not None:
            ns = validate_namespace(namespace, allow_prefix=True)
            prefix = encode_path(ns)
            statement = (
                statement.join(NamespaceRow, SpanRow.namespace_id == NamespaceRow.id)
                .join(NamespacePrefixRow, NamespacePrefixRow.namespace_id == NamespaceRow.id)
                .where(
                    NamespacePrefixRow.prefix_key == path_key(prefix),
                    _path_starts_with(len(prefix), prefix),
                )
            )
        with self._read() as session:
            found = {row.span_id: row for row in session.execute(statement)}
        damaged = [span_id for span_id, row in found.items() if _slot_is_damaged(row)]
        if damaged:
            _warn_damaged("slots", damaged, "left out of the answer", stacklevel=3)
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
        self, namespace: Sequence[str], *, exact: bool = False
    ) -> list[DocumentInfo]:
        """The documents under a namespace prefix (that namespace and every one below it), or
        with ``exact=True`` of that namespace only, in the order they were first added."""
        ns = validate_namespace(namespace, allow_prefix=not exact)
        span_count = (
            select(func.count(SpanRow.id))
            .where(SpanRow.document_id == DocumentRow.id)
            .scalar_subquery()
        )
        with self._read() as session:
            names = {
                row.id: decode_path(row.path)
                for row in self._select_namespaces(session, ns, exact=exact)
            }
            if not names:
                return []
            rows = session.execute(
                select(
                    DocumentRow.key,
                    DocumentRow.namespace_id,
                    DocumentRow.source,
                    DocumentRow.metadata_.label("document_metadata"),
                    DocumentRow.content_hash,
                    span_count.label("span_count"),
                )
                .where(DocumentRow.namespace_id.in_(list(names)))
                .order_by(DocumentRow.id)
            ).all()
            return [
                DocumentInfo(
                    id=row.key,
                    namespace=names[row.namespace_id],
                    source=row.source,
                    metadata=row.document_metadata or {},
                    content_hash=row.content_hash,
                    span_count=int(row.span_count),
                )
                for row in rows
            ]

    def list_namespaces(self, prefix: Sequence[str] | None = None) -> list[Namespace]:
        """Every namespace written to and not deleted, optionally under a prefix; sorted."""
        ns = () if prefix is None else validate_namespace(prefix, allow_prefix=True)
        with self._read() as session:
            rows = self._select_namespaces(session, ns)
        return sorted(decode_path(row.path) for row in rows)

    def stats(self, namespace: Sequence[str] | None = None) -> StoreStats:
        """Counts and byte sizes, of the whole store or of one namespace prefix."""
        ns = () if namespace is None else validate_namespace(namespace, allow_prefix=True)
        with self._read() as session:
            ns_ids = [row.id for row in self._select_namespaces(session, ns)]
            documents = spans = slot_bytes = embedding_bytes = 0
            for chunk in _chunks(ns_ids):
                documents += session.scalar(
                    select(func.count()).where(DocumentRow.namespace_id.in_(chunk))
                )
                spans += session.scalar(select(func.count()).where(SpanRow.namespace_id.in_(chunk)))
                slot_bytes += session.scalar(
                    select(func.coalesce(func.sum(func.length(SlotRow.blob)), 0))
                    .join(SpanRow, SlotRow.span_id == SpanRow.id)
                    .where(SpanRow.namespace_id.in_(chunk))
                )
                embedding_bytes += session.scalar(
                    select(func.coalesce(func.sum(func.length(EmbeddingRow.vector)), 0)).where(
                        EmbeddingRow.namespace_id.in_(chunk)
                    )
                )
            database_bytes = self._database_bytes(session)
        return StoreStats(
            namespaces=len(ns_ids),
            documents=int(documents),
            spans=int(spans),
            slot_bytes=int(slot_bytes),
            embedding_bytes=int(embedding_bytes),
            database_bytes=database_bytes,
            index_bytes=self._files.nbytes(),
        )

    def check(self, namespace: Sequence[str] | None = None) -> StoreCheck:
        """Read every stored row (of the store, or of a namespace prefix) and report what is
        damaged: slot blobs that fail their checksum, unusable embeddings, metadata that is not
        JSON and, for a whole SQLite store, pages its ``quick_check`` finds broken. Changes
        nothing; reads every slot blob, so it takes a while on a large store."""
        ns = () if namespace is None else validate_namespace(namespace, allow_prefix=True)
        damaged_slots: list[int] = []
        damaged_embeddings: list[int] = []
        invalid_metadata: list[tuple[Namespace, str]] = []
        problems: list[str] = []
        with self._read() as session:
            if not ns and self.dialect == "sqlite":
                found = [row[0] for row in session.exec_driver_sql("PRAGMA quick_check")]
                problems = [] if found == ["ok"] else [str(p) for p in found]
            namespaces = self._select_namespaces(session, ns)
            names = {row.id: decode_path(row.path) for row in namespaces}
            streaming = session.execution_options(yield_per=64)
            for chunk in _chunks(list(names)):
                slots = streaming.execute(
                    select(SlotRow.span_id, SlotRow.blob, SlotRow.codec, SlotRow.rows, SlotRow.cols)
                    .join(SpanRow, SlotRow.span_id == SpanRow.id)
                    .where(SpanRow.namespace_id.in_(chunk))
                )
                damaged_slots.extend(row.span_id for row in slots if _slot_is_damaged(row))
                vectors = streaming.execute(
                    select(EmbeddingRow.span_id, EmbeddingRow.vector).where(
                        EmbeddingRow.namespace_id.in_(chunk)
                    )
                )
                damaged_embeddings.extend(
                    span_id for span_id, vector in vectors if self._embedding_is_damaged(vector)
                )
                if self.dialect == "sqlite":
                    invalid = session.execute(
                        select(DocumentRow.namespace_id, DocumentRow.key).where(
                            DocumentRow.namespace_id.in_(chunk),
                            func.json_valid(DocumentRow.metadata_) == 0,
                        )
                    )
                    invalid_metadata.extend((names[ns_id], key) for ns_id, key in invalid)
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
        if self.read_only:
            raise ReadOnlyStoreError("the store was opened read_only=True; its index is not saved")
        with self._lock:
            saved: list[tuple[int, NamespaceIndex, str]] = []
            for ns_id in sorted(self._dirty):
                shard = self._shards.get(ns_id)
                if shard is not None:
                    token = uuid.uuid4().hex
                    self._files.save(_shard_name(ns_id), shard, token)
                    saved.append((ns_id, shard, token))
                self._dirty.discard(ns_id)
            if saved:
                self._record_index_tokens(saved)
            self._saved_at = time.monotonic()

    def _record_index_tokens(self, saved: list[tuple[int, NamespaceIndex, str]]) -> None:
        """Tie freshly saved index files to this database: it holds one row per saved token,
        replacing the token the index was loaded with. A database restored from a backup taken
        before the save lacks the row, and the index is then rebuilt rather than trusted: its
        span ids may have been handed out again, to other documents. A crash before this commit
        leaves files whose token the database lacks, which also reads as "rebuild"."""
        with self._write() as session:
            for ns_id, shard, token in saved:
                if shard.token is not None:
                    session.execute(
                        delete(SettingRow).where(SettingRow.key == _token_key(ns_id, shard.token))
                    )
                session.execute(
                    SettingRow.__table__.insert().values(
                        key=_token_key(ns_id, token), value=str(shard.generation)
                    )
                )
        for _ns_id, shard, token in saved:
            shard.token = token

    def rebuild_index(self) -> int:
        """Rebuild every namespace's index from the rows and save it; returns the span count.

        Never needed for correctness (stale or damaged indexes are repaired on use); useful after
        restoring a database backup without its index directory, or to retrain IVF lists."""
        with self._read() as session, self._lock:
            for ns_id in list(self._shards):
                self._files.remove(_shard_name(ns_id))
            self._shards.clear()
            self._dirty.clear()
            total = 0
            for row in self._select_namespaces(session, ()):
                self._files.remove(_shard_name(row.id))
                total += self._fresh_shard(session, row.id, row.generation).ntotal
        if not self.read_only:
            self.save_index()
        return total

    def index_ids(self, namespace: Sequence[str]) -> np.ndarray:
        """The span ids the (refreshed) FAISS index of exactly this namespace holds; sorted."""
        ns = validate_namespace(namespace)
        with self._read() as session, self._lock:
            rows = self._select_namespaces(session, ns, exact=True)
            if not rows:
                return np.empty(0, np.int64)
            return self._fresh_shard(session, rows[0].id, rows[0].generation).ids()

    def span_ids(self, namespace: Sequence[str]) -> np.ndarray:
        """The span ids the rows hold for exactly this namespace; sorted."""
        ns = validate_namespace(namespace)
        with self._read() as session:
            rows = self._select_namespaces(session, ns, exact=True)
            if not rows:
                return np.empty(0, np.int64)
            ids = session.scalars(select(SpanRow.id).where(SpanRow.namespace_id == rows[0].id))
            return np.sort(np.fromiter(ids, dtype=np.int64))

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
            ns_id = self._ensure_namespace(session, ns)
            old_generation = self._bump_generation(session, ns_id) - 1
            removed: list[int] = []
            added_ids: list[int] = []
            added_vectors: list[np.ndarray] = []
            for doc in prepared:
                doc_id, replaced = self._put_document(session, ns_id, doc, replace=replace)
                removed.extend(replaced)
                span_ids = self._insert_spans(session, ns_id, doc_id, doc)
                results.append(AddedDocument(id=doc.key, span_ids=tuple(span_ids)))
                added_ids.extend(span_ids)
                added_vectors.append(doc.vectors)
        if fingerprint is not None and self.model_fingerprint is None:
            self.model_fingerprint = fingerprint
        with self._lock:
            self._apply_delta(
                ns_id,
                remove=removed,
                add_ids=np.asarray(added_ids, np.int64),
                add_vectors=np.concatenate(added_vectors),
                old_generation=old_generation,
            )
        self._keep_index_current([ns_id])
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
            headers = []
            for span in doc.spans:
                header = self._check_slots(span.slots, key, span.position)
                if header is not None:
                    fingerprints.add(header.fingerprint)
                headers.append(header)
            metadata = check_metadata(doc.metadata, f"metadata of document {key!r}")
            prepared.append(_PreparedDocument(doc, key, metadata, vectors, tuple(headers)))
        if len(fingerprints) > 1:
            raise ForeignSlotsError(
                f"one call mixes slots from several base models {sorted(fingerprints)}; a store "
                "serves one model, so encode every span with the same model"
            )
        return prepared, next(iter(fingerprints), None)

    def _span_vector(self, embedding: Any, key: str, position: int) -> np.ndarray:
        vector = _numeric(embedding, f"embedding of document {key!r} span {position}").ravel()
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
        # Concurrent first writers may race to pin; the first insert wins, the rest compare.
        insert = postgres_insert if self.dialect == "postgresql" else sqlite_insert
        session.execute(
            insert(SettingRow)
            .values(key="model_fingerprint", value=fingerprint)
            .on_conflict_do_nothing()
        )
        stored = session.scalar(
            select(SettingRow.value).where(SettingRow.key == "model_fingerprint")
        )
        if stored != fingerprint:
            raise ForeignSlotsError(
                f"this store serves base model {stored!r} (pinned by another process); the "
                f"slots given come from {fingerprint!r}"
            )

    def _ensure_namespace(self, session: Session, ns: tuple[str, ...]) -> int:
        path = encode_path(ns)
        key = path_key(path)
        insert = postgres_insert if self.dialect == "postgresql" else sqlite_insert
        created = session.scalar(
            insert(NamespaceRow)
            .values(path=path, depth=len(ns), path_key=key, generation=0)
            .on_conflict_do_nothing()
            .returning(NamespaceRow.id)
        )
        if created is not None:  # a new namespace: list it under each of its prefixes
            session.execute(
                NamespacePrefixRow.__table__.insert(),
                [{"prefix_key": k, "namespace_id": created} for k in prefix_keys(ns)],
            )
            return created
        return session.scalar(select(NamespaceRow.id).where(NamespaceRow.path_key == key))

    def _bump_generation(self, session: Session, ns_id: int) -> int:
        return session.scalar(
            update(NamespaceRow)
            .where(NamespaceRow.id == ns_id)
            .values(generation=NamespaceRow.generation + 1)
            .returning(NamespaceRow.generation)
        )

    def _put_document(
        self, session: Session, ns_id: int, doc: _PreparedDocument, *, replace: bool
    ) -> tuple[int, list[int]]:
        record = doc.record
        existing = session.scalar(
            select(DocumentRow).where(DocumentRow.namespace_id == ns_id, DocumentRow.key == doc.key)
        )
        if existing is None:
            row = DocumentRow(
                namespace_id=ns_id,
                key=doc.key,
                source=record.source,
                metadata_=doc.metadata,
                content_hash=record.content_hash,
            )
            session.add(row)
            session.flush()
            return row.id, []
        if not replace:
            raise DuplicateDocumentError(
                f"document {doc.key!r} already exists in this namespace; use upsert() to replace "
                "it or delete it first"
            )
        old_spans = self._span_ids_of_documents(session, [existing.id])
        session.execute(delete(SpanRow).where(SpanRow.document_id == existing.id))
        existing.source = record.source
        existing.metadata_ = doc.metadata
        existing.content_hash = record.content_hash
        session.flush()
        return existing.id, old_spans

    def _insert_spans(
        self, session: Session, ns_id: int, doc_id: int, doc: _PreparedDocument
    ) -> list[int]:
        spans = doc.record.spans
        if not spans:
            return []
        span_ids = list(
            session.scalars(
                SpanRow.__table__.insert().returning(SpanRow.id, sort_by_parameter_order=True),
                [
                    {
                        "document_id": doc_id,
                        "namespace_id": ns_id,
                        "position": s.position,
                        "char_start": s.char_start,
                        "char_end": s.char_end,
                        "text": s.text,
                        "token_count": s.token_count,
                        "content_id": s.content_id,
                    }
                    for s in spans
                ],
            )
        )
        slot_rows = [
            {
                "span_id": span_id,
                "codec": header.codec,
                "dtype": "float32",
                "rows": header.shape[0],
                "cols": header.shape[1],
                "model_fingerprint": header.fingerprint,
                "blob": bytes(span.slots),
            }
            for span_id, span, header in zip(span_ids, spans, doc.slot_headers, strict=True)
            if header is not None
        ]
        if slot_rows:
            session.execute(SlotRow.__table__.insert(), slot_rows)
        session.execute(
            EmbeddingRow.__table__.insert(),
            [
                {
                    "span_id": span_id,
                    "namespace_id": ns_id,
                    "vector": vector.astype("<f4").tobytes(),
                }
                for span_id, vector in zip(span_ids, doc.vectors, strict=True)
            ],
        )
        return span_ids

    def _span_ids_of_documents(self, session: Session, doc_ids: list[int]) -> list[int]:
        span_ids: list[int] = []
        for chunk in _chunks(doc_ids):
            span_ids.extend(
                session.scalars(select(SpanRow.id).where(SpanRow.document_id.in_(chunk)))
            )
        return span_ids

    def _select_namespaces(
        self, session: Session | Connection, ns: tuple[str, ...], *, exact: bool = False
    ) -> list[Any]:
        """The namespaces under a prefix (``()``: all of them), or only ``ns`` itself."""
        if not ns:
            return list(session.execute(_ALL_NAMESPACES))
        path = encode_path(ns)
        if exact:
            return list(session.execute(_NAMESPACE_EXACTLY, {"path_key": path_key(path)}))
        parameters = {"prefix_key": path_key(path), "length": len(path), "prefix": path}
        return list(session.execute(_NAMESPACES_UNDER_PREFIX, parameters))

    def _hit_rows(
        self, session: Session | Connection, span_ids: list[int], ns_ids: list[int]
    ) -> dict[int, Any]:
        if not span_ids:
            return {}
        rows = session.execute(_HIT_ROWS, {"span_ids": span_ids, "namespace_ids": ns_ids})
        return {row.id: row for row in rows}

    def _fresh_shard(
        self, session: Session | Connection, ns_id: int, generation: int
    ) -> NamespaceIndex:
        """The namespace's index, loaded, caught up or rebuilt until it reflects ``generation``."""
        shard = self._shards.get(ns_id)
        if shard is None:
            try:
                shard = self._files.load(_shard_name(ns_id))
                if not self._index_belongs_here(session, ns_id, shard.token):
                    raise IndexFileError("the index files were saved against another database")
            except IndexFileError:
                shard = NamespaceIndex(self.dim, self._policy, generation=-1)
            self._shards[ns_id] = shard
        if shard.generation != generation:
            self._catch_up(session, ns_id, shard)
            shard.generation = generation
            self._dirty.add(ns_id)
            self.index_repairs += 1
        return shard

    def _allowed_spans(
        self,
        session: Connection,
        namespaces: list[Any],
        filter_: Mapping[str, Any],
        where: Any,
    ) -> dict[int, np.ndarray]:
        """The span ids, per namespace, whose document matches a metadata filter.

        The filter runs once per document (not per span) and comes back as one aggregated value
        rather than a row per id; a per-namespace span -> document map turns documents into
        spans. Both the map and each filter's answer are kept for the namespace's generation, so
        a filter asked again before the namespace changes costs nothing: this is what keeps a
        filtered search within a small factor of an unfiltered one.
        """
        key = (tuple((row.id, row.generation) for row in namespaces), _filter_key(filter_))
        with self._lock:
            cached = self._filter_cache.get(key)
            if cached is not None:
                self._filter_cache.move_to_end(key)
                return cached
        ns_ids = [row.id for row in namespaces]
        documents = _id_array(
            session.scalar(
                select(self._id_aggregate(DocumentRow.id)).where(
                    DocumentRow.namespace_id.in_(ns_ids), where
                )
            )
        )
        allowed = {}
        for row in namespaces:
            span_ids, span_documents = self._span_documents(session, row.id, row.generation)
            allowed[row.id] = span_ids[id_member(span_documents, documents)]
        with self._lock:
            self._filter_cache[key] = allowed
            while len(self._filter_cache) > _FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        return allowed

    def _span_documents(
        self, session: Connection, ns_id: int, generation: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Span ids of a namespace and their documents' row ids, aligned; kept per generation."""
        with self._lock:
            cached = self._span_document_maps.get(ns_id)
            if cached is not None and cached[0] == generation:
                return cached[1], cached[2]
        span_ids, documents = session.execute(
            select(
                self._id_aggregate(SpanRow.id, order_by=SpanRow.id),
                self._id_aggregate(SpanRow.document_id, order_by=SpanRow.id),
            ).where(SpanRow.namespace_id == ns_id)
        ).one()
        span_ids, documents = _id_array(span_ids), _id_array(documents)
        with self._lock:
            self._span_document_maps[ns_id] = (generation, span_ids, documents)
        return span_ids, documents

    def _id_aggregate(self, column: Any, order_by: Any = None) -> Any:
        """All values of an integer column as one value: a Postgres array, a SQLite JSON array
        (one aggregate, parsed in C, instead of a Python row per id)."""
        if self.dialect == "postgresql":
            return func.array_agg(
                aggregate_order_by(column, order_by) if order_by is not None else column
            )
        return func.json_group_array(column)

    def _keep_index_current(self, ns_ids: list[int]) -> None:
        """After a write: load (or build) the indexes of the namespaces written to, so that they
        follow this writer's changes, and save them every ``index_save_interval_s``. Otherwise a
        process that only writes leaves the saved index behind, and every reader that opens the
        store afterwards catches it up (or, with no index saved at all, builds it) on its own."""
        with self._lock:
            stale = [n for n in ns_ids if n not in self._shards or self._shards[n].generation < 0]
        if stale:
            with self._read() as session, self._lock:
                rows = session.execute(
                    select(NamespaceRow.id, NamespaceRow.generation).where(
                        NamespaceRow.id.in_(stale)
                    )
                ).all()
                for ns_id, generation in rows:
                    self._fresh_shard(session, ns_id, generation)
        if self._dirty and time.monotonic() - self._saved_at >= self.index_save_interval_s:
            self.save_index()

    def _index_belongs_here(
        self, session: Session | Connection, ns_id: int, token: str | None
    ) -> bool:
        if token is None:
            return False
        key = _token_key(ns_id, token)
        return session.scalar(select(SettingRow.key).where(SettingRow.key == key)) is not None

    def _catch_up(self, session: Session | Connection, ns_id: int, shard: NamespaceIndex) -> None:
        """Make the index hold exactly the namespace's embedding rows. Span ids are never reused
        and embeddings never change in place, so comparing id sets finds every difference."""
        stored = np.fromiter(
            session.scalars(select(EmbeddingRow.span_id).where(EmbeddingRow.namespace_id == ns_id)),
            dtype=np.int64,
        )
        indexed = shard.ids()
        shard.remove(np.setdiff1d(indexed, stored, assume_unique=True))
        missing = np.setdiff1d(stored, indexed, assume_unique=True)
        ids: list[int] = []
        vectors: list[bytes] = []
        damaged: list[int] = []
        for chunk in _chunks(missing.tolist()):
            for span_id, vector in session.execute(
                select(EmbeddingRow.span_id, EmbeddingRow.vector).where(
                    EmbeddingRow.span_id.in_(chunk)
                )
            ):
                if self._embedding_is_damaged(vector):
                    damaged.append(span_id)
                    continue
                ids.append(span_id)
                vectors.append(vector)
        if damaged:
            _warn_damaged("embeddings", damaged, "left out of searches")
        if ids:
            matrix = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(len(ids), self.dim)
            shard.add(np.asarray(ids, np.int64), matrix)

    def _embedding_is_damaged(self, vector: bytes | None) -> bool:
        if vector is None or len(vector) != 4 * self.dim:
            return True
        values = np.frombuffer(vector, dtype="<f4").astype(np.float64)
        return not np.isfinite(values).all() or float(np.linalg.norm(values)) > MAX_VECTOR_NORM

    def _apply_delta(
        self,
        ns_id: int,
        *,
        remove: Sequence[int] = (),
        add_ids: np.ndarray | None = None,
        add_vectors: np.ndarray | None = None,
        old_generation: int | None = None,
    ) -> None:
        """Apply a committed write to a loaded index. An index that was not exactly one write
        behind is left for ``_fresh_shard`` to catch up from the rows on its next use."""
        shard = self._shards.get(ns_id)
        if shard is None and old_generation == 0:
            shard = self._shards[ns_id] = NamespaceIndex(self.dim, self._policy, generation=0)
        if shard is None:
            return
        if old_generation is None or shard.generation != old_generation:
            # Another thread may already have caught this index up from the rows (including
            # this write), so applying the delta could add its ids twice: catch up instead.
            shard.generation = -1
            return
        shard.remove(np.asarray(remove, np.int64))
        if add_ids is not None and len(add_ids):
            # Under READ COMMITTED a concurrent catch-up can read this write's rows yet label the
            # index with the generation before it, so skip ids the index already holds.
            fresh = ~np.isin(add_ids, shard.ids())
            if fresh.any():
                shard.add(add_ids[fresh], add_vectors[fresh])
        shard.generation = old_generation + 1
        self._dirty.add(ns_id)

    def _database_bytes(self, session: Session | Connection) -> int:
        if self.database_path is not None:
            paths = [
                self.database_path,
                *(self.database_path.with_name(self.database_path.name + s) for s in ("-wal",)),
            ]
            return sum(p.stat().st_size for p in paths if p.exists())
        if self.dialect == "postgresql":
            total = 0
            for table in Base.metadata.sorted_tables:
                total += session.scalar(select(func.pg_total_relation_size(table.name)))
            return int(total)
        return 0

    def _follow_new_writers(self) -> None:
        """An ``immutable=1`` engine (read-only directory, empty WAL at open) would read the
        database file under a writer that started since and miss or garble its writes; once the
        WAL holds writes, reopen in the mode that reads them."""
        path = self.database_path
        if path is None or "immutable=1" not in str(self._engine.url):
            return
        if _wal_holds_writes(path):
            with self._lock:
                if "immutable=1" in str(self._engine.url):
                    old = self._engine
                    self._engine = _sqlite_engine(path, True, self._busy_timeout_s or 30.0)
                    old.dispose()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        self._follow_new_writers()
        try:
            with self._engine.connect() as connection, connection.begin():
                yield connection
        except DatabaseError as exc:
            raise _translate(exc, reading=True) from exc

    @contextmanager
    def _write(self) -> Iterator[Session]:
        if self.read_only:
            raise ReadOnlyStoreError(
                "the store was opened read_only=True; open it without read_only to write"
            )
        try:
            with (
                self._engine.connect().execution_options(icmem_write=True) as connection,
                Session(bind=connection) as session,
                session.begin(),
            ):
                yield session
        except (OperationalError, DatabaseError) as exc:
            raise _translate(exc) from exc


def _shard_name(ns_id: int) -> str:
    return f"namespace-{ns_id}"


def _token_key(ns_id: int, token: str) -> str:
    return f"index:{ns_id}:{token}"  # at most 58 characters: SettingRow.key is String(64)


def _filter_key(filter_: Mapping[str, Any]) -> str:
    # Keys are checked strings and values JSON scalars by now; sorting keys keeps the meaning
    # (the keys of a mapping are ANDed) and distinguishes 1, 1.0 and true as the filter does.
    return json.dumps(filter_, sort_keys=True, separators=(",", ":"))


def _id_array(value: Any) -> np.ndarray:
    if value is None:
        return np.empty(0, np.int64)
    if isinstance(value, str):
        value = json.loads(value)
    return np.asarray(value, dtype=np.int64)


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


def _chunks(items: Sequence[int]) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


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


def _warn_damaged(what: str, span_ids: Sequence[int], effect: str, stacklevel: int = 4) -> None:
    shown = sorted(span_ids)[:20]
    more = f" and {len(span_ids) - len(shown)} more" if len(span_ids) > len(shown) else ""
    warnings.warn(
        f"the stored {what} of span ids {shown}{more} are damaged and were {effect}; the rest of "
        "the store is unaffected. List every damaged row with `icmem store stats --check` (or "
        "MemoryStore.check()) and re-add the documents they belong to",
        StoreDamageWarning,
        stacklevel=stacklevel,
    )


def _translate(exc: SQLAlchemyError, *, reading: bool = False) -> StoreError:
    message = str(getattr(exc, "orig", exc)).lower()
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if "disk is full" in message or "disk full" in message or code == "53100":
        return StoreFullError(
            "the database is full (no space left on the device or its size limit); the failed "
            "call was rolled back and the store is as it was: free space, then retry"
        )
    if "readonly" in message or "read-only" in message:
        return ReadOnlyStoreError(
            "the database refused a write because it is read-only; fix the file and directory "
            "permissions or open with read_only=True to only search"
        )
    if "database is locked" in message:
        return StoreWriteError(
            "another process held the store's write lock past the busy timeout; retry, or raise "
            "busy_timeout_s in MemoryStore.open"
        )
    if "malformed json" in message:
        return DamagedStoreError(
            f"a document's stored metadata is not valid JSON ({message}); find it with "
            "`icmem store stats --check` and re-add that document"
        )
    if "malformed" in message or "corrupt" in message:
        return DamagedStoreError(
            f"the store's database file is damaged ({message}); nothing was changed. Copy the "
            "store directory aside, then run `sqlite3 store.sqlite .recover` on the copy to "
            "salvage the rows, or restore the directory from a backup"
        )
    if "not a database" in message:
        return NotAStoreError(
            f"the store's database file is not a readable SQLite database ({message}); restore it "
            "from a backup or open another directory"
        )
    if reading:
        return StoreReadError(f"the database refused a read: {message}")
    return StoreWriteError(f"the database refused the operation: {message}")


def _prepare_directory(directory: Path, read_only: bool) -> Path:
    if directory.exists() and not directory.is_dir():
        raise NotAStoreError(
            f"{directory} is a file, not a store; a store is a directory holding {DATABASE_FILE} "
            "and index/ (pass a new or empty directory to create one)"
        )
    database = directory / DATABASE_FILE
    if not database.exists():
        if read_only:
            raise NotAStoreError(f"no store at {directory} ({DATABASE_FILE} is missing)")
        if (directory / INDEX_DIR).exists():
            raise NotAStoreError(
                f"{directory} holds an {INDEX_DIR}/ but no {DATABASE_FILE}: the store's database "
                "was deleted or moved, and the index alone cannot restore documents. Put "
                f"{DATABASE_FILE} back (restore it from a backup); to start a new store, use a new "
                "directory"
            )
        if directory.is_dir() and any(
            not _is_creation_leftover(p.name) for p in directory.iterdir()
        ):
            raise NotAStoreError(
                f"{directory} is not empty and holds no {DATABASE_FILE}, so it is not a store; "
                "create the store in a new or empty directory"
            )
    if not read_only:
        if directory.is_dir() and not os.access(directory, os.W_OK):
            raise ReadOnlyStoreError(
                f"store directory {directory} is not writable; fix its permissions, or open with "
                "read_only=True to search without writing"
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReadOnlyStoreError(
                f"cannot create store directory {directory}: {exc.strerror}"
            ) from exc
    return database


def _is_creation_leftover(name: str) -> bool:
    return name.startswith(f".{DATABASE_FILE}.") and ".new" in name


def _create_database(
    database: Path, dim: int, model_fingerprint: str | None, busy_timeout_s: float
) -> None:
    """Create a new store's database atomically: build it whole under a temporary name, then link
    it into place. So ``store.sqlite`` never exists without its schema, and a file there without
    one (emptied, truncated, replaced) is always damage, never a store to initialise."""
    temporary = database.with_name(f".{DATABASE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new")
    engine = _sqlite_engine(temporary, False, busy_timeout_s)
    try:
        _initialise(engine, dim, model_fingerprint, False, index_dir=None, create=True)
    finally:
        engine.dispose()
    try:
        os.link(temporary, database)  # fails if another process created the store first
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: rename, checking first
        if not database.exists():
            os.replace(temporary, database)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)
    try:
        descriptor = os.open(database.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)  # the new directory entry survives a power cut
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _wal_holds_writes(database: Path) -> bool:
    wal = database.with_name(database.name + "-wal")
    try:
        return wal.stat().st_size > 0
    except OSError:
        return False


def _read_only_mode(database: Path) -> str:
    """How to open a store read-only without missing a committed write.

    ``mode=ro`` reads the WAL too, but needs the WAL's shared-memory file (``-shm``): it creates
    one in a writable directory, and in a read-only one reads an existing one (even one it may not
    write, by copying the WAL index into private memory). Only when the directory is read-only
    and the WAL holds nothing is ``immutable=1`` safe and needed: then every committed write is
    in the database file itself. A WAL with writes but no readable ``-shm`` cannot be read at all,
    so the open is refused rather than silently answered from the older database file.
    """
    if os.access(database.parent, os.W_OK) or not _wal_holds_writes(database):
        return "mode=ro" if os.access(database.parent, os.W_OK) else "mode=ro&immutable=1"
    shm = database.with_name(database.name + "-shm")
    if not os.access(shm, os.R_OK):
        raise ReadOnlyStoreError(
            f"{database.name}-wal holds committed writes (left by a writer that is still running "
            f"or was killed) and a read-only open can only read them through {database.name}-shm, "
            f"which is {'unreadable' if shm.exists() else 'missing'} and cannot be created in the "
            f"read-only directory {database.parent}. Open the store once with write access "
            "(read_only=False folds the WAL into the database file), or copy the whole directory "
            "somewhere writable and open the copy"
        )
    return "mode=ro"


def _sqlite_engine(database: Path, read_only: bool, busy_timeout_s: float) -> Engine:
    if read_only:
        url = f"sqlite:///file:{database.resolve()}?{_read_only_mode(database)}&uri=true"
    else:
        url = f"sqlite:///{database.resolve()}"
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s}
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE can be issued.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not read_only:
            # Only takes effect when the file is created. Slot blobs (~147 KB each) dominate the
            # bytes; 64 KiB pages insert them ~2.8x faster than the 4 KiB default for ~3% more
            # space, because each blob spans 3 overflow pages instead of 37.
            cursor.execute("PRAGMA page_size=65536")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # Writers take the write lock up front: two deferred transactions that both upgrade to
        # writing would deadlock and one would fail instead of waiting.
        write = connection.get_execution_options().get("icmem_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _initialise(
    engine: Engine,
    dim: int,
    model_fingerprint: str | None,
    read_only: bool,
    *,
    index_dir: Path | None,
    create: bool,
) -> dict[str, str]:
    """Create the schema (a new SQLite file, or a Postgres database on first open); otherwise
    check its version and settings."""
    try:
        options = {} if read_only else {"icmem_write": True}
        with engine.connect().execution_options(**options) as connection:
            # A migration may rebuild a SQLite table, and dropping the old one must not cascade
            # into its children; the pragma only takes effect outside a transaction.
            keys_off = engine.dialect.name == "sqlite" and not read_only
            if keys_off:
                _sqlite_foreign_keys(connection, on=False)
            try:
                with connection.begin():
                    return _initialise_in(
                        connection, dim, model_fingerprint, read_only, index_dir, create
                    )
            finally:
                if keys_off:
                    _sqlite_foreign_keys(connection, on=True)
    except DatabaseError as exc:
        raise _translate(exc) from exc


def _sqlite_foreign_keys(connection: Connection, *, on: bool) -> None:
    driver = connection.connection.driver_connection  # no transaction open: the pragma applies
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _initialise_in(
    connection: Connection,
    dim: int,
    model_fingerprint: str | None,
    read_only: bool,
    index_dir: Path | None,
    create: bool,
) -> dict[str, str]:
    engine = connection.engine
    if engine.dialect.name == "postgresql" and not read_only:
        connection.execute(select(func.pg_advisory_xact_lock(_PG_INIT_LOCK)))
    tables = set(inspect(connection).get_table_names())
    if SchemaVersionRow.__tablename__ not in tables:
        if engine.dialect.name == "sqlite" and tables:
            raise NotAStoreError(
                f"the SQLite file holds other tables ({', '.join(sorted(tables)[:5])}) "
                "and no icmem store; create the store in a new directory"
            )
        if engine.dialect.name == "sqlite" and not create:
            database = engine.url.database.removeprefix("file:").split("?")[0]
            raise _not_a_store_any_more(Path(database))
        if read_only:
            raise NotAStoreError("the database holds no icmem store (no schema table)")
        if index_dir is not None and any(Path(index_dir).glob("*.json")):
            raise NotAStoreError(
                f"the database holds no icmem store, but {index_dir} holds index files "
                "of one: the database was emptied or replaced. Restore it from a backup; "
                f"to start a new store here, empty {index_dir} first"
            )
        Base.metadata.create_all(connection)
        connection.execute(
            SchemaVersionRow.__table__.insert().values(
                version=SCHEMA_VERSION, icmem_version=__version__
            )
        )
        rows = [{"key": "dim", "value": str(dim)}]
        if model_fingerprint is not None:
            rows.append({"key": "model_fingerprint", "value": model_fingerprint})
        connection.execute(SettingRow.__table__.insert(), rows)
    else:
        _check_version(connection, read_only)
    settings = dict(
        connection.execute(
            select(SettingRow.key, SettingRow.value).where(
                SettingRow.key.in_(("dim", "model_fingerprint"))
            )
        ).all()
    )
    _check_settings(connection, settings, dim, model_fingerprint, read_only)
    return settings


def _is_emptied(database: Path) -> bool:
    """A 0-byte database file whose WAL (if any) holds nothing either."""
    wal = database.with_name(database.name + "-wal")
    try:
        return database.stat().st_size == 0 and (not wal.exists() or wal.stat().st_size == 0)
    except OSError:
        return False


def _not_a_store_any_more(path: Path) -> NotAStoreError:
    size = path.stat().st_size if path.exists() else 0
    state = "empty (0 bytes)" if size == 0 else f"a SQLite database ({size} bytes) with no tables"
    return NotAStoreError(
        f"{path} is {state}: the store's database was emptied or replaced (a failed copy, a full "
        "disk). icmem never initialises a new store over an existing file, so nothing was "
        "changed: restore the file from a backup, or move it away to start a new store"
    )


def _check_version(connection: Connection, read_only: bool) -> None:
    version = connection.scalar(select(func.max(SchemaVersionRow.version)))
    if version is None:
        raise NotAStoreError("the store's schema table is empty; the store was never initialised")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the store was written with schema version {version} by a newer icmem; this icmem "
            f"reads version {SCHEMA_VERSION}: upgrade icmem"
        )
    if version == SCHEMA_VERSION:
        return
    if read_only:
        raise SchemaVersionError(
            f"the store has schema version {version}, older than {SCHEMA_VERSION}; open it once "
            "without read_only=True to migrate it"
        )
    for step in range(version, SCHEMA_VERSION):
        migrate = MIGRATIONS.get(step)
        if migrate is None:
            raise SchemaVersionError(
                f"the store has schema version {version} and icmem {__version__} has no migration "
                f"from version {step}; re-create the store (re-ingest the documents)"
            )
        migrate(connection)
        connection.execute(
            SchemaVersionRow.__table__.insert().values(version=step + 1, icmem_version=__version__)
        )


def _check_settings(
    connection: Connection,
    settings: dict[str, str],
    dim: int,
    model_fingerprint: str | None,
    read_only: bool,
) -> None:
    stored_dim = int(settings["dim"])
    if stored_dim != dim:
        raise DimensionMismatchError(
            f"the store holds embeddings of dim {stored_dim}, it was opened with dim={dim}; open "
            f"it with dim={stored_dim} (and the embedding model it was built with)"
        )
    stored = settings.get("model_fingerprint")
    if model_fingerprint is None:
        return
    if stored is None:
        if not read_only:
            connection.execute(
                SettingRow.__table__.insert().values(
                    key="model_fingerprint", value=model_fingerprint
                )
            )
            settings["model_fingerprint"] = model_fingerprint
    elif stored != model_fingerprint:
        raise ForeignSlotsError(
            f"the store holds memory slots of base model {stored!r} but was opened for "
            f"{model_fingerprint!r}; open it with that model or use a separate store"
        )
