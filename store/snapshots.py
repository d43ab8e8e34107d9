"""The namespace rows under a prefix, as a search reads them, kept until the database says they
changed.

A search over a prefix of 1,000 namespaces reads 1,000 namespace rows, checks 1,000 shards and
decodes 1,000 paths before it searches anything: several times what the search itself costs
through one merged index. The rows stay the truth, so every search still asks the database,
but for one aggregate row (``queries.namespaces_fingerprint``) that changes whenever the rows
would; while it holds, the rows read before, and what the index room derived from them (keyed
by ``NamespaceSnapshot.key``), are reused. Like the shards' generations, this relies on ids
never being handed out twice.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .namespaces import decode_path
from .queries import namespaces_fingerprint, select_namespaces
from .queries.readers import Reader
from .records import Namespace

__all__ = ["NamespaceSnapshot", "NamespaceSnapshots"]

_SNAPSHOTS_KEPT = 64  # prefixes remembered (each its namespace rows and decoded paths)


@dataclass(frozen=True)
class NamespaceSnapshot:
    """The namespaces under ``prefix`` at one state of the database."""

    prefix: Namespace
    fingerprint: tuple[int, int, int]
    rows: list[Any]  # (id, path, generation), by id
    ids: frozenset[int]
    names: dict[int, Namespace]

    @property
    def key(self) -> tuple[Namespace, tuple[int, int, int]]:
        """Equal for two snapshots exactly when they hold the same rows."""
        return self.prefix, self.fingerprint


class NamespaceSnapshots:
    """The latest snapshot of each recently searched prefix, shared by a store's threads."""

    def __init__(self) -> None:
        self._kept: OrderedDict[Namespace, NamespaceSnapshot] = OrderedDict()
        self._lock = threading.Lock()

    def under(self, session: Reader, prefix: Namespace) -> NamespaceSnapshot:
        """The namespaces under ``prefix`` as ``session``'s transaction sees them."""
        fingerprint = namespaces_fingerprint(session, prefix)
        with self._lock:
            kept = self._kept.get(prefix)
            if kept is not None and kept.fingerprint == fingerprint:
                self._kept.move_to_end(prefix)
                return kept
        rows = select_namespaces(session, prefix)
        snapshot = NamespaceSnapshot(
            prefix=prefix,
            fingerprint=fingerprint,
            rows=rows,
            ids=frozenset(row.id for row in rows),
            names={row.id: decode_path(row.path) for row in rows},
        )
        with self._lock:
            self._kept[prefix] = snapshot
            self._kept.move_to_end(prefix)
            while len(self._kept) > _SNAPSHOTS_KEPT:
                self._kept.popitem(last=False)
        return snapshot
