"""DICOM event handlers: who may associate, C-ECHO, and C-STORE with its durability contract.

C-STORE answers 0x0000 only after the data set is in its final file (fsynced, renamed, folder fsynced) and its row
is committed. Every other outcome has a named status (riha_node.statuses) and leaves nothing half-written. The
association machinery (contexts, TLS, server life cycle) lives in riha_node.scp.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from sqlalchemy.exc import DBAPIError, IntegrityError

from riha_node.config import PeerConfig, StudyConfig
from riha_node.dataset_check import DamagedDataSet, read_received
from riha_node.db import Database
from riha_node.ground_truth import SignedText, already_recorded, signed_report_in
from riha_node.ingest import InvalidInstance, ReceivedInstance, already_stored, ignored_reason, record_instance
from riha_node.log import get_logger
from riha_node.quality import update_quality
from riha_node.statuses import EchoStatus, StoreStatus
from riha_node.storage import InstanceStore, sha256_of

log = get_logger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
REJECT_TRANSIENT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient: the peer retries later


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


def handle_association_request(event: Event, peers: list[PeerConfig], store: InstanceStore,
                               watermark_percent: float) -> None:
    """Reject unknown calling AE titles (or known ones from the wrong host) before any negotiation, and pause new
    associations while the disk is over the watermark (a transient rejection: PACS keeps the study and retries)."""
    request = event.assoc.requestor.primitive
    calling_ae = request.calling_ae_title.strip()
    address = event.assoc.requestor.address
    if not peer_allowed(peers, calling_ae, address):
        _reject(event, REJECT_CALLING_AE_NOT_RECOGNISED, calling_ae, address,
                "calling AE title not allowed from this host")
    elif store.over_watermark(watermark_percent):
        _reject(event, REJECT_TRANSIENT_LOCAL_LIMIT, calling_ae, address, "disk over the watermark")


def _reject(event: Event, answer: tuple[int, int, int], calling_ae: str, address: str, reason: str) -> None:
    log.warning("association rejected", peer_ae=calling_ae, peer_address=address, reason=reason)
    event.assoc.acse.send_reject(*answer)
    event.assoc.kill()  # as pynetdicom does after its own rejections: lets the DUL send the A-ASSOCIATE-RJ first


def handle_connection_open(event: Event) -> None:
    """Turn off Nagle's algorithm (it stalls each small DIMSE response by tens of milliseconds), finish the TLS
    handshake within the ACSE timeout, and bound every later read by the network timeout.

    Runs in the connection's own thread. pynetdicom reads a PDU with blocking recv calls once its first bytes
    arrived, so without a socket timeout a peer that stops mid-PDU would hold its thread and association slot
    forever; with one the read fails and the association is aborted.
    """
    sock = event.assoc.dul.socket.socket
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if isinstance(sock, ssl.SSLSocket):  # riha_node.tls defers the handshake to here
        sock.settimeout(event.assoc.acse_timeout)
        try:
            sock.do_handshake()
        except OSError as exc:  # ssl.SSLError included: untrusted or missing certificate, not TLS, silence
            log.warning("TLS handshake refused", peer_address=event.assoc.requestor.address,
                        reason=getattr(exc, "reason", None) or type(exc).__name__)
            event.assoc.dul.socket.close()  # the association ends when its ACSE timer runs out
            return
    sock.settimeout(event.assoc.network_timeout)


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
        except Exception as exc:  # a header value the node reads does not decode in its VR (pydicom converts lazily)
            log.warning("instance refused", peer_ae=calling_ae, size_bytes=len(stream),
                        reason=f"a header value cannot be decoded ({type(exc).__name__})")  # the text may hold PHI
            return _status(StoreStatus.CANNOT_UNDERSTAND, "Data set cannot be parsed")
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
        signed = signed_report_in(self.store.path(rel_path), instance.sop_class_uid)
        digest = sha256_of([stream])
        try:
            study_id, study_state = self._record(instance, reason, rel_path, size, digest, calling_ae, signed)
        except IntegrityError:
            log.info("instance already stored", **ids, note="a concurrent association stored it first")
            return StoreStatus.SUCCESS
        except DBAPIError as exc:
            self.store.remove(rel_path)
            log.error("database unavailable", **ids, error=type(exc.orig).__name__)
            return _status(StoreStatus.OUT_OF_RESOURCES, "Database unavailable, retry later")
        if study_id is None:
            log.info("signed report for a study not held", **ids, note="matched by accession number, else kept "
                     "aside until the study arrives (riha-node quality counts those)")
        else:
            log.info("instance stored", **ids, study_id=study_id, study_state=study_state, size_bytes=size,
                     transfer_syntax=instance.transfer_syntax_uid, ignored_reason=reason,
                     signed_report=signed is not None)
        if signed is not None:
            self._score_against_draft(instance.sop_instance_uid)
        return StoreStatus.SUCCESS

    def _score_against_draft(self, sop_instance_uid: str) -> None:
        """A signed SR just stored: if it became a study's ground truth (its own study, or one matched by accession
        number), record now how far it moved from the draft the radiologist saw (a few milliseconds). A failure
        costs only the score, which `riha-node quality` computes later."""
        study_id = None
        try:
            with self.db.read() as session:
                recorded = already_recorded(session, sop_instance_uid)
                study_id = recorded.study_id if recorded is not None else None
            if study_id is not None:
                update_quality(self.db, [study_id])
        except Exception as exc:
            log.warning("quality not scored", study_id=study_id, error=type(exc).__name__)

    def _record(self, instance: ReceivedInstance, reason: str | None, rel_path: str, size: int, digest: str,
                calling_ae: str, signed: SignedText | None) -> tuple[int | None, str | None]:
        """Commit the row; a unique-key race on a new study (PostgreSQL) is retried once, on the instance is final."""
        for attempt in (1, 2):
            try:
                with self.db.session() as session:
                    study = record_instance(session, instance, reason=reason, rel_path=rel_path, size_bytes=size,
                                            dataset_sha256=digest, calling_ae=calling_ae, secret=self.secret,
                                            signed=signed)
                    return (study.id, study.state) if study else (None, None)
            except IntegrityError:
                with self.db.read() as session:
                    if attempt == 2 or already_stored(session, instance.sop_instance_uid):
                        raise
        raise AssertionError("unreachable")
