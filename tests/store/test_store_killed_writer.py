"""A writer killed with SIGKILL (no ``close()``, no final save) still leaves the index it trained:
it saves an index as soon as it has trained one, so a fresh reader catches up only the spans
written since and never retrains. A writable reader that had to train an index saves it once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from icmem.store import IndexPolicy
from store_testing import StoreLocation, embedding, make_document

NS = ("killed", "agent", "thread")
POLICY = IndexPolicy(flat_max=1_000)  # IVF from 1,000 spans, so a small test trains an index
BATCH_SPANS = 400

WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from icmem.store import IndexPolicy, MemoryStore
    from store_testing import DIM, make_document
    extra = {} if "://" not in sys.argv[1] else {"index_dir": sys.argv[2]}
    store = MemoryStore.open(
        sys.argv[1], dim=DIM, index_policy=IndexPolicy(flat_max=1_000), **extra
    )
    store.index_save_interval_s = 3600.0  # no save on a timer: only training triggers one
    for batch in range(int(sys.argv[4])):
        docs = [make_document(f"b{batch}-{j}", 4, seed=batch * 1000 + j) for j in range(100)]
        store.add(docs, namespace=("killed", "agent", "thread"))
        print(batch, flush=True)
    time.sleep(600)  # killed here: never closes, never saves on exit
    """
)


def _write_then_kill(location: StoreLocation, batches: int) -> None:
    here = str(Path(__file__).parent)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            location.target,
            str(location.index_dir),
            here,
            str(batches),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    try:
        for line in writer.stdout:
            if int(line) == batches - 1:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL


def test_a_killed_writer_leaves_the_index_it_trained(location: StoreLocation) -> None:
    # 5 batches of 400 spans: trained at 1,200 (the 3rd), then 800 more that no save covers.
    _write_then_kill(location, batches=5)
    manifests = [json.loads(m.read_text()) for m in _index_dir(location).glob("*.json")]
    assert [(m["kind"], m["ntotal"]) for m in manifests] == [("ivf", 3 * BATCH_SPANS)]
    with location.open(read_only=True, index_policy=POLICY) as reader:
        assert len(reader.span_ids(NS)) == 5 * BATCH_SPANS
        # A span of the last batch, written after the save, is found by its own embedding.
        hit = reader.search(embedding((4 * 1000 + 7) * 100 + 2), 1, namespace=NS)[0]
        assert (hit.document_id, hit.position) == ("b4-7", 2)
        assert reader.index_ids(NS).tolist() == reader.span_ids(NS).tolist()
        assert reader.index_repairs == 1  # one catch-up of the unsaved spans, nothing more


def test_a_writable_reader_saves_the_index_it_trained(location: StoreLocation) -> None:
    with location.open(index_policy=POLICY) as store:
        store.add([make_document(f"d{i}", 4, seed=i) for i in range(300)], namespace=NS)
    index_dir = _index_dir(location)
    for path in index_dir.iterdir():
        path.unlink()  # as after restoring the database without its index directory
    reader = location.open(index_policy=POLICY)
    try:
        reader.search(embedding(1), 3, namespace=NS)  # trains the index from the rows
        saved = list(index_dir.glob("*.json"))  # before close(): saved by the read itself
        assert len(saved) == 1 and '"ivf"' in saved[0].read_text()
        with location.open(read_only=True, index_policy=POLICY) as later:
            later.search(embedding(1), 3, namespace=NS)
            assert later.index_repairs == 0  # found current, not trained again
    finally:
        reader.close()


def _index_dir(location: StoreLocation) -> Path:
    """Where the store of ``location`` keeps its index files (the writer's, for a URL)."""
    if location.backend == "postgres":
        return location.index_dir
    return Path(location.target) / "index"
