"""Reading panoptic PNGs: the fast decoders against OpenCV and Pillow, bit for bit, on real files.

The PNGs are written by OpenCV, by Pillow (as cityscapesScripts and panopticapi write ground
truth) and chunk by chunk here (zlib + CRC-32), with every row filter type, interlacing and broken
data, so that both the runs read from the filtered bytes (C extension ``_png_runs``) and the
OpenCV fallback are exercised.
"""
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gbw_panoptic.evaluation import _png_runs, panoptic_io
from gbw_panoptic.evaluation.panoptic_io import (
    PanopticFormatError,
    PanopticRuns,
    read_panoptic_png,
    read_panoptic_runs,
    write_panoptic_png,
)

NONE, SUB, UP, AVERAGE, PAETH = range(5)
# Adam7 passes: (first row, first column, row step, column step).
ADAM7 = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _filter_rows(pixels: np.ndarray, filters: Sequence[int]) -> bytes:
    """The filtered scanlines (filter type byte + filtered bytes) of an HxWxC uint8 image."""
    height, width, channels = pixels.shape
    x = pixels.reshape(height, width * channels).astype(np.int64)
    left = np.zeros_like(x)
    left[:, channels:] = x[:, :-channels]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    up_left = np.zeros_like(x)
    up_left[:, channels:] = up[:, :-channels]
    # Paeth predictor of the PNG specification.
    p = left + up - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    predictions = {NONE: 0, SUB: left, UP: up, AVERAGE: (left + up) // 2, PAETH: paeth}
    lines = []
    for row, filter_type in enumerate(filters):
        filtered = (x[row] - (predictions[filter_type][row] if filter_type else 0)) % 256
        lines.append(bytes([filter_type]) + filtered.astype(np.uint8).tobytes())
    return b"".join(lines)


def _write_png(
    path: Path,
    pixels: np.ndarray,
    filters: Union[int, Sequence[int]] = SUB,
    interlace: bool = False,
    idat_chunks: int = 1,
    ancillary: bool = False,
) -> Path:
    """Write an 8-bit RGB / RGBA PNG (HxWx3 or HxWx4 uint8, R first) chunk by chunk."""
    height, width, channels = pixels.shape
    if interlace:
        scanlines = b""
        for row0, column0, row_step, column_step in ADAM7:
            sub_image = pixels[row0::row_step, column0::column_step]
            if sub_image.size:
                pass_filters = [filters] * sub_image.shape[0] if isinstance(filters, int) else filters[: sub_image.shape[0]]
                scanlines += _filter_rows(sub_image, pass_filters)
    else:
        scanlines = _filter_rows(pixels, [filters] * height if isinstance(filters, int) else filters)
    return _write_scanlines(path, scanlines, height, width, channels, interlace, idat_chunks, ancillary)


def _write_scanlines(
    path: Path,
    scanlines: bytes,
    height: int,
    width: int,
    channels: int,
    interlace: bool = False,
    idat_chunks: int = 1,
    ancillary: bool = False,
) -> Path:
    """Write a PNG of 8-bit RGB / RGBA pixels from its filtered scanlines, chunk by chunk."""
    color_type = {3: 2, 4: 6}[channels]
    stream = zlib.compress(scanlines, 9)
    cuts = np.linspace(0, len(stream), idat_chunks + 1).astype(int)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, int(interlace))
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
    if ancillary:
        data += _chunk(b"gAMA", struct.pack(">I", 45455)) + _chunk(b"tEXt", b"Comment\x00panoptic")
    data += b"".join(_chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    if ancillary:
        data += _chunk(b"tEXt", b"Author\x00test")
    path.write_bytes(data + _chunk(b"IEND", b""))
    return path


def _cv2_ids(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.uint32)
    return image[..., 2] | (image[..., 1] << 8) | (image[..., 0] << 16)


def _pil_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def _panoptic_pixels(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Blocky colours with a few lone pixels and a random alpha channel: runs and edge cases."""
    colours = rng.integers(0, 256, size=(6, channels), dtype=np.uint8)
    block = int(rng.integers(1, 5))
    coarse = rng.integers(0, len(colours), size=(height // block + 1, width // block + 1))
    pixels = colours[np.kron(coarse, np.ones((block, block), dtype=np.int64))[:height, :width]]
    noise = rng.random((height, width)) < 0.05
    pixels[noise] = rng.integers(0, 256, size=(int(noise.sum()), channels), dtype=np.uint8)
    if channels == 4:
        pixels[..., 3] = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    return pixels


def _assert_reads_exactly(path: Path, expect_runs: Optional[bool] = None, pillow: bool = True) -> np.ndarray:
    """read_panoptic_png and read_panoptic_runs agree with OpenCV (and Pillow), bit for bit."""
    reference = _cv2_ids(path)
    if pillow:
        assert np.array_equal(_pil_ids(path), reference)
    ids = read_panoptic_png(path)
    assert ids.dtype == np.uint32 and ids.shape == reference.shape
    assert np.array_equal(ids, reference)
    runs = read_panoptic_runs(path)
    expected = PanopticRuns.from_ids(reference)
    assert runs.shape == expected.shape
    assert np.array_equal(runs.starts, expected.starts) and np.array_equal(runs.ids, expected.ids)
    assert runs.starts.dtype == np.int64 and runs.ids.dtype == np.uint32
    assert np.array_equal(runs.to_ids(), reference)
    if expect_runs is not None:  # which path decoded it
        assert isinstance(panoptic_io._read_panoptic(path), PanopticRuns) == expect_runs
    return ids


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("height, width", [(1, 1), (1, 37), (9, 1), (6, 33), (17, 64)])
@pytest.mark.parametrize("filters", [NONE, SUB, UP, AVERAGE, PAETH, "mixed"])
def test_every_filter_type_decodes_exactly(tmp_path, channels, height, width, filters):
    rng = np.random.default_rng(height * 1000 + width * 10 + channels)
    pixels = _panoptic_pixels(rng, height, width, channels)
    row_filters = rng.integers(0, 5, size=height).tolist() if filters == "mixed" else [filters] * height
    path = _write_png(tmp_path / "x.png", pixels, row_filters)
    _assert_reads_exactly(path, expect_runs=True)


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 40),
    channels=st.sampled_from([3, 4]),
    density=st.sampled_from([0.0, 0.02, 0.2, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_filtered_bytes_decode_exactly(tmp_path_factory, height, width, channels, density, seed):
    """Arbitrary scanlines (random filter types, sparse random filtered bytes): every prediction of
    every filter, including Average's slow approach to the colour above, as libpng rebuilds it."""
    rng = np.random.default_rng(seed)
    filtered = rng.integers(0, 256, size=(height, width * channels), dtype=np.uint8)
    filtered[rng.random(filtered.shape) >= density] = 0
    filtered[rng.random(height) < 0.3, :channels] = rng.integers(0, 256, size=channels, dtype=np.uint8)
    filter_types = rng.integers(0, 5, size=(height, 1), dtype=np.uint8)
    scanlines = np.concatenate([filter_types, filtered], axis=1).tobytes()
    path = _write_scanlines(tmp_path_factory.mktemp("png") / "x.png", scanlines, height, width, channels)
    _assert_reads_exactly(path, expect_runs=True)


def test_unknown_filter_type_raises_naming_the_file(tmp_path):
    scanlines = bytes([SUB] + [0] * 12 + [5] + [0] * 12)
    path = _write_scanlines(tmp_path / "filter5.png", scanlines, 2, 4, 3)
    with pytest.raises(ValueError, match="scanline 1 has filter type 5"):
        _png_runs.runs_of_rows(zlib.decompress(zlib.compress(scanlines)), 2, 4, 3)
    for read in (read_panoptic_png, read_panoptic_runs):
        with pytest.raises(PanopticFormatError, match=r"cannot decode panoptic PNG .*filter5\.png"):
            read(path)


@pytest.mark.parametrize("size", [0, 38, 40])
def test_runs_of_rows_checks_the_size(size):
    with pytest.raises(ValueError, match=f"{size} bytes do not hold 3 scanlines of 4 pixels with 3 channels"):
        _png_runs.runs_of_rows(bytes(size), 3, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        _png_runs.runs_of_rows(bytes(15), 3, 4, 2)


@pytest.mark.parametrize("channels", [3, 4])
def test_several_idat_chunks_and_ancillary_chunks(tmp_path, channels):
    pixels = _panoptic_pixels(np.random.default_rng(1), 23, 41, channels)
    for filters in (SUB, PAETH):
        path = _write_png(tmp_path / "x.png", pixels, filters, idat_chunks=5, ancillary=True)
        _assert_reads_exactly(path, expect_runs=True)


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("height, width", [(1, 5), (31, 45), (64, 127)])
def test_files_written_by_opencv_and_pillow(tmp_path, channels, height, width):
    rng = np.random.default_rng(height + width + channels)
    pixels = _panoptic_pixels(rng, height, width, channels)
    code = cv2.COLOR_RGB2BGR if channels == 3 else cv2.COLOR_RGBA2BGRA
    assert cv2.imwrite(str(tmp_path / "cv2.png"), cv2.cvtColor(pixels, code))
    _assert_reads_exactly(tmp_path / "cv2.png", expect_runs=True)  # libpng writes Sub rows
    Image.fromarray(pixels).save(tmp_path / "pil.png")
    _assert_reads_exactly(tmp_path / "pil.png", expect_runs=True)
    # The ids of the pixels, alpha left out.
    rgb = pixels[..., :3].astype(np.uint32)
    assert np.array_equal(read_panoptic_png(tmp_path / "pil.png"), rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16))


def test_write_panoptic_png_round_trip_through_runs(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice(np.array([0, 7, 26001, 26002, 255**3, 256**3 - 1]), size=(13, 29))
    ids[5] = rng.integers(0, 256**3, size=29)
    write_panoptic_png(tmp_path / "x.png", ids)
    assert np.array_equal(_assert_reads_exactly(tmp_path / "x.png", expect_runs=True), ids)
    uniform = PanopticRuns.from_ids(np.full((4, 6), 9, dtype=np.uint32))
    write_panoptic_png(tmp_path / "y.png", np.full((4, 6), 9))
    runs = read_panoptic_runs(tmp_path / "y.png")
    assert runs.starts.tolist() == uniform.starts.tolist() == [0] and runs.ids.tolist() == [9]
    assert runs.lengths().tolist() == [24]


@pytest.mark.parametrize("channels", [3, 4])
def test_wide_images_with_large_sums(tmp_path, channels):
    """Rows whose filtered bytes are all 255 (each pixel its own run), 9000 pixels wide."""
    descending = (-np.arange(9000)) % 256
    pixels = np.repeat(descending[None, :, None], channels, axis=2).astype(np.uint8)
    pixels = np.concatenate([pixels, 255 - pixels, pixels])
    for filters in (SUB, [SUB, AVERAGE, PAETH]):
        _assert_reads_exactly(_write_png(tmp_path / "wide.png", pixels, filters), expect_runs=True)


def test_bad_crc_on_an_ancillary_chunk_is_left_to_opencv(tmp_path):
    """libpng skips an ancillary chunk with a bad CRC and decodes the image (Pillow refuses it): so do we."""
    pixels = _panoptic_pixels(np.random.default_rng(5), 8, 9, 3)
    data = bytearray(_write_png(tmp_path / "x.png", pixels, ancillary=True).read_bytes())
    text = data.index(b"Comment")
    data[text] ^= 0x20  # "comment": the tEXt CRC no longer matches
    (tmp_path / "x.png").write_bytes(bytes(data))
    _assert_reads_exactly(tmp_path / "x.png", expect_runs=False, pillow=False)


@pytest.mark.parametrize("channels", [3, 4])
def test_interlaced_files_decode_exactly(tmp_path, channels):
    pixels = _panoptic_pixels(np.random.default_rng(2), 19, 23, channels)
    for filters in (SUB, PAETH):
        path = _write_png(tmp_path / "x.png", pixels, filters, interlace=True)
        _assert_reads_exactly(path, expect_runs=False)


def test_palette_grey_and_16_bit_files_go_to_opencv(tmp_path):
    rng = np.random.default_rng(3)
    pixels = _panoptic_pixels(rng, 12, 10, 3)
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "palette.png")
    _assert_reads_exactly(tmp_path / "palette.png", expect_runs=False)
    assert cv2.imwrite(str(tmp_path / "grey.png"), pixels[..., 0])
    with pytest.raises(PanopticFormatError, match=r"grey\.png must be 8-bit RGB or RGBA, got dtype uint8 with shape \(12, 10\)"):
        read_panoptic_png(tmp_path / "grey.png")
    assert cv2.imwrite(str(tmp_path / "deep.png"), pixels.astype(np.uint16) * 257)
    for read in (read_panoptic_png, read_panoptic_runs):
        with pytest.raises(PanopticFormatError, match=r"deep\.png must be 8-bit RGB or RGBA, got dtype uint16"):
            read(tmp_path / "deep.png")


def _corrupt_files(tmp_path: Path, filters: int) -> dict:
    pixels = _panoptic_pixels(np.random.default_rng(4), 16, 20, 3)
    good = _write_png(tmp_path / "good.png", pixels, filters).read_bytes()
    idat = good.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", good, idat)
    stream = good[idat + 8 : idat + 8 + length]
    head, tail = good[:idat], good[idat + 12 + length :]

    def with_stream(new_stream: bytes) -> bytes:
        return head + _chunk(b"IDAT", new_stream) + tail

    bad_crc = bytearray(good)
    bad_crc[idat + 8 + length] ^= 0xFF  # the IDAT CRC only; the data are intact
    short = zlib.compress(zlib.decompress(stream)[:-30])
    return {
        "truncated": good[: idat + 8 + length // 2],
        "no_iend": good[: -12],
        "bad_crc": bytes(bad_crc),
        "bad_zlib": with_stream(b"\x78\x9c" + bytes(range(7, 200))),
        "bad_adler": with_stream(stream[:-4] + bytes(b ^ 0xFF for b in stream[-4:])),
        "short_stream": with_stream(short),
        "not_png": b"not a png",
        "huge_header": good[:16] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 10**6, 10**6, 8, 2, 0, 0, 0))[8:] + good[33:],
    }


@pytest.mark.parametrize("filters", [SUB, PAETH])
@pytest.mark.parametrize(
    "kind", ["truncated", "no_iend", "bad_crc", "bad_zlib", "bad_adler", "short_stream", "not_png", "huge_header"]
)
def test_corrupt_files_raise_naming_the_file(tmp_path, filters, kind):
    path = tmp_path / f"{kind}.png"
    path.write_bytes(_corrupt_files(tmp_path, filters)[kind])
    try:  # OpenCV refuses it too
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None
    except cv2.error:
        assert kind == "huge_header"
    for read in (read_panoptic_png, read_panoptic_runs):
        with pytest.raises(PanopticFormatError, match=rf"cannot decode panoptic PNG .*{kind}\.png \(corrupt or not an image\)"):
            read(path)


def test_missing_file(tmp_path):
    for read in (read_panoptic_png, read_panoptic_runs):
        with pytest.raises(FileNotFoundError, match=r"panoptic PNG .*nothere\.png does not exist"):
            read(tmp_path / "nothere.png")
