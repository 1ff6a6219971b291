"""Reading dataset images and label PNGs with errors that name the file.

PIL reports a truncated or corrupt file as ``OSError: image file is truncated`` without saying which
file; training and evaluation read every image through :func:`read_image`, which names it (also inside
DataLoader worker processes, whose errors are re-raised with their message). The dataset converters
check that inputs and outputs are complete and intact with :func:`image_decode_error`.
"""
import os
from typing import Optional

import numpy as np
from PIL import Image

from detectron2.data import detection_utils

__all__ = ["ImageReadError", "image_decode_error", "read_image"]

# What PIL raises for a file that is not a readable image (besides OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """An image or label file that cannot be read; the message names the file."""


def read_image(path: str, format: Optional[str] = None) -> np.ndarray:
    """Detectron2's ``read_image`` (EXIF orientation applied, ``format`` e.g. "RGB"; None keeps the
    file's mode): uint8 ``HxWx3`` for RGB, ``HxW`` for single-channel PNGs.

    Raises:
        ImageReadError: the file is missing, truncated, corrupt or not an image; names ``path``.
    """
    if not os.path.isfile(path):
        raise ImageReadError(f"image file {path} does not exist")
    try:
        return detection_utils.read_image(path, format=format)
    except _DECODE_ERRORS as e:
        raise ImageReadError(
            f"cannot read image file {path} ({type(e).__name__}: {e}); the file is truncated or corrupt: restore "
            "it (re-running the dataset's datasets/prepare_*.py lists corrupt inputs and re-creates corrupt outputs)"
        ) from e


def image_decode_error(path: str) -> Optional[str]:
    """None when ``path`` is a complete, intact image file, else why not.

    A PNG is read to its end chunk with every chunk checksum verified (the checksums cover the
    compressed pixels, so truncation and corruption show up ten times faster than by decoding); a JPEG
    must end with its end-of-image marker (truncation; a full decode would take as long as reading the
    dataset); any other format is decoded completely.
    """
    if not os.path.isfile(path):
        return f"{path}: missing"
    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            elif image.format == "JPEG":
                with open(path, "rb") as f:
                    f.seek(max(os.path.getsize(path) - 64, 0))
                    if b"\xff\xd9" not in f.read():
                        raise OSError("no JPEG end-of-image marker: the file is truncated")
            else:
                image.load()
    except _DECODE_ERRORS as e:
        return f"{path}: truncated or corrupt ({type(e).__name__}: {e})"
    return None
