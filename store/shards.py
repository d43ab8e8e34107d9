"""The index room: the FAISS shard of each namespace, kept in step with the rows.

As chroma keeps its vector segment in step with its metadata segment by sequence id, every
namespace row carries a generation that each write to it increments in the same transaction, and
each shard records the generation it reflects. A shard that is behind is caught up from the rows
by comparing id sets (span ids are never reused), or rebuilt when its files are missing, corrupt
or were saved against another database (each save records a token the database must hold). The
room also keeps the per-generation views a filtered search needs: the span -> document map of a
namespace and recent filter answers. Its SQL is ``store.queries.index_rows``: it reads
embeddings and writes only its own token rows; documents are the ``MemoryStore``'s business.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .database import Database
from .errors import IndexFileError, ReadOnlyStoreError, warn_damaged
from .filters import FilterNode
from .index import IndexFiles, IndexPolicy, NamespaceIndex, id_member
from .queries import filtered_document_ids, generations, index_rows
from .snapshots import NamespaceSnapshot
from .validation import MAX_VECTOR_NORM

__all__ = ["Shards", "embedding_is_damaged", "token_key"]

_FILTER_CACHE_SIZE = 64  # filter answers kept (each one id array per namespace searched)
_MERGE_FROM = 8  # a search over this many namespaces or more merges their flat shards
_MERGED_VIEWS = 4  # merged views kept (each a copy of its shards' vectors)
# A writer spends at most about this share of its time saving indexes: after a save that took
# t seconds, the next waits at least t / _SAVE_SHARE - t (and ``save_interval_s``).
_SAVE_SHARE = 0.1


class Shards:
    """Every namespace's FAISS shard of one store, loaded on first use and kept fresh."""

    def __init__(
        self, database: Database, *, dim: int, index_dir: Path, policy: IndexPolicy
    ) -> None:
        self.database = database
        self.dim = dim
        self.files = IndexFiles(index_dir, dim, policy)
        self.policy = policy
        self.view_policy = policy.for_merged_views()
        self.shards: dict[int, NamespaceIndex] = {}
        self.dirty: set[int] = set()
        self.lock = threading.RLock()
        self.save_interval_s = 5.0
        self.saved_at = time.monotonic()
        self.save_took_s = 0.0
        # Namespaces whose index was trained since it was last saved: the expensive work that a
        # process killed before its next save would leave every fresh reader to redo.
        self.costly: set[int] = set()
        self.repairs = 0  # shards rebuilt or caught up from the rows, for tests/stats
        # Moves whenever a shard in memory is loaded, replaced, dropped or changed: what was
        # derived from the shards (a merged view's parts) is current while it stays put.
        self.epoch = 0
        self._filter_cache: OrderedDict[tuple, dict[int, np.ndarray]] = OrderedDict()
        self._span_document_maps: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self._views: OrderedDict[tuple[str, ...], _MergedView] = OrderedDict()

    # ------------------------------------------------------------------ reads

    def search(
        self,
        session: Connection,
        snapshot: NamespaceSnapshot,
        query: np.ndarray,
        k: int,
        allowed: Mapping[int, np.ndarray] | None,
    ) -> list[tuple[float, int]]:
        """(score, span id) of the ``k`` best spans over the namespaces of ``snapshot``, best
        first.

        A prefix over many namespaces is searched as one index, not one search per namespace
        (a per-call overhead that dominates when namespaces are small): the flat (small) shards
        among them are merged into a ``_MergedView`` kept for the prefix and caught up shard by
        shard as they change, join or leave; IVF (large) shards are searched on their own. The
        view follows the store's ``flat_max`` as a shard does: exact and flat up to it, IVF
        above it (``MergedViewPolicy``: trained once, in the first search of the prefix; about
        a second of k-means and list assignment at 100k vectors here), so that a search over
        a prefix of 100k spans costs about what a search of one namespace of 100k spans does,
        at the same recall. While neither the snapshot nor any shard in memory changed, the
        view is searched as it is, without checking its 1,000 shards again."""
        scored: list[tuple[float, int]] = []
        with self.lock:
            if len(snapshot.rows) >= _MERGE_FROM:
                view = self._merged_view(session, snapshot)
                separate = view.separate
                if view.flat_ids:
                    merged_allowed = None
                    if allowed is not None:
                        merged_allowed = np.concatenate([allowed[n] for n in view.flat_ids])
                    if merged_allowed is None or len(merged_allowed):
                        scores, ids = view.index.search(query, k, merged_allowed)
                        scored.extend(zip(scores.tolist(), ids.tolist(), strict=True))
            else:
                separate = [
                    (row.id, self.fresh(session, row.id, row.generation)) for row in snapshot.rows
                ]
            for ns_id, shard in separate:
                ns_allowed = None if allowed is None else allowed[ns_id]
                if ns_allowed is not None and not len(ns_allowed):
                    continue
                scores, ids = shard.search(query, k, ns_allowed)
                scored.extend(zip(scores.tolist(), ids.tolist(), strict=True))
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        return scored[:k]

    def _merged_view(self, session: Connection, snapshot: NamespaceSnapshot) -> _MergedView:
        """The merged index of a prefix's flat shards, built once and then caught up: checked
        against the shards again only when the snapshot or a shard in memory changed."""
        view = self._views.pop(snapshot.prefix, None)
        if view is None:
            view = _MergedView(NamespaceIndex(self.dim, self.view_policy, generation=0))
        if view.state != (snapshot.key, self.epoch):
            shards = [
                (row.id, self.fresh(session, row.id, row.generation)) for row in snapshot.rows
            ]
            flat = [(ns_id, shard) for ns_id, shard in shards if shard.kind == "flat"]
            view.catch_up(flat)
            view.flat_ids = [ns_id for ns_id, _ in flat]
            view.separate = [(ns_id, shard) for ns_id, shard in shards if shard.kind != "flat"]
            view.state = (snapshot.key, self.epoch)  # after fresh(), which may move the epoch
        self._views[snapshot.prefix] = view  # most recently used last
        while len(self._views) > _MERGED_VIEWS:
            self._views.popitem(last=False)
        return view

    def ids(self, session: Connection, ns_id: int, generation: int) -> np.ndarray:
        with self.lock:
            return self.fresh(session, ns_id, generation).ids()

    def nbytes(self) -> int:
        return self.files.nbytes()

    def fresh(self, session: Session | Connection, ns_id: int, generation: int) -> NamespaceIndex:
        """The namespace's index, loaded, caught up or rebuilt until it reflects ``generation``."""
        shard = self.shards.get(ns_id)
        if shard is None:
            try:
                shard = self.files.load(_shard_name(ns_id))
                if not self._belongs_here(session, ns_id, shard.token):
                    raise IndexFileError("the index files were saved against another database")
            except IndexFileError:
                shard = NamespaceIndex(self.dim, self.policy, generation=-1)
            self.shards[ns_id] = shard
            self.epoch += 1
        if shard.generation != generation:
            self.epoch += 1
            trained_on = shard.trained_on
            self._catch_up(session, ns_id, shard)
            if shard.trained_on != trained_on:
                self.costly.add(ns_id)
            shard.generation = generation
            self.dirty.add(ns_id)
            self.repairs += 1
        return shard

    def allowed_spans(
        self,
        session: Connection,
        snapshot: NamespaceSnapshot,
        filter_: Mapping[str, Any],
        where: FilterNode,
        root: Sequence[str] = (),
    ) -> dict[int, np.ndarray]:
        """The span ids, per namespace of ``snapshot``, whose document matches a metadata
        filter (with keys relative to ``root``, compiled to ``where``).

        The filter runs once per document (not per span) and comes back as one aggregated value
        rather than a row per id; a per-namespace span -> document map turns documents into
        spans. Both the map and each filter's answer are kept for the namespace's generation, so
        a filter asked again before the namespace changes costs nothing: this is what keeps a
        filtered search within a small factor of an unfiltered one.
        """
        key = (snapshot.key, _filter_key(filter_, root))
        with self.lock:
            cached = self._filter_cache.get(key)
            if cached is not None:
                self._filter_cache.move_to_end(key)
                return cached
        namespaces = snapshot.rows
        ns_ids = [row.id for row in namespaces]
        documents = filtered_document_ids(session, self.database.id_aggregate, ns_ids, where)
        maps = self._span_documents(session, namespaces)
        allowed = {}
        for row in namespaces:
            span_ids, span_documents = maps[row.id]
            allowed[row.id] = span_ids[id_member(span_documents, documents)]
        with self.lock:
            self._filter_cache[key] = allowed
            while len(self._filter_cache) > _FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        return allowed

    def _span_documents(
        self, session: Connection, namespaces: Sequence[Any]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Span ids of each namespace and their documents' row ids, aligned; kept per
        generation, and those not kept read in one statement per ``IN`` list of namespaces."""
        maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        missing: dict[int, int] = {}
        with self.lock:
            for row in namespaces:
                cached = self._span_document_maps.get(row.id)
                if cached is not None and cached[0] == row.generation:
                    maps[row.id] = cached[1], cached[2]
                else:
                    missing[row.id] = row.generation
        if not missing:
            return maps
        empty = np.empty(0, np.int64)
        read = dict.fromkeys(missing, (empty, empty))
        read.update(index_rows.span_documents(session, self.database.id_aggregate, list(missing)))
        with self.lock:
            for ns_id, (span_ids, documents) in read.items():
                self._span_document_maps[ns_id] = (missing[ns_id], span_ids, documents)
        maps.update(read)
        return maps

    # ------------------------------------------------------------------ after writes

    def apply_delta(
        self,
        ns_id: int,
        *,
        remove: Sequence[int] = (),
        add_ids: np.ndarray | None = None,
        add_vectors: np.ndarray | None = None,
        old_generation: int | None = None,
    ) -> None:
        """Apply a committed write to a loaded index. An index that was not exactly one write
        behind is left for ``fresh`` to catch up from the rows on its next use."""
        with self.lock:
            self.epoch += 1
            shard = self.shards.get(ns_id)
            if shard is None and old_generation == 0:
                shard = self.shards[ns_id] = NamespaceIndex(self.dim, self.policy, generation=0)
            if shard is None:
                return
            if old_generation is None or shard.generation != old_generation:
                # Another thread may already have caught this index up from the rows (including
                # this write), so applying the delta could add its ids twice: catch up instead.
                shard.generation = -1
                return
            shard.remove(np.asarray(remove, np.int64))
            trained_on = shard.trained_on
            if add_ids is not None and len(add_ids):
                assert add_vectors is not None, "add_ids come with their add_vectors"
                # Under READ COMMITTED a concurrent catch-up can read this write's rows yet label
                # the index with the generation before it, so skip ids the index already holds.
                fresh = ~np.isin(add_ids, shard.ids())
                if fresh.any():
                    shard.add(add_ids[fresh], add_vectors[fresh])
            if shard.trained_on != trained_on:
                self.costly.add(ns_id)
            shard.generation = old_generation + 1
            self.dirty.add(ns_id)

    def forget(self, ns_id: int) -> None:
        """A namespace was deleted: drop its shard and files (its token rows went with it)."""
        with self.lock:
            self.epoch += 1
            self.shards.pop(ns_id, None)
            self.dirty.discard(ns_id)
            self.costly.discard(ns_id)
            self.files.remove(_shard_name(ns_id))

    def keep_current(self, ns_ids: list[int]) -> None:
        """After a write: load (or build) the indexes of the namespaces written to, so that they
        follow this writer's changes, and save them as it goes (``save_if_due``). Otherwise a
        process that only writes, or is killed before ``close``, leaves the saved index behind,
        and every reader that opens the store afterwards catches it up (or, with no index saved
        at all, builds and trains it) on its own."""
        with self.lock:
            stale = [n for n in ns_ids if n not in self.shards or self.shards[n].generation < 0]
        if stale:
            with self.database.read() as session, self.lock:
                for ns_id, generation in generations(session, stale):
                    self.fresh(session, ns_id, generation)
        self.save_if_due()

    def save_if_due(self) -> None:
        """Save changed indexes when one was just trained (work a killed process would hand to
        every reader), or once ``save_interval_s`` has passed and the last save's cost allows
        (saving takes at most ~10% of a writer's time). A fresh reader then finds an index at
        most that far behind, and catches up only the difference."""
        if self.database.read_only or not self.dirty:
            return
        waited = time.monotonic() - self.saved_at
        wait = max(self.save_interval_s, self.save_took_s / _SAVE_SHARE - self.save_took_s)
        if self.costly & self.dirty or waited >= wait:
            self.save()

    def save_trained(self) -> None:
        """After a read: a writable process that had to train an index saves it once, so the
        readers after it do not train it again (a read-only one cannot, and leaves it)."""
        if not self.database.read_only and self.costly & self.dirty:
            self.save()

    # ------------------------------------------------------------------ saving and rebuilding

    def save(self) -> None:
        """Write every index changed since the last save."""
        if self.database.read_only:
            raise ReadOnlyStoreError("the store was opened read_only=True; its index is not saved")
        started = time.monotonic()
        with self.lock:
            saved: list[tuple[int, NamespaceIndex, str]] = []
            for ns_id in sorted(self.dirty):
                shard = self.shards.get(ns_id)
                if shard is not None:
                    token = uuid.uuid4().hex
                    self.files.save(_shard_name(ns_id), shard, token)
                    saved.append((ns_id, shard, token))
                self.dirty.discard(ns_id)
                self.costly.discard(ns_id)
            if saved:
                self._record_tokens(saved)
            self.saved_at = time.monotonic()
            self.save_took_s = self.saved_at - started

    def _record_tokens(self, saved: list[tuple[int, NamespaceIndex, str]]) -> None:
        """Tie freshly saved index files to this database: it holds one row per saved token,
        replacing the token the index was loaded with. A database restored from a backup taken
        before the save lacks the row, and the index is then rebuilt rather than trusted: its
        span ids may have been handed out again, to other documents. A crash before this commit
        leaves files whose token the database lacks, which also reads as "rebuild"."""
        with self.database.write() as session:
            for ns_id, shard, token in saved:
                old = None if shard.token is None else token_key(ns_id, shard.token)
                index_rows.replace_setting(
                    session, old, token_key(ns_id, token), str(shard.generation)
                )
        for _ns_id, shard, token in saved:
            shard.token = token

    def rebuild(self) -> int:
        """Rebuild every namespace's index from the rows (and save it when writable); returns
        the span count."""
        with self.database.read() as session, self.lock:
            for ns_id in list(self.shards):
                self.files.remove(_shard_name(ns_id))
            self.epoch += 1
            self.shards.clear()
            self.dirty.clear()
            self.costly.clear()
            total = 0
            for ns_id, generation in index_rows.all_generations(session):
                self.files.remove(_shard_name(ns_id))
                total += self.fresh(session, ns_id, generation).ntotal
        if not self.database.read_only:
            self.save()
        return total

    # ------------------------------------------------------------------ internals

    def _belongs_here(self, session: Session | Connection, ns_id: int, token: str | None) -> bool:
        if token is None:
            return False
        return index_rows.has_setting(session, token_key(ns_id, token))

    def _catch_up(self, session: Session | Connection, ns_id: int, shard: NamespaceIndex) -> None:
        """Make the index hold exactly the namespace's embedding rows. Span ids are never reused
        and embeddings never change in place, so comparing id sets finds every difference."""
        stored = index_rows.embedded_span_ids(session, ns_id)
        indexed = shard.ids()
        shard.remove(np.setdiff1d(indexed, stored, assume_unique=True))
        missing = np.setdiff1d(stored, indexed, assume_unique=True)
        ids: list[int] = []
        vectors: list[bytes] = []
        damaged: list[int] = []
        for span_id, vector in index_rows.embeddings_of(session, ns_id, missing):
            if embedding_is_damaged(vector, self.dim):
                damaged.append(span_id)
                continue
            ids.append(span_id)
            vectors.append(vector)
        if damaged:
            warn_damaged("embeddings", damaged, "left out of searches", stacklevel=6)
        if ids:
            matrix = np.frombuffer(b"".join(vectors), dtype="<f4").reshape(len(ids), self.dim)
            shard.add(np.asarray(ids, np.int64), matrix)


class _MergedView:
    """One flat index over several namespaces' flat shards. It remembers which shard object and
    generation each namespace's part came from, and replaces only the parts that changed."""

    def __init__(self, index: NamespaceIndex) -> None:
        self.index = index
        self.parts: dict[int, tuple[int, int, np.ndarray]] = {}  # ns -> (shard id, gen, ids)
        self.flat_ids: list[int] = []  # the namespaces merged, in ``parts``
        self.separate: list[tuple[int, NamespaceIndex]] = []  # IVF shards, searched apart
        self.state: tuple[Any, int] | None = None  # (snapshot key, shards epoch) caught up to

    def catch_up(self, shards: list[tuple[int, NamespaceIndex]]) -> None:
        """Hold exactly these shards' contents: parts of namespaces no longer among them (moved
        to IVF, or deleted) leave, parts whose shard changed are replaced, new ones join."""
        current = {ns_id for ns_id, _ in shards}
        gone = [ns_id for ns_id in self.parts if ns_id not in current]
        stale = [
            (ns_id, shard)
            for ns_id, shard in shards
            if self.parts.get(ns_id, (None, None, None))[:2] != (id(shard), shard.generation)
        ]
        if not stale and not gone:
            return
        old = [self.parts.pop(ns_id)[2] for ns_id in gone]
        old += [self.parts.pop(ns_id)[2] for ns_id, _ in stale if ns_id in self.parts]
        if old:
            self.index.remove(np.concatenate(old))
        new_ids, new_vectors = [np.empty(0, np.int64)], [np.empty((0, self.index.dim), np.float32)]
        for ns_id, shard in stale:
            ids, vectors = shard.contents()
            self.parts[ns_id] = (id(shard), shard.generation, ids)
            new_ids.append(ids)
            new_vectors.append(vectors)
        ids = np.concatenate(new_ids)
        if len(ids):
            self.index.add(ids, np.concatenate(new_vectors))


def embedding_is_damaged(vector: bytes | None, dim: int) -> bool:
    """Whether stored embedding bytes are unusable: wrong length, NaN/inf, or overflowing."""
    if vector is None or len(vector) != 4 * dim:
        return True
    values = np.frombuffer(vector, dtype="<f4").astype(np.float64)
    return not np.isfinite(values).all() or float(np.linalg.norm(values)) > MAX_VECTOR_NORM


def token_key(ns_id: int, token: str) -> str:
    """The settings key recording an index token of a namespace (``token=""``: all of them, as
    a prefix)."""
    return f"index:{ns_id}:{token}"  # at most 58 characters: SettingRow.key is String(64)


def _shard_name(ns_id: int) -> str:
    return f"namespace-{ns_id}"


def _filter_key(filter_: Mapping[str, Any], root: Sequence[str]) -> str:
    # Keys are checked strings and values JSON scalars by now; sorting keys keeps the meaning
    # (the keys of a mapping are ANDed) and distinguishes 1, 1.0 and true as the filter does.
    return json.dumps([list(root), filter_], sort_keys=True, separators=(",", ":"))
