"""The pipeline joins ICAE, embedder and store: what goes in comes back, in a stated order."""

from __future__ import annotations

import hashlib

import pytest
import torch
from icmem.store import MemoryStore
from icmem.store.errors import NotAStoreError

from icmem.codec import SlotCodecError
from icmem.embedding import TextEmbedder
from icmem.errors import ConversationError
from icmem.icae import ICAE
from icmem.icae.slots import MemorySlots
from icmem.pipeline import NO_MEMORY_NOTICE, MemoryPipeline

DOCS = {
    "fox": "The quick brown fox jumps over the lazy dog. " * 6,
    "paris": "Paris is the capital of France; Berlin is the capital of Germany. " * 5,
    "names": "Alice, Bob, London, Tokyo: numbers, names and places. " * 5,
}
NS = ("tenant", "agent", "thread")


@pytest.fixture
def icae(pipeline) -> ICAE:
    return pipeline.icae


@pytest.fixture
def embedder(pipeline) -> TextEmbedder:
    return pipeline.embedder


def ingest_all(pipeline, namespace=NS):
    return {
        key: pipeline.ingest(text, namespace=namespace, document_id=key, source=f"{key}.txt")
        for key, text in DOCS.items()
    }


def test_ingest_stores_every_span_with_its_slots(pipeline, icae):
    added = ingest_all(pipeline)
    for key, text in DOCS.items():
        spans = pipeline.store.get_slots(list(added[key].span_ids), namespace=NS)
        expected = icae.compress(text)
        assert len(spans) == len(expected) > 1
        for stored, slots in zip(spans, expected, strict=True):
            decoded = MemorySlots.from_bytes(stored.blob, icae.fingerprint)
            torch.testing.assert_close(decoded.tensor, slots.tensor)


def test_recall_orders_by_document_then_position(pipeline):
    ingest_all(pipeline)
    recalled = pipeline.recall(DOCS["paris"][:60], namespace=NS, k=6)
    assert len(recalled.hits) == len(recalled.memory) == 6
    first_seen: list[str] = []
    for hit in recalled.hits:
        if hit.document_id not in first_seen:
            first_seen.append(hit.document_id)
    grouped = sorted(recalled.hits, key=lambda h: (first_seen.index(h.document_id), h.position))
    assert recalled.hits == grouped
    assert [m.span_id for m in recalled.memory] == [str(h.span_id) for h in recalled.hits]


def test_exact_text_recalls_its_own_span_first(pipeline):
    ingest_all(pipeline)
    span_text = pipeline.store.search(pipeline.embedder.embed(["x"])[0], 50, namespace=NS)[3].text
    (hit,) = pipeline.recall(span_text, namespace=NS, k=1).hits
    assert hit.text == span_text


def test_namespaces_are_isolated(pipeline):
    ingest_all(pipeline, namespace=("a", "agent", "t"))
    pipeline.ingest(
        "secret words only for tenant b", namespace=("b", "agent", "t"), document_id="secret"
    )
    hits = pipeline.recall(
        "secret words only for tenant b", namespace=("a", "agent", "t"), k=20
    ).hits
    assert all(h.document_id != "secret" for h in hits)


def test_ask_decodes_from_recalled_memory(pipeline, icae):
    ingest_all(pipeline)
    answer = pipeline.ask("What is the capital of France?", namespace=NS, k=2, max_new_tokens=5)
    recalled = pipeline.recall("What is the capital of France?", namespace=NS, k=2)
    expected = icae.generate(recalled.memory, "What is the capital of France?", max_new_tokens=5)
    assert answer.text == expected
    assert answer.hits == recalled.hits
    streamed = "".join(
        pipeline.stream_answer(
            "What is the capital of France?", namespace=NS, k=2, max_new_tokens=5
        )
    )
    assert streamed == expected


def test_ask_and_stream_answer_recall_only_what_the_filter_admits(pipeline, icae):
    for key, text in DOCS.items():
        pipeline.ingest(text, namespace=NS, document_id=key, metadata={"topic": key})
    only = {"topic": "fox"}
    answer = pipeline.ask("capital of France?", namespace=NS, k=3, filter=only, max_new_tokens=3)
    assert answer.hits and {h.document_id for h in answer.hits} == {"fox"}
    recalled = pipeline.recall("capital of France?", namespace=NS, k=3, filter=only)
    expected = icae.generate(recalled.memory, "capital of France?", max_new_tokens=3)
    streamed = pipeline.stream_answer(
        "capital of France?", namespace=NS, k=3, filter=only, max_new_tokens=3
    )
    assert answer.text == "".join(streamed) == expected


def test_empty_document_is_not_stored(pipeline):
    assert pipeline.ingest("   \n", namespace=NS, document_id="blank") is None
    assert pipeline.store.stats().documents == 0


def test_reingesting_replaces_the_document(pipeline):
    first = pipeline.ingest(DOCS["fox"], namespace=NS, document_id="doc")
    second = pipeline.ingest(DOCS["paris"], namespace=NS, document_id="doc")
    assert pipeline.store.stats().documents == 1
    assert set(first.span_ids).isdisjoint(second.span_ids)


def test_memory_survives_reopening(tmp_path, icae, embedder):
    with MemoryPipeline(icae, MemoryStore.open(tmp_path / "s", dim=embedder.dim), embedder) as p:
        ingest_all(p)
        before = p.recall("capital of France", namespace=NS, k=3)
    with MemoryPipeline(icae, MemoryStore.open(tmp_path / "s", dim=embedder.dim), embedder) as p:
        after = p.recall("capital of France", namespace=NS, k=3)
    assert [h.span_id for h in after.hits] == [h.span_id for h in before.hits]
    for a, b in zip(after.memory, before.memory, strict=True):
        torch.testing.assert_close(a.tensor, b.tensor)


def test_an_unknown_codec_fails_where_it_is_given(pipeline):
    """Not at the first ingest, after a batch of spans was compressed for nothing."""
    with pytest.raises(SlotCodecError, match="unknown slot codec 'fp8'; choose one of fp32"):
        MemoryPipeline(pipeline.icae, pipeline.store, pipeline.embedder, codec="fp8")


def test_file_ingestion_matches_text_ingestion(pipeline, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOCS["names"], encoding="utf-8")
    from_file = pipeline.ingest_file(path, namespace=NS)
    assert from_file.id == str(path)
    from_text = pipeline.ingest(DOCS["names"], namespace=NS, document_id="t")
    assert len(from_file.span_ids) == len(from_text.span_ids)


def test_batch_ingestion_resumes_and_skips_unchanged_files(pipeline, tmp_path):
    paths = []
    for key, text in DOCS.items():
        path = tmp_path / f"{key}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    first = pipeline.ingest_files(paths[:2], namespace=NS, progress=False)
    assert first.as_dict() == {"ingested": 2, "skipped": 0, "empty": 0}
    paths[0].write_text("changed text " * 10, encoding="utf-8")
    second = pipeline.ingest_files([*paths, tmp_path / "blank.txt"], namespace=NS, progress=False)
    assert second.as_dict() == {"ingested": 2, "skipped": 1, "empty": 1}
    documents = pipeline.store.list_documents(NS)
    assert [d.id for d in documents] == [str(p) for p in paths]
    assert documents[0].content_hash == hashlib.sha256(b"changed text " * 10).hexdigest()
    assert all(d.span_count >= 1 for d in documents)


def test_recalled_memory_knows_its_spans_lengths_so_spread_slots_decode(tmp_path, tokenizer):
    """Spread slot positions are laid out from each span's token count; recall must carry it."""
    from tiny_models import tiny_embedder, tiny_icae

    icae = tiny_icae(tokenizer, slot_positions="spread", slot_head="scale")
    embedder = tiny_embedder(tokenizer)
    store = MemoryStore.open(tmp_path / "s", dim=embedder.dim, model_fingerprint=icae.fingerprint)
    with MemoryPipeline(icae, store, embedder, codec="fp32") as memory:
        added = memory.ingest(DOCS["paris"], namespace=NS, document_id="paris")
        recalled = memory.recall("Paris", namespace=NS, k=3)
        spans = {s.span_id: s for s in store.get_slots(list(added.span_ids), namespace=NS)}
        assert [m.token_count for m in recalled.memory] == [
            spans[h.span_id].token_count for h in recalled.hits
        ]
        assert all(m.token_count for m in recalled.memory)
        assert isinstance(memory.ask("Where is Paris?", namespace=NS, max_new_tokens=3).text, str)


def test_a_damaged_span_drops_out_of_recall_with_its_hit(pipeline, monkeypatch):
    ingest_all(pipeline)
    hits = pipeline.recall(DOCS["fox"][:40], namespace=NS, k=4).hits
    damaged = hits[1].span_id
    real = pipeline.store.get_slots

    def without_damaged(span_ids, **kwargs):  # what the store answers for a damaged blob
        return [s for s in real(span_ids, **kwargs) if s.span_id != damaged]

    monkeypatch.setattr(pipeline.store, "get_slots", without_damaged)
    recalled = pipeline.recall(DOCS["fox"][:40], namespace=NS, k=4)
    assert [h.span_id for h in recalled.hits] == [h.span_id for h in hits if h.span_id != damaged]
    assert [m.span_id for m in recalled.memory] == [str(h.span_id) for h in recalled.hits]


def test_an_answer_with_nothing_recalled_says_so_in_its_text(pipeline, icae):
    base = icae.generate([], "Where is Paris?", max_new_tokens=4)
    answer = pipeline.ask(
        "Where is Paris?", namespace=("empty", "empty", "empty"), max_new_tokens=4
    )
    assert answer.hits == []
    assert answer.text == NO_MEMORY_NOTICE + base
    reply = pipeline.reply("Where is Paris?", namespace=("empty",), max_new_tokens=4)
    assert (reply.memory, reply.notice) == ("none", NO_MEMORY_NOTICE)
    assert "".join(reply.text_pieces()) == NO_MEMORY_NOTICE + base
    streamed = pipeline.stream_answer("Where is Paris?", namespace=("empty",), max_new_tokens=4)
    assert "".join(streamed) == NO_MEMORY_NOTICE + base
    # Under a JSON schema the answer must parse: no notice.
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    shaped = pipeline.reply("Where?", namespace=("empty",), max_new_tokens=4, json_schema=schema)
    assert shaped.notice == "" and not "".join(shaped.pieces).startswith("(")
    # Asked for the plain model: no recall, and so nothing to warn about.
    ingest_all(pipeline)
    plain = pipeline.reply("Where is Paris?", namespace=NS, max_new_tokens=4, memory="none")
    assert (plain.hits, plain.memory, plain.notice) == ([], "none", "")
    assert "".join(plain.pieces) == base
    # Found memory: no notice.
    found = pipeline.reply("Where is Paris?", namespace=NS, k=1, max_new_tokens=4)
    assert found.hits and found.notice == ""


def test_opening_a_missing_store_refuses_unless_asked_to_create(tmp_path, icae, embedder):
    typo = tmp_path / "stroe"
    with pytest.raises(NotAStoreError, match=rf"no memory store at {typo}.*create=True"):
        MemoryPipeline.open(typo, icae=icae, embedder=embedder)
    assert not typo.exists()  # nothing was created
    with MemoryPipeline.open(typo, icae=icae, embedder=embedder, create=True) as created:
        created.ingest(DOCS["fox"], namespace=NS, document_id="fox")
    with MemoryPipeline.open(typo, icae=icae, embedder=embedder) as reopened:
        assert [d.id for d in reopened.list_documents(NS)] == ["fox"]


def test_a_user_message_longer_than_the_model_reads_is_refused_before_any_work(
    pipeline, icae, monkeypatch
):
    limit = icae.max_positions
    assert pipeline.max_input_tokens == limit
    long_message = "Paris is the capital of France. " * 40
    assert len(icae.tokenize(long_message)) > limit

    def no_recall(*args, **kwargs):
        raise AssertionError("recall ran for a message that is refused")

    monkeypatch.setattr(pipeline, "recall", no_recall)
    with pytest.raises(ConversationError, match=rf"tokens, more than the {limit}.*icmem ingest"):
        pipeline.ask(long_message, namespace=NS)
    turns = [{"role": "user", "content": long_message}]
    with pytest.raises(ConversationError, match="more than the"):
        pipeline.reply(turns, namespace=NS)
    # Older turns may be long (recall brings them back); the last message is what must fit.
    monkeypatch.undo()
    turns += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "Paris?"}]
    assert "".join(pipeline.reply(turns, namespace=NS, max_new_tokens=2).pieces)


def test_a_conversation_recalls_for_its_last_user_message(pipeline, icae):
    from icmem.errors import ConversationError

    ingest_all(pipeline)
    conversation = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Tell me about foxes."},
        {"role": "assistant", "content": "They jump."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    reply = pipeline.reply(conversation, namespace=NS, k=2, max_new_tokens=3)
    recalled = pipeline.recall("What is the capital of France?", namespace=NS, k=2)
    assert [h.span_id for h in reply.hits] == [h.span_id for h in recalled.hits]
    assert "".join(reply.pieces) == icae.generate(recalled.memory, conversation, max_new_tokens=3)
    assert reply.prompt_tokens == len(icae.format_chat(conversation))
    assert reply.memory_slots == sum(m.num_slots for m in recalled.memory)
    with pytest.raises(ConversationError, match="no user message"):
        pipeline.reply([{"role": "system", "content": "hi"}], namespace=NS)


def test_memory_as_text_gives_the_base_model_the_recalled_spans(pipeline, icae):
    ingest_all(pipeline)
    question = "What is the capital of France?"
    reply = pipeline.reply(question, namespace=NS, k=2, max_new_tokens=4, memory="text")
    recalled = pipeline.recall(question, namespace=NS, k=2)
    context = "Context from memory:\n\n" + "\n\n".join(h.text for h in recalled.hits)
    conversation = [{"role": "system", "content": context}, {"role": "user", "content": question}]
    assert "".join(reply.pieces) == icae.generate([], conversation, max_new_tokens=4)
    assert (reply.memory, reply.memory_slots) == ("text", 0)
    assert reply.prompt_tokens == len(icae.format_chat(conversation))
    # a system prompt of the caller's own is kept, with the context after it
    asked = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    texted = pipeline.reply(asked, namespace=NS, k=2, max_new_tokens=4, memory="text")
    expected = [{"role": "system", "content": "Be brief.\n\n" + context}, asked[1]]
    assert texted.prompt_tokens == len(icae.format_chat(expected))
    with pytest.raises(ValueError, match="'slots', 'text' or 'none'"):
        pipeline.reply(question, namespace=NS, memory="raw")


def test_ask_and_stream_answer_pass_the_memory_form_on(pipeline, icae):
    ingest_all(pipeline)
    question = "What is the capital of France?"
    expected = "".join(
        pipeline.reply(question, namespace=NS, k=2, max_new_tokens=4, memory="text").pieces
    )
    asked = pipeline.ask(question, namespace=NS, k=2, max_new_tokens=4, memory="text").text
    streamed = "".join(
        pipeline.stream_answer(question, namespace=NS, k=2, max_new_tokens=4, memory="text")
    )
    from_slots = pipeline.ask(question, namespace=NS, k=2, max_new_tokens=4).text
    recalled = pipeline.recall(question, namespace=NS, k=2)
    assert asked == streamed == expected
    assert from_slots == icae.generate(recalled.memory, question, max_new_tokens=4)
    with pytest.raises(ValueError, match="'slots', 'text' or 'none'"):
        pipeline.ask(question, namespace=NS, memory="raw")


def _hit(document_id: str, position: int, score: float, namespace=("a", "b", "c")):
    from icmem.store import SearchHit

    return SearchHit(
        span_id=hash((document_id, position, namespace)) % 10**6,
        score=score,
        document_id=document_id,
        namespace=namespace,
        position=position,
        char_start=0,
        char_end=1,
        text="",
        metadata={},
        source="",
    )


def test_memory_order_groups_documents_by_best_hit_then_reading_order():
    from icmem.pipeline import memory_order

    hits = [  # best first, as search returns them
        _hit("zeta", 7, 0.9),
        _hit("alpha", 2, 0.8),
        _hit("zeta", 3, 0.7),
        _hit("alpha", 0, 0.6),
        _hit("zeta", 5, 0.5),
        _hit("zeta", 1, 0.4, namespace=("a", "b", "d")),  # same id, another namespace
    ]
    ordered = [(h.document_id, h.position, h.namespace[-1]) for h in memory_order(hits)]
    assert ordered == [
        ("zeta", 3, "c"),
        ("zeta", 5, "c"),
        ("zeta", 7, "c"),
        ("alpha", 0, "c"),
        ("alpha", 2, "c"),
        ("zeta", 1, "d"),
    ]


def test_a_long_text_written_in_parts_reads_back_as_one_document(pipeline, icae):
    """More spans than one commit holds: the parts are assembled into one document whose spans,
    slots and order are those of the text, under a generated id like any other document."""
    from icmem.chunking import chunk
    from icmem.writing import DEFAULT_BATCH_SPANS, PARTS_ROOT

    text = " ".join(f"Entry {i}: {DOCS['names']}" for i in range(60))
    spans = chunk(text, icae.tokenizer, span_tokens=icae.config.span_tokens)
    assert len(spans) > 2 * DEFAULT_BATCH_SPANS
    added = pipeline.ingest(text, namespace=NS, metadata={"topic": "entries"})
    assert len(added.id) == 32 and len(added.span_ids) == len(spans)
    query = pipeline.embed([spans[-1].text])[0]
    filtered = pipeline.store.search(query, 500, namespace=NS, filter={"topic": "entries"})
    assert len(filtered) == len(spans)  # the assembled document's metadata is searchable
    (document,) = pipeline.store.list_documents(NS)
    assert (document.id, document.span_count) == (added.id, len(spans))
    assert document.content_hash == hashlib.sha256(text.encode()).hexdigest()
    assert pipeline.store.list_namespaces((PARTS_ROOT,)) == []
    stored = pipeline.store.get_slots(list(added.span_ids), namespace=NS)
    assert [s.position for s in stored] == list(range(len(spans)))
    for i in (0, DEFAULT_BATCH_SPANS, len(spans) - 1):  # the first span of each part, the last
        (expected,) = icae.compress([list(spans[i].token_ids)])
        decoded = MemorySlots.from_bytes(stored[i].blob, icae.fingerprint)
        torch.testing.assert_close(decoded.tensor, expected.tensor)
    hits = pipeline.store.get_spans(list(added.span_ids), namespace=NS)
    assert "".join(h.text for h in sorted(hits, key=lambda h: h.position)) == text
