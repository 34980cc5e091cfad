"""Outputs that take a scene row band by row band: a streamed PNG and a georeferenced GeoTIFF.

Both write to a temporary file beside the target and rename it on `close`, so an interrupted run never leaves a
truncated image under the final name. Neither holds more than a few rows: Pillow needs the whole image in
memory, so the PNG is written chunk by chunk with zlib here (the format is short: signature, IHDR, text
chunks, IDAT, IEND).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from model.config import NULL_LEVEL, level_gsd_m
from model.pipeline import GenerationInputError

__all__ = ["GeoTiffRowWriter", "PngRowWriter", "scene_georeference", "utm_crs"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IDAT_BYTES = 1 << 16  # compressed bytes gathered before an IDAT chunk is written


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt when the value is Latin-1 (what PNG text is), else iTXt (UTF-8); Pillow reads both into `.text`."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else str(value)


class _RowWriter:
    """Temporary-file-then-rename and row counting shared by the writers."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path, self.width, self.height, self.rows_written = Path(path), width, height, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f".{self.path.name}.partial")

    def _check(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or rows.ndim != 3 or rows.shape[1:] != (self.width, 3):
            raise ValueError(f"{self.path.name}: rows must be uint8 (n, {self.width}, 3), got {rows.dtype} "
                             f"{rows.shape}")
        if self.rows_written + rows.shape[0] > self.height:
            raise ValueError(f"{self.path.name}: more than {self.height} rows written")
        self.rows_written += rows.shape[0]

    def _finish(self) -> None:
        if self.rows_written != self.height:
            raise ValueError(f"{self.path.name}: {self.rows_written} of {self.height} rows written; not saved")
        os.replace(self.partial, self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
                 ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write_rows(self, rows: np.ndarray) -> None:
        """Append rows (uint8, (n, width, 3)), top to bottom."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file and give it its final name."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the partial file."""
        self.partial.unlink(missing_ok=True)


class PngRowWriter(_RowWriter):
    """An 8-bit RGB PNG written as rows arrive; `chunks` become text chunks before the image data."""

    def __init__(self, path: Path, width: int, height: int, chunks: Mapping[str, Any] | None = None) -> None:
        super().__init__(path, width, height)
        self.file = self.partial.open("wb")
        self.compressor = zlib.compressobj(6)
        self.pending = b""
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
        self.file.write(PNG_SIGNATURE + _chunk(b"IHDR", header))
        for key, value in (chunks or {}).items():
            if value is not None:
                self.file.write(_text_chunk(key, _text(value)))

    def write_rows(self, rows: np.ndarray) -> None:
        """Append rows with PNG's 'Sub' filter (each byte minus the one a pixel to its left), which deflate
        compresses better than raw bytes, at the cost of one vectorised subtraction."""
        self._check(rows)
        flat = rows.reshape(rows.shape[0], -1)
        filtered = flat.copy()
        filtered[:, 3:] -= flat[:, :-3]  # uint8 arithmetic wraps modulo 256, as the filter is defined
        data = np.concatenate([np.ones((flat.shape[0], 1), dtype=np.uint8), filtered], axis=1)
        self._idat(self.compressor.compress(data.tobytes()))

    def _idat(self, data: bytes, final: bool = False) -> None:
        self.pending += data
        if self.pending and (final or len(self.pending) >= IDAT_BYTES):
            self.file.write(_chunk(b"IDAT", self.pending))
            self.pending = b""

    def close(self) -> None:
        """Flush the compressor, write IEND and rename the file to its final name."""
        self._idat(self.compressor.flush(), final=True)
        self.file.write(_chunk(b"IEND", b""))
        self.file.close()
        self._finish()

    def abort(self) -> None:
        """Close and drop the partial file."""
        self.file.close()
        super().abort()


def utm_crs(lon: float, lat: float) -> Any:
    """The UTM zone of a point (WGS 84; EPSG 326zz north, 327zz south), or UPS beyond 84 N / 80 S.

    UTM is conformal, so a pixel is square on the ground, and any GIS knows its EPSG code; its scale differs from
    1 by < 0.1 % inside a zone and is corrected for at the centre by `scene_georeference`.
    """
    from rasterio.crs import CRS

    if lat > 84:
        return CRS.from_epsg(32661)
    if lat < -80:
        return CRS.from_epsg(32761)
    zone = min(int((lon + 180) // 6) + 1, 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def scene_georeference(lon: float, lat: float, width: int, height: int, level: int) -> tuple[Any, Any]:
    """(CRS, affine transform) that puts the canvas centre on (lon, lat) with pixels of the level's GSD in ground
    metres there: the projected pixel size is the GSD times the projection's point scale factor at the centre."""
    from pyproj import Proj, Transformer
    from rasterio.transform import Affine

    if level == NULL_LEVEL:
        raise GenerationInputError("a GeoTIFF needs a real level (1..23) for its pixel size; level 0 is unknown")
    if not (-180 <= lon <= 180 and -90 < lat < 90) or not (math.isfinite(lon) and math.isfinite(lat)):
        raise GenerationInputError(f"centre must be LON,LAT in degrees (-180..180, -90..90), got {lon},{lat}")
    crs = utm_crs(lon, lat)
    scale = Proj(crs.to_wkt()).get_factors(lon, lat).meridional_scale  # conformal: the same in every direction
    pixel = level_gsd_m(level) * scale
    east, north = Transformer.from_crs("EPSG:4326", crs.to_wkt(), always_xy=True).transform(lon, lat)
    return crs, Affine(pixel, 0.0, east - width / 2 * pixel, 0.0, -pixel, north + height / 2 * pixel)


class GeoTiffRowWriter(_RowWriter):
    """A deflate-compressed, striped RGB GeoTIFF written in whole strips as rows arrive (a strip written twice
    would be stored twice once compressed); `tags` become GDAL metadata. Convert to a COG afterwards with
    `rio cogeo create` or `gdal_translate -of COG` if needed."""

    STRIP = 16

    def __init__(self, path: Path, width: int, height: int, crs: Any, transform: Any,
                 tags: Mapping[str, Any] | None = None) -> None:
        import rasterio

        super().__init__(path, width, height)
        self.dataset = rasterio.open(self.partial, "w", driver="GTiff", width=width, height=height, count=3,
                                     dtype="uint8", crs=crs, transform=transform, photometric="RGB",
                                     compress="deflate", predictor=2, tiled=False, blockysize=self.STRIP,
                                     BIGTIFF="IF_SAFER")
        self.dataset.update_tags(**{k: _text(v) for k, v in (tags or {}).items() if v is not None})
        self.buffer = np.zeros((0, width, 3), dtype=np.uint8)
        self.next_row = 0

    def write_rows(self, rows: np.ndarray) -> None:
        """Buffer rows and write every complete strip."""
        self._check(rows)
        self.buffer = np.concatenate([self.buffer, rows])
        whole = self.buffer.shape[0] // self.STRIP * self.STRIP
        if whole:
            self._write(self.buffer[:whole])
            self.buffer = self.buffer[whole:]

    def _write(self, rows: np.ndarray) -> None:
        from rasterio.windows import Window

        window = Window(0, self.next_row, self.width, rows.shape[0])
        self.dataset.write(np.ascontiguousarray(rows.transpose(2, 0, 1)), window=window)
        self.next_row += rows.shape[0]

    def close(self) -> None:
        """Write the last partial strip, close the dataset and rename the file to its final name."""
        if self.buffer.shape[0]:
            self._write(self.buffer)
        self.dataset.close()
        self._finish()

    def abort(self) -> None:
        """Close and drop the partial file."""
        self.dataset.close()
        super().abort()
