"""Image bytes to PIL images: PNG, JPEG, TIFF and DICOM.

Single-channel sources (greyscale PNG/JPEG/TIFF, 16-bit scans, MONOCHROME DICOM) come out
as mode L, everything else as RGB. The model's processor converts to RGB itself, after
the image rule: LLaVA pads a greyscale image with the mean grey, which it could not do
once the image were RGB (medray.models.processing).

Every failure is an `ImageDecodeError` naming the input, so a batch job can record it on
that row and go on. Pixel counts are checked from the header, before any pixel data is
decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 64_000_000  # ~8k x 8k: above any radiograph or WSI tile we expect


class ImageDecodeError(ValueError):
    """An input could not be turned into an image. `.name` is the input, `.reason` why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name = name
        self.reason = reason


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than allowed."""


@dataclass(frozen=True)
class ImageOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest width x height (x frames for DICOM) accepted."""
    dicom_frame: int | None = None
    """Frame of a multi-frame DICOM to take; None means the middle one."""

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError("max_pixels must be positive")


def is_dicom(data: bytes) -> bool:
    # Part 10 files carry "DICM" after a 128-byte preamble.
    return len(data) >= 132 and data[128:132] == b"DICM"


def load_image(data: bytes, name: str = "<bytes>", options: ImageOptions | None = None) -> Image.Image:
    """Decode bytes into an L (greyscale) or RGB image, or raise ImageDecodeError naming `name`."""
    options = options or ImageOptions()
    if not data:
        raise ImageDecodeError(name, "empty file")
    if is_dicom(data) or name.lower().endswith((".dcm", ".dicom")):
        return _load_dicom(data, name, options)
    return _load_raster(data, name, options)


def _load_raster(data: bytes, name: str, options: ImageOptions) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit applies; PIL's global bomb check would only warn (or raise its own type).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(name, str(e)) from e
        except Image.UnidentifiedImageError as e:
            # PIL's own message names the in-memory buffer ("<_io.BytesIO object at 0x...>").
            raise ImageDecodeError(name, f"not an image medray reads (PNG, JPEG, TIFF or DICOM); its first bytes "
                                         f"are {data[:8]!r}") from e
        except Exception as e:
            raise ImageDecodeError(name, f"not a supported image ({type(e).__name__}: {e})") from e
        w, h = img.size
        if w * h > options.max_pixels:
            raise ImageTooLargeError(name, f"{w}x{h} pixels exceeds the limit of {options.max_pixels}")
        try:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                img = _to_8bit(np.asarray(img, dtype=np.float64))
            return img.convert("L" if img.mode in ("L", "LA", "1") else "RGB")
        except Exception as e:
            raise ImageDecodeError(name, f"corrupt {img.format or 'image'} data ({type(e).__name__}: {e})") from e


def _to_8bit(arr: np.ndarray) -> Image.Image:
    lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _load_dicom(data: bytes, name: str, options: ImageOptions) -> Image.Image:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not is_dicom(data))
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception as e:
        raise ImageDecodeError(name, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if rows * cols * frames > options.max_pixels:
        raise ImageTooLargeError(
            name, f"{frames} frame(s) of {cols}x{rows} pixels exceeds the limit of {options.max_pixels}")
    index = frames // 2 if options.dicom_frame is None else options.dicom_frame
    if not 0 <= index < frames:
        raise ImageDecodeError(name, f"frame {index} requested but the file has {frames}")
    try:
        arr = ds.pixel_array if frames == 1 else ds.pixel_array[index]
    except Exception as e:
        raise ImageDecodeError(name, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        # Colour (RGB, or YBR that pydicom has already converted to RGB): no LUTs apply.
        return _to_8bit(arr.astype(np.float64)).convert("RGB") if arr.dtype != np.uint8 \
            else Image.fromarray(arr).convert("RGB")
    return Image.fromarray(dicom_grey_to_uint8(ds, arr))


def dicom_grey_to_uint8(ds, arr: np.ndarray) -> np.ndarray:
    """Stored values -> 8-bit display values, as a DICOM viewer shows them.

    Modality LUT (rescale slope/intercept) first, then the VOI transform: a VOI LUT
    sequence, else the first window centre/width, else the full value range; then
    MONOCHROME1 inversion (its low values are white).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = apply_voi_lut(arr, ds, index=0).astype(np.float64) / (2 ** bits - 1) * 255.0
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = window_linear(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                            exact=str(ds.get("VOILUTFunction", "LINEAR")).upper() == "LINEAR_EXACT")
    else:
        lo, hi = float(values.min()), float(values.max())
        out = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo) * 255.0
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _first(value) -> float:
    # WindowCenter/Width may hold several presets; the first is the default view.
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def window_linear(x: np.ndarray, center: float, width: float, *, exact: bool = False) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window onto 0..255 (LINEAR, or LINEAR_EXACT)."""
    if exact:
        out = (x - center) / width + 0.5
    else:
        if width < 1:
            raise ValueError("window width must be >= 1 for LINEAR")
        out = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0) * 255.0
