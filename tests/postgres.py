"""A throwaway PostgreSQL server for tests, and its pytest fixtures.

``PostgresServer`` runs Debian's PostgreSQL binaries (``/usr/lib/postgresql/<v>/bin``,
or ``$FINETUNE_PG_BINDIR``): ``initdb`` into a temporary folder, then ``pg_ctl`` on a free
loopback port, with its socket in the same folder. PostgreSQL refuses to run as root, so
when the tests run as root the server runs as the ``postgres`` user that Debian's
package creates (``nobody`` where there is none), owning only that folder. Trust
authentication on 127.0.0.1 only: a server for tests, not for data.

Fixtures (modules use them with ``pytest_plugins = ("tests.postgres",)``):
``postgres_server``, one server for the session, and ``postgres_dsn``, a fresh database
on it for each test. Without PostgreSQL they skip, unless ``FINETUNE_REQUIRE_POSTGRES=1``
(as in CI), where they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def find_bindir() -> Path | None:
    """The newest PostgreSQL's binaries folder (the one holding ``initdb``), if any."""
    if env := os.environ.get("FINETUNE_PG_BINDIR"):
        return Path(env) if (Path(env) / "initdb").exists() else None
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def require_bindir() -> Path:
    """The binaries, or a skip saying how to get them (a failure where CI requires them)."""
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    why = (
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; "
        "`apt-get install postgresql`, or set FINETUNE_PG_BINDIR)"
    )
    if os.environ.get("FINETUNE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"FINETUNE_REQUIRE_POSTGRES=1 but {why}", pytrace=False)
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> dict[str, Any]:
    """``subprocess`` arguments that drop root to an unprivileged user (none otherwise)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists")


class PostgresServer:
    """One PostgreSQL server in its own temporary folder; ``stop`` removes nothing,
    ``cleanup`` stops it and removes the folder."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._as = _server_user()
        if self._as:
            os.chown(self.root, self._as["user"], self._as["group"])
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip

    def _run(self, tool: str, *args: Any, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bindir / tool), *map(str, args)],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            **self._as,
        )

    def start(self) -> None:
        """Start on a free loopback port (a new one if the last is taken)."""
        for _ in range(5):
            self.port = self.port or _free_port()
            conf = (
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                # Throwaway data: no durability, so a test's writes are not disk-bound.
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
            )
            (self.data / "postgresql.auto.conf").write_text(conf)
            done = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data,
                             "-l", self.log, check=False)  # fmt: skip
            if done.returncode == 0:
                return
            self.port = 0  # most likely the port was taken meanwhile: another one
        raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", self.data, check=False)

    def restart(self) -> None:
        self._run("pg_ctl", "restart", "-w", "-m", "fast", "-D", self.data, "-l", self.log)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A started server of its own (skipped or failed as ``require_bindir`` says)."""
    server = PostgresServer(require_bindir())
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session."""
    with running_server() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database for this test on the session's server; its DSN."""
    name = f"test_{secrets.token_hex(6)}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)
