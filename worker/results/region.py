"""Where in the source image the SR anchors its findings: one point in image pixel coordinates.

The SR's probabilities are each inferred from an image region, a SCOORD POINT on the source
image (PS3.3 C.18.6): the peak of the attribution map when there is one, else the centre of the
image.  Viewers draw the findings there, so the point must lie inside the image.

Coordinates follow PS3.3 C.18.6.1.2: (column, row), with (0, 0) the top left corner of the top
left pixel, so the centre of that pixel is (0.5, 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dicom_node.core.errors import ResultError

__all__ = ["ImagePoint", "attribution_peak", "image_centre"]


@dataclass(frozen=True)
class ImagePoint:
    """A point of an image of ``rows`` x ``columns`` pixels, in SCOORD pixel coordinates."""

    column: float
    row: float

    def inside(self, rows: int, columns: int) -> bool:
        """Whether the point lies within an image of ``rows`` x ``columns`` pixels."""
        return 0.0 <= self.column <= columns and 0.0 <= self.row <= rows


def _check_size(rows: int, columns: int) -> None:
    if rows < 1 or columns < 1:
        raise ResultError(f"image size must be positive, got {rows}x{columns}")


def image_centre(rows: int, columns: int) -> ImagePoint:
    """The centre of an image of ``rows`` x ``columns`` pixels."""
    _check_size(rows, columns)
    return ImagePoint(column=columns / 2.0, row=rows / 2.0)


def attribution_peak(heatmap: NDArray[np.floating], rows: int, columns: int) -> ImagePoint:
    """The centre of the most salient cell of ``heatmap``, in the pixels of a source image of
    ``rows`` x ``columns``.

    The heatmap covers the whole source image at any resolution (as the SC renders it).  An
    upsampled mask has plateaus: among the cells at the maximum, the one nearest their centroid
    (the first in row order on a tie) is taken, so the point lies in the middle of a plateau and
    is deterministic.  A map without any salient cell (all values equal) gives the image centre.
    """
    _check_size(rows, columns)
    if not isinstance(heatmap, np.ndarray) or heatmap.ndim != 2 or min(heatmap.shape) < 1:
        raise ResultError("heatmap must be a non-empty 2-D array")
    if not np.isfinite(heatmap).all():
        raise ResultError("heatmap contains NaN or infinite values")
    if float(heatmap.max()) == float(heatmap.min()):
        return image_centre(rows, columns)
    height, width = heatmap.shape
    peak_rows, peak_columns = np.nonzero(heatmap == heatmap.max())
    distance = (peak_rows - peak_rows.mean()) ** 2 + (peak_columns - peak_columns.mean()) ** 2
    nearest = int(np.argmin(distance))
    cell_row, cell_column = int(peak_rows[nearest]), int(peak_columns[nearest])
    return ImagePoint(
        column=(cell_column + 0.5) * columns / width,
        row=(cell_row + 0.5) * rows / height,
    )
