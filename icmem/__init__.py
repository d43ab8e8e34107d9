"""icmem: long, cheap memory for RAG pipelines and agents.

Heavy dependencies (torch, transformers) load on first use of the names below, so that
`import icmem.store` stays free of model code.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "icmem.models",
    "chunk": "icmem.chunking",
    "chunk_file": "icmem.chunking",
    "Span": "icmem.chunking",
}

__all__ = ["Span", "__version__", "chunk", "chunk_file", "load_model"]

if TYPE_CHECKING:
    from icmem.chunking import Span, chunk, chunk_file
    from icmem.models import load_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'icmem' has no attribute {name!r}")
    return getattr(import_module(module), name)
