"""A picture of a harvest: a world map of chip centres and a contact sheet of chips per source.

Written next to the metrics (`metrics/harvest_preview.png`) so `dvc plots show` and a reviewer see what
was harvested before reading any table. Deterministic: same harvest, same PNG bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
from PIL import Image, ImageDraw
from shapely.geometry import Polygon, shape

from pipeline import storage

THUMB = 96
PER_SOURCE = 8
MAP_W, MAP_H = 1024, 512
BOUNDARIES = Path(__file__).resolve().parents[1] / "data" / "boundaries" / "ne_110m_admin_0_countries.geojson"


def _project(lon: float, lat: float) -> tuple[float, float]:
    return (lon + 180.0) / 360.0 * MAP_W, (90.0 - lat) / 180.0 * MAP_H


def _world_map(points: list[tuple[float, float, int]]) -> Image.Image:
    """Equirectangular map: Natural Earth outlines, one dot per location, area ~ chip count."""
    img = Image.new("RGB", (MAP_W, MAP_H), (236, 242, 248))
    draw = ImageDraw.Draw(img)
    if BOUNDARIES.exists():
        for feature in json.loads(BOUNDARIES.read_text())["features"]:
            if not feature.get("geometry"):
                continue
            geom = shape(feature["geometry"])
            for polygon in getattr(geom, "geoms", [geom]):
                if isinstance(polygon, Polygon):
                    draw.polygon([_project(x, y) for x, y in polygon.exterior.coords], fill=(214, 214, 200),
                                 outline=(160, 160, 150))
    for lon, lat, n in points:
        x, y = _project(lon, lat)
        r = 3 + min(n, 400) ** 0.5
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(200, 40, 40), outline=(90, 0, 0))
    draw.text((8, MAP_H - 16), "chip centres (dot area ~ chips at a place)", fill=(40, 40, 40))
    return img


def _thumbs(output_dir: str, picks: list[dict[str, Any]]) -> dict[str, Image.Image]:
    by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in picks:
        by_shard[p["shard"]].append(p)
    out: dict[str, Image.Image] = {}
    for shard, rows in sorted(by_shard.items()):
        url = storage.join(output_dir, "shards", f"{shard}.tar")
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(url))) as tar:
            for r in rows:
                data = tar.extractfile(f"{r['key']}.{r['image_format']}")
                if data is not None:
                    out[r["key"]] = Image.open(io.BytesIO(data.read())).convert("RGB").resize((THUMB, THUMB))
    return out


def _contact_sheet(output_dir: str, picks: list[dict[str, Any]]) -> Image.Image:
    sources = sorted({p["source"] for p in picks})
    label_w, row_h = 170, THUMB + 14
    sheet = Image.new("RGB", (label_w + PER_SOURCE * (THUMB + 4), max(1, len(sources)) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    thumbs = _thumbs(output_dir, picks)
    for i, source in enumerate(sources):
        y = i * row_h
        draw.text((4, y + THUMB // 2), source, fill=(0, 0, 0))
        for j, p in enumerate([p for p in picks if p["source"] == source]):
            x = label_w + j * (THUMB + 4)
            if p["key"] in thumbs:
                sheet.paste(thumbs[p["key"]], (x, y))
            gsd = "GSD ?" if p["gsd_m"] is None else f"{p['gsd_m']:.3g} m"
            draw.text((x, y + THUMB), gsd + ("" if p["level"] is None else f"  L{p['level']}"), fill=(60, 60, 60))
    return sheet


def write_preview(output_dir: str, path: Path) -> None:
    """Map on top, contact sheet (up to 8 chips per source, spread over its GSDs) below."""
    pattern = storage.join(output_dir, "metadata", "*.parquet")
    if not storage.list_files(storage.join(output_dir, "metadata"), ".parquet"):
        return
    con = duckdb.connect()
    points = con.execute("SELECT round(lon, 1), round(lat, 1), count(*) FROM read_parquet(?) WHERE lon IS NOT "
                         "NULL GROUP BY ALL ORDER BY ALL", [pattern]).fetchall()
    rel = con.execute(  # round-robin over pyramid levels, so every GSD of a source is shown
        "SELECT source, key, shard, image_format, gsd_m, level FROM ("
        " SELECT *, row_number() OVER (PARTITION BY source, pyramid_level ORDER BY key) AS j"
        " FROM read_parquet(?))"
        f" QUALIFY row_number() OVER (PARTITION BY source ORDER BY j, pyramid_level) <= {PER_SOURCE}"
        " ORDER BY source, gsd_m NULLS LAST, key", [pattern])
    columns = [d[0] for d in rel.description]
    picks = [dict(zip(columns, row, strict=True)) for row in rel.fetchall()]
    world = _world_map([(float(x), float(y), int(n)) for x, y, n in points])
    sheet = _contact_sheet(output_dir, picks)
    canvas = Image.new("RGB", (max(world.width, sheet.width), world.height + sheet.height), "white")
    canvas.paste(world, (0, 0))
    canvas.paste(sheet, (0, world.height))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=False)
