"""Store fixtures: the backends the store suite runs against (SQLite and a real, throw-away
PostgreSQL cluster started from Debian's packages). Helpers are in store_testing.py."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from icmem.store import MemoryStore
from store_testing import (
    PG_FIX,
    PostgresServer,
    StoreLocation,
    as_postgres_user,
    free_port,
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throw-away PostgreSQL cluster on a free loopback port, stopped after the session."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        pytest.fail(f"no PostgreSQL server binaries under /usr/lib/postgresql; {PG_FIX}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.fail("running as root needs `runuser` to start PostgreSQL as the postgres user")
    bindir = Path(initdbs[-1]).parent
    base = Path(tempfile.mkdtemp(prefix="icmem-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data, log = base / "data", base / "server.log"
    port = free_port()
    run = {"check": True, "capture_output": True, "text": True}
    try:
        subprocess.run(
            as_postgres_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            **run,
        )
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            as_postgres_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    options,
                    "-l",
                    str(log),
                    "-w",
                    "start",
                ]
            ),
            **run,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}; {PG_FIX}")
    try:
        yield PostgresServer("127.0.0.1", port)
    finally:
        subprocess.run(
            as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


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
