"""The Prometheus metrics: traffic counted where it happens (the serve process), the rest read from the database.

Traffic (instances, bytes, associations) exists only in the process that holds the DICOM listener, so it is counted
there by DICOM event handlers. Everything else (studies and jobs by state, stage times, exports, leases, model, disk)
is the work of several processes, so `NodeCollector` reads it from the database at scrape time through
riha_node.reporting, the same function `riha-node status` uses.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from riha_node.config import Config
from riha_node.db import Database, driver_error
from riha_node.log import get_logger
from riha_node.reporting import node_status
from riha_node.storage import InstanceStore

log = get_logger(__name__)

INSTANCES_RECEIVED = Counter("riha_node_instances_received", "C-STORE requests answered, by response status",
                             ["status"], registry=None)
BYTES_RECEIVED = Counter("riha_node_received_bytes", "Data set bytes received in C-STORE requests", registry=None)
ASSOCIATIONS_ACCEPTED = Counter("riha_node_associations_accepted", "Associations accepted", registry=None)
ASSOCIATIONS_REJECTED = Counter("riha_node_associations_rejected", "Associations rejected, by reason", ["reason"],
                                registry=None)
TRAFFIC = (INSTANCES_RECEIVED, BYTES_RECEIVED, ASSOCIATIONS_ACCEPTED, ASSOCIATIONS_REJECTED)

# A-ASSOCIATE-RJ (source, diagnostic) -> reason label, PS3.8 9.3.4
REJECTION_REASONS = {(0x01, 0x03): "calling_ae_not_recognised", (0x01, 0x07): "called_ae_not_recognised",
                     (0x03, 0x02): "local_limit_exceeded", (0x03, 0x01): "temporary_congestion"}


def count_store(handler: Callable[[Event], object]) -> Callable[[Event], object]:
    """Wrap the C-STORE handler: count each request by the status it was answered with, and its bytes."""

    def counted(event: Event):
        answer = handler(event)
        status = answer if isinstance(answer, int) else answer.Status
        INSTANCES_RECEIVED.labels(status=f"0x{status:04X}").inc()
        BYTES_RECEIVED.inc(len(event.request.DataSet.getvalue()))
        return answer

    return counted


def count_accepted(_event: Event) -> None:
    ASSOCIATIONS_ACCEPTED.inc()


def count_rejected(event: Event) -> None:
    """On connection close: a rejected association (by our peer policy or by pynetdicom's checks) counts once."""
    if event.assoc.is_rejected:
        answer = event.assoc.acceptor.primitive
        reason = REJECTION_REASONS.get((answer.result_source, answer.diagnostic), "other")
        ASSOCIATIONS_REJECTED.labels(reason=reason).inc()


class NodeCollector:
    """Reads the node's database figures at scrape time; a database that cannot be read is `riha_node_database_up 0`."""

    def __init__(self, config: Config, db: Database, store: InstanceStore):
        self.config, self.db, self.store = config, db, store

    def collect(self) -> Iterator[Metric]:
        try:
            with self.db.read() as session:
                figures = node_status(session, self.config, self.store)
        except SQLAlchemyError as exc:
            log.warning("metrics: database not readable", error=type(driver_error(exc)).__name__)
            yield _gauge("riha_node_database_up", "1 when the database answered this scrape", 0)
            return
        yield _gauge("riha_node_database_up", "1 when the database answered this scrape", 1)
        yield _labelled("riha_node_studies", "Studies by state", "state", figures["studies"])
        yield _gauge("riha_node_instances_stored", "Instances held in storage", figures["instances"])
        yield _gauge("riha_node_stored_bytes", "Bytes of the instances held in storage", figures["stored_bytes"])
        yield _labelled("riha_node_jobs", "Report jobs by state (queue depth: queued)", "state", figures["queue"])
        stages = HistogramMetricFamily("riha_node_stage_seconds", "Seconds studies spent in each stage",
                                       labels=["stage"])
        for stage, histogram in figures["stages"].items():
            buckets = [(bound, count) for bound, count in histogram["buckets"].items()]
            stages.add_metric([stage], buckets + [("+Inf", histogram["count"])], histogram["sum_s"])
        yield stages
        exports = figures["exports"]
        yield _labelled("riha_node_exports", "Draft deliveries by state", "state", exports["by_state"])
        yield _gauge("riha_node_export_attempts", "Delivery attempts recorded on the deliveries (reset by a retry)",
                     exports["attempts"])
        yield _gauge("riha_node_export_failed_attempts", "Delivery attempts that failed", exports["failed_attempts"])
        workers = figures["workers"]
        yield _gauge("riha_node_workers_holding_leases", "Workers holding a live lease on a job",
                     len(workers["holding_leases"]))
        yield _gauge("riha_node_stale_leases", "Running jobs whose worker stopped renewing its lease",
                     workers["stale_leases"])
        model = figures["model"]
        info = GaugeMetricFamily("riha_node_model_info", "The model: configured checkpoint, registry's active "
                                 "version, version of the last draft",
                                 labels=["checkpoint", "active_version", "last_report_version"])
        info.add_metric([model["checkpoint"] or "", model["active_version"] or "", model["last_report_version"] or ""],
                        1)
        yield info
        disk = figures["disk"]
        yield _gauge("riha_node_disk_used_bytes", "Bytes used on the file system holding storage_dir",
                     disk["used_bytes"])
        yield _gauge("riha_node_disk_free_bytes", "Bytes free on the file system holding storage_dir",
                     disk["free_bytes"])
        yield _gauge("riha_node_disk_used_percent", "Share of that file system in use", disk["used_percent"])
        yield _gauge("riha_node_disk_watermark_percent", "Above this share new instances are refused",
                     disk["watermark_percent"])


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _labelled(name: str, documentation: str, label: str, values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def node_registry(config: Config, db: Database, store: InstanceStore, active_associations: Callable[[], int],
                  worker_processes: Callable[[], int]) -> CollectorRegistry:
    """The registry `serve` exposes: its traffic counters, its own process figures, and the database's."""
    registry = CollectorRegistry()
    for metric in TRAFFIC:
        registry.register(metric)
    Gauge("riha_node_active_associations", "Associations open now", registry=registry).set_function(
        active_associations)
    Gauge("riha_node_worker_processes", "Worker processes serve runs and that are alive", registry=registry
          ).set_function(worker_processes)
    registry.register(NodeCollector(config, db, store))
    return registry


def traffic_from_exposition(text: str) -> dict:
    """The traffic counters out of a /metrics page, shaped as `riha-node status` shows them."""
    traffic = {"instances_received": {}, "received_bytes": 0, "associations_accepted": 0,
               "associations_rejected": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "riha_node_instances_received_total":
                traffic["instances_received"][sample.labels["status"]] = int(sample.value)
            elif sample.name == "riha_node_received_bytes_total":
                traffic["received_bytes"] = int(sample.value)
            elif sample.name == "riha_node_associations_accepted_total":
                traffic["associations_accepted"] = int(sample.value)
            elif sample.name == "riha_node_associations_rejected_total":
                traffic["associations_rejected"][sample.labels["reason"]] = int(sample.value)
    return traffic
