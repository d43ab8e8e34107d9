"""The forms in which recalled memory reaches the decoder, in a module light enough for the CLI
to import before torch: "slots" (the recalled spans' memory slots), "text" (their stored text in
the system prompt: the uncompressed baseline), or "none" (the plain base model, no recall)."""

from __future__ import annotations

from typing import Literal

MemoryForm = Literal["slots", "text", "none"]
MEMORY_FORMS: tuple[MemoryForm, ...] = ("slots", "text", "none")
