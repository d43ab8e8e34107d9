"""A separate process that writes to or reads from a store, for the crash and concurrency tests.

Usage: python store_worker.py ROLE TARGET INDEX_DIR NAMESPACE COUNT [HOLD_AFTER]
ROLE is ``writer`` (adds COUNT batches, printing each committed batch number) or ``reader``
(searches COUNT times, printing one JSON line of what it saw). A writer given HOLD_AFTER stops
inside the add of batch HOLD_AFTER: once that transaction has written some of its documents'
rows (the first embedding insert), it prints ``inside HOLD_AFTER`` and sleeps there, uncommitted,
so that a SIGKILL sent on that line lands inside a write.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).parent))

from icmem.store import MemoryStore
from store_testing import DIM, embedding, make_document

SPANS_PER_DOCUMENT = 6
DOCUMENTS_PER_BATCH = 40


def _hold_inside_write(store: MemoryStore, batch: int) -> None:
    def after_execute(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO ICMEM_EMBEDDINGS"):
            print(f"inside {batch}", flush=True)
            time.sleep(120)  # the parent kills us here, mid-transaction

    event.listen(store.engine, "after_cursor_execute", after_execute)


def main(
    role: str, target: str, index_dir: str, namespace: str, count: int, hold_after: int = -1
) -> None:
    ns = tuple(namespace.split("/"))
    extra = {} if "://" not in target else {"index_dir": index_dir}
    store = MemoryStore.open(target, dim=DIM, **extra)
    if role == "writer":
        tag = f"{ns[-1]}-{index_dir.rsplit('/', 1)[-1]}"
        for batch in range(count):
            if batch == hold_after:
                _hold_inside_write(store, batch)
            documents = [
                make_document(
                    f"{tag}-{batch}-{j}",
                    SPANS_PER_DOCUMENT,
                    seed=batch * 100 + j,
                    metadata={"batch": batch, "spans": SPANS_PER_DOCUMENT},
                )
                for j in range(DOCUMENTS_PER_BATCH)
            ]
            store.add(documents, namespace=ns)
            print(batch, flush=True)
            if batch % 4 == 3:
                store.save_index()
    else:
        seen: set[tuple[str, ...]] = set()
        searches = 0
        for i in range(count):
            for hit in store.search(embedding(i), 5, namespace=ns[:1]):
                seen.add(hit.namespace)
            searches += 1
        print(json.dumps({"searches": searches, "namespaces": sorted(seen)}), flush=True)
    store.close()


if __name__ == "__main__":
    main(*sys.argv[1:5], *(int(arg) for arg in sys.argv[5:7]))
