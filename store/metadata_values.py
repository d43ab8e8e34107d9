"""Metadata values as index rows, so that a filter finds its documents without reading them all.

A metadata filter is exact SQL over each document's JSON (``store.filters``), and evaluating it
means parsing the JSON of every document under the namespaces searched: the cost follows the
store, not the answer. So each document also keeps one ``icmem_metadata_values`` row per scalar
in its metadata (reached through objects, at any depth; arrays and nulls are not indexed):
the hash of the scalar's path, the hash of its value and, for a number, the number itself. An
equality or ``$in`` condition then looks its documents up by (path, value hash) and a range
condition by (path, number), each an index range scan, and the exact JSON condition runs only
on the documents found.

The rows are a *superset* test, never the answer: hashes may collide (that only lets a
document through to the exact test), a number is kept as a double (rounding is monotone, so a
bound widened to the double of its value keeps every match), and equal values hash equally
whatever their JSON spelling (``1`` and ``1.0``; ``0`` and ``-0.0``). The rows change in the
transaction that writes the metadata and go with the document (ON DELETE CASCADE).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

__all__ = ["Scalar", "leaves", "number_of", "path_hash", "value_hash", "value_rows"]

Scalar = str | int | float | bool


def leaves(metadata: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple]:
    """``(path, scalar)`` for every string, number and boolean reached through objects."""
    for key, value in metadata.items():
        here = (*path, key)
        if isinstance(value, Mapping):
            yield from leaves(value, here)
        elif isinstance(value, str | int | float) and not _not_finite(value):
            yield here, value


def path_hash(path: Sequence[str]) -> int:
    """A signed 64-bit hash of a key path (exact JSON of the labels, so ``("a.b",)`` and
    ``("a", "b")`` differ)."""
    return _hash("p" + json.dumps(list(path), ensure_ascii=False))


def value_hash(value: Scalar) -> int:
    """A signed 64-bit hash of a scalar under JSON equality: the type (string, boolean,
    number) and, for a number, its exact value, so that 1 and 1.0 hash alike."""
    if isinstance(value, bool):
        return _hash("b1" if value else "b0")
    if isinstance(value, str):
        return _hash("s" + value)
    if value == 0:
        return _hash("n0")
    return _hash("n" + format(Decimal(value).normalize(), "f"))


def number_of(value: Scalar) -> float | None:
    """The value as a double for range lookups; None for strings and booleans."""
    if isinstance(value, bool | str):
        return None
    return float(value)


def value_rows(document_id: int, metadata: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The ``icmem_metadata_values`` rows of one document's metadata."""
    if not isinstance(metadata, Mapping):
        return []
    return [
        {
            "document_id": document_id,
            "path": path_hash(path),
            "value": value_hash(value),
            "number": number_of(value),
        }
        for path, value in leaves(metadata)
    ]


def _hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)
