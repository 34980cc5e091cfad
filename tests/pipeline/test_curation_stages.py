"""Curation stages on purpose-built inputs: a VLM endpoint on loopback, and copies of a scene for dedup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import rasterio

from tests.conftest import SAMPLE, curate, curation_params, harvest_params, read_rows, run
from tests.vlm_server import ok, status, vlm_server


def _vlm(base_url: str, **extra: object) -> dict[str, object]:
    return {"base_url": base_url, "model": "test-vlm", "api_key_env": "T2E_TEST_VLM_KEY", "backoff_s": 0.01,
            "max_backoff_s": 0.02, "timeout_s": 5, "max_retries": 1, **extra}


def test_vlm_captions_failures_and_cache(sample_harvest: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2E_TEST_VLM_KEY", "sk-test-secret")
    with vlm_server(api_key="sk-test-secret") as server:
        server.default = status(500)
        caption = {"per_source": {"naip-north-dakota": "vlm"}, "vlm": _vlm(server.base_url)}
        params = curation_params(tmp_path / "a", sample_harvest, caption=caption)
        first = curate(params, ("geo", "caption"))["caption"]
        naip = first["by_source"]["naip-north-dakota"]
        assert naip["kept"] == 0 and naip["reasons"] == {"vlm_failed": 15}
        failed_calls = server.calls()
        server.default = ok()
        second = curate(params, ("geo", "caption"))["caption"]  # the failed shard is redone, the rest kept
        assert second["by_source"]["naip-north-dakota"]["kept"] == 15 and second["rejected"] == 0
        assert server.calls() == failed_calls + 15
        rows = [r for r in read_rows(tmp_path / "a" / "curation" / "caption") if r["source"] == "naip-north-dakota"]
        assert {r["caption_source"] for r in rows} == {"vlm:test-vlm"}
        assert all(r["caption"] for r in rows)
        sent = server.requests[-1].prompt or ""
        assert "North America" in sent and "m" in sent  # place and GSD hints reach the prompt
        # a fresh output folder with the same cache pays for nothing
        params_b = curation_params(tmp_path / "b", sample_harvest, caption={
            **caption, "vlm_cache_dir": str(tmp_path / "a" / "cache" / "vlm")})
        curate(params_b, ("geo", "caption"))
        assert server.calls() == failed_calls + 15
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert b"sk-test-secret" not in path.read_bytes(), path


def _recompressed(src: Path, dst: Path) -> Path:
    """The same scene, same georeference, stored as lossy JPEG-in-TIFF (a re-encoded copy)."""
    with rasterio.open(src) as ds:
        profile = ds.profile | {"compress": "JPEG", "jpeg_quality": 80, "photometric": "YCBCR", "tiled": True,
                                "blockxsize": 256, "blockysize": 256}
        data = ds.read()
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    return dst


@pytest.mark.slow
def test_dedup_stage_removes_copies_and_keeps_distinct_uniform_scenes(tmp_path: Path, in_repo: Path) -> None:
    korea = SAMPLE / "geotiff" / "aerial_korea_webmercator_rgb_0p6m.tif"
    copy = _recompressed(korea, tmp_path / "korea_jpeg.tif")
    greenland = SAMPLE / "geotiff" / "landsat8_greenland_utm21n_1band_uint16_100m.tif"
    shutil.copy(greenland, tmp_path / "greenland.tif")
    entry = {"kind": "geotiff", "license": "CC0-1.0", "attribution": "test"}
    sources = [{**entry, "name": "korea-a", "uri": str(korea)}, {**entry, "name": "korea-b", "uri": str(korea)},
               {**entry, "name": "korea-c", "uri": str(copy)},
               {**entry, "name": "greenland", "uri": str(tmp_path / "greenland.tif"), "nodata": 0}]
    harvest = harvest_params(tmp_path / "h", sources)
    run(harvest)
    params = curation_params(tmp_path / "c", Path(harvest.output_dir), filter={"top_percent": 100})
    metrics = curate(params, ("geo", "caption", "clip", "filter", "dedup"))["dedup"]
    dropped = read_rows(tmp_path / "c" / "curation" / "dedup", "rejected")
    kept = read_rows(tmp_path / "c" / "curation" / "dedup")
    korea_chips = sum(1 for r in read_rows(Path(harvest.output_dir)) if r["source"] == "korea-a")
    exact = [d for d in dropped if d["reason"] == "duplicate_exact"]
    near = [d for d in dropped if d["reason"] == "duplicate_near"]
    assert len(exact) == korea_chips  # korea-a and korea-b are byte-identical: one of each pair goes
    assert {d["source"] for d in exact} <= {"korea-a", "korea-b"}
    assert len(near) >= korea_chips * 0.8  # the re-compressed copies (a few may differ too much)
    by_key = {r["image_key"]: r for r in kept}
    for d in exact + near:
        survivor = by_key[d["duplicate_of"]]
        assert survivor["source"].startswith("korea")
        assert abs(survivor["lon"] - d["lon"]) < 1e-9 and abs(survivor["lat"] - d["lat"]) < 1e-9  # same place
    # greenland: many near-uniform ice and sea chips, all at different places: none merged
    assert not [d for d in dropped if d["source"] == "greenland"]
    assert metrics["in"] == metrics["kept"] + metrics["rejected"]


def test_clip_rejects_missing_and_undecodable_images(sample_harvest: Path, tmp_path: Path) -> None:
    import io
    import tarfile

    harvest = tmp_path / "harvest"
    shutil.copytree(sample_harvest, harvest)
    shard = harvest / "shards" / "aerial-korea-00000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    images = [m.name for m, _ in members if m.name.endswith(".jpg")]
    broken, missing = images[0], images[1]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            if member.name == missing:
                continue
            if member.name == broken:
                data = data[:200]  # a truncated JPEG
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    params = curation_params(tmp_path / "c", harvest)
    metrics = curate(params, ("geo", "caption", "clip"))["clip"]
    assert metrics["by_reason"] == {"decode_error": 1, "image_missing": 1}
    rejected = {r["image_key"]: r["reason"] for r in read_rows(tmp_path / "c" / "curation" / "clip", "rejected")}
    assert rejected == {broken.split(".")[0]: "decode_error", missing.split(".")[0]: "image_missing"}
