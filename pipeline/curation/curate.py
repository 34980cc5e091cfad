"""The `curate` stage: cap samples per (H3 cell, level) for geographic balance, then assemble
`data/curated/`: final metadata, every curation stage's rejected rows, and the funnel.

The cap keeps a reproducible pseudo-random subset of a full cell (ordered by a hash of seed and key), so
no source, date or score ordering decides which places survive. Non-georeferenced samples have no cell
and are not capped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa

from pipeline import storage
from pipeline.curation import io
from pipeline.curation.dedup_job import join_by_shard
from pipeline.curation.job import ShardStep, StageContext

EARLIER = ("geo", "caption", "clip", "filter", "dedup")


def _rows(record: str, ctx: StageContext, resolution: int) -> Iterator[tuple[str, dict[str, Any]]]:
    import h3

    shard = json.loads(record)["shard"]
    for row in io.read_table(ctx.input_dir, shard, ["key", "shard", "h3_cell", "level"]).to_pylist():
        cell = row["h3_cell"]
        if cell is None:
            continue
        parent = cell if h3.get_resolution(cell) <= resolution else h3.cell_to_parent(cell, resolution)
        yield f"{parent}|{row['level']}", row


def order_key(seed: int, key: str) -> str:
    """Reproducible pseudo-random order of a cell's samples."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def cap_step(item: tuple[str, Iterable[dict[str, Any]]], cap: int, seed: int) -> Iterator[tuple[str, Any]]:
    """Decisions for the samples of a full (cell, level) beyond the cap."""
    rows = sorted(item[1], key=lambda r: order_key(seed, r["key"]))
    for row in rows[cap:]:
        yield row["shard"], ("drop", {"key": row["key"], "detail": f"{len(rows)} samples in {item[0]}, cap {cap}"})


class WriteCurated(ShardStep):
    """Final metadata of one shard, and its rejected rows from every curation stage."""

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Drop over-cap rows; gather earlier stages' rejected rows for this shard."""
        decisions = {d["key"]: d for d in extra.get("drop", [])}
        table = io.read_table(self.ctx.input_dir, shard)
        keep, rejected = [], []
        for i, row in enumerate(table.to_pylist()):
            d = decisions.get(row["key"])
            if d is None:
                keep.append(i)
            else:
                rejected.append(io.rejected_row(row, "curate", "over_cell_cap", d["detail"]))
        for stage in EARLIER:
            url = storage.join(self.common.stage_dir(stage), "rejected", f"{shard}.parquet")
            fs, path = storage.filesystem(url)
            if fs.exists(path):
                rejected += io.read_table(self.common.stage_dir(stage), shard, sub="rejected").to_pylist()
        return io.write_shard(self.ctx.output_dir, shard, io.take(table, keep), rejected, fp)


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """rows -> (cell, level) groups -> over-cap decisions joined to shards -> write."""
    cap, seed, res = ctx.params["max_per_cell"], ctx.params["seed"], ctx.params["h3_resolution"]
    decisions = (tasks
                 | "curate:Rows" >> beam.FlatMap(_rows, ctx, res)
                 | "curate:Cells" >> beam.GroupByKey()
                 | "curate:Cap" >> beam.FlatMap(cap_step, cap, seed))
    return join_by_shard(tasks, decisions, "curate") | "curate:Write" >> beam.ParDo(WriteCurated(ctx))


FUNNEL_SCHEMA = pa.schema([
    pa.field("stage", pa.string()), pa.field("step", pa.int16()), pa.field("source", pa.string()),
    pa.field("in", pa.int64()), pa.field("kept", pa.int64()), pa.field("added", pa.int64()),
    pa.field("dropped", pa.int64()), pa.field("dropped_by_reason", pa.map_(pa.string(), pa.int64())),
])
FUNNEL_STAGES = ("harvest", *EARLIER, "curate")


def funnel(harvest_dir: str, stage_dirs: dict[str, str], output_dir: str) -> list[dict[str, Any]]:
    """Per stage and source: rows in, kept, added (extra sentence rows), dropped by reason.

    Counted from each stage's own files (input metadata, output metadata, rejected), so a stage that lost
    a row without recording it shows up as in != kept + dropped.
    """
    import duckdb

    con = duckdb.connect()
    if not storage.is_local(output_dir):
        con.register_filesystem(storage.filesystem(output_dir)[0])

    def counts(sql: str, url: str) -> list[tuple[Any, ...]]:
        return con.execute(sql, [storage.join(url, "*.parquet")]).fetchall()

    rows: list[dict[str, Any]] = []
    previous = harvest_dir
    for step, stage in enumerate(FUNNEL_STAGES):
        entry: dict[str, dict[str, Any]] = {}

        def at(source: str, entry: dict[str, dict[str, Any]] = entry) -> dict[str, Any]:
            return entry.setdefault(source, {"in": 0, "kept": 0, "added": 0, "dropped": 0, "reasons": {}})

        if stage == "harvest":
            out_meta, rejected_url = storage.join(harvest_dir, "metadata"), storage.join(harvest_dir, "rejected")
            for source, n in counts("SELECT source, count(*) FROM read_parquet(?) GROUP BY 1", out_meta):
                at(source)["kept"] += n
            reject_sql = "SELECT source, reason, count(*) FROM read_parquet(?) GROUP BY 1, 2"
        else:
            for source, n in counts("SELECT source, count(*) FROM read_parquet(?) GROUP BY 1",
                                    storage.join(previous, "metadata")):
                at(source)["in"] += n
            out_meta = storage.join(stage_dirs[stage], "metadata")
            for source, kept, added in counts("SELECT source, count(*) FILTER (key = image_key), "
                                              "count(*) FILTER (key <> image_key) FROM read_parquet(?) GROUP BY 1",
                                              out_meta):
                at(source)["kept"] += kept
                at(source)["added"] += added
            rejected_url = storage.join(stage_dirs[stage], "rejected")
            reject_sql = (f"SELECT source, reason, count(*) FROM read_parquet(?) WHERE stage = '{stage}' "
                          "GROUP BY 1, 2")
        for source, reason, n in counts(reject_sql, rejected_url):
            at(source)["dropped"] += n
            at(source)["reasons"][reason] = n
        if stage == "harvest":
            for value in entry.values():
                value["in"] = value["kept"] + value["dropped"]  # harvest candidates: written or rejected
        for source in sorted(entry):
            v = entry[source]
            rows.append({"stage": stage, "step": step, "source": source, "in": v["in"], "kept": v["kept"],
                         "added": v["added"], "dropped": v["dropped"],
                         "dropped_by_reason": sorted(v["reasons"].items())})
        previous = stage_dirs.get(stage, harvest_dir)
    return rows


def write_funnel(rows: list[dict[str, Any]], output_dir: str) -> None:
    """`funnel.parquet` and `funnel.json` (the cards read these)."""
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=FUNNEL_SCHEMA)
    with storage.atomic_write(storage.join(output_dir, "funnel.parquet")) as local:
        pq.write_table(table, local, compression="zstd")
    doc = [{**r, "dropped_by_reason": dict(r["dropped_by_reason"])} for r in rows]
    with storage.atomic_write(storage.join(output_dir, "funnel.json")) as local, open(local, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
        fh.write("\n")
