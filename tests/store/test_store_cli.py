"""The `icmem store` subcommands, driven through their own argparse wiring."""

from __future__ import annotations

import argparse
import json

import numpy as np
from conftest import DIM, make_document
from icmem.store import MemoryStore
from icmem.store.cli import register

NS = ("t", "a", "th")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
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
    assert capsys.readouterr().out.split() == ["t/a/th", "t/b/x"]
    for index_file in (tmp_path / "store" / "index").iterdir():
        index_file.unlink()
    assert _run(["store", "reindex", path, "--dim", str(DIM)]) == 0
    assert json.loads(capsys.readouterr().out) == {"reindexed_spans": 5}
    assert len(list((tmp_path / "store" / "index").iterdir())) == 4  # 2 indexes + 2 manifests
    with MemoryStore.open(path, dim=DIM) as store:
        assert store.index_repairs == 0
        np.testing.assert_array_equal(store.index_ids(NS), store.span_ids(NS))
