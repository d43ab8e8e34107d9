"""The store's tables (SQLAlchemy 2.0 ORM) and the schema version they are checked against.

Every table carries an ``icmem_`` prefix so a store can share a Postgres database with other
applications. Rows are the truth: the FAISS index is rebuilt from ``icmem_embeddings`` whenever it
is missing, stale or corrupt. Span ids are never reused (AUTOINCREMENT on SQLite, a sequence on
Postgres), which is what lets an index catch up by comparing id sets alone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .migrations import MIGRATIONS

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Base",
    "DocumentRow",
    "EmbeddingRow",
    "MetadataValueRow",
    "NamespacePrefixRow",
    "NamespaceRow",
    "SchemaVersionRow",
    "SettingRow",
    "SlotRow",
    "SpanRow",
]

SCHEMA_VERSION = 3

# MIGRATIONS[n] (store.migrations) upgrades a store from schema n to n + 1 inside the opening
# transaction. A store older than the oldest key there cannot be migrated and is refused.

# Integer on SQLite so that the column is the rowid alias (AUTOINCREMENT needs exactly that).
_Id = BigInteger().with_variant(Integer, "sqlite")
_Json = JSON().with_variant(JSONB(), "postgresql")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    # Every model here maps one declared Table (SQLAlchemy types it as any FromClause).
    __table__: ClassVar[Table]


class SchemaVersionRow(Base):
    """One row per schema version applied to this store; the highest is the current one."""

    __tablename__ = "icmem_schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    icmem_version: Mapped[str] = mapped_column(String(32))


class SettingRow(Base):
    """Facts fixed when the store was created (embedding dim, base-model fingerprint)."""

    __tablename__ = "icmem_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class NamespaceRow(Base):
    """A namespace: a path of 1 to 16 labels (``store.namespaces``); ``generation`` grows with
    every change to its spans."""

    __tablename__ = "icmem_namespaces"
    __table_args__ = (
        UniqueConstraint("path_key", name="uq_icmem_namespace_path"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(Text)  # the labels, encoded by store.namespaces.encode_path
    depth: Mapped[int] = mapped_column(Integer)  # how many labels
    path_key: Mapped[str] = mapped_column(String(64))  # SHA-256 of path: the unique, exact key
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class NamespacePrefixRow(Base):
    """One row per namespace and each of its leading label runs (itself included), keyed by the
    SHA-256 of the encoded prefix: a prefix read finds its namespaces through this index instead
    of scanning every namespace's path."""

    __tablename__ = "icmem_namespace_prefixes"
    __table_args__ = (Index("ix_icmem_namespace_prefixes_namespace", "namespace_id"),)

    prefix_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    namespace_id: Mapped[int] = mapped_column(
        ForeignKey("icmem_namespaces.id", ondelete="CASCADE"), primary_key=True
    )


class DocumentRow(Base):
    """A source document; ``key`` is the caller's id, unique within its namespace."""

    __tablename__ = "icmem_documents"
    __table_args__ = (
        UniqueConstraint("namespace_id", "key", name="uq_icmem_document_key"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    namespace_id: Mapped[int] = mapped_column(
        ForeignKey("icmem_namespaces.id", ondelete="CASCADE"), index=True
    )
    key: Mapped[str] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text, default="")
    metadata_: Mapped[dict] = mapped_column("metadata", _Json, default=dict)
    content_hash: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class MetadataValueRow(Base):
    """One scalar of a document's metadata, hashed, for filters to look documents up by
    (``store.metadata_values``): a superset test ahead of the exact JSON condition."""

    __tablename__ = "icmem_metadata_values"
    __table_args__ = (
        Index("ix_icmem_metadata_values_value", "path", "value", "document_id"),
        Index("ix_icmem_metadata_values_number", "path", "number", "document_id"),
    )

    document_id: Mapped[int] = mapped_column(
        ForeignKey("icmem_documents.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # hash of the key path
    value: Mapped[int] = mapped_column(BigInteger)  # hash of the value (JSON equality)
    number: Mapped[float | None] = mapped_column(Float, nullable=True)  # numbers only


class SpanRow(Base):
    """A span of a document: where it sits in the text and the text itself."""

    __tablename__ = "icmem_spans"
    __table_args__ = (
        UniqueConstraint("document_id", "position", name="uq_icmem_span_position"),
        Index("ix_icmem_spans_namespace", "namespace_id"),
        Index("ix_icmem_spans_content", "content_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(_Id, primary_key=True, autoincrement=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("icmem_documents.id", ondelete="CASCADE"))
    # Denormalised from the document so that index catch-up and isolation checks need no join.
    namespace_id: Mapped[int] = mapped_column(ForeignKey("icmem_namespaces.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int] = mapped_column(Integer)
    content_id: Mapped[str] = mapped_column(String(64))


class SlotRow(Base):
    """A span's ICAE memory slots as an icmem.codec blob, with its header facts as columns."""

    __tablename__ = "icmem_slots"

    span_id: Mapped[int] = mapped_column(
        ForeignKey("icmem_spans.id", ondelete="CASCADE"), primary_key=True
    )
    codec: Mapped[str] = mapped_column(String(8))
    dtype: Mapped[str] = mapped_column(String(16), default="float32")
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    model_fingerprint: Mapped[str] = mapped_column(String(255))
    blob: Mapped[bytes] = mapped_column(LargeBinary)


class EmbeddingRow(Base):
    """A span's retrieval embedding as little-endian float32 bytes; the source of the index."""

    __tablename__ = "icmem_embeddings"
    __table_args__ = (Index("ix_icmem_embeddings_namespace", "namespace_id"),)

    span_id: Mapped[int] = mapped_column(
        ForeignKey("icmem_spans.id", ondelete="CASCADE"), primary_key=True
    )
    namespace_id: Mapped[int] = mapped_column(ForeignKey("icmem_namespaces.id", ondelete="CASCADE"))
    vector: Mapped[bytes] = mapped_column(LargeBinary)
