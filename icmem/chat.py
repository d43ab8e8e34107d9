"""A conversation that remembers itself, apart from the documents it answers from.

Two namespaces: the documents (what `icmem ingest` stored) and the conversation (what the user
said, and the model's replies when asked for). Kept apart, old turns never crowd documents out of
a document namespace, and `/forget` can never touch a document. Each turn reads the one whose
best match is closer to the message, and says which (`last_source`).

User questions are remembered but never recalled: a question asked again would be its own best
match and push out the documents that answer it, and it tells the model nothing. A reply is
remembered only when asked for (`remember_replies`), and never an empty one: one bad answer,
recalled, is repeated in later ones.

The decoder sees only the last few turns verbatim; everything older reaches it through recall,
which is what lets a conversation run for any length.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from icmem.errors import ConversationError

if TYPE_CHECKING:
    from icmem.icae.decoder import FinishReason, Sampling
    from icmem.memory_forms import MemoryForm
    from icmem.pipeline import MemoryPipeline
    from icmem.store import SearchHit

DEFAULT_RECENT_TURNS = 6  # messages the decoder reads verbatim (older ones come from recall)
CHAT_SOURCE = "icmem chat"  # the source of every remembered turn; /forget deletes only these
CONVERSATION_ROOT = "chat"
# Remembered turns that recall may bring back: not the user's questions (see the module).
RECALLABLE_TURNS = {"question": {"$ne": True}}

Source = Literal["documents", "conversation", "none"]


def conversation_namespace(documents: Sequence[str]) -> tuple[str, ...]:
    """Where a chat over `documents` keeps its turns by default: beside them, never below."""
    from icmem.store.namespaces import validate_namespace

    return (CONVERSATION_ROOT, *validate_namespace(documents))


class ChatSession:
    """One thread of conversation over a `MemoryPipeline`: answers from `documents` or from its
    own remembered turns in `conversation` (default: `conversation_namespace(documents)`)."""

    def __init__(
        self,
        pipeline: MemoryPipeline,
        documents: Sequence[str],
        *,
        conversation: Sequence[str] | None = None,
        k: int = 4,
        max_new_tokens: int = 128,
        memory: MemoryForm = "slots",
        recent_turns: int = DEFAULT_RECENT_TURNS,
        system: str | None = None,
        remember_replies: bool = False,
        sampling: Sampling | None = None,
    ) -> None:
        """`sampling` defaults to `CHAT_SAMPLING` (light sampling with the loop remedies);
        `GREEDY` answers exactly as the model's greedy decoding does."""
        from icmem.icae.decoder import CHAT_SAMPLING
        from icmem.store.namespaces import validate_namespace  # the store's rule, loaded on use

        self.pipeline = pipeline
        self.sampling = CHAT_SAMPLING if sampling is None else sampling
        self.documents = validate_namespace(documents)
        self.conversation = (
            conversation_namespace(self.documents)
            if conversation is None
            else validate_namespace(conversation)
        )
        for outer, inner in (
            (self.documents, self.conversation),
            (self.conversation, self.documents),
        ):
            if inner[: len(outer)] == outer:
                raise ConversationError(
                    f"the conversation namespace {self.conversation!r} and the document "
                    f"namespace {self.documents!r} overlap, so recalling one would read the "
                    "other; give the conversation its own (the default puts it under 'chat')"
                )
        self.k, self.max_new_tokens, self.memory = k, max_new_tokens, memory
        self.recent_turns, self.system = recent_turns, system
        self.remember_replies = remember_replies
        self.recent: list[dict[str, str]] = []
        self.last_hits: list[SearchHit] = []
        self.last_source: Source = "none"
        self.last_finish_reason: FinishReason | None = None  # why the last answer ended
        # Ids unique across runs and processes: a run id, then a turn counter.
        self._run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        self._turn = 0

    def say(self, text: str) -> Iterator[str]:
        """Answer `text`, yielding the answer's pieces as they are decoded; once it is complete,
        the turn is remembered (see the module for what is)."""
        self.pipeline.check_input_length(text)
        conversation = [*self.recent[-self.recent_turns :], {"role": "user", "content": text}]
        if self.system:
            conversation.insert(0, {"role": "system", "content": self.system})
        source, hits = self.recall(text) if self.memory != "none" else ("none", [])
        reply = self.pipeline.reply(
            conversation,
            query=text,
            namespace=self.conversation if source == "conversation" else self.documents,
            span_ids=[hit.span_id for hit in hits],
            max_new_tokens=self.max_new_tokens,
            memory=self.memory,
            **asdict(self.sampling),
        )
        # The search's hits (best first, with their scores): reading spans by id has no score.
        self.last_hits, self.last_source = hits, source
        if reply.notice:
            yield reply.notice
        pieces = []
        for piece in reply.pieces:
            pieces.append(piece)
            yield piece
        answer = "".join(pieces).strip()
        self.last_finish_reason = reply.pieces.finish_reason
        self._remember("user", text, question=text.rstrip().endswith("?"))
        if self.remember_replies and answer and self.last_finish_reason != "repetition":
            self._remember("assistant", answer)  # never an empty or self-repeating reply
        self.recent += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]

    def recall(self, text: str) -> tuple[Source, list[SearchHit]]:
        """The `k` best spans for `text` from whichever of the two namespaces holds the better
        match, and which one that is ("none" when neither holds anything)."""
        vector = self.pipeline.embed([text])[0]
        documents = self.pipeline.search(vector, namespace=self.documents, k=self.k)
        turns = self.pipeline.search(
            vector, namespace=self.conversation, k=self.k, filter=RECALLABLE_TURNS
        )
        if turns and (not documents or turns[0].score > documents[0].score):
            return "conversation", turns
        return ("documents", documents) if documents else ("none", [])

    def forget(self) -> int:
        """Delete every turn this thread remembered (in any run); returns how many. Documents
        are never touched: they live in another namespace."""
        turns = [
            d.id
            for d in self.pipeline.list_documents(self.conversation, exact=True)
            if d.source == CHAT_SOURCE
        ]
        self.recent.clear()
        self.last_hits, self.last_source = [], "none"
        if not turns:
            return 0
        return self.pipeline.delete_documents(turns, namespace=self.conversation)

    def _remember(self, role: str, content: str, *, question: bool = False) -> None:
        self._turn += 1
        metadata: dict[str, Any] = {"role": role, "turn": self._turn, "run": self._run}
        if question:
            metadata["question"] = True
        self.pipeline.ingest(
            f"{role}: {content}",
            namespace=self.conversation,
            document_id=f"chat/{self._run}/{self._turn:06d}-{role}",
            source=CHAT_SOURCE,
            metadata=metadata,
        )
