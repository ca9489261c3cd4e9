"""Image decoding: rasters, DICOM windowing on pydicom's bundled samples, and clear errors."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medray.data import ImageDecodeError, ImageOptions, ImageTooLargeError, load_image


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _sample(name: str):
    path = get_testdata_file(name)
    return pydicom.dcmread(path), Path(path).read_bytes()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_rasters_keep_grey_as_grey_and_colour_as_rgb(fmt):
    # Greyscale stays mode L: LLaVA pads a grey image with grey, which needs the mode.
    src = Image.fromarray(np.arange(48 * 32, dtype=np.uint8).reshape(32, 48) % 251).convert("L")
    img = load_image(_encode(src, fmt), f"x.{fmt.lower()}")
    assert img.mode == "L" and img.size == (48, 32)
    if fmt != "JPEG":  # lossless formats keep the values
        assert np.array_equal(np.asarray(img), np.asarray(src))
    colour = load_image(_encode(Image.new("RGB", (8, 4), (10, 200, 30)), fmt), f"c.{fmt.lower()}")
    assert colour.mode == "RGB" and colour.size == (8, 4)
    palette = load_image(_encode(Image.new("P", (8, 4)), "PNG"), "p.png")
    assert palette.mode == "RGB"


def test_16bit_tiff_is_scaled_to_8bit():
    arr = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    img = load_image(_encode(Image.fromarray(arr), "TIFF"), "scan.tiff")
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 64], [128, 255]]


def test_ct_without_window_uses_the_rescaled_range():
    ds, data = _sample("CT_small.dcm")
    assert "WindowCenter" not in ds and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    img = load_image(data, "CT_small.dcm")
    assert img.mode == "L" and img.size == (128, 128)
    assert np.array_equal(np.asarray(img), expected)


def _window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, written out by hand."""
    lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.where(x <= lo, 0, np.where(x > hi, 255, y))


def test_mr_window_center_width_is_applied():
    ds, data = _sample("MR_small.dcm")
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (c, w) == (600.0, 1600.0)
    raw = ds.pixel_array.astype(np.float64)
    expected = np.rint(_window(raw, c, w)).astype(np.uint8)
    out = np.asarray(load_image(data, "MR_small.dcm"))
    assert np.array_equal(out, expected)
    # The window clips: values above c + w/2 saturate to white.
    assert (out[raw > c + w / 2] == 255).all() and (raw > c + w / 2).any()


def test_monochrome1_is_inverted():
    ds, data = _sample("MR_small.dcm")
    normal = np.asarray(load_image(data, "a.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = np.asarray(load_image(_dicom_bytes(ds), "b.dcm"))
    assert np.array_equal(inverted, 255 - normal)


def test_multiframe_takes_the_middle_frame_by_default():
    ds, data = _sample("rtdose.dcm")
    frames = ds.pixel_array
    assert frames.shape[0] == 15

    def minmax(frame):
        f = frame.astype(np.float64)
        return np.rint((f - f.min()) / (f.max() - f.min()) * 255).astype(np.uint8)

    middle = np.asarray(load_image(data, "rtdose.dcm"))
    assert np.array_equal(middle, minmax(frames[7]))
    first = np.asarray(load_image(data, "rtdose.dcm", ImageOptions(dicom_frame=0)))
    assert np.array_equal(first, minmax(frames[0]))
    with pytest.raises(ImageDecodeError, match="frame 15 requested but the file has 15"):
        load_image(data, "rtdose.dcm", ImageOptions(dicom_frame=15))


def test_compressed_dicom_decodes():
    ds, data = _sample("JPEG2000.dcm")
    img = load_image(data, "JPEG2000.dcm")
    assert img.size == (int(ds.Columns), int(ds.Rows))


def test_corrupt_png_gives_a_clear_error_naming_the_input():
    good = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "PNG")
    with pytest.raises(ImageDecodeError) as err:
        load_image(good[: len(good) // 2], "s3://bucket/scans/broken.png")
    assert err.value.name == "s3://bucket/scans/broken.png"
    assert "broken.png" in str(err.value)
    with pytest.raises(ImageDecodeError, match=r"cannot read image notes.png: not an image medray reads "
                                               r"\(PNG, JPEG, TIFF or DICOM\); its first bytes are b'this is '") as err:
        load_image(b"this is not an image at all", "notes.png")
    assert "BytesIO" not in str(err.value)  # PIL's message names its in-memory buffer
    with pytest.raises(ImageDecodeError, match="empty"):
        load_image(b"", "empty.png")


def test_corrupt_dicom_gives_a_clear_error_naming_the_input():
    _, data = _sample("CT_small.dcm")
    with pytest.raises(ImageDecodeError) as err:
        load_image(data[:2000], "s3://bucket/ct/truncated.dcm")
    assert err.value.name == "s3://bucket/ct/truncated.dcm" and "truncated.dcm" in str(err.value)
    with pytest.raises(ImageDecodeError, match="garbage.dcm"):
        load_image(b"\x00" * 128 + b"DICM" + b"\xff" * 64, "garbage.dcm")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height; decoding it would need that much memory."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header():
    with pytest.raises(ImageTooLargeError, match="12000x12000 pixels exceeds the limit"):
        load_image(_png_header_only(12_000, 12_000), "bomb.png")
    with pytest.raises(ImageTooLargeError, match="bomb2.png"):  # PIL's own hard limit also maps here
        load_image(_png_header_only(50_000, 50_000), "bomb2.png")
    small = _encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError):
        load_image(small, "x.png", ImageOptions(max_pixels=9_999))
    assert load_image(small, "x.png", ImageOptions(max_pixels=10_000)).size == (100, 100)


def test_dicom_bombs_are_refused_before_decoding():
    ds, _ = _sample("CT_small.dcm")
    ds.Rows, ds.Columns = 60_000, 60_000  # the pixel data no longer matches; it is never read
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        load_image(_dicom_bytes(ds), "huge.dcm")
