"""A conversation that remembers itself: each turn is answered from the store's memory and then
stored in the thread's namespace, so later turns (and later runs) can recall it.

The decoder sees only the last few turns verbatim; everything older reaches it through recall,
which is what lets a conversation run for any length.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icmem.icae.decoder import FinishReason, Sampling
    from icmem.pipeline import MemoryForm, MemoryPipeline
    from icmem.store import SearchHit

DEFAULT_RECENT_TURNS = 6  # messages the decoder reads verbatim (older ones come from recall)
CHAT_SOURCE = "icmem chat"  # the source of every remembered turn; /forget deletes only these


class ChatSession:
    """One thread of conversation over a `MemoryPipeline`, remembered in `namespace`."""

    def __init__(
        self,
        pipeline: MemoryPipeline,
        namespace: Sequence[str],
        *,
        k: int = 4,
        max_new_tokens: int = 128,
        memory: MemoryForm = "slots",
        recent_turns: int = DEFAULT_RECENT_TURNS,
        system: str | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        """`sampling` defaults to `CHAT_SAMPLING` (light sampling with the loop remedies);
        `GREEDY` answers exactly as the model's greedy decoding does."""
        from icmem.icae.decoder import CHAT_SAMPLING

        self.pipeline, self.namespace = pipeline, tuple(namespace)
        self.sampling = CHAT_SAMPLING if sampling is None else sampling
        self.k, self.max_new_tokens, self.memory = k, max_new_tokens, memory
        self.recent_turns, self.system = recent_turns, system
        self.recent: list[dict[str, str]] = []
        self.last_hits: list[SearchHit] = []
        self.last_finish_reason: FinishReason | None = None  # why the last answer ended
        # Ids unique across runs and processes: a run id, then a turn counter.
        self._run = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        self._turn = 0

    def say(self, text: str) -> Iterator[str]:
        """Answer `text`, yielding the answer's pieces as they are decoded; once it is complete,
        both turns are remembered."""
        conversation = [*self.recent[-self.recent_turns :], {"role": "user", "content": text}]
        if self.system:
            conversation.insert(0, {"role": "system", "content": self.system})
        reply = self.pipeline.reply(
            conversation,
            query=text,
            namespace=self.namespace,
            k=self.k,
            max_new_tokens=self.max_new_tokens,
            memory=self.memory,
            **asdict(self.sampling),
        )
        self.last_hits = reply.hits
        pieces = []
        for piece in reply.pieces:
            pieces.append(piece)
            yield piece
        answer = "".join(pieces).strip()
        self.last_finish_reason = reply.pieces.finish_reason
        self._remember("user", text)
        self._remember("assistant", answer)
        self.recent += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]

    def forget(self) -> int:
        """Delete every turn this thread remembered (in any run); returns how many. Documents
        ingested into the same namespace by other means stay."""
        turns = [
            d.id
            for d in self.pipeline.list_documents(self.namespace, exact=True)
            if d.source == CHAT_SOURCE
        ]
        self.recent.clear()
        self.last_hits = []
        if not turns:
            return 0
        return self.pipeline.delete_documents(turns, namespace=self.namespace)

    def _remember(self, role: str, content: str) -> None:
        self._turn += 1
        metadata: dict[str, Any] = {"role": role, "turn": self._turn, "run": self._run}
        self.pipeline.ingest(
            f"{role}: {content}",
            namespace=self.namespace,
            document_id=f"chat/{self._run}/{self._turn:06d}-{role}",
            source=CHAT_SOURCE,
            metadata=metadata,
        )
