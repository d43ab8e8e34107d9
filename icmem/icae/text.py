"""The text of token ids, typed: shared by decoding and the training data without either
importing the other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: Any, **options: Any) -> str:
    """The text of one sequence of token ids (transformers also types `decode` as returning a
    list, for batches)."""
    text = tokenizer.decode(ids, **options)
    assert isinstance(text, str)
    return text
