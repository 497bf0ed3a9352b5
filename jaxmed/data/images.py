"""Image decoding: file path, encoded bytes or array -> uint8 HxWxC at a target size.

Every mode is converted on purpose, never silently misread: 16-bit and 32-bit integer images
(X-rays) are scaled from the bit depth their data uses to 8 bits (`to_8bit`), palette / CMYK /
RGBA / LA images become RGB or L, float images are refused. JPEGs are decoded in draft mode at
the smallest DCT scale that still covers the target size (much faster for 600x450 dermoscopy ->
224). Unreadable files of any kind (a header claiming a huge size included) raise `ImageError`
naming the file, which `on_error='skip'` skips.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxmed.config_check import UserError


class ImageError(ValueError, UserError):
    """A missing, unreadable or corrupt image; the message names the file."""


def _open(data: Any, name: str) -> Image.Image:
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(data)))
        else:
            img = Image.open(os.fspath(data))
        return img
    except FileNotFoundError:
        raise ImageError(f"image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError,
            Image.DecompressionBombError) as e:  # a corrupt header may claim a huge size
        raise ImageError(f"cannot read image {name}: {e}") from None


# Bit depths integer images are stored at (X-ray detectors and DICOM exports: 10 / 12 / 14 / 16).
DEPTHS = (8, 10, 12, 14, 16)


def png_significant_bits(data: Any) -> int | None:
    """The grey sBIT value of a PNG (its significant bits per sample), or None: not a PNG, no
    sBIT chunk before the image data, or unreadable. Reads the chunk headers only."""
    try:
        f = (io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview))
             else open(os.fspath(data), "rb"))
    except (OSError, TypeError):
        return None
    with f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"sBIT":
                value = f.read(length)
                return value[0] if value else None
            f.seek(length + 4, io.SEEK_CUR)  # data and CRC


def data_bit_depth(top: int, significant: int | None = None, name: str = "image") -> int:
    """The bit depth a grey integer image's values use: the PNG's sBIT when it has one, else
    the bit length of its largest value rounded up to a stored depth (`DEPTHS`, then 24, 32).

    sBIT below the largest value's bit length contradicts the data: refused naming the file."""
    need = max(int(top), 0).bit_length()
    if significant:
        if need > significant:
            raise ImageError(f"{name}: its PNG sBIT chunk says {significant} significant bits "
                             f"but a value reaches {top} ({need} bits); fix or drop the sBIT "
                             "chunk")
        return max(int(significant), 8)
    return next(d for d in DEPTHS + (24, 32) if d >= need)


def to_8bit(img: Image.Image, name: str, significant: int | None = None) -> Image.Image:
    """Convert any PIL mode to 'L' or 'RGB' without clipping or wrapping values.

    Grey 16-bit / 32-bit integer images are shifted down from the bit depth their data uses
    (`data_bit_depth`): a 12-bit X-ray stored in a 16-bit PNG (as DICOM exports are) maps
    0..4095 to 0..255 instead of 0..15, which is nearly black. `significant` is the PNG's
    sBIT value when it has one (it then decides); otherwise the largest value's bit length
    rounded up to 8 / 10 / 12 / 14 / 16 bits decides, per image: a 12-bit image whose
    brightest pixel is below 1024 reads as 10-bit (4x brighter than its 12-bit peers; write
    sBIT to pin the depth). Values <= 255 stay as they are; full-range 16-bit data is shifted
    by 8 as before."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        return img.convert("RGB") if mode != "1" else img.convert("L")
    if mode == "RGBA":
        return img.convert("RGB")  # alpha dropped: medical images carry no transparency
    if mode in ("LA", "La"):
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        if arr.min(initial=0) < 0:
            raise ImageError(f"{name}: signed integer image (mode {mode}) is not supported")
        bits = data_bit_depth(arr.max(initial=0), significant, name)
        return Image.fromarray((arr.astype(np.uint64) >> (bits - 8)).astype(np.uint8), "L")
    raise ImageError(f"{name}: unsupported image mode {mode!r}")


def decode_image(data: Any, *, size: tuple[int, int] | None = None, channels: int = 3,
                 name: str | None = None, nearest: bool = False,
                 at_least: tuple[int, int] | None = None) -> np.ndarray:
    """Decode to uint8 (H, W, channels). `size` (H, W) resizes with bilinear filtering
    (antialiased), or nearest-neighbour for label masks; `channels` 1 averages RGB to
    luminance, 3 replicates grayscale. `at_least` (H, W) instead keeps the aspect ratio and
    only lets JPEG draft decoding shrink the image while it still covers that size (for crops
    taken from the full image)."""
    name = name or (str(data) if not isinstance(data, (bytes, bytearray)) else "<bytes>")
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data.squeeze(-1) if data.ndim == 3 and data.shape[-1] == 1
                              else data)
    else:
        img = _open(data, name)
        target = size or at_least
        if target is not None and img.format == "JPEG" and not nearest:
            img.draft(img.mode, (target[1], target[0]))
    try:
        img.load()
        significant = (png_significant_bits(data) if img.format == "PNG"
                       and (img.mode.startswith("I;16") or img.mode == "I") else None)
        img = to_8bit(img, name, significant)
        img = img.convert("RGB" if channels == 3 else "L")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"corrupt image {name}: {e}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def verify_image(path: str) -> str | None:
    """None if the file decodes completely, else the reason (for the inspect CLI)."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the file bad
        return f"{type(e).__name__}: {e}"
    return None


def shrink_jpeg(data: bytes, max_side: int, quality: int = 95) -> bytes:
    """Re-encode a JPEG whose shorter side exceeds max_side at that size (keeps aspect).

    Decoding cost is dominated by entropy decoding, which scales with the file, not the DCT
    scale: large high-quality dermoscopy JPEGs decode several times faster after this."""
    img = Image.open(io.BytesIO(data))
    if img.format != "JPEG" or min(img.size) <= max_side:
        return data
    w, h = img.size
    scale = max_side / min(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    img.draft(img.mode, target)
    img = img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode)
    buf = io.BytesIO()
    img.resize(target, Image.BILINEAR).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
