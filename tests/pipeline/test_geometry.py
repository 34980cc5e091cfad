"""GSD, centre and footprint: checked against an independent computation for every CRS we can make."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.warp import calculate_default_transform, reproject
from shapely.geometry import Point, Polygon

from pipeline.errors import SampleRejected
from pipeline.geometry import chip_geometry, crs_label, footprint, level_for_gsd
from tests.conftest import REPO, harvest_params, read_rows, run, textured, write_raster
from tests.geodesy import pixel_to_lonlat_gdal, reference_gsd, vincenty_m


def _chips(harvest_dir: Path) -> list[dict]:
    return [r for r in read_rows(harvest_dir) if r["crs"] is not None]


def _scene_polygon(path: Path) -> Polygon:
    """Scene outline through GDAL, densified (independent of pipeline.geometry)."""
    with rasterio.open(path) as ds:
        w, h = ds.width, ds.height
        t = np.linspace(0, 1, max(w, h) // 2 + 1)  # dense: edges are curves in lon/lat
        cols = np.concatenate([t * w, np.full_like(t, w), (1 - t) * w, np.zeros_like(t)])
        rows = np.concatenate([np.zeros_like(t), t * h, np.full_like(t, h), (1 - t) * h])
        lon, lat = pixel_to_lonlat_gdal(ds.transform, ds.crs, cols, rows)
    return Polygon(zip(lon, lat, strict=True))


def _check_chip(row: dict, scene_path: Path) -> None:
    with rasterio.open(scene_path) as ds:
        col_off, row_off, side, _ = row["pixel_window"]
        factor = side / row["width"]
        cx, cy = col_off + side / 2, row_off + side / 2
        ref_x, ref_y = reference_gsd(ds.transform, ds.crs, cx, cy, factor)
        ref_native = math.sqrt(math.prod(reference_gsd(ds.transform, ds.crs, cx, cy, 1.0)))
        lon, lat = pixel_to_lonlat_gdal(ds.transform, ds.crs, [cx], [cy])
    assert row["gsd_x_m"] == pytest.approx(ref_x, rel=5e-3), row["key"]
    assert row["gsd_y_m"] == pytest.approx(ref_y, rel=5e-3), row["key"]
    assert row["gsd_m"] == pytest.approx(math.sqrt(ref_x * ref_y), rel=5e-3), row["key"]
    assert row["native_gsd_m"] == pytest.approx(ref_native, rel=5e-3), row["key"]
    assert row["level"] == round(17 - math.log2(row["gsd_m"]))
    assert vincenty_m(row["lon"], row["lat"], float(lon[0]), float(lat[0])) < 0.01 * row["gsd_m"]
    fp = shapely.from_wkb(row["geometry"])
    assert fp.covers(Point(row["lon"], row["lat"])), row["key"]
    tolerance = 1e-2 * row["gsd_m"] / 111_000  # densification differences, far below a pixel
    assert _scene_polygon(scene_path).buffer(tolerance).contains(fp), row["key"]


def test_sample_chips_match_independent_geodesy(sample_harvest: Path) -> None:
    """Every georeferenced sample chip (UTM WGS84 and NAD83, Web Mercator): GSD within 0.5 %."""
    chips = _chips(sample_harvest)
    crss = {r["crs"] for r in chips}
    assert {"EPSG:3857", "EPSG:32618", "EPSG:32621", "EPSG:26914", "EPSG:26913", "EPSG:32629"} <= crss
    for row in chips:
        _check_chip(row, REPO / row["source_uri"])


def test_web_mercator_gsd_is_ground_not_projected_metres(sample_harvest: Path) -> None:
    """Web Mercator's 0.597 'metres' are 0.597 * cos(37.67 deg) = 0.47 m on the ground."""
    korea = [r for r in _chips(sample_harvest) if r["crs"] == "EPSG:3857" and r["pyramid_level"] == 0]
    assert korea
    for r in korea:
        assert r["gsd_m"] == pytest.approx(0.59716403 * math.cos(math.radians(r["lat"])), rel=5e-3)


def _reprojected(src: Path, dst: Path, crs: str) -> Path:
    """A real sample scene warped to another CRS (the same ground, another pixel grid)."""
    with rasterio.open(src) as ds:
        transform, width, height = calculate_default_transform(ds.crs, crs, ds.width, ds.height, *ds.bounds)
        data = np.zeros((ds.count, height, width), dtype=ds.dtypes[0])
        for b in range(ds.count):
            reproject(rasterio.band(ds, b + 1), data[b], dst_transform=transform, dst_crs=crs)
    return write_raster(dst, data, crs, transform, nodata=0)


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:3395", "EPSG:3035", "ESRI:54009", "EPSG:3338"])
def test_other_crs_chips_match_independent_geodesy(tmp_path: Path, crs: str) -> None:
    """Geographic degrees, World Mercator, LAEA Europe, Mollweide, Alaska Albers: same checks."""
    src = REPO / "data/sample/geotiff/naip_northdakota_nad83utm14n_rgbn_5m.tif"
    scene = _reprojected(src, tmp_path / "scene.tif", crs)
    params = harvest_params(tmp_path, [{"name": "warped", "kind": "geotiff", "uri": str(scene),
                                        "license": "public-domain", "attribution": "USDA NAIP",
                                        "bands": [1, 2, 3]}], chip_size=64, max_gsd_m=40)
    summary = run(params)
    assert summary["written"] > 0
    chips = _chips(tmp_path / "harvest")
    assert {r["crs"] for r in chips} == {crs}
    assert {r["pyramid_level"] for r in chips} >= {0, 1}
    for row in chips:
        _check_chip(row, scene)


def test_geostationary_chips_lie_on_the_disk(tmp_path: Path) -> None:
    """GOES full disk: chips off the Earth's disk are rejected, the ones kept have exact GSD."""
    scene = REPO / "data/sample/geotiff/goes16_fulldisk_geostationary_rgb_20km.tif"
    params = harvest_params(tmp_path, [{"name": "goes", "kind": "geotiff", "uri": str(scene),
                                        "license": "public-domain", "attribution": "NOAA"}], chip_size=32)
    summary = run(params)
    assert summary["written"] > 0
    assert summary["by_reason"].get("off_earth", 0) > 0
    with rasterio.open(scene) as ds:
        for row in _chips(tmp_path / "harvest"):
            col_off, row_off, side, _ = row["pixel_window"]
            t = np.linspace(0, side, 9)
            cols = np.concatenate([col_off + t, np.full(9, col_off + side), col_off + t, np.full(9, col_off)])
            rows = np.concatenate([np.full(9, row_off), row_off + t, np.full(9, row_off + side), row_off + t])
            lon, lat = pixel_to_lonlat_gdal(ds.transform, ds.crs, cols, rows)
            assert np.all(np.isfinite(lon)) and np.all(np.abs(lat) <= 90), row["key"]
            # the disk's outline is not a finite polygon in lon/lat: check GSD and centre only
            ref_x, ref_y = reference_gsd(ds.transform, ds.crs, col_off + side / 2, row_off + side / 2,
                                         side / row["width"])
            assert row["gsd_m"] == pytest.approx(math.sqrt(ref_x * ref_y), rel=5e-3)
            assert shapely.from_wkb(row["geometry"]).covers(Point(row["lon"], row["lat"]))


def test_off_disk_chip_is_rejected() -> None:
    with rasterio.open(REPO / "data/sample/geotiff/goes16_fulldisk_geostationary_rgb_20km.tif") as ds:
        crs = crs_label(ds.crs)
        with pytest.raises(SampleRejected) as err:
            chip_geometry(ds.transform, crs, 0, 0, 1, 64, ds.width, ds.height)
        assert err.value.reason == "off_earth"


def test_web_mercator_beyond_its_square_is_outside_the_valid_area() -> None:
    """Web Mercator is defined to +-85.06 deg; a chip north of it must not be produced."""
    top = 20037508.34
    transform = Affine(100.0, 0, 0, 0, -100.0, top + 100 * 300)
    with pytest.raises(SampleRejected) as err:
        chip_geometry(transform, "EPSG:3857", 0, 0, 1, 64, 1000, 1000)
    assert err.value.reason == "off_earth"
    assert chip_geometry(transform, "EPSG:3857", 0, 400, 1, 64, 1000, 1000).lat < 85.06


def test_geographic_raster_past_the_pole_is_rejected() -> None:
    transform = Affine(0.01, 0, 10.0, 0, -0.01, 90.3)
    with pytest.raises(SampleRejected):
        chip_geometry(transform, "EPSG:4326", 0, 0, 1, 64, 100, 100)
    assert chip_geometry(transform, "EPSG:4326", 0, 36, 1, 64, 100, 100).lat < 90


def test_antimeridian_footprint_is_split() -> None:
    """A chip across 180 deg becomes a MultiPolygon on both sides, its centre normalised."""
    transform = Affine(0.001, 0, 179.97, 0, -0.001, -16.0)  # Fiji
    geo = chip_geometry(transform, "EPSG:4326", 0, 0, 1, 64, 64, 64)
    assert geo.footprint.geom_type == "MultiPolygon"
    xs = [x for poly in geo.footprint.geoms for x, _ in poly.exterior.coords]
    assert min(xs) >= -180 and max(xs) <= 180
    assert -180 <= geo.lon < 180


def test_footprint_around_a_pole_closes_through_it() -> None:
    """A polar-stereographic chip containing the North Pole covers it."""
    transform = Affine(20000.0, 0, -640000.0, 0, -20000.0, 640000.0)
    fp = footprint(transform, "EPSG:3413", 64, 64)
    assert fp.covers(Point(0, 89.999)) or fp.covers(Point(-45, 89.999))
    assert fp.bounds[3] == pytest.approx(90.0)


@pytest.mark.parametrize(("crs", "lon", "lat"), [("EPSG:3413", -60.0, 55.0), ("EPSG:3031", -65.0, -57.0)])
def test_polar_stereographic_beyond_its_nominal_area_is_kept(crs: str, lon: float, lat: float) -> None:
    """EPSG:3413's area of use stops at 60 N, NSIDC grids and Landsat scenes in it reach ~30 N."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    geo = chip_geometry(Affine(30.0, 0, x, 0, -30.0, y), crs, 0, 0, 1, 64, 64, 64)
    assert abs(geo.lat - lat) < 0.1
    assert geo.gsd_m == pytest.approx(math.sqrt(math.prod(reference_gsd(
        Affine(30.0, 0, x, 0, -30.0, y), rasterio.crs.CRS.from_user_input(crs), 32, 32, 1.0))), rel=5e-3)


def test_web_mercator_grid_past_the_antimeridian_is_the_same_ground() -> None:
    """A 3857 tile grid may run past x = 20,037,508 m (Fiji): those points wrap to -180.., they are on Earth."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(179.9, -16.0)
    transform = Affine(100.0, 0, x, 0, -100.0, y)
    geo = chip_geometry(transform, "EPSG:3857", 0, 0, 1, 256, 256, 256)
    assert geo.footprint.geom_type == "MultiPolygon"
    assert geo.gsd_x_m == pytest.approx(100.0 * math.cos(math.radians(16.1)), rel=5e-3)


@pytest.mark.parametrize("crs", ["EPSG:3413", "EPSG:3031"])
def test_chips_with_the_pole_on_a_corner_span_only_their_quadrant(crs: str) -> None:
    """The pole has no longitude (PROJ answers the central meridian): the outline must run along it."""
    transform = Affine(1000.0, 0, -64000.0, 0, -1000.0, 64000.0)  # the pole is the corner of 4 chips
    for col, row in ((0, 0), (64, 0), (0, 64), (64, 64)):
        geo = chip_geometry(transform, crs, col, row, 1, 64, 128, 128)
        fp = geo.footprint
        assert fp.is_valid and fp.covers(Point(geo.lon, geo.lat)), (col, row)
        # a quadrant around the pole covers 90 degrees of longitude, never more
        lons = [x for poly in getattr(fp, "geoms", [fp]) for x, _ in poly.exterior.coords]
        spans = sum(p.bounds[2] - p.bounds[0] for p in getattr(fp, "geoms", [fp]))
        assert spans == pytest.approx(90.0, abs=1.0), (col, row, min(lons), max(lons))


def test_level_rounding() -> None:
    assert level_for_gsd(0.5) == 18
    assert level_for_gsd(128) == 10
    assert level_for_gsd(None) is None
    assert level_for_gsd(2 ** (17 - 14.5)) == 15  # halves round up, not to even


def test_pixel_rounding_of_rotated_transform(tmp_path: Path) -> None:
    """A rotated geotransform (sheared grid) still gets geodesic GSD per axis."""
    rot = Affine.translation(500000, 5200000) @ Affine.rotation(30) @ Affine.scale(10, -10)
    path = write_raster(tmp_path / "rot.tif", textured(3, 128, 128), "EPSG:32633", rot)
    with rasterio.open(path) as ds:
        geo = chip_geometry(ds.transform, crs_label(ds.crs), 0, 0, 1, 64, 128, 128)
        ref_x, ref_y = reference_gsd(ds.transform, ds.crs, 32, 32, 1.0)
    assert geo.gsd_x_m == pytest.approx(ref_x, rel=1e-3)
    assert geo.gsd_y_m == pytest.approx(ref_y, rel=1e-3)
