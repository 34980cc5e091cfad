"""The published metadata layout: level partitions, Hilbert order, row groups, GeoParquet, re-runs, pruning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import fsspec
import geopandas
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from pipeline.publish.layout import FILE_SCHEMA, HILBERT_BITS, hilbert_sql, write_metadata
from pipeline.publish.query import connect
from pipeline.schema import PUBLISHED_SCHEMA
from pipeline.shard_writer import FINGERPRINT_KEY, geo_metadata

LEVELS = [0, 10, 12, 14, 15, 16, 17, 18]
PLACES = [(-105.0, 40.0), (2.35, 48.85), (128.66, 37.67), (-60.0, 73.0), (151.2, -33.9)]
BBOX = (-105.5, -104.5, 39.5, 40.5)  # the README's Colorado box


def hilbert_index(x: int, y: int, bits: int = HILBERT_BITS) -> int:
    """The textbook Hilbert xy -> d loop (Wikipedia), the reference for the SQL version."""
    d, s = 0, 1 << (bits - 1)
    while s:
        rx, ry = int(x & s > 0), int(y & s > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        s >>= 1
    return d


def grid(lon: float, lat: float) -> tuple[int, int]:
    n = 1 << HILBERT_BITS
    return (min(n - 1, max(0, int(np.floor((lon + 180) * n / 360)))),
            min(n - 1, max(0, int(np.floor((lat + 90) * n / 180)))))


def staging_tables(rows: int = 3000, files: int = 4, seed: int = 0) -> list[pa.Table]:
    """Synthetic published rows: a few places, jittered; levels 0 and 10..18; ~10 % without location."""
    rng = np.random.default_rng(seed)
    place = rng.integers(0, len(PLACES), rows)
    lon = np.array([PLACES[p][0] for p in place]) + rng.normal(0, 0.4, rows)
    lat = np.array([PLACES[p][1] for p in place]) + rng.normal(0, 0.4, rows)
    located = rng.random(rows) > 0.1
    level = rng.choice(LEVELS[1:], rows)
    level[~located & (rng.random(rows) < 0.7)] = 0
    gsd = np.where(level > 0, 2.0 ** (17 - level), np.nan)
    half = np.where(located & (level > 0), gsd * 128 / 111_320, 0.01)
    boxes = shapely.box(lon - half, lat - half, lon + half, lat + half)
    boxes[::50] = shapely.multipolygons([[b] for b in boxes[::50]])  # some footprints split at the antimeridian
    geometry = [shapely.to_wkb(b) if ok else None for b, ok in zip(boxes, located, strict=True)]
    columns = {
        "key": [f"synth-{i:05d}" for i in rng.permutation(rows)],
        "shard": [f"git10m-{i // 500:06d}" for i in range(rows)],
        "source": ["synthetic"] * rows,
        "gsd_m": [None if np.isnan(g) else float(g) for g in gsd],
        "level": level.astype(np.int16),
        "lon": [float(x) if ok else None for x, ok in zip(lon, located, strict=True)],
        "lat": [float(y) if ok else None for y, ok in zip(lat, located, strict=True)],
        "geometry": geometry,
        "captions": [["a field", "some trees"]] * rows,
        "caption": [f"chip {i}" for i in range(rows)],
        "clip_score": rng.uniform(0.1, 0.4, rows).astype(np.float32),
        "split": rng.choice(["train", "val", "test"], rows).tolist(),
    }
    table = pa.table({f.name: columns.get(f.name, pa.nulls(rows, f.type)) for f in PUBLISHED_SCHEMA},
                     schema=PUBLISHED_SCHEMA)
    step = -(-rows // files)
    return [table.slice(i, step) for i in range(0, rows, step)]


def write_staging(folder: Path, tables: list[pa.Table]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, table in enumerate(tables):
        path = folder / f"shard-{i:03d}.parquet"
        pq.write_table(table, path)
        paths.append(str(path))
    return paths


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def all_rows(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], pa.Table]:
    tables = staging_tables()
    return write_staging(tmp_path_factory.mktemp("staging"), tables), all_rows(tables)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, staged: tuple[list[str], pa.Table]
              ) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("git10m")
    # connect() opens a published folder only with its funnel table present
    pq.write_table(pa.table({"stage": ["publish"], "kept": [1]}), root / "funnel.parquet")
    (root / "rejected").mkdir()
    pq.write_table(pa.table({"key": ["x"], "stage": ["harvest"], "reason": ["nodata"]}),
                   root / "rejected" / "part-0.parquet")
    summary = write_metadata(staged[0], str(root / "metadata"), row_group_size=64, fingerprint="fp-1")
    return root, summary


def test_hilbert_sql_matches_the_textbook_curve() -> None:
    rng = np.random.default_rng(3)
    points = [(-180.0, -90.0), (179.999999, 89.999999), (180.0, 90.0), (0.0, 0.0)]
    points += list(zip(rng.uniform(-180, 180, 500), rng.uniform(-90, 90, 500), strict=True))
    table = pa.table({"lon": [p[0] for p in points] + [None, float("nan")],
                      "lat": [p[1] for p in points] + [10.0, 10.0]})
    layers, index = hilbert_sql()
    query = "SELECT * FROM points"
    for layer in layers:
        query = f"SELECT *, {layer} FROM ({query})"
    con = duckdb.connect()
    con.register("points", table)
    got = [r[0] for r in con.execute(f"SELECT {index} FROM ({query})").fetchall()]
    assert got[:-2] == [hilbert_index(*grid(lon, lat)) for lon, lat in points]
    assert got[-2:] == [None, None]  # no location: sorted last


def test_one_partition_per_level_with_every_row(published: tuple[Path, dict],
                                                staged: tuple[list[str], pa.Table]) -> None:
    root, summary = published
    rows = staged[1]
    expected = {int(v): n for v, n in zip(*np.unique(rows["level"].to_numpy(), return_counts=True), strict=True)}
    folders = sorted(p.name for p in (root / "metadata").iterdir())
    assert folders == sorted(f"level={level}" for level in expected)
    for level, count in expected.items():
        files = sorted((root / "metadata" / f"level={level}").iterdir())
        assert [f.name for f in files] == ["part-0.parquet"]
        assert pq.read_metadata(files[0]).num_rows == count
        assert summary["levels"][level]["rows"] == count
    assert summary["rows"] == rows.num_rows


def test_rows_follow_the_hilbert_curve_then_key(published: tuple[Path, dict]) -> None:
    root, _ = published
    for path in sorted((root / "metadata").rglob("*.parquet")):
        table = pq.read_table(path, columns=["key", "lon", "lat"]).to_pylist()
        order = [(0, hilbert_index(*grid(r["lon"], r["lat"])), r["key"]) if r["lon"] is not None
                 else (1, 0, r["key"]) for r in table]
        assert order == sorted(order), path


def test_files_hold_no_level_but_the_views_do(published: tuple[Path, dict],
                                              staged: tuple[list[str], pa.Table]) -> None:
    root, _ = published
    for path in (root / "metadata").rglob("*.parquet"):
        assert "level" not in pq.read_schema(path).names
    con = connect(str(root))
    assert dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE samples)").fetchall())["level"] == \
        "SMALLINT"
    got = con.execute("SELECT key, level, lon, split FROM samples ORDER BY key").fetchall()
    want = sorted(zip(*(staged[1][c].to_pylist() for c in ("key", "level", "lon", "split")), strict=True))
    assert got == want


def test_descriptions_geo_and_fingerprint(published: tuple[Path, dict],
                                          staged: tuple[list[str], pa.Table]) -> None:
    root, _ = published
    rows = staged[1]
    for folder in (root / "metadata").iterdir():
        path = folder / "part-0.parquet"
        schema = pq.read_schema(path)
        assert schema.equals(FILE_SCHEMA, check_metadata=False)
        for field in schema:
            assert field.metadata[b"description"] == PUBLISHED_SCHEMA.field(field.name).metadata[b"description"]
        level = int(folder.name.split("=")[1])
        mine = rows.filter(pa.compute.equal(rows["level"], level))["geometry"].to_pylist()
        want = geo_metadata([shapely.from_wkb(g) if g is not None else None for g in mine])
        footer = pq.read_metadata(path).metadata
        assert schema.metadata[b"geo"] == footer[b"geo"] == want  # the same bbox and types as all rows give
        assert schema.metadata[FINGERPRINT_KEY] == footer[FINGERPRINT_KEY] == b"fp-1"
        if json.loads(want)["columns"]["geometry"]["geometry_types"]:
            frame = geopandas.read_parquet(path)
            assert frame.crs.to_string() == "OGC:CRS84"
            assert frame.geometry.notna().sum() == sum(g is not None for g in mine)


def test_row_groups_have_the_requested_size(published: tuple[Path, dict]) -> None:
    root, summary = published
    groups = 0
    for path in (root / "metadata").rglob("*.parquet"):
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert all(s == 64 for s in sizes[:-1]) and 0 < sizes[-1] <= 64, (path, sizes)
        columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
                   for i in range(meta.num_columns)}
        assert {c.compression for c in columns.values()} == {"ZSTD"}
        assert "BYTE_STREAM_SPLIT" in columns["lon"].encodings  # floats unique per chip: no dictionary
        assert "RLE_DICTIONARY" not in columns["key"].encodings
        assert "RLE_DICTIONARY" in columns["split"].encodings
        groups += len(sizes)
    assert summary["row_groups"] == groups


def test_rerun_is_byte_identical_and_removes_stale_files(tmp_path: Path, staged: tuple[list[str], pa.Table]
                                                         ) -> None:
    out = tmp_path / "metadata"
    write_metadata(staged[0], str(out), row_group_size=64, fingerprint="fp-1", threads=2)
    first = tree_digest(out)
    stale = [out / "level=99" / "part-0.parquet", out / "level=10" / "data_0.parquet",
             out / "level=10" / "part-7.parquet"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"old")
    summary = write_metadata(list(reversed(staged[0])), str(out), row_group_size=64, fingerprint="fp-1",
                             threads=1, memory_limit="200MB", temp_dir=str(tmp_path / "spill"))
    assert tree_digest(out) == first  # input order, threads and memory do not change a byte
    assert sorted(summary["removed"]) == ["level=10/data_0.parquet", "level=10/part-7.parquet", "level=99"]
    # a level that is gone from the input disappears from the output
    without_18 = tmp_path / "staging-no18"
    write_staging(without_18, [t.filter(pa.compute.not_equal(t["level"], 18)) for t in staging_tables()])
    write_metadata(sorted(str(p) for p in without_18.iterdir()), str(out), row_group_size=64, fingerprint="fp-2")
    assert not (out / "level=18").exists()
    assert not list(out.rglob(".*"))  # no temporary files left


def test_large_levels_split_into_parts_in_order(tmp_path: Path, staged: tuple[list[str], pa.Table]) -> None:
    out = tmp_path / "metadata"
    summary = write_metadata(staged[0], str(out), row_group_size=50, max_rows_per_file=120, fingerprint="fp")
    for level, info in summary["levels"].items():
        files = [out / f"level={level}" / name for name in info["files"]]
        assert [f.name for f in files] == [f"part-{i}.parquet" for i in range(-(-info["rows"] // 120))]
        counts = [pq.read_metadata(f).num_rows for f in files]
        assert all(c == 120 for c in counts[:-1]) and sum(counts) == info["rows"]
        assert [pq.read_metadata(f).num_row_groups for f in files][:-1] == [3] * (len(files) - 1)
        keys = pa.concat_tables([pq.read_table(f, columns=["key", "lon", "lat"]) for f in files]).to_pylist()
        order = [(0, hilbert_index(*grid(r["lon"], r["lat"])), r["key"]) if r["lon"] is not None
                 else (1, 0, r["key"]) for r in keys]
        assert order == sorted(order)


def test_bounding_box_query_skips_row_groups(published: tuple[Path, dict]) -> None:
    root, _ = published
    con = connect(str(root))
    query = ("SELECT key, lon, lat FROM samples WHERE lon BETWEEN {} AND {} AND lat BETWEEN {} AND {} "
             "ORDER BY key").format(*BBOX)
    plan = con.execute(f"EXPLAIN ANALYZE {query}").fetchall()[0][1]
    scanned = [tuple(map(int, part.split("/"))) for part in
               (line.split("Row Groups Scanned:")[1].strip(" │") for line in plan.splitlines()
                if "Row Groups Scanned:" in line)]
    assert scanned, plan
    read, total = map(sum, zip(*scanned, strict=True))
    assert read < total / 3, plan  # ~1 row group per level file, not all of them
    got = con.execute(query).fetchall()
    brute = con.execute("SELECT key, lon, lat FROM read_parquet(?, hive_partitioning = true) WHERE lon BETWEEN ? "
                        "AND ? AND lat BETWEEN ? AND ? ORDER BY key",
                        [str(root / "metadata" / "**" / "*.parquet"), *BBOX]).fetchall()
    assert got == brute and len(got) > 100


def test_fsspec_urls_in_and_out(staged: tuple[list[str], pa.Table]) -> None:
    fs = fsspec.filesystem("memory")
    urls = []
    for i, path in enumerate(staged[0]):
        url = f"memory://t2e-layout/staging/{i}.parquet"
        fs.pipe(url, Path(path).read_bytes())
        urls.append(url)
    summary = write_metadata(urls, "memory://t2e-layout/metadata", row_group_size=64, fingerprint="fp-m")
    written = sorted(fs.glob("memory://t2e-layout/metadata/*/*.parquet"))
    assert len(written) == summary["files"] == len(summary["levels"])
    with fs.open(written[0], "rb") as fh:
        assert pq.read_metadata(fh).metadata[FINGERPRINT_KEY] == b"fp-m"
    fs.rm("memory://t2e-layout", recursive=True)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "lon": [1.0]}), path)
    with pytest.raises(ValueError, match=r"lack the published columns \['shard'"):
        write_metadata([str(path)], str(tmp_path / "out"), fingerprint="fp")
    with pytest.raises(ValueError, match="row_group_size"):
        write_metadata([str(path)], str(tmp_path / "out"), fingerprint="fp", row_group_size=0)
