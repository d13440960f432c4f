"""Image decoding shared by training and the device, so both see the same pixels.

Sources: a path, bytes, a PIL image, or a numpy uint8 HxWx3 RGB array. The contract (formats by content,
EXIF, modes, first frame, size limits, resize policy) is docs/sdk.md, "Image decoding contract"; the
tests hold it to RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ._errors import InvalidImageError, UnsupportedFormatError

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 100_000_000  # a 48 MP photo passes; a 30000x30000 bomb does not
MAX_ASPECT = 4 / 3
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
WHITE = (255, 255, 255)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def _open(source: Any) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image not found: {path}")
        if path.is_dir():
            raise IsADirectoryError(f"expected an image file, got a directory: {path}")
        size, where = path.stat().st_size, str(path)
        data = path.read_bytes() if 0 < size <= MAX_FILE_BYTES else b""  # never read an oversized file
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), "<bytes>"
        size = len(data)
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}")
    if size == 0:
        raise InvalidImageError(f"{where}: empty image")
    if size > MAX_FILE_BYTES:
        raise InvalidImageError(f"{where}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit")
    _reject_known_other_formats(data, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError(f"{where}: not a recognised image (expected JPEG, PNG, WebP, GIF, BMP or TIFF "
                                "content; the file name's extension does not matter)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"{where}: declared image size is too large ({e})") from None
    except Exception as e:  # Pillow raises a zoo of errors on hostile headers
        raise InvalidImageError(f"{where}: not a decodable image ({type(e).__name__}: {e})") from None
    if img.format not in ALLOWED_FORMATS:
        raise UnsupportedFormatError(f"{where}: format {img.format} is not supported; use JPEG, PNG, WebP, GIF, BMP "
                                     "or TIFF")
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidImageError(f"{where}: zero-size image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise InvalidImageError(f"{where}: declared size {w}x{h} is over the {MAX_PIXELS}-pixel limit")
    return img


# Formats people do send that Pillow cannot open (PDF, HEIF without a plugin) or would open only a header of
# (EPS without Ghostscript): recognised by their leading bytes for a clear `UnsupportedFormatError`.
_OTHER_FORMATS = ((b"%PDF", "PDF"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "PSD"))
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif")


def _reject_known_other_formats(data: bytes, where: str) -> None:
    name = next((n for magic, n in _OTHER_FORMATS if data.startswith(magic)), None)
    if name is None and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        name = "HEIF/AVIF"
    if name is not None:
        raise UnsupportedFormatError(f"{where}: format {name} is not supported; convert it to JPEG or PNG first")


def _orient(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # A corrupt EXIF block must not lose the picture: use it as stored.
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(a)
        if not finite.any():
            raise InvalidImageError(f"{mode} image has no finite pixel values")
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(finite, a, lo)
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(img: Image.Image, target: int | None) -> Image.Image:
    with contextlib.suppress(EOFError):  # animated / multi-page: the first frame
        img.seek(0)
    if target and img.format == "JPEG":
        # Decode at the smallest DCT scale that still leaves >= 2x the target on the short side.
        img.draft("RGB", (target * 2, target * 2))
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"image data is truncated or corrupt ({e})") from None
    return _to_rgb(_orient(img))


def _from_array(arr: np.ndarray) -> Image.Image:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected numpy.ndarray, got {type(arr).__name__}")
    if arr.ndim != 3:
        raise ValueError(f"image array must be HxWx3 (RGB, uint8); got ndim={arr.ndim} shape={arr.shape}")
    if arr.shape[-1] != 3:
        hint = " (looks like CHW: transpose to HWC)" if arr.shape[0] == 3 else ""
        raise ValueError(f"image array must have 3 channels last (HxWx3 RGB); got shape {arr.shape}{hint}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 in 0..255; got dtype {arr.dtype} (scale and cast first)")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidImageError(f"zero-size image array {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def load_image(source: ImageSource, target: int | None = None) -> Image.Image:
    """Decode any accepted source into an upright 8-bit RGB PIL image (the contract in docs/sdk.md)."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        w, h = source.size
        if w < 1 or h < 1:
            raise InvalidImageError(f"zero-size image ({w}x{h})")
        return _to_rgb(_orient(source))
    return _decode(_open(source), target)


def center_crop_aspect(img: Image.Image) -> Image.Image:
    """Crop the long side centrally so that long/short <= MAX_ASPECT (extreme strips stay bounded)."""
    w, h = img.size
    nw, nh = min(w, max(1, round(h * MAX_ASPECT))), min(h, max(1, round(w * MAX_ASPECT)))
    if (nw, nh) == (w, h):
        return img
    left, top = (w - nw) // 2, (h - nh) // 2
    return img.crop((left, top, left + nw, top + nh))


def prepare(source: ImageSource, size: int, crop: tuple[float, float, float, float] | None = None,
            flip: bool = False) -> np.ndarray:
    """Decode + aspect clamp + resize to a (size, size, 3) uint8 RGB array: the model's input. `crop` (left, top,
    right, bottom, as fractions of the clamped image) and `flip` are training augmentation."""
    img = center_crop_aspect(load_image(source, target=size))
    if crop is not None:
        w, h = img.size
        l, t, r, b = crop
        img = img.crop((round(l * w), round(t * h), max(round(r * w), round(l * w) + 1),
                        max(round(b * h), round(t * h) + 1)))
    img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.uint8)
