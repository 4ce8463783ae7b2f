"""DICOM audit messages (PS3.15 A.5, the RFC 3881 schema as DICOM profiles it): the events of
the node, the worker and the admin tools, written as one line of XML each.

Which event is which message (``docs/conformance-statement.md``, section 7):

=====================================  ===============================  =======================
event                                  EventID                          EventTypeCode
=====================================  ===============================  =======================
node started / stopped                 110100 Application Activity      110120 / 110121
association accepted / ended           110114 User Authentication       110122 Login / 110123
association rejected                   110114 User Authentication (4)   110122 Login
instances of a study stored            110104 DICOM Instances Transf.   (action C, receiver)
results sent to a destination          110104 DICOM Instances Transf.   (action C, sender)
an instance fetched by a worker        110104 DICOM Instances Transf.   (action C, sender)
fetch ticket refused                   110114 User Authentication       110122 Login
caller added or removed                110113 Security Alert            110129 Security Config.
destination added or removed           110113 Security Alert            110128 Network Config.
admin user added or removed            110113 Security Alert            110137 User Sec. Attr.
console login / logout / API refusal   110114 User Authentication       110122 / 110123
=====================================  ===============================  =======================

EventOutcomeIndicator: 0 success, 4 minor failure (e.g. a refused login), 8 serious failure.
"""

from __future__ import annotations

import base64
import datetime
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from xml.etree import ElementTree as ET


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName`` and ``originalText`` of PS3.15 A.5.1."""

    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


APPLICATION_ACTIVITY: Final = _dcm("110100", "Application Activity")
INSTANCES_TRANSFERRED: Final = _dcm("110104", "DICOM Instances Transferred")
SECURITY_ALERT: Final = _dcm("110113", "Security Alert")
USER_AUTHENTICATION: Final = _dcm("110114", "User Authentication")

APPLICATION_START: Final = _dcm("110120", "Application Start")
APPLICATION_STOP: Final = _dcm("110121", "Application Stop")
LOGIN: Final = _dcm("110122", "Login")
LOGOUT: Final = _dcm("110123", "Logout")
NETWORK_CONFIGURATION: Final = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION: Final = _dcm("110129", "Security Configuration")
USER_SECURITY_ATTRIBUTES_CHANGED: Final = _dcm("110137", "User Security Attributes Changed")

APPLICATION: Final = _dcm("110150", "Application")
APPLICATION_LAUNCHER: Final = _dcm("110151", "Application Launcher")
DESTINATION: Final = _dcm("110152", "Destination Role ID")
SOURCE: Final = _dcm("110153", "Source Role ID")

STUDY_INSTANCE_UID: Final = _dcm("110180", "Study Instance UID")
PATIENT_NUMBER: Final = Code("2", "RFC-3881", "Patient Number")
URI: Final = Code("12", "RFC-3881", "URI")
APPLICATION_SERVER: Final = Code("4", "RFC-3881", "Application Server")

SUCCESS: Final = 0
MINOR_FAILURE: Final = 4
SERIOUS_FAILURE: Final = 8

#: ParticipantObjectTypeCode and ParticipantObjectTypeCodeRole (RFC 3881 5.5).
PERSON, SYSTEM_OBJECT = 1, 2
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = 1, 3, 13

#: NetworkAccessPointTypeCode (RFC 3881 5.3): 1 machine name, 2 IP address.
MACHINE_NAME, IP_ADDRESS = "1", "2"


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, an application or a remote AE."""

    user_id: str
    requestor: bool
    role: Code | None = None
    network_access_point: str | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study, a patient, or a configuration resource."""

    object_id: str
    type_code: int
    role: int
    id_type: Code
    description: str | None = None
    details: Mapping[str, str] = field(default_factory=dict)
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    """SOP Class UID -> number of instances (for a study)."""


@dataclass(frozen=True)
class AuditEvent:
    """One audit message, before it is given its source and written."""

    event_id: Code
    action: str
    outcome: int
    types: tuple[Code, ...] = ()
    participants: tuple[Participant, ...] = ()
    objects: tuple[ParticipantObject, ...] = ()
    outcome_description: str | None = None
    at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC).astimezone()
    )


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who writes the message."""

    source_id: str
    enterprise_site_id: str | None = None


def _network_type(address: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    except OSError:
        return MACHINE_NAME
    return IP_ADDRESS


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def to_xml(event: AuditEvent, source: AuditSource) -> str:
    """The message as one line of XML (no declaration), in the order of the schema."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": event.at.isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    _code(ident, "EventID", event.event_id)
    for type_code in event.types:
        _code(ident, "EventTypeCode", type_code)
    if event.outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.outcome_description
    for participant in event.participants:
        _participant(root, participant)
    audit_source = {"AuditSourceID": source.source_id}
    if source.enterprise_site_id:
        audit_source["AuditEnterpriseSiteID"] = source.enterprise_site_id
    source_element = ET.SubElement(root, "AuditSourceIdentification", audit_source)
    _code(source_element, "AuditSourceTypeCode", APPLICATION_SERVER)
    for obj in event.objects:
        _object(root, obj)
    return ET.tostring(root, encoding="unicode")


def _participant(root: ET.Element, participant: Participant) -> None:
    attributes = {
        "UserID": participant.user_id,
        "UserIsRequestor": "true" if participant.requestor else "false",
    }
    if participant.alternative_user_id:
        attributes["AlternativeUserID"] = participant.alternative_user_id
    if participant.user_name:
        attributes["UserName"] = participant.user_name
    if participant.network_access_point:
        attributes["NetworkAccessPointID"] = participant.network_access_point
        attributes["NetworkAccessPointTypeCode"] = _network_type(participant.network_access_point)
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    if participant.role is not None:
        _code(element, "RoleIDCode", participant.role)


def _object(root: ET.Element, obj: ParticipantObject) -> None:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": obj.object_id,
            "ParticipantObjectTypeCode": str(obj.type_code),
            "ParticipantObjectTypeCodeRole": str(obj.role),
        },
    )
    _code(element, "ParticipantObjectIDTypeCode", obj.id_type)
    for name, value in obj.details.items():
        encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")  # xs:base64Binary
        ET.SubElement(element, "ParticipantObjectDetail", {"type": name, "value": encoded})
    if obj.description:
        ET.SubElement(element, "ParticipantObjectDescription").text = obj.description
    for uid, count in obj.sop_classes.items():
        ET.SubElement(element, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})


# --------------------------------------------------------------------------- the events


def application_activity(
    start: bool, application: str, user: str, address: str | None = None
) -> AuditEvent:
    """The node started or stopped (launched by ``user``)."""
    return AuditEvent(
        APPLICATION_ACTIVITY,
        "E",
        SUCCESS,
        (APPLICATION_START if start else APPLICATION_STOP,),
        (
            Participant(application, False, APPLICATION, address),
            Participant(user, True, APPLICATION_LAUNCHER),
        ),
    )


def authentication(
    user: str,
    address: str | None,
    node: str,
    *,
    logout: bool = False,
    outcome: int = SUCCESS,
    why: str | None = None,
) -> AuditEvent:
    """A calling AE associated, or an admin logged in (``logout``: the end of either)."""
    return AuditEvent(
        USER_AUTHENTICATION,
        "E",
        outcome,
        (LOGOUT if logout else LOGIN,),
        (Participant(user, True, None, address), Participant(node, False, APPLICATION)),
        outcome_description=why,
    )


def instances_transferred(
    source: Participant,
    destination: Participant,
    study_uid: str,
    patient_id: str | None,
    sop_classes: Mapping[str, int],
    *,
    outcome: int = SUCCESS,
    why: str | None = None,
) -> AuditEvent:
    """Instances of one study went from ``source`` to ``destination`` (PS3.15 A.5.3.4)."""
    objects = [
        ParticipantObject(
            study_uid, SYSTEM_OBJECT, ROLE_REPORT, STUDY_INSTANCE_UID, sop_classes=sop_classes
        )
    ]
    objects.append(ParticipantObject(patient_id or "UNKNOWN", PERSON, ROLE_PATIENT, PATIENT_NUMBER))
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        "C",
        outcome,
        (),
        (source, destination),
        tuple(objects),
        outcome_description=why,
    )


def configuration_change(
    kind: Code,
    user: str,
    address: str | None,
    resource: str,
    change: str,
    *,
    outcome: int = SUCCESS,
) -> AuditEvent:
    """An admin changed the configuration (``kind``: one of the configuration type codes);
    ``resource`` names what changed, ``change`` says how."""
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        outcome,
        (kind,),
        (Participant(user, True, None, address),),
        (
            ParticipantObject(
                resource,
                SYSTEM_OBJECT,
                ROLE_SECURITY_RESOURCE,
                URI,
                details={"Alert Description": change},
            ),
        ),
    )


__all__ = [
    "AuditEvent",
    "AuditSource",
    "Code",
    "Participant",
    "ParticipantObject",
    "application_activity",
    "authentication",
    "configuration_change",
    "instances_transferred",
    "to_xml",
]
