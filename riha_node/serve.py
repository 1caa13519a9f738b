"""`riha-node serve`: the SCP and the scheduler in one process, started in order and stopped cleanly.

Start: upgrade the database, prepare storage (removing temp files a crash left), listen, then schedule the periodic
jobs (whose first run happens at once, so a restarted node catches up from the database). Stop (SIGTERM/SIGINT):
refuse new associations, let those in flight finish (or abort them after a grace period: nothing unacknowledged is
lost, nothing acknowledged is missing), stop the scheduler, close the database.
"""
from __future__ import annotations

import signal
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from riha_node.assembly import close_quiet_studies
from riha_node.config import Config
from riha_node.db import Database
from riha_node.log import get_logger
from riha_node.models import utcnow
from riha_node.scp import StorageServer
from riha_node.storage import InstanceStore

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 10.0


class Node:
    def __init__(self, config: Config):
        self.config = config
        self.db = Database(config.database_url)
        self.store = InstanceStore(config.node.storage_dir)
        self.server: StorageServer | None = None
        self.scheduler = BackgroundScheduler(timezone="UTC")

    def start(self) -> None:
        self.store.prepare()
        self.db.upgrade()
        self.server = StorageServer(self.config, self.db, self.store)
        self.server.start()
        quiet = self.config.study.quiet_period_s
        self.scheduler.add_job(close_quiet_studies, "interval", args=[self.db, quiet],
                               seconds=min(1.0, max(quiet / 4, 0.1)), next_run_time=utcnow(),
                               id="close_quiet_studies", max_instances=1, coalesce=True)
        self.scheduler.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(SHUTDOWN_GRACE_S)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.db.dispose()
        log.info("node stopped")


def serve(config: Config) -> None:
    received: list[int] = []
    stop_requested = threading.Event()

    def request_stop(signum, _frame):  # only record it: logging from a signal handler can re-enter a write
        received.append(signum)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node = Node(config)
    try:
        node.start()
        if not config.model.checkpoint:
            log.warning("no model configured", hint="set [model] checkpoint; studies stay queued until then")
        stop_requested.wait()
        log.info("stop requested", signal=signal.Signals(received[0]).name)
    finally:
        node.stop()
