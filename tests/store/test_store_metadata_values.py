"""Metadata value rows: equality, ``$in`` and range filters look their documents up by index
(``store.metadata_values``) and must still answer exactly what the JSON says, through every
write that changes metadata."""

from __future__ import annotations

import numpy as np
import pytest
from icmem.store import MemoryStore
from icmem.store.filters import compile_filter
from icmem.store.metadata_values import leaves, number_of, path_hash, value_hash
from icmem.store.schema import DocumentRow, MetadataValueRow
from sqlalchemy import func, select
from store_testing import make_document

NS = ("meta", "agent", "thread")


def test_equal_json_values_hash_alike_and_others_apart() -> None:
    assert value_hash(1) == value_hash(1.0)
    assert value_hash(0) == value_hash(-0.0) == value_hash(0.0)
    assert value_hash(2**60) == value_hash(float(2**60))
    assert len({value_hash(v) for v in (1, True, "1", 2**53 + 1, float(2**53))}) == 5
    assert value_hash(False) != value_hash(0)
    assert path_hash(("a.b",)) != path_hash(("a", "b"))
    assert number_of(True) is None and number_of("3") is None and number_of(3) == 3.0


def test_leaves_are_the_scalars_reached_through_objects() -> None:
    metadata = {"a": 1, "b": {"c": "x", "d": [1, 2], "e": None, "f": {"g": True}}}
    assert dict(leaves(metadata)) == {("a",): 1, ("b", "c"): "x", ("b", "f", "g"): True}


def _reference(documents: dict[str, dict], filter_: dict) -> list[str]:
    """The keys whose metadata matches one key's condition (the filters this test asks)."""
    ((key, condition),) = filter_.items()
    found = []
    for doc_id, metadata in documents.items():
        value = metadata.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not isinstance(condition, dict):
            ok = (value == condition and type(value) is type(condition)) or (
                number and not isinstance(condition, bool | str) and value == condition
            )
        elif "$in" in condition:
            ok = any(_reference({doc_id: metadata}, {key: option}) for option in condition["$in"])
        else:
            ok = number and all(
                {"$gt": value > b, "$gte": value >= b, "$lt": value < b, "$lte": value <= b}[op]
                for op, b in condition.items()
            )
        if ok:
            found.append(doc_id)
    return found


def _random_metadata(rng: np.random.Generator) -> dict:
    choice = int(rng.integers(0, 6))
    value = [
        int(rng.integers(-3, 4)),
        float(rng.integers(-3, 4)) / 2,
        bool(rng.integers(0, 2)),
        str(int(rng.integers(0, 3))),
        None,
        {"nested": 1},
    ][choice]
    return {"v": value} if rng.random() < 0.9 else {}


FILTERS = [
    {"v": 1},
    {"v": 1.0},
    {"v": True},
    {"v": "1"},
    {"v": -1.5},
    {"v": {"$in": [0, "2", False]}},
    {"v": {"$gt": 0}},
    {"v": {"$gte": -1, "$lt": 1.5}},
    {"v": {"$lte": -0.5}},
]


def test_filters_answer_exactly_through_every_write(store: MemoryStore) -> None:
    rng = np.random.default_rng(0)
    documents: dict[str, dict] = {}

    def check() -> None:
        for filter_ in FILTERS:
            found = [d.id for d in store.list_documents(NS, filter=filter_)]
            assert found == _reference(documents, filter_), filter_

    added = {f"d{i}": _random_metadata(rng) for i in range(40)}
    store.add(
        [make_document(k, 1, seed=i, metadata=m) for i, (k, m) in enumerate(added.items())],
        namespace=NS,
    )
    documents.update(added)
    check()
    for step in range(6):
        changed = {f"d{i}": _random_metadata(rng) for i in rng.choice(40, 8, replace=False)}
        changed = {k: v for k, v in changed.items() if k in documents}
        if step % 3 == 0:
            store.update_metadata(changed, namespace=NS)
        elif step % 3 == 1:
            store.upsert(
                [make_document(k, 1, seed=step, metadata=m) for k, m in changed.items()],
                namespace=NS,
            )
        else:
            gone = list(changed)[:3]
            store.delete(namespace=NS, document_ids=gone)
            for key in gone:
                del documents[key]
            changed = {k: v for k, v in changed.items() if k not in gone}
            store.update_metadata(changed, namespace=NS)
        documents.update(changed)
        check()
    with store.engine.connect() as connection:
        rows = connection.scalar(select(func.count()).select_from(MetadataValueRow))
        orphans = connection.scalar(
            select(func.count())
            .select_from(MetadataValueRow)
            .where(MetadataValueRow.document_id.not_in(select(DocumentRow.id)))
        )
    assert orphans == 0
    assert rows == sum(len(list(leaves(m))) for m in documents.values())


@pytest.mark.parametrize(
    ("filter_", "index"),
    [
        ({"v": 3}, "ix_icmem_metadata_values_value"),
        ({"v": {"$in": ["a", "b"]}}, "ix_icmem_metadata_values_value"),
        ({"v": {"$gte": 2, "$lt": 5}}, "ix_icmem_metadata_values_number"),
    ],
)
def test_sqlite_filters_look_documents_up_by_index(tmp_path, filter_, index) -> None:
    with MemoryStore.open(tmp_path / "store", dim=16) as store:
        where = compile_filter(filter_, "sqlite").where()
        statement = select(DocumentRow.id).where(DocumentRow.namespace_id.in_([1, 2]), where)
        with store.engine.connect() as connection:
            sql = str(statement.compile(connection, compile_kwargs={"literal_binds": True}))
            plan = " ".join(
                str(row) for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
            )
    assert index in plan
    assert "SCAN icmem_documents" not in plan
