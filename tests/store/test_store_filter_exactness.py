"""Issue 22, items 2, 4 and 5: a filtered search answers from one snapshot (no hit that
contradicts its filter while another process changes metadata), compares 64-bit integers exactly
on both backends, and takes any number of sub-filters on both."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from icmem.store import MemoryStore
from store_testing import DIM, StoreLocation, embedding, make_document

NS = ("t", "a", "th")
BIG = 2**53


def _matches(metadata: dict, key: str, op: str, value: float) -> bool:
    """The reference: Python compares int and float exactly, as the store promises."""
    stored = metadata.get(key)
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        return False
    return {"$gt": stored > value, "$gte": stored >= value, "$lt": stored < value}.get(
        op, stored <= value
    )


NUMBERS = {
    "big": BIG,
    "big+1": BIG + 1,
    "big-1": BIG - 1,
    "max": 2**63 - 1,
    "max-1": 2**63 - 2,
    "min": -(2**63),
    "min+1": -(2**63) + 1,
    "tenth": 0.1,
    "third": 1 / 3,
    "float-big": float(BIG),
    "neg-big+1": -(BIG + 1),
    "huge-float": 1e300,
    "past-int64-float": 1e20,
}


@pytest.fixture
def numbers(store: MemoryStore) -> MemoryStore:
    documents = [
        make_document(key, 1, seed=i, metadata={"n": value})
        for i, (key, value) in enumerate(NUMBERS.items())
    ]
    store.add(documents, namespace=NS)
    return store


@pytest.mark.parametrize("op", ["$gt", "$gte", "$lt", "$lte"])
@pytest.mark.parametrize(
    "value",
    [
        *(BIG, BIG + 1, float(BIG), 2**63 - 1, 2**63 - 2, -(2**63), -(BIG + 1)),
        *(0.1, 1 / 3, 2.0**62, 1e300, 1e20),
    ],
    ids=repr,
)
def test_range_filters_compare_64_bit_integers_exactly(numbers: MemoryStore, op, value) -> None:
    hits = numbers.search(embedding(0), 100, namespace=NS, filter={"n": {op: value}})
    expected = {key for key, stored in NUMBERS.items() if _matches({"n": stored}, "n", op, value)}
    assert {h.document_id for h in hits} == expected


def test_equality_on_big_integers_is_exact(numbers: MemoryStore) -> None:
    for key in ("big", "big+1", "max", "min+1"):
        hits = numbers.search(embedding(0), 100, namespace=NS, filter={"n": NUMBERS[key]})
        found = {h.document_id for h in hits}
        assert key in found and found <= {key, "float-big"}


@pytest.fixture
def many(store: MemoryStore) -> MemoryStore:
    documents = [
        make_document(f"d{i}", 1, seed=i, metadata={"n": i * 500, "tag": "x" if i % 2 else "y"})
        for i in range(6)
    ]
    store.add(documents, namespace=NS)
    return store


def _found(store: MemoryStore, filter_: dict) -> set[str]:
    return {h.document_id for h in store.search(embedding(0), 100, namespace=NS, filter=filter_)}


@pytest.mark.parametrize("width", [991, 1200, 6_000])
def test_an_or_of_any_width(many: MemoryStore, width: int) -> None:
    branches = [{"n": i} for i in range(width)]
    expected = {f"d{i}" for i in range(6) if i * 500 < width}
    assert _found(many, {"$or": branches}) == expected
    # Branches that are themselves filters of several keys, and one that matches nothing.
    branches = [{"n": i, "tag": "x"} for i in range(width)]
    expected = {f"d{i}" for i in range(6) if i * 500 < width and i % 2}
    assert _found(many, {"$or": branches}) == expected


@pytest.mark.parametrize("width", [1200, 6_000])
def test_an_and_of_any_width(many: MemoryStore, width: int) -> None:
    excluded = range(1, width, 2)  # odd values: no document's n, which are multiples of 500
    branches = [{"n": {"$ne": i}} for i in excluded]
    assert _found(many, {"$and": branches}) == {f"d{i}" for i in range(6)}
    branches.append({"tag": "x"})
    assert _found(many, {"$and": branches}) == {"d1", "d3", "d5"}
    branches.append({"n": {"$ne": 500}})
    assert _found(many, {"$and": branches}) == {"d3", "d5"}


@pytest.mark.parametrize("width", [1200, 6_000])
def test_a_filter_of_any_number_of_keys(many: MemoryStore, width: int) -> None:
    filter_: dict = {f"absent{i}": {"$exists": False} for i in range(width)}
    assert _found(many, filter_) == {f"d{i}" for i in range(6)}
    filter_["tag"] = "y"
    assert _found(many, filter_) == {"d0", "d2", "d4"}
    nested = {"$or": [{"$and": [filter_, {"n": {"$gte": 1000}}]}, {"n": 500}]}
    assert _found(many, nested) == {"d1", "d2", "d4"}


FLIPPER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from icmem.store import MemoryStore
    target, index_dir, dim, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    extra = {"index_dir": index_dir} if "://" in target else {}
    store = MemoryStore.open(target, dim=dim, **extra)
    print("ready", flush=True)
    flips = 0
    while not stop.exists():  # until the reader has searched enough, however busy the machine
        visibility = "private" if flips % 2 == 0 else "public"
        store.update_metadata({"flip": {"vis": visibility}}, namespace=("t", "a", "th"))
        flips += 1
    store.close()
    print(flips, flush=True)
    """
)
SEARCHES = 200


def test_filtered_hits_never_contradict_their_filter_during_changes(
    location: StoreLocation, tmp_path: Path
) -> None:
    """Another process flips a document between public and private; every hit of a search
    filtered on public must be public (the filter and the hit rows come from one snapshot)."""
    with location.open() as store:
        store.add(
            [
                make_document("flip", 2, seed=1, metadata={"vis": "public"}),
                make_document("steady", 2, seed=2, metadata={"vis": "public"}),
                make_document("hidden", 2, seed=3, metadata={"vis": "private"}),
            ],
            namespace=NS,
        )
    stop = tmp_path / "stop"
    flipper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FLIPPER,
            location.target,
            str(tmp_path / "flipper"),
            str(DIM),
            str(stop),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert flipper.stdout is not None and flipper.stdout.readline().strip() == "ready"
    flipped_seen = 0
    leaks: list[str] = []
    try:
        with location.open(read_only=True) as reader:
            query = np.ones(DIM, np.float32) / np.sqrt(DIM)
            for _ in range(SEARCHES):
                hits = reader.search(query, 10, namespace=NS, filter={"vis": "public"})
                flipped_seen += any(h.document_id == "flip" for h in hits)
                leaks += [h.document_id for h in hits if h.metadata.get("vis") != "public"]
                time.sleep(0.001)
    finally:
        stop.touch()
    out, err = flipper.communicate(timeout=120)
    assert flipper.returncode == 0, err
    assert int(out.strip()) > 10  # the metadata really changed under the searches
    assert flipped_seen > 0  # the flipped document was found while public
    assert leaks == []
