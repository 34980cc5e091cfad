"""Remote GeoTIFF/COG sources: read by HTTP range requests through GDAL, never downloaded whole."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO, harvest_params, read_rows, run
from tests.http_server import serve

KOREA = REPO / "data/sample/geotiff/aerial_korea_webmercator_rgb_0p6m.tif"


def test_http_cog_gives_the_same_chips_as_the_local_file(tmp_path: Path) -> None:
    body = KOREA.read_bytes()
    requests: list[tuple[str, str, str | None]] = []

    entry = {"kind": "geotiff", "license": "CC0-1.0", "attribution": "rasterio test data"}
    run(harvest_params(tmp_path / "local", [{**entry, "name": "local", "uri": str(KOREA)}]))
    with serve({"/cogeo.tif": (200, body, "image/tiff")}, requests) as base:
        run(harvest_params(tmp_path / "remote", [{**entry, "name": "remote", "uri": f"{base}/cogeo.tif"}]))
    local, remote = read_rows(tmp_path / "local" / "harvest"), read_rows(tmp_path / "remote" / "harvest")
    assert len(local) == len(remote) == 21
    for a, b in zip(local, remote, strict=True):
        assert a["sha256"] == b["sha256"] and a["gsd_m"] == b["gsd_m"] and a["geometry"] == b["geometry"]
    assert remote[0]["source_uri"].startswith("http://127.0.0.1")
    gets = [r for r in requests if r[0] == "GET"]
    assert gets and all(rng for _, _, rng in gets), "every read must be an HTTP range request"
    fetched = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for _, _, r in gets)
    assert fetched <= 2 * len(body)  # windows and overviews, never one whole-file download
