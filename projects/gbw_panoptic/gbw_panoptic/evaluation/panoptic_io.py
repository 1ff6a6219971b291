"""Reading and writing COCO panoptic PNGs and result files.

A COCO panoptic PNG stores one segment id per pixel as an RGB colour, ``id = R + 256 G + 256² B``;
id 0 is VOID (unlabelled). Every write here is atomic: the data goes to a temporary file in the
destination folder, which then replaces the destination with :func:`os.replace`.
"""
import json
import os
import tempfile
from typing import Any, Callable, Union

import cv2
import numpy as np

__all__ = [
    "PanopticFormatError",
    "rgb_to_id",
    "id_to_rgb",
    "read_panoptic_png",
    "write_png",
    "write_panoptic_png",
    "atomic_write",
    "write_json",
]

PathLike = Union[str, os.PathLike]

# The process umask (read once: os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Segment ids (uint32, HxW) stored in the 8-bit RGB(A) panoptic PNG ``path``.

    Raises FileNotFoundError for a missing file and :class:`PanopticFormatError` for a file that
    cannot be decoded or is not 8-bit RGB / RGBA (alpha is ignored, as panopticapi does).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG {path} does not exist")
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise PanopticFormatError(f"cannot decode panoptic PNG {path} (corrupt or not an image)")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise PanopticFormatError(
            f"panoptic PNG {path} must be 8-bit RGB or RGBA, got dtype {image.dtype} with shape "
            f"{image.shape}"
        )
    # OpenCV decodes to BGR(A); reorder to RGBA and read each pixel as one little-endian uint32
    # R + G<<8 + B<<16 + A<<24, then drop the alpha byte.
    code = cv2.COLOR_BGR2RGBA if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
    rgba = np.ascontiguousarray(cv2.cvtColor(image, code))
    ids = rgba.view(np.uint32).reshape(rgba.shape[:2])
    if not np.little_endian:
        return rgb_to_id(rgba[..., :3])
    np.bitwise_and(ids, 0x00FFFFFF, out=ids)
    return ids


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp_path)
        # mkstemp creates the file readable by its owner only; give it the usual permissions.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def write_png(path: PathLike, rgb: np.ndarray) -> None:
    """Write an RGB image (uint8, HxWx3) as a PNG, atomically."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])

    def _write(tmp_path: str) -> None:
        if not cv2.imwrite(tmp_path, bgr):
            raise OSError(f"cannot write PNG {tmp_path}")

    atomic_write(path, _write)


def write_panoptic_png(path: PathLike, ids: np.ndarray) -> None:
    """Write segment ids (integer, HxW) as an RGB panoptic PNG, atomically."""
    write_png(path, id_to_rgb(ids))


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically. NaN and infinities are written as null."""

    def _clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: _clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [_clean(item) for item in value]
        if isinstance(value, np.generic):
            return _clean(value.item())
        return value

    def _write(tmp_path: str) -> None:
        with open(tmp_path, "w") as f:
            json.dump(_clean(obj), f, indent=2)

    atomic_write(path, _write)
