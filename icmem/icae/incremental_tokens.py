"""Token ids of a text that extends a text tokenized before, at the cost of the new part only.

A conversation's next request is the whole conversation again, laid out by the chat template.
Tokenizing all of it each turn costs time in proportion to its length (about half a second at
30,000 tokens here), which would make a long conversation's turns slower and slower although
the decoder reads only the new tokens. A fast tokenizer splits its input at added tokens
(``<|im_start|>``, ``<|im_end|>``) before anything else and tokenizes the pieces between them
independently, so the ids of ``text`` equal the ids of the part up to the end of such a token
followed by the ids of the rest. :class:`IncrementalTokenizer` keeps recent texts with their
ids and the places where they may be cut, and tokenizes a new text from the last cut it shares
with one of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Tokenized:
    text: str
    ids: list[int]
    cut_chars: list[int]  # where the text may be cut: just after a splitting added token
    cut_tokens: list[int]  # how many ids come before each cut


class IncrementalTokenizer:
    """``ids(text)`` equals ``tokenizer(text, add_special_tokens=False)["input_ids"]`` and
    re-tokenizes only what follows the longest shared cut with one of the last ``keep`` texts.
    Tokenizers without offsets (slow ones) are tokenized whole every time."""

    def __init__(self, tokenizer: Any, keep: int = 8) -> None:
        self.tokenizer = tokenizer
        self.keep = keep
        self._cut_after = _splitting_tokens(tokenizer)
        self._recent: OrderedDict[str, _Tokenized] = OrderedDict()
        self._lock = threading.Lock()
        self.chars_tokenized = 0  # work done, for tests and benchmarks

    def ids(self, text: str) -> list[int]:
        if not self._cut_after or self.keep == 0:
            self.chars_tokenized += len(text)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        with self._lock:
            known = list(self._recent.values())
        char, count, base = 0, 0, None
        for entry in known:
            at = _shared_cut(entry, text)
            if at is not None and entry.cut_chars[at] > char:
                char, count, base = entry.cut_chars[at], entry.cut_tokens[at], (entry, at)
        new = self._encode(text[char:], char, count)
        if base is None:
            done = new
        else:
            entry, at = base
            done = _Tokenized(
                text,
                entry.ids[:count] + new.ids,
                entry.cut_chars[: at + 1] + new.cut_chars,
                entry.cut_tokens[: at + 1] + new.cut_tokens,
            )
        with self._lock:
            self._recent[text] = done
            self._recent.move_to_end(text)
            while len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        return list(done.ids)

    def _encode(self, piece: str, char: int, count: int) -> _Tokenized:
        """Tokenize ``piece`` (which starts ``char`` characters and ``count`` ids into the
        whole text), with its cuts counted in the whole text's coordinates."""
        self.chars_tokenized += len(piece)
        encoded = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        cut_chars, cut_tokens = [], []
        for index, (token, (_, end)) in enumerate(zip(ids, encoded["offset_mapping"], strict=True)):
            if token in self._cut_after:
                cut_chars.append(char + end)
                cut_tokens.append(count + index + 1)
        return _Tokenized(piece, ids, cut_chars, cut_tokens)


def _shared_cut(entry: _Tokenized, text: str) -> int | None:
    """The index of ``entry``'s last cut up to which ``text`` equals ``entry.text``, or None.
    A text that shares a cut shares every earlier one, so the cuts are bisected (after trying
    the last, which the next turn of the same conversation shares)."""
    last = len(entry.cut_chars) - 1
    if last >= 0 and text.startswith(entry.text[: entry.cut_chars[last]]):
        return last
    low, high, found = 0, last, None
    while low < high:
        middle = (low + high) // 2
        if text.startswith(entry.text[: entry.cut_chars[middle]]):
            found, low = middle, middle + 1
        else:
            high = middle
    return found


def _splitting_tokens(tokenizer: Any) -> frozenset[int]:
    """Added tokens after which a text may be cut: matched on the raw text, stripping nothing
    to their right, and not the start of a longer added token (which the text after the cut
    could complete). Empty for a tokenizer without offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return frozenset()
    added = getattr(tokenizer, "added_tokens_decoder", {})
    contents = [token.content for token in added.values()]
    return frozenset(
        index
        for index, token in added.items()
        if not token.rstrip
        and not token.normalized
        and not any(
            other != token.content and other.startswith(token.content) for other in contents
        )
    )
