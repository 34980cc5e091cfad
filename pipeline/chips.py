"""Chip-level helpers shared by every source kind: keys, quality checks, encoding, whole-image chips."""

from __future__ import annotations

import hashlib
import io
import re
import warnings

import numpy as np
from PIL import Image

from pipeline.errors import SampleRejected

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def slug(text: str, limit: int = 40) -> str:
    """A key-safe fragment (letters, digits, '-', '_'): WebDataset keys must not contain dots."""
    return _UNSAFE.sub("_", text).strip("_")[:limit] or "x"


def short_hash(text: str, n: int = 6) -> str:
    """First n hex digits of SHA-1: stable across machines, used to keep slugs unique."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def scene_id(uri: str) -> str:
    """Readable, unique scene id from its URI: file stem plus a hash of the whole URI."""
    stem = re.split(r"[/\\]", uri.rstrip("/"))[-1].split("?")[0].rsplit(".", 1)[0]
    return f"{slug(stem)}-{short_hash(uri)}"


def key_scene_id(key: str, source: str) -> str:
    """The scene part of an image sample's key `{source}-{scene}` (source names may hold dashes too)."""
    return key[len(source) + 1:]


def chip_key(source: str, scene: str, pyramid_level: int, row: int, col: int) -> str:
    """Key of a raster chip: source, scene, pyramid step and grid position."""
    return f"{source}-{scene}-{pyramid_level}-{row:04d}-{col:04d}"


def check_quality(rgb: np.ndarray, nodata_fraction: float, max_nodata_fraction: float,
                  min_value_range: int, valid: np.ndarray | None = None) -> None:
    """Reject chips that are mostly nodata or carry a single value (raises SampleRejected)."""
    if nodata_fraction > max_nodata_fraction:
        raise SampleRejected("nodata", f"nodata fraction {nodata_fraction:.3f} > {max_nodata_fraction}",
                             nodata_fraction=nodata_fraction)
    if valid is None or valid.all():
        value_range = int(rgb.max()) - int(rgb.min())
    elif valid.any():  # extremes over valid pixels only, without copying them out
        value_range = int(np.where(valid, rgb, 0).max()) - int(np.where(valid, rgb, 255).min())
    else:
        value_range = 0
    if value_range < max(min_value_range, 1):
        raise SampleRejected("constant", f"8-bit value range {value_range} < {max(min_value_range, 1)}",
                             nodata_fraction=nodata_fraction)


def encode_image(rgb: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    """Encode an (3, H, W) or (H, W, 3) uint8 array; deterministic for a given Pillow/libjpeg."""
    if rgb.shape[0] == 3 and rgb.ndim == 3:  # planar (C, H, W): merging planes beats a transposed copy
        img = Image.merge("RGB", [Image.fromarray(np.ascontiguousarray(plane)) for plane in rgb])
    else:
        img = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    else:
        # 4:4:4 keeps the colour of small objects (roofs, cars) that 4:2:0 would smear at 256 px.
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return buf.getvalue()


def sha256_hex(data: bytes) -> str:
    """SHA-256 of stored bytes (what exact deduplication compares)."""
    return hashlib.sha256(data).hexdigest()


def decode_whole_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an image, refusing ones above `max_pixels` before any pixel is decoded (bomb guard)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise SampleRejected("image_too_large", f"{width}x{height} = {width * height} pixels > "
                                     f"max_image_pixels {max_pixels}")
            img.load()
    except SampleRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleRejected("image_too_large", str(exc)) from exc
    except Exception as exc:
        raise SampleRejected("decode_error", f"{type(exc).__name__}: {exc}") from exc
    return img


def image_to_chip(img: Image.Image, size: int) -> tuple[np.ndarray, float]:
    """Centre-crop to a square and resize to size x size (area average down, bicubic up).

    Returns the (H, W, 3) uint8 chip and the scale factor source-pixels-per-chip-pixel, which turns a
    declared source GSD into the chip's GSD.
    """
    if img.mode not in ("RGB", "L"):
        if img.mode in ("I;16", "I;16B", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = np.percentile(arr, (2, 98))
            img = Image.fromarray(np.clip((arr - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8))
        img = img.convert("RGB")
    img = img.convert("RGB")
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        method = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        img = img.resize((size, size), method)
    return np.asarray(img, dtype=np.uint8), side / size
