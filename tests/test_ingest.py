"""Ingesting a real, messy folder: every good file once, every bad one reported, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from documents import html_page, minimal_pdf

from icmem import ingest
from icmem.chunking import chunk
from icmem.ingest import ReadOptions, Skip, discover, ingest_paths, read_documents

NS = ("t", "ingest", "x")
WORDS = [
    "lighthouse",
    "keeper",
    "orchard",
    "apple",
    "tide",
    "harbour",
    "lamp",
    "ledger",
    "winter",
    "storm",
]


def _sentence(i: int) -> str:
    return f"Note {i}: the " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)) + "."


def build_messy_folder(root: Path, outside: Path) -> dict[str, str]:
    """A few hundred mixed files plus every kind of trouble; returns {document id: text} of
    the documents that must be ingested."""
    good: dict[str, str] = {}
    for i in range(100):
        path = root / f"notes/n{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_sentence(i), encoding="utf-8")
        good[str(path)] = _sentence(i)
    for i in range(50):
        path = root / f"wiki/page{i:02d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# Page {i}\n\n{_sentence(1000 + i)}\n"
        path.write_text(text, encoding="utf-8")
        good[str(path)] = text
    for i in range(50):
        path = root / f"site/p{i:02d}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html_page(f"Title {i}", [_sentence(2000 + i), "second"]), "utf-8")
        good[str(path)] = f"Title {i}\n{_sentence(2000 + i)}\nsecond"  # no <head>, no <script>
    for i in range(3):
        path = root / f"papers/paper{i}.pdf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(minimal_pdf(f"Paper {i} about the lighthouse keeper"))
        good[str(path)] = f"Paper {i} about the lighthouse keeper"
    lines = [json.dumps({"text": _sentence(3000 + i), "id": i}) for i in range(40)]
    lines.insert(7, "{not json")
    lines.insert(9, json.dumps({"body": "no text field"}))
    (root / "export.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for number, line in enumerate(lines, start=1):
        record = json.loads(line) if line.startswith('{"text"') else None
        if record:
            good[f"{root / 'export.jsonl'}#L{number}"] = record["text"]
    (root / "picture.png").write_bytes(b"\x89PNG not text")  # not a format: not taken
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "damaged.pdf").write_bytes(b"%PDF-1.4 truncated")
    (root / "vanished.txt").write_text("here at discovery, gone when read", encoding="utf-8")
    os.symlink(root / "notes", root / "notes/loop")  # a folder link back to itself
    os.symlink("self", root / "self")  # a link to itself
    os.symlink(root / "notes/n000.txt", root / "alias.txt")  # same file twice: read once,
    good[str(root / "alias.txt")] = good.pop(str(root / "notes/n000.txt"))  # where first met
    (outside / "secret.txt").write_text("outside the tree", encoding="utf-8")
    os.symlink(outside / "secret.txt", root / "escape.txt")
    os.symlink(outside, root / "escape_dir")
    return good


EXPECTED_SKIPS = {
    "latin1.txt": "invalid UTF-8 at byte offset 3",
    "damaged.pdf": "damaged PDF",
    "vanished.txt": "vanished",
    "notes/loop": "symlink loop",
    "self": "symlink loop",
    "escape.txt": "--follow-symlinks",
    "escape_dir": "--follow-symlinks",
    "export.jsonl#L8": "not JSON",
    "export.jsonl#L10": "no string field 'text'",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls contend across shared cores; one thread is several times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def messy(tmp_path, monkeypatch):
    root, outside = tmp_path / "docs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    good = build_messy_folder(root, outside)
    real_discover = ingest.discover

    def discover_then_delete(*args, **kwargs):
        found = list(real_discover(*args, **kwargs))
        (root / "vanished.txt").unlink(missing_ok=True)  # gone between discovery and reading
        return iter(found)

    monkeypatch.setattr(ingest, "discover", discover_then_delete)
    return root, good


def _skips(report_skips: list[Skip], root: Path) -> dict[str, str]:
    return {os.path.relpath(s.path, root): s.reason for s in report_skips}


def test_a_messy_folder_is_ingested_once_and_every_bad_file_listed(pipeline, messy, monkeypatch):
    root, good = messy
    calls = []
    real_store = pipeline.store_chunked

    def interrupted(documents, **kwargs):
        calls.append(sum(len(d.spans) for d in documents))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real_store(documents, **kwargs)

    monkeypatch.setattr(pipeline, "store_chunked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest_paths(pipeline, [root], namespace=NS, batch_spans=32, progress=False)
    before = pipeline.store.list_documents(NS)
    stored_before = {d.id for d in before}
    assert sum(d.span_count for d in before) == calls[0] + calls[1]  # two batches written
    assert all(c >= 32 for c in calls)  # spans of many files were compressed together

    monkeypatch.setattr(pipeline, "store_chunked", real_store)
    (root / "vanished.txt").write_text("back, and gone again when read", encoding="utf-8")
    report = ingest_paths(pipeline, [root], namespace=NS, batch_spans=32, progress=False)
    assert report.skipped == len(stored_before)
    assert report.ingested == len(good) - len(stored_before)
    skips = _skips(report.unreadable, root)
    assert set(skips) == set(EXPECTED_SKIPS)
    for name, reason in EXPECTED_SKIPS.items():
        assert reason in skips[name], (name, skips[name])

    documents = pipeline.store.list_documents(NS)
    assert sorted(d.id for d in documents) == sorted(good)  # each once, nothing else
    tokenizer, span_tokens = pipeline.icae.tokenizer, pipeline.icae.config.span_tokens
    for d in documents:
        assert d.span_count == len(chunk(good[d.id], tokenizer, span_tokens=span_tokens))
    spans = pipeline.store.stats(NS).spans
    assert spans == sum(d.span_count for d in documents)

    again = ingest_paths(pipeline, [root], namespace=NS, progress=False)
    assert (again.ingested, again.skipped, again.spans) == (0, len(good), 0)
    assert pipeline.store.stats(NS).spans == spans


def test_follow_symlinks_reads_links_out_of_the_tree(tmp_path):
    root, outside = tmp_path / "docs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("outside", encoding="utf-8")
    os.symlink(outside / "secret.txt", root / "escape.txt")
    os.symlink(outside, root / "escape_dir")
    os.symlink(root, outside / "back")  # a loop through the outside folder
    found = list(discover([root], follow_symlinks=True))
    paths = sorted(os.path.relpath(f, root) for f in found if isinstance(f, Path))
    assert paths == ["escape.txt"]  # the same file through escape_dir/ is read once
    loops = [f for f in found if isinstance(f, Skip)]
    assert [os.path.relpath(s.path, root) for s in loops] == ["escape_dir/back"]
    assert "symlink loop" in loops[0].reason


def test_glob_and_text_field_select_what_is_read(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/one.md").write_text("one", encoding="utf-8")
    (tmp_path / "two.md").write_text("two", encoding="utf-8")
    (tmp_path / "three.txt").write_text("three", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text('{"body": "four"}\n', encoding="utf-8")
    options = ReadOptions(glob="**/*.md")
    texts = sorted(d.text for d in read_documents([tmp_path], options))
    assert texts == ["one", "two"]
    options = ReadOptions(glob="*.jsonl", text_field="body")
    (document,) = read_documents([tmp_path], options)
    assert (document.text, document.metadata) == ("four", {"format": "jsonl", "line": 1})


def test_missing_path_and_replaced_bytes(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    found = list(read_documents([tmp_path / "nope", tmp_path], ReadOptions(errors="replace")))
    assert found[0] == Skip(str(tmp_path / "nope"), "does not exist; pass files or folders")
    assert found[1].text == "caf\ufffd"


def test_a_document_the_store_refuses_is_skipped_and_its_batch_stored(pipeline, tmp_path):
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "long.txt").write_text("an id longer than the store's 255 characters", "utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    report = ingest_paths(pipeline, [tmp_path], namespace=NS, progress=False)
    assert report.ingested == 2
    (refused,) = report.unreadable
    assert refused.path == str(deep / "long.txt") and "255" in refused.reason
    stored = sorted(d.id for d in pipeline.store.list_documents(NS))
    assert stored == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
