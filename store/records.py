"""Plain values that cross the store's boundary: what callers give it and what it hands back.

Callers describe what to store with two frozen dataclasses::

    DocumentRecord(id=None | "doc-key", source="path/or/url", metadata={...}, content_hash="...",
                   spans=[SpanRecord(position=0, char_start=0, char_end=2048, text="...",
                                     token_count=512, slots=<icmem.codec blob>,
                                     embedding=<(dim,) float array>, content_id=None), ...])

``slots`` may be None for a span kept for retrieval only. ``content_id`` defaults to the SHA-256 of
the span text.

A namespace is a tuple of 1 to 16 non-empty string labels, such as ``(tenant, agent, thread)``,
``("users", uid, "memories")`` or ``("org", "team", "project", "notes")``; every document lives in
exactly one. Labels may hold any character but NUL (``/``, ``%`` and newlines included). Reads
take a namespace prefix and see that namespace and every one below it, never another:
``("a",)`` covers ``("a", "x")`` but not ``("ab",)``. Document ids are the caller's keys (strings)
and are scoped to their namespace, so two tenants may both own a document called "readme" without
seeing each other. Span ids are integers
assigned by the store, never reused, and are what search hits and ``get_slots`` speak.

Every value is checked the same way for SQLite and Postgres (``store.validation``): ids and
namespace labels up to 255 characters, no NUL characters or lone surrogates in any text, counts
that fit a 32-bit INTEGER, and metadata of plain JSON (finite numbers, 64-bit ints, string keys,
nested at most 32 deep). A record one backend would store and the other refuse is refused by both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidRecordError
from .namespaces import MAX_NAMESPACE_DEPTH, validate_namespace
from .validation import (
    MAX_CONTENT_HASH_CHARS,
    MAX_CONTENT_ID_CHARS,
    MAX_KEY_CHARS,
    check_count,
    check_metadata,
    check_text,
)

__all__ = [
    "MAX_NAMESPACE_DEPTH",
    "AddedDocument",
    "DocumentInfo",
    "DocumentRecord",
    "Namespace",
    "SearchHit",
    "SpanRecord",
    "SpanSlots",
    "StoreCheck",
    "StoreStats",
    "content_id_of",
    "validate_namespace",
]

Namespace = tuple[str, ...]


def content_id_of(text: str) -> str:
    """The id of a span's content: equal texts share it, so their slots can be reused."""
    return hashlib.sha256(check_text(text, "span text").encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SpanRecord:
    """One span of a document with its ICAE memory slots (an icmem.codec blob) and embedding."""

    position: int
    char_start: int
    char_end: int
    text: str
    token_count: int
    slots: bytes | None  # None stores a span for retrieval only, with no memory slots
    embedding: np.ndarray
    content_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("position", "char_start", "char_end", "token_count"):
            object.__setattr__(self, name, check_count(getattr(self, name), f"span {name}"))
        if not 0 <= self.char_start <= self.char_end:
            raise InvalidRecordError(
                f"span char offsets must satisfy 0 <= char_start <= char_end, got "
                f"{self.char_start}..{self.char_end}"
            )
        if self.slots is not None and not isinstance(self.slots, bytes | bytearray | memoryview):
            raise InvalidRecordError(
                "span slots must be bytes from icmem.codec.encode_slots (or MemorySlots.to_bytes), "
                f"got {type(self.slots).__name__}"
            )
        check_text(self.text, f"text of span {self.position}")
        if self.content_id is None:
            object.__setattr__(self, "content_id", content_id_of(self.text))
        else:
            check_text(
                self.content_id,
                f"content_id of span {self.position}",
                max_chars=MAX_CONTENT_ID_CHARS,
                empty=False,
            )


@dataclass(frozen=True)
class DocumentRecord:
    """A document to add: its spans are stored together, in one transaction, or not at all."""

    spans: Sequence[SpanRecord]
    source: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    id: str | None = None

    def __post_init__(self) -> None:
        if self.id is not None and (not isinstance(self.id, str) or not self.id):
            raise InvalidRecordError(
                f"document id must be a non-empty string or None, got {self.id!r}"
            )
        if self.id is not None:
            check_text(self.id, "document id", max_chars=MAX_KEY_CHARS)
        name = f"document {self.id!r}" if self.id is not None else "document"
        check_text(self.source, f"source of {name}")
        check_text(self.content_hash, f"content_hash of {name}", max_chars=MAX_CONTENT_HASH_CHARS)
        # Checked again when the document is written: the mapping may change after this.
        check_metadata(self.metadata, f"metadata of {name}")
        positions = [s.position for s in self.spans]
        if len(set(positions)) != len(positions):
            raise InvalidRecordError(
                f"document {self.id or self.source!r} has duplicate span positions; each span "
                "needs its own position"
            )


@dataclass(frozen=True)
class AddedDocument:
    """What ``add`` stored for one document: its id (generated when none was given) and span ids."""

    id: str
    span_ids: tuple[int, ...]


@dataclass(frozen=True)
class DocumentInfo:
    """A stored document without its spans: enough to list, resume or skip it."""

    id: str
    namespace: Namespace
    source: str
    metadata: Mapping[str, Any]
    content_hash: str
    span_count: int


@dataclass(frozen=True)
class SearchHit:
    """A span found by ``search``, best first; ``score`` is the inner product with the query."""

    span_id: int
    score: float
    document_id: str
    namespace: Namespace
    position: int
    char_start: int
    char_end: int
    text: str
    metadata: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class SpanSlots:
    """The stored memory-slot blob of one span, still encoded (decode with icmem.codec)."""

    span_id: int
    document_id: str
    position: int
    blob: bytes
    codec: str
    shape: tuple[int, int]
    token_count: int  # tokens of the span the slots stand for (decoders may place slots by it)


@dataclass(frozen=True)
class StoreStats:
    """Counts and sizes of a store (or of one namespace prefix)."""

    namespaces: int
    documents: int
    spans: int
    slot_bytes: int
    embedding_bytes: int
    database_bytes: int
    index_bytes: int

    @property
    def bytes_on_disk(self) -> int:
        return self.database_bytes + self.index_bytes


@dataclass(frozen=True)
class StoreCheck:
    """What ``MemoryStore.check`` found damaged; every field empty means nothing is."""

    damaged_slots: tuple[int, ...] = ()  # span ids whose slot blob fails its header or checksum
    damaged_embeddings: tuple[int, ...] = ()  # span ids whose embedding bytes are unusable
    invalid_metadata: tuple[tuple[Namespace, str], ...] = ()  # (namespace, document id)
    database_problems: tuple[str, ...] = ()  # SQLite's quick_check findings

    @property
    def ok(self) -> bool:
        return not (
            self.damaged_slots
            or self.damaged_embeddings
            or self.invalid_metadata
            or self.database_problems
        )
