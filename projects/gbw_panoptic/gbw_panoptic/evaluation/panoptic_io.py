"""Reading and writing COCO panoptic PNGs and result files.

A COCO panoptic PNG stores one segment id per pixel as an RGB colour, ``id = R + 256 G + 256² B``;
id 0 is VOID (unlabelled). Every write here is atomic (:mod:`gbw_panoptic.utils.io`).

Reading is exact (the ids OpenCV and Pillow decode, bit for bit) and fast: a non-interlaced 8-bit
RGB(A) PNG (what OpenCV, libpng and Pillow write, with any row filters) is inflated by libdeflate
and turned into runs of equal ids straight from its filtered bytes by the C extension
``_png_runs``, without rebuilding the pixels; anything else (interlaced, palette, grey, 16-bit,
corrupt files) goes to OpenCV.
"""
import os
import struct
import zlib
from typing import List, NamedTuple, Optional, Tuple, Union

import cv2
import deflate
import numpy as np

from ..utils.io import atomic_path

try:
    from . import _png_runs
except ImportError as error:  # a source tree that was never installed
    raise ImportError(
        "the C extension gbw_panoptic.evaluation._png_runs is not built: run `pip install -e .` in "
        "the repository root (needs a C compiler and the Python headers)"
    ) from error

__all__ = [
    "PanopticFormatError",
    "PanopticRuns",
    "first_of_runs",
    "rgb_to_id",
    "id_to_rgb",
    "read_panoptic_png",
    "read_panoptic_runs",
    "write_png",
    "write_panoptic_png",
]

PathLike = Union[str, os.PathLike]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types of 8-bit truecolour PNGs.
_RGB8, _RGBA8 = 2, 6


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


def first_of_runs(values: np.ndarray) -> np.ndarray:
    """bool (N,): True where an entry of the 1-D ``values`` starts a run of equal values (the
    first entry, and every entry that differs from the one before it)."""
    first = np.empty(len(values), dtype=bool)
    first[:1] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    return first


class PanopticRuns(NamedTuple):
    """A segment id map (HxW) as runs of equal ids along its pixels in row-major order.

    Panoptic maps are piecewise constant: a 1024x2048 map has some 10^4 runs for 2·10^6 pixels.
    """

    shape: Tuple[int, int]
    """(H, W) of the map."""
    starts: np.ndarray
    """int64 (N,): flat index ``y * W + x`` of the first pixel of each run; 0 first, increasing."""
    ids: np.ndarray
    """uint32 (N,): segment id of each run; neighbouring runs have different ids."""

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> "PanopticRuns":
        """The runs of an id map (uint32, HxW)."""
        flat = ids.ravel()
        starts = np.flatnonzero(first_of_runs(flat))
        return cls((int(ids.shape[0]), int(ids.shape[1])), starts, flat[starts])

    def lengths(self) -> np.ndarray:
        """Pixels of each run (int64, N)."""
        return np.diff(self.starts, append=self.shape[0] * self.shape[1])

    def to_ids(self) -> np.ndarray:
        """The id map (uint32, HxW)."""
        return np.repeat(self.ids, self.lengths()).reshape(self.shape)


class _PngImage(NamedTuple):
    """The header fields and the concatenated IDAT data (a zlib stream) of a PNG file."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int
    idat: bytes

    @property
    def channels(self) -> int:
        """Bytes per pixel of an 8-bit RGB (3) or RGBA (4) image."""
        return 3 if self.color_type == _RGB8 else 4


def _parse_png(data: bytes) -> Optional[_PngImage]:
    """The header and image data of a well-formed PNG, None for anything else.

    Well-formed: the PNG signature, IHDR first, one run of IDAT chunks, IEND, a correct CRC on every
    chunk up to IEND and no critical chunk other than IHDR, PLTE, IDAT and IEND.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    view = memoryview(data)
    header: Optional[Tuple[int, ...]] = None
    idat: List[memoryview] = []
    idat_closed = False
    position = len(_PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        end = position + 12 + length
        if end > len(data):
            return None
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[position + 4 : end - 4]) != crc:
            return None
        body = view[position + 8 : end - 4]
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            header = struct.unpack(">IIBBBBB", body)
            width, height, _bit_depth, _color_type, compression, filter_method, _interlace = header
            if width == 0 or height == 0 or compression != 0 or filter_method != 0:
                return None
        elif kind == b"IDAT":
            if idat_closed:
                return None
            idat.append(body)
        elif kind == b"IEND":
            if not idat:
                return None
            width, height, bit_depth, color_type, _, _, interlace = header
            return _PngImage(width, height, bit_depth, color_type, interlace, b"".join(idat))
        else:
            idat_closed = bool(idat)
            if kind[0] & 0x20 == 0 and kind != b"PLTE":  # unknown critical chunk
                return None
        position = end
    return None  # truncated before IEND


def _inflate_rows(png: _PngImage) -> Optional[bytes]:
    """The filtered scanlines (H x (1 + C·W) bytes, filter type byte first) of an 8-bit,
    non-interlaced RGB(A) PNG, or None when its zlib stream is broken (bad data or Adler-32, or not
    exactly H scanlines)."""
    size = png.height * (1 + png.channels * png.width)
    if size > 1032 * len(png.idat) + 64:  # beyond deflate's largest ratio: a broken header
        return None
    try:
        raw = deflate.zlib_decompress(png.idat, size)
    except deflate.DeflateError:
        return None
    return raw if len(raw) == size else None


def _runs_of_rows(png: _PngImage, rows: bytes) -> Optional[PanopticRuns]:
    """The runs of an 8-bit, non-interlaced RGB(A) PNG from its filtered scanlines (as
    :func:`_inflate_rows`), or None when a scanline has an unknown filter type.

    The rows are rebuilt as runs by the C extension ``_png_runs``: between pixels with a non-zero
    filtered byte and the places where the row above changes colour, every PNG row filter predicts
    the same colour again after a few pixels, so the work grows with the number of runs, not of
    pixels.
    """
    try:
        starts, ids = _png_runs.runs_of_rows(rows, png.height, png.width, png.channels)
    except ValueError:
        return None
    return PanopticRuns(
        (png.height, png.width), np.frombuffer(starts, dtype=np.int64), np.frombuffer(ids, dtype=np.uint32)
    )


def _ids_of_rgba(rgba: np.ndarray) -> np.ndarray:
    """Segment ids (uint32, HxW) of an RGBA image (uint8, HxWx4, R first), which it overwrites."""
    rgba = np.ascontiguousarray(rgba)
    if not np.little_endian:
        return rgb_to_id(rgba[..., :3])
    # Each pixel read as one little-endian uint32 R + G<<8 + B<<16 + A<<24; alpha dropped.
    ids = rgba.view(np.uint32).reshape(rgba.shape[:2])
    np.bitwise_and(ids, 0x00FFFFFF, out=ids)
    return ids


def _decode_with_opencv(path: str, data: bytes) -> np.ndarray:
    """Segment ids (uint32, HxW) of any image OpenCV reads that is 8-bit RGB(A) once decoded."""
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


def _read_panoptic(path: PathLike) -> Union[np.ndarray, PanopticRuns]:
    """The runs, or for files OpenCV decodes the ids (uint32, HxW), of the panoptic PNG ``path``.

    A well-formed 8-bit, non-interlaced RGB(A) PNG whose zlib stream inflates (libdeflate checks
    it) and whose rows have valid filter types gives runs; every other file (interlaced, palette,
    grey, 16-bit, broken) goes to OpenCV, which also names the errors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    png = _parse_png(data)
    if png is None or png.bit_depth != 8 or png.color_type not in (_RGB8, _RGBA8) or png.interlace:
        return _decode_with_opencv(path, data)
    rows = _inflate_rows(png)
    runs = None if rows is None else _runs_of_rows(png, rows)
    return _decode_with_opencv(path, data) if runs is None else runs


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Segment ids (uint32, HxW) stored in the 8-bit RGB(A) panoptic PNG ``path``.

    Raises FileNotFoundError for a missing file and :class:`PanopticFormatError` for a file that
    cannot be decoded or is not 8-bit RGB / RGBA (alpha is ignored, as panopticapi does).
    """
    decoded = _read_panoptic(path)
    return decoded.to_ids() if isinstance(decoded, PanopticRuns) else decoded


def read_panoptic_runs(path: PathLike) -> PanopticRuns:
    """The runs of the segment ids stored in the panoptic PNG ``path``; errors as :func:`read_panoptic_png`.

    Faster than :func:`read_panoptic_png`: the runs of a non-interlaced 8-bit RGB(A) PNG are read
    from its filtered bytes, and no id map is built.
    """
    decoded = _read_panoptic(path)
    return decoded if isinstance(decoded, PanopticRuns) else PanopticRuns.from_ids(decoded)


def write_png(path: PathLike, rgb: np.ndarray) -> None:
    """Write an RGB image (uint8, HxWx3) as a PNG, atomically."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])

    with atomic_path(path) as tmp_path:
        if not cv2.imwrite(tmp_path, bgr):
            raise OSError(f"cannot write PNG {path}")


def write_panoptic_png(path: PathLike, ids: np.ndarray) -> None:
    """Write segment ids (integer, HxW) as an RGB panoptic PNG, atomically."""
    write_png(path, id_to_rgb(ids))
