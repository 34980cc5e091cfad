"""Exact ground sample distance, centre and footprint of a chip, for any CRS.

Projected "metres" are not ground metres (Web Mercator is off by 1/cos(lat), geographic CRSs are in
degrees, geostationary pixels can be off the Earth), so everything is measured on the WGS84 ellipsoid:
pixel corners are transformed to lon/lat and their separation is the geodesic distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Geod, Transformer
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from pipeline.errors import SampleRejected

GEOD = Geod(ellps="WGS84")
_WGS84 = CRS.from_epsg(4326)


@dataclass(frozen=True)
class ChipGeometry:
    """Where a chip is and how large its pixels are on the ground."""

    lon: float
    lat: float
    gsd_x_m: float
    gsd_y_m: float
    native_gsd_m: float
    footprint: BaseGeometry

    @property
    def gsd_m(self) -> float:
        """Geometric mean of the two pixel sides: the side of a square pixel of the same area."""
        return math.sqrt(self.gsd_x_m * self.gsd_y_m)


def level_for_gsd(gsd_m: float | None) -> int | None:
    """Text2Earth level round(17 - log2(gsd)): level L is 2^(17-L) m/px (halves round up)."""
    if gsd_m is None or not math.isfinite(gsd_m) or gsd_m <= 0:
        return None
    return math.floor(17.0 - math.log2(gsd_m) + 0.5)


@lru_cache(maxsize=128)
def _crs(crs_text: str) -> CRS:
    return CRS.from_user_input(crs_text)


@lru_cache(maxsize=128)
def _to_lonlat(crs_text: str) -> Transformer:
    return Transformer.from_crs(_crs(crs_text), _WGS84, always_xy=True)


@lru_cache(maxsize=128)
def _from_lonlat(crs_text: str) -> Transformer:
    return Transformer.from_crs(_WGS84, _crs(crs_text), always_xy=True)


@lru_cache(maxsize=128)
def _global_lat_limits(crs_text: str) -> tuple[float, float] | None:
    """Latitude limits of CRSs whose area of use spans all longitudes (Web Mercator: +-85.06).

    For such CRSs the limits are where the projection stops being meaningful. Regional CRSs (UTM zones)
    are deliberately not clipped to their nominal zone: real products (Landsat) use a zone well beyond
    it, and the round-trip test below already catches where the projection itself breaks down.

    Polar CRSs (all longitudes, one hemisphere: polar stereographic, UPS) count as regional: their
    nominal areas stop at a latitude (60 N for EPSG:3413) that real grids (NSIDC, Landsat) go far beyond.
    """
    aou = _crs(crs_text).area_of_use
    if aou is None or aou.east - aou.west < 359.0 or aou.south >= 0.0 or aou.north <= 0.0:
        return None
    return aou.south, aou.north


@lru_cache(maxsize=128)
def _x_period(crs_text: str) -> float | None:
    """CRS x units per trip around the equator, for world-spanning projected CRSs whose x repeats
    (Mercator-like): a grid may run past the antimeridian (Web Mercator x > 20,037,508 m) and its points
    come back from the round trip shifted by whole periods. None where x does not repeat."""
    crs = _crs(crs_text)
    aou = crs.area_of_use
    if crs.is_geographic or aou is None or aou.east - aou.west < 359.0:
        return None
    lon0 = 0.0
    operation = crs.coordinate_operation
    for param in getattr(operation, "params", None) or []:
        if "longitude" in param.name.lower() and ("origin" in param.name.lower()
                                                   or "central" in param.name.lower()):
            lon0 = float(param.value)
            break
    forward = _from_lonlat(crs_text)
    (x_west, x_east), _ = forward.transform([lon0 - 179.999, lon0 + 179.999], [0.0, 0.0], errcheck=False)
    period = (x_east - x_west) * 360.0 / 359.998
    return period if math.isfinite(period) and period > 0 else None


def crs_label(crs_like: object) -> str:
    """`EPSG:xxxx` when the CRS has an authority code, otherwise its WKT2 (accepts rasterio CRSs too)."""
    to_wkt = getattr(crs_like, "to_wkt", None)
    return _crs_label(to_wkt() if callable(to_wkt) else str(crs_like))


@lru_cache(maxsize=256)
def _crs_label(crs_text: str) -> str:
    """Authority lookup is slow (milliseconds): one per distinct CRS."""
    crs = CRS.from_user_input(crs_text)
    auth = crs.to_authority(min_confidence=90)
    return f"{auth[0]}:{auth[1]}" if auth else crs.to_wkt()


def pixels_to_lonlat(transform: Affine, crs_text: str, cols: np.ndarray, rows: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (col, row; 0,0 = top-left corner) to WGS84 lon/lat (inf where undefined)."""
    xs = transform.a * cols + transform.b * rows + transform.c
    ys = transform.d * cols + transform.e * rows + transform.f
    lon, lat = _to_lonlat(crs_text).transform(xs, ys, errcheck=False)
    return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)


def _valid_points(xs: np.ndarray, ys: np.ndarray, lon: np.ndarray, lat: np.ndarray, crs_text: str,
                  tolerance: np.ndarray | float) -> np.ndarray:
    """True where a CRS point (xs, ys -> lon, lat) lies on the Earth and inside the CRS's valid area."""
    ok = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90.0)
    limits = _global_lat_limits(crs_text)
    if limits is not None:
        ok &= (lat >= limits[0] - 1e-9) & (lat <= limits[1] + 1e-9)
    # Round trip: where the inverse projection is not the inverse of the forward one (beyond a
    # projection's domain) the point is not meaningful even if finite.
    with np.errstate(invalid="ignore"):
        bx, by = _from_lonlat(crs_text).transform(np.where(ok, lon, 0.0), np.where(ok, lat, 0.0),
                                                  errcheck=False)
        dx, dy = xs - np.asarray(bx), ys - np.asarray(by)
        period = _x_period(crs_text)
        if period is not None:  # past the antimeridian of a repeating grid: the same ground, periods away
            dx = dx - np.round(dx / period) * period
        err = np.hypot(dx, dy)
        ok &= np.isfinite(err) & (err <= tolerance)
    return ok


def valid_area_note(crs_text: str) -> str:
    """What "the CRS's valid area" means for `crs_text`, for rejection details."""
    limits = _global_lat_limits(crs_text)
    if limits is None:
        return "or do not transform back to the same CRS point"
    return f"or outside the CRS's latitudes {limits[0]:.2f}..{limits[1]:.2f}"


def _boundary(width: float, height: float, per_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """Points along the pixel-space rectangle, counter-clockwise on screen, not closed."""
    t = np.linspace(0.0, 1.0, per_edge, endpoint=False)
    cols = np.concatenate([t * width, np.full_like(t, width), (1 - t) * width, np.zeros_like(t)])
    rows = np.concatenate([np.zeros_like(t), t * height, np.full_like(t, height), (1 - t) * height])
    return cols, rows


def _fold_to_world(poly: Polygon) -> BaseGeometry:
    """Cut a polygon given in unwrapped longitudes into pieces inside [-180, 180]."""
    minx, _, maxx, _ = poly.bounds
    if minx >= -180.0 and maxx <= 180.0:
        return orient(poly, 1.0)
    parts: list[Polygon] = []
    for k in range(math.floor((minx + 180.0) / 360.0), math.floor((maxx + 180.0) / 360.0) + 1):
        piece = poly.intersection(box(-180.0 + 360.0 * k, -90.0, 180.0 + 360.0 * k, 90.0))
        piece = affinity.translate(piece, xoff=-360.0 * k)
        parts += [p for p in getattr(piece, "geoms", [piece]) if isinstance(p, Polygon) and not p.is_empty]
    oriented = [orient(p, 1.0) for p in parts]
    return oriented[0] if len(oriented) == 1 else MultiPolygon(oriented)


def footprint(transform: Affine, crs_text: str, width: float, height: float, per_edge: int = 8
              ) -> BaseGeometry:
    """Ground footprint of a pixel rectangle as a WGS84 (multi)polygon, densified along its edges.

    Longitudes are unwrapped along the boundary, so a chip across the antimeridian is split into two
    parts and a chip around a pole is closed through the pole.
    """
    cols, rows = _boundary(width, height, per_edge)
    lon, lat = pixels_to_lonlat(transform, crs_text, cols, rows)
    return _ring_to_polygon(lon, lat)


def _ring_to_polygon(lon: np.ndarray, lat: np.ndarray) -> BaseGeometry:
    """A closed boundary in lon/lat as a valid (multi)polygon inside [-180, 180]."""
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
        raise SampleRejected("off_earth", "footprint corners do not transform to lon/lat")
    lon, lat = _spread_poles(lon, lat)
    lo, hi = lon.min(), lon.max()
    if hi - lo < 90.0 and lo >= -180.0 and hi <= 180.0:  # the common case: away from the antimeridian
        x, y = lon, lat
        signed_area = float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) + x[-1] * y[0] - x[0] * y[-1])
        return Polygon(np.column_stack([x, y]) if signed_area > 0 else np.column_stack([x[::-1], y[::-1]]))
    lon_u = np.degrees(np.unwrap(np.radians(np.append(lon, lon[0]))))
    winding = lon_u[-1] - lon_u[0]
    ring = list(zip(lon_u[:-1], lat, strict=True))
    if abs(winding) > 180.0:  # the boundary goes once around a pole: close the ring along it
        pole = 90.0 if np.mean(lat) > 0 else -90.0
        ring += [(lon_u[-1], pole), (lon_u[0], pole)]
    poly = Polygon(ring)
    if not poly.is_valid:
        poly = shapely.make_valid(poly)
        poly = max(getattr(poly, "geoms", [poly]), key=lambda g: g.area)
    shift = 360.0 * math.floor((poly.centroid.x + 180.0) / 360.0)
    return _fold_to_world(affinity.translate(poly, xoff=-shift))


def _spread_poles(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A boundary point exactly on a pole has no longitude (PROJ returns the central meridian): replace it
    by two pole vertices at its neighbours' longitudes, so the outline runs along the pole instead of
    jumping to an arbitrary meridian."""
    at_pole = np.abs(lat) >= 90.0 - 1e-9
    if not at_pole.any() or at_pole.all():
        return lon, lat
    n = len(lon)
    out_lon: list[float] = []
    out_lat: list[float] = []
    for i in range(n):
        if not at_pole[i]:
            out_lon.append(float(lon[i]))
            out_lat.append(float(lat[i]))
            continue
        prev = next(j % n for j in range(i - 1, i - n, -1) if not at_pole[j % n])
        after = next(j % n for j in range(i + 1, i + n) if not at_pole[j % n])
        pole = 90.0 if lat[i] > 0 else -90.0
        out_lon += [float(lon[prev]), float(lon[after])]
        out_lat += [pole, pole]
    return np.asarray(out_lon), np.asarray(out_lat)


def geodesic_pixel_size(transform: Affine, crs_text: str, col: float, row: float) -> tuple[float, float]:
    """Ground length (m) of one pixel step along x and along y at pixel point (col, row)."""
    cols = np.array([col - 0.5, col + 0.5, col, col])
    rows = np.array([row, row, row - 0.5, row + 0.5])
    lon, lat = pixels_to_lonlat(transform, crs_text, cols, rows)
    if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))):
        raise SampleRejected("off_earth", f"pixel ({col:.1f}, {row:.1f}) does not transform to lon/lat")
    _, _, dx = GEOD.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dy = GEOD.inv(lon[2], lat[2], lon[3], lat[3])
    return float(dx), float(dy)


def window_transform(scene_transform: Affine, col_off: int, row_off: int, factor: int) -> Affine:
    """Affine of a chip whose pixel (0, 0) is scene pixel (col_off, row_off), each pixel `factor` wide.

    (= scene @ translation(col_off, row_off) @ scale(factor), written out: Affine's operators are slow
    enough to show up per chip.)
    """
    a, b, c, d, e, f = scene_transform[:6]
    return Affine(a * factor, b * factor, a * col_off + b * row_off + c,
                  d * factor, e * factor, d * col_off + e * row_off + f)


@lru_cache(maxsize=64)
def _chip_points(size: int, factor: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Chip-pixel points sampled per chip: outline, 3x3 grid, centre, then the GSD point pairs.

    The same for every chip of a (size, factor), so built once.
    """
    c = size / 2.0
    h, n = 0.5, 0.5 / factor  # half a chip pixel, half a source pixel (in chip pixels)
    bc, br = _boundary(float(size), float(size), 8)
    grid = np.linspace(0.0, float(size), 3)
    gc, gr = (a.ravel() for a in np.meshgrid(grid, grid))
    pc = np.array([c, c - h, c + h, c, c, c - n, c + n, c, c])
    pr = np.array([c, c, c, c - h, c + h, c, c, c - n, c + n])
    cols, rows = np.concatenate([bc, gc, pc]), np.concatenate([br, gr, pr])
    cols.setflags(write=False)
    rows.setflags(write=False)
    return cols, rows, len(bc)


def chip_geometries(scene_transform: Affine, crs_text: str, windows: list[tuple[int, int, int]], size: int,
                    scene_width: int, scene_height: int) -> list[ChipGeometry | SampleRejected]:
    """Centre, GSD (chip and native) and footprint of every chip window (col_off, row_off, factor) of a
    scene, from one forward and one inverse coordinate transform for all of them.

    A chip with any sampled point off the Earth or outside the CRS's valid area gets a
    SampleRejected('off_earth') instead. The footprint is the ground the chip's scene pixels cover: a chip
    padded past the scene edge (scenes smaller than one window) has a footprint clipped to the scene.
    """
    a, b, c, d, e, f = scene_transform[:6]
    source_pixel = math.sqrt(abs(scene_transform.determinant)) or 1.0
    results: list[ChipGeometry | SampleRejected] = [SampleRejected("off_earth")] * len(windows)
    by_factor: dict[int, list[int]] = {}
    for i, (_, _, factor) in enumerate(windows):
        by_factor.setdefault(factor, []).append(i)
    for factor, idx in by_factor.items():
        cols, rows, n_outline = _chip_points(size, factor)
        col_off = np.array([windows[i][0] for i in idx], dtype=np.float64)[:, None]
        row_off = np.array([windows[i][1] for i in idx], dtype=np.float64)[:, None]
        sc, sr = col_off + factor * cols[None, :], row_off + factor * rows[None, :]  # scene pixel coords
        xs, ys = a * sc + b * sr + c, d * sc + e * sr + f
        lon, lat = (np.asarray(v).reshape(xs.shape)
                    for v in _to_lonlat(crs_text).transform(xs.ravel(), ys.ravel(), errcheck=False))
        ok = _valid_points(xs, ys, lon, lat, crs_text, 1e-3 * source_pixel * factor)
        p = cols.size - 9  # the centre, then the x, y, native x, native y pairs of GSD points
        good = np.flatnonzero(ok.all(axis=1))
        _, _, dist = GEOD.inv(lon[good, p + 1:p + 9:2].ravel(), lat[good, p + 1:p + 9:2].ravel(),
                              lon[good, p + 2:p + 9:2].ravel(), lat[good, p + 2:p + 9:2].ravel())
        dist = np.asarray(dist).reshape(len(good), 4)
        for j, i in enumerate(idx):
            if not ok[j].all():
                bad = int((~ok[j]).sum())
                results[i] = SampleRejected("off_earth", f"{bad} of {ok.shape[1]} sampled chip points are off "
                                            f"the Earth {valid_area_note(crs_text)}")
        for k, row in enumerate(good.tolist()):
            i, j = idx[row], row
            inside_w = min(float(size), (scene_width - windows[i][0]) / factor)
            inside_h = min(float(size), (scene_height - windows[i][1]) / factor)
            if inside_w == size and inside_h == size:
                outline = _ring_to_polygon(lon[j, :n_outline], lat[j, :n_outline])
            else:
                tr = window_transform(scene_transform, windows[i][0], windows[i][1], factor)
                outline = footprint(tr, crs_text, inside_w, inside_h)
            gx, gy, nx, ny = (float(v) for v in dist[k])
            results[i] = ChipGeometry(lon=float((lon[j, p] + 180.0) % 360.0 - 180.0), lat=float(lat[j, p]),
                                      gsd_x_m=gx, gsd_y_m=gy, native_gsd_m=math.sqrt(nx * ny), footprint=outline)
    return results


def chip_geometry(scene_transform: Affine, crs_text: str, col_off: int, row_off: int, factor: int,
                  size: int, scene_width: int, scene_height: int) -> ChipGeometry:
    """`chip_geometries` for one chip; raises SampleRejected('off_earth') where that gives one."""
    result = chip_geometries(scene_transform, crs_text, [(col_off, row_off, factor)], size, scene_width,
                             scene_height)[0]
    if isinstance(result, SampleRejected):
        raise result
    return result


def native_gsd_at(scene_transform: Affine, crs_text: str, col: float, row: float) -> float:
    """Geometric-mean GSD of the source pixels at scene pixel point (col, row)."""
    dx, dy = geodesic_pixel_size(scene_transform, crs_text, col, row)
    return math.sqrt(dx * dy)


def _gsd_or_none(scene_transform: Affine, crs_text: str, col: float, row: float) -> float | None:
    try:
        gsd = native_gsd_at(scene_transform, crs_text, col, row)
    except SampleRejected:
        return None
    return gsd if math.isfinite(gsd) and gsd > 0 else None


def first_valid_gsd(scene_transform: Affine, crs_text: str, width: int, height: int) -> float:
    """Native GSD at the scene centre, or at the nearest valid point of a coarse grid (full-disk scenes)."""
    centre = _gsd_or_none(scene_transform, crs_text, width / 2.0, height / 2.0)
    if centre is not None:
        return centre
    grid = [(width * (i + 0.5) / 8, height * (j + 0.5) / 8) for j in range(8) for i in range(8)]
    for col, row in sorted(grid, key=lambda p: (p[0] - width / 2.0) ** 2 + (p[1] - height / 2.0) ** 2):
        gsd = _gsd_or_none(scene_transform, crs_text, col, row)
        if gsd is not None:
            return gsd
    raise SampleRejected("off_earth", "no pixel of the scene transforms to lon/lat")
