"""Crash safety: a writer killed with SIGKILL in the middle of large adds loses nothing it
committed, leaves nothing half-written, and the index is caught up on reopen."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import StoreLocation
from icmem.store.schema import DocumentRow, EmbeddingRow, SlotRow, SpanRow
from sqlalchemy import func, select

WORKER = Path(__file__).with_name("store_worker.py")
NS = ("crash", "agent", "thread")


def test_killed_writer_leaves_only_whole_documents(location: StoreLocation, tmp_path) -> None:
    index_dir = tmp_path / "writer-index"
    target = location.target
    writer = subprocess.Popen(
        [sys.executable, str(WORKER), "writer", target, str(index_dir), "/".join(NS), "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed = -1
    try:
        while committed < 5:  # let some batches (and index saves) land first
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
            committed = int(line)
        time.sleep(0.13)  # then kill it at an arbitrary point, almost surely inside an add
    finally:
        writer.send_signal(signal.SIGKILL)
        remaining, _ = writer.communicate()
    committed = max([committed, *(int(x) for x in remaining.split())])
    assert writer.returncode == -signal.SIGKILL

    if location.backend == "postgres":
        location = StoreLocation("postgres", target, index_dir)
    with location.open() as store:
        batches = {}
        with store.engine.connect() as connection:
            for metadata, spans in connection.execute(
                select(DocumentRow.metadata_, func.count(SpanRow.id))
                .outerjoin(SpanRow, SpanRow.document_id == DocumentRow.id)
                .group_by(DocumentRow.id)
            ):
                assert spans == metadata["spans"], "a document was stored without all its spans"
                batches[metadata["batch"]] = batches.get(metadata["batch"], 0) + 1
            spans = connection.scalar(select(func.count(SpanRow.id)))
            assert connection.scalar(select(func.count(SlotRow.span_id))) == spans
            assert connection.scalar(select(func.count(EmbeddingRow.span_id))) == spans
            connection.rollback()
        # Every batch the writer reported is there; at most the one after it also committed.
        assert set(range(committed + 1)) <= set(batches) <= set(range(committed + 2))
        assert all(count == 40 for count in batches.values()), "a batch was half-written"
        np.testing.assert_array_equal(store.index_ids(NS), store.span_ids(NS))
        assert len(store.search(np.ones(16), 5, namespace=NS)) == 5
