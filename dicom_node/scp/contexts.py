"""What the node's Storage SCP (PS3.4 Annex B) and Verification SCP (PS3.4 Annex A) accept.

Presentation contexts (PS3.8 7.1.1.13): CR and both DX Image Storage SOP Classes plus the
configured ``node.extra_sop_classes``, in the transfer syntaxes below, and Verification.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import PresentationContext, build_context

from dicom_node.core.settings import NodeSettings

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
"""Verification SOP Class (PS3.4 A.4)."""

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
"""CR Image Storage and both DX Image Storage SOP Classes (PS3.4 B.5)."""

# Explicit VR Big Endian is retired (PS3.5 A.3) and not accepted: every sender must also
# offer Implicit VR Little Endian, the DICOM default (PS3.5 10.1), so nothing is lost.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGExtended12Bit,
    JPEGBaseline8Bit,
)
"""Transfer syntaxes accepted for storage; Deflate is added when ``node.accept_deflate``."""

VERIFICATION_TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

MAX_PDU_SIZE = 1 << 20
"""Largest P-DATA PDU we accept (PS3.8 D.3.3.2.1); larger PDUs mean fewer per image."""


def transfer_syntaxes(node: NodeSettings) -> list[str]:
    """The storage transfer syntaxes for these settings, preferred first."""
    syntaxes = list(TRANSFER_SYNTAXES)
    if node.accept_deflate:
        syntaxes.insert(2, DeflatedExplicitVRLittleEndian)
    return syntaxes


def build_contexts(node: NodeSettings) -> list[PresentationContext]:
    """Storage contexts (CR, DX and ``node.extra_sop_classes``) plus Verification."""
    syntaxes = transfer_syntaxes(node)
    sop_classes = dict.fromkeys([*STORAGE_SOP_CLASSES, *node.extra_sop_classes])
    contexts = [build_context(uid, syntaxes) for uid in sop_classes]
    contexts.append(build_context(VERIFICATION_SOP_CLASS, list(VERIFICATION_TRANSFER_SYNTAXES)))
    return contexts
