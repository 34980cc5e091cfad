"""Turn a STAC source (static catalog, collection, item, or API search) into raster scene references."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pystac

from pipeline.chips import scene_id, slug
from pipeline.errors import SampleRejected
from pipeline.params import StacSource

_GEOTIFF_TYPES = ("image/tiff", "image/vnd.stac.geotiff")


def _search(source: StacSource) -> list[pystac.Item]:
    """Items of a STAC API search; an endpoint that cannot search says what to change."""
    from pystac_client import Client  # imported here: only API sources need it
    from pystac_client.errors import ClientTypeError
    from pystac_client.exceptions import APIError
    from pystac_client.warnings import PystacClientWarning

    try:
        client = Client.open(source.uri)
        search = client.search(collections=source.collections, bbox=source.bbox, datetime=source.datetime,
                               max_items=source.max_items, query=source.query)
        return list(search.items())
    except APIError as exc:
        raise SampleRejected("unreachable", f"STAC API {source.uri}: {exc}") from exc
    except (PystacClientWarning, ClientTypeError) as exc:  # a static catalog or collection, not an API
        raise SampleRejected("unreadable", f"{source.uri} is not a STAC API with item search ({exc}); "
                             "collections/bbox/datetime/query need one: remove them to read it as a static "
                             "catalog") from exc


def _walk(catalog: pystac.Catalog, problems: list[dict[str, Any]]) -> Iterator[pystac.Item]:
    """Every item below `catalog`; a child or item link that does not resolve becomes a problem row
    instead of ending the walk (one broken link must not lose the rest of the catalog)."""
    root = catalog.get_root()
    for link in catalog.get_links():
        if link.rel not in ("child", "item"):
            continue
        try:
            target = link.resolve_stac_object(root=root).target
        except Exception as exc:  # pystac raises STACError, STACTypeError, OSError, JSON errors...
            href = link.get_absolute_href() or link.href
            problems.append(_problem(href, exc))
            continue
        if isinstance(target, pystac.Item):
            yield target
        elif isinstance(target, pystac.Catalog):
            yield from _walk(target, problems)


def _problem(href: str, exc: BaseException) -> dict[str, Any]:
    missing = isinstance(exc, FileNotFoundError) or ("://" not in href and not os.path.exists(href))
    cause = exc.__cause__ or exc.__context__  # pystac's "does not resolve" hides the real reason
    why = f"{exc}: {cause}" if cause is not None and str(cause) not in str(exc) else str(exc)
    return {"error": "not_found" if missing else "unreadable", "detail": f"{href}: {why}", "uri": href,
            "scene_id": slug(href.rsplit("/", 1)[-1].rsplit(".", 1)[0]) or "link"}


def _items(source: StacSource, problems: list[dict[str, Any]]) -> list[pystac.Item]:
    """Items of the source, sorted by (collection, id) so the plan does not depend on server order."""
    if source.is_api_search:
        items = _search(source)
    else:
        obj: pystac.STACObject | pystac.ItemCollection
        try:
            obj = pystac.read_file(source.uri)
        except pystac.STACTypeError:  # a GeoJSON FeatureCollection of items (an ItemCollection)
            obj = pystac.ItemCollection.from_file(source.uri)
        if isinstance(obj, pystac.Item):
            items = [obj]
        elif isinstance(obj, pystac.Catalog):  # Collections are Catalogs too
            items = list(_walk(obj, problems))
        elif isinstance(obj, pystac.ItemCollection):
            items = list(obj.items)
        else:
            raise SampleRejected("unreadable", f"{source.uri} is a STAC {type(obj).__name__}, not a catalog, "
                                 "collection, item or item collection")
    items = sorted(items, key=lambda it: (it.collection_id or "", it.id))
    if source.max_items is not None and not source.is_api_search:  # the API search applied it already
        items = items[:source.max_items]
    return items


def _pick_assets(item: pystac.Item, wanted: list[str] | None) -> list[str]:
    if wanted:
        missing = [k for k in wanted if k not in item.assets]
        if missing:
            raise SampleRejected("bad_bands", f"item {item.id} has no asset(s) {missing}; it has "
                                 f"{sorted(item.assets)} (set `assets` in the sources file)")
        return list(wanted)
    if "visual" in item.assets:
        return ["visual"]
    rgb = _rgb_assets(item)
    if rgb:
        return rgb
    for key in sorted(item.assets):
        media = (item.assets[key].media_type or "").lower()
        if media.startswith(_GEOTIFF_TYPES) or item.assets[key].href.lower().endswith((".tif", ".tiff")):
            return [key]
    raise SampleRejected("bad_bands", f"item {item.id} has no GeoTIFF asset; set `assets` in the sources file")


def _rgb_assets(item: pystac.Item) -> list[str] | None:
    """Single-band red, green and blue assets, by key or by `eo:bands` common name (Landsat, Sentinel-2)."""
    found: dict[str, str] = {}
    for key in sorted(item.assets):
        asset = item.assets[key]
        bands = asset.extra_fields.get("eo:bands") or []
        if len(bands) > 1:
            continue  # a multi-band asset is not one colour channel
        names = {key.lower()} | {str(b.get("common_name", "")).lower() for b in bands if isinstance(b, dict)}
        for colour in ("red", "green", "blue"):
            if colour in names and colour not in found:
                found[colour] = key
    return [found[c] for c in ("red", "green", "blue")] if len(found) == 3 else None


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
    if isinstance(instruments, str):  # the spec says a list; some catalogs give one string
        instruments = [instruments]
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
    problems: list[dict[str, Any]] = []
    for item in _items(source, problems):
        try:
            yield item_scene(item, source)
        except SampleRejected as exc:
            yield {"error": exc.reason, "detail": exc.detail, "uri": item.get_self_href() or item.id,
                   "scene_id": slug(item.id)}
    yield from problems
