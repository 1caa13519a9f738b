"""Real processes for integration tests: a `riha-node serve`, dcmtk's tools, Orthanc.

pynetdicom installs console scripts named storescu/echoscu/storescp into the venv, which shadow dcmtk's tools once
the venv is on PATH; `dcmtk()` finds dcmtk's own binaries on a PATH without the venv and checks their version.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
LOOPBACK_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def dcmtk(tool: str) -> str:
    """Absolute path of dcmtk's `tool`, never the venv's pynetdicom script of the same name."""
    path_without_venv = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                        if Path(p).resolve() != VENV_BIN.resolve())
    found = shutil.which(tool, path=path_without_venv + os.pathsep + "/usr/bin")
    assert found, f"dcmtk's {tool} is not installed (apt-get install dcmtk; .ci/run does this)"
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    assert "dcmtk" in version.lower(), f"{found} is not dcmtk's {tool}: {version[:80]!r}"
    return found


def dcmtk_env() -> dict[str, str]:
    """dcmtk leaves Nagle on unless told otherwise, which stalls each C-STORE by tens of milliseconds."""
    return os.environ | {"TCP_NODELAY": "1"}


@dataclass
class NodeProcess:
    """A real `riha-node serve` on a free loopback port, configured by a TOML file written for the test."""

    workdir: Path
    quiet_period_s: float = 1.0
    peers: list[tuple[str, str | None]] = field(default_factory=lambda: [("STORESCU", "127.0.0.1"),
                                                                          ("ECHOSCU", "127.0.0.1"),
                                                                          ("TESTSCU", None)])
    extra_toml: str = ""
    ae_title: str = "RIHA"
    database_url: str = ""  # empty: SQLite in the storage folder
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "riha-node.toml"

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    def write_config(self) -> None:
        peers = "\n".join(f'[[peers]]\nae_title = "{ae}"\n' + (f'host = "{host}"\n' if host else "")
                          for ae, host in self.peers)
        self.config_path.write_text(textwrap.dedent(f"""\
            [node]
            ae_title = "{self.ae_title}"
            host = "127.0.0.1"
            port = {self.port}
            storage_dir = "storage"
            database_url = "{self.database_url}"
            network_timeout_s = 10
            acse_timeout_s = 10
            dimse_timeout_s = 20

            [study]
            quiet_period_s = {self.quiet_period_s}

            [logging]
            format = "json"
            """) + peers + "\n" + self.extra_toml)

    def start(self) -> "NodeProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self.write_config()
        log = self.log_path.open("ab")
        already_logged = self.log_text().count('"event": "listening"')
        self.process = subprocess.Popen([str(VENV_BIN / "riha-node"), "serve", "--config", str(self.config_path)],
                                        stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        # Wait for the node's own "listening" line, not a probe connection: a probe would hold an association
        # slot until the ACSE timeout.
        deadline = time.monotonic() + 30
        while self.log_text().count('"event": "listening"') == already_logged:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"riha-node serve did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def cli(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        result = subprocess.run([str(VENV_BIN / "riha-node"), *args, "--config", str(self.config_path)],
                                capture_output=True, text=True, timeout=timeout)
        with (self.workdir / "cli.log").open("a") as log:  # the commands' logs, for the session's PHI scan
            log.write(result.stderr)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def studies(self, state: str | None = None) -> list[dict]:
        args = ["studies", "--json"] + (["--state", state] if state else [])
        return json.loads(self.cli(*args).stdout)

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; log:\n{self.log_text()[-3000:]}")

    def database(self):
        """This node's database, migrated, with its configuration written: for commands that work on the database
        alone, no serve process needed. The caller disposes of it."""
        from riha_node.db import Database

        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self.write_config()
        database = Database(self.database_url or f"sqlite:///{self.storage_dir / 'riha-node.db'}")
        database.upgrade()
        return database

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class OrthancProcess:
    """Orthanc, a real PACS, started by hand on loopback ports with its own JSON config."""

    workdir: Path
    modalities: dict[str, list] = field(default_factory=dict)
    aet: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def start(self) -> "OrthancProcess":
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        assert Path(binary).exists(), "Orthanc is not installed (apt-get install orthanc; .ci/run does this)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "riha-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "ConcurrentJobs": 2,
            "StableAge": 1,
        }
        config_file = self.workdir / "orthanc.json"
        config_file.write_text(json.dumps(config, indent=2))
        log = (self.workdir / "orthanc.log").open("ab")
        self.process = subprocess.Popen([binary, str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                                        env=dcmtk_env())
        wait_for_port(self.http_port, process=self.process)
        wait_for_port(self.dicom_port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None

    def rest(self, method: str, path: str, body: bytes | dict | str | None = None, timeout: float = 60.0):
        payload = self.rest_bytes(method, path, body, timeout)
        return json.loads(payload) if payload else None

    def rest_bytes(self, method: str, path: str, body: bytes | dict | str | None = None,
                   timeout: float = 60.0) -> bytes:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (
            body.encode() if isinstance(body, str) else body)
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with LOOPBACK_HTTP.open(request, timeout=timeout) as response:
            return response.read()


@dataclass
class StorescpProcess:
    """dcmtk's storescp in bit-preserving mode: the reference for the exact bytes a sender put on the wire."""

    output_dir: Path
    aet: str = "STORESCP"
    port: int = field(default_factory=free_port)
    options: tuple[str, ...] = ()  # more storescp options, e.g. ("+tls", KEY, CERT, "+cf", CA)
    process: subprocess.Popen | None = None

    def start(self) -> "StorescpProcess":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([dcmtk("storescp"), "+B", "+xa", *self.options, "-aet", self.aet, "-od",
                                         str(self.output_dir), str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env())
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())


def open_node(config):
    """The database (migrated) and the store (prepared) of a node configuration, as `serve` opens them."""
    from riha_node.db import Database
    from riha_node.storage import InstanceStore

    db = Database(config.database_url)
    db.upgrade()
    store = InstanceStore(config.node.storage_dir)
    store.prepare()
    return db, store


@contextmanager
def in_process_scp(folder: Path, node_toml: str = "", extra_toml: str = ""):
    """The node's StorageServer in this test's process, so a test can reach its database, store, associations and
    threads directly (and break them). `node_toml`: extra [node] lines; `extra_toml`: further sections."""
    from riha_node.config import load_config
    from riha_node.scp import StorageServer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "riha-node.toml").write_text(f'[node]\nport = {free_port()}\nstorage_dir = "storage"\n{node_toml}'
                                           f'[[peers]]\nae_title = "TESTSCU"\n{extra_toml}')
    config = load_config(folder / "riha-node.toml", environ={})
    db, store = open_node(config)
    server = StorageServer(config, db, store)
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_s=1)
        db.dispose()
