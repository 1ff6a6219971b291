"""Reading and writing COCO panoptic PNGs and result files.

A COCO panoptic PNG stores one segment id per pixel as an RGB colour, ``id = R + 256 G + 256² B``;
id 0 is VOID (unlabelled). Every write here is atomic (:mod:`gbw_panoptic.utils.io`).

PNGs are decoded by OpenCV (libpng); any PNG it reads that is 8-bit RGB or RGBA once decoded is
accepted (palette and interlaced files included), with the alpha channel ignored as panopticapi
does.
"""
import os
from typing import Union

import cv2
import numpy as np

from ..utils.io import atomic_path

__all__ = [
    "PanopticFormatError",
    "rgb_to_id",
    "id_to_rgb",
    "read_panoptic_png",
    "write_png",
    "write_panoptic_png",
]

PathLike = Union[str, os.PathLike]


class PanopticFormatError(ValueError):
    """A panoptic PNG or JSON entry that does not follow the COCO panoptic format."""


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids (uint32, HxW) of an RGB image (uint8, HxWx3, R first)."""
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """RGB image (uint8, HxWx3) that encodes segment ids (integer, HxW, each < 256³)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise PanopticFormatError(
            f"segment ids must lie in [0, {256**3 - 1}] to be stored as RGB, got range "
            f"[{ids.min()}, {ids.max()}]"
        )
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def _ids_of_rgba(rgba: np.ndarray) -> np.ndarray:
    """Segment ids (uint32, HxW) of an RGBA image (uint8, HxWx4, R first), which it overwrites."""
    rgba = np.ascontiguousarray(rgba)
    if not np.little_endian:
        return rgb_to_id(rgba[..., :3])
    # Each pixel read as one little-endian uint32 R + G<<8 + B<<16 + A<<24; alpha dropped.
    ids = rgba.view(np.uint32).reshape(rgba.shape[:2])
    np.bitwise_and(ids, 0x00FFFFFF, out=ids)
    return ids


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Segment ids (uint32, HxW) stored in the 8-bit RGB(A) panoptic PNG ``path`` (decoded by OpenCV).

    Raises FileNotFoundError for a missing file and :class:`PanopticFormatError` for a file that
    cannot be decoded or is not 8-bit RGB / RGBA (alpha is ignored, as panopticapi does).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # e.g. a header beyond OpenCV's pixel limit
        image = None
    if image is None:
        raise PanopticFormatError(f"cannot decode panoptic PNG {path} (corrupt or not an image)")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise PanopticFormatError(
            f"panoptic PNG {path} must be 8-bit RGB or RGBA, got dtype {image.dtype} with shape "
            f"{image.shape}"
        )
    # OpenCV decodes to BGR(A).
    code = cv2.COLOR_BGR2RGBA if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
    return _ids_of_rgba(cv2.cvtColor(image, code))


def write_png(path: PathLike, rgb: np.ndarray) -> None:
    """Write an RGB image (uint8, HxWx3) as a PNG, atomically."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])

    with atomic_path(path) as tmp_path:
        if not cv2.imwrite(tmp_path, bgr):
            raise OSError(f"cannot write PNG {path}")


def write_panoptic_png(path: PathLike, ids: np.ndarray) -> None:
    """Write segment ids (integer, HxW) as an RGB panoptic PNG, atomically."""
    write_png(path, id_to_rgb(ids))
