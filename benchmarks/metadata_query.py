"""The README's DuckDB queries on 10 million metadata rows: the published layout against one unsorted file.

    python benchmarks/metadata_query.py --keep /tmp/mq10m          # generate once (~6 GB), lay out, time
    python benchmarks/metadata_query.py --keep /tmp/mq10m --write  # ... and update RESULTS.md
    python benchmarks/metadata_query.py --rows 1000000 --rounds 3  # a quicker, smaller run
    python benchmarks/metadata_query.py --rerender --write         # the table again from results/metadata_query.json

Input: the published metadata of `--from` (default data/git10m; the prototype /tmp/proto/git10m works too),
replicated and jittered to `--rows` rows, chunk by chunk (memory stays flat), into per-chunk staging files
with the published schema. Each replica puts each source scene at one of 150 places worldwide (uniform on the
sphere between 56 S and 72 N; place 0 is the Colorado Front Range of README query 3), displaced by a normal
offset (sigma 0.5 deg), and at a random resolution level: its GSD is scaled by a power of two so its chips
land on levels 10..18 (the scene's pyramid keeps its shape; each chip's GSD then gets 0.1 % noise, as
measured GSDs differ from chip to chip), with the chip offsets, footprints (WKB polygons of the source, moved
and scaled) and `h3_cell` (resolution 9, `h3.latlng_to_cell`) recomputed. Rows without
GSD stay on level 0, rows without location stay without. Keys get a `-r{replica}` suffix, so they are unique.
The rejected table is replicated by the same factor (the `rejected` view and query 5 are the same for both
layouts). Then:

* **published**: `pipeline.publish.layout.write_metadata` (run in a subprocess: time and peak RSS are recorded),
  read through `pipeline.publish.query.connect`;
* **single file**: the same rows as one Parquet file in random order (ORDER BY hash(key)), written by DuckDB's
  COPY with its default row groups (122,880 rows), zstd, with `level` stored as a column, read through a
  `samples` view over that file.

Each README query runs in a fresh subprocess per (round, query, layout), the two layouts back to back and
alternating which goes first; in it the query runs on a fresh connection twice: the first run (new process,
Parquet footers not yet read by DuckDB; the files are in the OS page cache) is reported apart, the second is
the timed one; figures are medians over `--rounds` rounds. Peak memory is the process's own high-water RSS
(`VmHWM`: exact, where sampling would miss a 50 ms peak), interpreter and imports included. DuckDB keeps
its default threads (all cores). Before every run the script waits until other processes use fewer than
--quiet-cores cores, records how much CPU they used during it, and redoes a run they disturbed (up to
--retries times; the last try counts). `EXPLAIN ANALYZE` gives the row groups each layout reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _measure  # benchmarks/_measure.py: this folder is on sys.path when a script runs
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _measure import busy_cpu_s, update_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.schema import PUBLISHED_REJECTED_SCHEMA, PUBLISHED_SCHEMA  # noqa: E402

QUERIES = {  # the README's DuckDB examples, exactly as written there
    "1. samples by continent": """SELECT continent, count(*) AS samples, round(median(gsd_m), 2) AS median_gsd_m
FROM samples GROUP BY continent ORDER BY samples DESC, continent;""",
    "2. GSD histogram": """SELECT pow(2, floor(log2(gsd_m))) AS gsd_from_m, count(*) AS samples
FROM samples WHERE gsd_m IS NOT NULL GROUP BY 1 ORDER BY 1;""",
    "3. bounding box": """SELECT key, shard, round(lon, 4) AS lon, round(lat, 4) AS lat, round(gsd_m, 2) AS gsd_m, \
caption
FROM samples WHERE lon BETWEEN -105.5 AND -104.5 AND lat BETWEEN 38.5 AND 40.5 ORDER BY key LIMIT 10;""",
    "4. one level, by split": """SELECT split, count(*) AS samples, round(avg(clip_score), 3) AS mean_clip_score
FROM samples WHERE level = 17 GROUP BY split ORDER BY split;""",
    "5. rejected by stage and reason": """SELECT stage, reason, count(*) AS candidates FROM rejected GROUP BY ALL \
ORDER BY candidates DESC, stage, reason;""",
}
LAYOUTS = ("published", "single")
PLACES = 150
FRONT_RANGE = (-105.0, 40.0)
SCENE_SIGMA_DEG = 0.5
LEVELS = (10, 18)
CHUNK_ROWS = 250_000
SAMPLES_PER_SHARD = 5_000
M_PER_DEG = 111_320.0
SORT_KEY_GROUP_SIZES = [16_384, 32_768, 65_536, 122_880, 245_760]
GENERATOR_VERSION = 2  # bump when generate() makes other rows, so kept inputs are regenerated
TARGETS = {"query_s": 0.5, "peak_gib": 1.0, "speedup": 3.0}


# ---- input ------------------------------------------------------------------------------------------------

def load_source(from_dir: Path) -> tuple[pa.Table, pa.Table]:
    """The published metadata (level from the folder names) and rejected rows of `from_dir`."""
    import duckdb

    con = duckdb.connect()
    meta = con.sql(f"SELECT * FROM read_parquet('{from_dir / 'metadata' / '**' / '*.parquet'}', "
                   "hive_partitioning = true) ORDER BY key").to_arrow_table()
    rejected = con.sql(f"SELECT * FROM read_parquet('{from_dir / 'rejected' / '*.parquet'}') ORDER BY key, stage"
                       ).to_arrow_table()
    meta = pa.table({f.name: meta[f.name].cast(f.type) for f in PUBLISHED_SCHEMA}, schema=PUBLISHED_SCHEMA)
    rejected = pa.table({f.name: rejected[f.name].cast(f.type) if f.name in rejected.column_names
                         else pa.nulls(rejected.num_rows, f.type) for f in PUBLISHED_REJECTED_SCHEMA},
                        schema=PUBLISHED_REJECTED_SCHEMA)
    return meta, rejected


class Scenes:
    """What the replicas keep of each source scene: its chips' offsets in metres and its level range."""

    def __init__(self, src: pa.Table) -> None:
        import shapely

        scene_ids = src["scene_id"].to_pylist()
        names = sorted({str(s) for s in scene_ids})
        self.of_row = np.array([names.index(str(s)) for s in scene_ids])
        self.count = len(names)
        self.lon = src["lon"].to_numpy(zero_copy_only=False).astype(float)
        self.lat = src["lat"].to_numpy(zero_copy_only=False).astype(float)
        self.located = ~np.isnan(self.lon)
        level = src["level"].to_numpy(zero_copy_only=False).astype(float)
        gsd = src["gsd_m"].to_numpy(zero_copy_only=False).astype(float)
        self.has_gsd = ~np.isnan(gsd) & (level > 0)
        self.level = np.where(self.has_gsd, level, 0).astype(int)
        centre_lon = np.zeros(self.count)
        centre_lat = np.zeros(self.count)
        self.finest = np.full(self.count, LEVELS[1])
        self.coarsest = np.full(self.count, LEVELS[0])
        for s in range(self.count):
            rows = self.of_row == s
            if self.located[rows].any():
                centre_lon[s] = np.mean(self.lon[rows & self.located])
                centre_lat[s] = np.mean(self.lat[rows & self.located])
            if self.has_gsd[rows].any():
                self.finest[s] = self.level[rows & self.has_gsd].max()
                self.coarsest[s] = self.level[rows & self.has_gsd].min()
        # the chip centre and every footprint vertex as metres east/north of the scene centre
        cos = np.cos(np.radians(centre_lat[self.of_row]))
        self.east = np.nan_to_num((self.lon - centre_lon[self.of_row]) * M_PER_DEG * cos)
        self.north = np.nan_to_num((self.lat - centre_lat[self.of_row]) * M_PER_DEG)
        geoms = shapely.from_wkb(src["geometry"].to_numpy(zero_copy_only=False))
        coords, self.vertex_row = shapely.get_coordinates(geoms, return_index=True)
        self.vertex_east = (coords[:, 0] - centre_lon[self.of_row][self.vertex_row]) * M_PER_DEG * cos[self.vertex_row]
        self.vertex_north = (coords[:, 1] - centre_lat[self.of_row][self.vertex_row]) * M_PER_DEG
        self.geoms = geoms
        self.vertex_count = np.bincount(self.vertex_row, minlength=src.num_rows)
        self.vertex_start = np.cumsum(self.vertex_count) - self.vertex_count


def _places(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 1])
    lat = np.degrees(np.arcsin(rng.uniform(math.sin(math.radians(-56)), math.sin(math.radians(72)), PLACES)))
    lon = rng.uniform(-175, 175, PLACES)
    lon[0], lat[0] = FRONT_RANGE
    return lon, lat


def generate_chunk(src: pa.Table, scenes: Scenes, start: int, stop: int, seed: int) -> pa.Table:
    """Rows start..stop of the replicated metadata: row g is source row g % n of replica g // n."""
    import h3
    import shapely

    n = src.num_rows
    g = np.arange(start, stop)
    row, replica = g % n, g // n
    first = int(replica[0])
    rng = np.random.default_rng([seed, 2, start])
    reps = int(replica[-1]) - first + 1
    place_lon, place_lat = _places(seed)
    place = rng.integers(0, PLACES, (reps, scenes.count))
    d_lon, d_lat = rng.normal(0, SCENE_SIGMA_DEG, (2, reps, scenes.count))
    target = rng.integers(LEVELS[0] + scenes.finest - scenes.coarsest, LEVELS[1] + 1, (reps, scenes.count))
    shift = target - scenes.finest  # levels move by `shift`, GSD by 2**-shift: the pyramid keeps its shape
    rs = (replica - first, scenes.of_row[row])
    scale = np.where(scenes.has_gsd[row], 2.0 ** -shift[rs], 1.0)
    centre_lat = np.clip(place_lat[place[rs]] + d_lat[rs], -80, 80)
    centre_lon = place_lon[place[rs]] + d_lon[rs]
    cos = np.cos(np.radians(centre_lat))
    lat = np.clip(centre_lat + scenes.north[row] * scale / M_PER_DEG, -85, 85)
    lon = (centre_lon + scenes.east[row] * scale / (M_PER_DEG * cos) + 180) % 360 - 180
    located = scenes.located[row]

    table = src.take(pa.array(row))
    suffix = pc.cast(pa.array(replica), pa.string())
    columns = {name: table[name] for name in table.column_names}
    for name in ("key", "image_key"):
        columns[name] = pc.binary_join_element_wise(table[name], suffix, "-r")
    shard = pc.utf8_lpad(pc.cast(pa.array(g // SAMPLES_PER_SHARD), pa.string()), 6, "0")
    columns["shard"] = pc.binary_join_element_wise(pa.scalar("git10m"), shard, "-")
    # measured GSDs differ a little from chip to chip (projection scale), so they are near-unique per row
    chip_scale = scale * (1 + 0.001 * rng.standard_normal(len(row)))
    for name in ("gsd_m", "gsd_x_m", "gsd_y_m", "native_gsd_m"):
        columns[name] = pc.multiply(table[name].combine_chunks(), pa.array(chip_scale))
    columns["level"] = pa.array(np.where(scenes.has_gsd[row], scenes.level[row] + shift[rs], 0).astype(np.int16))
    columns["lon"] = pa.array(lon, mask=~located)
    columns["lat"] = pa.array(lat, mask=~located)
    # footprints: the source polygon's vertices, scaled and moved with their chip
    geoms = scenes.geoms[row]
    present = ~shapely.is_missing(geoms)
    counts = scenes.vertex_count[row[present]]
    src_vertex = np.repeat(scenes.vertex_start[row[present]] - np.cumsum(counts) + counts, counts) + \
        np.arange(counts.sum())  # source row r's vertices are vertex_start[r] .. + vertex_count[r]
    vertex_rows = np.repeat(np.flatnonzero(present), counts)
    v_scale, v_lat = scale[vertex_rows], centre_lat[vertex_rows]
    vertices = np.column_stack([
        centre_lon[vertex_rows] + scenes.vertex_east[src_vertex] * v_scale / (M_PER_DEG * np.cos(np.radians(v_lat))),
        v_lat + scenes.vertex_north[src_vertex] * v_scale / M_PER_DEG])
    moved = shapely.transform(geoms[present], lambda _: vertices)  # new polygons, same rings, moved vertices
    wkb = np.full(len(row), None, dtype=object)
    wkb[present] = shapely.to_wkb(moved)
    columns["geometry"] = pa.array(wkb, type=pa.binary())
    columns["h3_cell"] = pa.array([h3.latlng_to_cell(la, lo, 9) if ok else None
                                   for la, lo, ok in zip(lat.tolist(), lon.tolist(), located.tolist(), strict=True)],
                                  type=pa.string())
    noise = rng.normal(0, 0.02, len(row)).astype(np.float32)
    columns["clip_score"] = pc.add(table["clip_score"].combine_chunks(), pa.array(noise))
    return pa.table({f.name: columns[f.name] for f in PUBLISHED_SCHEMA}, schema=PUBLISHED_SCHEMA)


def generate(work: Path, from_dir: Path, rows: int, seed: int = 0) -> dict[str, Any]:
    """Write `work/staging/*.parquet` and the published folder's rejected and funnel tables."""
    start = time.perf_counter()
    src, rejected = load_source(from_dir)
    scenes = Scenes(src)
    staging = work / "staging"
    staging.mkdir(parents=True)
    for i, first in enumerate(range(0, rows, CHUNK_ROWS)):
        chunk = generate_chunk(src, scenes, first, min(rows, first + CHUNK_ROWS), seed)
        pq.write_table(chunk, staging / f"chunk-{i:05d}.parquet", compression="zstd")
        print(f"generated {min(rows, first + CHUNK_ROWS):,} rows in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    published = work / "published"
    (published / "rejected").mkdir(parents=True)
    replicas = -(-rows // src.num_rows)
    per_file = max(1, CHUNK_ROWS // max(1, rejected.num_rows))
    for i, first in enumerate(range(0, replicas, per_file)):
        reps = np.arange(first, min(replicas, first + per_file))
        take = np.tile(np.arange(rejected.num_rows), len(reps))
        table = rejected.take(pa.array(take))
        suffix = pc.cast(pa.array(np.repeat(reps, rejected.num_rows)), pa.string())
        table = table.set_column(0, "key", pc.binary_join_element_wise(table["key"], suffix, "-r"))
        pq.write_table(table, published / "rejected" / f"part-{i:05d}.parquet", compression="zstd")
    shutil.copy(from_dir / "funnel.parquet", published / "funnel.parquet")
    return {"rows": rows, "source_rows": src.num_rows, "source": str(from_dir), "seed": seed,
            "generator": GENERATOR_VERSION,
            "rejected_rows": replicas * rejected.num_rows, "generate_s": time.perf_counter() - start}


def layout_child(work: Path, row_group_size: int, memory_limit: str) -> None:
    """Lay out the staging rows as published (run in a subprocess so its memory is measured alone)."""
    from pipeline.publish.layout import write_metadata

    staging = sorted(str(p) for p in (work / "staging").glob("*.parquet"))
    start = time.perf_counter()
    summary = write_metadata(staging, str(work / "published" / "metadata"), row_group_size=row_group_size,
                             fingerprint="benchmark", memory_limit=memory_limit, temp_dir=str(work / "spill"))
    summary["layout_s"] = time.perf_counter() - start
    summary["peak_gib"] = peak_rss_gib()
    summary["levels"] = {str(k): {"rows": v["rows"], "files": len(v["files"]), "row_groups": v["row_groups"]}
                         for k, v in summary["levels"].items()}
    print(json.dumps(summary))


def write_single(work: Path, memory_limit: str) -> dict[str, Any]:
    """The same rows as one Parquet file in random order, as DuckDB writes it by default (zstd)."""
    import duckdb

    out = work / "single" / "samples.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute(f"COPY (SELECT * FROM read_parquet('{work / 'staging' / '*.parquet'}') ORDER BY hash(key), key) "
                f"TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
    meta = pq.read_metadata(out)
    return {"write_s": time.perf_counter() - start, "row_groups": meta.num_row_groups,
            "row_group_rows": meta.row_group(0).num_rows, "bytes": out.stat().st_size}


def morton_sql() -> tuple[list[str], str]:
    """Projections computing the Z-order (Morton) index on the same 16-bit grid as the Hilbert index."""
    from pipeline.publish.layout import hilbert_sql

    layers = hilbert_sql()[0][:1]  # the grid cells _hx, _hy
    for k, (shift, mask) in enumerate(((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)), 1):
        x, y = ("_hx", "_hy") if k == 1 else (f"_zx{k - 1}", f"_zy{k - 1}")
        layers.append(f"({x} | ({x} << {shift})) & {mask} AS _zx{k}, ({y} | ({y} << {shift})) & {mask} AS _zy{k}")
    return layers, "(_zy4 << 1) | _zx4"


def compare_sort_keys(work: Path, sizes: list[int], boxes: int = 500) -> dict[str, Any]:
    """Row groups whose lon/lat min/max overlap a box, had each level been sorted by each candidate key.

    Only the statistics matter for pruning, so this ranks the rows per level, cuts row groups of each size
    and counts overlaps for the README box and for `boxes` 1-degree boxes centred on random located rows.
    """
    import duckdb

    from pipeline.publish.layout import hilbert_sql

    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{work / 'spill'}'")
    con.execute("CREATE TABLE pts AS SELECT hash(key) AS tie, coalesce(level, 0) AS level, lon, lat, h3_cell "
                f"FROM read_parquet('{work / 'staging' / '*.parquet'}')")
    centres = con.execute(f"SELECT lon, lat FROM pts WHERE lon IS NOT NULL USING SAMPLE {boxes} ROWS "
                          "(reservoir, 7)").fetchall()
    box_rows = [(-105.5, -104.5, 39.5, 40.5)] + [(x - 0.5, x + 0.5, y - 0.5, y + 0.5) for x, y in centres]
    con.execute("CREATE TABLE boxes (i INTEGER, x0 DOUBLE, x1 DOUBLE, y0 DOUBLE, y1 DOUBLE)")
    con.executemany("INSERT INTO boxes VALUES (?, ?, ?, ?, ?)", [(i, *b) for i, b in enumerate(box_rows)])
    keys = {"Hilbert (lon, lat)": hilbert_sql(), "Morton (lon, lat)": morton_sql(), "h3_cell": ([], "h3_cell"),
            "none (random order)": ([], "tie")}
    out: dict[str, Any] = {}
    for name, (layers, index) in keys.items():
        query = "SELECT * FROM pts"
        for layer in layers:
            query = f"SELECT *, {layer} FROM ({query})"
        con.execute(f"CREATE OR REPLACE TABLE ranked AS SELECT level, lon, lat, row_number() OVER (PARTITION BY level "
                    f"ORDER BY {index} NULLS LAST, tie) - 1 AS rn FROM ({query})")
        for size in sizes:
            con.execute(f"CREATE OR REPLACE TABLE groups AS SELECT level, rn // {size} AS g, min(lon) AS x0, "
                        "max(lon) AS x1, min(lat) AS y0, max(lat) AS y1 FROM ranked GROUP BY ALL")
            total = con.execute("SELECT count(*) FROM groups").fetchall()[0][0]
            hits = [n for _, n in con.execute(
                "SELECT b.i, count(g.g) FROM boxes b LEFT JOIN groups g ON g.x0 <= b.x1 AND g.x1 >= b.x0 "
                "AND g.y0 <= b.y1 AND g.y1 >= b.y0 GROUP BY b.i ORDER BY b.i").fetchall()]
            out.setdefault(name, {})[str(size)] = {"row_groups": total, "readme_box": hits[0],
                                                   "random_boxes_mean": float(np.mean(hits[1:]))}
    return {"boxes": boxes, "keys": out}


# ---- measuring --------------------------------------------------------------------------------------------

def open_layout(layout: str, work: Path) -> Any:
    """A DuckDB connection with `samples`, `rejected` and `funnel` views over one layout."""
    import duckdb

    from pipeline.publish.query import connect, view_sql

    published = str(work / "published")
    if layout == "published":
        return connect(published)
    con = duckdb.connect()
    con.execute(f"CREATE VIEW samples AS SELECT * FROM read_parquet('{work / 'single' / 'samples.parquet'}')")
    for name in ("rejected", "funnel"):
        con.execute(f"CREATE VIEW {name} AS {view_sql(published)[name]}")
    return con


def query_child(layout: str, work: Path, name: str, explain: bool) -> None:
    """Run one README query twice, each on a fresh connection; print times, result digest and peak RSS."""
    sql = QUERIES[name]
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        con = open_layout(layout, work)
        opened = time.perf_counter()
        result = con.execute(sql).fetchall()
        runs.append({"connect_s": opened - start, "query_s": time.perf_counter() - opened})
        con.close()
    out: dict[str, Any] = {"runs": runs, "rows": len(result),
                           "digest": hashlib.sha256(repr(result).encode()).hexdigest()[:16],
                           "peak_gib": peak_rss_gib()}
    if explain:
        con = open_layout(layout, work)
        plan = con.execute(f"EXPLAIN ANALYZE {sql}").fetchall()[0][1]
        out["row_groups_scanned"] = [[int(a), int(b)] for a, b in re.findall(r"Row Groups Scanned:\s*(\d+)\s*/\s*(\d+)",
                                                                            plan)]
    print(json.dumps(out))


def peak_rss_gib() -> float:
    """This process's high-water RSS since exec (VmHWM; ru_maxrss would include the parent's pages at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def wait_quiet(max_cores: float, patience_s: float) -> float:
    """Wait for a quiet machine (benchmarks/_measure.py) with this benchmark's sampling."""
    return _measure.wait_quiet(max_cores, patience_s, sample_s=2.0, pause_s=5.0)


def child(args: list[str], limit_s: float) -> dict[str, Any]:
    """Run this script in a subprocess; its JSON line, wall time, and the CPU other processes used meanwhile."""
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = busy_cpu_s()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=limit_s)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (after.ru_utime - before_children.ru_utime) + (after.ru_stime - before_children.ru_stime)
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "wall_s": wall, "other_cores": max(0.0, busy_cpu_s() - busy_before - ours) / wall}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the input and both layouts, then time the queries, interleaved."""
    code = code_state()
    work: Path = args.keep
    info_path = work / "generated.json"
    wanted = {"rows": args.rows, "source": str(args.source), "seed": 0, "generator": GENERATOR_VERSION}
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if {k: info.get(k) for k in wanted} != wanted:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        info = generate(work, args.source, args.rows)
        info_path.write_text(json.dumps(info))
    print(f"input: {info}", file=sys.stderr)
    layout_wanted = {"row_group_size": args.row_group_size, "layout_code": layout_code()}
    if {k: info.get("layout", {}).get(k) for k in layout_wanted} != layout_wanted:
        wait_quiet(args.quiet_cores, args.patience)
        shutil.rmtree(work / "published" / "metadata", ignore_errors=True)
        info["layout"] = {**child(["--layout-child", str(work), "--row-group-size", str(args.row_group_size),
                                   "--memory-limit", args.memory_limit], 3600), **layout_wanted}
        info_path.write_text(json.dumps(info))
    if "single" not in info:
        info["single"] = write_single(work, args.memory_limit)
        info_path.write_text(json.dumps(info))
    if "sort_keys" not in info:
        info["sort_keys"] = compare_sort_keys(work, SORT_KEY_GROUP_SIZES)
        info_path.write_text(json.dumps(info))
    shutil.rmtree(work / "spill", ignore_errors=True)
    print(f"layouts: {info['layout']} {info['single']}", file=sys.stderr)
    # every run is saved as it ends, so --resume goes on after an interruption (with the same layout)
    partial = work / "runs-partial.json"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {q: {lay: [] for lay in LAYOUTS} for q in QUERIES}
    if args.resume and partial.exists() and json.loads(partial.read_text())["layout"] == info["layout"]:
        runs = json.loads(partial.read_text())["runs"]
    for rnd in range(args.rounds):
        for name in QUERIES:
            for layout in LAYOUTS if rnd % 2 == 0 else reversed(LAYOUTS):
                if len(runs[name][layout]) > rnd:
                    continue
                attempts = 0
                while True:  # a run disturbed by other processes is redone
                    attempts += 1
                    quiet = wait_quiet(args.quiet_cores, args.patience)
                    r = child(["--query-child", layout, str(work), name] + (["--explain"] if rnd == 0 else []), 600)
                    if r["other_cores"] < args.quiet_cores or attempts > args.retries:
                        break
                r.update({"quiet_before_cores": quiet, "attempts": attempts})
                runs[name][layout].append(r)
                partial.write_text(json.dumps({"layout": info["layout"], "runs": runs}))
                print(f"round {rnd} {name} {layout}: {r['runs'][1]['query_s']:.3f} s "
                      f"(first {r['runs'][0]['query_s']:.3f} s), {r['peak_gib']:.2f} GiB, "
                      f"others {r['other_cores']:.2f} cores", file=sys.stderr)
    if code_state() != code:
        print(f"warning: the code changed during the benchmark ({code} -> {code_state()})", file=sys.stderr)
    summary: dict[str, Any] = {}
    for name, by_layout in runs.items():
        summary[name] = {}
        for layout, rs in by_layout.items():
            summary[name][layout] = {
                "median_s": _median([r["runs"][1]["query_s"] for r in rs]),
                "first_run_median_s": _median([r["runs"][0]["query_s"] for r in rs]),
                "connect_median_s": _median([r["runs"][1]["connect_s"] for r in rs]),
                "each_s": [round(r["runs"][1]["query_s"], 4) for r in rs],
                "peak_gib": max(r["peak_gib"] for r in rs),
                "row_groups_scanned": rs[0].get("row_groups_scanned"),
                "digests": sorted({r["digest"] for r in rs}),
            }
    return {"input": info, "machine": machine_line(code), "rounds": args.rounds, "summary": summary,
            "runs": runs, "other_cores_max": max(r["other_cores"] for q in runs.values() for rs in q.values()
                                                 for r in rs)}


def _median(values: list[float]) -> float:
    return float(np.median(values))


def layout_code() -> str:
    """Hash of the layout module, so a changed layout is rebuilt."""
    return hashlib.sha256((REPO / "pipeline" / "publish" / "layout.py").read_bytes()).hexdigest()[:12]


def code_state() -> str:
    """The last commit that changed pipeline/, and whether it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "pipeline/publish", "pipeline/schema.py")
    last = git("log", "-1", "--format=%h", "--", "pipeline")
    return f"pipeline code of {last}" + (" + uncommitted changes" if dirty else "")


def machine_line(code: str) -> str:
    import duckdb

    cpu = platform.processor() or platform.machine()
    return (f"Machine: {os.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, DuckDB {duckdb.__version__}, pyarrow {pa.__version__}, "
            f"{time.strftime('%Y-%m-%d')}, {code}")


# ---- report -----------------------------------------------------------------------------------------------

def _groups(scanned: list[list[int]] | None) -> str:
    """Row groups read of those in the files, per Parquet scan of the plan (joined with +)."""
    return " + ".join(f"{read:,} of {total:,}" for read, total in scanned) if scanned else "–"


def render(r: dict[str, Any]) -> str:
    info, s = r["input"], r["summary"]
    lay, single = info["layout"], info["single"]
    lines = [f"{r['machine']}; medians of {r['rounds']} interleaved rounds; other processes used at most "
             f"{r['other_cores_max']:.2f} cores during a timed run.", "",
             f"Input: {info['rows']:,} rows replicated from {info['source_rows']} rows of `{info['source']}` "
             f"(generated in {info['generate_s']:.0f} s); `rejected`: {info['rejected_rows']:,} rows. Published "
             f"layout: {lay['files']} files, {lay['row_groups']} row groups of {lay['row_group_size']:,} rows, "
             f"written by `write_metadata` in {lay['layout_s']:.0f} s (peak RSS {lay['peak_gib']:.2f} GiB, "
             f"DuckDB memory_limit {r.get('memory_limit', '2GB')}). Single file: {single['row_groups']} row groups "
             f"of {single['row_group_rows']:,} rows, {single['bytes'] / 2**30:.2f} GiB.", "",
             "| query | published median s | single file median s | speed-up | first run s (published / single) "
             "| row groups read: published / single | peak RSS GiB (published / single) | same result |",
             "|---|---|---|---|---|---|---|---|"]
    for name, by in s.items():
        p, u = by["published"], by["single"]
        same = "yes" if p["digests"] == u["digests"] and len(p["digests"]) == 1 else "**no**"
        ratio = "– (same files)" if name.startswith("5.") else f"{u['median_s'] / p['median_s']:.1f}x"
        lines.append(f"| {name} | {p['median_s']:.3f} | {u['median_s']:.3f} | {ratio} "
                     f"| {p['first_run_median_s']:.3f} / {u['first_run_median_s']:.3f} "
                     f"| {_groups(p['row_groups_scanned'])} / {_groups(u['row_groups_scanned'])} "
                     f"| {p['peak_gib']:.2f} / {u['peak_gib']:.2f} | {same} |")
    keys = info.get("sort_keys")
    if keys:
        sizes = list(next(iter(keys["keys"].values())))
        lines += ["", f"Sort key against pruning (row groups whose lon/lat min/max overlap a box, out of all, had "
                  f"each level been sorted by the key; README box, and the mean over {keys['boxes']} 1-degree boxes "
                  "centred on random rows):", "",
                  "| sort key | " + " | ".join(f"{int(z):,} rows/group" for z in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for name, by_size in keys["keys"].items():
            cells = [f"{v['readme_box']} / {v['random_boxes_mean']:.1f} of {v['row_groups']}" for v in by_size.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    slowest = max((by["published"]["median_s"], name) for name, by in s.items())
    peak = max(by["published"]["peak_gib"] for by in s.values())
    speed = {k: s[k]["single"]["median_s"] / s[k]["published"]["median_s"]
             for k in ("3. bounding box", "4. one level, by split")}
    met = {True: "met", False: "**not met**"}
    lines += ["", "Status against the targets (published layout):", "",
              "| target | measured | status |", "|---|---|---|",
              f"| each query < {TARGETS['query_s']} s (median) | slowest: {slowest[1]}, {slowest[0]:.3f} s "
              f"| {met[slowest[0] < TARGETS['query_s']]} |",
              f"| peak memory < {TARGETS['peak_gib']:.0f} GiB | {peak:.2f} GiB | {met[peak < TARGETS['peak_gib']]} |"]
    for k, v in speed.items():
        lines.append(f"| ≥ {TARGETS['speedup']:.0f}x the single file on query {k} | {v:.1f}x "
                     f"| {met[v >= TARGETS['speedup']]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, default=REPO / "data" / "git10m",
                        help="published dataset whose metadata is replicated")
    parser.add_argument("--rows", type=int, default=10_000_000, help="metadata rows to generate")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--row-group-size", type=int, default=122_880, help="write_metadata row_group_size")
    parser.add_argument("--memory-limit", default="2GB", help="DuckDB memory_limit while laying out")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="wait before each timed run until other processes use fewer cores than this")
    parser.add_argument("--patience", type=float, default=240, help="longest wait for a quiet machine, s")
    parser.add_argument("--retries", type=int, default=3,
                        help="redo a run during which other processes used --quiet-cores or more, up to this often")
    parser.add_argument("--keep", type=Path, default=Path("/tmp/t2e-bench-metadata-query"),
                        help="work folder: generated input and layouts are reused from here")
    parser.add_argument("--resume", action="store_true", help="keep the runs an interrupted benchmark saved")
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: rebuild the table from benchmarks/results/metadata_query.json")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--layout-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--query-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--explain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layout_child:
        layout_child(args.layout_child, args.row_group_size, args.memory_limit)
        return
    if args.query_child:
        layout, work, name = args.query_child
        query_child(layout, Path(work), name, args.explain)
        return
    saved = REPO / "benchmarks" / "results" / "metadata_query.json"
    if args.rerender:
        result = json.loads(saved.read_text())
    else:
        result = {**measure(args), "memory_limit": args.memory_limit, "queries": QUERIES}
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if args.write:
        update_results(table, "metadata_query")


if __name__ == "__main__":
    main()
