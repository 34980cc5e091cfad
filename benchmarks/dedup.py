"""Deduplication at scale: the Beam `dedup` stage on 1 million synthetic images, and its pure kernel.

    python benchmarks/dedup.py                       # 1,000 shards x 1,000 images, 1 and 2 workers, 3 repeats
    python benchmarks/dedup.py --write               # ... and update the dedup section of RESULTS.md
    python benchmarks/dedup.py --keep /tmp/d1m       # generate into /tmp/d1m once (~1.1 GB), reuse it later
    python benchmarks/dedup.py --shards 50 --repeats 1 --no-kernel   # a quick 50,000-image run

The input is synthetic but shaped like a harvest: `--shards` shards of `--rows` images, each shard a few
scenes of chips laid on a grid (width 256 px, GSD 0.5..30 m, so a chip covers 128 m..7.7 km) around one of
a few thousand places worldwide, with `h3_cell` at resolution 9 (`h3.latlng_to_cell`); 10 % of the scenes
are not georeferenced (no place, no GSD: captioned datasets), 0.5 % of the chips are flat (one shared
perceptual hash). Every image has the filter stage's metadata (curated schema, written with
`pipeline.curation.io.write_shard`) and the clip stage's embeddings row (sha256, phash, 512-d L2-normalised
float16 embedding). Planted: ~1 % exact copies (same sha256, anywhere in the last 8 shards) and ~1 % near
copies (same place within 0.2 chip widths, phash 1-3 bits apart, embedding cosine ~0.99). Generation
writes shard by shard (memory stays flat).

Measured, on the same input: `text2earth dedup` in a subprocess with `curation.workers` 1 and 2 (FnApiRunner;
"job s" is the time the stage reports, "wall s" adds start-up), peak RSS of the process tree (sampled every
0.2 s, with a timeline kept in the JSON), and whether it found the planted copies (its rejected files
against the planted list). The kernel: `pipeline.curation.dedup.near_duplicates` over the same
neighbourhoods (res-7 H3 cells, after exact dedup), in a subprocess, from arrays loaded up front;
building the `DedupImage` objects is timed apart from the search itself. Before every timed run the script
waits until other processes use fewer than --quiet-cores cores, and records how much CPU they used meanwhile.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _measure  # benchmarks/_measure.py: this folder is on sys.path when a script runs
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from _measure import PeakRss, busy_cpu_s, update_results

REPO = Path(__file__).resolve().parents[1]
DIM = 512
PLACES = 3000
SCENES_PER_SHARD = 4
RING = 8  # copies take their original from the last RING shards
GSDS = np.array([0.5, 0.6, 1.0, 1.2, 3.0, 4.8, 10.0, 15.0, 30.0])
GSD_WEIGHTS = np.array([0.2, 0.1, 0.15, 0.05, 0.1, 0.05, 0.2, 0.05, 0.1])
FLAT_HASH = -(1 << 63)  # imagehash of a flat chip: 0x8000000000000000 as a signed int64
M_PER_DEG = 111_320.0


# ---- input ------------------------------------------------------------------------------------------------

class _Shard:
    """One shard's columns as arrays (what later shards copy from)."""

    def __init__(self, n: int) -> None:
        self.key = np.empty(n, dtype=object)
        self.sha = np.empty(n, dtype=object)
        self.phash = np.empty(n, dtype=np.int64)
        self.emb = np.empty((n, DIM), dtype=np.float16)
        self.lon = np.full(n, np.nan)
        self.lat = np.full(n, np.nan)
        self.gsd = np.full(n, np.nan)
        self.used = np.zeros(n, dtype=bool)  # originals are used once, and copies are never originals


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _offset(lon: np.ndarray, lat: np.ndarray, east_m: np.ndarray, north_m: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    lat2 = np.clip(lat + north_m / M_PER_DEG, -85, 85)
    lon2 = (lon + east_m / (M_PER_DEG * np.cos(np.radians(lat2))) + 180.0) % 360.0 - 180.0
    return lon2, lat2


def generate(root: Path, shards: int, rows: int, seed: int = 0) -> dict[str, Any]:
    """Write `{root}/filter/metadata|rejected` and `{root}/clip/embeddings`, and `{root}/planted.parquet`."""
    import h3
    import shapely

    from pipeline.curation import io as cio
    from pipeline.curation.clip import EMBEDDINGS_SCHEMA

    rng0 = np.random.default_rng(seed)
    z = rng0.uniform(-0.5, 0.97, PLACES)  # places on the sphere between ~30 S and ~76 N
    place_lat, place_lon = np.degrees(np.arcsin(z)), rng0.uniform(-180, 180, PLACES)
    place_country = rng0.integers(0, 150, PLACES)
    mean_dir = _unit(rng0.standard_normal(DIM))  # CLIP embeddings share a direction: unrelated cosine ~0.5
    ring: list[_Shard] = []
    planted: list[dict[str, Any]] = []
    start = time.perf_counter()
    for s in range(shards):
        rng = np.random.default_rng([seed, s])
        name = f"synth-{s:05d}"
        cur = _Shard(rows)
        scene_of = np.repeat(np.arange(SCENES_PER_SHARD), -(-rows // SCENES_PER_SHARD))[:rows]
        georef_scene = rng.random(SCENES_PER_SHARD) >= 0.1
        scene_place = rng.integers(0, PLACES, SCENES_PER_SHARD)
        scene_gsd = rng.choice(GSDS, SCENES_PER_SHARD, p=GSD_WEIGHTS / GSD_WEIGHTS.sum())
        scene_dx, scene_dy = rng.uniform(-5000, 5000, (2, SCENES_PER_SHARD))
        cur.key[:] = [f"synth{s:05d}-sc{j}-{i:05d}" for i, j in enumerate(scene_of)]
        cur.sha[:] = [rng.bytes(32).hex() for _ in range(rows)]
        cur.phash[:] = rng.integers(-(1 << 63), (1 << 63) - 1, rows, dtype=np.int64, endpoint=True)
        cur.phash[rng.random(rows) < 0.005] = FLAT_HASH
        cur.emb[:] = _unit(mean_dir + rng.standard_normal((rows, DIM)) / math.sqrt(DIM)).astype(np.float16)
        side = math.ceil(math.sqrt(-(-rows // SCENES_PER_SHARD)))
        pos = np.arange(rows) - np.searchsorted(scene_of, scene_of)  # position of the chip within its scene
        geo = georef_scene[scene_of]
        width_m = scene_gsd[scene_of] * 256
        east = scene_dx[scene_of] + (pos % side - side / 2) * width_m
        north = scene_dy[scene_of] + (pos // side - side / 2) * width_m
        lon, lat = _offset(place_lon[scene_place[scene_of]], place_lat[scene_place[scene_of]], east, north)
        cur.lon[geo], cur.lat[geo], cur.gsd[geo] = lon[geo], lat[geo], scene_gsd[scene_of][geo]
        exact_copy = np.zeros(rows, dtype=bool)
        if ring:  # plant ~1 % exact and ~1 % near copies of images of the last RING shards
            picks = rng.choice(rows, 2 * (rows // 100), replace=False)
            exact_copy[picks[: rows // 100]] = True
            for i in picks:
                src = ring[rng.integers(0, len(ring))]
                j = int(rng.choice(np.flatnonzero(~src.used)))
                src.used[j] = True
                cur.used[i] = True
                cur.lon[i], cur.lat[i], cur.gsd[i] = src.lon[j], src.lat[j], src.gsd[j]
                if exact_copy[i]:
                    cur.sha[i], cur.phash[i], cur.emb[i] = src.sha[j], src.phash[j], src.emb[j]
                else:
                    flips = rng.choice(64, int(rng.integers(1, 4)), replace=False)
                    bits = np.uint64(0)
                    for b in flips:
                        bits |= np.uint64(1) << np.uint64(b)
                    cur.phash[i] = (np.int64(src.phash[j]).view(np.uint64) ^ bits).view(np.int64)
                    noisy = src.emb[j].astype(np.float32) + 0.12 * rng.standard_normal(DIM) / math.sqrt(DIM)
                    cur.emb[i] = _unit(noisy).astype(np.float16)
                    if not np.isnan(src.lon[j]):
                        dist = rng.uniform(0, 0.2) * src.gsd[j] * 256
                        angle = rng.uniform(0, 2 * math.pi)
                        cur.lon[i], cur.lat[i] = _offset(np.array(src.lon[j]), np.array(src.lat[j]),
                                                         np.array(dist * math.cos(angle)),
                                                         np.array(dist * math.sin(angle)))
                planted.append({"copy": cur.key[i], "original": src.key[j],
                                "kind": "exact" if exact_copy[i] else "near"})
        geo = ~np.isnan(cur.lon)
        lon_l = [float(x) if g else None for x, g in zip(cur.lon, geo, strict=True)]
        lat_l = [float(x) if g else None for x, g in zip(cur.lat, geo, strict=True)]
        cells = [h3.latlng_to_cell(la, lo, 9) if lo is not None else None for lo, la in zip(lon_l, lat_l, strict=True)]
        half_lat = np.where(geo, cur.gsd * 128 / M_PER_DEG, 0.0)
        half_lon = half_lat / np.cos(np.radians(np.nan_to_num(cur.lat)))
        boxes = shapely.box(cur.lon - half_lon, cur.lat - half_lat, cur.lon + half_lon, cur.lat + half_lat)
        wkb = [w if g else None for w, g in zip(shapely.to_wkb(boxes), geo, strict=True)]
        gsd_l = [float(x) if g else None for x, g in zip(cur.gsd, geo, strict=True)]
        country = place_country[scene_place[scene_of]]
        score = rng.uniform(0.15, 0.35, rows)
        table = pa.table({
            "key": cur.key.tolist(), "image_key": cur.key.tolist(), "shard": [name] * rows,
            "source": [f"synthetic-{'geo' if g else 'captioned'}" for g in geo],
            "source_uri": [f"s3://bench/scenes/{s:05d}/{j}.tif" for j in scene_of],
            "scene_id": [f"{s:05d}-{j}" for j in scene_of], "license": ["CC-BY-4.0"] * rows,
            "gsd_m": gsd_l, "native_gsd_m": gsd_l,
            "level": [round(17 - math.log2(g)) if g else None for g in gsd_l],
            "pyramid_level": [0] * rows, "lon": lon_l, "lat": lat_l, "geometry": wkb,
            "width": [256] * rows, "height": [256] * rows, "image_format": ["jpg"] * rows,
            "sha256": cur.sha.tolist(),
            "caption": [f"a {g or 'high'} m satellite image of farmland and roads near place {p} in country {c}"
                        for g, p, c in zip(gsd_l, scene_place[scene_of], country, strict=True)],
            "caption_source": ["template"] * rows,
            "country_iso3": [f"C{c:03d}" if g else None for c, g in zip(country, geo, strict=True)],
            "h3_cell": cells, "clip_score": score, "clip_model": ["ViT-B-32/random-init-seed0"] * rows,
        })
        cio.write_shard(str(root / "filter"), name, cio.conform(table), [], f"bench-{seed}-{name}")
        emb = pa.table({"image_key": cur.key.tolist(), "sha256": cur.sha.tolist(), "phash": cur.phash,
                        "embedding": [row.astype("<f2").tobytes() for row in cur.emb]}, schema=EMBEDDINGS_SCHEMA)
        (root / "clip" / "embeddings").mkdir(parents=True, exist_ok=True)
        pq.write_table(emb, root / "clip" / "embeddings" / f"{name}.parquet", compression="zstd",
                       row_group_size=rows)
        ring = [*ring[-(RING - 1):], cur]
        if s % 100 == 99:
            print(f"generated {s + 1} shards in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    pq.write_table(pa.Table.from_pylist(planted), root / "planted.parquet")
    return {"shards": shards, "rows_per_shard": rows, "rows": shards * rows, "seed": seed,
            "generate_s": time.perf_counter() - start,
            "planted_exact": sum(p["kind"] == "exact" for p in planted),
            "planted_near": sum(p["kind"] == "near" for p in planted)}


def write_params(tmp: Path, root: Path, workers: int, tag: str) -> Path:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["curation"].update({"harvest_dir": str(tmp / "no-harvest"), "dir": str(root),
                             "output_dir": str(tmp / "curated"), "work_dir": str(tmp / f"work-{tag}"),
                             "workers": workers, "runner": "FnApiRunner"})
    path = tmp / f"params-{tag}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


# ---- measuring --------------------------------------------------------------------------------------------

def wait_quiet(max_cores: float, patience_s: float) -> float:
    """Wait for a quiet machine (benchmarks/_measure.py) with this benchmark's sampling."""
    return _measure.wait_quiet(max_cores, patience_s)


def monitored(cmd: list[str], limit_s: float) -> dict[str, Any]:
    """Run `cmd` from the repo root; wall time, peak RSS of its tree, CPU used by it and by other processes."""
    import resource

    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = busy_cpu_s()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monitor = PeakRss(proc.pid, interval=0.2)
    monitor.start()
    try:
        out, err = proc.communicate(timeout=limit_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - start
    monitor.done.set()
    monitor.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (children.ru_utime - children_before.ru_utime) + (children.ru_stime - children_before.ru_stime)
    return {"returncode": proc.returncode, "timed_out": timed_out, "stdout": out, "stderr": err, "wall_s": wall,
            "peak_rss_gib": monitor.peak / 2**30, "cpu_s": ours, "timeline": monitor.timeline,
            "other_cores": max(0.0, busy_cpu_s() - busy_before - ours) / wall}


def dedup_job(params: Path, limit_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "stages.cli", "dedup", "--params", str(params), "--no-progress",
           "--metrics", str(params.with_suffix(".metrics.json"))]
    r = monitored(cmd, limit_s)
    m = re.search(r"dedup: (\d+) rows in, (\d+) written .* in ([\d.]+) s", r["stdout"])
    if r["timed_out"] or r["returncode"] or not m:
        r["job_s"] = None
        r["error"] = "timed out" if r["timed_out"] else r["stderr"][-3000:]
    else:
        assert "already done" not in r["stdout"], "a benchmark run must not resume an earlier one"
        r.update({"rows": int(m[1]), "kept": int(m[2]), "job_s": float(m[3]),
                  "metrics": json.loads(params.with_suffix(".metrics.json").read_text())})
    del r["stdout"]
    r["stderr"] = r["stderr"][-2000:]
    return r


def check(root: Path) -> dict[str, Any]:
    """The planted copies against the job's rejected rows: exactly one of each pair dropped, nothing else."""
    import duckdb
    import h3

    con = duckdb.connect()
    rej = str(root / "dedup" / "rejected" / "*.parquet")
    con.execute(f"CREATE VIEW rej AS SELECT image_key, reason FROM read_parquet('{rej}')")
    con.execute(f"CREATE VIEW planted AS SELECT * FROM read_parquet('{root / 'planted.parquet'}')")
    by_reason = dict(con.execute("SELECT reason, count(*) FROM rej GROUP BY 1").fetchall())
    found = dict(con.execute(
        "SELECT p.kind, count(*) FROM planted p JOIN rej r ON r.image_key IN (p.copy, p.original) "
        "GROUP BY 1").fetchall())
    unplanted = con.execute(
        "SELECT count(*) FROM rej WHERE image_key NOT IN (SELECT copy FROM planted) "
        "AND image_key NOT IN (SELECT original FROM planted)").fetchall()[0][0]
    meta = str(root / "filter" / "metadata" / "*.parquet")
    near = con.execute(
        f"SELECT a.gsd_m, a.h3_cell, b.h3_cell, EXISTS (SELECT 1 FROM rej r WHERE r.image_key IN (p.copy, "
        f"p.original)) FROM planted p JOIN read_parquet('{meta}') a ON a.key = p.copy "
        f"JOIN read_parquet('{meta}') b ON b.key = p.original WHERE p.kind = 'near'").fetchall()
    missed = [(a, b) for _, a, b, hit in near if not hit]
    other_cell = sum(1 for a, b in missed if a is not None and h3.cell_to_parent(a, 7) != h3.cell_to_parent(b, 7))
    by_gsd: dict[str, list[int]] = {}
    for gsd, _, _, hit in near:
        entry = by_gsd.setdefault("none" if gsd is None else f"{gsd:g}", [0, 0])
        entry[0] += 1
        entry[1] += 0 if hit else 1
    return {"by_reason": by_reason, "planted_found": found, "dropped_not_planted": unplanted,
            "near_missed": len(missed), "near_missed_other_cell": other_cell, "near_by_gsd": by_gsd}


# ---- the kernel -------------------------------------------------------------------------------------------

def kernel(root: Path, resolution: int, max_hamming: int, min_cosine: float, max_offset: float) -> dict[str, Any]:
    """near_duplicates over the job's neighbourhoods, from arrays loaded up front (run in a subprocess)."""
    import h3

    from pipeline.curation.dedup import DedupImage, near_duplicates

    start = time.perf_counter()
    meta = pq.ParquetDataset(str(root / "filter" / "metadata")).read(
        columns=["image_key", "sha256", "lon", "lat", "gsd_m", "width", "h3_cell", "clip_score"])
    emb = pq.ParquetDataset(str(root / "clip" / "embeddings")).read(columns=["image_key", "phash", "embedding"])
    assert meta.column("image_key").equals(emb.column("image_key"))
    keys = np.array(meta.column("image_key").to_pylist(), dtype=object)
    shas = np.array(meta.column("sha256").to_pylist(), dtype=object)
    score = meta.column("clip_score").to_numpy(zero_copy_only=False)
    order = np.lexsort((keys, -score, shas))  # best (score, key) first within each sha256: the exact step
    first = np.ones(order.size, dtype=bool)
    first[1:] = shas[order][1:] != shas[order][:-1]
    keep = np.sort(order[first])
    lon = meta.column("lon").to_numpy(zero_copy_only=False)
    lat = meta.column("lat").to_numpy(zero_copy_only=False)
    width = (meta.column("gsd_m").to_numpy(zero_copy_only=False)
             * meta.column("width").to_numpy(zero_copy_only=False))
    phash = emb.column("phash").to_numpy()
    parts = []
    for chunk in emb.column("embedding").chunks:  # the values buffer of fixed-size rows, without Python bytes
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        parts.append(data.view("<f2").reshape(-1, DIM))
    vectors = np.concatenate(parts)
    del parts, emb
    cells = meta.column("h3_cell").to_pylist()
    hood = np.array(["no-georeference" if cells[i] is None else h3.cell_to_parent(cells[i], resolution)
                     for i in keep], dtype=object)
    by_hood = np.argsort(hood, kind="stable")
    bounds = np.flatnonzero(np.concatenate(([True], hood[by_hood][1:] != hood[by_hood][:-1], [True])))
    load_s = time.perf_counter() - start
    build_s = search_s = 0.0
    pairs = largest = 0
    for a, b in itertools.pairwise(bounds.tolist()):
        rows = keep[by_hood[a:b]]
        largest = max(largest, rows.size)
        if rows.size < 2:
            continue
        t0 = time.perf_counter()
        group = [DedupImage(key=keys[i], phash=int(phash[i]), embedding=vectors[i],
                            lon=None if np.isnan(lon[i]) else float(lon[i]),
                            lat=None if np.isnan(lat[i]) else float(lat[i]),
                            ground_width_m=None if np.isnan(width[i]) else float(width[i]),
                            rank=(-float(score[i]), keys[i])) for i in rows]
        t1 = time.perf_counter()
        pairs += len(near_duplicates(group, max_hamming, min_cosine, max_offset))
        build_s += t1 - t0
        search_s += time.perf_counter() - t1
    return {"images": int(keys.size), "after_exact": int(keep.size), "groups": int(bounds.size - 1),
            "largest_group": int(largest), "near_pairs": pairs, "load_s": load_s, "build_s": build_s,
            "search_s": search_s, "total_s": time.perf_counter() - start}


def kernel_run(root: Path, limit_s: float) -> dict[str, Any]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())["dedup"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--kernel-only", str(root),
           "--kernel-params", json.dumps(params)]
    r = monitored(cmd, limit_s)
    if r["returncode"] or r["timed_out"]:
        return {"error": r["stderr"][-3000:], "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"]}
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    return {**out, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"], "other_cores": r["other_cores"]}


# ---- main -------------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    return float(np.median(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=1000, help="input shards")
    parser.add_argument("--rows", type=int, default=1000, help="images per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    parser.add_argument("--limit", type=float, default=1800, help="stop a job after this many seconds")
    parser.add_argument("--no-kernel", action="store_true", help="skip the pure-kernel timing")
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="wait before each timed run until other processes use fewer cores than this")
    parser.add_argument("--patience", type=float, default=900, help="longest wait for a quiet machine, s")
    parser.add_argument("--keep", type=Path, help="generate into (or reuse) this folder instead of a temp one")
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: rebuild the table from benchmarks/results/dedup.json")
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--kernel-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kernel-params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel_only:
        p = json.loads(args.kernel_params)
        print(json.dumps(kernel(args.kernel_only, p["h3_resolution"], p["max_hamming"], p["min_cosine"],
                                p["max_offset_fraction"])))
        return
    saved = REPO / "benchmarks" / "results" / "dedup.json"
    result = json.loads(saved.read_text()) if args.rerender else measure(args)
    if not args.rerender:
        saved.parent.mkdir(exist_ok=True)
        saved.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if args.write:
        update_results(table, "dedup")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the input, then interleave the Beam runs and the kernel."""
    code = code_state()
    with tempfile.TemporaryDirectory(prefix="t2e-bench-dedup-") as tmpdir:
        tmp = Path(tmpdir)
        root = args.keep or tmp / "input"
        info_path = root / "generated.json"
        wanted = {"shards": args.shards, "rows_per_shard": args.rows, "seed": 0}
        if info_path.exists() and {k: json.loads(info_path.read_text()).get(k) for k in wanted} == wanted:
            info = json.loads(info_path.read_text())
        else:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            info = generate(root, args.shards, args.rows)
            info_path.write_text(json.dumps(info))
        print(f"input: {info}", file=sys.stderr)
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.workers}
        checks: dict[int, dict[str, Any]] = {}
        kernels: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for workers in args.workers:
                shutil.rmtree(root / "dedup", ignore_errors=True)
                params = write_params(tmp, root, workers, f"w{workers}r{rep}")
                quiet = wait_quiet(args.quiet_cores, args.patience)
                r = dedup_job(params, args.limit)
                r["quiet_before_cores"] = quiet
                r["code"] = code_state()
                if r["job_s"] is not None:
                    checks[workers] = check(root)
                runs[workers].append(r)
                print(f"{workers} worker(s), run {rep}: "
                      f"{ {k: v for k, v in r.items() if k not in ('timeline', 'metrics')} }", file=sys.stderr)
                shutil.rmtree(tmp / f"work-w{workers}r{rep}", ignore_errors=True)
            if not args.no_kernel:
                wait_quiet(args.quiet_cores, args.patience)
                kernels.append(kernel_run(root, args.limit))
                print(f"kernel, run {rep}: {kernels[-1]}", file=sys.stderr)
        shutil.rmtree(root / "dedup", ignore_errors=True)
    if code_state() != code:
        print(f"warning: the code changed during the benchmark ({code} -> {code_state()})", file=sys.stderr)
    result: dict[str, Any] = {"input": info, "machine": machine_line(code), "runs": runs, "checks": checks,
                              "kernel_runs": kernels}
    for workers, rs in runs.items():
        ok = [r for r in rs if r["job_s"] is not None]
        result[f"w{workers}"] = {
            "job_s": _median([r["job_s"] for r in ok]) if ok else None,
            "wall_s": _median([r["wall_s"] for r in rs]), "cpu_s": _median([r["cpu_s"] for r in rs]),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rs), "failed": len(rs) - len(ok)}
    if kernels and all("error" not in k for k in kernels):
        result["kernel"] = {k: _median([r[k] for r in kernels]) for k in
                            ("load_s", "build_s", "search_s", "total_s", "peak_rss_gib")}
        result["kernel"].update({k: kernels[0][k] for k in ("groups", "largest_group", "near_pairs", "after_exact")})
    result["other_cores_max"] = max([r["other_cores"] for rs in runs.values() for r in rs]
                                    + [k.get("other_cores", 0.0) for k in kernels])
    return result


def code_state() -> str:
    """The last commit that changed pipeline/ or stages/, and whether they have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "pipeline", "stages")
    last = git("log", "-1", "--format=%h", "--", "pipeline", "stages")  # later commits change no measured code
    return f"pipeline code of {last}" + (" + uncommitted changes" if dirty else "")


def machine_line(code: str) -> str:
    cpu = platform.processor() or platform.machine()
    return (f"Machine: {os.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}, {code}")


def _n(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def render(r: dict[str, Any]) -> str:
    info = r["input"]
    n = info["rows"]
    repeats = max(len(v) for v in r["runs"].values())
    lines = [f"{r['machine']}; medians of {repeats} interleaved run(s); other processes used at most "
             f"{r['other_cores_max']:.2f} cores during a timed run.", "",
             f"Input: {n:,} images in {info['shards']:,} shards; planted {info['planted_exact']:,} exact and "
             f"{info['planted_near']:,} near copies (generated in {info['generate_s']:.0f} s).", "",
             "| run | job s (each run) | wall s | images/s (job) | peak RSS GiB | CPU s | exact dropped "
             "| near dropped | planted pairs found (exact / near) | dropped, not planted |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    missed = []
    for key in sorted(k for k in r if k.startswith("w") and k[1:].isdigit()):
        w = int(key[1:])
        s = r[key]
        c = r["checks"].get(str(w)) or r["checks"].get(w) or {}  # JSON keys are strings
        each = ", ".join(f"{x['job_s']:.0f}" if x["job_s"] is not None else "failed"
                         for x in r["runs"].get(str(w)) or r["runs"].get(w))
        job = f"{s['job_s']:.0f} ({each})" if s["job_s"] is not None else f"failed ({each})"
        rate = f"{n / s['job_s']:,.0f}" if s["job_s"] is not None else "–"
        reasons = c.get("by_reason", {})
        found = c.get("planted_found", {})
        lines.append(
            f"| Beam `dedup`, {w} worker{'s' if w > 1 else ''} | {job} | {s['wall_s']:.0f} | {rate} | "
            f"{s['peak_rss_gib']:.2f} | {s['cpu_s']:.0f} | {_n(reasons.get('duplicate_exact'))} | "
            f"{_n(reasons.get('duplicate_near'))} | {_n(found.get('exact'))} / {_n(found.get('near'))} | "
            f"{_n(c.get('dropped_not_planted'))} |")
        if c:
            missed.append((c["near_missed"], c["near_missed_other_cell"], c.get("near_by_gsd")))
    k = r.get("kernel")
    if k:
        each = ", ".join(f"{x['total_s']:.0f}" for x in r["kernel_runs"])
        lines.append(f"| `near_duplicates` kernel only (no Beam, no files) | {k['total_s']:.0f} ({each}) | – | "
                     f"{n / k['total_s']:,.0f} | {k['peak_rss_gib']:.2f} (all arrays loaded) | – | – | "
                     f"{k['near_pairs']:,} | – | – |")
        lines += ["", f"Kernel: {k['groups']:,} neighbourhoods (res-7 H3 cells and one bucket for images without a "
                  f"place; the largest holds {k['largest_group']:,} images) after exact dedup ({k['after_exact']:,} "
                  f"images); loading the arrays {k['load_s']:.0f} s, building `DedupImage` objects "
                  f"{k['build_s']:.0f} s, `near_duplicates` itself {k['search_s']:.0f} s."]
    for count, other_cell, by_gsd in missed[:1]:
        lines += ["", f"Planted near copies not found: {count:,} of {info['planted_near']:,}; {other_cell:,} of them "
                  "lie in another res-7 H3 cell than their original (the search is confined to one cell)."]
        if by_gsd:
            lines.append("Missed by GSD (m: missed / planted): " + ", ".join(
                f"{g}: {m} / {t} ({m / t:.1%})" for g, (t, m) in sorted(
                    by_gsd.items(), key=lambda kv: float("inf") if kv[0] == "none" else float(kv[0]))) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
