"""Tiny pipelines for the LangGraph and vector store tests: one tiny ICAE and embedder per
process, a fresh store per call, and one torch thread (these tests run many tiny forwards, which
extra threads only slow down on a busy machine)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from icmem.store import MemoryStore
from tiny_models import tiny_embedder, tiny_icae, tiny_tokenizer

from icmem.pipeline import MemoryPipeline


@functools.cache
def tiny_models() -> tuple:
    tokenizer = tiny_tokenizer()
    return tiny_icae(tokenizer), tiny_embedder(tokenizer)


def fresh_pipeline(directory: Path | None = None, *, embedder=None) -> MemoryPipeline:
    """A pipeline over a new (or the given) store directory, with the shared tiny models."""
    icae, tiny = tiny_models()
    embedder = embedder or tiny
    directory = directory or Path(tempfile.mkdtemp(prefix="icmem-langgraph-"))
    store = MemoryStore.open(directory, dim=embedder.dim, model_fingerprint=icae.fingerprint)
    return MemoryPipeline(icae, store, embedder, codec="fp32")
