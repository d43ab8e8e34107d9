"""Token-exact chunking of documents into spans for the ICAE encoder.

Guarantees, for any text and any fast (offset-reporting) tokenizer:

- every span has at most `span_tokens` tokens;
- without overlap, the spans' token ids concatenate to the document's token sequence
  (`tokenizer(text, add_special_tokens=False).input_ids`), and their texts concatenate to the
  document, so `text[span.char_start:span.char_end] == span.text` tiles it exactly;
- a span never ends inside a character: when a byte-level tokenizer splits one character (an
  emoji, a combining mark) over several tokens, they stay in one span.

Files larger than memory are tokenized in windows. A window is cut only where tokenizing the two
halves separately gives exactly the tokens of the whole window, so streaming produces the same
tokens as tokenizing the document in one go.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from icmem.errors import ChunkingError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

DecodeErrors = Literal["strict", "replace", "ignore"]

DEFAULT_SPAN_TOKENS = 512
_WINDOW_CHARS = 1 << 16  # streaming window; the cut lands in its last quarter
_READ_BYTES = 1 << 16


@dataclass(frozen=True)
class Span:
    """One chunk of a document: its tokens and the exact characters they came from."""

    index: int
    token_ids: tuple[int, ...]
    char_start: int
    char_end: int
    text: str
    content_id: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.text.encode("utf-8")).hexdigest()
        object.__setattr__(self, "content_id", digest)

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


def chunk(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    span_tokens: int = DEFAULT_SPAN_TOKENS,
    overlap: int = 0,
) -> list[Span]:
    """Split `text` into spans of at most `span_tokens` tokens (see the module docstring).

    Empty or whitespace-only text gives no spans. `overlap` tokens of each span are repeated at
    the start of the next (rounded down to a character boundary).
    """
    return list(iter_chunks([text], tokenizer, span_tokens=span_tokens, overlap=overlap))


def iter_chunks(
    pieces: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    span_tokens: int = DEFAULT_SPAN_TOKENS,
    overlap: int = 0,
    window_chars: int = _WINDOW_CHARS,
) -> Iterator[Span]:
    """Chunk a document that arrives as consecutive pieces of text, in bounded memory."""
    if span_tokens < 1:
        raise ValueError(f"span_tokens must be positive, got {span_tokens}")
    if not 0 <= overlap < span_tokens:
        raise ValueError(f"overlap must be in [0, span_tokens), got {overlap} with {span_tokens}")
    backend = _backend(tokenizer)
    builder = _SpanBuilder(span_tokens, overlap)
    for ids, offsets, text in _stream_tokens(pieces, backend, window_chars):
        yield from builder.feed(ids, offsets, text)
    yield from builder.finish()


def chunk_file(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    span_tokens: int = DEFAULT_SPAN_TOKENS,
    overlap: int = 0,
    errors: DecodeErrors = "strict",
) -> Iterator[Span]:
    """Chunk a UTF-8 file without reading it whole.

    Invalid UTF-8 raises `ChunkingError` naming the file and byte offset unless `errors` is
    "replace" (U+FFFD) or "ignore".
    """
    return iter_chunks(
        read_utf8(Path(path), errors), tokenizer, span_tokens=span_tokens, overlap=overlap
    )


def _backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ChunkingError(
            f"{type(tokenizer).__name__} is not a fast tokenizer, so it reports no character "
            "offsets; load the tokenizer with use_fast=True (icmem.load_model does)."
        )
    # A call such as `tokenizer(texts, truncation=True, max_length=256)` (TextEmbedder.embed)
    # leaves truncation and padding set on the backend, and transformers resets them only on
    # its next call that asks for none. The chunker encodes with the backend itself, so it
    # resets them the same way; otherwise a tokenizer shared with an embedder would silently
    # cut every later document at the embedder's length.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return backend


def read_utf8(path: Path, errors: DecodeErrors = "strict") -> Iterator[str]:
    """Decode a file in blocks; invalid UTF-8 raises `ChunkingError` naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    consumed = 0
    with path.open("rb") as handle:
        while True:
            block = handle.read(_READ_BYTES)
            final = not block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as exc:
                pending = len(decoder.getstate()[0]) if not final else 0
                offset = consumed - pending + exc.start
                raise ChunkingError(
                    f"{path}: invalid UTF-8 at byte offset {offset}; fix the file or pass "
                    "errors='replace' (CLI: --errors replace) to substitute U+FFFD"
                ) from exc
            consumed += len(block)
            if text:
                yield text
            if final:
                return


_Offsets = list[tuple[int, int]]


def _stream_tokens(
    pieces: Iterable[str], backend: Tokenizer, window_chars: int
) -> Iterator[tuple[list[int], _Offsets, str]]:
    """Yield (ids, absolute offsets, text) in order; the texts concatenate to the document."""
    buf, base = "", 0
    source = iter(pieces)
    exhausted = False
    want = window_chars
    while True:
        while not exhausted and len(buf) < want:
            piece = next(source, None)
            if piece is None:
                exhausted = True
            else:
                buf += piece
        encoding = backend.encode(buf, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        if exhausted:
            yield ids, [(base + s, base + e) for s, e in offsets], buf
            return
        cut = _safe_cut(buf, ids, offsets, backend)
        if cut is None:
            want = 2 * len(buf)  # no stable cut found (e.g. one enormous word): read more
            continue
        cut_char = offsets[cut][0]
        yield ids[:cut], [(base + s, base + e) for s, e in offsets[:cut]], buf[:cut_char]
        buf, base, want = buf[cut_char:], base + cut_char, window_chars


def _safe_cut(buf: str, ids: list[int], offsets: _Offsets, backend: Tokenizer) -> int | None:
    """Index of a token in the window's last quarter where tokenization splits cleanly."""
    first = next((i for i, (s, _) in enumerate(offsets) if s >= 3 * len(buf) // 4), len(ids))
    tried = 0
    for i in range(first, len(ids)):
        if tried == 4:
            break
        start = offsets[i][0]
        at_space = buf[start - 1].isspace() or buf[start].isspace() if start else False
        if not at_space or start < offsets[i - 1][1]:
            continue
        tried += 1
        left = backend.encode(buf[:start], add_special_tokens=False).ids
        right = backend.encode(buf[start:], add_special_tokens=False).ids
        if left == ids[:i] and right == ids[i:]:
            return i
    return None


class _SpanBuilder:
    """Turns a stream of tokens with offsets into spans; holds at most one span's worth."""

    def __init__(self, span_tokens: int, overlap: int) -> None:
        self.span_tokens, self.overlap = span_tokens, overlap
        self.ids: list[int] = []
        self.offsets: _Offsets = []
        self.text, self.text_base = "", 0  # document text from the pending span's start
        self.span_start = 0  # char offset where the pending span begins
        self.index = 0
        self.saw_content = False
        self.held: list[Span] = []  # spans of whitespace-only text, kept until content arrives

    def feed(self, ids: list[int], offsets: _Offsets, text: str) -> Iterator[Span]:
        self.ids += ids
        self.offsets += offsets
        self.text += text
        self.saw_content = self.saw_content or (bool(text) and not text.isspace())
        while len(self.ids) > self.span_tokens:
            yield from self._release(self._cut_span())

    def finish(self) -> Iterator[Span]:
        if self.ids or self.text:
            end = self.text_base + len(self.text)
            yield from self._release(self._make_span(len(self.ids), end))
        if not self.saw_content:
            self.held.clear()

    def _release(self, span: Span) -> Iterator[Span]:
        self.held.append(span)
        if self.saw_content:
            yield from self.held
            self.held.clear()

    def _cut_span(self) -> Span:
        end = next((j for j in range(self.span_tokens, 0, -1) if self._is_boundary(j)), None)
        if end is None:
            raise ChunkingError(
                f"span_tokens={self.span_tokens} is smaller than the tokens of one character "
                f"at offset {self.offsets[0][0]}; use a larger span_tokens"
            )
        span = self._make_span(end, self.offsets[end][0])
        restart = end
        if self.overlap:
            restart = next(
                (j for j in range(end - self.overlap, 0, -1) if self._is_boundary(j)), end
            )
        new_start = self.offsets[restart][0]
        self.text = self.text[new_start - self.text_base :]
        self.text_base = self.span_start = new_start
        del self.ids[:restart], self.offsets[:restart]
        return span

    def _is_boundary(self, j: int) -> bool:
        """A span may start at token j only if no character is shared with token j-1."""
        return self.offsets[j][0] >= self.offsets[j - 1][1] and (
            self.offsets[j][0] > self.offsets[j - 1][0]
        )

    def _make_span(self, n_tokens: int, char_end: int) -> Span:
        local = slice(self.span_start - self.text_base, char_end - self.text_base)
        span = Span(
            index=self.index,
            token_ids=tuple(self.ids[:n_tokens]),
            char_start=self.span_start,
            char_end=char_end,
            text=self.text[local],
        )
        self.index += 1
        return span
