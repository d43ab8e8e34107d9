"""`ICAE.compress` on text splits spans with `icmem.chunking`, the one span splitter."""

from __future__ import annotations

from tiny_models import tiny_icae

from icmem.chunking import chunk


def test_compressing_text_never_ends_a_span_inside_a_character(tokenizer):
    icae = tiny_icae(tokenizer)  # 32-token spans
    text = "a🙂" * 30  # byte-level BPE: the emoji is 4 tokens, so "a🙂" is 5, and 32 % 5 != 0
    ids = icae.tokenize(text)
    fixed_step = [len(span) for span in icae.split_spans(ids)]
    spans = chunk(text, tokenizer, span_tokens=icae.config.span_tokens)
    assert fixed_step != [s.token_count for s in spans]  # cutting every 32 tokens splits a 🙂
    for span in spans:
        assert tokenizer.decode(list(span.token_ids)) == span.text  # whole characters only
    memory = icae.compress(text)
    assert [m.token_count for m in memory] == [s.token_count for s in spans]
    assert sum(m.token_count for m in memory) == len(ids)
