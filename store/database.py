"""The database room: where a store's rows live and how they are reached.

It owns the SQLAlchemy engine (SQLite in WAL mode with ``BEGIN IMMEDIATE`` writers, or a
Postgres URL), the checks on a store directory before anything is created in it, the schema
creation, version check and migration on open, and the translation of database errors into
``StoreError`` subclasses. It knows rows and transactions, nothing of FAISS or of documents.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, inspect, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DatabaseError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from .errors import (
    DamagedStoreError,
    DimensionMismatchError,
    ForeignSlotsError,
    NotAStoreError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreError,
    StoreFullError,
    StoreReadError,
    StoreWriteError,
)
from .schema import MIGRATIONS, SCHEMA_VERSION, Base, SchemaVersionRow, SettingRow

__all__ = ["DATABASE_FILE", "INDEX_DIR", "Database"]

DATABASE_FILE = "store.sqlite"
INDEX_DIR = "index"
_PG_INIT_LOCK = 0x1C3E30  # advisory lock key serialising schema creation across workers


def _icmem_version() -> str:
    """The installed icmem's version, recorded with each schema version applied (read from the
    package metadata: the store imports nothing from the icmem package face)."""
    try:
        return metadata.version("icmem")
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = _icmem_version()


class Database:
    """A store's rows: an engine, transactions over it, and the facts of its file.

    ``Database.open`` checks (and for a new SQLite store, creates) the database, migrates an
    older schema and returns it with the store's settings (``dim``, ``model_fingerprint``).
    """

    def __init__(
        self, engine: Engine, *, read_only: bool, path: Path | None, busy_timeout_s: float | None
    ) -> None:
        self._engine = engine
        self.read_only = read_only
        self.path = path  # the SQLite file, None for a URL store
        self._busy_timeout_s = busy_timeout_s  # set for SQLite stores, to reopen the engine
        self._reopen_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path_or_url: str | os.PathLike[str],
        *,
        dim: int,
        index_dir: str | os.PathLike[str] | None,
        model_fingerprint: str | None,
        read_only: bool,
        busy_timeout_s: float,
    ) -> tuple[Database, Path, dict[str, str]]:
        """Open the rows of a store: the database, where its index files live, its settings."""
        text = os.fspath(path_or_url)
        database_path = None
        busy_timeout = None
        if "://" in text:
            url = make_url(text)
            if url.get_backend_name() == "sqlite":
                raise NotAStoreError(
                    "give a SQLite store as its directory, not a sqlite:// URL, so its index "
                    "files have a home beside it"
                )
            if index_dir is None:
                raise StoreError(
                    f"a store at {url.render_as_string(hide_password=True)} needs index_dir=... "
                    "(a local directory where this worker keeps the FAISS index files)"
                )
            engine = create_engine(url, pool_pre_ping=True)
        else:
            directory = Path(text)
            index_dir = directory / INDEX_DIR if index_dir is None else index_dir
            database_path = _prepare_directory(directory, read_only)
            if not database_path.exists():
                _create_database(database_path, dim, model_fingerprint, busy_timeout_s)
            elif _is_emptied(database_path):
                # Refused before SQLite opens it: a writable open would write a fresh header.
                raise _not_a_store_any_more(database_path)
            engine = _sqlite_engine(database_path, read_only, busy_timeout_s)
            busy_timeout = busy_timeout_s
        index_path = Path(index_dir)
        if not read_only:
            try:
                index_path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                engine.dispose()
                raise ReadOnlyStoreError(
                    f"cannot create index directory {index_path}: {exc.strerror}; fix its "
                    "permissions or open with read_only=True"
                ) from exc
        try:
            settings = _initialise(
                engine, dim, model_fingerprint, read_only, index_dir=index_path, create=False
            )
        except BaseException:
            engine.dispose()
            raise
        database = cls(engine, read_only=read_only, path=database_path, busy_timeout_s=busy_timeout)
        return database, index_path, settings

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def dispose(self) -> None:
        self._engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction that sees one snapshot, on both backends.

        SQLite's read transaction is a snapshot already. Postgres's default, READ COMMITTED,
        takes a new snapshot per statement, so a filtered search could choose documents by
        their metadata in one statement and fetch those rows, changed since, in the next: a
        hit that contradicts its filter. REPEATABLE READ gives the whole transaction the
        first statement's snapshot; a transaction that only reads never fails for it."""
        self._follow_new_writers()
        try:
            with self._engine.connect() as connection:
                if self.dialect == "postgresql":
                    connection.execution_options(isolation_level="REPEATABLE READ")
                with connection.begin():
                    yield connection
        except DatabaseError as exc:
            raise _translate(exc, reading=True) from exc

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: all of it commits or none of it (``BEGIN IMMEDIATE`` on
        SQLite, so writers queue on the busy timeout instead of deadlocking)."""
        if self.read_only:
            raise ReadOnlyStoreError(
                "the store was opened read_only=True; open it without read_only to write"
            )
        try:
            with (
                self._engine.connect().execution_options(icmem_write=True) as connection,
                Session(bind=connection) as session,
                session.begin(),
            ):
                yield session
        except (OperationalError, DatabaseError) as exc:
            raise _translate(exc) from exc

    def id_aggregate(self, column: Any, order_by: Any = None) -> Any:
        """All values of an integer column as one value: a Postgres array, a SQLite JSON array
        (one aggregate, parsed in C, instead of a Python row per id)."""
        if self.dialect == "postgresql":
            return func.array_agg(
                aggregate_order_by(column, order_by) if order_by is not None else column
            )
        return func.json_group_array(column)

    def integrity_problems(self, session: Connection) -> list[str]:
        """What SQLite's ``quick_check`` finds broken in the database's pages (nothing: ``[]``);
        Postgres checks its own pages, so there it is always ``[]``."""
        if self.dialect != "sqlite":
            return []
        found = [str(row[0]) for row in session.exec_driver_sql("PRAGMA quick_check")]
        return [] if found == ["ok"] else found

    def nbytes(self, session: Session | Connection) -> int:
        """The database's size on disk (SQLite file and WAL, or Postgres relations)."""
        if self.path is not None:
            paths = [self.path, self.path.with_name(self.path.name + "-wal")]
            return sum(p.stat().st_size for p in paths if p.exists())
        if self.dialect == "postgresql":
            total = 0
            for table in Base.metadata.sorted_tables:
                total += session.execute(
                    select(func.pg_total_relation_size(table.name))
                ).scalar_one()
            return int(total)
        return 0

    def _follow_new_writers(self) -> None:
        """Keep a reader in a directory it cannot write in step with the writers.

        Such a reader cannot create the WAL's shared memory, so it opens ``immutable=1`` while
        the WAL is empty (every commit is then in the database file) and ``mode=ro`` through an
        existing ``-shm`` while the WAL holds writes. Which one is right changes under it: a
        writer starts (the WAL fills), closes or checkpoints (the WAL empties or goes away),
        VACUUMs (every page moves). So the mode is chosen again before each read, and these
        engines keep no connection between reads (``_sqlite_engine`` gives them no pool): an
        ``immutable=1`` connection never looks for changes, so one kept open would answer from
        the pages it cached (stale rows, or after a VACUUM pages that no longer fit together
        and read as damage)."""
        path = self.path
        if path is None or not self.read_only or os.access(path.parent, os.W_OK):
            return
        if _read_only_mode(path) == _engine_mode(self._engine):
            return
        with self._reopen_lock:
            old = self._engine
            self._engine = _sqlite_engine(path, True, self._busy_timeout_s or 30.0)
            old.dispose()


def _translate(exc: SQLAlchemyError, *, reading: bool = False) -> StoreError:
    message = str(getattr(exc, "orig", exc)).lower()
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if "disk is full" in message or "disk full" in message or code == "53100":
        return StoreFullError(
            "the database is full (no space left on the device or its size limit); the failed "
            "call was rolled back and the store is as it was: free space, then retry"
        )
    if "readonly" in message or "read-only" in message:
        return ReadOnlyStoreError(
            "the database refused a write because it is read-only; fix the file and directory "
            "permissions or open with read_only=True to only search"
        )
    if "database is locked" in message:
        return StoreWriteError(
            "another process held the store's write lock past the busy timeout; retry, or raise "
            "busy_timeout_s in MemoryStore.open"
        )
    if "malformed json" in message:
        return DamagedStoreError(
            f"a document's stored metadata is not valid JSON ({message}); find it with "
            "`icmem store stats --check` and re-add that document"
        )
    if "malformed" in message or "corrupt" in message:
        return DamagedStoreError(
            f"the store's database file is damaged ({message}); nothing was changed. Copy the "
            "store directory aside, then run `sqlite3 store.sqlite .recover` on the copy to "
            "salvage the rows, or restore the directory from a backup"
        )
    if "not a database" in message:
        return NotAStoreError(
            f"the store's database file is not a readable SQLite database ({message}); restore it "
            "from a backup or open another directory"
        )
    if reading:
        return StoreReadError(f"the database refused a read: {message}")
    return StoreWriteError(f"the database refused the operation: {message}")


def _prepare_directory(directory: Path, read_only: bool) -> Path:
    if directory.exists() and not directory.is_dir():
        raise NotAStoreError(
            f"{directory} is a file, not a store; a store is a directory holding {DATABASE_FILE} "
            "and index/ (pass a new or empty directory to create one)"
        )
    database = directory / DATABASE_FILE
    if not database.exists():
        if read_only:
            raise NotAStoreError(f"no store at {directory} ({DATABASE_FILE} is missing)")
        if (directory / INDEX_DIR).exists():
            raise NotAStoreError(
                f"{directory} holds an {INDEX_DIR}/ but no {DATABASE_FILE}: the store's database "
                "was deleted or moved, and the index alone cannot restore documents. Put "
                f"{DATABASE_FILE} back (restore it from a backup); to start a new store, use a new "
                "directory"
            )
        if directory.is_dir() and any(
            not _is_creation_leftover(p.name) for p in directory.iterdir()
        ):
            raise NotAStoreError(
                f"{directory} is not empty and holds no {DATABASE_FILE}, so it is not a store; "
                "create the store in a new or empty directory"
            )
    if not read_only:
        if directory.is_dir() and not os.access(directory, os.W_OK):
            raise ReadOnlyStoreError(
                f"store directory {directory} is not writable; fix its permissions, or open with "
                "read_only=True to search without writing"
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReadOnlyStoreError(
                f"cannot create store directory {directory}: {exc.strerror}"
            ) from exc
    return database


def _is_creation_leftover(name: str) -> bool:
    return name.startswith(f".{DATABASE_FILE}.") and ".new" in name


def _create_database(
    database: Path, dim: int, model_fingerprint: str | None, busy_timeout_s: float
) -> None:
    """Create a new store's database atomically: build it whole under a temporary name, then link
    it into place. So ``store.sqlite`` never exists without its schema, and a file there without
    one (emptied, truncated, replaced) is always damage, never a store to initialise."""
    temporary = database.with_name(f".{DATABASE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new")
    engine = _sqlite_engine(temporary, False, busy_timeout_s)
    try:
        _initialise(engine, dim, model_fingerprint, False, index_dir=None, create=True)
    finally:
        engine.dispose()
    try:
        os.link(temporary, database)  # fails if another process created the store first
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: rename, checking first
        if not database.exists():
            os.replace(temporary, database)
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{temporary}{suffix}").unlink(missing_ok=True)
    try:
        descriptor = os.open(database.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)  # the new directory entry survives a power cut
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _wal_holds_writes(database: Path) -> bool:
    wal = database.with_name(database.name + "-wal")
    try:
        return wal.stat().st_size > 0
    except OSError:
        return False


def _read_only_mode(database: Path) -> str:
    """How to open a store read-only without missing a committed write.

    ``mode=ro`` reads the WAL too, but needs the WAL's shared-memory file (``-shm``): it creates
    one in a writable directory, and in a read-only one reads an existing one (even one it may not
    write, by copying the WAL index into private memory). Only when the directory is read-only
    and the WAL holds nothing is ``immutable=1`` safe and needed: then every committed write is
    in the database file itself. A WAL with writes but no readable ``-shm`` cannot be read at all,
    so the open is refused rather than silently answered from the older database file.
    """
    if os.access(database.parent, os.W_OK) or not _wal_holds_writes(database):
        return "mode=ro" if os.access(database.parent, os.W_OK) else "mode=ro&immutable=1"
    shm = database.with_name(database.name + "-shm")
    if not os.access(shm, os.R_OK):
        raise ReadOnlyStoreError(
            f"{database.name}-wal holds committed writes (left by a writer that is still running "
            f"or was killed) and a read-only open can only read them through {database.name}-shm, "
            f"which is {'unreadable' if shm.exists() else 'missing'} and cannot be created in the "
            f"read-only directory {database.parent}. Open the store once with write access "
            "(read_only=False folds the WAL into the database file), or copy the whole directory "
            "somewhere writable and open the copy"
        )
    return "mode=ro"


def _engine_mode(engine: Engine) -> str:
    """The ``_read_only_mode`` a read-only SQLite engine was opened with."""
    return "mode=ro&immutable=1" if "immutable=1" in str(engine.url) else "mode=ro"


def _sqlite_engine(database: Path, read_only: bool, busy_timeout_s: float) -> Engine:
    options: dict[str, Any] = {}
    if read_only:
        url = f"sqlite:///file:{database.resolve()}?{_read_only_mode(database)}&uri=true"
        if not os.access(database.parent, os.W_OK):
            # A fresh connection per read: see Database._follow_new_writers.
            options["poolclass"] = NullPool
    else:
        url = f"sqlite:///{database.resolve()}"
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": busy_timeout_s}, **options
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module so BEGIN IMMEDIATE can be issued.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not read_only:
            # Only takes effect when the file is created. Slot blobs (~147 KB each) dominate the
            # bytes; 64 KiB pages insert them ~2.8x faster than the 4 KiB default for ~3% more
            # space, because each blob spans 3 overflow pages instead of 37.
            cursor.execute("PRAGMA page_size=65536")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # Writers take the write lock up front: two deferred transactions that both upgrade to
        # writing would deadlock and one would fail instead of waiting.
        write = connection.get_execution_options().get("icmem_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _initialise(
    engine: Engine,
    dim: int,
    model_fingerprint: str | None,
    read_only: bool,
    *,
    index_dir: Path | None,
    create: bool,
) -> dict[str, str]:
    """Create the schema (a new SQLite file, or a Postgres database on first open); otherwise
    check its version and settings."""
    try:
        options = {} if read_only else {"icmem_write": True}
        with engine.connect().execution_options(**options) as connection:
            # A migration may rebuild a SQLite table, and dropping the old one must not cascade
            # into its children; the pragma only takes effect outside a transaction.
            keys_off = engine.dialect.name == "sqlite" and not read_only
            if keys_off:
                _sqlite_foreign_keys(connection, on=False)
            try:
                with connection.begin():
                    return _initialise_in(
                        connection, dim, model_fingerprint, read_only, index_dir, create
                    )
            finally:
                if keys_off:
                    try:
                        _sqlite_foreign_keys(connection, on=True)
                    except BaseException:
                        # Never hand a connection without foreign keys back to the pool: later
                        # deletes would leave orphans instead of cascading.
                        connection.invalidate()
                        raise
    except DatabaseError as exc:
        raise _translate(exc) from exc


def _sqlite_foreign_keys(connection: Connection, *, on: bool) -> None:
    driver = connection.connection.driver_connection  # no transaction open: the pragma applies
    assert driver is not None  # a connection checked out of the pool has its DBAPI connection
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _initialise_in(
    connection: Connection,
    dim: int,
    model_fingerprint: str | None,
    read_only: bool,
    index_dir: Path | None,
    create: bool,
) -> dict[str, str]:
    engine = connection.engine
    if engine.dialect.name == "postgresql" and not read_only:
        connection.execute(select(func.pg_advisory_xact_lock(_PG_INIT_LOCK)))
    tables = set(inspect(connection).get_table_names())
    if SchemaVersionRow.__tablename__ not in tables:
        if engine.dialect.name == "sqlite" and tables:
            raise NotAStoreError(
                f"the SQLite file holds other tables ({', '.join(sorted(tables)[:5])}) "
                "and no icmem store; create the store in a new directory"
            )
        if engine.dialect.name == "sqlite" and not create:
            database = (engine.url.database or "").removeprefix("file:").split("?")[0]
            raise _not_a_store_any_more(Path(database))
        if read_only:
            raise NotAStoreError("the database holds no icmem store (no schema table)")
        if index_dir is not None and any(Path(index_dir).glob("*.json")):
            raise NotAStoreError(
                f"the database holds no icmem store, but {index_dir} holds index files "
                "of one: the database was emptied or replaced. Restore it from a backup; "
                f"to start a new store here, empty {index_dir} first"
            )
        Base.metadata.create_all(connection)
        connection.execute(
            SchemaVersionRow.__table__.insert().values(
                version=SCHEMA_VERSION, icmem_version=__version__
            )
        )
        rows = [{"key": "dim", "value": str(dim)}]
        if model_fingerprint is not None:
            rows.append({"key": "model_fingerprint", "value": model_fingerprint})
        connection.execute(SettingRow.__table__.insert(), rows)
    else:
        _check_version(connection, read_only)
    settings = dict(
        connection.execute(
            select(SettingRow.key, SettingRow.value).where(
                SettingRow.key.in_(("dim", "model_fingerprint"))
            )
        ).all()
    )
    _check_settings(connection, settings, dim, model_fingerprint, read_only)
    return settings


def _is_emptied(database: Path) -> bool:
    """A 0-byte database file, whatever its WAL holds.

    A store's database is never legitimately empty: it is created whole under another name and
    linked into place (``_create_database``), and switching to WAL mode writes its header first.
    A WAL beside an empty file is therefore a leftover of the lost database, and replaying it
    into the empty file (what SQLite does on open) would build a partial store and delete the
    WAL, the only copy of those pages: refuse instead, before SQLite touches either file."""
    try:
        return database.stat().st_size == 0
    except OSError:
        return False


def _not_a_store_any_more(path: Path) -> NotAStoreError:
    size = path.stat().st_size if path.exists() else 0
    state = "empty (0 bytes)" if size == 0 else f"a SQLite database ({size} bytes) with no tables"
    wal = path.with_name(path.name + "-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    left = (
        f" Its write-ahead log {wal.name} ({wal_size} bytes) was left untouched: keep it with "
        "the backup you restore, never open it against the empty file."
        if size == 0 and wal_size
        else ""
    )
    return NotAStoreError(
        f"{path} is {state}: the store's database was emptied or replaced (a failed copy, a full "
        "disk). icmem never initialises a new store over an existing file, so nothing was "
        f"changed: restore the file from a backup, or move it away to start a new store.{left}"
    )


def _check_version(connection: Connection, read_only: bool) -> None:
    version = connection.scalar(select(func.max(SchemaVersionRow.version)))
    if version is None:
        raise NotAStoreError("the store's schema table is empty; the store was never initialised")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the store was written with schema version {version} by a newer icmem; this icmem "
            f"reads version {SCHEMA_VERSION}: upgrade icmem"
        )
    if version == SCHEMA_VERSION:
        return
    if read_only:
        raise SchemaVersionError(
            f"the store has schema version {version}, older than {SCHEMA_VERSION}; open it once "
            "without read_only=True to migrate it"
        )
    for step in range(version, SCHEMA_VERSION):
        migrate = MIGRATIONS.get(step)
        if migrate is None:
            raise SchemaVersionError(
                f"the store has schema version {version} and icmem {__version__} has no migration "
                f"from version {step}; re-create the store (re-ingest the documents)"
            )
        migrate(connection)
        connection.execute(
            SchemaVersionRow.__table__.insert().values(version=step + 1, icmem_version=__version__)
        )


def _check_settings(
    connection: Connection,
    settings: dict[str, str],
    dim: int,
    model_fingerprint: str | None,
    read_only: bool,
) -> None:
    stored_dim = int(settings["dim"])
    if stored_dim != dim:
        raise DimensionMismatchError(
            f"the store holds embeddings of dim {stored_dim}, it was opened with dim={dim}; open "
            f"it with dim={stored_dim} (and the embedding model it was built with)"
        )
    stored = settings.get("model_fingerprint")
    if model_fingerprint is None:
        return
    if stored is None:
        if not read_only:
            connection.execute(
                SettingRow.__table__.insert().values(
                    key="model_fingerprint", value=model_fingerprint
                )
            )
            settings["model_fingerprint"] = model_fingerprint
    elif stored != model_fingerprint:
        raise ForeignSlotsError(
            f"the store holds memory slots of base model {stored!r} but was opened for "
            f"{model_fingerprint!r}; open it with that model or use a separate store"
        )
