"""Bad input never crashes the job and is never dropped silently: each case becomes a rejected row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.rpc import RPC
from rasterio.transform import from_origin

from tests.conftest import REPO, harvest_params, read_rows, run, textured, write_raster

NAIP = REPO / "data/sample/geotiff/naip_northdakota_nad83utm14n_rgbn_5m.tif"


def _entry(name: str, uri: str, kind: str = "geotiff", **extra: object) -> dict:
    return {"name": name, "kind": kind, "uri": uri, "license": "test", "attribution": "test", **extra}


@pytest.fixture(scope="module")
def bad_harvest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bad")
    truncated = tmp / "truncated.tif"
    data = NAIP.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    (tmp / "text.tif").write_text("this is not a raster\n")
    (tmp / "empty.tif").write_bytes(b"")
    write_raster(tmp / "nocrs.tif", textured(3, 300, 300), None, from_origin(0, 0, 1, 1))
    with rasterio.open(tmp / "gcps.tif", "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8") as ds:
        ds.write(textured(1, 300, 300))
        ds.gcps = ([GroundControlPoint(0, 0, -99.0, 47.0), GroundControlPoint(300, 300, -98.9, 46.9),
                    GroundControlPoint(0, 300, -99.0, 46.9)], rasterio.crs.CRS.from_epsg(4326))
    utm = from_origin(500000, 5200000, 10, 10)
    write_raster(tmp / "allnodata16.tif", np.zeros((1, 300, 300), "uint16"), "EPSG:32614", utm, nodata=0)
    write_raster(tmp / "allnodata8.tif", np.zeros((3, 300, 300), "uint8"), "EPSG:32614", utm, nodata=0)
    write_raster(tmp / "constant.tif", np.full((3, 300, 300), 77, "uint8"), "EPSG:32614", utm)
    write_raster(tmp / "tiny.tif", textured(3, 40, 40), "EPSG:32614", utm)  # under half a 128 px chip
    write_raster(tmp / "scene[1].tif", textured(3, 128, 128), "EPSG:32614", utm)  # glob characters in a name
    (tmp / "folder.tif").mkdir()
    with rasterio.open(tmp / "palette.tif", "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8",
                       crs="EPSG:32614", transform=utm, photometric="palette") as ds:
        ds.write(textured(1, 300, 300) // 32)
        ds.write_colormap(1, {i: (32 * i, 255 - 32 * i, 128, 255) for i in range(8)})
    with rasterio.open(tmp / "rpcs.tif", "w", driver="GTiff", width=300, height=300, count=1, dtype="uint8") as ds:
        ds.write(textured(1, 300, 300))
        ds.rpcs = RPC(height_off=0, height_scale=100, lat_off=47.0, lat_scale=0.01, line_den_coeff=[1] + [0] * 19,
                      line_num_coeff=[0, 0, -1] + [0] * 17, line_off=150, line_scale=150, long_off=-99.0,
                      long_scale=0.01, samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18,
                      samp_off=150, samp_scale=150)
    with rasterio.open(tmp / "bomb.tif", "w", driver="GTiff", width=200_000, height=200_000, count=1,
                       dtype="uint8", crs="EPSG:32614", transform=utm, tiled=True, sparse_ok=True) as ds:
        pass  # 4e10 pixels declared, a few hundred bytes on disk
    # a captioned dataset with a good image, a decompression bomb, a corrupt file and a missing one
    cap = tmp / "captioned"
    (cap / "images").mkdir(parents=True)
    shutil.copy(REPO / "data/sample/captioned/rsicd/images/00001.jpg", cap / "images" / "good.jpg")
    Image.new("L", (3000, 3000), 128).save(cap / "images" / "bomb.png")
    (cap / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    images = [{"filename": n, "split": "train", "sentences": [{"raw": f"caption of {n}"}]}
              for n in ("good.jpg", "bomb.png", "corrupt.jpg", "missing.jpg")]
    (cap / "dataset.json").write_text(json.dumps({"images": images}))
    sources = [
        _entry("good", str(NAIP), bands=[1, 2, 3]),
        _entry("truncated", str(truncated)),
        _entry("text", str(tmp / "text.tif")),
        _entry("empty-file", str(tmp / "empty.tif")),
        _entry("nocrs", str(tmp / "nocrs.tif")),
        _entry("gcps", str(tmp / "gcps.tif")),
        _entry("allnodata16", str(tmp / "allnodata16.tif")),
        _entry("allnodata8", str(tmp / "allnodata8.tif")),
        _entry("constant", str(tmp / "constant.tif")),
        _entry("tiny", str(tmp / "tiny.tif")),
        _entry("brackets", str(tmp / "scene[1].tif")),
        _entry("folder", str(tmp / "folder.tif")),
        _entry("rpcs", str(tmp / "rpcs.tif")),
        _entry("palette", str(tmp / "palette.tif")),
        _entry("bomb", str(tmp / "bomb.tif")),
        _entry("badband", str(NAIP), bands=[7]),
        _entry("noglob", str(tmp / "nothing" / "*.tif")),
        _entry("unreachable", "http://127.0.0.1:9/scene.tif"),
        _entry("caps", str(cap / "dataset.json"), kind="captioned"),
        _entry("nocaps", str(tmp / "missing.json"), kind="captioned"),
    ]
    params = harvest_params(tmp, sources, chip_size=128, max_image_pixels=1_000_000, http_timeout_s=2,
                            http_retries=0)
    summary = run(params)
    return {"summary": summary, "rejected": read_rows(tmp / "harvest", "rejected"),
            "kept": read_rows(tmp / "harvest")}


def _reasons(result: dict, source: str) -> set[str]:
    return {r["reason"] for r in result["rejected"] if r["source"] == source}


def _kept(result: dict, source: str) -> int:
    return sum(1 for r in result["kept"] if r["source"] == source)


def test_good_source_survives_its_bad_neighbours(bad_harvest: dict) -> None:
    assert _kept(bad_harvest, "good") > 10
    s = bad_harvest["summary"]
    assert s["written"] + s["rejected"] == s["candidates"]


def test_truncated_tiff(bad_harvest: dict) -> None:
    assert _reasons(bad_harvest, "truncated") & {"read_error", "unreadable"}
    details = [r["detail"] for r in bad_harvest["rejected"] if r["source"] == "truncated"]
    assert details and all("truncated or corrupt" in d for d in details), details[:1]  # GDAL's cause, and what to do
    assert not any(d.startswith("Read failed. See previous exception") and d.count(":") == 0 for d in details)


@pytest.mark.parametrize(("source", "reason"), [
    ("text", "not_a_raster"), ("empty-file", "unreadable"), ("nocrs", "no_crs"), ("gcps", "no_georeference"),
    ("rpcs", "no_georeference"), ("folder", "not_a_raster"), ("tiny", "nodata"), ("palette", "bad_bands"),
    ("allnodata16", "empty_raster"), ("allnodata8", "nodata"), ("constant", "constant"),
    ("bomb", "image_too_large"), ("badband", "bad_bands"), ("noglob", "not_found"),
    ("unreachable", "unreachable"), ("nocaps", "not_found"),
])
def test_bad_scene_gets_a_reason(bad_harvest: dict, source: str, reason: str) -> None:
    reasons = _reasons(bad_harvest, source)
    # a coarse pyramid chip of a small scene can also be mostly padding (`nodata`)
    assert reason in reasons and reasons <= {reason, "nodata"}
    assert _kept(bad_harvest, source) == 0


def test_bad_scene_details_say_what_to_do(bad_harvest: dict) -> None:
    detail = {r["source"]: r["detail"] for r in bad_harvest["rejected"]}
    assert "0 bytes" in detail["empty-file"]
    assert "folder" in detail["folder"] and "*.tif" in detail["folder"]
    assert "gdalwarp -rpc" in detail["rpcs"]
    assert "-expand rgb" in detail["palette"]
    assert detail["tiny"].startswith("nodata fraction 0.9")  # the one padded window of a 40 px scene


def test_a_file_named_like_a_glob_is_read_as_named(bad_harvest: dict) -> None:
    assert _kept(bad_harvest, "brackets") == 1


def test_captioned_bad_images(bad_harvest: dict) -> None:
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r["reason"] for r in bad_harvest["rejected"]
            if r["source"] == "caps"}
    assert rows == {"bomb.png": "image_too_large", "corrupt.jpg": "decode_error", "missing.jpg": "not_found"}
    assert _kept(bad_harvest, "caps") == 1


def test_bad_params_stop_before_any_work(tmp_path: Path) -> None:
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match="chip_size"):
        harvest_params(tmp_path, [_entry("good", str(NAIP))], chip_size=3)


def test_captioned_records_malformed_repeated_or_odd(tmp_path: Path) -> None:
    """A bad record is one row (the others are kept), a repeated image is one sample with both captions,
    a numeric split is text, and a dashed source name does not leak into scene_id."""
    cap = tmp_path / "cap"
    (cap / "images").mkdir(parents=True)
    for name in ("00001.jpg", "00002.jpg"):
        shutil.copy(REPO / "data/sample/captioned/rsicd/images" / name, cap / "images" / name)
    images = [{"filename": "00001.jpg", "split": 1, "sentences": [{"raw": "a river"}]},
              {"filename": "00001.jpg", "split": 1, "sentences": [{"raw": "a bridge"}, {"raw": "a river"}]},
              "not a record",
              {"filename": "00002.jpg", "sentences": None},
              {"sentences": [{"raw": "no file"}]}]
    (cap / "dataset.json").write_text(json.dumps({"images": images}))
    summary = run(harvest_params(tmp_path, [_entry("my-caps", str(cap / "dataset.json"), kind="captioned")]))
    kept = read_rows(tmp_path / "harvest")
    rejected = read_rows(tmp_path / "harvest", "rejected")
    assert len(kept) == 2 and len({r["key"] for r in kept}) == 2
    first = next(r for r in kept if "00001" in r["key"])
    assert first["captions"] == ["a river", "a bridge"] and first["source_split"] == "1"
    assert all(r["scene_id"] == r["key"][len("my-caps-"):] for r in kept)
    details = sorted(r["detail"] for r in rejected)
    assert len(details) == 2 and "images[2] is a str" in details[0] and "images[4] has no filename" in details[1]
    assert summary["written"] + summary["rejected"] == summary["candidates"] == 4
