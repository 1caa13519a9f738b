"""DICOM TLS contexts (PS3.15 B.1-style): the node's certificate and key, peers verified against the site's CA."""
from __future__ import annotations

import ssl

from riha_node.config import TlsConfig
from riha_node.errors import UserError


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """For the SCP: present our certificate; require (or request) a client certificate signed by the CA."""
    if not tls.enabled:
        return None
    context = _context(ssl.Purpose.CLIENT_AUTH, tls)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsConfig, server_hostname_check: bool = False) -> ssl.SSLContext:
    """For our SCU side (echo, export): verify the peer against the CA and present our certificate."""
    context = _context(ssl.Purpose.SERVER_AUTH, tls)
    context.check_hostname = server_hostname_check
    return context


def _context(purpose: ssl.Purpose, tls: TlsConfig) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(purpose, cafile=tls.ca_certificates)
        if tls.certificate and tls.private_key:
            context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"Cannot load the TLS files in [tls] ({exc}); check certificate, private_key and "
                        "ca_certificates.") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
