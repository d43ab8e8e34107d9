"""Store test helpers: record builders and store locations.

Tests import these by module name (`from store_testing import ...`); the fixtures that use them
live in this folder's conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from icmem.store import DocumentRecord, MemoryStore, SpanRecord

from icmem.codec import encode_slots

DIM = 16
FINGERPRINT = "tiny-test-model@1"


@dataclass
class StoreLocation:
    """Where a test's store lives; ``open`` may be called again to reopen the same store."""

    backend: str
    target: str
    index_dir: Path

    def open(self, **kwargs: Any) -> MemoryStore:
        kwargs.setdefault("dim", DIM)
        if self.backend == "postgres":
            kwargs.setdefault("index_dir", self.index_dir)
        return MemoryStore.open(self.target, **kwargs)


def make_slots(seed: int, *, fingerprint: str = FINGERPRINT, codec: str = "bf16") -> bytes:
    values = np.random.default_rng(seed).standard_normal((4, 8)).astype(np.float32)
    return encode_slots(values, codec=codec, fingerprint=fingerprint)


def embedding(seed: int) -> np.ndarray:
    vector = np.random.default_rng(10_000 + seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def make_document(
    key: str | None,
    n_spans: int = 2,
    *,
    seed: int = 0,
    metadata: dict | None = None,
    fingerprint: str = FINGERPRINT,
    vector: Callable[[int], np.ndarray] = embedding,
) -> DocumentRecord:
    spans = [
        SpanRecord(
            position=p,
            char_start=100 * p,
            char_end=100 * p + 99,
            text=f"{key} span {p} seed {seed}",
            token_count=20 + p,
            slots=make_slots(seed * 100 + p, fingerprint=fingerprint),
            embedding=vector(seed * 100 + p),
        )
        for p in range(n_spans)
    ]
    return DocumentRecord(
        id=key,
        source=f"file://{key}",
        metadata=metadata or {},
        content_hash=f"hash-{key}-{seed}",
        spans=spans,
    )
