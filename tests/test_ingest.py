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
from icmem.ingest import ReadOptions, Skip, discover, read_documents
from icmem.writing import PARTS_ROOT, DocumentWriter

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
    (root / "picture.png").write_bytes(b"\x89PNG not text")  # not a format: reported, not read
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


def ingest_folder(pipeline, paths, **options):
    return pipeline.ingest_files(paths, namespace=NS, progress=False, **options)


def test_a_messy_folder_is_ingested_once_and_every_bad_file_listed(pipeline, messy, monkeypatch):
    root, good = messy
    calls = []
    real_write = DocumentWriter.write

    def interrupted(writer, records):
        calls.append(sum(len(r.spans) for r in records))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real_write(writer, records)

    monkeypatch.setattr(DocumentWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest_folder(pipeline, [root], batch_spans=32)
    before = pipeline.store.list_documents(NS)
    stored_before = {d.id for d in before}
    assert sum(d.span_count for d in before) == calls[0] + calls[1]  # two batches written
    assert all(c >= 32 for c in calls)  # spans of many files were compressed together

    monkeypatch.setattr(DocumentWriter, "write", real_write)
    monkeypatch.setattr(ingest, "KEPT_TOKENS", 300)  # some spans kept, the rest chunked again
    (root / "vanished.txt").write_text("back, and gone again when read", encoding="utf-8")
    report = ingest_folder(pipeline, [root], batch_spans=32)
    assert report.skipped == len(stored_before)
    assert report.ingested == len(good) - len(stored_before)
    skips = _skips(report.unreadable, root)
    assert set(skips) == set(EXPECTED_SKIPS)
    for name, reason in EXPECTED_SKIPS.items():
        assert reason in skips[name], (name, skips[name])
    assert list(_skips(report.unsupported, root)) == ["picture.png"]

    documents = pipeline.store.list_documents(NS)
    assert sorted(d.id for d in documents) == sorted(good)  # each once, nothing else
    tokenizer, span_tokens = pipeline.icae.tokenizer, pipeline.icae.config.span_tokens
    for d in documents:
        assert d.span_count == len(chunk(good[d.id], tokenizer, span_tokens=span_tokens))
    spans = pipeline.store.stats(NS).spans
    assert spans == sum(d.span_count for d in documents)

    again = ingest_folder(pipeline, [root])
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
    texts = sorted(d.texts for d in read_documents([tmp_path], options))
    assert texts == [("one",), ("two",)]
    options = ReadOptions(glob="*.jsonl", text_field="body")
    (document,) = read_documents([tmp_path], options)
    assert (document.texts, document.metadata) == (("four",), {"format": "jsonl", "line": 1})


def test_missing_path_and_replaced_bytes(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    found = list(read_documents([tmp_path / "nope", tmp_path], ReadOptions(errors="replace")))
    assert found[0] == Skip(str(tmp_path / "nope"), "does not exist; pass files or folders")
    assert found[1].texts == ("caf\ufffd",)


def test_a_document_the_store_refuses_is_skipped_and_its_batch_stored(pipeline, tmp_path):
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "long.txt").write_text("an id longer than the store's 255 characters", "utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    report = ingest_folder(pipeline, [tmp_path])
    assert report.ingested == 2
    (refused,) = report.unreadable
    assert refused.path == str(deep / "long.txt") and "255" in refused.reason
    stored = sorted(d.id for d in pipeline.store.list_documents(NS))
    assert stored == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar an ingestion opens, with each total it showed while it counted."""
    import tqdm

    opened = []

    class Recording(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            self.totals_shown: list[int | None] = []
            super().__init__(*args, **kwargs)
            opened.append(self)

        def update(self, n=1):
            self.totals_shown.append(self.total)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    return opened


def _span_bar(bars):
    (bar,) = [b for b in bars if getattr(b, "unit", None) == "span"]
    return bar


def long_text(tokenizer, span_tokens: int, spans: int) -> str:
    sentences = []
    while len(chunk(" ".join(sentences), tokenizer, span_tokens=span_tokens)) < spans:
        sentences += [_sentence(len(sentences) + i) for i in range(50)]
    return " ".join(sentences)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_pipeline(request, tmp_path, tokenizer):
    """The `pipeline` fixture's models over a store of each backend."""
    from icmem.store import MemoryStore
    from tiny_models import tiny_embedder, tiny_icae

    from icmem.pipeline import MemoryPipeline

    icae, embedder = tiny_icae(tokenizer), tiny_embedder(tokenizer)
    where, index_dir, server = tmp_path / "store", None, None
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        where, index_dir = server.create_database(), tmp_path / "pg-index"
    store = MemoryStore.open(
        where, dim=embedder.dim, index_dir=index_dir, model_fingerprint=icae.fingerprint
    )
    with MemoryPipeline(icae, store, embedder, codec="fp32") as opened:
        yield opened
    if server is not None:
        server.drop_databases()


def test_a_large_file_is_committed_in_parts_hidden_until_whole_and_resumed(
    backend_pipeline, tmp_path, monkeypatch, bars
):
    """Ctrl-C inside one large file keeps its finished parts; readers see the version stored
    before until the new one is whole; the next run compresses only the rest."""
    pipeline = backend_pipeline
    tokenizer, span_tokens = pipeline.icae.tokenizer, pipeline.icae.config.span_tokens
    big = tmp_path / "big.txt"
    big.write_text("An old, short version of the file.", encoding="utf-8")
    ingest_folder(pipeline, [big])
    (old,) = pipeline.store.list_documents(NS)
    text = long_text(tokenizer, span_tokens, 150)
    big.write_text(text, encoding="utf-8")
    expected = chunk(text, tokenizer, span_tokens=span_tokens)
    compressed: list[int] = []
    real_compress = pipeline.icae.compress

    def compress(spans, **kwargs):
        compressed.append(len(spans))
        if len(compressed) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third part is compressed
        return real_compress(spans, **kwargs)

    monkeypatch.setattr(pipeline.icae, "compress", compress)
    with pytest.raises(KeyboardInterrupt):
        pipeline.ingest_files([big], namespace=NS, progress=True)
    assert compressed == [64, 64, 64]
    assert pipeline.store.list_documents(NS) == [old]  # the old version, whole
    query = pipeline.embed([expected[5].text])[0]
    hits = pipeline.store.search(query, 500, namespace=NS[:1])
    assert [(h.document_id, h.text) for h in hits] == [
        (str(big), "An old, short version of the file.")
    ]
    (parts,) = pipeline.store.list_namespaces((PARTS_ROOT,))
    assert pipeline.store.stats(parts).spans == 128
    assert _span_bar(bars).total == len(expected)

    bars.clear()
    compressed.clear()
    monkeypatch.setattr(
        pipeline.icae,
        "compress",
        lambda spans, **kw: compressed.append(len(spans)) or real_compress(spans, **kw),
    )
    report = pipeline.ingest_files([big], namespace=NS, progress=True)
    assert sum(compressed) == report.spans == len(expected) - 128  # nothing compressed twice
    bar = _span_bar(bars)
    assert bar.totals_shown[0] == bar.total == bar.n == len(expected) - 128  # the true total
    assert "span/s" in str(bar)
    (document,) = pipeline.store.list_documents(NS)
    assert (document.id, document.span_count) == (str(big), len(expected))
    hits = pipeline.store.search(query, 500, namespace=NS)
    assert sorted((h.position, h.text) for h in hits) == [(s.index, s.text) for s in expected]
    assert pipeline.store.list_namespaces((PARTS_ROOT,)) == []  # the parts became the file
    assert set(pipeline.store.index_ids(NS)) == set(pipeline.store.span_ids(NS))
    again = ingest_folder(pipeline, [big])
    assert (again.skipped, again.spans) == (1, 0)


def interrupt_after_first_part(pipeline, path, monkeypatch) -> None:
    """Ingest `path` in parts of 40 spans and press Ctrl-C once the first part is committed."""
    real_write_part = DocumentWriter.write_part

    def interrupted(writer, document, spans):
        real_write_part(writer, document, spans)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(DocumentWriter, "write_part", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ingest_folder(pipeline, [path], batch_spans=40)


def test_parts_of_another_version_are_dropped_not_mixed_in(pipeline, tmp_path, monkeypatch):
    tokenizer, span_tokens = pipeline.icae.tokenizer, pipeline.icae.config.span_tokens
    big = tmp_path / "big.txt"
    big.write_text(long_text(tokenizer, span_tokens, 100), encoding="utf-8")
    interrupt_after_first_part(pipeline, big, monkeypatch)
    text = long_text(tokenizer, span_tokens, 90).upper()  # the file changed meanwhile
    big.write_text(text, encoding="utf-8")
    report = ingest_folder(pipeline, [big], batch_spans=40)
    expected = chunk(text, tokenizer, span_tokens=span_tokens)
    assert report.spans == len(expected)
    hits = pipeline.store.search(pipeline.embed(["x"])[0], 500, namespace=NS)
    assert sorted((h.position, h.text) for h in hits) == [(s.index, s.text) for s in expected]
    assert pipeline.store.list_namespaces((PARTS_ROOT,)) == []


@pytest.mark.parametrize("now", ["small", "as stored"])
def test_parts_of_a_version_never_finished_are_dropped(pipeline, tmp_path, monkeypatch, now):
    """Interrupted inside a large version of a file that then became small again (or went back
    to the version stored): its parts are deleted, not left behind."""
    tokenizer, span_tokens = pipeline.icae.tokenizer, pipeline.icae.config.span_tokens
    big = tmp_path / "big.txt"
    big.write_text("A short note.", encoding="utf-8")
    ingest_folder(pipeline, [big])
    big.write_text(long_text(tokenizer, span_tokens, 100), encoding="utf-8")
    interrupt_after_first_part(pipeline, big, monkeypatch)
    assert len(pipeline.store.list_namespaces((PARTS_ROOT,))) == 1
    big.write_text("A short note." if now == "as stored" else "Another note.", encoding="utf-8")
    report = ingest_folder(pipeline, [big], batch_spans=40)
    assert (report.skipped, report.ingested) == ((1, 0) if now == "as stored" else (0, 1))
    assert pipeline.store.list_namespaces((PARTS_ROOT,)) == []
    assert pipeline.store.stats().spans == 1  # all that is stored is the one span of the note


def test_many_small_files_show_their_true_total_from_the_start(
    pipeline, tmp_path, bars, monkeypatch
):
    tokenizer, span_tokens = pipeline.icae.tokenizer, pipeline.icae.config.span_tokens
    texts = [_sentence(i) * (1 + i % 7) for i in range(40)]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    chunked = []
    real_chunk = pipeline.encoder.chunk
    monkeypatch.setattr(
        pipeline.encoder, "chunk", lambda document: chunked.append(1) or real_chunk(document)
    )
    report = pipeline.ingest_files([folder], namespace=NS, progress=True)
    spans = sum(len(chunk(t, tokenizer, span_tokens=span_tokens)) for t in texts)
    bar = _span_bar(bars)
    assert set(bar.totals_shown) == {spans} and bar.n == report.spans == spans
    assert len(chunked) == len(texts)  # counting the total cost no second chunking


def test_unsupported_files_are_reported_as_skipped(pipeline, tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("the lamp is lit", encoding="utf-8")
    (folder / "data.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    report = pipeline.ingest_files([folder], namespace=NS, progress=True)
    assert report.ingested == 1 and report.unreadable == []
    (skip,) = report.unsupported
    assert skip.path == str(folder / "data.csv") and "not a format icmem reads" in skip.reason
    assert f"skipped {folder / 'data.csv'}: not a format" in capsys.readouterr().err
    named = pipeline.ingest_files([folder / "data.csv"], namespace=NS, progress=False)
    assert named.ingested == 1  # a file named itself is read as text


@pytest.mark.parametrize("bad", ["docs", ["docs", 1], {"docs": "x"}, ()])
def test_a_bad_namespace_is_refused_before_any_work(pipeline, tmp_path, monkeypatch, bad):
    from icmem.store.errors import InvalidRecordError
    from icmem.store.namespaces import validate_namespace

    from icmem.documents import TextDocument

    def compress(*args, **kwargs):
        raise AssertionError("compressed before the arguments were checked")

    monkeypatch.setattr(pipeline.icae, "compress", compress)
    (tmp_path / "a.txt").write_text("some text to remember", encoding="utf-8")
    with pytest.raises(InvalidRecordError) as reference:
        validate_namespace(bad)
    calls = [
        lambda: pipeline.ingest("some text to remember", namespace=bad),
        lambda: pipeline.ingest_file(tmp_path / "a.txt", namespace=bad),
        lambda: pipeline.ingest_files([tmp_path], namespace=bad, progress=False),
        lambda: pipeline.write_documents([TextDocument.from_text("some text", "d")], namespace=bad),
    ]
    for call in calls:
        with pytest.raises(InvalidRecordError) as refused:
            call()
        assert str(refused.value) == str(reference.value)  # one rule, one message


def test_a_document_the_store_would_refuse_is_refused_before_compression(pipeline, monkeypatch):
    from icmem.store.errors import InvalidRecordError

    monkeypatch.setattr(pipeline.icae, "compress", lambda *a, **k: pytest.fail("compressed"))
    with pytest.raises(InvalidRecordError, match="255"):
        pipeline.ingest("text", namespace=NS, document_id="x" * 300)
    with pytest.raises(InvalidRecordError, match="NUL"):
        pipeline.ingest("text with \x00 inside", namespace=NS, document_id="nul")


def test_assemble_document_refuses_what_it_cannot_assemble(pipeline):
    from icmem.store import DocumentRecord
    from icmem.store.errors import InvalidRecordError

    header = DocumentRecord(spans=(), id="doc")
    with pytest.raises(InvalidRecordError, match="no parts"):
        pipeline.store.assemble_document(header, parts_namespace=(PARTS_ROOT, "x"), namespace=NS)
    with pytest.raises(InvalidRecordError, match="not the document's namespace"):
        pipeline.store.assemble_document(header, parts_namespace=NS[:2], namespace=NS)
    with pytest.raises(InvalidRecordError, match="with an id"):
        pipeline.store.assemble_document(
            DocumentRecord(spans=()), parts_namespace=(PARTS_ROOT, "x"), namespace=NS
        )
