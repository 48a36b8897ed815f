"""Siemens mosaics: the slices of an fMRI / diffusion volume tiled into one 2D image.

Siemens scanners store an EPI volume as one single-frame image whose ImageType holds ``MOSAIC``: the slices
are tiles of a square grid of ``ceil(sqrt(n))`` tiles per side, filled row by row in slice order, the rest of
the grid empty. Written as one image, a mosaic teaches a pretraining model a grid of small brains and black
squares; each tile is a slice of its own. The number of slices is in the private element
NumberOfImagesInMosaic (0019,100A), or in the CSA image header (read with nibabel).
"""

from __future__ import annotations

import math

import numpy as np
import pydicom
from nibabel.nicom import csareader

from data_curation.readers import RejectError

_N_IMAGES_IN_MOSAIC = (0x0019, 0x100A)


def _count_element(ds: pydicom.Dataset) -> int | None:
    element = ds.get(_N_IMAGES_IN_MOSAIC)
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):  # an unknown private element read as UN: little-endian US
        return int.from_bytes(value[:2], "little") if len(value) >= 2 else None
    return int(value) if value not in (None, "") else None


def is_mosaic(ds: pydicom.Dataset) -> bool:
    """Whether ImageType marks ``ds`` as a Siemens mosaic."""
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def mosaic_count(ds: pydicom.Dataset) -> int | None:
    """The number of slices of a Siemens mosaic; None when ``ds`` is no mosaic. A mosaic that does not say how
    many slices it holds is rejected: its tiles cannot be told from the empty rest of the grid."""
    if not is_mosaic(ds):
        return None
    count = _count_element(ds)
    if not count:
        try:
            csa = csareader.get_csa_header(ds, "image")
            count = csareader.get_n_mosaic(csa) if csa else None
        except Exception:  # noqa: BLE001 - a broken CSA header is the same as none
            count = None
    if not count or count < 1:
        raise RejectError("Siemens mosaic without its number of slices (NumberOfImagesInMosaic in (0019,100A) "
                          "or the CSA image header)")
    return int(count)


def mosaic_tiles(image: np.ndarray, count: int) -> np.ndarray:
    """``(count, rows, cols)``: the slices of a decoded mosaic, in slice order."""
    if image.ndim != 2:
        raise RejectError(f"Siemens mosaic that is not one grayscale image (shape {image.shape})")
    side = math.ceil(math.sqrt(count))
    rows, cols = image.shape
    if rows % side or cols % side:
        raise RejectError(f"Siemens mosaic of {count} slices: {rows}x{cols} pixels do not split into {side}x{side} "
                          f"equal tiles")
    tile_rows, tile_cols = rows // side, cols // side
    grid = image.reshape(side, tile_rows, side, tile_cols).transpose(0, 2, 1, 3).reshape(-1, tile_rows, tile_cols)
    return grid[:count]
