"""Read chip windows from a georeferenced scene: band mapping, validity masks, area averaging, stretch.

A scene is one or more raster files on one pixel grid (a multi-band GeoTIFF, or single-band STAC
assets stacked as R, G, B). Windows are read through GDAL so remote COGs are fetched by HTTP range
requests, never downloaded whole.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NodataShadowWarning, RasterioError
from rasterio.windows import Window

from pipeline.errors import SampleRejected

# GDAL settings that make remote COG reads cheap (one HEAD, merged range requests, cached blocks).
REMOTE_GDAL_CONFIG = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "VSI_CACHE": "TRUE",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": "",
}


def gdal_env(timeout_s: int, retries: int, extra: dict[str, str]) -> rasterio.Env:
    """A rasterio.Env with the remote-read settings, timeouts and any user overrides."""
    options: dict[str, Any] = dict(REMOTE_GDAL_CONFIG)
    options.update({"GDAL_HTTP_TIMEOUT": str(timeout_s), "GDAL_HTTP_CONNECTTIMEOUT": str(timeout_s),
                    "GDAL_HTTP_MAX_RETRY": str(retries), "GDAL_HTTP_RETRY_DELAY": "1"})
    options.update(extra)
    return rasterio.Env(**options)


def probe_remote(uri: str, timeout_s: float) -> tuple[str, str]:
    """Why GDAL could not open a remote file: fetch its first byte ourselves and look at the answer.

    GDAL reports every /vsicurl/ failure as "does not exist in the file system", which would send
    users hunting for a missing file when the server is down.
    """
    if uri.startswith(("http://", "https://")):
        request = urllib.request.Request(uri, headers={"Range": "bytes=0-0", "User-Agent": "text2earth"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s):
                return "not_a_raster", f"{uri} is reachable but GDAL cannot read it as a raster"
        except urllib.error.HTTPError as exc:
            reason = "not_found" if exc.code in (404, 410) else "unreachable"
            return reason, f"{uri}: HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            return "unreachable", f"{uri}: {getattr(exc, 'reason', exc)}"
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(path):
            return "not_found", f"{uri} does not exist"
    except Exception as exc:  # noqa: BLE001 - any client error means we could not reach it
        return "unreachable", f"{uri}: {type(exc).__name__}: {exc}"
    return "not_a_raster", f"{uri} exists but GDAL cannot read it as a raster"


def classify_error(exc: BaseException) -> str:
    """Map a GDAL/rasterio error message to a rejected-row reason."""
    text = str(exc).lower()
    if "not recognized as" in text or "not a supported file format" in text:
        return "not_a_raster"
    if "no such file" in text or "does not exist" in text or "http response code: 404" in text:
        return "not_found"
    if re.search(r"http|curl|connect|timed out|timeout|resolve host", text):
        return "unreachable"
    return "unreadable"


@dataclass(frozen=True)
class SceneHeader:
    """What planning needs to know about a scene, read from its header only."""

    width: int
    height: int
    count: int
    dtype: str
    crs: Any  # rasterio CRS or None
    transform: Affine
    colorinterp: tuple[str, ...]
    datetime_tag: str | None
    has_gcps: bool


def read_header(uri: str) -> SceneHeader:
    """Open `uri` and read its header (raises RasterioError on failure)."""
    with rasterio.open(uri) as ds:
        gcps, _ = ds.gcps
        return SceneHeader(
            width=ds.width, height=ds.height, count=ds.count, dtype=ds.dtypes[0] if ds.count else "none",
            crs=ds.crs, transform=ds.transform, colorinterp=tuple(c.name for c in ds.colorinterp),
            datetime_tag=ds.tags().get("TIFFTAG_DATETIME"), has_gcps=bool(gcps),
        )


def default_bands(header: SceneHeader) -> list[int]:
    """R, G, B by colour interpretation, else bands 1-3, else band 1 as grey."""
    interp = [c.lower() for c in header.colorinterp]
    if all(c in interp for c in ("red", "green", "blue")):
        return [interp.index("red") + 1, interp.index("green") + 1, interp.index("blue") + 1]
    if header.count >= 3:
        return [1, 2, 3]
    return [1]


def tiff_datetime_to_iso(value: str | None) -> str | None:
    """TIFF DATETIME ('YYYY:MM:DD HH:MM:SS') as ISO 8601, or None if absent or malformed."""
    if not value:
        return None
    m = re.match(r"^(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})", value.strip())
    return f"{m[1]}-{m[2]}-{m[3]}T{m[4]}:{m[5]}:{m[6]}" if m else None


@dataclass(frozen=True)
class Stretch:
    """Linear map of source values to 0..255; `low`/`high` per output channel, None for 8-bit as-is."""

    low: tuple[float, ...] | None
    high: tuple[float, ...] | None
    percentiles: tuple[float, float] | None

    def to_uint8(self, values: np.ndarray) -> np.ndarray:
        """Scale (C, H, W) float values to uint8 with rounding and clipping."""
        if self.low is None or self.high is None:
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
        low = np.asarray(self.low, dtype=np.float64)[:, None, None]
        span = np.asarray(self.high, dtype=np.float64)[:, None, None] - low
        scaled = (values - low) / np.where(span > 0, span, 1.0) * 255.0
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class Scene:
    """Open datasets of one scene, with the channels (file, band) that make its R, G, B or grey."""

    def __init__(self, channels: list[tuple[str, int]], nodata: float | None, stack: ExitStack) -> None:
        self.uris = sorted({uri for uri, _ in channels})
        self.datasets = {uri: stack.enter_context(rasterio.open(uri)) for uri in self.uris}
        first = self.datasets[self.uris[0]]
        for uri, ds in self.datasets.items():
            if (ds.width, ds.height, ds.transform) != (first.width, first.height, first.transform):
                raise SampleRejected("bad_bands", f"{uri} is not on the same pixel grid as {self.uris[0]}")
        for uri, band in channels:
            if band > self.datasets[uri].count:
                raise SampleRejected("bad_bands", f"{uri} has {self.datasets[uri].count} band(s); band "
                                     f"{band} was requested (set `bands` in the sources file)")
        self.channels = channels
        self.nodata = nodata
        self.width, self.height = first.width, first.height
        self.dtype = first.dtypes[channels[0][1] - 1]

    def _read(self, window: Window, out_shape: tuple[int, int] | None, resampling: Resampling,
              boundless: bool) -> tuple[np.ndarray, np.ndarray]:
        """Values (C, H, W) float64 and validity weights (H, W) in [0, 1] for a window."""
        values, masks = [], []
        for uri, band in self.channels:
            ds = self.datasets[uri]
            kw: dict[str, Any] = {"window": window, "resampling": resampling}
            if out_shape is not None:
                kw["out_shape"] = out_shape
            if boundless:
                arr = ds.read(band, boundless=True, masked=True, **kw)
                values.append(np.ma.getdata(arr).astype(np.float64))
                masks.append((~np.ma.getmaskarray(arr)).astype(np.float64))
            else:
                values.append(ds.read(band, **kw).astype(np.float64))
                with warnings.catch_warnings():  # nodata shadowing an alpha band is what we want
                    warnings.simplefilter("ignore", NodataShadowWarning)
                    masks.append(ds.read_masks(band, **kw).astype(np.float64) / 255.0)
        stack = np.stack(values)
        weight = np.max(np.stack(masks), axis=0)  # a pixel is nodata only where every band is
        if self.nodata is not None:
            weight = np.where(np.all(stack == self.nodata, axis=0), 0.0, weight)
        finite = np.all(np.isfinite(stack), axis=0)
        weight = np.where(finite, weight, 0.0)
        return np.where(finite, stack, 0.0), weight

    def stretch(self, mode: str, percentiles: tuple[float, float], per_band: bool, sample_size: int
                ) -> Stretch:
        """Per-scene stretch from a decimated read (overviews when present), so every chip agrees."""
        if mode == "none" or (mode == "auto" and self.dtype == "uint8"):
            return Stretch(None, None, None)
        scale = max(self.width, self.height) / sample_size
        shape = (max(1, round(self.height / max(scale, 1.0))), max(1, round(self.width / max(scale, 1.0))))
        values, weight = self._read(Window(0, 0, self.width, self.height), shape, Resampling.nearest, False)
        valid = weight > 0.5
        if not valid.any():
            raise SampleRejected("empty_raster", "no valid pixel in the scene (all nodata)")
        pix = values[:, valid]
        if per_band:
            low = tuple(float(v) for v in np.percentile(pix, percentiles[0], axis=1))
            high = tuple(float(v) for v in np.percentile(pix, percentiles[1], axis=1))
        else:
            lo, hi = (float(v) for v in np.percentile(pix, percentiles))
            low, high = (lo,) * pix.shape[0], (hi,) * pix.shape[0]
        high = tuple(h if h > lo else lo + 1.0 for lo, h in zip(low, high, strict=True))
        return Stretch(low, high, (float(percentiles[0]), float(percentiles[1])))

    def read_chip(self, col_off: int, row_off: int, factor: int, size: int, max_read_factor: int
                  ) -> tuple[np.ndarray, np.ndarray, float]:
        """Area-averaged chip values (C, size, size), per-pixel validity, and the nodata fraction.

        The window may run past the scene edge; that area counts as nodata. Pixels are averaged over
        valid source pixels only; a chip pixel with none is 0.
        """
        side = size * factor
        if factor > max_read_factor:  # let GDAL pre-average (uses overviews), finish in numpy
            pre = size * max_read_factor
            values, weight = self._read(Window(col_off, row_off, side, side), (pre, pre),
                                        Resampling.average, True)
            return _block_average(values, weight, max_read_factor)
        c0, r0 = max(col_off, 0), max(row_off, 0)
        c1, r1 = min(col_off + side, self.width), min(row_off + side, self.height)
        values = np.zeros((len(self.channels), side, side), dtype=np.float64)
        weight = np.zeros((side, side), dtype=np.float64)
        if c1 > c0 and r1 > r0:
            v, w = self._read(Window(c0, r0, c1 - c0, r1 - r0), None, Resampling.nearest, False)
            values[:, r0 - row_off:r1 - row_off, c0 - col_off:c1 - col_off] = v
            weight[r0 - row_off:r1 - row_off, c0 - col_off:c1 - col_off] = w
        return _block_average(values, weight, factor)


def _block_average(values: np.ndarray, weight: np.ndarray, factor: int
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted mean over factor x factor blocks: (values, pixel has data, nodata fraction of the area)."""
    nodata_fraction = float(1.0 - weight.mean())
    if factor == 1:
        valid = weight > 0
        return values * valid, valid, nodata_fraction
    c, h, w = values.shape
    hb, wb = h // factor, w // factor
    wsum = weight.reshape(hb, factor, wb, factor).sum(axis=(1, 3))
    vsum = (values * weight).reshape(c, hb, factor, wb, factor).sum(axis=(2, 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(wsum > 0, vsum / np.where(wsum > 0, wsum, 1.0), 0.0)
    return out, wsum > 0, nodata_fraction


@contextmanager
def open_scene(channels: list[tuple[str, int]], nodata: float | None) -> Iterator[Scene]:
    """Open every file of a scene; errors become SampleRejected with a classified reason."""
    with ExitStack() as stack:
        try:
            scene = Scene(channels, nodata, stack)
        except RasterioError as exc:
            raise SampleRejected(classify_error(exc), str(exc)) from exc
        yield scene


def axis_offsets(dim: int, side: int) -> list[int]:
    """Window starts along one axis: a regular grid, plus one window snapped to the far edge when the
    leftover strip is at least half a window (so edge chips hold real pixels, not padding). A scene
    shorter than one window but at least half of it gets one window at 0, padded with nodata.
    """
    full = dim // side
    offsets = [i * side for i in range(full)]
    if 2 * (dim - full * side) >= side:
        offsets.append(max(dim - side, 0))
    return offsets


def pyramid_factors(native_gsd_m: float, width: int, height: int, size: int, max_gsd_m: float,
                    max_levels: int, max_nodata_fraction: float) -> list[int]:
    """Factors 1, 2, 4, ... to cut: native always; coarser while GSD <= max and some window of that
    level could hold enough scene to pass the nodata threshold (no hopeless candidates are planned).
    """
    factors = [1]
    for k in range(1, max_levels + 1):
        f = 2**k
        side = size * f
        if native_gsd_m * f > max_gsd_m * (1 + 1e-9):
            break
        best_fill = min(width, side) * min(height, side) / side**2
        if not (axis_offsets(width, side) and axis_offsets(height, side)) or (
                best_fill < 1.0 - max_nodata_fraction):
            break
        factors.append(f)
    return factors
