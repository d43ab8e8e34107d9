"""The one document type of the write path, from reading to writing.

A file read from disk, a text given to `MemoryPipeline.ingest`, a LangGraph item with several
indexed fields and a Ray job's input are all a `TextDocument`: an id, the texts to remember
(each chunked on its own, so that one field never bleeds into the next one's span), the
metadata kept with it and where it came from. Its `content_hash` is what a re-run compares with
the stored document to skip it (`icmem.writing.unchanged`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

DEFAULT_NAMESPACE = ("default", "default", "default")


@dataclass(frozen=True)
class TextDocument:
    """A document to compress and store: its id (None: the store makes one up), its texts (none
    is allowed: such a document is stored without spans), metadata and source."""

    document_id: str | None
    texts: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_text(
        cls,
        text: str,
        document_id: str | None = None,
        *,
        source: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> TextDocument:
        return cls(document_id, (text,), dict(metadata or {}), source)

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 of the text for a one-text document (what stores written by earlier
        versions hold for every ingested file, so that they are not re-encoded), of the JSON
        list of texts otherwise. Raises `InvalidRecordError` for text the store cannot hold."""
        from icmem.store.records import content_id_of

        if len(self.texts) == 1:
            return content_id_of(self.texts[0])
        return content_id_of(json.dumps(list(self.texts), ensure_ascii=False))

    @property
    def name(self) -> str:
        """How messages name the document: its id, else its source."""
        return self.document_id or self.source or "(a document without id)"
