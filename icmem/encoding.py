"""Chunk, compress and embed documents into the records a store writes.

The middle of the write path (read -> chunk -> compress -> embed -> write): it knows the ICAE
and the embedder, never the store, so the single-process ingestion, `MemoryPipeline` and the Ray
workers of `icmem.distributed` (which only encode; their driver writes) encode alike.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from icmem.chunking import Span, chunk
from icmem.documents import TextDocument

if TYPE_CHECKING:
    import numpy as np

    from icmem.codec import Codec
    from icmem.embedding import TextEmbedder
    from icmem.icae.model import ICAE
    from icmem.store import DocumentRecord, SpanRecord


class StageClock:
    """Adds the wall time of named stages into a dict (when there is one to add to)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                elapsed = time.perf_counter() - started
                self.timings[stage] = self.timings.get(stage, 0.0) + elapsed


class DocumentEncoder:
    """Turns documents into store records with one ICAE and one embedder."""

    def __init__(
        self, icae: ICAE, embedder: TextEmbedder, *, codec: str = "bf16", batch_size: int = 8
    ) -> None:
        """`codec` encodes the slots (one of `icmem.codec.CODECS`); `batch_size` spans go
        through the ICAE per forward pass."""
        from icmem.codec import codec_named

        self.icae, self.embedder = icae, embedder
        self.codec: Codec = codec_named(codec)
        self.batch_size = batch_size

    def chunk(self, document: TextDocument) -> list[Span]:
        """The spans of a document: each text chunked alone, numbered on across them."""
        spans: list[Span] = []
        for text in document.texts:
            for span in chunk(text, self.icae.tokenizer, span_tokens=self.icae.config.span_tokens):
                spans.append(dataclasses.replace(span, index=len(spans)))
        return spans

    def encode(
        self,
        pieces: Sequence[tuple[TextDocument, Sequence[Span]]],
        *,
        timings: dict[str, float] | None = None,
    ) -> list[DocumentRecord]:
        """One record per (document, spans) pair, the spans of all pairs compressed together
        (many small documents still fill the ICAE's batches). `timings`, when given,
        accumulates the seconds spent in "compress" and "embed"."""
        from icmem.store import DocumentRecord

        records = self.span_records([span for _, spans in pieces for span in spans], timings)
        rows, start = [], 0
        for document, spans in pieces:
            rows.append(
                DocumentRecord(
                    spans=records[start : start + len(spans)],
                    source=document.source,
                    metadata=dict(document.metadata),
                    content_hash=document.content_hash,
                    id=document.document_id,
                )
            )
            start += len(spans)
        return rows

    def span_records(
        self, spans: Sequence[Span], timings: dict[str, float] | None = None
    ) -> list[SpanRecord]:
        """Compress and embed spans (all in one batch) into store records."""
        from icmem.store import SpanRecord

        if not spans:
            return []
        clock = StageClock(timings)
        with clock("compress"):
            slots = self.icae.compress(
                [list(s.token_ids) for s in spans], batch_size=self.batch_size
            )
        with clock("embed"):
            vectors = self.embed([s.text for s in spans])
        return [
            SpanRecord(
                position=span.index,
                char_start=span.char_start,
                char_end=span.char_end,
                text=span.text,
                token_count=span.token_count,
                slots=memory.to_bytes(self.codec),
                embedding=vector,
                content_id=span.content_id,
            )
            for span, memory, vector in zip(spans, slots, vectors, strict=True)
        ]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Retrieval vectors of texts, one row each."""
        return self.embedder.embed(list(texts))
