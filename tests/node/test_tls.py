"""DICOM TLS both ways, with certificates made for the test: modalities storing into the node, the node exporting.

A running node refuses a C-ECHO without a trusted certificate, a trusted modality stores, a silent TLS peer cannot
stall the listener, and the exporter delivers to a TLS PACS or refuses it.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from riha_node.config import DestinationConfig, TlsConfig, load_config
from riha_node.export import send_file
from riha_node.tls import client_context
from tests.node.peers import NodeProcess, StorescpProcess
from tests.node.samples import real_file
from tests.node.test_flood import MARGIN_S, closed_by_peer, running_scp

pytestmark = pytest.mark.peer


def make_pki(folder: Path) -> dict[str, Path]:
    """A site CA, a node certificate and a modality certificate signed by it, and an untrusted self-signed one."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=riha test site CA")
    for name in ("node", "modality"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt", "-days", "2",
        "-subj", "/CN=rogue")
    return {name: folder / name for name in ("ca.crt", "node.crt", "node.key", "modality.crt", "modality.key",
                                             "rogue.crt", "rogue.key")}


def test_tls_with_client_certificates(tmp_path):
    pki = make_pki(tmp_path / "pki")
    node = NodeProcess(tmp_path / "node", extra_toml=(
        f'[tls]\nenabled = true\ncertificate = "{pki["node.crt"]}"\nprivate_key = "{pki["node.key"]}"\n'
        f'ca_certificates = "{pki["ca.crt"]}"\n')).start()
    try:
        def echo_with(cert: str | None) -> bool:
            tls = load_config(node.config_path, environ={}).tls.model_copy(update={
                "certificate": pki[f"{cert}.crt"] if cert else None,
                "private_key": pki[f"{cert}.key"] if cert else None})
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.network_timeout = 5
            assoc = ae.associate("127.0.0.1", node.port, ae_title="RIHA", tls_args=(client_context(tls), None))
            if not assoc.is_established:
                return False
            ok = assoc.send_c_echo().Status == 0
            assoc.release()
            return ok

        assert echo_with("modality")
        assert not echo_with("rogue"), "a certificate the site CA did not sign must be refused"
        assert not echo_with(None), "a client without a certificate must be refused"
        plain = AE(ae_title="TESTSCU")
        plain.add_requested_context(Verification)
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", node.port, ae_title="RIHA").is_established
    finally:
        assert node.stop() == 0


def store_over_tls(port: int, tls: TlsConfig) -> int | str:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5  # a stalled listener fails, never hangs
    assoc = ae.associate("127.0.0.1", port, ae_title="RIHA", tls_args=(client_context(tls), None))
    if not assoc.is_established:
        return "refused"
    status = assoc.send_c_store(pydicom.dcmread(real_file("RG1_UNCR.dcm"))).Status
    assoc.release()
    return status


def test_a_trusted_modality_stores_over_tls_while_untrusted_and_silent_peers_are_refused(tmp_path):
    pki = make_pki(tmp_path / "pki")
    tls_toml = (f'[tls]\nenabled = true\ncertificate = "{pki["node.crt"]}"\nprivate_key = "{pki["node.key"]}"\n'
                f'ca_certificates = "{pki["ca.crt"]}"\n')
    acse_timeout_s = 2 * MARGIN_S  # a stalled listener would hold the modality this long; a busy machine, less
    with running_scp(tmp_path / "node", extra_toml=tls_toml, acse_timeout_s=acse_timeout_s) as server:
        site = TlsConfig(ca_certificates=pki["ca.crt"])
        rogue = site.model_copy(update={"certificate": pki["rogue.crt"], "private_key": pki["rogue.key"]})
        modality = site.model_copy(update={"certificate": pki["modality.crt"], "private_key": pki["modality.key"]})
        silent = socket.create_connection(("127.0.0.1", server.port))  # connects, never says hello
        try:
            started = time.monotonic()
            assert store_over_tls(server.port, modality) == 0x0000, "the trusted modality must be able to store"
            assert time.monotonic() - started < acse_timeout_s, "a silent TLS peer stalled the listener"
            assert store_over_tls(server.port, rogue) == "refused", "a certificate the site CA did not sign"
            assert store_over_tls(server.port, site) == "refused", "no client certificate at all"
            assert closed_by_peer(silent, acse_timeout_s + MARGIN_S), "the silent TLS peer is never dropped"
        finally:
            silent.close()
        stored = list((server.config.node.storage_dir / "studies").rglob("*.dcm"))
        assert len(stored) == 1


@pytest.mark.parametrize("node_trusts", ["site CA", "another CA"])
def test_the_exporter_delivers_to_a_tls_pacs_only_when_it_trusts_it(tmp_path, node_trusts):
    pki = make_pki(tmp_path / "pki")
    pacs = StorescpProcess(tmp_path / "pacs", aet="PACS", options=(
        "+tls", str(pki["modality.key"]), str(pki["modality.crt"]), "+cf", str(pki["ca.crt"]))).start()
    ca = pki["ca.crt"] if node_trusts == "site CA" else pki["rogue.crt"]
    (tmp_path / "riha-node.toml").write_text(
        f'[node]\nacse_timeout_s = 5\n[tls]\ncertificate = "{pki["node.crt"]}"\nprivate_key = "{pki["node.key"]}"\n'
        f'ca_certificates = "{ca}"\n[[pacs]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\ntls = true\n')
    config = load_config(tmp_path / "riha-node.toml", environ={})
    destination: DestinationConfig = config.destination("PACS")
    try:
        outcome = send_file(real_file("RG1_UNCR.dcm"), destination, config)
    finally:
        pacs.stop()
    if node_trusts == "site CA":
        assert outcome is None, outcome
        (received,) = pacs.received()
        assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(real_file("RG1_UNCR.dcm")).SOPInstanceUID
    else:
        assert outcome == "no association (peer down or unreachable)"
        assert pacs.received() == []
