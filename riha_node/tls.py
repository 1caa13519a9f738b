"""DICOM TLS contexts (PS3.15 B.1-style): the node's certificate and key, peers verified against the site's CA."""
from __future__ import annotations

import ssl

from riha_node.config import TlsConfig
from riha_node.errors import UserError


def server_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """For the SCP: present our certificate; require (or request) a client certificate signed by the CA."""
    if not tls.enabled:
        return None
    context = _context(ssl.Purpose.CLIENT_AUTH, tls, _HandshakeInAssociationThread)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


def client_context(tls: TlsConfig, server_hostname_check: bool = False) -> ssl.SSLContext:
    """For our SCU side (echo, export): verify the peer against the CA and present our certificate."""
    context = _context(ssl.Purpose.SERVER_AUTH, tls)
    context.check_hostname = server_hostname_check
    return context


class _HandshakeInAssociationThread(ssl.SSLContext):
    """pynetdicom wraps each accepted socket in its one accepting thread; with the handshake done there, a peer that
    connects and sends nothing would stop the node from accepting anyone. Wrapped without it, the handshake happens
    in the connection's own thread (riha_node.handlers.handle_connection_open), bounded by the ACSE timeout."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def _context(purpose: ssl.Purpose, tls: TlsConfig, kind: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """As ssl.create_default_context(purpose, cafile=...) builds it, of the given class."""
    try:
        context = kind(ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        if tls.ca_certificates:
            context.load_verify_locations(cafile=tls.ca_certificates)
        else:
            context.load_default_certs(purpose)
        if tls.certificate and tls.private_key:
            context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"Cannot load the TLS files in [tls] ({exc}); check certificate, private_key and "
                        "ca_certificates.") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
