"""Window reads, area averaging, masks, band mapping and stretch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from pipeline.raster import (
    Stretch,
    _block_average,
    axis_offsets,
    default_bands,
    open_scene,
    pyramid_factors,
    read_header,
    tiff_datetime_to_iso,
)
from tests.conftest import REPO, textured, write_raster

UTM = from_origin(500000, 5200000, 10, 10)


def test_block_average_ignores_nodata_and_reports_its_area() -> None:
    values = np.array([[[1.0, 3.0], [5.0, 100.0]]])
    weight = np.array([[1.0, 1.0], [1.0, 0.0]])
    out, valid, nodata = _block_average(values, weight, 2)
    assert out[0, 0, 0] == pytest.approx(3.0)  # mean of 1, 3, 5; the nodata 100 is ignored
    assert valid.all() and nodata == pytest.approx(0.25)


def test_pyramid_chip_equals_the_mean_of_its_source_pixels(tmp_path: Path) -> None:
    data = textured(3, 512, 512, "uint16", seed=3)
    path = write_raster(tmp_path / "s.tif", data, "EPSG:32633", UTM)
    with open_scene([(str(path), b) for b in (1, 2, 3)], None) as scene:
        chip, valid, nodata = scene.read_chip(0, 0, 2, 256, 16)
    expected = data.astype(np.float64).reshape(3, 256, 2, 256, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(chip, expected, atol=0.5)  # integer data: the mean, rounded
    assert valid.all() and nodata == 0.0


def test_pyramid_mean_uses_valid_pixels_only(tmp_path: Path) -> None:
    data = textured(1, 512, 512, "uint16", seed=5) + 2
    data[0, :1, :] = 1  # nodata row: every chip pixel of the first row averages 1 valid of 2 rows
    path = write_raster(tmp_path / "s.tif", data, "EPSG:32633", UTM, nodata=1)
    with open_scene([(str(path), 1)], None) as scene:
        chip, valid, nodata = scene.read_chip(0, 0, 2, 256, 16)
    assert nodata == pytest.approx(512 / 512**2)
    np.testing.assert_allclose(chip[0, 0], data[0, 1, :].reshape(256, 2).mean(axis=1), rtol=1e-5)
    assert valid.all()


def test_large_factors_let_gdal_pre_average_to_the_same_mean(tmp_path: Path) -> None:
    """Above max_read_factor GDAL averages first (bounded memory); the result is still the block mean."""
    data = textured(1, 512, 512, "uint16", seed=4)
    path = write_raster(tmp_path / "s.tif", data, "EPSG:32633", UTM)
    with open_scene([(str(path), 1)], None) as scene:
        chip, valid, nodata = scene.read_chip(0, 0, 4, 128, 2)
    expected = data.astype(np.float64).reshape(1, 128, 4, 128, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(chip, expected, atol=0.5)  # GDAL rounds its integer means
    assert valid.all() and nodata == pytest.approx(0.0)


def test_untagged_nan_is_nodata_on_both_read_paths(tmp_path: Path) -> None:
    """Float scenes often mark nodata with NaN and no tag: GDAL's pre-average must not count it as data."""
    data = textured(1, 512, 512, "float32", seed=6)
    data[:, :, :128] = np.nan  # a quarter of the scene, no nodata tag
    path = write_raster(tmp_path / "s.tif", data, "EPSG:32633", UTM)
    with open_scene([(str(path), 1)], None) as scene:
        exact = scene.read_chip(0, 0, 4, 128, 16)  # native read, averaged in numpy
        pre = scene.read_chip(0, 0, 4, 128, 2)  # GDAL averages first
    for chip, valid, nodata in (exact, pre):
        assert nodata == pytest.approx(0.25, abs=0.01)
        assert not valid[:, :32].any() and valid[:, 32:].all()
        assert np.isfinite(chip).all()
    np.testing.assert_allclose(pre[0][:, :, 32:], exact[0][:, :, 32:], rtol=1e-4)


def test_window_past_the_edge_is_padded_as_nodata(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "s.tif", textured(1, 200, 300), "EPSG:32633", UTM)
    with open_scene([(str(path), 1)], None) as scene:
        chip, valid, nodata = scene.read_chip(0, 0, 1, 256, 16)
    assert nodata == pytest.approx(1 - (200 * 256) / 256**2)
    assert not valid[200:].any() and valid[:200].all() and (chip[:, 200:] == 0).all()


def test_nodata_override_and_tag(tmp_path: Path) -> None:
    data = textured(1, 256, 256, "uint16") + 2  # no accidental 1s in the data
    data[:, :, :64] = 1
    path = write_raster(tmp_path / "s.tif", data, "EPSG:32633", UTM)
    with open_scene([(str(path), 1)], 1.0) as scene:
        _, _, nodata = scene.read_chip(0, 0, 1, 256, 16)
    assert nodata == pytest.approx(0.25)
    tagged = write_raster(tmp_path / "t.tif", data, "EPSG:32633", UTM, nodata=1)
    with open_scene([(str(tagged), 1)], None) as scene:
        _, _, nodata = scene.read_chip(0, 0, 1, 256, 16)
    assert nodata == pytest.approx(0.25)


def test_axis_offsets_cover_the_scene_without_near_duplicates() -> None:
    assert axis_offsets(1024, 256) == [0, 256, 512, 768]
    assert axis_offsets(700, 256) == [0, 256, 444]          # 188 px left: snapped edge window
    assert axis_offsets(600, 256) == [0, 256]               # 88 px left: not worth a chip
    assert axis_offsets(200, 256) == [0]                    # smaller than a chip: one padded window
    assert axis_offsets(100, 256) == []


def test_pyramid_stops_at_max_gsd_and_scene_size() -> None:
    assert pyramid_factors(0.5, 10000, 10000, 256, 2.0, 8, 0.5) == [1, 2, 4]
    assert pyramid_factors(0.5, 600, 600, 256, 128, 8, 0.5) == [1, 2]  # 4x: at most 34 % scene
    assert pyramid_factors(0.5, 600, 600, 256, 128, 8, 0.7) == [1, 2, 4]
    assert pyramid_factors(300, 10000, 10000, 256, 128, 8, 0.5) == [1]


def test_default_bands_follow_colour_interpretation(tmp_path: Path) -> None:
    assert default_bands(read_header(str(REPO / "data/sample/geotiff/aerial_korea_webmercator_rgb_0p6m.tif"))) \
        == [1, 2, 3]
    bgr = write_raster(tmp_path / "bgr.tif", textured(3, 64, 64), "EPSG:32633", UTM)
    with rasterio.open(bgr, "r+") as ds:
        ds.colorinterp = [rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.green,
                          rasterio.enums.ColorInterp.red]
    assert default_bands(read_header(str(bgr))) == [3, 2, 1]
    grey = write_raster(tmp_path / "g.tif", textured(1, 64, 64), "EPSG:32633", UTM)
    assert default_bands(read_header(str(grey))) == [1]


def test_percentile_stretch_is_per_scene_and_joint_by_default(tmp_path: Path) -> None:
    data = np.stack([np.full((64, 64), 1000, "uint16"), np.full((64, 64), 3000, "uint16")])
    data[:, 0, 0] = [0, 5000]
    path = write_raster(tmp_path / "s.tif", data, "EPSG:32633", UTM)
    with open_scene([(str(path), 1), (str(path), 2)], None) as scene:
        joint = scene.stretch("auto", (2, 98), False, 1024)
        per_band = scene.stretch("auto", (2, 98), True, 1024)
    assert joint.low == (1000.0, 1000.0) and joint.high == (3000.0, 3000.0)
    assert per_band.low[0] == 1000.0 and per_band.low[1] == 3000.0
    rgb = joint.to_uint8(np.array([[[1000.0]], [[3000.0]]]))
    assert rgb.ravel().tolist() == [0, 255]
    assert Stretch(None, None, None).to_uint8(np.array([[[300.0]]])).item() == 255


def test_tiff_datetime_tag() -> None:
    assert tiff_datetime_to_iso("2019:09:04 17:02:03") == "2019-09-04T17:02:03"
    assert tiff_datetime_to_iso("garbage") is None
