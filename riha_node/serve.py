"""`riha-node serve`: the SCP and the scheduler in one process, started in order and stopped cleanly.

Start: upgrade the database, prepare storage (removing temp files a crash left), listen, then schedule the periodic
jobs (whose first run happens at once, so a restarted node catches up from the database); they run only while this
process is the leader (riha_node.leader), so several serves on one database do not repeat them. Stop (SIGTERM/SIGINT):
refuse new associations, let those in flight finish (or abort them after a grace period: nothing unacknowledged is
lost, nothing acknowledged is missing), stop the scheduler, close the database.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

from apscheduler.schedulers.background import BackgroundScheduler

from riha_node.assembly import close_quiet_studies
from riha_node.config import Config
from riha_node.db import Database
from riha_node.export import export_due
from riha_node.health import MonitoringServer
from riha_node.leader import Leadership
from riha_node.log import get_logger
from riha_node.metrics import node_registry
from riha_node.models import utcnow
from riha_node.retention import purge_interval_s, purge_expired
from riha_node.scp import StorageServer
from riha_node.stopping import StopSignal
from riha_node.storage import InstanceStore

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 10.0

# Set for the workers `serve` starts: they stop when it is gone, even after a `kill -9` that left no one to send them
# SIGTERM, so a restarted node never finds the last run's workers still at work.
PARENT_PID_VARIABLE = "RIHA_SERVE_PID"  # outside RIHA_NODE_*, which is for configuration keys


class Node:
    def __init__(self, config: Config):
        self.config = config
        self.db = Database(config.database_url)
        self.store = InstanceStore(config.node.storage_dir)
        self.server: StorageServer | None = None
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.workers = WorkerProcesses(config)
        self.monitor: MonitoringServer | None = None
        self.leadership = Leadership(config.database_url)  # the periodic jobs run in the leader only

    def start(self) -> None:
        self.store.prepare()
        self.db.upgrade()
        self.server = StorageServer(self.config, self.db, self.store)
        self.server.start()
        if self.config.metrics.port:
            self.monitor = MonitoringServer(self.config, self.store, node_registry(
                self.config, self.db, self.store, self.server.active_associations, self.workers.alive))
            self.monitor.start()
        quiet = self.config.study.quiet_period_s
        leader_only = self.leadership.run_if_leader
        self.scheduler.add_job(leader_only, "interval", args=[close_quiet_studies, self.db, quiet],
                               seconds=min(0.25, max(quiet / 4, 0.05)), next_run_time=utcnow(),
                               id="close_quiet_studies", max_instances=1, coalesce=True)
        self.scheduler.add_job(leader_only, "interval", args=[export_due, self.db, self.store, self.config],
                               seconds=1.0, next_run_time=utcnow(), id="export_due", max_instances=1, coalesce=True)
        if self.config.study.retention_days:
            self.scheduler.add_job(leader_only, "interval", args=[purge_expired, self.db, self.store,
                                                                  self.config.study.retention_days],
                                   seconds=purge_interval_s(self.config.study.retention_days), next_run_time=utcnow(),
                                   id="purge_expired", max_instances=1, coalesce=True)
        if self.config.retrain.schedule:
            from apscheduler.triggers.cron import CronTrigger

            from riha_node.retrain import ScheduledRetrain  # imports the model's libraries: only when scheduled

            self.scheduler.add_job(leader_only, CronTrigger.from_crontab(self.config.retrain.schedule, timezone="UTC"),
                                   args=[ScheduledRetrain(self.config)], id="retrain", max_instances=1, coalesce=True)
        self.scheduler.add_job(self.workers.keep_running, "interval", seconds=2.0, id="supervise_workers",
                               max_instances=1, coalesce=True)
        self.scheduler.start()
        self.workers.keep_running()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(SHUTDOWN_GRACE_S)
        self.workers.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        self.leadership.release()
        if self.monitor is not None:
            self.monitor.stop()
        self.db.dispose()
        log.info("node stopped")


class WorkerProcesses:
    """`[worker] processes` child processes running `riha-node worker`, restarted if one dies.

    Separate processes keep the model's CPU time off the listener's interpreter, and a crashed worker costs only
    its lease.
    """

    def __init__(self, config: Config):
        self.config = config
        self.processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._stopping = False

    def keep_running(self) -> None:
        with self._lock:
            if self._stopping:
                return
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    log.warning("worker exited, restarting", pid=process.pid, exit_code=process.returncode)
                    self.processes[index] = self._spawn()
            while len(self.processes) < self.config.worker.processes:
                self.processes.append(self._spawn())

    def alive(self) -> int:
        return sum(process.poll() is None for process in self.processes)

    def _spawn(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "riha_node.cli", "worker"]
        if self.config.source is not None:
            command += ["--config", str(self.config.source)]
        process = subprocess.Popen(command, env=os.environ | {PARENT_PID_VARIABLE: str(os.getpid())})
        log.info("worker started", pid=process.pid)
        return process

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM every worker; each finishes the study in hand (or, past the timeout, is killed: its lease expires)."""
        with self._lock:
            self._stopping = True
            for process in self.processes:
                if process.poll() is None:
                    process.terminate()
            for process in self.processes:
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
            self.processes = []


def serve(config: Config) -> None:
    stop = StopSignal()
    node = Node(config)
    try:
        node.start()
        stop.wait()
        log.info("stop requested", signal=stop.name)
    finally:
        node.stop()
