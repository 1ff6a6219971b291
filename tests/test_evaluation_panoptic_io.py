"""Reading and writing panoptic PNGs: ids as Pillow decodes them (panopticapi's reader), alpha
ignored, and errors that name the file, on PNGs written by OpenCV and by Pillow (as cityscapesScripts
and panopticapi write ground truth)."""
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from gbw_panoptic.evaluation.panoptic_io import PanopticFormatError, read_panoptic_png, write_panoptic_png


def _pil_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def _panoptic_pixels(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Blocky colours with a few lone pixels and a random alpha channel."""
    colours = rng.integers(0, 256, size=(6, channels), dtype=np.uint8)
    block = int(rng.integers(1, 5))
    coarse = rng.integers(0, len(colours), size=(height // block + 1, width // block + 1))
    pixels = colours[np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]]
    noise = rng.random((height, width)) < 0.05
    pixels[noise] = rng.integers(0, 256, size=(int(noise.sum()), channels), dtype=np.uint8)
    if channels == 4:
        pixels[..., 3] = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    return pixels


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("height, width", [(1, 5), (31, 45), (64, 127)])
def test_files_written_by_opencv_and_pillow(tmp_path, channels, height, width):
    rng = np.random.default_rng(height + width + channels)
    pixels = _panoptic_pixels(rng, height, width, channels)
    rgb = pixels[..., :3].astype(np.uint32)
    expected = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)  # alpha left out
    code = cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA
    assert cv2.imwrite(str(tmp_path / "cv2.png"), cv2.cvtColor(pixels, code))
    Image.fromarray(pixels).save(tmp_path / "pil.png")
    Image.fromarray(pixels).convert("RGB").quantize(colors=256).save(tmp_path / "palette.png")
    for name in ("cv2.png", "pil.png"):
        ids = read_panoptic_png(tmp_path / name)
        assert ids.dtype == np.uint32 and ids.shape == (height, width)
        assert np.array_equal(ids, expected) and np.array_equal(ids, _pil_ids(tmp_path / name))
    assert np.array_equal(read_panoptic_png(tmp_path / "palette.png"), _pil_ids(tmp_path / "palette.png"))


def test_write_panoptic_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice(np.array([0, 7, 26001, 26002, 255**3, 256**3 - 1]), size=(13, 29))
    ids[5] = rng.integers(0, 256**3, size=29)
    write_panoptic_png(tmp_path / "x.png", ids)
    assert np.array_equal(read_panoptic_png(tmp_path / "x.png"), ids)
    assert np.array_equal(_pil_ids(tmp_path / "x.png"), ids)


def test_grey_and_16_bit_files_are_refused_naming_the_file(tmp_path):
    pixels = _panoptic_pixels(np.random.default_rng(3), 12, 10, 3)
    assert cv2.imwrite(str(tmp_path / "grey.png"), pixels[..., 0])
    with pytest.raises(PanopticFormatError, match=r"grey\.png must be 8-bit RGB or RGBA, got dtype uint8 with shape \(12, 10\)"):
        read_panoptic_png(tmp_path / "grey.png")
    assert cv2.imwrite(str(tmp_path / "deep.png"), pixels.astype(np.uint16) * 257)
    with pytest.raises(PanopticFormatError, match=r"deep\.png must be 8-bit RGB or RGBA, got dtype uint16"):
        read_panoptic_png(tmp_path / "deep.png")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _corrupt_files(tmp_path: Path) -> dict:
    write_panoptic_png(tmp_path / "good.png", np.arange(16 * 20).reshape(16, 20) % 7)
    good = (tmp_path / "good.png").read_bytes()
    idat = good.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", good, idat)
    bad_crc = bytearray(good)
    bad_crc[idat + 8 + length] ^= 0xFF  # the IDAT CRC only; the data are intact
    return {
        "truncated": good[: idat + 8 + length // 2],
        "no_idat": good[:idat] + good[idat + 12 + length :],
        "bad_crc": bytes(bad_crc),
        "not_png": b"not a png",
        "huge_header": good[:16] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 10**6, 10**6, 8, 2, 0, 0, 0))[8:] + good[33:],
    }


@pytest.mark.parametrize("kind", ["truncated", "no_idat", "bad_crc", "not_png", "huge_header"])
def test_corrupt_files_raise_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    path.write_bytes(_corrupt_files(tmp_path)[kind])
    with pytest.raises(PanopticFormatError, match=rf"cannot decode panoptic PNG .*{kind}\.png \(corrupt or not an image\)"):
        read_panoptic_png(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"panoptic PNG .*nothere\.png does not exist"):
        read_panoptic_png(tmp_path / "nothere.png")
