"""Ingestion on a local Ray instance writes exactly what single-process ingestion writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from icmem.store import MemoryStore
from icmem.store.errors import InvalidRecordError
from icmem.store.namespaces import validate_namespace
from icmem.store.schema import DocumentRow, EmbeddingRow, NamespaceRow, SlotRow, SpanRow
from sqlalchemy import select
from tiny_models import TinyIngestModels, tiny_embedder

from icmem.cli import main
from icmem.codec import decode_slots
from icmem.distributed import DefaultModels, DistributedIngestError, _read_stage, ingest_with_ray
from icmem.documents import TextDocument
from icmem.ingest import STAGES, ReadOptions, read_file
from icmem.pipeline import MemoryPipeline

NAMESPACE = ("acme", "bot", "t1")
WORDS = (
    "the", "keeper", "lit", "the", "lamp", "and", "wrote",
    "the", "weather", "in", "the", "log", "before", "dawn",
)  # fmt: skip


@pytest.fixture(scope="module")
def local_ray():
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture
def corpus(tmp_path):
    """Files of one to several 32-token spans, an empty file, a JSONL file of two documents,
    and a document given as text."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    paths = []
    for i, words in enumerate((5, 40, 90, 0, 130)):
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)) + "\n")
        paths.append(path)
    records = folder / "records.jsonl"  # two documents in one file
    records.write_text(
        "".join(json.dumps({"text": " ".join(WORDS[i:] * 3), "n": i}) + "\n" for i in (1, 2))
    )
    paths.append(records)
    note = TextDocument.from_text("Remember the boat on Monday. " * 12, "note", metadata={"k": 1})
    return paths, note


@pytest.fixture
def backend(tmp_path):
    """Two empty SQLite stores, (location, index_dir) each: the reference and Ray's."""
    return [(tmp_path / name, None) for name in ("reference", "ray")]


def stored_rows(store: MemoryStore) -> dict[tuple[str, str], list[tuple]]:
    """Every span of every document, keyed by (namespace path, document id): (content hash,
    source, metadata, position, text, start, end, token count, slot blob, embedding)."""
    query = (
        select(
            NamespaceRow.path,
            DocumentRow.key,
            DocumentRow.content_hash,
            DocumentRow.source,
            DocumentRow.metadata_,
            SpanRow.position,
            SpanRow.text,
            SpanRow.char_start,
            SpanRow.char_end,
            SpanRow.token_count,
            SlotRow.blob,
            EmbeddingRow.vector,
        )
        .join(DocumentRow, DocumentRow.namespace_id == NamespaceRow.id)
        .join(SpanRow, SpanRow.document_id == DocumentRow.id)
        .join(SlotRow, SlotRow.span_id == SpanRow.id)
        .join(EmbeddingRow, EmbeddingRow.span_id == SpanRow.id)
        .order_by(NamespaceRow.path, DocumentRow.key, SpanRow.position)
    )
    rows: dict[tuple[str, str], list[tuple]] = {}
    with store.engine.connect() as connection:
        for path, key, *span in connection.execute(query):
            rows.setdefault((path, key), []).append(
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in span)
            )
    return rows


def assert_same_store(store: MemoryStore, expected: dict[tuple[str, str], list[tuple]]) -> None:
    """`store` holds the rows `expected` holds, in the same namespaces, and indexes them all."""
    assert_same_rows(stored_rows(store), expected)
    assert store.list_namespaces() == [NAMESPACE]
    assert sorted(d.id for d in store.list_documents(NAMESPACE)) == sorted(k for _, k in expected)
    assert store.index_ids(NAMESPACE).tolist() == store.span_ids(NAMESPACE).tolist()
    assert len(store.span_ids(NAMESPACE)) == sum(len(spans) for spans in expected.values())


def assert_same_rows(
    actual: dict[tuple[str, str], list[tuple]], expected: dict[tuple[str, str], list[tuple]]
) -> None:
    """Ids, texts, offsets and hashes exactly; slots and embeddings to within one rounding.

    They are bit-identical in most runs, but CPU matrix kernels do not promise the same
    summation order in two processes, and one bf16 rounding step may then differ."""
    assert sorted(actual) == sorted(expected)
    for key, spans in expected.items():
        assert [s[:8] for s in actual[key]] == [s[:8] for s in spans], key
        for got, want in zip(actual[key], spans, strict=True):
            got_slots, got_header = decode_slots(got[8])
            want_slots, want_header = decode_slots(want[8])
            assert (got_header.codec, got_header.shape, got_header.fingerprint) == (
                want_header.codec,
                want_header.shape,
                want_header.fingerprint,
            )
            np.testing.assert_allclose(got_slots, want_slots, rtol=2**-7, atol=1e-6)
            np.testing.assert_allclose(
                np.frombuffer(got[9], np.float32), np.frombuffer(want[9], np.float32), rtol=1e-5
            )


def single_process(
    location, index_dir, paths, note, tokenizer
) -> dict[tuple[str, str], list[tuple]]:
    icae, embedder = TinyIngestModels(tokenizer).load()
    store = MemoryStore.open(location, dim=embedder.dim, index_dir=index_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker runs
    try:
        with MemoryPipeline(icae, store, embedder) as pipeline:
            report = pipeline.ingest_files(paths, namespace=NAMESPACE, progress=False)
            (text,) = note.texts
            pipeline.ingest(
                text, document_id=note.document_id, metadata=note.metadata, namespace=NAMESPACE
            )
            assert report.as_dict() == {"ingested": 6, "skipped": 0, "empty": 1}
            return stored_rows(pipeline.store)
    finally:
        torch.set_num_threads(threads)


def test_ray_ingestion_equals_single_process_and_resumes(local_ray, corpus, backend, tokenizer):
    paths, note = corpus
    (reference, reference_index), (target, index_dir) = backend
    expected = single_process(reference, reference_index, paths, note, tokenizer)

    report = ingest_with_ray(
        [*paths, note],
        target,
        index_dir=index_dir,
        namespace=NAMESPACE,
        models=TinyIngestModels(tokenizer),
        num_workers=2,
        write_batch=2,
        progress=False,
    )
    assert report.as_dict() == {"ingested": 7, "skipped": 0, "empty": 1}
    with MemoryStore.open(target, dim=32, index_dir=index_dir) as store:
        assert_same_store(store, expected)
    assert sum(len(spans) for spans in expected.values()) >= 10  # several spans per document
    # The report counts the spans and tokens stored (span[7]: the token count).
    assert report.spans == sum(len(spans) for spans in expected.values())
    assert report.tokens == sum(span[7] for spans in expected.values() for span in spans)
    assert sorted(report.seconds) == sorted(STAGES) and report.seconds["compress"] > 0

    # A second run (one worker) skips what is stored unchanged and re-encodes what changed.
    paths[1].write_text("a new text for the second document\n")
    again = ingest_with_ray(
        [*paths, note],
        target,
        index_dir=index_dir,
        namespace=NAMESPACE,
        models=TinyIngestModels(tokenizer),
        num_workers=1,
        progress=False,
    )
    assert again.as_dict() == {"ingested": 1, "skipped": 6, "empty": 1}


@pytest.fixture
def tiny_commands(tokenizer, monkeypatch):
    """`icmem ingest` loads the tiny models: in this process (one torch thread, as each Ray
    worker runs) and, with --ray, in every worker."""
    from icmem.cli import memory as memory_commands

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = TinyIngestModels(tokenizer)
    icae, embedder = models.load()

    def open_tiny(args, *, create=False, **options):  # `ingest` creates; MemoryStore.open does
        store = MemoryStore.open(args.store, dim=embedder.dim, index_dir=args.index_dir)
        return MemoryPipeline(icae, store, embedder, **options)

    monkeypatch.setattr(memory_commands, "open_pipeline", open_tiny)
    monkeypatch.setattr(memory_commands, "ray_models", lambda args: models)
    yield
    torch.set_num_threads(threads)


@pytest.mark.postgres
def test_cli_ray_ingest_into_postgres_equals_single_process(
    local_ray, corpus, postgres_server, tmp_path, tiny_commands, capsys
):
    """`icmem ingest --ray` writes to a real PostgreSQL database (a store URL) what `icmem
    ingest` writes in one process, and reports the same skips with the same exit status."""
    paths, _ = corpus
    folder = paths[0].parent
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "outside.txt").write_text("not part of the corpus")
    (folder / "link.txt").symlink_to(tmp_path / "outside.txt")
    inputs = [str(folder), str(tmp_path / "vanished.txt")]
    runs = {}
    try:
        for run, extra in (("one process", []), ("ray", ["--ray", "--workers", "1"])):
            url, index = postgres_server.create_database(), tmp_path / f"{run}-index"
            argv = ["ingest", *inputs, "--store", url, "--index-dir", str(index), *extra]
            status = main([*argv, "--namespace", "/".join(NAMESPACE)])
            summary = json.loads(capsys.readouterr().out)
            with MemoryStore.open(url, dim=32, index_dir=index) as store:
                assert store.dialect == "postgresql"
                runs[run] = status, summary, stored_rows(store)
        (one_status, one_summary, expected), (ray_status, ray_summary, _) = runs.values()
        with MemoryStore.open(url, dim=32, index_dir=index) as store:
            assert_same_store(store, expected)
    finally:
        postgres_server.drop_databases()
    assert one_status == ray_status == 1  # files were skipped
    # Everything but the database's pages on disk, which depend on how the writes were batched.
    one_summary.pop("bytes_on_disk"), ray_summary.pop("bytes_on_disk")
    assert ray_summary == one_summary
    assert (one_summary["ingested"], one_summary["empty"], one_summary["documents"]) == (6, 1, 6)
    outside = tmp_path / "outside.txt"
    assert [(s["path"], s["reason"].split(";")[0]) for s in one_summary["unreadable"]] == [
        (str(folder / "link.txt"), f"symlink to {outside}, outside the given folders"),
        (str(tmp_path / "vanished.txt"), "does not exist"),
        (str(folder / "latin1.txt"), "invalid UTF-8 at byte offset 3"),
    ]


def test_bad_sources_are_refused_before_any_work(tmp_path, tokenizer):
    with pytest.raises(DistributedIngestError, match="cannot ingest int"):
        ingest_with_ray([3], tmp_path / "store", models=TinyIngestModels(tokenizer))
    twice = TextDocument.from_text("x", "a")
    with pytest.raises(DistributedIngestError, match="given twice"):
        ingest_with_ray([twice, twice], tmp_path / "store", models=TinyIngestModels(tokenizer))
    with pytest.raises(InvalidRecordError) as refused:  # the store's rule and message
        ingest_with_ray([twice], tmp_path / "store", namespace="docs")
    with pytest.raises(InvalidRecordError) as reference:
        validate_namespace("docs")
    assert str(refused.value) == str(reference.value)
    assert not (tmp_path / "store").exists()  # refused before the store was opened
    with pytest.raises(DistributedIngestError, match="num_workers"):
        ingest_with_ray(
            [twice], tmp_path / "store", models=TinyIngestModels(tokenizer), num_workers=0
        )


def test_default_models_read_the_embedding_width_without_the_weights(tmp_path, tokenizer):
    embedder = tiny_embedder(tokenizer)
    embedder.model.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").unlink()  # the config alone is enough
    assert DefaultModels(embedder=str(tmp_path / "bert")).embedding_dim() == embedder.dim == 32


def test_a_file_that_vanishes_before_a_worker_reads_it_is_reported(tmp_path):
    """Discovery runs on the driver and reading on the workers: a file deleted in between is
    a skip with the reason one process gives, not a failed run (no Ray needed to check)."""
    gone = tmp_path / "gone.txt"
    row = {"path": str(gone), "id": str(gone), "document": ""}
    (skip,) = read_file(gone)
    (read,) = _read_stage({}, ReadOptions())(row)
    assert (read["status"], read["id"], read["reason"]) == ("unreadable", skip.path, skip.reason)
    assert skip.reason == "vanished before it could be read"
