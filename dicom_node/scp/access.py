"""Who may associate with the node: the called AE title, the calling AE title and its host.

Every A-ASSOCIATE-RQ is checked against the *current* settings, so a reload changes the allowed
callers for new associations without dropping open ones.  A refusal is an A-ASSOCIATE-RJ with
the result, source and reason of PS3.8 9.3.4.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from dicom_node.core import statuses
from dicom_node.core.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source and reason."""

    result: int
    source: int
    reason: int
    why: str
    label: str = "other"
    """Short reason for metrics: called_ae, calling_ae, caller_host, limit, internal."""


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as err:
        logger.warning("cannot resolve caller host %s: %s", host, err)
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}


def _normalise(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_association(
    settings: Settings, calling_ae: str, called_ae: str, peer_address: str
) -> Rejection | None:
    """Decide on an association request from the current settings; None means accept."""
    if called_ae.strip() != settings.node.ae_title:
        return Rejection(
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            statuses.REASON_CALLED_AE_NOT_RECOGNISED,
            f"called AE title {called_ae.strip()!r} is not ours",
            "called_ae",
        )
    caller = settings.caller(calling_ae)
    if caller is None:
        return Rejection(
            statuses.REJECTED_PERMANENT,
            statuses.SOURCE_SERVICE_USER,
            statuses.REASON_CALLING_AE_NOT_RECOGNISED,
            f"calling AE title {calling_ae.strip()!r} is not an allowed caller",
            "calling_ae",
        )
    if caller.host is not None:
        peer = _normalise(peer_address)
        if peer is None or peer not in _addresses(caller.host):
            return Rejection(
                statuses.REJECTED_PERMANENT,
                statuses.SOURCE_SERVICE_USER,
                statuses.REASON_CALLING_AE_NOT_RECOGNISED,
                f"caller {caller.ae_title!r} is allowed from {caller.host}, not {peer_address}",
                "caller_host",
            )
    return None
