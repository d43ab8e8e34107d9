"""What ChatICAE can read of a LangChain message: its text. Content it cannot read (an image,
audio, a file) is refused by name rather than dropped, because a model that never saw the photo
would still describe one."""

from __future__ import annotations

from langchain_core.messages import AIMessage, BaseMessage

from icmem.errors import ConversationError

# Blocks of an AI turn that are not lost when only the text is read: calls are replayed from
# `tool_calls`, and reasoning was the model's own aside.
_AI_BLOCKS_READ_ELSEWHERE = frozenset(
    {"tool_use", "tool_call", "tool_call_chunk", "server_tool_call", "reasoning", "thinking"}
)


def readable_text(message: BaseMessage) -> str:
    """The message's text, refusing any content block the model cannot read."""
    if isinstance(message.content, str):
        return message.content
    unreadable = []
    for block in message.content:
        kind = block if isinstance(block, str) else block.get("type")
        if isinstance(block, str) or kind == "text":
            continue
        if isinstance(message, AIMessage) and kind in _AI_BLOCKS_READ_ELSEWHERE:
            continue
        unreadable.append(str(kind))
    if unreadable:
        kinds = ", ".join(sorted(set(unreadable)))
        raise ConversationError(
            f"a {message.type} message holds {kinds} content ({len(unreadable)} block(s)), and "
            "this model reads text only, so it would answer without seeing it; put what it shows "
            "into words (a caption, a transcript, the file's text) or use a model that reads "
            f"{kinds}"
        )
    return message.text
