"""What an attacker on the network sends, built by hand: raw sockets from chosen loopback
addresses, hand-made PDUs, Part 10 files with crafted bodies, deflate bombs."""

from __future__ import annotations

import socket
import ssl
import time
import zlib
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from tests.support.dicom_data import CR_IMAGE_STORAGE, EXPLICIT_LE

LOOPBACK = "127.0.0.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1


def connect(
    port: int,
    source: str = LOOPBACK,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> socket.socket:
    """A TCP connection to the node from ``source`` (any 127.0.0.0/8 address), optionally TLS."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout, source_address=(source, 0))
    if tls is not None:
        return tls.wrap_socket(sock, server_hostname="localhost")
    return sock


def seconds_until_closed(sock: socket.socket, timeout: float) -> float | None:
    """How long until the peer closes ``sock`` (None if it is still open after ``timeout``)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None


def send_until_refused(sock: socket.socket, total: int, chunk: int = 65536) -> int:
    """Send zeros until ``total`` bytes are out or the peer closes; return how many went out."""
    sent = 0
    block = b"\0" * chunk
    try:
        while sent < total:
            sock.sendall(block)
            sent += chunk
    except OSError:
        pass
    return sent


def associate_rq(calling: str, called: str, sop_class: str = CR_IMAGE_STORAGE) -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing one storage context."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.calling_presentation_address = AddressInformation(LOOPBACK, 0)
    primitive.called_presentation_address = AddressInformation(LOOPBACK, 11112)
    context = build_context(sop_class, [EXPLICIT_LE])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def write_part10(path: Path, meta: FileMetaDataset, body: bytes) -> Path:
    """A DICOM file with ``meta`` and the data set bytes ``body`` as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)  # type: ignore[arg-type]
        handle.write(body)
    return path


def _explicit_le(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def deflate_bomb(path: Path, inflated_bytes: int) -> Path:
    """A CR instance in Deflated Explicit VR Little Endian whose data set inflates to about
    ``inflated_bytes`` (zeros in a private OB element); the file is a few hundred KB."""
    uid = generate_uid()
    head = Dataset()
    head.SOPClassUID = CR_IMAGE_STORAGE
    head.SOPInstanceUID = uid
    head.StudyInstanceUID = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [packer.compress(_explicit_le(head))]
    # (0009,1010) OB, explicit VR: tag, "OB", 2 reserved bytes, 4-byte length.
    body.append(packer.compress(b"\x09\x00\x10\x10OB\0\0" + inflated_bytes.to_bytes(4, "little")))
    zeros = b"\0" * (1 << 20)
    for _ in range(inflated_bytes >> 20):
        body.append(packer.compress(zeros))
    body.append(packer.compress(b"\0" * (inflated_bytes & ((1 << 20) - 1))))
    body.append(packer.flush())
    return write_part10(path, meta, b"".join(body))


def with_private_element(source: Path, target: Path, size: int, vr: str = "UN") -> Dataset:
    """A copy of ``source`` with fresh UIDs and a private element of ``size`` bytes before
    Pixel Data."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.add_new(0x00091010, vr, b"\0" * size)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return ds
