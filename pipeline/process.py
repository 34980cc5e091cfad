"""Turn one shard task into kept samples and rejected rows (the work a Beam worker does per shard).

Every candidate in a task ends up either in the shard or in its rejected table with a reason; bad
data never raises out of here.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from affine import Affine
from rasterio.errors import RasterioError

from pipeline import storage
from pipeline.chips import (
    check_quality,
    chip_key,
    decode_whole_image,
    encode_image,
    image_to_chip,
    key_scene_id,
    sha256_hex,
)
from pipeline.errors import SampleRejected
from pipeline.geometry import ChipGeometry, chip_geometries, level_for_gsd
from pipeline.params import HarvestParams
from pipeline.raster import Scene, Stretch, classify_error, error_text, gdal_env, open_scene
from pipeline.shard_writer import ShardWriter

_STRETCH_CACHE: OrderedDict[str, Stretch] = OrderedDict()  # per worker process: scenes split in parts


def base_row(source: str, meta: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A metadata row: the source's copied fields (licence, sensor...) plus the sample's own."""
    row = {"source": source, "license": meta["license"], "attribution": meta["attribution"],
           "sensor": meta.get("sensor"), "platform": meta.get("platform"), "acquired": meta.get("acquired"),
           "cloud_cover": meta.get("cloud_cover"), "declared_gsd_m": meta.get("declared_gsd_m"),
           "captions": [], "caption": None, "caption_source": None}
    row.update(fields)
    return row


def reject_candidate(writer: ShardWriter, task: dict[str, Any], key: str, uri: str, exc: SampleRejected,
                     **fields: Any) -> None:
    """Record a dropped candidate with its reason, detail and whatever was measured before it failed."""
    writer.reject({"key": key, "source": task["source"], "source_uri": uri, "reason": exc.reason,
                   "detail": exc.detail[:2000], **fields, **exc.fields})


def _scene_stretch(scene: Scene, spec: dict[str, Any], params: HarvestParams) -> Stretch:
    cache_key = repr((spec["channels"], spec["nodata"], spec["stretch"], params.stretch_percentiles,
                      params.stretch_per_band, params.stretch_sample_size))
    if cache_key not in _STRETCH_CACHE:
        _STRETCH_CACHE[cache_key] = scene.stretch(spec["stretch"], params.stretch_percentiles,
                                                  params.stretch_per_band, params.stretch_sample_size)
        while len(_STRETCH_CACHE) > 64:
            _STRETCH_CACHE.popitem(last=False)
    return _STRETCH_CACHE[cache_key]


def _raster_chip(scene: Scene, stretch: Stretch, spec: dict[str, Any], chip: list[int], geo: ChipGeometry,
                 params: HarvestParams) -> tuple[dict[str, Any], bytes]:
    k, _, _, col_off, row_off = chip
    factor, size = 2**k, params.chip_size
    side = size * factor
    try:
        values, valid, nodata_fraction = scene.read_chip(col_off, row_off, factor, size,
                                                         params.max_read_factor)
    except RasterioError as exc:
        raise SampleRejected("read_error", error_text(exc)) from exc
    rgb = stretch.to_uint8(values)
    if not valid.all():
        rgb = np.where(valid, rgb, 0).astype(np.uint8)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    check_quality(rgb, nodata_fraction, params.max_nodata_fraction, params.min_value_range, valid)
    image = encode_image(rgb, params.image_format, params.jpeg_quality)
    fields = {
        "crs": spec["crs"], "gsd_x_m": geo.gsd_x_m, "gsd_y_m": geo.gsd_y_m, "gsd_m": geo.gsd_m,
        "native_gsd_m": geo.native_gsd_m, "level": level_for_gsd(geo.gsd_m),
        "pyramid_level": k, "lon": geo.lon, "lat": geo.lat, "width": size, "height": size,
        "nodata_fraction": nodata_fraction, "pixel_window": [col_off, row_off, side, side],
        "bands": [b for _, b in spec["channels"]],
        "stretch_low": list(stretch.low) if stretch.low else None,
        "stretch_high": list(stretch.high) if stretch.high else None,
        "stretch_percentiles": list(stretch.percentiles) if stretch.percentiles else None,
    }
    return fields, image


def harvest_raster(task: dict[str, Any], params: HarvestParams, writer: ShardWriter) -> None:
    """Read, check, stretch and encode every chip of every scene part of a raster task."""
    for part in task["scenes"]:
        _harvest_scene_part(task, part, params, writer)


def _harvest_scene_part(task: dict[str, Any], part: dict[str, Any], params: HarvestParams,
                        writer: ShardWriter) -> None:
    spec, meta, chips = part["scene"], part["meta"], part["chips"]
    done = 0
    try:
        with open_scene([(u, b) for u, b in spec["channels"]], spec["nodata"]) as scene:
            if (scene.width, scene.height) != (spec["width"], spec["height"]):
                raise SampleRejected("unreadable", "the file changed since planning; re-run the harvest")
            stretch = _scene_stretch(scene, spec, params)
            # all chips' geometry in one go: off-Earth chips are rejected before any pixel is read
            windows = [(col_off, row_off, 2**k) for k, _, _, col_off, row_off in chips]
            geometries = chip_geometries(Affine(*spec["transform"]), spec["crs"], windows, params.chip_size,
                                         spec["width"], spec["height"])
            for chip, geo in zip(chips, geometries, strict=True):
                key = chip_key(task["source"], spec["scene_id"], *chip[:3])
                try:
                    if isinstance(geo, SampleRejected):
                        raise geo
                    fields, image = _raster_chip(scene, stretch, spec, chip, geo, params)
                except SampleRejected as exc:
                    where = {} if isinstance(geo, SampleRejected) else {"lon": geo.lon, "lat": geo.lat}
                    reject_candidate(writer, task, key, spec["uri"], exc, pyramid_level=chip[0], **where)
                else:
                    row = base_row(task["source"], meta, key=key, source_uri=spec["uri"],
                                   scene_id=spec["scene_id"], image_format=params.image_format,
                                   sha256=sha256_hex(image), **fields)
                    writer.add(row, image, geo.footprint)
                done += 1
    except (SampleRejected, RasterioError) as exc:
        failure = exc if isinstance(exc, SampleRejected) else SampleRejected(classify_error(exc), error_text(exc))
        for chip in chips[done:]:
            reject_candidate(writer, task, chip_key(task["source"], spec["scene_id"], *chip[:3]), spec["uri"],
                             failure, pyramid_level=chip[0])


def harvest_images(task: dict[str, Any], params: HarvestParams, writer: ShardWriter) -> None:
    """Decode, square-crop, resize and encode each image of a captioned-dataset task."""
    declared = task["meta"].get("declared_gsd_m")
    for rec in task["images"]:
        try:
            try:
                data = storage.read_bytes(rec["open_uri"])
            except FileNotFoundError as exc:
                raise SampleRejected("not_found", str(exc)) from exc
            except OSError as exc:
                raise SampleRejected("unreadable", str(exc)) from exc
            img = decode_whole_image(data, params.max_image_pixels)
            chip, scale = image_to_chip(img, params.chip_size)
            check_quality(np.transpose(chip, (2, 0, 1)), 0.0, params.max_nodata_fraction,
                          params.min_value_range)
        except SampleRejected as exc:
            reject_candidate(writer, task, rec["key"], rec["uri"], exc)
            continue
        image = encode_image(chip, params.image_format, params.jpeg_quality)
        gsd = declared * scale if declared else None
        captions = rec["captions"]
        row = base_row(
            task["source"], task["meta"], key=rec["key"], source_uri=rec["uri"],
            scene_id=key_scene_id(rec["key"], task["source"]),
            gsd_m=gsd, gsd_x_m=gsd, gsd_y_m=gsd, native_gsd_m=declared, level=level_for_gsd(gsd),
            pyramid_level=0, width=params.chip_size, height=params.chip_size, nodata_fraction=0.0,
            bands=[1, 2, 3], scene_class=rec.get("class"), source_split=rec.get("split"),
            image_format=params.image_format, sha256=sha256_hex(image), captions=captions,
            caption=captions[0] if captions else None, caption_source="source" if captions else None,
        )
        writer.add(row, image, None)


def record_errors(task: dict[str, Any], writer: ShardWriter) -> None:
    """Write the planning-time failures (missing files, unreadable headers...) as rejected rows."""
    for err in task["errors"]:
        writer.reject({"key": f"{task['source']}-{err['scene_id']}", "source": task["source"],
                       "source_uri": err["uri"], "reason": err["error"], "detail": err["detail"][:2000]})


def harvest_task(task: dict[str, Any], params: HarvestParams, writer: ShardWriter) -> None:
    """Dispatch a task to its kind's processor."""
    kind = task["kind"]
    if kind == "raster":
        with gdal_env(params.http_timeout_s, params.http_retries, params.gdal_config):
            harvest_raster(task, params, writer)
    elif kind == "images":
        harvest_images(task, params, writer)
    elif kind == "urls":
        from pipeline.urls import harvest_urls  # img2dataset is heavy: import only for URL tasks

        harvest_urls(task, params, writer)
    elif kind == "errors":
        record_errors(task, writer)
    else:
        raise ValueError(f"unknown task kind {kind!r}")
