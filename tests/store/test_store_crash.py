"""Crash safety: a writer killed with SIGKILL inside an add (after it has written part of a
batch's rows, before the commit) loses nothing it committed, leaves nothing of the interrupted
batch, and the index is caught up on reopen."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from icmem.store.schema import DocumentRow, EmbeddingRow, SlotRow, SpanRow
from sqlalchemy import func, select
from store_testing import StoreLocation

WORKER = Path(__file__).with_name("store_worker.py")
NS = ("crash", "agent", "thread")
HOLD_AFTER = 6  # batches committed (and some index saves) before the write that is killed


def test_killed_writer_leaves_only_whole_documents(location: StoreLocation, tmp_path) -> None:
    index_dir = tmp_path / "writer-index"
    target = location.target
    writer = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "writer",
            target,
            str(index_dir),
            "/".join(NS),
            "1000",
            str(HOLD_AFTER),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed = -1
    try:
        # The worker reports each committed batch, then "inside N" once the add of batch N has
        # written some rows and not committed: the kill lands inside that transaction.
        while True:
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
            if line.startswith("inside"):
                assert line.split() == ["inside", str(HOLD_AFTER)]
                break
            committed = int(line)
    finally:
        writer.send_signal(signal.SIGKILL)
        remaining, _ = writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    assert remaining == "" and committed == HOLD_AFTER - 1

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
        # Every batch the writer reported is there, and nothing of the one it was killed inside.
        assert set(batches) == set(range(HOLD_AFTER))
        assert all(count == 40 for count in batches.values()), "a batch was half-written"
        np.testing.assert_array_equal(store.index_ids(NS), store.span_ids(NS))
        assert len(store.search(np.ones(16), 5, namespace=NS)) == 5
