"""Country, continent and H3 cell of chip centres, offline, from the Natural Earth admin-0 boundaries in the repo.

Curation balances and reports by geography without calling a geocoding service; points just off a coast are
attributed to the nearest country within a geodesic distance, so coastal chips are not lost as "sea".
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import h3
import numpy as np
import shapely
from pyproj import Geod
from shapely.geometry import shape

GEOD = Geod(ellps="WGS84")
MISSING_ISO3 = "-99"
# Conservative (shortest) lengths of one degree on WGS84, so the candidate box never misses a country in range.
_KM_PER_DEG_LAT = 110.0
_KM_PER_DEG_LON_EQUATOR = 111.0
_MIN_COS_LAT = 1e-3
_VERTICES_PER_BATCH = 1_000_000


@dataclass(frozen=True)
class Country:
    """One Natural Earth admin-0 entity."""

    iso3: str  # ISO_A3, or ADM0_A3 where ISO_A3 is "-99"
    name: str  # NAME
    continent: str  # CONTINENT as Natural Earth spells it


def _as_floats(values: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """Coordinates as a float array, None -> NaN."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return np.asarray(values, dtype=float).ravel()
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _coordinates(
    lons: Sequence[float | None] | np.ndarray, lats: Sequence[float | None] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Longitudes wrapped to [-180, 180), latitudes, and the mask of usable points."""
    lon = _as_floats(lons)
    lat = _as_floats(lats)
    if lon.shape != lat.shape:
        raise ValueError(f"{lon.size} longitudes but {lat.size} latitudes")
    ok = np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90.0)
    lon = np.where(ok, lon, np.nan)
    lat = np.where(ok, lat, np.nan)
    # Only wrap what is outside: the arithmetic would move points that sit exactly on a border vertex.
    outside = ok & ((lon < -180.0) | (lon >= 180.0))
    lon[outside] = (lon[outside] + 180.0) % 360.0 - 180.0
    return lon, lat, ok


class CountryIndex:
    """Point-in-country lookup over Natural Earth admin-0 polygons, with a geodesic fallback for points at sea."""

    def __init__(self, countries: Sequence[Country], geometries: Sequence[shapely.Geometry]) -> None:
        if len(countries) != len(geometries):
            raise ValueError("one geometry per country")
        self.countries: tuple[Country, ...] = tuple(countries)
        # Single polygons, not countries: their boxes are much tighter (overseas territories, pieces split at ±180).
        self._parts, self._part_country = shapely.get_parts(np.array(geometries, dtype=object), return_index=True)
        shapely.prepare(self._parts)
        self._tree = shapely.STRtree(self._parts)
        order = sorted(range(len(self.countries)), key=lambda i: (self.countries[i].iso3, self.countries[i].name, i))
        self._rank = np.empty(len(order), dtype=np.int64)
        self._rank[order] = np.arange(len(order))

    @classmethod
    def load(cls, url: str) -> CountryIndex:
        """Read a Natural Earth admin-0 GeoJSON (local path or any fsspec URL, e.g. gs://)."""
        with fsspec.open(url, "rb") as f:
            doc = json.load(f)
        countries: list[Country] = []
        geometries: list[shapely.Geometry] = []
        for feature in doc["features"]:
            if not feature.get("geometry"):
                continue
            props = feature["properties"]
            iso3 = props.get("ISO_A3") or MISSING_ISO3
            if iso3 == MISSING_ISO3:
                iso3 = props.get("ADM0_A3") or MISSING_ISO3
            geom = shape(feature["geometry"])
            if not geom.is_valid:
                geom = shapely.make_valid(geom)
            countries.append(Country(iso3=iso3, name=props["NAME"], continent=props["CONTINENT"]))
            geometries.append(geom)
        if not countries:
            raise ValueError(f"no country polygons in {url}")
        return cls(countries, geometries)

    def lookup(
        self,
        lons: Sequence[float | None] | np.ndarray,
        lats: Sequence[float | None] | np.ndarray,
        max_sea_km: float,
    ) -> list[Country | None]:
        """Country of each point; a point at sea gets the nearest country within `max_sea_km` (geodesic), else None.

        Missing, NaN or out-of-range coordinates give None. Ties (shared borders, equal distances) go to the
        smallest iso3.
        """
        if not max_sea_km >= 0.0:
            raise ValueError(f"max_sea_km must be >= 0, got {max_sea_km}")
        lon, lat, ok = _coordinates(lons, lats)
        best = np.full(lon.size, -1, dtype=np.int64)
        valid = np.flatnonzero(ok)
        if valid.size:
            # Box query, then the exact test with the prepared polygons as the first argument (the fast way round).
            pts, parts = self._tree.query(shapely.points(lon[valid], lat[valid]))
            inside = shapely.intersects_xy(self._parts[parts], lon[valid][pts], lat[valid][pts])
            pts, parts = pts[inside], parts[inside]
            best[valid] = self._pick(valid.size, pts, self._part_country[parts], np.zeros(pts.size))
        at_sea = np.flatnonzero(ok & (best < 0))
        if at_sea.size and max_sea_km > 0.0:
            best[at_sea] = self._nearest(lon[at_sea], lat[at_sea], max_sea_km)
        return [self.countries[i] if i >= 0 else None for i in best.tolist()]

    def _pick(self, n: int, pts: np.ndarray, geoms: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """Per point, the geometry index with the smallest (distance, iso3 rank); -1 where a point has none."""
        out = np.full(n, -1, dtype=np.int64)
        if pts.size:
            order = np.lexsort((self._rank[geoms], dist, pts))
            first = np.unique(pts[order], return_index=True)[1]
            out[pts[order][first]] = geoms[order][first]
        return out

    def _nearest(self, lon: np.ndarray, lat: np.ndarray, max_sea_km: float) -> np.ndarray:
        """Nearest country within `max_sea_km` of each point (geodesic), -1 where none."""
        owner, shift, boxes = _search_boxes(lon, lat, max_sea_km)
        box_i, part_i = self._tree.query(boxes)
        hit = shapely.intersects(self._parts[part_i], boxes[box_i])
        box_i, part_i = box_i[hit], part_i[hit]
        if not box_i.size:
            return np.full(lon.size, -1, dtype=np.int64)
        pt_i = owner[box_i]
        # The point moved by ±360° into the frame of a candidate on the other side of the antimeridian.
        px = lon[pt_i] + shift[box_i]
        py = lat[pt_i]
        # In batches of bounded vertex count: large radii clip whole continents for every point.
        size = np.cumsum(shapely.get_num_coordinates(self._parts[part_i]))
        batch = size // _VERTICES_PER_BATCH
        dist = np.empty(part_i.size)
        for lo, hi in zip(*_runs(batch), strict=True):
            clipped = shapely.intersection(self._parts[part_i[lo:hi]], boxes[box_i[lo:hi]])
            dist[lo:hi] = _geodesic_distance(px[lo:hi], py[lo:hi], clipped)
        near = dist <= max_sea_km * 1000.0
        return self._pick(lon.size, pt_i[near], self._part_country[part_i[near]], dist[near])


def _search_boxes(lon: np.ndarray, lat: np.ndarray, km: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Degree boxes holding everything within `km` of each point, split at the antimeridian.

    Returns, per box: the point it belongs to, the longitude shift (0 or ±360) that brings the point into the
    box's frame, and the box polygon.
    """
    dlat = km / _KM_PER_DEG_LAT
    lat_lo = np.maximum(lat - dlat, -90.0)
    lat_hi = np.minimum(lat + dlat, 90.0)
    far = np.maximum(np.abs(lat_lo), np.abs(lat_hi))
    cos_far = np.cos(np.radians(far))
    with np.errstate(divide="ignore"):
        dlon = np.where(cos_far > _MIN_COS_LAT, km / (_KM_PER_DEG_LON_EQUATOR * np.maximum(cos_far, 1e-12)), 360.0)
    full = dlon >= 180.0
    x_lo = np.where(full, -180.0, lon - dlon)
    x_hi = np.where(full, 180.0, lon + dlon)
    idx = np.arange(lon.size)
    west = np.flatnonzero(x_lo < -180.0)
    east = np.flatnonzero(x_hi > 180.0)
    owner = np.concatenate([idx, west, east])
    shift = np.concatenate([np.zeros(lon.size), np.full(west.size, 360.0), np.full(east.size, -360.0)])
    xmin = np.concatenate([np.maximum(x_lo, -180.0), x_lo[west] + 360.0, np.full(east.size, -180.0)])
    xmax = np.concatenate([np.minimum(x_hi, 180.0), np.full(west.size, 180.0), x_hi[east] - 360.0])
    boxes = shapely.box(xmin, lat_lo[owner], xmax, lat_hi[owner])
    return owner, shift, boxes


def _runs(keys: np.ndarray) -> tuple[list[int], list[int]]:
    """Start and end of each run of equal values in a sorted array."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return starts.tolist(), [*starts[1:].tolist(), keys.size]


def _geodesic_distance(px: np.ndarray, py: np.ndarray, geoms: np.ndarray) -> np.ndarray:
    """Geodesic metres from each point to (nearly) the nearest point of its geometry.

    The nearest point is found in a local frame with longitudes scaled by cos(lat), so it is close to the
    geodesically nearest one; the distance to the nearest vertex is also taken, which keeps the result an upper
    bound that is never far off even where the local frame degrades (near the poles).
    """
    k = np.maximum(np.cos(np.radians(py)), _MIN_COS_LAT)
    coords, owner = shapely.get_coordinates(geoms, return_index=True)
    local = np.column_stack([(coords[:, 0] - px[owner]) * k[owner], coords[:, 1] - py[owner]])
    scaled = shapely.set_coordinates(geoms.copy(), local)
    ends = shapely.get_point(shapely.shortest_line(shapely.points(np.zeros(px.size), np.zeros(px.size)), scaled), 1)
    ex, ey = shapely.get_x(ends) / k + px, shapely.get_y(ends) + py
    dist = np.asarray(GEOD.inv(px, py, ex, ey)[2], dtype=float)
    vertex = np.asarray(GEOD.inv(px[owner], py[owner], coords[:, 0], coords[:, 1])[2], dtype=float)
    np.fmin.at(dist, owner, vertex)
    return dist


def h3_cells(
    lons: Sequence[float | None] | np.ndarray, lats: Sequence[float | None] | np.ndarray, resolution: int
) -> list[str | None]:
    """H3 cell of each point at `resolution`; None for missing, NaN or out-of-range coordinates."""
    if not 0 <= resolution <= 15:
        raise ValueError(f"H3 resolution must be 0..15, got {resolution}")
    lon, lat, ok = _coordinates(lons, lats)
    return [
        h3.latlng_to_cell(y, x, resolution) if good else None
        for x, y, good in zip(lon.tolist(), lat.tolist(), ok.tolist(), strict=True)
    ]


def known_continents(index: CountryIndex) -> list[str]:
    """Continent names used by the index, sorted."""
    return sorted({c.continent for c in index.countries})
