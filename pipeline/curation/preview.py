"""A picture of a curation run: where the curated samples are, and the funnel of every stage.

Written to `metrics/curate_preview.png` for `dvc plots show` and the data cards. Deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.preview import MAP_W, _world_map

KEPT = (60, 150, 80)
REASON_COLOURS = [(200, 60, 50), (230, 140, 40), (150, 90, 190), (60, 120, 200), (190, 170, 40), (120, 120, 120),
                  (40, 170, 170), (210, 90, 150)]


def _funnel_chart(rows: list[dict[str, Any]]) -> Image.Image:
    """One bar per stage: kept (green) then each drop reason, width proportional to rows in."""
    stages: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = stages.setdefault(r["stage"], {"in": 0, "kept": 0, "added": 0, "reasons": {}})
        for k in ("in", "kept", "added"):
            s[k] += r[k]
        for reason, n in dict(r["dropped_by_reason"]).items():
            s["reasons"][reason] = s["reasons"].get(reason, 0) + n
    reasons = sorted({reason for s in stages.values() for reason in s["reasons"]})
    colour = {reason: REASON_COLOURS[i % len(REASON_COLOURS)] for i, reason in enumerate(reasons)}
    label_w, bar_w, row_h = 90, MAP_W - 90 - 340, 26
    widest = max((s["in"] for s in stages.values()), default=1) or 1
    img = Image.new("RGB", (MAP_W, 30 + row_h * len(stages) + 18 * len(reasons) + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), "funnel: rows in per stage = kept (green) + dropped by reason", fill=(0, 0, 0))
    for i, (stage, s) in enumerate(stages.items()):
        y = 30 + i * row_h
        draw.text((8, y + 6), stage, fill=(0, 0, 0))
        x = label_w
        for part, n in [("kept", s["kept"]), *sorted(s["reasons"].items())]:
            w = round(bar_w * n / widest)
            draw.rectangle((x, y, x + max(w - 1, 0), y + row_h - 6), fill=KEPT if part == "kept" else colour[part])
            x += w
        dropped = sum(s["reasons"].values())
        extra = f" +{s['added']} sentence rows" if s["added"] else ""
        draw.text((label_w + bar_w + 10, y + 6), f"{s['in']} in, {s['kept']} kept, {dropped} dropped{extra}",
                  fill=(40, 40, 40))
    y = 30 + row_h * len(stages) + 4
    for j, reason in enumerate(reasons):
        draw.rectangle((label_w, y + j * 18, label_w + 12, y + j * 18 + 12), fill=colour[reason])
        draw.text((label_w + 18, y + j * 18), reason, fill=(40, 40, 40))
    return img


def write_curation_preview(output_dir: str, rows: list[dict[str, Any]], path: Path) -> None:
    """World map of the curated samples on top, the funnel below."""
    pattern = storage.join(output_dir, "metadata", "*.parquet")
    points = duckdb.connect().execute(
        "SELECT round(lon, 1), round(lat, 1), count(*) FROM read_parquet(?) WHERE lon IS NOT NULL "
        "GROUP BY ALL ORDER BY ALL", [pattern]).fetchall()
    world = _world_map([(float(x), float(y), int(n)) for x, y, n in points])
    chart = _funnel_chart(rows)
    canvas = Image.new("RGB", (max(world.width, chart.width), world.height + chart.height), "white")
    canvas.paste(world, (0, 0))
    canvas.paste(chart, (0, world.height))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=False)
