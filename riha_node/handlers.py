"""DICOM event handlers: who may associate, C-ECHO, and C-STORE with its durability contract.

C-STORE answers 0x0000 only after the data set is in its final file (fsynced, renamed, folder fsynced) and its row
is committed. Every other outcome has a named status (riha_node.statuses) and leaves nothing half-written. The
association machinery (contexts, TLS, server life cycle) lives in riha_node.scp.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from sqlalchemy.exc import DBAPIError, IntegrityError

from riha_node.config import PeerConfig, StudyConfig
from riha_node.dataset_check import DamagedDataSet, read_received
from riha_node.db import Database
from riha_node.ingest import InvalidInstance, ReceivedInstance, already_stored, ignored_reason, record_instance
from riha_node.log import get_logger
from riha_node.statuses import EchoStatus, StoreStatus
from riha_node.storage import InstanceStore, sha256_of

log = get_logger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)


def peer_ae(event: Event) -> str:
    return event.assoc.requestor.ae_title


def peer_allowed(peers: list[PeerConfig], calling_ae: str, address: str) -> bool:
    """Allowed when some configured peer has this AE title and either no host or this host."""
    return any(p.ae_title == calling_ae and (p.host is None or _same_host(p.host, address)) for p in peers)


def _same_host(configured: str, address: str) -> bool:
    if configured == address:
        return True
    try:
        return address in {info[4][0] for info in socket.getaddrinfo(configured, None)}
    except OSError:
        return False


def handle_association_request(event: Event, peers: list[PeerConfig]) -> None:
    """Reject unknown calling AE titles (or known ones from the wrong host) before any negotiation."""
    request = event.assoc.requestor.primitive
    calling_ae = request.calling_ae_title.strip()
    address = event.assoc.requestor.address
    if not peer_allowed(peers, calling_ae, address):
        log.warning("association rejected", peer_ae=calling_ae, peer_address=address,
                    reason="calling AE title not allowed from this host")
        event.assoc.acse.send_reject(*REJECT_CALLING_AE_NOT_RECOGNISED)
        event.assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the A-ASSOCIATE-RJ first


def handle_connection_open(event: Event) -> None:
    """Nagle's algorithm stalls each small DIMSE response by tens of milliseconds; turn it off."""
    sock = event.assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_echo(event: Event) -> int:
    log.info("echo", peer_ae=peer_ae(event))
    return EchoStatus.SUCCESS


def _status(code: StoreStatus, comment: str) -> Dataset:
    answer = Dataset()
    answer.Status = int(code)
    answer.ErrorComment = comment[:64]
    return answer


@dataclass
class StoreHandler:
    """The C-STORE service: validate, write durably, record, answer."""

    db: Database
    store: InstanceStore
    rules: StudyConfig
    secret: bytes

    def __call__(self, event: Event) -> Dataset | int:
        calling_ae = peer_ae(event)
        request = event.request
        stream = request.DataSet.getvalue()
        try:
            dataset = read_received(stream, event.context.transfer_syntax)
            instance = ReceivedInstance.from_dataset(dataset, str(event.context.transfer_syntax))
        except DamagedDataSet as exc:
            log.warning("instance refused", peer_ae=calling_ae, reason=str(exc), size_bytes=len(stream))
            return _status(StoreStatus.CANNOT_UNDERSTAND, "Data set cannot be parsed")
        except InvalidInstance as exc:
            log.warning("instance refused", peer_ae=calling_ae, reason=str(exc))
            return _status(StoreStatus.INVALID_UID, str(exc))
        if instance.sop_class_uid != request.AffectedSOPClassUID:
            log.warning("instance refused", peer_ae=calling_ae, sop_instance_uid=instance.sop_instance_uid,
                        reason="SOP Class UID differs from the request")
            return _status(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request")
        if instance.sop_instance_uid != request.AffectedSOPInstanceUID:
            log.warning("instance refused", peer_ae=calling_ae, sop_instance_uid=instance.sop_instance_uid,
                        reason="SOP Instance UID differs from the request")
            return _status(StoreStatus.INVALID_UID, "SOP Instance UID differs from the request")
        ids = {"peer_ae": calling_ae, "study_uid": instance.study_uid, "sop_instance_uid": instance.sop_instance_uid}
        try:
            with self.db.read() as session:
                duplicate = already_stored(session, instance.sop_instance_uid)
        except DBAPIError as exc:
            log.error("database unavailable", **ids, error=type(exc.orig).__name__)
            return _status(StoreStatus.OUT_OF_RESOURCES, "Database unavailable, retry later")
        if duplicate:
            log.info("instance already stored", **ids)
            return StoreStatus.SUCCESS
        chunks = [PREAMBLE, encode_file_meta(event.file_meta), stream]
        size = sum(len(chunk) for chunk in chunks)
        if self.store.over_watermark(self.rules.disk_watermark_percent, size):
            log.warning("instance refused", **ids, reason="disk over the watermark")
            return _status(StoreStatus.OUT_OF_RESOURCES, "Disk over the watermark, retry later")
        rel_path = self.store.relative_path(instance.study_uid, instance.series_uid, instance.sop_instance_uid)
        try:
            self.store.write_durably(rel_path, chunks)
        except OSError as exc:
            log.error("instance not written", **ids, error=exc.strerror or type(exc).__name__)
            return _status(StoreStatus.OUT_OF_RESOURCES, "Cannot write to storage, retry later")
        reason = ignored_reason(instance, self.rules)
        digest = sha256_of([stream])
        try:
            study_id, study_state = self._record(instance, reason, rel_path, size, digest, calling_ae)
        except IntegrityError:
            log.info("instance already stored", **ids, note="a concurrent association stored it first")
            return StoreStatus.SUCCESS
        except DBAPIError as exc:
            self.store.remove(rel_path)
            log.error("database unavailable", **ids, error=type(exc.orig).__name__)
            return _status(StoreStatus.OUT_OF_RESOURCES, "Database unavailable, retry later")
        log.info("instance stored", **ids, study_id=study_id, study_state=study_state, size_bytes=size,
                 transfer_syntax=instance.transfer_syntax_uid, ignored_reason=reason)
        return StoreStatus.SUCCESS

    def _record(self, instance: ReceivedInstance, reason: str | None, rel_path: str, size: int, digest: str,
                calling_ae: str) -> tuple[int, str]:
        """Commit the row; a unique-key race on a new study (PostgreSQL) is retried once, on the instance is final."""
        for attempt in (1, 2):
            try:
                with self.db.session() as session:
                    study = record_instance(session, instance, reason=reason, rel_path=rel_path, size_bytes=size,
                                            dataset_sha256=digest, calling_ae=calling_ae, secret=self.secret)
                    return study.id, study.state
            except IntegrityError:
                with self.db.read() as session:
                    if attempt == 2 or already_stored(session, instance.sop_instance_uid):
                        raise
        raise AssertionError("unreachable")
