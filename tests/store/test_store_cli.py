"""The `icmem store` subcommands, driven through their own argparse wiring."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
from icmem.store import MemoryStore
from store_testing import DIM, make_document

from icmem.cli import build_parser

NS = ("t", "a", "th")


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_stats_namespaces_and_reindex(tmp_path, capsys) -> None:
    path = str(tmp_path / "store")
    with MemoryStore.open(path, dim=DIM) as store:
        store.add([make_document("a", 3)], namespace=NS)
        store.add([make_document("b", 2)], namespace=("t", "b", "x"))
    assert _run(["store", "stats", path, "--dim", str(DIM), "--namespace", "t/a"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["documents"], stats["spans"]) == (1, 3)
    assert _run(["store", "namespaces", path, "--dim", str(DIM)]) == 0
    assert capsys.readouterr().out.splitlines() == ['["t", "a", "th"]', '["t", "b", "x"]']
    for index_file in (tmp_path / "store" / "index").iterdir():
        index_file.unlink()
    assert _run(["store", "reindex", path, "--dim", str(DIM)]) == 0
    assert json.loads(capsys.readouterr().out) == {"reindexed_spans": 5}
    assert len(list((tmp_path / "store" / "index").iterdir())) == 4  # 2 indexes + 2 manifests
    with MemoryStore.open(path, dim=DIM) as store:
        assert store.index_repairs == 0
        np.testing.assert_array_equal(store.index_ids(NS), store.span_ids(NS))


def test_stats_check_lists_damaged_rows(tmp_path, capsys) -> None:
    path = str(tmp_path / "store")
    with MemoryStore.open(path, dim=DIM) as store:
        added = store.add([make_document("a", 3)], namespace=NS)
    assert _run(["store", "stats", path, "--dim", str(DIM), "--check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["check"]["ok"] and report["documents"] == 1
    damaged = added[0].span_ids[1]
    with sqlite3.connect(Path(path) / "store.sqlite") as connection:
        (blob,) = connection.execute(
            "SELECT blob FROM icmem_slots WHERE span_id = ?", (damaged,)
        ).fetchone()
        flipped = bytearray(blob)
        flipped[-3] ^= 0x10  # one payload bit: the header still parses
        connection.execute(
            "UPDATE icmem_slots SET blob = ? WHERE span_id = ?", (bytes(flipped), damaged)
        )
    assert _run(["store", "stats", path, "--dim", str(DIM), "--check"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["check"]["damaged_slots"] == [damaged]
    assert not report["check"]["ok"]
