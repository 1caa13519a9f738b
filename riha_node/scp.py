"""The DICOM service provider's mechanics: application entity, presentation contexts, TLS, server life cycle.

Policy (who may connect, what a C-STORE does) is in riha_node.handlers; this module wires it to pynetdicom.
"""
from __future__ import annotations

import time

from pydicom.pixels import get_decoder
from pydicom.uid import AllTransferSyntaxes, UncompressedTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from riha_node.config import Config
from riha_node.db import Database
from riha_node.handlers import (StoreHandler, handle_association_request, handle_connection_open, handle_echo)
from riha_node.log import get_logger
from riha_node.metrics import count_accepted, count_rejected, count_store
from riha_node.storage import InstanceStore
from riha_node.tls import server_context

log = get_logger(__name__)


def decodable_transfer_syntaxes() -> list[str]:
    """Every transfer syntax whose pixel data pydicom (with the installed plugins) can decode, uncompressed first."""
    usable = []
    for uid in AllTransferSyntaxes:
        try:
            if get_decoder(uid).is_available:
                usable.append(str(uid))
        except NotImplementedError:
            continue
    return sorted(usable, key=lambda uid: (uid not in UncompressedTransferSyntaxes, uid))


def build_ae(config: Config) -> AE:
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_associations = config.node.max_associations
    ae.maximum_pdu_size = config.node.max_pdu_size
    ae.acse_timeout = config.node.acse_timeout_s
    ae.dimse_timeout = config.node.dimse_timeout_s
    ae.network_timeout = config.node.network_timeout_s
    ae.require_called_aet = True
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification, [uid for uid in syntaxes if uid in UncompressedTransferSyntaxes])
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    return ae


class StorageServer:
    """The listening SCP; `stop` refuses new associations, lets those in flight finish, then aborts stragglers."""

    def __init__(self, config: Config, db: Database, store: InstanceStore):
        self.config = config
        self.db, self.store = db, store
        self.ae = build_ae(config)
        handler = StoreHandler(db=db, store=store, rules=config.study, secret=store.node_secret())
        self.handlers = [
            (evt.EVT_CONN_OPEN, handle_connection_open),
            (evt.EVT_REQUESTED, handle_association_request,
             [config.peers, store, config.study.disk_watermark_percent]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, count_store(handler)),
            (evt.EVT_ACCEPTED, count_accepted),
            (evt.EVT_CONN_CLOSE, count_rejected),
        ]
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        address = (self.config.node.host, self.config.node.port)
        self.server = self.ae.start_server(address, block=False, evt_handlers=self.handlers,
                                           ssl_context=server_context(self.config.tls))
        log.info("listening", ae_title=self.config.node.ae_title, host=address[0], port=self.server.server_address[1],
                 tls=self.config.tls.enabled)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def active_associations(self) -> int:
        return len(self.server.active_associations) if self.server else 0

    def stop(self, grace_s: float) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()  # no new associations from here on
        in_flight = [assoc for assoc in server.active_associations if assoc.is_established]
        for assoc in server.active_associations:
            if not assoc.is_established:  # connected but never negotiated: nothing to finish
                assoc.kill()
        deadline = time.monotonic() + grace_s
        while any(assoc.is_alive() for assoc in in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in in_flight:
            if assoc.is_alive():
                log.warning("association aborted at shutdown", peer_ae=assoc.requestor.ae_title)
                assoc.abort()
        log.info("stopped listening", in_flight=len(in_flight))
