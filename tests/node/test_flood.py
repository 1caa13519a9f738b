"""Association floods and slow peers against an in-process SCP with small timeouts.

Peers that connect and say nothing, stop halfway through a PDU, or crowd past `max_associations` must not keep
legitimate peers out for longer than the configured timeouts, and every thread and socket they held must be freed.
(Plain rejection beyond the limit, with established associations, is in test_scp_behaviour.py.)
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pydicom
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from riha_node.scp import StorageServer
from tests.node.peers import in_process_scp
from tests.node.samples import real_file

LIMIT = 3
ACSE_TIMEOUT_S, NETWORK_TIMEOUT_S = 1.0, 2.0
MARGIN_S = 2.0  # scheduling slack on a busy two-core machine


def running_scp(folder: Path, extra_toml: str = "", acse_timeout_s: float = ACSE_TIMEOUT_S):
    """An in-process SCP with this module's association limit and small timeouts."""
    return in_process_scp(folder, node_toml=f"max_associations = {LIMIT}\nacse_timeout_s = {acse_timeout_s}\n"
                                            f"network_timeout_s = {NETWORK_TIMEOUT_S}\ndimse_timeout_s = 5\n",
                          extra_toml=extra_toml)


def association_request(calling_ae: str = "TESTSCU", called_ae: str = "RIHA") -> bytes:
    """The bytes of a valid A-ASSOCIATE-RQ for Verification, to send (or half send) by hand."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling_ae, called_ae
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum_length = MaximumLengthNotification()
    maximum_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def legitimate_echo(port: int) -> str:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="RIHA")
    if not assoc.is_established:
        return "rejected" if assoc.is_rejected else "no association"
    status = assoc.send_c_echo().Status
    assoc.release()
    return "echoed" if status == 0 else f"status {status:#06x}"


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the node closes this connection (EOF or reset) within the time given."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):  # an A-ASSOCIATE-AC or A-ABORT may come first
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def acceptor_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("AcceptorThread"))


def wait_until_free(server: StorageServer, within_s: float) -> float:
    started = time.monotonic()
    while server.active_associations() or acceptor_threads():
        assert time.monotonic() - started < within_s, \
            f"{server.active_associations()} associations still held after {within_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_silent_connections_beyond_the_limit_are_dropped_after_the_acse_timeout(tmp_path):
    acse_timeout_s = 2 * MARGIN_S  # counting them and the refused echo must both happen before it, on a busy machine
    with running_scp(tmp_path, acse_timeout_s=acse_timeout_s) as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2 * LIMIT)]
        try:
            started = time.monotonic()
            while server.active_associations() < 2 * LIMIT and time.monotonic() - started < MARGIN_S:
                time.sleep(0.05)
            assert server.active_associations() == 2 * LIMIT
            assert legitimate_echo(server.port) == "rejected", "silent peers hold slots until the ACSE timeout"
            assert all(closed_by_peer(sock, acse_timeout_s + MARGIN_S) for sock in silent)
            wait_until_free(server, MARGIN_S)
            assert legitimate_echo(server.port) == "echoed"
        finally:
            for sock in silent:
                sock.close()


def test_a_flood_of_real_associations_gets_answers_and_leaves_nothing_held(tmp_path):
    """Twelve peers at once against a limit of three: each is accepted or rejected at once, none hangs."""
    with running_scp(tmp_path) as server:
        outcomes: list[str] = []
        held, most_held, lock = [0], [0], threading.Lock()
        barrier = threading.Barrier(4 * LIMIT)

        def peer():
            barrier.wait()
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = 5
            assoc = ae.associate("127.0.0.1", server.port, ae_title="RIHA")
            if assoc.is_established:
                with lock:
                    held[0] += 1
                    most_held[0] = max(most_held[0], held[0])
                time.sleep(1.0)  # hold the slot while the others arrive
                outcomes.append("echoed" if assoc.send_c_echo().Status == 0 else "failed")
                with lock:
                    held[0] -= 1
                assoc.release()
            else:
                outcomes.append("rejected" if assoc.is_rejected else "no answer")

        peers = [threading.Thread(target=peer) for _ in range(4 * LIMIT)]
        for thread in peers:
            thread.start()
        for thread in peers:
            thread.join(timeout=30)
        assert len(outcomes) == 4 * LIMIT and set(outcomes) <= {"echoed", "rejected"}, outcomes
        assert outcomes.count("echoed") and outcomes.count("rejected"), outcomes
        assert most_held[0] <= LIMIT, f"{most_held[0]} associations at once with max_associations = {LIMIT}"
        wait_until_free(server, MARGIN_S)
        assert legitimate_echo(server.port) == "echoed"


def test_peers_that_stop_mid_pdu_are_aborted_after_the_network_timeout(tmp_path):
    with running_scp(tmp_path) as server:
        request = association_request()
        mid_request = socket.create_connection(("127.0.0.1", server.port))
        mid_request.sendall(request[:20])  # the A-ASSOCIATE-RQ header promises more than ever comes
        mid_data = socket.create_connection(("127.0.0.1", server.port))
        mid_data.sendall(request)
        assert mid_data.recv(1)[0] == 0x02  # A-ASSOCIATE-AC: the association is up
        mid_data.sendall(b"\x04\x00" + struct.pack(">I", 1000) + b"\x00" * 10)  # P-DATA-TF cut short
        try:
            time.sleep(0.3)
            # Meanwhile a legitimate peer stores: two slots are held, the third is free.
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(ComputedRadiographyImageStorage)
            assoc = ae.associate("127.0.0.1", server.port, ae_title="RIHA")
            assert assoc.is_established
            assert assoc.send_c_store(pydicom.dcmread(real_file("RG1_UNCR.dcm"))).Status == 0x0000
            assoc.release()
            assert closed_by_peer(mid_request, NETWORK_TIMEOUT_S + MARGIN_S), "a stalled A-ASSOCIATE-RQ is held"
            assert closed_by_peer(mid_data, NETWORK_TIMEOUT_S + MARGIN_S), "a stalled P-DATA-TF is held"
            wait_until_free(server, MARGIN_S)
            assert legitimate_echo(server.port) == "echoed"
        finally:
            mid_request.close()
            mid_data.close()
