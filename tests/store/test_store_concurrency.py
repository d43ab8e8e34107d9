"""Several processes at once: writers lose no write and readers never see another tenant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from sqlalchemy import text
from store_testing import StoreLocation

WORKER = Path(__file__).with_name("store_worker.py")


def test_concurrent_writers_and_readers(location: StoreLocation, tmp_path) -> None:
    ns = ("shared", "agent", "thread")
    with location.open() as store:  # create the schema; the writers race to create ns
        store.add([], namespace=("setup",))

    def start(role: str, name: str, namespace: tuple[str, ...], count: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                role,
                location.target,
                str(tmp_path / name),
                "/".join(namespace),
                str(count),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    writers = [start("writer", f"w{i}", ns, 3) for i in range(3)]
    readers = [start("reader", f"r{i}", ns, 40) for i in range(2)]
    other = start("writer", "w-other", ("other-tenant", "agent", "thread"), 1)
    outputs = []
    for process in [*writers, *readers, other]:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        outputs.append(out)
    for out in outputs[3:5]:
        seen = json.loads(out)
        assert seen["searches"] == 40
        assert seen["namespaces"] in ([], [list(ns)])

    with location.open() as store:
        assert store.stats(ns).documents == 3 * 3 * 40
        assert store.stats(("other-tenant",)).documents == 40
        np.testing.assert_array_equal(store.index_ids(ns), store.span_ids(ns))
        # The namespace the writers raced to create exists once, listed once under each prefix.
        assert store.list_namespaces(("shared",)) == [ns]
        with store.engine.connect() as connection:
            prefixes = connection.scalar(text("SELECT count(*) FROM icmem_namespace_prefixes"))
            connection.rollback()
        assert prefixes == 3 + 3  # ns and the other tenant's (an empty add creates nothing)
