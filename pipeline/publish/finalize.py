"""The published dataset's shared files: sizes.json, rejected/, the funnel and checksums.sha256.

They are made after every shard is committed, by DuckDB queries that stream record batches into
pyarrow writers (memory stays bounded at any size) in a total order, so a re-run gives identical bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.curation import io
from pipeline.curation.curate import FUNNEL_SCHEMA
from pipeline.publish.params import PublishParams
from pipeline.schema import PUBLISHED_REJECTED_SCHEMA

STAGE_ORDER = ("harvest", "geo", "caption", "clip", "filter", "dedup", "curate", "publish")
_BATCH = 65_536


def duck(url: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read `url`'s filesystem."""
    con = duckdb.connect()
    if not storage.is_local(url):
        con.register_filesystem(storage.filesystem(url)[0])
    return con


def write_sizes(params: PublishParams, names: Sequence[str], staging: dict[str, str]) -> dict[str, int]:
    """`shards/sizes.json` (tar name -> samples), which open_clip's trainer reads for the epoch size."""
    found = dict(zip(names, ThreadPoolExecutor(16).map(lambda n: io.footer(staging[n])[0], names), strict=True))
    sizes = {f"{n}.tar": found[n] for n in names}
    with storage.atomic_write(storage.join(params.dir, "shards", "sizes.json")) as local, open(local, "w") as fh:
        json.dump(sizes, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return sizes


def _stream(con: duckdb.DuckDBPyConnection, sql: str, url: str, schema: pa.Schema, row_group_size: int,
            params: list[Any] | None = None) -> int:
    """Write a query's rows to one Parquet file, batch by batch, in the query's order."""
    reader = con.sql(sql, params=params or None).to_arrow_reader(_BATCH)
    rows = 0
    with storage.atomic_write(url) as local:
        writer = pq.ParquetWriter(local, schema, compression="zstd")
        try:
            for batch in reader:
                table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                writer.write_table(table, row_group_size=row_group_size)
                rows += table.num_rows
            if rows == 0:
                writer.write_table(schema.empty_table())
        finally:
            writer.close()
    return rows


def write_rejected(params: PublishParams) -> int:
    """`rejected/part-0.parquet`: every dropped candidate of every stage, harvest to publish."""
    con = duck(params.dir)
    parts = []
    harvest = storage.join(params.harvest_dir, "rejected", "*.parquet")
    if storage.list_files(storage.join(params.harvest_dir, "rejected"), ".parquet"):
        parts.append("SELECT key, key AS image_key, shard, source, stage, reason, detail, NULL::VARCHAR AS "
                     f"duplicate_of, NULL::FLOAT AS clip_score, lon, lat FROM read_parquet('{harvest}')")
    for folder in (storage.join(params.curated_dir, "rejected"), storage.join(params.work_dir, "staging", "rejected")):
        if storage.list_files(folder, ".parquet"):
            parts.append("SELECT key, image_key, shard, source, stage, reason, detail, duplicate_of, clip_score, "
                         f"lon, lat FROM read_parquet('{storage.join(folder, '*.parquet')}')")
    order = "CASE stage " + " ".join(f"WHEN '{s}' THEN {i}" for i, s in enumerate(STAGE_ORDER)) + " ELSE 99 END"
    sql = (f"SELECT * FROM ({' UNION ALL '.join(parts)}) ORDER BY {order}, stage, source, key, reason"
           if parts else "SELECT * FROM (SELECT NULL::VARCHAR AS key) WHERE false")
    folder = storage.join(params.dir, "rejected")
    for stale in storage.list_files(folder):
        if stale != "part-0.parquet":
            storage.remove(storage.join(folder, stale))
    if not parts:
        return _stream(con, "SELECT " + ", ".join(f"NULL AS {n}" for n in PUBLISHED_REJECTED_SCHEMA.names)
                       + " WHERE false", storage.join(folder, "part-0.parquet"), PUBLISHED_REJECTED_SCHEMA,
                       params.row_group_size)
    return _stream(con, sql, storage.join(folder, "part-0.parquet"), PUBLISHED_REJECTED_SCHEMA,
                   params.row_group_size)


def write_funnel(params: PublishParams) -> list[dict[str, Any]]:
    """The curated funnel plus a `publish` step per source (in = curated, kept = published)."""
    con = duck(params.dir)
    curated_funnel = storage.join(params.curated_dir, "funnel.parquet")
    rows = con.sql(f"SELECT * FROM read_parquet('{curated_funnel}') ORDER BY step, source").to_arrow_table()
    out = [{**r, "dropped_by_reason": list(r["dropped_by_reason"] or [])} for r in rows.to_pylist()]
    step = max((r["step"] for r in out), default=-1) + 1
    staging = storage.join(params.work_dir, "staging")
    kept = dict(con.execute(f"SELECT source, count(*) FROM read_parquet('{staging}/metadata/*.parquet') "
                            "GROUP BY 1").fetchall())
    dropped: dict[str, dict[str, int]] = {}
    for source, reason, n in con.execute(f"SELECT source, reason, count(*) FROM read_parquet("
                                         f"'{staging}/rejected/*.parquet') GROUP BY 1, 2").fetchall():
        dropped.setdefault(source, {})[reason] = n
    curated_in = dict(con.execute(f"SELECT source, count(*) FROM read_parquet('{params.curated_dir}/metadata/"
                                  "*.parquet') GROUP BY 1").fetchall())
    for source in sorted(set(curated_in) | set(kept) | set(dropped)):
        reasons = dropped.get(source, {})
        out.append({"stage": "publish", "step": step, "source": source, "in": curated_in.get(source, 0),
                    "kept": kept.get(source, 0), "added": 0, "dropped": sum(reasons.values()),
                    "dropped_by_reason": sorted(reasons.items())})
    table = pa.Table.from_pylist(out, schema=FUNNEL_SCHEMA)
    with storage.atomic_write(storage.join(params.dir, "funnel.parquet")) as local:
        pq.write_table(table, local, compression="zstd")
    doc = [{**r, "dropped_by_reason": dict(r["dropped_by_reason"])} for r in out]
    with storage.atomic_write(storage.join(params.dir, "funnel.json")) as local, open(local, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return out


def sha256_of(url: str) -> str:
    """SHA-256 of a file, streamed in 8 MiB blocks."""
    fs, path = storage.filesystem(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def data_files(root: str) -> list[str]:
    """Every tar and Parquet file under the published dir, as sorted paths relative to it."""
    fs, base = storage.filesystem(root)
    base = base.rstrip("/")
    found = [p for p in fs.find(base) if p.endswith((".tar", ".parquet")) and "/." not in p[len(base):]]
    return sorted(p[len(base) + 1:] for p in found)


def write_checksums(root: str, threads: int = 8) -> dict[str, str]:
    """`checksums.sha256` in `sha256sum` format (`sha256sum -c checksums.sha256` verifies it)."""
    files = data_files(root)
    with ThreadPoolExecutor(threads) as pool:
        sums = dict(zip(files, pool.map(lambda f: sha256_of(storage.join(root, f)), files), strict=True))
    with storage.atomic_write(storage.join(root, "checksums.sha256")) as local, open(local, "w") as fh:
        fh.writelines(f"{sums[f]}  {f}\n" for f in files)
    return sums
