"""Country / continent / H3 annotation of chip centres, checked on known places and against a brute-force reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import h3
import numpy as np
import pytest
import shapely
from pyproj import Geod
from shapely.geometry import Point, Polygon

from pipeline.curation.geo import Country, CountryIndex, h3_cells, known_continents

BOUNDARIES = Path(__file__).resolve().parents[2] / "data/boundaries/ne_50m_admin_0_countries.geojson"
GEOD = Geod(ellps="WGS84")


@pytest.fixture(scope="module")
def index() -> CountryIndex:
    return CountryIndex.load(str(BOUNDARIES))


def one(index: CountryIndex, lon: float | None, lat: float | None, max_sea_km: float = 0.0) -> Country | None:
    return index.lookup([lon], [lat], max_sea_km)[0]


@pytest.mark.parametrize(
    ("lon", "lat", "iso3", "name", "continent"),
    [
        (2.35, 48.86, "FRA", "France", "Europe"),  # ISO_A3 is -99 in this NE version
        (10.75, 59.91, "NOR", "Norway", "Europe"),  # ditto (Oslo)
        (36.82, -1.29, "KEN", "Kenya", "Africa"),
        (-104.99, 39.74, "USA", "United States of America", "North America"),
        (-46.63, -23.55, "BRA", "Brazil", "South America"),
        (151.21, -33.87, "AUS", "Australia", "Oceania"),
        (0.0, -85.0, "ATA", "Antarctica", "Antarctica"),
        (362.35, 48.86, "FRA", "France", "Europe"),  # longitudes wrap
    ],
)
def test_known_places(index: CountryIndex, lon: float, lat: float, iso3: str, name: str, continent: str) -> None:
    assert one(index, lon, lat) == Country(iso3=iso3, name=name, continent=continent)


def test_no_missing_codes(index: CountryIndex) -> None:
    codes = [c.iso3 for c in index.countries]
    assert len(codes) == 241
    assert "-99" not in codes
    assert len(set(codes)) == len(codes)
    kosovo = one(index, 21.17, 42.67)
    assert kosovo is not None and kosovo.name == "Kosovo" and kosovo.iso3 != "-99" and len(kosovo.iso3) == 3
    assert "Seven seas (open ocean)" in known_continents(index)
    assert {"Europe", "Africa", "Asia", "North America", "South America", "Oceania", "Antarctica"} <= set(
        known_continents(index)
    )


@pytest.mark.parametrize(
    ("lon", "lat", "iso3"),
    [
        (7.27, 43.655, "FRA"),  # ~4 km off Nice (Monaco ~12 km)
        (-80.05, 26.0, "USA"),  # ~7 km off Florida (Bahamas ~130 km)
        (15.0, 78.5, "NOR"),  # ~7 km off Svalbard: lon degrees are short up there
    ],
)
def test_just_off_the_coast(index: CountryIndex, lon: float, lat: float, iso3: str) -> None:
    assert one(index, lon, lat) is None
    assert one(index, lon, lat, max_sea_km=1) is None
    got = one(index, lon, lat, max_sea_km=20)
    assert got is not None and got.iso3 == iso3


def test_open_ocean_is_none(index: CountryIndex) -> None:
    assert one(index, -140.0, 0.0, max_sea_km=50) is None


@pytest.mark.parametrize("lon", [179.99, -180.01, 539.99])
def test_antimeridian(index: CountryIndex, lon: float) -> None:
    # Nearest land is a Fiji piece at lon -179.87 (~15 km, across ±180); Fiji's pieces on this side are > 60 km away.
    assert one(index, lon, -18.96) is None
    got = one(index, lon, -18.96, max_sea_km=20)
    assert got is not None and got.iso3 == "FJI"
    assert one(index, lon, -18.96, max_sea_km=10) is None


def test_poles(index: CountryIndex) -> None:
    got = one(index, 123.0, -90.0, max_sea_km=1)  # the NE polygon stops ~120 m short of the pole
    assert got is not None and got.continent == "Antarctica"
    assert one(index, 0.0, 90.0, max_sea_km=50) is None  # the Arctic Ocean: nearest land ~700 km
    got = one(index, -30.0, 83.7, max_sea_km=50)  # off northern Greenland
    assert got is not None and got.iso3 == "GRL"


def test_missing_and_invalid(index: CountryIndex) -> None:
    assert index.lookup([None, math.nan, 2.35, 2.35, math.inf], [48.86, 48.86, None, 91.0, 0.0], 20) == [None] * 5
    arr = index.lookup(np.array([np.nan, 2.35]), np.array([48.86, 48.86]), 20)
    assert arr[0] is None and arr[1] is not None and arr[1].iso3 == "FRA"
    assert index.lookup([], [], 20) == []
    with pytest.raises(ValueError, match="latitudes"):
        index.lookup([1.0, 2.0], [1.0], 20)
    with pytest.raises(ValueError, match="max_sea_km"):
        index.lookup([1.0], [1.0], -1)


def test_shared_border_is_deterministic(index: CountryIndex) -> None:
    """A point on a border belongs to the country with the smallest iso3, whatever the input order."""
    che = next(i for i, c in enumerate(index.countries) if c.iso3 == "CHE")
    geoms = _load_geoms()
    for x, y in shapely.get_coordinates(geoms[che])[::25]:
        owners = sorted(index.countries[i].iso3 for i, g in enumerate(geoms) if g.intersects(Point(x, y)))
        if len(owners) > 1:
            break
    else:
        pytest.fail("no shared vertex on the Swiss border")
    got = index.lookup([x, 8.0, x], [y, 47.0, y], 0)
    assert got[0] is not None and got[0].iso3 == owners[0]
    assert got[2] == got[0]


def _random_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Half near coasts and the antimeridian, half anywhere.
    anchors = np.array([(7.3, 43.6), (-80.0, 26.0), (15.0, 78.5), (179.9, -18.0), (-68.0, -55.0), (115.0, -8.5)])
    near = anchors[rng.integers(0, len(anchors), n // 2)] + rng.uniform(-0.6, 0.6, (n // 2, 2))
    lon = np.concatenate([near[:, 0], rng.uniform(-180, 180, n - n // 2)])
    lat = np.concatenate([near[:, 1], np.degrees(np.arcsin(rng.uniform(-1, 1, n - n // 2)))])
    return lon, lat


def test_vectorised_equals_per_point(index: CountryIndex) -> None:
    lon, lat = _random_points(300, seed=1)
    lon_list: list[float | None] = [*lon.tolist(), None]
    lat_list: list[float | None] = [*lat.tolist(), 10.0]
    batch = index.lookup(lon_list, lat_list, 30)
    assert batch == [one(index, x, y, 30) for x, y in zip(lon_list, lat_list, strict=True)]
    assert batch[:-1] == index.lookup(lon, lat, 30)
    assert sum(c is not None for c in batch) > 50


def _load_geoms() -> list[shapely.Geometry]:
    doc = json.loads(BOUNDARIES.read_text())
    return [shapely.geometry.shape(f["geometry"]) for f in doc["features"]]


@pytest.fixture(scope="module")
def reference(index: CountryIndex) -> list[tuple[str, np.ndarray]]:
    """Each country's boundary densified to 0.02 degree (independent of pipeline.curation.geo's geometry handling)."""
    return [
        (country.iso3, shapely.get_coordinates(shapely.segmentize(shapely.boundary(geom), 0.02)))
        for country, geom in zip(index.countries, _load_geoms(), strict=True)
    ]


def _reference_nearest(reference: list[tuple[str, np.ndarray]], lon: float, lat: float) -> list[tuple[float, str]]:
    """(km, iso3) of every country within ~3 degrees, by geodesic distance to its densified boundary."""
    out: dict[str, float] = {}
    for iso3, xy in reference:
        for shift in (-360.0, 0.0, 360.0):
            x = xy[:, 0] + shift
            m = (np.abs(x - lon) < 3) & (np.abs(xy[:, 1] - lat) < 3)
            if m.any():
                d = np.asarray(GEOD.inv(np.full(m.sum(), lon), np.full(m.sum(), lat), x[m], xy[m, 1])[2]).min()
                out[iso3] = min(out.get(iso3, math.inf), float(d) / 1000)
    return sorted((d, c) for c, d in out.items())


def test_sea_distance_matches_brute_force(index: CountryIndex, reference: list[tuple[str, np.ndarray]]) -> None:
    """Attribution at sea agrees with a geodesic brute force over densified boundaries (away from the threshold)."""
    lon, lat = _random_points(400, seed=2)
    sea = np.array([c is None for c in index.lookup(lon, lat, 0)])
    lon, lat = lon[sea][:150], lat[sea][:150]
    radius = 25.0
    got = index.lookup(lon, lat, radius)
    checked = 0
    for x, y, c in zip(lon.tolist(), lat.tolist(), got, strict=True):
        ref = _reference_nearest(reference, x, y)
        if not ref or ref[0][0] > radius + 0.5:
            assert c is None, (x, y, ref[:2])
        elif ref[0][0] < radius - 0.5 and (len(ref) == 1 or ref[1][0] - ref[0][0] > 0.5):
            assert c is not None and c.iso3 == ref[0][1], (x, y, ref[:2])
            checked += 1
    assert checked > 10


def test_many_points_worldwide(index: CountryIndex) -> None:
    rng = np.random.default_rng(3)
    lon = rng.uniform(-180, 180, 100_000)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 100_000)))
    got = index.lookup(lon, lat, 20)
    assert 0.25 < sum(c is not None for c in got) / len(got) < 0.4  # land is ~29% of the globe


def test_load_through_fsspec() -> None:
    with fsspec.open("memory://boundaries/countries.geojson", "wb") as f:
        f.write(BOUNDARIES.read_bytes())
    index = CountryIndex.load("memory://boundaries/countries.geojson")
    assert one(index, 2.35, 48.86) == Country("FRA", "France", "Europe")


def test_h3_cells() -> None:
    cells = h3_cells([2.35, 2.35, None, math.nan, 151.21], [48.86, 48.86, 48.86, 1.0, -33.87], 7)
    assert cells[0] == cells[1] == "871fb4662ffffff"
    assert cells[2] is None and cells[3] is None
    assert cells[4] is not None and cells[4] != cells[0]
    for c in (cells[0], cells[4]):
        assert c is not None and h3.get_resolution(c) == 7
    hexagon = Polygon([(lng, la) for la, lng in h3.cell_to_boundary(cells[0])])
    assert hexagon.contains(Point(2.35, 48.86))
    assert h3_cells(np.array([2.35]), np.array([48.86]), 9)[0] == h3.latlng_to_cell(48.86, 2.35, 9)
    with pytest.raises(ValueError, match="resolution"):
        h3_cells([0.0], [0.0], 16)
