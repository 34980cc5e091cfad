"""Read chip windows from a georeferenced scene: band mapping, validity masks, area averaging, stretch.

A scene is one or more raster files on one pixel grid (a multi-band GeoTIFF, or single-band STAC
assets stacked as R, G, B). Windows are read through GDAL so remote COGs are fetched by HTTP range
requests, never downloaded whole.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import fsspec
import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NodataShadowWarning, RasterioError
from rasterio.windows import Window

from pipeline.errors import SampleRejected

# GDAL settings that make remote COG reads cheap (one HEAD, merged range requests, cached blocks).
REMOTE_GDAL_CONFIG = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "VSI_CACHE": "TRUE",
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
    except Exception as exc:
        return "unreachable", f"{uri}: {type(exc).__name__}: {exc}"
    return "not_a_raster", f"{uri} exists but GDAL cannot read it as a raster"


def error_text(exc: BaseException) -> str:
    """The message of a rasterio error and of the GDAL error behind it ("Read failed. See previous
    exception" alone says nothing about the block or the codec that failed)."""
    parts = [str(exc)]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(parts) < 4:
        said = " ".join(parts)
        if str(cause) and str(cause) not in said:
            parts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    if len(parts) > 1 and "see previous exception" in parts[0].lower():
        parts = parts[1:]  # rasterio's pointer to the cause, now that the cause is here
    text = ": ".join(parts)
    if re.search(r"ireadblock|tiffread|decode|truncat|short read", text.lower()):
        text += " (the file looks truncated or corrupt: re-download or re-export it)"
    return text


def local_open_problem(path: str) -> tuple[str, str] | None:
    """A clearer reason than GDAL's for a local path that is a folder or an empty file."""
    if os.path.isdir(path):
        return "not_a_raster", (f"{path} is a folder, not a raster file: point `uri` at its files "
                                "(e.g. folder/*.tif)")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "unreadable", f"{path} is empty (0 bytes): the download or copy did not finish"
    return None


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
    has_rpcs: bool = False


def read_header(uri: str) -> SceneHeader:
    """Open `uri` and read its header (raises RasterioError on failure)."""
    with rasterio.open(uri) as ds:
        gcps, _ = ds.gcps
        return SceneHeader(
            width=ds.width, height=ds.height, count=ds.count, dtype=ds.dtypes[0] if ds.count else "none",
            crs=ds.crs, transform=ds.transform, colorinterp=tuple(c.name for c in ds.colorinterp),
            datetime_tag=ds.tags().get("TIFFTAG_DATETIME"), has_gcps=bool(gcps), has_rpcs=ds.rpcs is not None,
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
    _luts: dict[str, list[np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    def to_uint8(self, values: np.ndarray) -> np.ndarray:
        """Scale (C, H, W) values to uint8 with rounding and clipping."""
        if self.low is None or self.high is None:
            if values.dtype == np.uint8:
                return values
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if values.dtype in (np.uint8, np.uint16):  # one table lookup per pixel instead of float maths
            luts = self._tables(values.dtype)
            if len(luts) == 1 or all(lut is luts[0] for lut in luts):
                return luts[0][values]
            return np.stack([lut[plane] for lut, plane in zip(luts, values, strict=True)])
        return self._scale(values.astype(np.float64))

    def _scale(self, values: np.ndarray) -> np.ndarray:
        assert self.low is not None and self.high is not None
        shape = (-1,) + (1,) * (values.ndim - 1)
        low = np.asarray(self.low, dtype=np.float64).reshape(shape)
        span = np.asarray(self.high, dtype=np.float64).reshape(shape) - low
        scaled = (values - low) * (255.0 / np.where(span > 0, span, 1.0))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

    def _tables(self, dtype: np.dtype) -> list[np.ndarray]:
        """Per channel, the uint8 value of every possible integer input (cached per dtype)."""
        key = np.dtype(dtype).str
        if key not in self._luts:
            levels = np.arange(np.iinfo(dtype).max + 1, dtype=np.float64)
            table = self._scale(np.broadcast_to(levels, (len(self.low or ()), levels.size)))
            first = table[0]
            self._luts[key] = [first if np.array_equal(row, first) else row for row in table]
        return self._luts[key]


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
        # one read per file, in file order; `_order` puts the channels back in R, G, B order
        self._by_file: list[tuple[str, list[int]]] = []
        positions: list[int] = []
        for uri in self.uris:
            idx = [i for i, (u, _) in enumerate(channels) if u == uri]
            self._by_file.append((uri, [channels[i][1] for i in idx]))
            positions += idx
        self._order = None if positions == list(range(len(channels))) else np.argsort(positions)
        self.width, self.height = first.width, first.height
        self.dtype = first.dtypes[channels[0][1] - 1]

    def _file_masks(self, ds: Any, bands: list[int], data: np.ndarray, kw: dict[str, Any]) -> np.ndarray | None:
        """Validity (H, W) of one file's bands: True where any band has data; None if all valid.

        Masks are derived from the values where GDAL's mask is a nodata value, read once per file when
        it is a per-dataset mask, and skipped when the file declares every pixel valid.
        """
        flags = [ds.mask_flag_enums[b - 1] for b in bands]
        if any(MaskFlags.all_valid in f for f in flags):
            return None
        nodatas = [ds.nodatavals[b - 1] for b in bands]
        if all(MaskFlags.nodata in f for f in flags) and not any(np.isnan(v) for v in nodatas):
            return np.any(data != np.asarray(nodatas, dtype=data.dtype)[:, None, None], axis=0)
        valid: np.ndarray | None = None
        dataset_mask: np.ndarray | None = None
        for i, band in enumerate(bands):
            if MaskFlags.nodata in flags[i]:
                nodata = nodatas[i]
                band_valid = ~np.isnan(data[i]) if np.isnan(nodata) else data[i] != nodata
            elif MaskFlags.per_dataset in flags[i]:
                if dataset_mask is None:
                    with warnings.catch_warnings():  # nodata shadowing an alpha band is what we want
                        warnings.simplefilter("ignore", NodataShadowWarning)
                        dataset_mask = ds.read_masks(band, **kw) > 0
                band_valid = dataset_mask
            else:  # alpha band or per-band mask
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NodataShadowWarning)
                    band_valid = ds.read_masks(band, **kw) > 0
            valid = band_valid if valid is None else valid | band_valid
        return valid

    def _read(self, window: Window, out_shape: tuple[int, int] | None, resampling: Resampling
              ) -> tuple[np.ndarray, np.ndarray]:
        """Values (C, H, W) in the file's dtype and validity (H, W) bool for a window inside the scene.

        A pixel is nodata only where every channel is (GDAL's convention for nodata values).
        """
        parts: list[np.ndarray] = []
        valid: np.ndarray | None = None
        all_valid = False
        for uri, bands in self._by_file:
            ds = self.datasets[uri]
            kw: dict[str, Any] = {"window": window, "resampling": resampling}
            if out_shape is not None:
                kw["out_shape"] = (len(bands), *out_shape)
            data = ds.read(bands, **kw)
            parts.append(data)
            kw.pop("out_shape", None)
            if out_shape is not None:
                kw["out_shape"] = out_shape
            file_valid = self._file_masks(ds, bands, data, kw)
            if file_valid is None:
                all_valid = True
            elif not all_valid:
                valid = file_valid if valid is None else valid | file_valid
        values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        values = values[self._order] if self._order is not None else values
        shape = values.shape[1:]
        valid = np.ones(shape, dtype=bool) if all_valid or valid is None else valid
        if self.nodata is not None:
            valid = valid & ~np.all(values == self.nodata, axis=0)
        if values.dtype.kind == "f":
            finite = np.all(np.isfinite(values), axis=0)
            valid = valid & finite
            values = np.where(finite, values, 0)
        return values, valid

    def _read_boundless_average(self, window: Window, out_shape: tuple[int, int]
                                ) -> tuple[np.ndarray, np.ndarray]:
        """GDAL-averaged float values and validity weights for a window that may leave the scene."""
        values, weights = [], []
        for uri, band in self.channels:
            arr = self.datasets[uri].read(band, window=window, out_shape=out_shape, boundless=True,
                                          masked=True, resampling=Resampling.average)
            values.append(np.ma.getdata(arr).astype(np.float32))
            weights.append((~np.ma.getmaskarray(arr)).astype(np.float32))
        stack = np.stack(values)
        weight = np.max(np.stack(weights), axis=0)
        if self.nodata is not None:
            weight = np.where(np.all(stack == self.nodata, axis=0), 0.0, weight).astype(np.float32)
        finite = np.all(np.isfinite(stack), axis=0)  # NaN without a nodata tag is nodata too (as in `_read`)
        weight = np.where(finite, weight, 0.0).astype(np.float32)
        return np.where(finite, stack, 0.0).astype(np.float32), weight

    def stretch(self, mode: str, percentiles: tuple[float, float], per_band: bool, sample_size: int
                ) -> Stretch:
        """Per-scene stretch from a decimated read (overviews when present), so every chip agrees."""
        if mode == "none" or (mode == "auto" and self.dtype == "uint8"):
            return Stretch(None, None, None)
        scale = max(self.width, self.height) / sample_size
        shape = (max(1, round(self.height / max(scale, 1.0))), max(1, round(self.width / max(scale, 1.0))))
        values, valid = self._read(Window(0, 0, self.width, self.height), shape, Resampling.nearest)
        if not valid.any():
            raise SampleRejected("empty_raster", "no valid pixel in the scene (all nodata)")
        pix = values[:, valid].astype(np.float64)
        if pix.shape[1] > 65536:  # percentiles of a regular subsample: the same to well under 1 DN
            pix = pix[:, :: pix.shape[1] // 65536]
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
        """Chip values (C, size, size), per-pixel validity, and the nodata fraction of its ground area.

        Factor 1 returns the source values in their dtype. Coarser chips are area-averaged over valid
        source pixels only (float32). The window may run past the scene edge; that area counts as
        nodata. Pixels without any valid source pixel are 0.
        """
        side = size * factor
        if factor > max_read_factor:  # let GDAL pre-average (uses overviews), finish in numpy
            pre = size * max_read_factor
            values, weight = self._read_boundless_average(Window(col_off, row_off, side, side), (pre, pre))
            return _block_average(values, weight, max_read_factor)
        c1, r1 = min(col_off + side, self.width), min(row_off + side, self.height)
        data, valid = self._read(Window(col_off, row_off, c1 - col_off, r1 - row_off), None, Resampling.nearest)
        if data.shape[1:] != (side, side):  # past the scene edge: pad with nodata
            padded = np.zeros((data.shape[0], side, side), dtype=data.dtype)
            padded[:, : data.shape[1], : data.shape[2]] = data
            pad_valid = np.zeros((side, side), dtype=bool)
            pad_valid[: valid.shape[0], : valid.shape[1]] = valid
            data, valid = padded, pad_valid
        n_valid = np.count_nonzero(valid)
        if factor == 1:
            if n_valid < valid.size:
                data = np.where(valid, data, 0).astype(data.dtype, copy=False)
            return data, valid, float(1.0 - n_valid / valid.size)
        if n_valid == valid.size and data.dtype in _CV2_DTYPES:  # all valid: average in the native dtype
            out = np.stack([_area_mean(plane, factor) for plane in data])
            return out, np.ones(out.shape[1:], dtype=bool), 0.0
        return _block_average(data.astype(np.float32), valid.astype(np.float32), factor)


_CV2_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("int16"), np.dtype("float32"))


def _area_mean(plane: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (OpenCV's INTER_AREA is the exact box mean for integer factors,
    rounded for integer dtypes, and ten times faster than a numpy reshape-sum)."""
    h, w = plane.shape
    return cv2.resize(plane, (w // factor, h // factor), interpolation=cv2.INTER_AREA)


def _block_average(values: np.ndarray, weight: np.ndarray, factor: int
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted mean over factor x factor blocks: (values, pixel has data, nodata fraction of the area)."""
    nodata_fraction = float(1.0 - weight.mean(dtype=np.float64))
    if nodata_fraction == 0.0:
        out = np.stack([_area_mean(plane, factor) for plane in values])
        return out, np.ones(out.shape[1:], dtype=bool), 0.0
    wmean = _area_mean(weight, factor)
    valid = wmean > 0
    safe = np.where(valid, wmean, np.float32(1.0))
    out = np.stack([np.where(valid, _area_mean(plane * weight, factor) / safe, np.float32(0.0))
                    for plane in values])
    return out, valid, nodata_fraction


@contextmanager
def open_scene(channels: list[tuple[str, int]], nodata: float | None) -> Iterator[Scene]:
    """Open every file of a scene; errors become SampleRejected with a classified reason."""
    with ExitStack() as stack:
        try:
            scene = Scene(channels, nodata, stack)
        except RasterioError as exc:
            raise SampleRejected(classify_error(exc), error_text(exc)) from exc
        yield scene


def axis_offsets(dim: int, side: int) -> list[int]:
    """Window starts along one axis: a regular grid, plus one window snapped to the far edge when the
    leftover strip is at least half a window (so edge chips hold real pixels, not padding). A scene
    shorter than one window but at least half of it gets one window at 0, padded with nodata; a shorter
    one gets none (the planner still gives the native level its padded window, so nothing goes unrecorded).
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
