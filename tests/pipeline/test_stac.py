"""STAC sources: static catalogs (pystac) and API searches (pystac-client), single and stacked assets."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pystac
import pytest
import rasterio
from rasterio.warp import transform_bounds

from tests.conftest import REPO, harvest_params, read_rows, run
from tests.http_server import json_route, serve

GEOTIFF = REPO / "data/sample/geotiff"
KOREA = GEOTIFF / "aerial_korea_webmercator_rgb_0p6m.tif"
BAND_A = GEOTIFF / "sentinel2_tile_mauritania_utm29n_bandA_200m.tif"
BAND_B = GEOTIFF / "sentinel2_tile_mauritania_utm29n_bandB_200m.tif"


def _item(item_id: str, path: Path, assets: dict[str, Path], **props: object) -> pystac.Item:
    with rasterio.open(path) as ds:
        bbox = list(transform_bounds(ds.crs, "EPSG:4326", *ds.bounds))
    geom = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]],
                                                 [bbox[0], bbox[3]], [bbox[0], bbox[1]]]]}
    item = pystac.Item(item_id, geom, bbox, dt.datetime(2021, 5, 17, 10, 30, tzinfo=dt.UTC), dict(props))
    for key, asset_path in assets.items():
        item.add_asset(key, pystac.Asset(str(asset_path), media_type=pystac.MediaType.COG, roles=["data"]))
    return item


@pytest.fixture()
def catalog(tmp_path: Path) -> Path:
    col = pystac.Collection("demo", "sample scenes", pystac.Extent(
        pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]])))
    col.add_item(_item("korea-aerial", KOREA, {"visual": KOREA}, platform="aircraft", gsd=0.6,
                       **{"eo:cloud_cover": 3.5, "instruments": ["rgb-camera"]}))
    col.add_item(_item("s2-tile", BAND_A, {"a": BAND_A, "b": BAND_B}, platform="sentinel-2b", gsd=200,
                       **{"eo:cloud_cover": 0.0, "instruments": ["msi"]}))
    col.normalize_hrefs(str(tmp_path / "stac"))
    col.save(pystac.CatalogType.SELF_CONTAINED)
    return tmp_path / "stac" / "collection.json"


def test_static_catalog_metadata_goes_into_every_chip(tmp_path: Path, catalog: Path) -> None:
    entry = {"name": "demo", "kind": "stac", "uri": str(catalog), "license": "test", "attribution": "test"}
    run(harvest_params(tmp_path, [entry]))
    korea = [r for r in read_rows(tmp_path / "harvest") if "korea" in r["key"]]
    assert korea
    for r in korea:
        assert r["platform"] == "aircraft" and r["sensor"] == "rgb-camera"
        assert r["cloud_cover"] == 3.5 and r["declared_gsd_m"] == 0.6
        assert r["acquired"].startswith("2021-05-17T10:30")
        assert r["source_uri"].endswith("korea-aerial.json#visual")
        assert r["crs"] == "EPSG:3857"


def test_three_assets_stack_into_rgb(tmp_path: Path, catalog: Path) -> None:
    entry = {"name": "demo", "kind": "stac", "uri": str(catalog), "license": "test", "attribution": "test",
             "assets": ["a", "b", "a"]}
    summary = run(harvest_params(tmp_path, [entry]))
    rows = [r for r in read_rows(tmp_path / "harvest") if "s2" in r["key"]]
    assert rows and all(r["platform"] == "sentinel-2b" and r["bands"] == [1, 1, 1] for r in rows)
    # the Korea item has no assets a/b: recorded, not dropped silently
    assert summary["by_reason"].get("bad_bands") == 1


def test_api_search_with_pystac_client(tmp_path: Path, catalog: Path) -> None:
    """A STAC API on loopback: landing page, conformance and POST /search, read by pystac-client."""
    items = [pystac.read_file(p).to_dict() for p in sorted((catalog.parent).rglob("*/*.json"))]
    seen: list[dict] = []

    def search(body: bytes) -> tuple[int, bytes, str]:
        query = json.loads(body or b"{}")
        seen.append(query)
        feats = [i for i in items if not query.get("collections") or i.get("collection") in query["collections"]]
        return json_route({"type": "FeatureCollection", "features": feats[: query.get("limit", 100)],
                           "links": []})

    with serve({}) as base:
        landing = {"type": "Catalog", "id": "api", "description": "test api", "stac_version": "1.0.0",
                   "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                                  "https://api.stacspec.org/v1.0.0/item-search"],
                   "links": [{"rel": "self", "href": f"{base}/"},
                             {"rel": "root", "href": f"{base}/"},
                             {"rel": "search", "href": f"{base}/search", "method": "POST",
                              "type": "application/geo+json"}]}
        routes = {"/": json_route(landing), "/search": search}
        with serve(routes) as api:
            landing_text = json.dumps(landing).replace(base, api)
            routes["/"] = (200, landing_text.encode(), "application/json")
            entry = {"name": "api", "kind": "stac", "uri": f"{api}/", "license": "test", "attribution": "test",
                     "collections": ["demo"], "max_items": 10, "assets": ["a"]}
            summary = run(harvest_params(tmp_path, [entry]))
    assert seen and seen[0]["collections"] == ["demo"]
    rows = read_rows(tmp_path / "harvest")
    assert rows and {r["platform"] for r in rows} == {"sentinel-2b"}
    assert summary["by_reason"].get("bad_bands") == 1  # the item without asset `a`


def test_broken_links_and_items_are_rows_and_the_rest_is_harvested(tmp_path: Path, catalog: Path) -> None:
    """One dangling link, one malformed item and one item without datetime must not lose the catalog."""
    col = json.loads(catalog.read_text())
    col["links"] += [{"rel": "item", "href": "./gone/gone.json", "type": "application/json"},
                     {"rel": "item", "href": "./broken/broken.json", "type": "application/json"},
                     {"rel": "item", "href": "./nodt/nodt.json", "type": "application/json"}]
    catalog.write_text(json.dumps(col))
    (catalog.parent / "broken").mkdir()
    (catalog.parent / "broken" / "broken.json").write_text('{"type": "Feature", "id": ')
    item = json.loads(next(catalog.parent.glob("korea-aerial/*.json")).read_text())
    item["id"], item["properties"]["datetime"] = "nodt", None
    (catalog.parent / "nodt").mkdir()
    (catalog.parent / "nodt" / "nodt.json").write_text(json.dumps(item))
    entry = {"name": "demo", "kind": "stac", "uri": str(catalog), "license": "test", "attribution": "test",
             "max_items": 5}  # max_items alone: still a static catalog
    summary = run(harvest_params(tmp_path, [entry]))
    assert summary["written"] > 0
    rejected = {r["source_uri"].rsplit("/", 1)[-1]: r for r in read_rows(tmp_path / "harvest", "rejected")}
    assert rejected["gone.json"]["reason"] == "not_found"
    assert rejected["broken.json"]["reason"] == "unreadable"
    assert "start_datetime" in rejected["nodt.json"]["detail"]  # pystac's own reason, not just "does not resolve"


def test_item_collection_and_default_rgb_assets(tmp_path: Path) -> None:
    """A FeatureCollection of items is read; without `visual`, red/green/blue assets (eo:bands) are stacked."""
    item = _item("rgb", BAND_A, {"B04": BAND_A, "B03": BAND_B, "B02": BAND_A, "B8A": BAND_B},
                 instruments="msi")
    for key, name in (("B04", "red"), ("B03", "green"), ("B02", "blue"), ("B8A", "nir08")):
        item.assets[key].extra_fields["eo:bands"] = [{"name": key, "common_name": name}]
    path = tmp_path / "items.json"
    path.write_text(json.dumps(pystac.ItemCollection([item]).to_dict()))
    entry = {"name": "coll", "kind": "stac", "uri": str(path), "license": "test", "attribution": "test"}
    summary = run(harvest_params(tmp_path, [entry]))
    rows = read_rows(tmp_path / "harvest")
    assert summary["written"] > 0 and rows
    assert all(r["source_uri"].endswith("#B04+B03+B02") for r in rows)
    assert {r["sensor"] for r in rows} == {"msi"}  # a string, not its letters joined


def test_a_static_catalog_with_search_keys_says_what_to_change(tmp_path: Path, catalog: Path) -> None:
    entry = {"name": "demo", "kind": "stac", "uri": str(catalog), "license": "test", "attribution": "test",
             "collections": ["demo"]}
    summary = run(harvest_params(tmp_path, [entry]))
    assert summary["written"] == 0
    [row] = read_rows(tmp_path / "harvest", "rejected")
    assert row["reason"] == "unreadable" and "remove them" in row["detail"]
