"""The static HTML data-card site of a published dataset, for auditors: opens from disk, no network.

Every number is aggregated in DuckDB over the published views (10M+ rows never reach Python); the gallery
and example rows are bounded samples ordered by md5 of the key, so the same dataset gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import h3
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from PIL import Image

from pipeline import storage
from pipeline.cards import charts
from pipeline.publish.query import connect
from pipeline.schema import (
    CURATION_REASONS,
    PUBLISH_REASONS,
    PUBLISHED_REJECTED_SCHEMA,
    PUBLISHED_SCHEMA,
    REJECT_REASONS,
)

TEMPLATES = Path(__file__).parent / "templates" / "site"
PAGES = (("index.html", "Overview"), ("sources.html", "Sources"), ("funnel.html", "Funnel"),
         ("geography.html", "Geography"), ("quality.html", "Resolution & quality"), ("gallery.html", "Gallery"),
         ("rejected.html", "Rejected"), ("schema.html", "Schema"), ("lineage.html", "Lineage"))
SPLITS = ("train", "val", "test")
MAP_H3_RESOLUTION = 3      # ~12,000 km² cells: visible on a world map, few enough (≤ 41k) to draw
GALLERY_PER_LEVEL = 8
EXAMPLES_PER_REASON = 5
THUMB_PX = 192
CAPTION_WORDS_CAP = 80     # longer captions share the last bar
CLIP_BINS = 40


def build_site(git10m_dir: str, out_dir: Path, lineage: dict[str, Any], filter_params: dict[str, Any],
               boundaries: Path = Path("data/boundaries/ne_110m_admin_0_countries.geojson")) -> list[Path]:
    """Write data_cards/site/index.html and its pages + assets; return the files written."""
    if not Path(boundaries).exists():
        raise FileNotFoundError(f"Natural Earth outlines not found at {boundaries}: pass `boundaries` (the "
                                "repo keeps data/boundaries/ne_110m_admin_0_countries.geojson)")
    out_dir = Path(out_dir)
    assets = out_dir / "assets"
    con = connect(git10m_dir)
    checksums = storage.read_bytes(storage.join(git10m_dir, "checksums.sha256"))
    sums = {path.strip(): digest for digest, path in
            (line.split(None, 1) for line in checksums.decode("utf-8").splitlines() if line.strip())}
    steps = _stage_steps(con)
    overview = _overview(con, git10m_dir, sums, steps)
    steps.setdefault("publish", max(steps.values(), default=0) + 1)  # rejects of a publish the funnel omits
    sources = [r[0] for r in con.execute("SELECT DISTINCT source FROM samples ORDER BY source").fetchall()]
    colours = charts.source_colours(sources)
    written: list[Path] = []
    pages = {
        "index.html": overview,
        "sources.html": _sources(con),
        "funnel.html": _funnel(con, assets, written),
        "geography.html": _geography(con, assets, Path(boundaries), written),
        "quality.html": _quality(con, assets, filter_params, steps, colours, written),
        "gallery.html": _gallery(con, git10m_dir, assets / "thumbs", written),
        "rejected.html": _rejected(con, steps),
        "schema.html": _schema(git10m_dir),
        "lineage.html": _lineage(lineage, sums, overview["files"]),
    }
    env = _environment()
    common = {"pages": PAGES, "commit": str(lineage.get("commit") or "unknown"),
              "fingerprint": hashlib.sha256(checksums).hexdigest()}
    for name, title in PAGES:
        html = env.get_template(name).render({**pages[name], **common, "page": name, "title": title})
        written.append(_write(out_dir / name, html.encode("utf-8")))
    written.append(_write(assets / "style.css", (TEMPLATES / "style.css").read_bytes()))
    return sorted(written)


def _environment() -> Environment:
    """Jinja2 with autoescaping (captions and details are untrusted text) and the number formats."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(num=_num, gsd=_gsd, score=_score, code=_code, size=_size, pct=_pct)
    return env


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """Query result as dicts keyed by column name."""
    rel = con.execute(sql, params or [])
    columns = [d[0] for d in rel.description]
    return [dict(zip(columns, row, strict=True)) for row in rel.fetchall()]


def _stage_steps(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Funnel stage -> step, the order stages ran in."""
    return {str(s): int(n) for s, n in con.execute("SELECT stage, min(step) FROM funnel GROUP BY stage").fetchall()}


def _overview(con: duckdb.DuckDBPyConnection, git10m_dir: str, sums: dict[str, str],
              steps: dict[str, int]) -> dict[str, Any]:
    """Headline numbers and the consistency checks between metadata, shards, checksums and funnel."""
    head = _rows(con, "SELECT count(*) AS samples, count(DISTINCT source) AS sources, "
                      "count(DISTINCT country_iso3) AS countries, count(DISTINCT shard) AS shards_used FROM samples")[0]
    splits = _rows(con, "SELECT coalesce(split, '(none)') AS split, count(*) AS samples FROM samples "
                        "GROUP BY ALL ORDER BY split")
    sizes = json.loads(storage.read_bytes(storage.join(git10m_dir, "shards", "sizes.json")))
    files, problems = _dataset_files(git10m_dir, sorted(sums))
    shard_names = {r[0] for r in con.execute("SELECT DISTINCT shard FROM samples").fetchall()}
    last = min(steps, key=lambda s: (-steps[s], s)) if steps else None
    funnel = _rows(con, 'SELECT sum("in") FILTER (WHERE step = (SELECT min(step) FROM funnel)) AS first_in, '
                        "sum(added) AS added, sum(kept) FILTER (WHERE stage = ?) AS last_kept FROM funnel",
                   [last])[0]
    rejected = int(con.execute("SELECT count(*) FROM rejected").fetchone()[0])  # type: ignore[index]
    accounted = int(funnel["first_in"] or 0) + int(funnel["added"] or 0)
    balanced = accounted == head["samples"] + rejected
    checks = [
        ("shards/sizes.json counts every sample", sum(sizes.values()) == head["samples"],
         f"{sum(sizes.values()):,} in sizes.json, {head['samples']:,} metadata rows"),
        ("every shard named in the metadata is in sizes.json", shard_names <= {Path(s).stem for s in sizes},
         f"{len(shard_names):,} shards named, {len(sizes):,} listed"),
        ("checksums.sha256 lists every tar and Parquet file, and each exists", not problems,
         "; ".join(problems[:5]) or f"{len(files):,} files listed"),
        (f"the funnel's last stage ({last}) keeps exactly the published samples",
         int(funnel["last_kept"] or 0) == head["samples"], f"{int(funnel['last_kept'] or 0):,} kept"),
        ("every candidate is published or rejected", balanced,
         f"{accounted:,} candidates (harvest in + added rows) {'=' if balanced else '≠'} {head['samples']:,} "
         f"published + {rejected:,} rejected"),
    ]
    return {"head": head, "splits": splits, "shards": len(sizes), "bytes": sum(files.values()), "files": files,
            "per_shard": (min(sizes.values(), default=0), max(sizes.values(), default=0)), "checks": checks,
            "rejected_total": rejected}


def _dataset_files(git10m_dir: str, listed: list[str]) -> tuple[dict[str, int], list[str]]:
    """Bytes of each file checksums.sha256 lists (relative path, one listing), and the problems found.

    Problems: a listed file that is missing, or a tar / Parquet file on disk that the checksums leave out.
    """
    fs, root = storage.filesystem(git10m_dir)
    prefix = len(root.rstrip("/")) + 1
    found = {str(p)[prefix:]: int(info["size"]) for p, info in fs.find(root, detail=True).items()}
    problems = [f"missing: {p}" for p in listed if p not in found]
    problems += [f"not listed: {p}" for p in sorted(set(found) - set(listed)) if p.endswith((".tar", ".parquet"))]
    return {p: found[p] for p in listed if p in found}, problems


def _sources(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """License and attribution per source, with what each contributes; sources that published nothing."""
    sources = _rows(con, """
        SELECT source, license, attribution, count(*) AS samples, count(DISTINCT country_iso3) AS countries,
               min(gsd_m) AS min_gsd, max(gsd_m) AS max_gsd, array_sort(list(DISTINCT level)) AS levels,
               array_to_string(array_sort(list(DISTINCT coalesce(sensor, platform))), ', ') AS sensors,
               array_to_string(array_sort(list(DISTINCT caption_source)), ', ') AS caption_sources
        FROM samples GROUP BY source, license, attribution ORDER BY source, license, attribution""")
    empty = _rows(con, """
        SELECT source, sum("in") FILTER (WHERE step = (SELECT min(step) FROM funnel)) AS harvested,
               list(stage ORDER BY step) AS stages
        FROM funnel WHERE source NOT IN (SELECT DISTINCT source FROM samples) GROUP BY source ORDER BY source""")
    licenses = _rows(con, "SELECT license, count(*) AS samples, count(DISTINCT source) AS sources FROM samples "
                          "GROUP BY license ORDER BY samples DESC, license")
    return {"sources": sources, "empty_sources": empty, "licenses": licenses}


def _funnel(con: duckdb.DuckDBPyConnection, assets: Path, written: list[Path]) -> dict[str, Any]:
    """The funnel per stage and source (table, source x stage matrix, chart)."""
    rows = _rows(con, 'SELECT stage, step, source, "in" AS rows_in, kept, added, dropped, dropped_by_reason '
                      "FROM funnel ORDER BY step, stage, source")
    totals: dict[str, charts.StageTotals] = {}
    for r in rows:
        r["dropped_by_reason"] = dict(sorted(dict(r["dropped_by_reason"] or {}).items()))
        t = totals.get(r["stage"], charts.StageTotals(r["stage"], 0, 0, 0, {}))
        reasons = dict(t.dropped_by_reason)
        for reason, n in r["dropped_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
        totals[r["stage"]] = charts.StageTotals(t.stage, t.rows_in + r["rows_in"], t.kept + r["kept"],
                                                t.added + r["added"], reasons)
    stages = list(totals)
    matrix: dict[str, dict[str, int]] = defaultdict(dict)
    for r in rows:
        matrix[r["source"]][r["stage"]] = r["kept"]
    written.append(charts.funnel_chart(list(totals.values()), assets / "funnel.png"))
    return {"rows": rows, "totals": list(totals.values()), "stages": stages,
            "matrix": sorted(matrix.items())}


def _geography(con: duckdb.DuckDBPyConnection, assets: Path, boundaries: Path,
               written: list[Path]) -> dict[str, Any]:
    """Density map on H3 parents and the continent / country tables."""
    # Parent cell by bit arithmetic on the H3 index (resolution field, then digits below it set to 7), so
    # DuckDB groups the rows and only the distinct parents reach Python.
    cells = con.execute(f"""
        WITH c AS (SELECT ('0x' || h3_cell)::UBIGINT AS i FROM samples WHERE h3_cell IS NOT NULL),
             r AS (SELECT i, least((i >> 52) & 15::UBIGINT, {MAP_H3_RESOLUTION}::UBIGINT) AS res FROM c)
        SELECT (i & ~(15::UBIGINT << 52)) | (res << 52) | ((1::UBIGINT << (3 * (15 - res))::UBIGINT) - 1) AS cell,
               count(*) AS n FROM r GROUP BY cell ORDER BY cell""").fetchall()
    written.append(charts.density_map([(h3.int_to_str(int(c)), int(n)) for c, n in cells], boundaries,
                                      assets / "map.png"))
    split_cols = ", ".join(f"count(*) FILTER (WHERE split = '{s}') AS {s}" for s in SPLITS)
    place = ("coalesce(continent, CASE WHEN lon IS NULL THEN '(not georeferenced)' "
             "ELSE '(no country within reach: at sea)' END)")
    continents = _rows(con, f"""
        SELECT {place} AS continent, count(*) AS samples, count(DISTINCT country_iso3) AS countries,
               count(DISTINCT source) AS sources, median(gsd_m) AS median_gsd, {split_cols}
        FROM samples GROUP BY 1 ORDER BY samples DESC, continent""")
    countries = _rows(con, f"""
        SELECT country_iso3, country, continent, count(*) AS samples, count(DISTINCT source) AS sources,
               median(gsd_m) AS median_gsd, {split_cols}
        FROM samples WHERE country_iso3 IS NOT NULL GROUP BY ALL ORDER BY samples DESC, country_iso3""")
    total = sum(r["samples"] for r in continents) or 1
    mapped = sum(int(n) for _, n in cells)
    return {"continents": continents, "countries": countries, "total": total, "mapped": mapped,
            "cells": len(cells), "h3_resolution": MAP_H3_RESOLUTION}


def _quality(con: duckdb.DuckDBPyConnection, assets: Path, filter_params: dict[str, Any], steps: dict[str, int],
             colours: dict[str, str], written: list[Path]) -> dict[str, Any]:
    """GSD and level histograms, caption lengths, CLIP scores with the filter's effective thresholds."""
    levels = con.execute("SELECT level, source, count(*) FROM samples GROUP BY ALL ORDER BY ALL").fetchall()
    gsd = con.execute("SELECT floor(log2(gsd_m))::INTEGER, source, count(*) FROM samples WHERE gsd_m > 0 "
                      "GROUP BY ALL ORDER BY ALL").fetchall()
    written.append(charts.level_histogram(levels, colours, assets / "levels.png"))
    written.append(charts.gsd_histogram(gsd, colours, assets / "gsd.png"))
    level_table = _rows(con, """
        SELECT level, count(*) AS samples, count(DISTINCT source) AS sources, min(gsd_m) AS min_gsd,
               median(gsd_m) AS median_gsd, max(gsd_m) AS max_gsd FROM samples GROUP BY level ORDER BY level""")
    words = "len(regexp_split_to_array(trim(caption), '\\s+'))"
    lengths = con.execute(f"SELECT least({words}, {CAPTION_WORDS_CAP}) AS w, count(*) FROM samples "
                          "WHERE trim(caption) <> '' GROUP BY w ORDER BY w").fetchall()
    written.append(charts.caption_length_histogram(lengths, CAPTION_WORDS_CAP, assets / "caption_length.png"))
    captions = _rows(con, f"""
        SELECT coalesce(caption_source, '(none)') AS caption_source, count(*) AS samples,
               count(DISTINCT caption) AS distinct_captions, median({words}) AS median_words,
               max({words}) AS max_words, median(length(caption)) AS median_chars
        FROM samples WHERE trim(caption) <> '' GROUP BY 1 ORDER BY samples DESC, caption_source""")
    no_caption = int(con.execute("SELECT count(*) FROM samples WHERE coalesce(trim(caption), '') = ''")
                     .fetchone()[0])  # type: ignore[index]
    clip = _clip(con, assets, filter_params, steps, written)
    return {"level_table": level_table, "captions": captions, "no_caption": no_caption,
            "words_cap": CAPTION_WORDS_CAP, **clip}


def _clip(con: duckdb.DuckDBPyConnection, assets: Path, filter_params: dict[str, Any], steps: dict[str, int],
          written: list[Path]) -> dict[str, Any]:
    """CLIP-score histograms per source and the effective filter threshold per (source, level)."""
    min_score = filter_params.get("min_score")
    min_score = None if min_score is None else float(min_score)
    later = [s for s, n in steps.items() if "filter" in steps and n > steps["filter"]]
    scores = f"""
        SELECT source, clip_score AS score, 'published' AS category FROM samples WHERE clip_score IS NOT NULL
        UNION ALL
        SELECT source, clip_score, CASE WHEN stage = 'filter' THEN '{charts.CLIP_CATEGORIES[2][0]}'
               ELSE '{charts.CLIP_CATEGORIES[1][0]}' END
        FROM rejected WHERE clip_score IS NOT NULL AND (stage = 'filter' OR list_contains($later, stage))"""
    extremes = con.execute(f"SELECT min(score), max(score) FROM ({scores})", {"later": later}).fetchone() or ()
    bounds = [float(v) for v in (*extremes, min_score) if v is not None]  # the min_score line stays in view
    lo, hi = (min(bounds), max(bounds)) if bounds else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1e-3
    width = (hi - lo) / CLIP_BINS
    edges = [lo + i * width for i in range(CLIP_BINS + 1)]
    counts: dict[tuple[str, str], list[int]] = {}
    for source, category, b, n in con.execute(
            f"SELECT source, category, least(floor((score - $lo) / $width)::INTEGER, {CLIP_BINS - 1}) AS b, "
            f"count(*) FROM ({scores}) GROUP BY ALL ORDER BY ALL", {"later": later, "lo": lo, "width": width}
    ).fetchall():
        counts.setdefault((source, category), [0] * CLIP_BINS)[max(int(b), 0)] += int(n)
    groups = _rows(con, """
        SELECT s.source, s.level, count(*) AS samples, min(s.clip_score) AS min_kept,
               median(s.clip_score) AS median_score, max(s.clip_score) AS max_score
        FROM samples s WHERE s.clip_score IS NOT NULL GROUP BY ALL ORDER BY s.source, s.level""")
    thresholds: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for g in groups:
        g["threshold"] = min_score if min_score is not None else g["min_kept"]
        thresholds[g["source"]].append((int(g["level"]), float(g["min_kept"])))
    if min_score is None and filter_params.get("top_percent") is None:
        thresholds.clear()  # no filter configured: the lowest score is no threshold
    dropped = _rows(con, "SELECT source, count(*) AS n FROM rejected WHERE stage = 'filter' GROUP BY ALL "
                         "ORDER BY source")
    models = [r[0] for r in con.execute("SELECT DISTINCT clip_model FROM samples WHERE clip_model IS NOT NULL "
                                        "ORDER BY 1").fetchall()]
    written.append(charts.clip_histograms(edges, counts, thresholds, min_score, assets / "clip_scores.png"))
    return {"groups": groups, "min_score": min_score, "top_percent": filter_params.get("top_percent"),
            "filter_dropped": dropped, "clip_models": models, "has_threshold": bool(thresholds) or
            min_score is not None}


def _gallery(con: duckdb.DuckDBPyConnection, git10m_dir: str, thumbs: Path, written: list[Path]) -> dict[str, Any]:
    """Up to GALLERY_PER_LEVEL samples per level, thumbnails cut from as few shards as possible."""
    # Ordering by md5(shard) first gathers each level's picks in few tars: few tars are streamed.
    picked = con.execute(f"""
        SELECT level, min_by({{'key': key, 'shard': shard, 'image_format': image_format, 'caption': caption,
               'gsd_m': gsd_m, 'country': country, 'continent': continent, 'lon': lon, 'lat': lat,
               'source': source, 'license': license, 'split': split, 'clip_score': clip_score}},
               md5(shard) || md5(key), {GALLERY_PER_LEVEL}) AS picks
        FROM samples GROUP BY level ORDER BY level""").fetchall()
    levels: list[dict[str, Any]] = [
        {"level": int(level), "samples": sorted(picks, key=lambda p: _md5(p["shard"]) + _md5(p["key"]))}
        for level, picks in picked]
    wanted = {(p["shard"], f"{p['key']}.{p['image_format']}"): p for lv in levels for p in lv["samples"]}
    for p in wanted.values():
        p["thumb"] = None
    for shard in sorted({s for s, _ in wanted}):
        names = {name for s, name in wanted if s == shard}
        for name, data in _read_members(storage.join(git10m_dir, "shards", f"{shard}.tar"), names):
            p = wanted[(shard, name)]
            p["thumb"] = f"assets/thumbs/{_md5(p['key'])[:16]}.jpg"
            written.append(_write(thumbs / Path(p["thumb"]).name, _thumbnail(data)))
    keep = {p.name for p in written if p.parent == thumbs}
    for stale in sorted(thumbs.glob("*.jpg")) if thumbs.exists() else []:
        if stale.name not in keep:
            stale.unlink()
    return {"levels": levels, "per_level": GALLERY_PER_LEVEL}


def _read_members(tar_url: str, names: set[str]) -> list[tuple[str, bytes]]:
    """Stream a tar and return the named members, stopping as soon as all are read."""
    found: list[tuple[str, bytes]] = []
    fs, path = storage.filesystem(tar_url)
    with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            if member.name in names:
                data = tar.extractfile(member)
                if data is not None:
                    found.append((member.name, data.read()))
                if len(found) == len(names):
                    break
    return found


def _thumbnail(data: bytes) -> bytes:
    """A small JPEG (deterministic: same pixels, same encoder settings, no EXIF)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _rejected(con: duckdb.DuckDBPyConnection, steps: dict[str, int]) -> dict[str, Any]:
    """Rejected candidates per stage and reason: count, meaning, sources and a few example rows."""
    counts = _rows(con, "SELECT stage, reason, count(*) AS n FROM rejected GROUP BY ALL")
    by_source: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for stage, reason, source, n in con.execute("SELECT stage, reason, source, count(*) FROM rejected GROUP BY ALL "
                                                "ORDER BY count(*) DESC, source").fetchall():
        by_source[(stage, reason)].append((source, int(n)))
    examples = {(s, r): sorted(ex, key=lambda e: _md5(e["key"] or "")) for s, r, ex in con.execute(f"""
        SELECT stage, reason, min_by({{'key': key, 'source': source, 'detail': detail, 'duplicate_of': duplicate_of,
               'clip_score': clip_score, 'lon': lon, 'lat': lat}}, md5(coalesce(key, '')), {EXAMPLES_PER_REASON})
        FROM rejected GROUP BY ALL""").fetchall()}
    stages: dict[str, dict[str, Any]] = {}
    for c in sorted(counts, key=lambda c: (steps.get(c["stage"], 99), c["stage"], -c["n"], c["reason"])):
        key = (c["stage"], c["reason"])
        stage = stages.setdefault(c["stage"], {"stage": c["stage"], "total": 0, "reasons": []})
        stage["total"] += c["n"]
        stage["reasons"].append({**c, "meaning": _meaning(*key), "sources": by_source[key],
                                 "examples": examples[key]})
    return {"stages": list(stages.values()), "total": sum(c["n"] for c in counts),
            "per_reason": EXAMPLES_PER_REASON}


def _meaning(stage: str, reason: str) -> str:
    """The documented meaning of a reason, looked up in the table of the stage that can give it."""
    table = REJECT_REASONS if stage == "harvest" else PUBLISH_REASONS if stage == "publish" else CURATION_REASONS
    for reasons in (table, CURATION_REASONS, REJECT_REASONS, PUBLISH_REASONS):
        if reason in reasons:
            return reasons[reason]
    return "(not documented in pipeline.schema)"


def _schema(git10m_dir: str) -> dict[str, Any]:
    """Columns as the Parquet files declare them, descriptions from field metadata or pipeline.schema."""
    fs, root = storage.filesystem(git10m_dir)
    metadata = sorted(fs.glob(f"{root.rstrip('/')}/metadata/**/*.parquet"))
    rejected = sorted(fs.glob(f"{root.rstrip('/')}/rejected/*.parquet"))
    with fs.open(metadata[0], "rb") as fh:
        sample_schema = pq.read_schema(fh)
    columns = _columns(sample_schema, PUBLISHED_SCHEMA)
    if "level" not in sample_schema.names:  # the Hive partition: in the path, not in the files
        level = PUBLISHED_SCHEMA.field("level")
        after = PUBLISHED_SCHEMA.names[PUBLISHED_SCHEMA.get_field_index("level") - 1]
        at = next((i + 1 for i, c in enumerate(columns) if c["name"] == after), len(columns))
        columns.insert(at, {"name": "level", "type": str(level.type), "origin": "Hive partition (metadata/level=L/)",
                            "description": level.metadata[b"description"].decode()})
    rejected_columns: list[dict[str, str]] = []
    if rejected:
        with fs.open(rejected[0], "rb") as fh:
            rejected_columns = _columns(pq.read_schema(fh), PUBLISHED_REJECTED_SCHEMA)
    geo = json.loads(sample_schema.metadata.get(b"geo", b"{}")) if sample_schema.metadata else {}
    missing = [n for n in PUBLISHED_SCHEMA.names if n not in sample_schema.names and n != "level"]
    return {"columns": columns, "rejected_columns": rejected_columns, "geo": geo, "missing": missing,
            "schema_file": metadata[0][len(root.rstrip("/")) + 1:]}


def _columns(schema: pa.Schema, documented: pa.Schema) -> list[dict[str, str]]:
    """One row per Arrow field: name, type, description and where the description came from."""
    rows = []
    for field in schema:
        description = (field.metadata or {}).get(b"description")
        origin = "file field metadata"
        if description is None and field.name in documented.names:
            description, origin = documented.field(field.name).metadata[b"description"], "pipeline.schema"
        elif description is None:
            description, origin = b"", "undocumented"
        rows.append({"name": field.name, "type": str(field.type), "origin": origin,
                     "description": description.decode("utf-8")})
    return rows


def _lineage(lineage: dict[str, Any], sums: dict[str, str], files: dict[str, int]) -> dict[str, Any]:
    """dvc.lock stages with their hashes, the params, the code commit and the dataset's checksummed files."""
    lock = lineage.get("dvc_lock") or {}
    lock = lock.get("stages", lock) if isinstance(lock.get("stages"), dict) else lock
    stages = [{"name": name, "cmd": st.get("cmd", ""), "deps": st.get("deps", []), "outs": st.get("outs", []),
               "params": yaml.safe_dump(st["params"], sort_keys=True) if st.get("params") else ""}
              for name, st in lock.items() if isinstance(st, dict)]
    tars = [p for p in sums if p.endswith(".tar")]
    return {"stages": stages, "params": yaml.safe_dump(lineage.get("params") or {}, sort_keys=False,
                                                       allow_unicode=True),
            "other_files": [(p, sums[p], files.get(p, 0)) for p in sorted(sums) if not p.endswith(".tar")],
            "tars": len(tars), "tar_bytes": sum(files.get(p, 0) for p in tars)}


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _num(n: int | float | None) -> str:
    return "–" if n is None else f"{n:,}"


def _gsd(m: float | None) -> str:
    return "unknown" if m is None else f"{m:,.3g} m" if m < 1000 else f"{m / 1000:,.3g} km"


def _score(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "–"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n:,} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def _code(text: str | None) -> Markup:
    """Escape, then show `backticked` names as <code> (the schema's descriptions use Markdown code spans)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text or ""))))
