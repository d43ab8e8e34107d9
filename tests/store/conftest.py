"""Store fixtures: the backends the store suite runs against (SQLite and a real, throw-away
PostgreSQL cluster: the `postgres_server` fixture of tests/postgres_testing.py). Helpers are in
store_testing.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from icmem.store import MemoryStore
from postgres_testing import PostgresServer
from store_testing import StoreLocation


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreLocation]:
    if request.param == "sqlite":
        yield StoreLocation("sqlite", str(tmp_path / "store"), tmp_path / "store" / "index")
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    yield StoreLocation("postgres", server.create_database(), tmp_path / "pg-index")
    server.drop_databases()


@pytest.fixture
def store(location: StoreLocation) -> Iterator[MemoryStore]:
    with location.open() as opened:
        yield opened
