"""The worker's Storage SCU: status classification and real associations on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node.core import statuses
from dicom_node.core.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from dicom_node.core.settings import Destination, Timeouts, TLSSettings
from tests.support.certificates import Certificate, make_certificate
from tests.support.dicom_tools import dciodvfy
from tests.support.ports import free_port
from tests.support.results import phantom_source, results_for
from tests.support.scp import running_scp
from worker.delivery import Disposition, classify_status, describe_status, send_files

TIMEOUTS = Timeouts(acse=10, dimse=10, network=10)
CALLING = "CORONET"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (statuses.SUCCESS, Disposition.DELIVERED),
        (statuses.WARNING_COERCION_OF_DATA_ELEMENTS, Disposition.DELIVERED),
        (statuses.WARNING_ELEMENTS_DISCARDED, Disposition.DELIVERED),
        (statuses.WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS, Disposition.DELIVERED),
        (statuses.DUPLICATE_SOP_INSTANCE, Disposition.DELIVERED),
        (statuses.OUT_OF_RESOURCES, Disposition.TRANSIENT),
        (0xA7FF, Disposition.TRANSIENT),
        (statuses.RESOURCE_LIMITATION, Disposition.TRANSIENT),
        (statuses.PROCESSING_FAILURE, Disposition.TRANSIENT),
        (statuses.DUPLICATE_INVOCATION, Disposition.TRANSIENT),
        (statuses.CANCEL, Disposition.TRANSIENT),
        (None, Disposition.TRANSIENT),
        (statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, Disposition.PERMANENT),
        (0xA9FF, Disposition.PERMANENT),
        (statuses.CANNOT_UNDERSTAND, Disposition.PERMANENT),
        (statuses.DATA_UNDECODABLE, Disposition.PERMANENT),
        (statuses.SOP_CLASS_NOT_SUPPORTED, Disposition.PERMANENT),
        (statuses.NOT_AUTHORIZED, Disposition.PERMANENT),
        (statuses.INVALID_SOP_INSTANCE, Disposition.PERMANENT),
        (0x1234, Disposition.PERMANENT),  # unknown: do not loop on it
    ],
)
def test_every_c_store_answer_means_delivered_retry_or_refused(
    status: int | None, expected: Disposition
) -> None:
    assert classify_status(status) is expected


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (0xA701, "0xA701 (Refused: Out of resources)"),
        (0xA9FE, "0xA9FE (Error: Data Set does not match SOP Class)"),
        (0xC123, "0xC123 (Error: Cannot understand)"),
        (0xB000, "0xB000 (Warning: Coercion of Data Elements)"),
        (None, "no response"),
    ],
)
def test_describe_status_names_ranges(status: int | None, text: str) -> None:
    assert describe_status(status) == text


@pytest.fixture(scope="module")
def result_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A real heatmap SC and SR of a phantom chest CR, as files (SC first)."""
    folder = tmp_path_factory.mktemp("results")
    source = phantom_source(folder / "source.dcm")
    paths = []
    for index, ds in enumerate(results_for(source)):
        path = folder / f"result{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _destination(port: int, **extra: object) -> Destination:
    return Destination.model_validate(
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port, **extra}
    )


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([], [Disposition.DELIVERED, Disposition.DELIVERED]),
        ([statuses.WARNING_COERCION_OF_DATA_ELEMENTS], [Disposition.DELIVERED] * 2),
        ([statuses.OUT_OF_RESOURCES], [Disposition.TRANSIENT, Disposition.DELIVERED]),
        ([statuses.SUCCESS, 0xA900], [Disposition.DELIVERED, Disposition.PERMANENT]),
        ([statuses.CANNOT_UNDERSTAND, 0xA701], [Disposition.PERMANENT, Disposition.TRANSIENT]),
    ],
)
def test_each_answer_is_classified(
    result_files: list[Path], answers: list[int], expected: list[Disposition]
) -> None:
    with running_scp(statuses=list(answers)) as scp:
        outcomes = send_files(
            _destination(scp.port), result_files, calling_ae=CALLING, timeouts=TIMEOUTS
        )
    assert [o.disposition for o in outcomes] == expected
    assert [o.path for o in outcomes] == result_files
    delivered = [o for o in outcomes if o.disposition is Disposition.DELIVERED]
    assert len(scp.stored()) == len(delivered)
    assert all(r.calling_ae == CALLING for r in scp.stored())


def test_sends_both_result_classes(result_files: list[Path]) -> None:
    with running_scp() as scp:
        send_files(_destination(scp.port), result_files, calling_ae=CALLING, timeouts=TIMEOUTS)
    assert [r.sop_class_uid for r in scp.stored()] == [
        SecondaryCaptureImageStorage,
        Comprehensive3DSRStorage,
    ]


@pytest.mark.parametrize(
    ("reject", "error"),
    [
        ((statuses.REJECTED_TRANSIENT, 1, 1), TransientDeliveryError),
        ((statuses.REJECTED_PERMANENT, 1, statuses.REASON_CALLING_AE_NOT_RECOGNISED), None),
    ],
)
def test_a_rejected_association_is_transient_or_permanent_as_the_peer_says(
    result_files: list[Path], reject: tuple[int, int, int], error: type[Exception] | None
) -> None:
    with running_scp(reject=reject) as scp, pytest.raises(DeliveryError) as caught:
        send_files(_destination(scp.port), result_files, calling_ae=CALLING, timeouts=TIMEOUTS)
    assert isinstance(caught.value, error or PermanentDeliveryError), caught.value
    assert "PS3.8" in str(caught.value)


def test_connection_refused_is_transient(result_files: list[Path]) -> None:
    with pytest.raises(TransientDeliveryError) as caught:
        send_files(_destination(free_port()), result_files, calling_ae=CALLING, timeouts=TIMEOUTS)
    assert not isinstance(caught.value, PermanentDeliveryError)


@pytest.mark.parametrize(
    ("contexts", "expected"),
    [
        ([SecondaryCaptureImageStorage], [Disposition.DELIVERED, Disposition.PERMANENT]),
        (["1.2.840.10008.5.1.4.1.1.2"], None),  # CT only: nothing of ours
    ],
)
def test_destination_without_our_sop_classes(
    result_files: list[Path], contexts: list[str], expected: list[Disposition] | None
) -> None:
    with running_scp(contexts=contexts) as scp:
        destination = _destination(scp.port)
        if expected is None:
            with pytest.raises(PermanentDeliveryError, match="accepts none"):
                send_files(destination, result_files, calling_ae=CALLING, timeouts=TIMEOUTS)
            return
        outcomes = send_files(destination, result_files, calling_ae=CALLING, timeouts=TIMEOUTS)
    assert [o.disposition for o in outcomes] == expected
    assert outcomes[1].status == statuses.SOP_CLASS_NOT_SUPPORTED


def test_unreadable_result_is_a_delivery_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom")
    with running_scp() as scp, pytest.raises(TransientDeliveryError, match="cannot read"):
        send_files(_destination(scp.port), [bad], calling_ae=CALLING, timeouts=TIMEOUTS)


# --------------------------------------------------------------------------- TLS


def _server_context(cert: Path, key: Path, require_client: bool) -> object:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if require_client:
        context.load_verify_locations(cafile=cert)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.mark.parametrize(
    ("server_tls", "client_tls", "delivered"),
    [
        ("tls", "trusting", True),
        ("tls+client-cert", "with-cert", True),
        ("tls+client-cert", "trusting", False),
        ("tls", "untrusting", False),  # the server's certificate is not verified: refuse
        ("tls", None, False),
        (None, "trusting", False),
    ],
)
def test_results_go_over_tls_only_to_a_destination_we_can_verify(
    result_files: list[Path],
    certificate: Certificate,
    tmp_path: Path,
    server_tls: str | None,
    client_tls: str | None,
    delivered: bool,
) -> None:
    cert, key = certificate.cert, certificate.key
    context = None
    if server_tls is not None:
        context = _server_context(cert, key, require_client=server_tls.endswith("client-cert"))
    other_ca = make_certificate(tmp_path, "other").cert
    tls = {
        None: None,
        "trusting": TLSSettings(ca_file=cert),
        "with-cert": TLSSettings(ca_file=cert, cert_file=cert, key_file=key),
        "untrusting": TLSSettings(ca_file=other_ca),
    }[client_tls]
    with running_scp(ssl_context=context) as scp:
        destination = Destination(
            name="pacs", ae_title="PACS", host="127.0.0.1", port=scp.port, tls=tls
        )
        if delivered:
            outcomes = send_files(
                destination, result_files[:1], calling_ae=CALLING, timeouts=TIMEOUTS
            )
            assert [o.disposition for o in outcomes] == [Disposition.DELIVERED]
        else:
            with pytest.raises(DeliveryError):
                send_files(destination, result_files[:1], calling_ae=CALLING, timeouts=TIMEOUTS)
    assert len(scp.stored()) == int(delivered)


def test_results_are_valid_dicom(result_files: list[Path]) -> None:
    """What the tests send are real, valid result objects (dciodvfy, 0 errors)."""
    for path in result_files:
        report = dciodvfy(path)
        assert not report.errors, report
