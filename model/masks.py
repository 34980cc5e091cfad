"""Inpainting masks: seeded random training masks, and user masks read from images. 1 = repaint, 0 = keep.

Training draws boxes (objects to remove or replace), brush strokes (thick random polylines, what a user paints)
and cloud-like blobs (smoothed noise thresholded with soft edges, sometimes semi-transparent: cloud removal),
from a `np.random.Generator` the caller seeds, so a resumed run draws the same masks. Soft values in (0, 1)
mean "partly repaint": the pipeline blends the input and the generated image by them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
from PIL import Image, ImageDraw

from model.config import MaskKind
from pipeline.errors import Text2EarthError

__all__ = [
    "MASK_KINDS",
    "MaskError",
    "MaskKind",
    "blob_mask",
    "box_mask",
    "load_mask",
    "mask_array",
    "random_mask",
    "random_masks",
    "stroke_mask",
]

MASK_KINDS: tuple[MaskKind, ...] = get_args(MaskKind)
_UNSIGNED_MAX = {"1": 1.0, "L": 255.0, "LA": 255.0, "RGB": 255.0, "RGBA": 255.0, "I;16": 65535.0,
                 "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0}  # the white of each mode we read


class MaskError(Text2EarthError, ValueError):
    """A mask image or array cannot be used: wrong mode, size, shape or value range."""


# --- random training masks -------------------------------------------------------------------------------------


def box_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One axis-aligned box covering 10..70 % of each side: an object or field to remove or replace."""
    mask = np.zeros((height, width), np.float32)
    box_h = max(1, round(height * rng.uniform(0.1, 0.7)))
    box_w = max(1, round(width * rng.uniform(0.1, 0.7)))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    mask[top:top + box_h, left:left + box_w] = 1.0
    return mask


def stroke_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A brush stroke: a thick polyline of 2..7 segments with round joints (LaMa-style irregular masks)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    size = min(height, width)
    thickness = max(2, round(size * rng.uniform(1 / 24, 1 / 8)))
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    angle = rng.uniform(0, 2 * math.pi)
    points = [(x, y)]
    for _ in range(int(rng.integers(2, 8))):
        angle += rng.uniform(-math.pi / 2, math.pi / 2)  # a brush turns, it rarely reverses
        length = size * rng.uniform(0.1, 0.4)
        x = float(np.clip(x + length * math.cos(angle), 0, width - 1))
        y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
        points.append((x, y))
    draw.line(points, fill=255, width=thickness, joint="curve")
    radius = thickness / 2
    for px, py in (points[0], points[-1]):  # round caps
        draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)
    return (np.asarray(canvas, np.float32) / 255.0).clip(0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Fractal noise: bicubically upsampled random grids of 3, 6 and 12 cells, each octave half as strong."""
    total = np.zeros((height, width), np.float32)
    for octave, cells in enumerate((3, 6, 12)):
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        resized = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        total += np.asarray(resized, np.float32) * 0.5**octave
    return (total - total.mean()) / (total.std() + 1e-6)


def blob_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cloud-like blobs: smooth noise above a threshold chosen for 10..60 % cover, with soft edges.

    The edge ramp spans 0.1..0.5 noise standard deviations (thin haze at the rim), and one blob in three is
    semi-transparent (peak 0.5..1), so the model learns what a soft mask means: keep that much of the input.
    """
    noise = _smooth_noise(rng, height, width)
    cover = rng.uniform(0.1, 0.6)
    threshold = float(np.quantile(noise, 1.0 - cover))
    softness = rng.uniform(0.1, 0.5)
    mask = np.clip((noise - threshold) / softness + 0.5, 0.0, 1.0)
    if rng.random() < 1 / 3:
        mask *= rng.uniform(0.5, 1.0)
    return mask.astype(np.float32)


_DRAWERS = {"box": box_mask, "stroke": stroke_mask, "blob": blob_mask}


def random_mask(rng: np.random.Generator, height: int, width: int, *,
                kinds: Sequence[MaskKind] = MASK_KINDS, max_shapes: int = 3, p_full: float = 0.1) -> np.ndarray:
    """One training mask (H x W float32 in [0, 1]): the union (maximum) of 1..max_shapes shapes of random kinds.

    With probability `p_full` everything is masked, so the inpainting model can still generate a whole image
    from the text and level alone (Stable Diffusion's inpainting recipe masks everything a quarter of the time).
    """
    unknown = sorted(set(kinds) - set(MASK_KINDS))
    if not kinds or unknown:
        raise ValueError(f"mask kinds must be a non-empty subset of {list(MASK_KINDS)}, got {list(kinds)}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
    if rng.random() < p_full:
        return np.ones((height, width), np.float32)
    mask = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = kinds[int(rng.integers(len(kinds)))]
        mask = np.maximum(mask, _DRAWERS[kind](rng, height, width))
    return mask


def random_masks(rng: np.random.Generator, batch: int, height: int, width: int, *,
                 kinds: Sequence[MaskKind] = MASK_KINDS, max_shapes: int = 3, p_full: float = 0.1) -> np.ndarray:
    """`batch` training masks, B x 1 x H x W float32, drawn one after another from `rng`."""
    return np.stack([random_mask(rng, height, width, kinds=kinds, max_shapes=max_shapes, p_full=p_full)[None]
                     for _ in range(batch)])


# --- user masks -------------------------------------------------------------------------------------------------


def _grey_pixels(image: Image.Image, source: str) -> np.ndarray:
    """A mask image's grey values in [0, 1]; colour images are refused (which colour would mean what?)."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "F":
        values = np.asarray(image, np.float32)
        if values.size and not (0.0 <= float(values.min()) and float(values.max()) <= 1.0):
            raise MaskError(f"{source}: a float mask must hold values in 0..1, got "
                            f"{float(values.min()):g}..{float(values.max()):g}")
        return values
    if mode not in _UNSIGNED_MAX:
        raise MaskError(f"{source}: mask images must be greyscale (white = repaint, black = keep, grey = blend); "
                        f"got mode {mode!r}")
    values = np.asarray(image, np.float32)
    if mode in ("LA", "RGB", "RGBA"):
        colour = values[..., :3] if mode != "LA" else values[..., :1]
        if mode != "LA" and not (np.array_equal(colour[..., 0], colour[..., 1])
                                 and np.array_equal(colour[..., 0], colour[..., 2])):
            raise MaskError(f"{source}: the mask is a colour image ({mode}); save it as greyscale (white = repaint, "
                            "black = keep, grey = blend), e.g. `PIL.Image.open(F).convert('L').save(F)`")
        values = colour[..., 0]
    return np.clip(values / _UNSIGNED_MAX[mode], 0.0, 1.0).astype(np.float32)


def _resized(values: np.ndarray, size: tuple[int, int], source: str) -> np.ndarray:
    """Resize a mask to `size` (width, height) when only the scale differs; refuse another aspect ratio."""
    height, width = values.shape
    if (width, height) == tuple(size):
        return values
    if abs(width * size[1] - height * size[0]) > max(width, height, *size):  # more than a pixel of rounding apart
        raise MaskError(f"{source}: the mask is {width}x{height} but the image is {size[0]}x{size[1]}; give a mask "
                        "of the image's size (or the same aspect ratio, which is resized)")
    resized = Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def mask_array(mask: Any, size: tuple[int, int] | None = None, *, source: str = "mask") -> np.ndarray:
    """A user mask as an H x W float32 array in [0, 1] (1 = repaint), resized to `size` = (width, height).

    Takes a PIL image (greyscale; RGB only when grey), or an array/tensor of shape H x W (also H x W x 1,
    1 x H x W, 1 x 1 x H x W): bool, uint8 (0..255) or float in 0..1.
    """
    if isinstance(mask, Image.Image):
        values = _grey_pixels(mask, source)
    else:
        values = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
        if values.ndim == 3 and values.shape[-1] == 1:  # H x W x 1
            values = values[..., 0]
        while values.ndim > 2 and values.shape[0] == 1:  # 1 x H x W, 1 x 1 x H x W
            values = values[0]
        if values.ndim != 2:
            raise MaskError(f"{source}: expected one H x W mask, got an array of shape {np.shape(mask)}")
        if values.dtype == np.bool_:
            values = values.astype(np.float32)
        elif values.dtype == np.uint8:
            values = values.astype(np.float32) / 255.0
        else:
            values = values.astype(np.float32)
            if values.size and not (0.0 <= float(values.min()) and float(values.max()) <= 1.0):
                raise MaskError(f"{source}: mask values must lie in 0..1 (uint8: 0..255), got "
                                f"{float(values.min()):g}..{float(values.max()):g}")
    return _resized(values, size, source) if size is not None else values


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a greyscale mask image (PNG: 1-bit, 8-bit or 16-bit; white = repaint, black = keep, grey = blend)
    as H x W float32 in [0, 1], resized to `size` = (width, height) when its aspect ratio matches."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask file {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return mask_array(image, size, source=str(path))
    except OSError as exc:
        raise MaskError(f"{path}: not a readable image ({exc})") from exc
