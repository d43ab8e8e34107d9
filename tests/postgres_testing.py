"""A throw-away PostgreSQL cluster for tests, as a pytest plugin (registered once, in
tests/conftest.py) so that the store suite and the Ray ingestion tests share one server.

The `postgres_server` fixture starts a cluster from Debian's server binaries on a free loopback
port for the whole session; each test makes its own database (`create_database`) and drops it
(`drop_databases`)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_FIX = "run `bash .ci/postgres-deps.sh` as root (it apt-installs postgresql) and re-run the tests"


def as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; the tests run as root in CI containers.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str = "postgres"
    databases: list[str] = field(default_factory=list)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        dsn = f"host={self.host} port={self.port} user={self.user} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(sql)

    def create_database(self) -> str:
        name = f"icmem_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def drop_databases(self) -> None:
        while self.databases:
            self._admin(f'DROP DATABASE "{self.databases.pop()}" WITH (FORCE)')


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
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w"]
    try:
        subprocess.run(as_postgres_user([*initdb, "-E", "UTF8", "--no-sync"]), **run)
        subprocess.run(as_postgres_user([*start, "start"]), **run)
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
