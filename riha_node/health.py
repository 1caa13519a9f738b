"""The node's HTTP side for monitoring: /metrics (Prometheus), /healthz (alive) and /readyz (fit to take studies).

Ready means: the database answers on a fresh connection (a pooled one can outlive a deleted SQLite file or a
restarted PostgreSQL), the disk is under the watermark, and the model the workers load (the registry's active
version, else the configured [model] checkpoint, which a worker registers when it starts) is a readable checkpoint. Both
probes answer 200 or 503 with a small JSON body naming each check, so an orchestrator and a person read the same.
"""
from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from safetensors import SafetensorError, safe_open
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from riha_model.files import CHECKPOINT_FORMAT
from riha_node.config import Config, ConfigError
from riha_node.db import driver_error, sqlite_path
from riha_node.log import get_logger
from riha_node.metrics import traffic_from_exposition
from riha_node.registry import active_version
from riha_node.storage import InstanceStore

log = get_logger(__name__)

PROBE_TIMEOUT_S = 3


def database_check(database_url: str, storage_dir: Path) -> tuple[str | None, Path | None]:
    """(problem, the registry's active checkpoint): problem is None when a new connection reaches the migrated
    schema, else what is wrong (no credentials in it)."""
    if (path := sqlite_path(database_url)) is not None:  # open the existing file only: never create an empty one
        url, connect_args = f"sqlite:///file:{path}?mode=rw&uri=true", {"timeout": PROBE_TIMEOUT_S}
    else:
        url, connect_args = database_url, {"connect_timeout": PROBE_TIMEOUT_S}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with Session(engine) as session:
            active = active_version(session, storage_dir)
    except SQLAlchemyError as exc:
        return f"database not reachable ({type(driver_error(exc)).__name__})", None
    finally:
        engine.dispose()
    return None, active.path if active else None


def disk_check(store: InstanceStore, watermark_percent: float) -> str | None:
    try:
        over = store.over_watermark(watermark_percent)
    except OSError as exc:
        return f"storage folder not readable ({exc.strerror})"
    return f"disk above the {watermark_percent:g}% watermark" if over else None


def model_check(config: Config, registered: Path | None = None) -> str | None:
    """The checkpoint's header only (a few kilobytes): the workers load the weights, this process stays small."""
    checkpoint = registered or config.model.checkpoint
    if checkpoint is None:
        return "no model configured ([model] checkpoint, or `riha-node models activate VERSION`)"
    try:
        with safe_open(str(checkpoint), framework="numpy") as reader:
            header = reader.metadata() or {}
    except (SafetensorError, OSError) as exc:
        return f"checkpoint {checkpoint} cannot be read ({exc})"
    if header.get("format") != CHECKPOINT_FORMAT:
        return f"{checkpoint} is not a RIHA checkpoint"
    return None


def readiness(config: Config, store: InstanceStore) -> tuple[bool, dict]:
    database_problem, registered_model = database_check(config.database_url, config.node.storage_dir)
    checks = {"database": database_problem,
              "disk": disk_check(store, config.study.disk_watermark_percent),
              "model": model_check(config, registered_model)}
    ready = all(problem is None for problem in checks.values())
    return ready, {"ready": ready, "checks": {name: {"ok": problem is None} | ({"problem": problem} if problem else {})
                                              for name, problem in checks.items()}}


def live_traffic(config: Config) -> dict | None:
    """The running node's traffic counters, read from its own /metrics; None when it has no endpoint or is down."""
    if not config.metrics.port:
        return None
    host = "127.0.0.1" if config.metrics.host in ("0.0.0.0", "") else config.metrics.host
    url = f"http://{host}:{config.metrics.port}/metrics"
    try:
        with _LOOPBACK.open(url, timeout=PROBE_TIMEOUT_S) as response:
            return traffic_from_exposition(response.read().decode())
    except (OSError, ValueError):  # not running, or something else answers on that port
        return None


_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a proxy must never see the node's figures


class MonitoringServer:
    """A small threaded HTTP server on the configured (loopback by default) address, beside the DICOM listener."""

    def __init__(self, config: Config, store: InstanceStore, registry: CollectorRegistry):
        self.config, self.store, self.registry = config, store, registry
        self.httpd: ThreadingHTTPServer | None = None

    def start(self) -> None:
        address = (self.config.metrics.host, self.config.metrics.port)
        try:
            self.httpd = ThreadingHTTPServer(address, self._handler_class())
        except OSError as exc:
            raise ConfigError(f"Cannot serve metrics on {address[0]}:{address[1]} ({exc.strerror}); set [metrics] "
                              "port to a free port, or 0 for no metrics endpoint.") from None
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics listening", host=address[0], port=self.port)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server convention)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(monitor.registry))
                elif path == "/healthz":
                    self._json(200, {"alive": True})
                elif path == "/readyz":
                    ready, body = readiness(monitor.config, monitor.store)
                    self._json(200 if ready else 503, body)
                else:
                    self._json(404, {"error": "not found; try /metrics, /healthz or /readyz"})

            def _json(self, code: int, body: dict) -> None:
                self._send(code, "application/json", json.dumps(body).encode())

            def _send(self, code: int, content_type: str, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
                """Scrapes every few seconds would flood the log; errors still come through log_error."""

            def log_error(self, format: str, *args) -> None:  # noqa: A002
                log.warning("metrics request failed", detail=format % args)

        return Handler
