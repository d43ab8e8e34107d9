"""A separate process that writes to or reads from a store, for the crash and concurrency tests.

Usage: python store_worker.py ROLE TARGET INDEX_DIR NAMESPACE COUNT
ROLE is ``writer`` (adds COUNT batches, printing each committed batch number) or ``reader``
(searches COUNT times, printing one JSON line of what it saw).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import DIM, embedding, make_document
from icmem.store import MemoryStore

SPANS_PER_DOCUMENT = 6
DOCUMENTS_PER_BATCH = 40


def main(role: str, target: str, index_dir: str, namespace: str, count: int) -> None:
    ns = tuple(namespace.split("/"))
    extra = {} if "://" not in target else {"index_dir": index_dir}
    store = MemoryStore.open(target, dim=DIM, **extra)
    if role == "writer":
        tag = f"{ns[-1]}-{index_dir.rsplit('/', 1)[-1]}"
        for batch in range(count):
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
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
