"""How recalled spans are laid out as text for the base model (``memory="text"``).

One definition, because two readers must see exactly the same thing: the pipeline answering
from text, and the teacher that the slot decoder is distilled from (``icmem.icae.distill``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

CONTEXT_HEADER = "Context from memory:\n\n"


def with_context(
    conversation: str | Sequence[Mapping[str, str]], texts: Sequence[str]
) -> list[dict[str, str]]:
    """The conversation with recalled text in its system prompt (added, or extended)."""
    turns = (
        [{"role": "user", "content": conversation}]
        if isinstance(conversation, str)
        else [dict(m) for m in conversation]
    )
    context = CONTEXT_HEADER + "\n\n".join(texts)
    if turns and turns[0].get("role") == "system":
        turns[0]["content"] = f"{turns[0]['content']}\n\n{context}"
    else:
        turns.insert(0, {"role": "system", "content": context})
    return turns
