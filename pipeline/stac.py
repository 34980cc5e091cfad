"""Turn a STAC source (static catalog, collection, item, or API search) into raster scene references."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pystac

from pipeline.chips import scene_id, slug
from pipeline.errors import SampleRejected
from pipeline.params import StacSource

_GEOTIFF_TYPES = ("image/tiff", "image/vnd.stac.geotiff")


def _items(source: StacSource) -> list[pystac.Item]:
    """Items of the source, sorted by (collection, id) so the plan does not depend on server order."""
    if source.is_api_search:
        from pystac_client import Client  # imported here: only API sources need it

        search = Client.open(source.uri).search(
            collections=source.collections, bbox=source.bbox, datetime=source.datetime,
            max_items=source.max_items, query=source.query,
        )
        items = list(search.items())
    else:
        obj = pystac.read_file(source.uri)
        if isinstance(obj, pystac.Item):
            items = [obj]
        elif isinstance(obj, pystac.Catalog):  # Collections are Catalogs too
            items = list(obj.get_items(recursive=True))
        else:
            raise SampleRejected("not_found", f"{source.uri} is a STAC {type(obj).__name__}, not a catalog, "
                                 "collection or item")
    return sorted(items, key=lambda it: (it.collection_id or "", it.id))


def _pick_assets(item: pystac.Item, wanted: list[str] | None) -> list[str]:
    if wanted:
        missing = [k for k in wanted if k not in item.assets]
        if missing:
            raise SampleRejected("bad_bands", f"item {item.id} has no asset(s) {missing}; it has "
                                 f"{sorted(item.assets)} (set `assets` in the sources file)")
        return list(wanted)
    if "visual" in item.assets:
        return ["visual"]
    for key in sorted(item.assets):
        media = (item.assets[key].media_type or "").lower()
        if media.startswith(_GEOTIFF_TYPES) or item.assets[key].href.lower().endswith((".tif", ".tiff")):
            return [key]
    raise SampleRejected("bad_bands", f"item {item.id} has no GeoTIFF asset; set `assets` in the sources file")


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def item_scene(item: pystac.Item, source: StacSource) -> dict[str, Any]:
    """A scene reference for one item: the files/bands to read and the STAC metadata to copy."""
    keys = _pick_assets(item, source.assets)
    assets = [item.assets[k] for k in keys]
    hrefs = [a.get_absolute_href() or a.href for a in assets]
    props = item.properties
    if len(keys) == 3:
        channels: list[list[Any]] | None = [[h, 1] for h in hrefs]
    elif source.bands:
        channels = [[hrefs[0], b] for b in source.bands]
    else:
        channels = None  # decided from the file's colour interpretation when its header is read
    instruments = props.get("instruments")
    acquired = item.datetime.isoformat() if item.datetime else props.get("start_datetime")
    self_href = item.get_self_href() or f"{source.uri}#{item.id}"
    return {
        "uri": f"{self_href}#{'+'.join(keys)}",
        "scene_id": f"{slug(item.id)}-{scene_id(self_href + '+'.join(keys)).rsplit('-', 1)[-1]}",
        "open_uri": hrefs[0],
        "channels": channels,
        "meta": {
            "platform": _first(props.get("platform"), source.platform),
            "sensor": _first(",".join(instruments) if instruments else None, source.sensor),
            "acquired": _first(acquired, source.acquired),
            "cloud_cover": props.get("eo:cloud_cover"),
            "declared_gsd_m": _first(assets[0].extra_fields.get("gsd"), props.get("gsd")),
        },
    }


def stac_scenes(source: StacSource) -> Iterator[dict[str, Any]]:
    """Scene references for every item; an item whose assets do not fit yields an `error` entry."""
    for item in _items(source):
        try:
            yield item_scene(item, source)
        except SampleRejected as exc:
            yield {"error": exc.reason, "detail": exc.detail, "uri": item.get_self_href() or item.id,
                   "scene_id": slug(item.id)}
