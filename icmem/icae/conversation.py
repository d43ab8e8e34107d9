"""Conversations of any length at constant cost per turn: bounded decoder state kept between
turns and reused when the next request extends it.

The decoder reads ``[memory block][conversation]``. The memory block (the recalled spans' memory
slots, the ``[FT]`` task token, and the system turn) is LM-Infinite's global branch: it stays in
view however long the conversation grows, read in its own order at the positions the ICAE was
trained with (see ``icmem.lm_infinite``, memory mode). Everything after it falls out of the local
window as the conversation passes the model's pretraining length, so the state a conversation
keeps is bounded: the block plus one window.

A :class:`PromptCache` keeps recent :class:`DecoderSession` objects, keyed by their memory
block and the conversation tokens they have read (like llama.cpp's prompt cache): a new turn
whose tokens extend a session's reads only the new tokens. When the memory changes, the session
is rebuilt from at most one window of the conversation, never the whole of it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from icmem.icae.decoder import Sampling, TokenStream, input_dtype, sample_tokens
from icmem.icae.errors import ICAEConfigError
from icmem.icae.incremental_tokens import IncrementalTokenizer

if TYPE_CHECKING:
    from icmem.constrained import JsonConstraint
    from icmem.icae.model import ICAE
    from icmem.icae.slots import MemorySlots

PREFILL_CHUNK = 512  # tokens per forward call when reading a long turn (bounds activations)


class DecoderSession:
    """One conversation's decoder state: its memory block and the conversation tokens read so
    far, in a bounded LM-Infinite cache."""

    def __init__(
        self,
        icae: ICAE,
        memory: Sequence[MemorySlots],
        system_ids: Sequence[int],
        window: int | None = None,
    ) -> None:
        self.icae = icae
        self.reads_memory = bool(memory)
        self.key = memory_key(memory, system_ids)
        resolved = window or icae.max_positions
        if resolved is None:
            raise ICAEConfigError(
                "the decoder's config has no max_position_embeddings; pass window= (the length "
                "the model was pretrained on)"
            )
        self.window: int = resolved
        with torch.no_grad():
            if memory:
                block = icae.decoder_inputs(memory, "ft", list(system_ids))
            else:
                block = icae.embed_ids(system_ids)
        positions = None
        if memory and icae.config.slot_positions == "spread":
            spans = [(s.token_count or icae.config.span_tokens, s.num_slots) for s in memory]
            positions = icae.decoder_positions(spans, "ft", len(system_ids))
        self.block_positions: list[int] = positions or list(range(block.shape[0]))
        if self.room < 2:
            raise ICAEConfigError(
                f"the memory block takes {self.window - self.room} of the decoder's "
                f"{self.window} positions, leaving no room for the conversation; recall fewer "
                "spans or shorten the system prompt"
            )
        self._block = block
        self.cache: Any = None
        self.read: list[int] = []  # conversation tokens (after the block) the cache holds

    @property
    def room(self) -> int:
        """How many conversation tokens the window holds beside the memory block."""
        extent = self.block_positions[-1] + 1 if self.block_positions else 0
        return self.window - extent

    def skip(self, ids: Sequence[int]) -> None:
        """Count ``ids`` as read without reading them: a rebuilt session starts from the last
        window of a long conversation, whose older tokens the next token could not see anyway."""
        if self.cache is not None:
            raise ICAEConfigError("a session can skip tokens only before it has read any")
        self.read += list(ids)

    def continuation(self, ids: Sequence[int]) -> int | None:
        """How many leading tokens of ``ids`` this session has read, or None if it has read
        something else. The same tokens count, and so does the same text in other tokens: an
        answer the session generated comes back in the next turn re-tokenized from its text,
        which need not give the ids the model sampled (the session keeps what it read)."""
        n = len(self.read)
        if len(ids) > n and list(ids[:n]) == self.read:
            return n
        common = 0
        for mine, theirs in zip(self.read, ids, strict=False):
            if mine != theirs:
                break
            common += 1
        decode = self.icae.tokenizer.decode
        rest = decode(self.read[common:])
        for end in range(common, len(ids)):  # from common: tokens without text count too
            text = decode(list(ids[common:end]))
            if text == rest:
                return end
            if len(text) > len(rest) + 8:  # past it (slack for partial characters)
                return None
        return None

    def generate(
        self,
        ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling,
        constraint: JsonConstraint | None = None,
    ) -> TokenStream:
        """Read the tokens of ``ids`` this session has not read yet, then yield sampled tokens
        until a stop token; generated tokens become part of what the session has read.
        ``constraint`` masks each step's logits (JSON-schema-constrained decoding)."""
        done = self.continuation(ids)
        if done is None:
            raise ICAEConfigError(
                "this decoder session has read other tokens than the conversation starts with; "
                "rebuild the session (PromptCache does)"
            )

        def run(stream: TokenStream) -> Iterator[int]:
            self.read = list(ids[:done])  # the same text; from now on the conversation's tokens
            first = self._feed(list(ids[done:]))
            tokens = sample_tokens(
                first,
                lambda token: self._feed([token]),
                max_new_tokens=max_new_tokens,
                sampling=sampling,
                stop_ids=self.icae.stop_ids,
                constraint=constraint,
            )
            last = None
            for last in tokens:
                yield last
            stream.finish_reason = tokens.finish_reason
            if last is not None and tokens.finish_reason != "stop":
                self._feed([last])  # the loop reads no token past its last choice

        return TokenStream(run)

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run the decoder over new conversation tokens (the block first, on first use);
        returns the logits after the last of them."""
        icae = self.icae
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            piece = ids[start : start + PREFILL_CHUNK]
            # The decoder's state (weights, LM-Infinite) is entered per forward call, never
            # across a yield, so a paused stream cannot change what another thread sees.
            with icae.decoder.state(True, self.reads_memory, self.window) as decoder:
                if self.cache is None:
                    self.cache = self._start(decoder)
                out = decoder(
                    input_ids=torch.tensor([piece], device=icae.device),
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits = out.logits[0, -1]
            self.read += piece
        assert logits is not None  # continuation leaves at least one token to read
        return logits

    def _start(self, decoder: torch.nn.Module) -> Any:
        """A fresh bounded cache holding the memory block (inside the decoder's state)."""
        lm_infinite = _lm_infinite()
        if not self.block_positions:
            return lm_infinite.make_cache(decoder)
        cache = lm_infinite.make_cache(decoder, memory_positions=self.block_positions)
        decoder(
            inputs_embeds=self._block[None].to(input_dtype(decoder)),
            position_ids=torch.tensor([self.block_positions], device=self.icae.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cache


class PromptCache:
    """Recent decoder sessions, reused when a request extends one (see the module docstring).

    A session is taken out while it decodes, so two threads never share one; at most
    ``max_sessions`` are kept, least recently used first out.
    """

    def __init__(self, max_sessions: int = 8, window: int | None = None) -> None:
        if max_sessions < 0:
            raise ICAEConfigError(f"max_sessions={max_sessions}; use 0 (no reuse) or more")
        self.max_sessions = max_sessions
        self.window = window
        self._sessions: OrderedDict[int, DecoderSession] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"reused": 0, "rebuilt": 0, "tokens_read": 0}
        self._tokenizers: dict[int, IncrementalTokenizer] = {}

    def generate(
        self,
        icae: ICAE,
        memory: Sequence[MemorySlots],
        conversation: str | Sequence[Mapping[str, str]],
        max_new_tokens: int,
        sampling: Sampling,
        constraint: JsonConstraint | None = None,
    ) -> TokenStream:
        """Token ids answering ``conversation`` after ``memory`` (see ``ICAE.generate``)."""

        def run(stream: TokenStream) -> Iterator[int]:
            ids = self.prompt_ids(icae, conversation)
            system = _system_length(icae, conversation, ids)
            window = self.window or icae.max_positions or 0
            if _memory_extent(icae, memory) + system > window // 2:
                system = 0  # a long system prompt would crowd out the conversation: it scrolls
            system_ids, turns = ids[:system], ids[system:]
            session, done = self._take(memory_key(memory, system_ids), turns)
            if session is None:
                session = DecoderSession(icae, memory, system_ids, self.window)
                # Only the last window can still be seen by the next token: read no more.
                done = max(0, len(turns) - session.room + 1)
                session.skip(turns[:done])
            with self._lock:
                self.stats["reused" if session.cache is not None else "rebuilt"] += 1
                self.stats["tokens_read"] += len(turns) - done
            try:
                tokens = session.generate(turns, max_new_tokens, sampling, constraint)
                yield from tokens
                stream.finish_reason = tokens.finish_reason
            finally:
                self._put(session)

        return TokenStream(run)

    def prompt_ids(self, icae: ICAE, conversation: str | Sequence[Mapping[str, str]]) -> list[int]:
        """``icae.prompt_ids(conversation)``, tokenizing only what a recent request lacked (a
        long conversation would otherwise be tokenized whole each turn)."""
        if isinstance(conversation, str):
            return icae.prompt_ids(conversation)
        with self._lock:
            tokenizer = self._tokenizers.get(id(icae.tokenizer))
            if tokenizer is None or tokenizer.tokenizer is not icae.tokenizer:
                tokenizer = IncrementalTokenizer(icae.tokenizer, keep=max(1, self.max_sessions))
                self._tokenizers[id(icae.tokenizer)] = tokenizer
        return tokenizer.ids(icae.chat_text(conversation))

    def _take(self, key: tuple, turns: Sequence[int]) -> tuple[DecoderSession | None, int]:
        """The kept session that has read the most of ``turns`` (taken out), and how much."""
        with self._lock:
            fitting = [
                (done, ident)
                for ident, session in self._sessions.items()
                if session.key == key and (done := session.continuation(turns)) is not None
            ]
            if not fitting:
                return None, 0
            done, ident = max(fitting)
            return self._sessions.pop(ident), done

    def _put(self, session: DecoderSession) -> None:
        if self.max_sessions == 0 or session.cache is None:
            return
        with self._lock:
            self._sessions[id(session)] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


def memory_key(memory: Sequence[MemorySlots], system_ids: Sequence[int]) -> tuple:
    """What a memory block is made of: the spans' ids and slot counts, and the system turn."""
    return (tuple((m.span_id, m.num_slots) for m in memory), tuple(system_ids))


def _memory_extent(icae: ICAE, memory: Sequence[MemorySlots]) -> int:
    """Positions the memory and its task token take at the start of the decoder's input."""
    if not memory:
        return 0
    if icae.config.slot_positions == "spread":
        return sum(m.token_count or icae.config.span_tokens for m in memory) + 1
    return sum(m.num_slots for m in memory) + 1


def _system_length(
    icae: ICAE, conversation: str | Sequence[Mapping[str, str]], ids: Sequence[int]
) -> int:
    """How many leading tokens of ``ids`` are the conversation's system turn (0 if none, or
    if the template does not lay the system turn out as a prefix of the conversation)."""
    if isinstance(conversation, str) or not conversation:
        return 0
    first = conversation[0]
    if first.get("role") != "system" or not getattr(icae.tokenizer, "chat_template", None):
        return 0
    text = icae.tokenizer.apply_chat_template(
        [{"role": "system", "content": first["content"]}],
        tokenize=False,
        add_generation_prompt=False,
    )
    assert isinstance(text, str)  # one conversation, tokenize=False: its text
    system_ids = icae.tokenize(text)
    return len(system_ids) if list(ids[: len(system_ids)]) == system_ids else 0


def _lm_infinite() -> Any:
    from icmem import lm_infinite

    return lm_infinite
