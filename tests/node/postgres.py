"""A real PostgreSQL server for tests and benchmarks: initdb into a temporary folder, postgres on a loopback port.

postgres refuses to run as root, so under uid 0 (CI runs as root) the cluster belongs to, and the server runs as,
the unprivileged user `nobody` (through runuser); its folder is made outside pytest's root-only temp tree so that
user can reach it. Debian/Ubuntu's `postgresql` package puts the binaries in /usr/lib/postgresql/<version>/bin,
which is not on PATH; the newest version there wins, else PATH is used.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from tests.node.peers import free_port

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "riha"


def postgres_binary(name: str) -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0), reverse=True)
    found = str(versions[0]) if versions else shutil.which(name)
    assert found, f"PostgreSQL's {name} is not installed (deploy/install.sh --test apt-installs postgresql)"
    return found


@dataclass
class PostgresServer:
    port: int = field(default_factory=free_port)
    root: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def start(self) -> "PostgresServer":
        self.root = Path(tempfile.mkdtemp(prefix="riha-postgres-"))
        if os.geteuid() == 0:
            account = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        self._run(postgres_binary("initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--no-locale", "--no-sync")
        settings = {"listen_addresses": "'127.0.0.1'", "port": str(self.port), "unix_socket_directories": "''",
                    "max_connections": "200", "fsync": "off", "synchronous_commit": "off",
                    "full_page_writes": "off"}  # a throwaway cluster: durability is not under test here
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self.resume()
        return self

    def halt(self) -> None:
        """Stop the server and keep its data: a database outage, ended by `resume()`."""
        self._run(postgres_binary("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._run(postgres_binary("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            # immediate: no shutdown checkpoint, the cluster is deleted next
            self._run(postgres_binary("pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        if os.geteuid() == 0:
            command = ("runuser", "-u", UNPRIVILEGED_USER, "--", *command)
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}{log}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request) -> str:
    """An empty database of its own for each test."""
    name = re.sub(r"\W", "_", request.node.name.lower())[:50] + f"_{uuid.uuid4().hex[:8]}"
    return postgres_server.create_database(name)
