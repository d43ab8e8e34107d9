"""FAISS as a rebuildable view of the stored embeddings: one index per namespace, on disk beside
the rows with a manifest that says which database generation it reflects.

Index kind is chosen by size. Up to ``IndexPolicy.flat_max`` vectors (20,000 by default) a shard is
an exact ``IndexIDMap2(IndexFlatIP)``: on this project's 2-core CPUs a flat scan of 20k 384-d
vectors takes a few milliseconds, while 100k takes ~40 ms. Above it the shard is retrained as an
``IndexIVFFlat`` (inner product, ``nlist ~ 4 sqrt(n)``, ``nprobe ~ nlist / 16``), which answers in
well under a millisecond at 100k and, unlike HNSW, removes ids in place so deletes and upserts
reach the index. A shard is retrained when it grows 4x past its training size and falls back to
flat when it shrinks below half the threshold. Filtered searches on IVF probe ``nprobe / f``
lists for a filter that keeps a share ``f`` of the vectors (about the cost and recall of an
unfiltered search) and every list, exactly, once that reaches half of them. The index that
merges many small namespaces for a prefix search follows the same policy with ``sqrt(n)`` lists
(``MergedViewPolicy``), because it is trained inside a search.

Files: ``<name>.faiss`` (faiss's own serialisation, never pickle) and ``<name>.json`` (format,
kind, dim, token, generation, vector count, SHA-256 of the index file). Both are replaced
atomically, index first; a crash between the two leaves a checksum mismatch, which reads as
"rebuild". The token ties the files to the database they were built from (``MemoryStore``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import IndexFileError, StoreFullError, StoreWriteError

__all__ = ["IndexFiles", "IndexPolicy", "MergedViewPolicy", "NamespaceIndex"]

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class IndexPolicy:
    """When a namespace's index switches from exact flat search to IVF, and how IVF is sized."""

    flat_max: int = 20_000
    retrain_growth: float = 4.0
    kmeans_iterations: int = 10
    training_points_per_list: int = 40

    def __post_init__(self) -> None:
        if self.flat_max < 1_000:
            raise ValueError(
                f"flat_max={self.flat_max} is too small for IVF to train well; use >= 1000"
            )
        if self.retrain_growth <= 1:
            raise ValueError(f"retrain_growth must be > 1, got {self.retrain_growth}")

    def nlist(self, n: int) -> int:
        # faiss warns below 39 training points per list; all n vectors are the training set.
        return int(min(4096, max(64, min(4 * math.sqrt(n), n // 39))))

    def nprobe(self, nlist: int) -> int:
        return max(16, nlist // 16)

    def for_merged_views(self) -> MergedViewPolicy:
        """The policy of the indexes that merge many namespaces' shards for a prefix search."""
        return MergedViewPolicy(
            flat_max=self.flat_max,
            retrain_growth=self.retrain_growth,
            kmeans_iterations=self.kmeans_iterations,
            training_points_per_list=self.training_points_per_list,
        )


@dataclass(frozen=True)
class MergedViewPolicy(IndexPolicy):
    """A merged view is trained in the search that first needs it, so it takes ``sqrt(n)``
    lists rather than ``4 sqrt(n)``: k-means on 100k vectors then takes ~0.4 s instead of
    ~4.5 s (and adding them ~0.5 s instead of ~1.4 s, on this project's 2-core CPUs). Probing
    ``nprobe(nlist)`` lists scans the same share of the vectors as a namespace's own IVF
    index, so a search costs and recalls about what one index of the same size does."""

    def nlist(self, n: int) -> int:
        return int(min(4096, max(64, min(math.sqrt(n), n // 39))))


class NamespaceIndex:
    """The FAISS index of one namespace, tagged with the database generation it reflects."""

    def __init__(self, dim: int, policy: IndexPolicy, *, generation: int = -1) -> None:
        self.dim = dim
        self.policy = policy
        self.generation = generation
        # The token of the saved files this index was loaded from or last saved to; the database
        # holds it while it still descends from the state those files reflect (see MemoryStore).
        self.token: str | None = None
        self.trained_on = 0
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._row_id_cache: np.ndarray | None = None  # flat only: row -> span id

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._index.add_with_ids(_as_matrix(vectors, self.dim), np.asarray(ids, np.int64))
            self._row_id_cache = None
            self._reshape_if_needed()

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))
            self._row_id_cache = None
            self._reshape_if_needed()

    def ids(self) -> np.ndarray:
        """Every id in the index (sorted), read from the index itself rather than a side table."""
        return np.sort(self._contents(with_vectors=False)[0])

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) the index holds, as arrays in the index's own order (copies)."""
        ids, vectors = self._contents(with_vectors=True)
        assert vectors is not None  # asked for with_vectors
        return ids, vectors

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query, best first and equal scores by ascending id;
        ``allowed`` restricts the ids that may be returned.

        FAISS orders equal scores by where the vectors sit in the index, which depends on the
        order they were added (a catch-up adds them in whatever order the database returned
        the rows), so the same store could answer the same query differently. Candidates are
        fetched until every vector that ties with the k-th best is among them, then sorted by
        (score, id): a tie costs a slightly larger search, the usual case one extra candidate.
        """
        query = _as_matrix(query, self.dim)
        limit = self.ntotal if allowed is None else min(self.ntotal, len(allowed))
        k = min(k, limit)
        if k <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        probe = min(k + 1, limit)
        with _one_openmp_thread():
            while True:
                scores, ids = self._search(query, probe, allowed)
                if len(ids) < probe or probe >= limit or scores[-1] < scores[k - 1]:
                    break
                probe = min(2 * probe, limit)
        order = np.lexsort((ids, -scores))[:k]
        return scores[order], ids[order]

    def _search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "ivf":
            if allowed is None:
                scores, ids = self._index.search(query, k)
            else:
                _bitmap, selector = _id_selector(allowed)  # the bitmap lives until we return
                nprobe = self.filtered_nprobe(len(allowed))
                params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
                scores, ids = self._index.search(query, k, params=params)
        else:
            # Search the flat index inside the IDMap and map rows to ids here: IndexIDMap's own
            # label translation is a tiny OpenMP loop that costs a thread wake-up per query.
            row_ids = self._row_ids()
            params = selector = None
            if allowed is not None:
                rows = np.flatnonzero(id_member(row_ids, allowed)).astype(np.int64)
                _bitmap, selector = _id_selector(rows)  # the bitmap lives until we return
                params = faiss.SearchParameters(sel=selector)
            scores, rows = self._index.index.search(query, k, params=params)
            ids = np.where(rows >= 0, row_ids[np.maximum(rows, 0)], -1)
        keep = ids[0] >= 0
        return scores[0][keep], ids[0][keep]

    def filtered_nprobe(self, allowed: int) -> int:
        """IVF lists to probe when only ``allowed`` of the index's vectors may be returned.

        A filter keeping a share ``f`` of the vectors leaves ``f`` of each probed list's
        candidates, so probing ``nprobe / f`` lists finds about as many candidates as an
        unfiltered search, at about its cost (the selector is checked before any distance is
        computed). Once that reaches half the lists, every list is probed and the answer is
        exact: selective filters are cheap to answer exactly.
        """
        index = self._index
        share = max(allowed, 1) / max(self.ntotal, 1)
        wanted = math.ceil(index.nprobe / share)
        return int(index.nlist) if wanted >= index.nlist // 2 else int(wanted)

    def _row_ids(self) -> np.ndarray:
        if self._row_id_cache is None:
            self._row_id_cache = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return self._row_id_cache

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(
        cls, data: bytes, dim: int, policy: IndexPolicy, *, generation: int, trained_on: int
    ) -> NamespaceIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != dim or not isinstance(index, faiss.IndexIDMap2 | faiss.IndexIVFFlat):
            raise IndexFileError(f"index file holds a {type(index).__name__} of dim {index.d}")
        shard = cls(dim, policy, generation=generation)
        shard._index = index
        shard.trained_on = trained_on
        return shard

    def _reshape_if_needed(self) -> None:
        n, policy = self.ntotal, self.policy
        if self.kind == "flat":
            if n > policy.flat_max:
                self._rebuild(ivf=True)
        elif n < policy.flat_max // 2:
            self._rebuild(ivf=False)
        elif n > policy.retrain_growth * self.trained_on:
            self._rebuild(ivf=True)

    def _rebuild(self, *, ivf: bool) -> None:
        ids, vectors = self._contents(with_vectors=True)
        assert vectors is not None  # asked for with_vectors
        if not ivf:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self.trained_on = 0
        else:
            nlist = self.policy.nlist(len(ids))
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.niter = self.policy.kmeans_iterations
            sample = min(len(ids), nlist * self.policy.training_points_per_list)
            rows = np.random.default_rng(len(ids)).choice(len(ids), sample, replace=False)
            index.train(vectors[np.sort(rows)])
            index.nprobe = self.policy.nprobe(nlist)
            self.trained_on = len(ids)
        index.add_with_ids(vectors, ids)
        self._index = index
        self._row_id_cache = None

    def _contents(self, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        index = self._index
        if isinstance(index, faiss.IndexIDMap2):
            ids = faiss.vector_to_array(index.id_map).astype(np.int64)
            vectors = None
            if with_vectors:
                flat = faiss.downcast_index(index.index)
                vectors = faiss.rev_swig_ptr(flat.get_xb(), len(ids) * self.dim)
                vectors = np.array(vectors, dtype=np.float32).reshape(len(ids), self.dim)
            return ids, vectors
        lists = index.invlists
        id_parts, vector_parts = [], []
        for list_no in range(index.nlist):
            size = lists.list_size(list_no)
            if size == 0:
                continue
            id_parts.append(np.array(faiss.rev_swig_ptr(lists.get_ids(list_no), size)))
            if with_vectors:
                codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size)
                vector_parts.append(np.array(codes).view(np.float32).reshape(size, self.dim))
        ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
        if not with_vectors:
            return ids.astype(np.int64), None
        vectors = np.concatenate(vector_parts) if vector_parts else np.empty((0, self.dim))
        return ids.astype(np.int64), vectors.astype(np.float32)


_BITMAP_MAX_ID = 1 << 28  # ids below this are selected through a bitmap of at most 32 MiB


def _id_selector(ids: np.ndarray) -> tuple[np.ndarray | None, faiss.IDSelector]:
    """A FAISS selector for ``ids`` (non-negative): a bitmap, built in microseconds, unless the
    ids are too large for one; then a hash set (milliseconds per 10k ids). Keep the returned
    array alive while the selector is in use."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids) or int(ids.max()) >= _BITMAP_MAX_ID:
        return None, faiss.IDSelectorBatch(ids)
    mask = np.zeros(int(ids.max()) + 1, dtype=bool)
    mask[ids] = True
    bitmap = np.packbits(mask, bitorder="little")
    return bitmap, faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))


def id_member(values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``np.isin(values, allowed)`` for non-negative ids, by table lookup when ids are small."""
    allowed = np.asarray(allowed, dtype=np.int64)
    if not len(allowed) or not len(values):
        return np.zeros(len(values), dtype=bool)
    top = max(int(allowed.max()), int(values.max()))
    if top >= _BITMAP_MAX_ID:
        return np.isin(values, allowed)
    table = np.zeros(top + 1, dtype=bool)
    table[allowed] = True
    return table[values]


@contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """Run one query on the calling thread only. A single query gains little from a second
    thread, and on a busy machine each OpenMP region waits for every thread to be scheduled:
    measured here, a 10k flat search took 60 ms with two threads and ~1 ms with one. The setting
    is per calling thread in OpenMP, so other threads (and torch, with its own runtime) keep theirs.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(-1, dim))


class IndexFiles:
    """Reads and writes namespace indexes under one directory, verifying them against manifests."""

    def __init__(self, directory: Path, dim: int, policy: IndexPolicy) -> None:
        self.directory = directory
        self.dim = dim
        self.policy = policy

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.faiss", self.directory / f"{name}.json"

    def load(self, name: str) -> NamespaceIndex:
        """Load a namespace index, raising IndexFileError when it is missing or does not verify."""
        index_path, manifest_path = self.paths(name)
        try:
            manifest = json.loads(manifest_path.read_text())
            data = index_path.read_bytes()
        except FileNotFoundError as exc:
            raise IndexFileError(f"index file {exc.filename} is missing") from exc
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"index manifest {manifest_path} is unreadable: {exc}") from exc
        expected = {"format": MANIFEST_FORMAT, "dim": self.dim}
        if not isinstance(manifest, dict) or any(manifest.get(k) != v for k, v in expected.items()):
            raise IndexFileError(f"index manifest {manifest_path} does not match this store")
        # The checksum is verified before faiss parses a single byte: a damaged file must not reach
        # C++ deserialisation.
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise IndexFileError(f"index file {index_path} does not match its manifest checksum")
        try:
            shard = NamespaceIndex.from_bytes(
                data,
                self.dim,
                self.policy,
                generation=int(manifest["generation"]),
                trained_on=int(manifest.get("trained_on", 0)),
            )
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise IndexFileError(f"index file {index_path} could not be read: {exc}") from exc
        if shard.ntotal != manifest.get("ntotal"):
            raise IndexFileError(f"index file {index_path} holds a different number of vectors")
        token = manifest.get("token")
        shard.token = token if isinstance(token, str) else None
        return shard

    def save(self, name: str, shard: NamespaceIndex, token: str | None = None) -> None:
        """Write the index and its manifest (with ``token``, which ties the files to the
        database state they reflect); ``shard.token`` is only updated by the caller."""
        index_path, manifest_path = self.paths(name)
        data = shard.to_bytes()
        manifest = {
            "format": MANIFEST_FORMAT,
            "dim": self.dim,
            "kind": shard.kind,
            "token": token,
            "generation": shard.generation,
            "ntotal": shard.ntotal,
            "trained_on": shard.trained_on,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        _atomic_write(index_path, data)
        _atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())

    def remove(self, name: str) -> None:
        for path in self.paths(name):
            path.unlink(missing_ok=True)

    def nbytes(self) -> int:
        if not self.directory.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, then rename over the target so readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        error = StoreFullError if exc.errno == 28 else StoreWriteError
        raise error(
            f"could not write index file {path}: {exc.strerror or exc}; the previous index file is "
            "untouched and the rows are safe (free disk space or fix permissions, then call "
            "save_index() again)"
        ) from exc
