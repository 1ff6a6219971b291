"""Reading and writing COCO panoptic PNGs and result files.

A COCO panoptic PNG stores one segment id per pixel as an RGB colour, ``id = R + 256 G + 256² B``;
id 0 is VOID (unlabelled). Every write here is atomic: the data goes to a temporary file in the
destination folder, which then replaces the destination with :func:`os.replace`.

Reading is exact (the ids OpenCV and Pillow decode, bit for bit) and fast: the PNGs that libpng
and OpenCV write (every row Sub filtered, as :func:`write_panoptic_png` writes them) are turned
into runs of equal ids straight from their inflated bytes (libdeflate); other non-interlaced 8-bit
RGB(A) PNGs (Pillow's, as cityscapesScripts writes ground truth) are decoded by libspng; anything
else (interlaced, palette, grey, 16-bit, corrupt files) goes to OpenCV.
"""
import json
import os
import struct
import tempfile
import zlib
from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Union

import cv2
import deflate
import numpy as np
import pyspng

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
    "atomic_write",
    "write_json",
]

PathLike = Union[str, os.PathLike]

# The process umask (read once: os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR colour types of 8-bit truecolour PNGs, and the row filter type Sub.
_RGB8, _RGBA8 = 2, 6
_FILTER_SUB = 1
# Widest image whose per-row channel sums (at most 255 * width) fit in 21 bits.
_MAX_RUN_WIDTH = (2**21 - 1) // 255


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


def _nonzero_bytes(data: np.ndarray) -> np.ndarray:
    """Indices (int64, sorted) of the non-zero entries of a mostly zero uint8 array."""
    aligned = len(data) // 8 * 8
    words = np.flatnonzero(data[:aligned].view(np.uint64) != 0)
    within = np.flatnonzero(data[:aligned].reshape(-1, 8)[words])
    indices = words[within >> 3] * 8 + (within & 7)
    tail = np.flatnonzero(data[aligned:])
    return np.concatenate([indices, tail + aligned]) if len(tail) else indices


def _inflate_rows(png: _PngImage) -> Optional[np.ndarray]:
    """The filtered scanlines (uint8, H x (1 + C·W), writable) of an 8-bit, non-interlaced RGB(A)
    PNG, or None when its zlib stream is broken (bad data or Adler-32, or not exactly H scanlines)."""
    size = png.height * (1 + png.channels * png.width)
    if size > 1032 * len(png.idat) + 64:  # beyond deflate's largest ratio: a broken header
        return None
    try:
        raw = deflate.zlib_decompress(png.idat, size)
    except deflate.DeflateError:
        return None
    if len(raw) != size:
        return None
    return np.frombuffer(raw, dtype=np.uint8).reshape(png.height, -1)


def _runs_of_sub_rows(rows: np.ndarray, width: int, channels: int) -> PanopticRuns:
    """The runs of an image whose scanlines (as :func:`_inflate_rows`) all use the Sub filter.

    Sub stores each byte minus the byte of the same channel one pixel to the left (mod 256), so a
    pixel starts a new run exactly where one of its filtered R, G, B bytes is non-zero, and the
    colour of a run is the per-channel sum (mod 256) of the filtered bytes since the start of its
    row: the runs come out of the few non-zero bytes without reconstructing the pixels. Needs
    ``width <= _MAX_RUN_WIDTH``. Overwrites the filter type bytes.
    """
    height, stride = rows.shape
    rows[:, 0] = 0
    data = rows.reshape(-1)
    position = _nonzero_bytes(data)
    row, offset = np.divmod(position, stride)
    column, channel = np.divmod(offset - 1, channels)
    if channels == 4:  # alpha is not part of the id
        colour = channel < 3
        position, row, column, channel = position[colour], row[colour], column[colour], channel[colour]
    pixel = row * width + column
    # The three channels of a byte packed 21 bits apart: the sums of one row stay below 2^21.
    delta = data[position].astype(np.int64) << (21 * channel)
    # Insert each row's first pixel (its own run start when the row begins with a new id).
    row_starts = np.arange(height, dtype=np.int64) * width
    at = np.searchsorted(pixel, row_starts) + np.arange(height)
    is_byte = np.ones(len(pixel) + height, dtype=bool)
    is_byte[at] = False
    pixels = np.empty(len(is_byte), dtype=np.int64)
    pixels[is_byte] = pixel
    pixels[at] = row_starts
    deltas = np.zeros(len(is_byte), dtype=np.int64)
    deltas[is_byte] = delta
    # Sums since the row start (int64 wraps around, the differences are exact).
    sums = np.cumsum(deltas)
    sums -= sums[at][np.cumsum(~is_byte) - 1]
    last_of_pixel = np.ones(len(pixels), dtype=bool)
    last_of_pixel[:-1] = pixels[1:] != pixels[:-1]
    sums, pixels = sums[last_of_pixel], pixels[last_of_pixel]
    ids = ((sums & 0xFF) | ((sums >> 13) & 0xFF00) | ((sums >> 26) & 0xFF0000)).astype(np.uint32)
    new = first_of_runs(ids)
    return PanopticRuns((height, width), pixels[new], ids[new])


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
    """The ids (uint32, HxW) or the runs of the panoptic PNG ``path``, whichever comes faster.

    A well-formed 8-bit, non-interlaced RGB(A) PNG whose zlib stream inflates (libdeflate checks
    it) gives runs when all its rows are Sub filtered, else ids decoded by libspng; every other file
    (interlaced, palette, grey, 16-bit, broken) goes to OpenCV, which also names the errors.
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
    if rows is None:
        return _decode_with_opencv(path, data)
    if png.width <= _MAX_RUN_WIDTH and np.all(rows[:, 0] == _FILTER_SUB):
        return _runs_of_sub_rows(rows, png.width, png.channels)
    try:
        image = pyspng.load(data)
    except RuntimeError:
        return _decode_with_opencv(path, data)
    return _ids_of_rgba(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA) if image.shape[2] == 3 else image)


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Segment ids (uint32, HxW) stored in the 8-bit RGB(A) panoptic PNG ``path``.

    Raises FileNotFoundError for a missing file and :class:`PanopticFormatError` for a file that
    cannot be decoded or is not 8-bit RGB / RGBA (alpha is ignored, as panopticapi does).
    """
    decoded = _read_panoptic(path)
    return decoded.to_ids() if isinstance(decoded, PanopticRuns) else decoded


def read_panoptic_runs(path: PathLike) -> PanopticRuns:
    """The runs of the segment ids stored in the panoptic PNG ``path``; errors as :func:`read_panoptic_png`.

    Faster than :func:`read_panoptic_png` on the PNGs that libpng and OpenCV write (all rows Sub
    filtered): their runs are read from the filtered bytes, without decoding the pixels.
    """
    decoded = _read_panoptic(path)
    return decoded if isinstance(decoded, PanopticRuns) else PanopticRuns.from_ids(decoded)


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
