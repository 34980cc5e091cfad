"""URL lists downloaded by img2dataset: kept images and every failure with img2dataset's message."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO, harvest_params, run
from tests.http_server import serve

CAPTIONED = REPO / "data/sample/captioned"


def _png(size: tuple[int, int], value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def url_server() -> str:
    routes = {
        "/rsicd.jpg": (200, (CAPTIONED / "rsicd/images/00002.jpg").read_bytes(), "image/jpeg"),
        "/sydney.tif": (200, (CAPTIONED / "sydney/images/1.tif").read_bytes(), "image/tiff"),
        "/bomb.png": (200, _png((3000, 3000)), "image/png"),
        "/flat.png": (200, _png((300, 300)), "image/png"),
        "/text.jpg": (200, b"<html>not an image</html>", "image/jpeg"),
    }
    with serve(routes) as base:
        yield base


def _run(tmp_path: Path, base: str, fmt: str) -> tuple[dict, list[dict], list[dict]]:
    urls = [f"{base}/rsicd.jpg", f"{base}/sydney.tif", f"{base}/missing.jpg", f"{base}/bomb.png",
            f"{base}/text.jpg", f"{base}/flat.png", "http://127.0.0.1:9/unreachable.jpg"]
    captions = ["dense residential blocks", "suburb of sydney", None, None, None, "flat", None]
    table = pa.table({"url": urls, "caption": captions})
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    entry = {"name": "web", "kind": "urls", "uri": str(path), "license": "test", "attribution": "test",
             "gsd_m": 0.5}
    summary = run(harvest_params(tmp_path, [entry], max_image_pixels=1_000_000, http_timeout_s=3,
                                 http_retries=0))
    kept = pq.read_table(next((tmp_path / "harvest/metadata").glob("*.parquet"))).to_pylist()
    rejected = pq.read_table(next((tmp_path / "harvest/rejected").glob("*.parquet"))).to_pylist()
    return summary, kept, rejected


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_url_list_keeps_img2dataset_status(tmp_path: Path, url_server: str, fmt: str) -> None:
    summary, kept, rejected = _run(tmp_path, url_server, fmt)
    assert [r["source_uri"].rsplit("/", 1)[-1] for r in kept] == ["rsicd.jpg", "sydney.tif"]
    assert kept[0]["caption"] == "dense residential blocks" and kept[0]["caption_source"] == "source"
    assert all((r["width"], r["height"]) == (256, 256) for r in kept)
    # Sydney is 500 px at 0.5 m: centre-cropped and resized to 256 px -> 0.977 m
    assert kept[1]["gsd_m"] == pytest.approx(0.5 * 500 / 256)
    reasons = {r["source_uri"].rsplit("/", 1)[-1]: r["reason"] for r in rejected}
    assert reasons == {"missing.jpg": "download_failed", "bomb.png": "image_too_large",
                       "text.jpg": "decode_error", "flat.png": "constant",
                       "unreachable.jpg": "download_failed"}
    messages = {r["source_uri"].rsplit("/", 1)[-1]: r["detail"] for r in rejected}
    assert "404" in messages["missing.jpg"]
    assert summary["written"] + summary["rejected"] == summary["candidates"] == 7


def test_url_rows_are_rgb_and_know_their_scene(tmp_path: Path, url_server: str) -> None:
    """A grey source image is stored as RGB (the metadata says bands 1,2,3); scene ids keep dashed names."""
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"{url_server}/sydney.tif"], "caption": ["x"]}), path)
    entry = {"name": "web-grey", "kind": "urls", "uri": str(path), "license": "test", "attribution": "test"}
    run(harvest_params(tmp_path, [entry], http_timeout_s=3, http_retries=0))
    [row] = pq.read_table(next((tmp_path / "harvest/metadata").glob("*.parquet"))).to_pylist()
    assert row["scene_id"] == row["key"][len("web-grey-"):]
    import tarfile

    with tarfile.open(next((tmp_path / "harvest/shards").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:  # type: ignore[union-attr]
            assert image.mode == "RGB"


def test_csv_list_problems_are_rows_not_silence(tmp_path: Path) -> None:
    """Wrong column names, a BOM, a non-UTF-8 line and an empty list each say what happened."""
    (tmp_path / "bom.csv").write_bytes("\ufefflink,desc\nhttp://127.0.0.1:9/a.jpg,one\n".encode())
    (tmp_path / "latin.csv").write_bytes(b"url,caption\nhttp://127.0.0.1:9/a.jpg,caf\xe9\n"
                                         b"http://127.0.0.1:9/b.jpg,ok\n")
    (tmp_path / "empty.csv").write_text("url,caption\n")
    base = {"kind": "urls", "license": "test", "attribution": "test"}
    entries = [{**base, "name": "bom", "uri": str(tmp_path / "bom.csv"), "url_col": "link", "caption_col": "desc"},
               {**base, "name": "wrongcol", "uri": str(tmp_path / "bom.csv")},
               {**base, "name": "latin", "uri": str(tmp_path / "latin.csv")},
               {**base, "name": "empty", "uri": str(tmp_path / "empty.csv")}]
    summary = run(harvest_params(tmp_path, entries, http_timeout_s=2, http_retries=0))
    rows = pq.read_table(tmp_path / "harvest/rejected").to_pylist()
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    assert [r["reason"] for r in by["bom"]] == ["download_failed"]  # the URL was read despite the BOM
    assert "no column(s) ['url', 'caption']" in by["wrongcol"][0]["detail"] and "link" in by["wrongcol"][0]["detail"]
    assert sorted(r["reason"] for r in by["latin"]) == ["download_failed", "unreadable"]
    assert "line 2 is not UTF-8" in next(r["detail"] for r in by["latin"] if r["reason"] == "unreadable")
    assert by["empty"][0]["reason"] == "not_found" and "lists no URLs" in by["empty"][0]["detail"]
    assert summary["written"] == 0 and summary["rejected"] == len(rows)
