"""The LoCoMo benchmark (benchmarks/locomo.py) on a small synthetic file in LoCoMo's format:
parsing and its counts, refusal of a wrong file, scoring, memories, and a whole run with tiny
models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import locomo

# Per conversation: category -> questions (5 is adversarial and must be left out).
CATEGORY_COUNTS = [{1: 2, 2: 3, 3: 1, 4: 4, 5: 2}, {1: 1, 2: 1, 4: 2, 5: 3}]
SESSIONS = 3


def _turn(speaker: str, session: int, n: int, caption: bool = False) -> dict:
    turn = {
        "speaker": speaker,
        "dia_id": f"D{session}:{n}",
        "text": f"{speaker} says thing {n} of session {session} about the garden and Paris.",
    }
    if caption:
        turn.update(blip_caption="a dog on a beach", img_url=["http://x"], query="dog")
    return turn


def _sample(index: int, counts: dict[int, int]) -> dict:
    conversation: dict = {"speaker_a": "Ann", "speaker_b": "Bo"}
    # Written in a shuffled key order, with session 10 to check numeric (not text) ordering.
    for session in (10, 2, 1)[:SESSIONS]:
        conversation[f"session_{session}"] = [
            _turn("Ann" if n % 2 else "Bo", session, n, caption=(session, n) == (2, 1))
            for n in range(1, 7)
        ]
        conversation[f"session_{session}_date_time"] = (
            f"1:0{session % 10} pm on {session} May, 2023"
        )
    qa = []
    for category, count in counts.items():
        for n in range(count):
            question = {"question": f"Q{category}.{n} about Paris?", "evidence": ["D1:1"]}
            question["category"] = category
            if category == 5:
                question["adversarial_answer"] = "a trap"
            else:
                question["answer"] = 2022 if (category, n) == (2, 0) else f"answer {category} {n}"
            qa.append(question)
    return {
        "sample_id": f"conv-{index}",
        "conversation": conversation,
        "qa": qa,
        "event_summary": {},
        "observation": {},
        "session_summary": {},
    }


@pytest.fixture
def locomo_file(tmp_path):
    path = tmp_path / "locomo10.json"
    samples = [_sample(i, counts) for i, counts in enumerate(CATEGORY_COUNTS)]
    path.write_text(json.dumps(samples), encoding="utf-8")
    return path


def test_parser_counts_categories_and_leaves_out_adversarial(locomo_file):
    data = locomo.load_locomo(locomo_file, expected_sha256=None)
    assert [c.sample_id for c in data.conversations] == ["conv-0", "conv-1"]
    for conversation, counts in zip(data.conversations, CATEGORY_COUNTS, strict=True):
        found = {}
        for q in conversation.questions:
            found[q.category] = found.get(q.category, 0) + 1
        assert found == {c: n for c, n in counts.items() if c != locomo.ADVERSARIAL}
        assert conversation.adversarial == counts[locomo.ADVERSARIAL]
        assert [s.number for s in conversation.sessions] == [1, 2, 10]
        assert conversation.speakers == ("Ann", "Bo")
    first = data.conversations[0]
    assert first.questions[2].answer == "2022"  # a numeric answer becomes text
    assert first.questions[2].index == 2  # the index in the file's qa list
    assert first.sessions[1].turns[0].text.endswith("[shares a photo: a dog on a beach]")
    assert len(data.sha256) == 64


def test_the_real_file_is_required_by_default(locomo_file):
    with pytest.raises(locomo.LocomoDataError, match=r"sha256.*download the file from https"):
        locomo.load_locomo(locomo_file)


def test_a_file_in_another_format_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"sample_id": "x", "dialogue": []}]), encoding="utf-8")
    with pytest.raises(locomo.LocomoDataError, match=r"not in LoCoMo's format.*conversation"):
        locomo.load_locomo(path, expected_sha256=None)
    with pytest.raises(locomo.LocomoDataError, match=r"does not exist.*locomo10\.json"):
        locomo.load_locomo(tmp_path / "missing.json")


def _question(category: int, answer: str) -> locomo.Question:
    return locomo.Question("c", 0, "q", answer, category, ())


def test_f1_uses_locomos_per_category_answer_handling():
    # Multi-hop: each gold part scored against its best predicted part, then averaged.
    assert locomo.locomo_f1("Paris, Rome", _question(1, "Rome, Paris")) == 1.0
    assert locomo.locomo_f1("Paris", _question(1, "Rome, Paris")) == 0.5
    # Open-domain: only the first ';' alternative is gold.
    assert locomo.locomo_f1("psychology", _question(3, "psychology; counseling")) == 1.0
    assert locomo.locomo_f1("counseling", _question(3, "psychology; counseling")) == 0.0
    # Others: plain token F1 (2 of 3 predicted words, 2 of 2 gold words).
    assert locomo.locomo_f1("7 May 2023", _question(2, "May 2023")) == pytest.approx(0.8)


def test_question_sample_is_seeded_and_per_category(locomo_file):
    conversation = locomo.load_locomo(locomo_file, expected_sha256=None).conversations[0]
    picked = locomo.select_questions(conversation, 2, seed=7)
    assert picked == locomo.select_questions(conversation, 2, seed=7)
    counts = {}
    for q in picked:
        counts[q.category] = counts.get(q.category, 0) + 1
    assert counts == {1: 2, 2: 2, 3: 1, 4: 2}
    assert len(locomo.select_questions(conversation, None, seed=7)) == 10


def test_memories_are_dated_packed_and_cover_every_turn(locomo_file):
    conversation = locomo.load_locomo(locomo_file, expected_sha256=None).conversations[0]
    words = lambda text: len(text.split())  # noqa: E731
    sessions = locomo.conversation_memories(conversation, words, max_tokens=40)
    for session, memories in zip(conversation.sessions, sessions, strict=True):
        ids = [i for m in memories for i in m.metadata["dia_ids"]]
        assert ids == [t.dia_id for t in session.turns]
        for memory in memories:
            (text,) = memory.texts
            assert text.startswith(f"Session {session.number}, {session.date}:")
            assert words(text) <= 40
        assert 1 < len(memories) < len(session.turns)  # packed, several turns each
    per_turn = locomo.conversation_memories(conversation, words, 512, turns_per_memory=1)
    assert [len(m) for m in per_turn] == [len(s.turns) for s in conversation.sessions]


def test_full_context_answers_from_a_copy_of_the_read_conversation(locomo_file, pipeline):
    """A question answered after another gets the answer of a fresh read of the whole
    conversation: the copy is reused, never the state the first answer left behind."""
    from icmem.icae.conversation import DecoderSession
    from icmem.icae.decoder import GREEDY

    icae = pipeline.icae
    conversation = locomo.load_locomo(locomo_file, expected_sha256=None).conversations[0]
    reader = locomo.FullContextReader(icae, conversation)
    assert len(reader.prefix_ids) > icae.max_positions  # LM-Infinite is needed to read it
    first, second = conversation.questions[:2]

    def state():
        layers = reader.session.cache.layers
        tensors = [getattr(layer, name) for layer in layers for name in locomo._CACHE_TENSORS]
        return [layer.get_seq_length() for layer in layers], [t.clone() for t in tensors]

    lengths, tensors = state()
    reader.answer(first, 8)
    after_lengths, after_tensors = state()
    assert after_lengths == lengths
    assert all(a.equal(b) for a, b in zip(after_tensors, tensors, strict=True))
    reused = reader.answer(second, 8)

    fresh = DecoderSession(icae, [], [])
    ids = reader.question_ids(second)
    expected = "".join(icae.decoder.text(fresh.generate(ids, 8, GREEDY)))
    assert reused == expected
    assert reader.cache_bytes() > 0


def test_a_run_reports_every_mode_and_category_and_resumes(locomo_file, pipeline, tmp_path):
    data = locomo.load_locomo(locomo_file, expected_sha256=None)
    settings = locomo.LocomoSettings(checkpoint="tiny", k=2, max_new_tokens=4)
    work = tmp_path / "work"
    lines: list[str] = []
    result = locomo.run_locomo(pipeline, data, settings, work, log=lines.append)

    assert set(result) >= {
        "benchmark",
        "data",
        "subset",
        "settings",
        "metric",
        "summary",
        "conversations",
        "published",
        "rows",
    }
    assert result["data"]["sha256"] == data.sha256
    assert result["data"]["questions_non_adversarial"] == 14
    assert result["data"]["adversarial_left_out"] == 5
    assert result["subset"]["complete"] is True
    assert set(result["summary"]) == set(locomo.MODES)
    for stats in result["summary"].values():
        assert stats["answers"] == 14
        assert {n: c["answers"] for n, c in stats["f1_by_category"].items()} == {
            "multi-hop": 3,
            "temporal": 4,
            "open-domain": 1,
            "single-hop": 6,
        }
        assert 0.0 <= stats["f1"] <= 1.0
    assert result["summary"]["slots"]["evidence_recalled"] is not None
    assert result["summary"]["full"]["evidence_recalled"] is None
    report = result["conversations"][0]
    assert report["memory_bytes"]["slots"] > 0
    assert report["memory_bytes"]["lm_infinite_cache"] > 0
    assert report["ingest"]["memories"] > 0
    assert report["ingest"]["seconds"] > 0
    assert result["summary"]["full"]["prefill_seconds_per_conversation"] > 0
    assert {s["system"] for s in result["published"]["scores"]} >= {"Mem0", "full context"}
    assert any("ingested session" in line for line in lines)

    # A second run answers nothing again: every row comes from the cache.
    cached = (work / "results.jsonl").read_text().count("\n")
    lines.clear()
    again = locomo.run_locomo(pipeline, data, settings, work, log=lines.append)
    assert (work / "results.jsonl").read_text().count("\n") == cached
    assert lines == []
    assert again["summary"] == result["summary"]

    # A seeded subset is stated as such.
    subset = locomo.run_locomo(
        pipeline, data, settings, work, conversations=1, per_category=1, log=lines.append
    )
    assert subset["subset"]["complete"] is False
    assert subset["subset"]["conversations"] == ["conv-0"]
    assert subset["summary"]["text"]["answers"] == 4
    by_id = locomo.run_locomo(
        pipeline, data, settings, work, conversations=["conv-1"], log=lines.append
    )
    assert by_id["subset"]["conversations"] == ["conv-1"]
    with pytest.raises(locomo.LocomoDataError, match=r"no conversation \['conv-9'\]"):
        locomo.run_locomo(pipeline, data, settings, work, conversations=["conv-9"])


def test_the_plot_is_written(locomo_file, pipeline, tmp_path):
    data = locomo.load_locomo(locomo_file, expected_sha256=None)
    settings = locomo.LocomoSettings(checkpoint="tiny", k=1, max_new_tokens=2, modes=("text",))
    result = locomo.run_locomo(pipeline, data, settings, tmp_path / "w", log=lambda _: None)
    locomo.plot(result, tmp_path / "locomo.png")
    assert (tmp_path / "locomo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_ingestion_resumes_at_the_next_session(locomo_file, pipeline, tmp_path):
    conversation = locomo.load_locomo(locomo_file, expected_sha256=None).conversations[0]
    settings = locomo.LocomoSettings(checkpoint="tiny")
    cache = locomo.ResultCache(tmp_path / "results.jsonl")
    written = []
    write = pipeline.write_documents

    def failing_on_the_second(documents, *, namespace):
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(documents[0].metadata["session"])
        return write(documents, namespace=namespace)

    pipeline.write_documents = failing_on_the_second
    with pytest.raises(KeyboardInterrupt):
        locomo.ingest_conversation(pipeline, conversation, settings, cache, print)
    assert written == [1]

    resumed = locomo.ResultCache(tmp_path / "results.jsonl")  # as a new process reads it
    pipeline.write_documents = lambda documents, *, namespace: (
        written.append(documents[0].metadata["session"]) or write(documents, namespace=namespace)
    )
    report = locomo.ingest_conversation(pipeline, conversation, settings, resumed, print)
    assert written == [1, 2, 10]
    first = resumed.get(settings.key("ingest", "conv-0", 1))
    assert first is not None and report["seconds"] >= first["seconds"] > 0
    namespace = locomo.namespace_of("conv-0")
    stored = pipeline.list_documents(namespace, exact=True)
    assert len(stored) == report["memories"]
