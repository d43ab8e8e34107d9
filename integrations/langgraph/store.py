"""`ICAEMemory`: an icmem store as a LangGraph `BaseStore`.

An item is one stored document, addressed by (namespace, key). Its value is kept exactly, as JSON
in the document's metadata; the texts at its indexed fields are chunked, compressed into memory
slots and embedded like any other document, so the same item is found by a store `search` and
recalled as memory by `ChatICAE` over that namespace. A value's non-indexed fields can change
without re-encoding anything (the pipeline keeps spans whose texts are unchanged).

Batches follow LangGraph's stores: every read of a batch sees the state before the batch, then
the batch's writes apply, the last write to a key winning. Search without a query lists items by
namespace (sorted) and, inside one, in the order they were first written; with a query, items
rank by their best span's score, and items without indexed text follow, unscored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from icmem.store import InvalidFilterError
from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    get_text_at_path,
    tokenize_path,
    validate_op_namespace,
)

from icmem.pipeline import MemoryPipeline, TextDocument

from .filters import matches_filter
from .sql_filters import VALUE_ROOT, store_prefilter

if TYPE_CHECKING:
    import numpy as np
    from icmem.integrations.langchain import (
        ICAEChatMessageHistory,
        ICAERetriever,
        ICAEVectorStore,
    )
    from icmem.store import DocumentInfo, SearchHit

# The metadata key that marks a document as a store item, and holds its value and clock.
ITEM_KEY = "langgraph_item"
_SEARCH_POOL = 16  # spans fetched per wanted item on the first search pass (several per item)
REFRESH_SHARE = 0.01  # a read refreshes an expiry only when it moves by this share of the TTL


@dataclass(frozen=True)
class _Stored:
    """An item as read back from its document."""

    namespace: tuple[str, ...]
    key: str
    value: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    ttl: float | None  # minutes
    span_count: int

    def item(self) -> Item:
        return Item(
            namespace=self.namespace,
            key=self.key,
            value=self.value,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )

    def search_item(self, score: float | None = None) -> SearchItem:
        return SearchItem(
            namespace=self.namespace,
            key=self.key,
            value=self.value,
            created_at=self.created_at,
            updated_at=self.updated_at,
            score=score,
        )

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class ICAEMemory(BaseStore):
    """Long-term memory for LangGraph agents, kept as compressed memory slots.

    Pass it as `create_agent(model, store=memory)` or `graph.compile(store=memory)`. `index`
    names the value fields to compress and embed (LangGraph's path syntax, `"$"` for the whole
    value as JSON); a put's own `index=[...]` overrides it, `index=False` stores the value
    unindexed. `ttl` is LangGraph's `TTLConfig` (minutes). Embeddings come from the pipeline,
    so `index` takes no `embed` or `dims`.
    """

    supports_ttl = True

    def __init__(
        self,
        pipeline: MemoryPipeline,
        namespace: Sequence[str] | None = None,
        /,
        *,
        index: IndexConfig | None = None,
        ttl: TTLConfig | None = None,
    ) -> None:
        if namespace is not None:
            raise TypeError(
                "ICAEMemory is now a LangGraph store and takes no namespace; for the chat message "
                "history it used to be, use memory.chat_history(namespace) or "
                "icmem.integrations.langchain.ICAEChatMessageHistory(pipeline, namespace)"
            )
        if not isinstance(pipeline, MemoryPipeline):
            raise TypeError(
                f"ICAEMemory takes a MemoryPipeline, got {type(pipeline).__name__}; open one "
                "with ICAEMemory.open(path) or MemoryPipeline.open(path)"
            )
        self.pipeline = pipeline
        self.index_fields = _index_fields(index)
        if ttl and ttl.get("default_ttl") is not None:
            _check_minutes(ttl["default_ttl"], "TTLConfig default_ttl")
        self.ttl_config = ttl
        self._sweeper: tuple[threading.Event, concurrent.futures.Future[None]] | None = None
        self._legacy_swept = False  # see sweep_ttl

    @classmethod
    def open(
        cls,
        store: str | os.PathLike[str],
        *,
        index: IndexConfig | None = None,
        ttl: TTLConfig | None = None,
        **pipeline_options: Any,
    ) -> ICAEMemory:
        """Open a store directory or URL with `MemoryPipeline.open`'s models and options
        (``create=True`` makes a new store; without it a mistyped path is an error)."""
        return cls(MemoryPipeline.open(store, **pipeline_options), index=index, ttl=ttl)

    def close(self) -> None:
        """Stop the TTL sweeper, if running, and close the pipeline's store."""
        self.stop_ttl_sweeper()
        self.pipeline.close()

    def __enter__(self) -> ICAEMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ other views

    def as_retriever(
        self,
        namespace: Sequence[str],
        *,
        k: int = 4,
        filter: Mapping[str, Any] | None = None,
    ) -> ICAERetriever:
        """A LangChain retriever of the spans recalled under a namespace prefix."""
        from icmem.integrations.langchain import ICAERetriever

        return ICAERetriever(
            pipeline=self.pipeline,
            namespace=tuple(namespace),
            k=k,
            filter=dict(filter) if filter else None,
        )

    def as_vectorstore(self, namespace: Sequence[str]) -> ICAEVectorStore:
        """A LangChain vector store whose documents are this store's items in `namespace`."""
        from icmem.integrations.langchain import ICAEVectorStore

        return ICAEVectorStore(self, namespace=namespace)

    def chat_history(self, namespace: Sequence[str]) -> ICAEChatMessageHistory:
        """A LangChain chat message history kept in exactly `namespace`."""
        from icmem.integrations.langchain import ICAEChatMessageHistory

        return ICAEChatMessageHistory(self.pipeline, namespace)

    # ------------------------------------------------------------------ BaseStore

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        ops = list(ops)
        for op in ops:
            validate_op_namespace(op)
            _check_ttl(op)
        now = _now()
        queries = self._embed_queries(ops)
        read = [self._read(op, now, queries) for op in ops]
        self._refresh_ttl(ops, [returned for _, returned in read], now)
        self._apply_puts(ops, now)
        return [result for result, _ in read]

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Reads run concurrently in worker threads (each with its own connection, SQLite's WAL
        lets them read side by side), then the writes, in one thread, in order."""
        ops = list(ops)
        for op in ops:
            validate_op_namespace(op)
            _check_ttl(op)
        now = _now()
        queries = await asyncio.to_thread(self._embed_queries, ops)
        read = await asyncio.gather(
            *(asyncio.to_thread(self._read, op, now, queries) for op in ops)
        )
        await asyncio.to_thread(self._refresh_ttl, ops, [returned for _, returned in read], now)
        await asyncio.to_thread(self._apply_puts, ops, now)
        return [result for result, _ in read]

    def search_by_vector(
        self,
        namespace_prefix: tuple[str, ...],
        vector: Sequence[float] | np.ndarray,
        *,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
    ) -> list[SearchItem]:
        """`search` with an already embedded query (of the pipeline's embedder's length)."""
        import numpy as np

        op = SearchOp(tuple(namespace_prefix), filter, limit, offset)
        found = self._search(op, np.asarray(vector, dtype=np.float32), _now())
        return [stored.search_item(score) for stored, score in found]

    # ------------------------------------------------------------------ TTL

    def sweep_ttl(self) -> int:
        """Delete every expired item now; returns how many were deleted.

        The due items are found in SQL by their expiry time, an index range lookup. Items
        written before expiry times were kept as numbers as well carry only the ISO time: the
        first sweep of each store object reads every item to find them, deletes the expired
        ones and gives the rest their number, so later sweeps look up due items alone (a store
        of this schema cannot be written by an icmem that would write such items again)."""
        now = _now()
        due: dict[str, Any] = {"expires_ts": {"$lte": now.timestamp() + 1.0}}
        if not self._legacy_swept:
            legacy = {"expires_ts": {"$exists": False}, "expires_at": {"$exists": True}}
            due = {"$or": [due, legacy]}
        expired: dict[tuple[str, ...], list[str]] = {}
        upgraded: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}
        for stored, record in _items_with_records(self._documents_under((), due, root=(ITEM_KEY,))):
            if stored.expired(now):
                expired.setdefault(stored.namespace, []).append(stored.key)
            elif "expires_ts" not in record:
                upgraded.setdefault(stored.namespace, {})[stored.key] = _metadata(
                    stored, now, refreshed=False
                )
        for namespace, updates in upgraded.items():
            self.pipeline.update_metadata(updates, namespace=namespace)
        self._legacy_swept = True
        return sum(
            self.pipeline.delete_documents(keys, namespace=namespace)
            for namespace, keys in expired.items()
        )

    def start_ttl_sweeper(
        self, sweep_interval_minutes: float | None = None
    ) -> concurrent.futures.Future[None]:
        """Sweep expired items every `sweep_interval_minutes` (default: the TTL config's, else
        5) in a background thread until `stop_ttl_sweeper` or `close`."""
        if self._sweeper is not None:
            return self._sweeper[1]
        minutes = sweep_interval_minutes or (self.ttl_config or {}).get("sweep_interval_minutes")
        interval = 60.0 * float(minutes or 5)
        stop = threading.Event()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def sweep() -> None:
            try:
                while not stop.wait(interval):
                    self.sweep_ttl()
                done.set_result(None)
            except BaseException as exc:  # reported through the future, not lost in a thread
                done.set_exception(exc)

        threading.Thread(target=sweep, name="icmem-ttl-sweeper", daemon=True).start()
        self._sweeper = (stop, done)
        return done

    def stop_ttl_sweeper(self, timeout: float | None = None) -> bool:
        """Stop the sweeper; True when it has stopped within `timeout` seconds (or none ran)."""
        if self._sweeper is None:
            return True
        stop, done = self._sweeper
        stop.set()
        try:
            done.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        finally:
            if done.done():
                self._sweeper = None
        return True

    # ------------------------------------------------------------------ reads

    def _read(
        self, op: Op, now: datetime, queries: Mapping[str, np.ndarray]
    ) -> tuple[Result, list[_Stored]]:
        """The op's result, and the items it returned as they were read (what
        ``_refresh_ttl`` needs to know whether their expiry is due to move)."""
        if isinstance(op, GetOp):
            found = self._get_stored(op.namespace, [op.key])
            stored = found[0] if found else None
            if stored is None or self._hidden(stored, now):
                return None, []
            return stored.item(), [stored]
        if isinstance(op, SearchOp):
            scored = self._search(op, queries.get(op.query) if op.query else None, now)
            return [item.search_item(score) for item, score in scored], [i for i, _ in scored]
        if isinstance(op, ListNamespacesOp):
            return self._list_namespaces(op, now), []
        if isinstance(op, PutOp):
            return None, []
        raise ValueError(f"unknown store operation {type(op).__name__}")

    def _embed_queries(self, ops: Sequence[Op]) -> dict[str, np.ndarray]:
        texts = sorted({op.query for op in ops if isinstance(op, SearchOp) and op.query})
        return dict(zip(texts, self.pipeline.embed(texts), strict=True)) if texts else {}

    def _search(
        self, op: SearchOp, vector: np.ndarray | None, now: datetime
    ) -> list[tuple[_Stored, float | None]]:
        """The page of items ``op`` asks for, each with its score (None: not scored)."""
        if op.limit <= 0:
            return []
        # SQL keeps a superset of the items the filter matches; the exact check runs below.
        documents = self._documents_under(op.namespace_prefix, store_prefilter(op.filter))
        candidates = [
            stored
            for stored in _items(documents)
            if not self._hidden(stored, now)
            and (not op.filter or matches_filter(stored.value, op.filter))
        ]
        if vector is None:
            return [(stored, None) for stored in candidates[op.offset : op.offset + op.limit]]
        wanted = op.offset + op.limit
        total = self._span_count(op.namespace_prefix)
        scores = self._best_scores(
            op.namespace_prefix, vector, candidates, wanted, total, store_prefilter(op.filter)
        )
        ranked = sorted(
            (c for c in candidates if (c.namespace, c.key) in scores),
            key=lambda c: -scores[(c.namespace, c.key)],
        )
        unscored = [c for c in candidates if (c.namespace, c.key) not in scores]
        page = (ranked + unscored)[op.offset : wanted]
        return [(stored, scores.get((stored.namespace, stored.key))) for stored in page]

    def _best_scores(
        self,
        prefix: tuple[str, ...],
        vector: np.ndarray,
        candidates: list[_Stored],
        wanted: int,
        total: int,
        prefilter: dict[str, Any] | None = None,
    ) -> dict[tuple[tuple[str, ...], str], float]:
        """Each candidate's best span score, for at least the `wanted` best candidates.

        Spans are fetched best first, more on each pass, until `wanted` candidates have a score
        or all `total` spans under the prefix have been seen. With `prefilter` (the filter's
        SQL superset) the index only considers the spans of items that may match, so a
        selective filter costs a search over those spans, not over the whole prefix."""
        want = {(c.namespace, c.key) for c in candidates if c.span_count}
        if not want:
            return {}
        k = min(total, max(wanted, 1) * _SEARCH_POOL)
        while True:
            scores: dict[tuple[tuple[str, ...], str], float] = {}
            for root in self._roots(prefix):
                for hit in self._search_spans(vector, root, k, prefilter):
                    key = (hit.namespace, hit.document_id)
                    if key in want and scores.get(key, float("-inf")) < hit.score:
                        scores[key] = hit.score
            if len(scores) >= min(wanted, len(want)) or k >= total:
                return scores
            k = min(total, k * 4)

    def _search_spans(
        self,
        vector: np.ndarray,
        root: tuple[str, ...],
        k: int,
        prefilter: dict[str, Any] | None,
    ) -> list[SearchHit]:
        if prefilter is not None:
            try:
                return self.pipeline.store.search(
                    vector, k, namespace=root, filter=prefilter, filter_root=VALUE_ROOT
                )
            except InvalidFilterError:
                pass  # a key or value the store's filter language refuses: search unfiltered
        return self.pipeline.search(vector, namespace=root, k=k)

    def _list_namespaces(self, op: ListNamespacesOp, now: datetime) -> list[tuple[str, ...]]:
        conditions = op.match_conditions or ()
        literal: tuple[str, ...] = ()
        for condition in conditions:
            if condition.match_type == "prefix":
                labels = tuple(condition.path)
                literal = labels[: labels.index("*")] if "*" in labels else labels
        if (self.ttl_config or {}).get("omit_expired"):
            namespaces = {
                stored.namespace
                for stored in _items(self._documents_under(literal))
                if not self._hidden(stored, now)
            }
        else:  # no item is hidden: the namespaces holding an item, found in SQL
            namespaces = set(
                self.pipeline.namespaces(
                    literal or None, filter={"value": {"$exists": True}}, filter_root=(ITEM_KEY,)
                )
            )
        chosen = [ns for ns in namespaces if all(_matches(c, ns) for c in conditions)]
        if op.max_depth is not None:
            chosen = list({ns[: op.max_depth] for ns in chosen})
        return sorted(chosen)[op.offset : op.offset + op.limit]

    def _get_stored(self, namespace: tuple[str, ...], keys: Sequence[str]) -> list[_Stored]:
        return _items(self.pipeline.get_documents(list(keys), namespace=namespace))

    def _documents_under(
        self,
        prefix: tuple[str, ...],
        value_filter: dict[str, Any] | None = None,
        *,
        root: tuple[str, ...] = VALUE_ROOT,
    ) -> list[DocumentInfo]:
        """Every document under a prefix, items or not, by namespace and then in the order
        first written; with ``value_filter`` (a store filter relative to ``root``: by default
        the item value, as ``store_prefilter`` writes it), only those the database finds
        matching it."""
        options: dict[str, Any] = {}
        if value_filter is not None:
            options = {"filter": value_filter, "filter_root": root}
        try:
            documents = [
                document
                for root in self._roots(prefix)
                for document in self.pipeline.list_documents(root, **options)
            ]
        except InvalidFilterError:
            # A key or value the store's filter language refuses (a quote in a key, a NUL):
            # nothing is narrowed in SQL, the exact check in Python still applies.
            if value_filter is None:
                raise
            return self._documents_under(prefix)
        documents.sort(key=lambda d: d.namespace)  # stable: first-written order inside one
        return documents

    def _span_count(self, prefix: tuple[str, ...]) -> int:
        """Spans under a prefix (every span, of items or not), counted in SQL."""
        return sum(self.pipeline.stats(root).spans for root in self._roots(prefix))

    def _roots(self, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        """The store reads prefixes of one label or more: the empty prefix is every top label."""
        if prefix:
            return [tuple(prefix)]
        return sorted({namespace[:1] for namespace in self.pipeline.namespaces()})

    def _hidden(self, stored: _Stored, now: datetime) -> bool:
        return bool((self.ttl_config or {}).get("omit_expired")) and stored.expired(now)

    # ------------------------------------------------------------------ writes

    def _refresh_ttl(
        self, ops: Sequence[Op], returned: Sequence[list[_Stored]], now: datetime
    ) -> None:
        """Push back the expiry of items with a TTL that a get or search read with refresh.

        Only an expiry that would move by at least ``REFRESH_SHARE`` of the item's TTL is
        written: reading an item again and again (every turn of an agent) is then a write at
        most once per 1% of its TTL, not on every read, and an item expires at most that much
        earlier than an exact refresh would have it. Whether it is due is first judged on the
        item as the read returned it, so a read with nothing due reads and writes nothing more;
        what is due is read again, current, before it is written."""
        touched: dict[tuple[str, ...], set[str]] = {}
        for op, items in zip(ops, returned, strict=True):
            if isinstance(op, GetOp | SearchOp) and op.refresh_ttl:
                for stored in items:
                    if _refresh_due(stored, now):
                        touched.setdefault(stored.namespace, set()).add(stored.key)
        for namespace, keys in touched.items():
            updates = {
                stored.key: _metadata(stored, now, refreshed=True)
                for stored in self._get_stored(namespace, sorted(keys))
                if _refresh_due(stored, now)
            }
            self.pipeline.update_metadata(updates, namespace=namespace)

    def _apply_puts(self, ops: Sequence[Op], now: datetime) -> None:
        last: dict[tuple[tuple[str, ...], str], PutOp] = {}
        for op in ops:
            if isinstance(op, PutOp):
                if op.value is not None:
                    _check_value(op)
                last[(op.namespace, op.key)] = op
        by_namespace: dict[tuple[str, ...], list[PutOp]] = {}
        for (namespace, _), op in last.items():
            by_namespace.setdefault(namespace, []).append(op)
        for namespace, puts in by_namespace.items():
            deleted = [op.key for op in puts if op.value is None]
            if deleted:
                self.pipeline.delete_documents(deleted, namespace=namespace)
            writes = [op for op in puts if op.value is not None]
            if not writes:
                continue
            existing = {s.key: s for s in self._get_stored(namespace, [op.key for op in writes])}
            documents = [
                TextDocument(
                    document_id=op.key,
                    texts=tuple(self._texts(op)),
                    metadata=_put_metadata(op, existing.get(op.key), now),
                )
                for op in writes
            ]
            self.pipeline.write_documents(documents, namespace=namespace)

    def _texts(self, op: PutOp) -> list[str]:
        if op.index is False:
            return []
        paths = self.index_fields if op.index is None else list(op.index)
        texts: list[str] = []
        for path in paths:
            tokens = path if path == "$" else tokenize_path(path)
            texts.extend(text for text in get_text_at_path(op.value, tokens) if text.strip())
        return texts


def _index_fields(index: IndexConfig | None) -> list[str]:
    if index is None:
        return ["$"]
    unknown = sorted(set(index) - {"fields", "dims", "embed"})
    if unknown:
        raise ValueError(f"ICAEMemory's index takes 'fields' only, not {unknown}")
    if "embed" in index:
        raise ValueError(
            "ICAEMemory embeds with its pipeline's embedder; drop index['embed'] and pass the "
            "embedder to MemoryPipeline.open(embedder=...) (a LangChain Embeddings goes through "
            "icmem.integrations.langchain.LangChainEmbedder)"
        )
    fields = list(index.get("fields") or ["$"])
    if not all(isinstance(f, str) and f for f in fields):
        raise ValueError(f"index['fields'] must be non-empty field paths, got {fields!r}")
    return fields


def _check_value(op: PutOp) -> None:
    if not isinstance(op.value, Mapping):
        raise TypeError(
            f"a store value must be a mapping (a JSON object), got {type(op.value).__name__} "
            f"for key {op.key!r}"
        )
    try:
        kept = json.loads(json.dumps(op.value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the value for key {op.key!r} is not plain JSON ({exc}); store strings, numbers, "
            "booleans, None, lists and string-keyed dicts"
        ) from exc
    if kept != op.value:
        raise TypeError(
            f"the value for key {op.key!r} would not read back as written (tuples, non-string "
            "keys?); store lists and string-keyed dicts"
        )


def _check_ttl(op: Op) -> None:
    """Refuse a put's TTL that is not a time to live, before anything is written."""
    if isinstance(op, PutOp) and op.ttl is not None:
        _check_minutes(op.ttl, f"the ttl of key {op.key!r}")


def _check_minutes(ttl: Any, what: str) -> None:
    """A TTL is a non-negative number of minutes; a negative, NaN or non-numeric one would
    store an item that is expired (or unexpirable) by accident."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or math.isnan(ttl) or ttl < 0:
        raise ValueError(
            f"{what} is {ttl!r}; a TTL is a number of minutes >= 0 (or None for no expiry)"
        )


def _put_metadata(op: PutOp, existing: _Stored | None, now: datetime) -> dict[str, Any]:
    ttl = None if op.ttl is None else float(op.ttl)
    stored = _Stored(
        namespace=op.namespace,
        key=op.key,
        value=dict(op.value or {}),
        created_at=existing.created_at if existing else now,
        updated_at=now,
        expires_at=None,
        ttl=ttl,
        span_count=0,
    )
    return _metadata(stored, now, refreshed=True)


def _expiry(ttl: float, now: datetime) -> datetime | None:
    """When an item with ``ttl`` minutes expires if written now; None past the calendar's end."""
    try:
        return now + timedelta(minutes=ttl)
    except OverflowError:  # a TTL past the calendar's end: never expires
        return None


def _refresh_due(stored: _Stored, now: datetime) -> bool:
    """Whether a read at ``now`` moves the item's expiry by at least ``REFRESH_SHARE`` of its
    TTL (an item without a TTL has nothing to refresh)."""
    if stored.ttl is None:
        return False
    refreshed = _expiry(stored.ttl, now)
    if refreshed is None or stored.expires_at is None:
        return refreshed != stored.expires_at
    return refreshed - stored.expires_at >= timedelta(minutes=stored.ttl * REFRESH_SHARE)


def _metadata(stored: _Stored, now: datetime, *, refreshed: bool) -> dict[str, Any]:
    expires = stored.expires_at
    if refreshed and stored.ttl is not None:
        expires = _expiry(stored.ttl, now)
    return {
        ITEM_KEY: {
            "value": stored.value,
            "created_at": stored.created_at.isoformat(),
            "updated_at": stored.updated_at.isoformat(),
            "expires_at": expires.isoformat() if expires else None,
            # The same instant as a number, so that a TTL sweep finds expired items in SQL.
            "expires_ts": expires.timestamp() if expires else None,
            "ttl": stored.ttl,
        }
    }


def _items(documents: Iterable[DocumentInfo]) -> list[_Stored]:
    return [stored for stored in map(_as_stored, documents) if stored is not None]


def _items_with_records(
    documents: Iterable[DocumentInfo],
) -> list[tuple[_Stored, Mapping[str, Any]]]:
    """Items with the raw record they were read from (what fields it was written with)."""
    return [
        (stored, document.metadata[ITEM_KEY])
        for document in documents
        if (stored := _as_stored(document)) is not None
    ]


def _as_stored(document: DocumentInfo) -> _Stored | None:
    record = document.metadata.get(ITEM_KEY)
    if not isinstance(record, Mapping):
        return None  # a document written some other way (ingest, chat history): not an item
    expires = record.get("expires_at")
    return _Stored(
        namespace=tuple(document.namespace),
        key=document.id,
        value=dict(record["value"]),
        created_at=datetime.fromisoformat(record["created_at"]),
        updated_at=datetime.fromisoformat(record["updated_at"]),
        expires_at=datetime.fromisoformat(expires) if expires else None,
        ttl=record.get("ttl"),
        span_count=document.span_count,
    )


def _matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        window = namespace[: len(path)]
    elif condition.match_type == "suffix":
        window = namespace[len(namespace) - len(path) :]
    else:
        raise ValueError(f"unknown namespace match type {condition.match_type!r}")
    return all(want in ("*", label) for want, label in zip(path, window, strict=True))


def _now() -> datetime:
    return datetime.now(timezone.utc)
