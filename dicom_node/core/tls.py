"""TLS contexts for DICOM associations: TLS 1.2 at least (PS3.15 B.9).

:func:`server_context` is what the node's listener uses, :func:`client_context` what every
association we open uses (results to a destination, C-ECHO).  Certificates that cannot be
loaded are a :class:`~dicom_node.core.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import ssl

from dicom_node.core.errors import ConfigError
from dicom_node.core.settings import TLSSettings


def server_context(tls: TLSSettings, field: str = "node.tls") -> ssl.SSLContext:
    """A server-side context; client certificates are required or verified per ``tls``.

    The listener does the handshake itself, with a deadline (:mod:`dicom_node.scp.guard`).
    """
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError(f"{field} needs cert_file and key_file", [(field, "no certificate")])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{field}: cannot load certificates: {err}", [(field, str(err))]) from err
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(tls: TLSSettings, field: str = "destinations.tls") -> ssl.SSLContext:
    """A client context that verifies the peer (``ca_file``, else the system CAs) and presents
    ``cert_file``/``key_file`` when given."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"{field}: cannot load certificates: {err}", [(field, str(err))]) from err
    return context
