"""Where in the source image the SR anchors its findings: one point in image pixel coordinates.

Each probability of the SR is inferred from an image region, a SCOORD POINT on the source image
(PS3.3 C.18.6).  CoroNet classifies the whole image, so the point is the centre of the image;
where the model looked is what the heatmap SC shows.  The centre is also where viewers have
the most room for the labels they draw beside the point: OHIF 3.13 puts them right of it.

Coordinates follow PS3.3 C.18.6.1.2: (column, row), with (0, 0) the top left corner of the top
left pixel, so the centre of that pixel is (0.5, 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.core.errors import ResultError

__all__ = ["ImagePoint", "image_centre"]


@dataclass(frozen=True)
class ImagePoint:
    """A point of an image, in SCOORD pixel coordinates."""

    column: float
    row: float


def image_centre(rows: int, columns: int) -> ImagePoint:
    """The centre of an image of ``rows`` x ``columns`` pixels."""
    if rows < 1 or columns < 1:
        raise ResultError(f"image size must be positive, got {rows}x{columns}")
    return ImagePoint(column=columns / 2.0, row=rows / 2.0)
