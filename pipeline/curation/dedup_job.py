"""The `dedup` stage: drop exact copies (same sha256) anywhere, then near copies within a neighbourhood.

Images are the unit (rows sharing an image by one-sample-per-sentence captions go together). Exact copies
are grouped by sha256 over the whole dataset with small records; near copies are searched only within one
H3 cell (images without a location share one bucket) with perceptual hash, CLIP cosine and a distance
test, so uniform scenes at different places never merge. Embeddings never travel through a Beam shuffle
(runners such as FnApiRunner hold shuffles in memory): each shard writes its images' near-search records
into hash partitions of neighbourhoods on storage, and one task per partition reads its files back, so a
worker holds one partition (about `PARTITION_ROWS` images) at a time. The kept copy is the best-scored
(then the smallest key), and every `duplicate_of` names an image that is finally kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np

from pipeline import storage
from pipeline.curation import io
from pipeline.curation.job import ShardStep, StageContext

NO_PLACE = "no-georeference"


class ImageRecord(NamedTuple):
    """What dedup knows about one image (a tuple: compact in memory and in the shuffle)."""

    image_key: str
    shard: str
    sha256: str
    score: float
    lon: float | None
    lat: float | None
    ground_width_m: float | None
    h3_cell: str | None
    phash: int
    embedding: bytes  # float16 little-endian


PARTITION_ROWS = 20_000  # images per near-search partition (about 25 MB of records)


def _identities(record: str, ctx: StageContext) -> Iterator[tuple[str, tuple[str, str, float]]]:
    """(sha256, (image key, shard, best score)) per image of a shard: small records for the exact step."""
    shard = json.loads(record)["shard"]
    best: dict[str, tuple[str, float]] = {}
    table = io.read_table(ctx.input_dir, shard, ["image_key", "sha256", "clip_score"]).to_pydict()
    for key, sha, score in zip(table["image_key"], table["sha256"], table["clip_score"], strict=True):
        if key not in best or score > best[key][1]:
            best[key] = (sha, float(score))
    for key, (sha, score) in sorted(best.items()):
        yield sha, (key, shard, score)


def partition_of(neighbourhood_key: str, partitions: int) -> int:
    """Stable partition of a neighbourhood (not Python's salted hash)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(neighbourhood_key.encode()).digest()[:8], "big") % partitions


def _records(shard: str, ctx: StageContext, clip_dir: str, dropped: set[str] | dict[str, str]
             ) -> list[ImageRecord]:
    """One record per image of a shard not dropped as an exact copy, its score the best of its rows."""
    rows = io.read_table(ctx.input_dir, shard, ["image_key", "sha256", "lon", "lat", "gsd_m", "width", "h3_cell",
                                                "clip_score"]).to_pylist()
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = best.get(row["image_key"])
        if row["image_key"] not in dropped and (seen is None or row["clip_score"] > seen["clip_score"]):
            best[row["image_key"]] = row
    if not best:
        return []
    emb = io.read_table(clip_dir, shard, ["image_key", "phash", "embedding"], sub="embeddings").to_pydict()
    found = {k: (p, e) for k, p, e in zip(emb["image_key"], emb["phash"], emb["embedding"], strict=True)}
    out = []
    for key, row in sorted(best.items()):
        phash, embedding = found[key]
        width = row["gsd_m"] * row["width"] if row["gsd_m"] and row["width"] else None
        out.append(ImageRecord(key, shard, row["sha256"], float(row["clip_score"]), row["lon"], row["lat"], width,
                               row["h3_cell"], phash, embedding))
    return out


class WritePartitions(beam.DoFn):
    """Spread one shard's surviving images over the near-search partitions (files on storage)."""

    def __init__(self, ctx: StageContext, clip_dir: str, part_dir: str, partitions: int) -> None:
        self.ctx, self.clip_dir, self.part_dir, self.partitions = ctx, clip_dir, part_dir, partitions

    def process(self, record: str, dropped: dict[str, str]) -> Iterator[tuple[int, str]]:
        """(partition, shard) for every partition this shard wrote to."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        shard = json.loads(record)["shard"]
        resolution = self.ctx.params["h3_resolution"]
        parts: dict[int, list[ImageRecord]] = {}
        for image in _records(shard, self.ctx, self.clip_dir, dropped):
            parts.setdefault(partition_of(neighbourhood(image, resolution), self.partitions), []).append(image)
        for part, images in sorted(parts.items()):
            table = pa.Table.from_pylist([i._asdict() for i in images])
            with storage.atomic_write(storage.join(self.part_dir, f"{part:05d}", f"{shard}.parquet")) as local:
                pq.write_table(table, local)
            yield part, shard


def _partition_images(item: tuple[int, Iterable[str]], part_dir: str) -> list[ImageRecord]:
    """Read a partition's files back, in shard order."""
    part, shards = item
    records: list[ImageRecord] = []
    for shard in sorted(set(shards)):
        table = io.read_table(part_dir, shard, sub=f"{part:05d}")
        records += [ImageRecord(**r) for r in table.to_pylist()]
    return records


def _rank(score: float, key: str) -> tuple[float, str]:
    return -score, key


def exact_step(item: tuple[str, Iterable[tuple[str, str, float]]]) -> Iterator[tuple[str, tuple[str, str, str]]]:
    """(keeper, (dropped image, its shard, sha256)) for every copy but the best of a sha256 group."""
    from pipeline.curation.dedup import exact_duplicates

    images = {key: (shard, score) for key, shard, score in item[1]}
    if len(images) > 1:
        for dropped, kept in exact_duplicates([(k, _rank(s, k)) for k, (_, s) in images.items()]):
            yield kept, (dropped, images[dropped][0], item[0])


def neighbourhood(image: ImageRecord, resolution: int) -> str:
    """The H3 cell (at the dedup resolution) a near-duplicate search is confined to."""
    import h3

    cell = image.h3_cell
    if cell is None:
        return NO_PLACE
    return cell if h3.get_resolution(cell) <= resolution else h3.cell_to_parent(cell, resolution)


def near_step(item: tuple[str, Iterable[ImageRecord]], params: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(dropped image, (shard, kept image, cell)) for the near copies within one neighbourhood."""
    from pipeline.curation.dedup import DedupImage, near_duplicates

    images = {i.image_key: i for i in item[1]}
    if len(images) < 2:
        return iter(())
    group = [DedupImage(key=k, phash=i.phash, embedding=np.frombuffer(i.embedding, "<f2"), lon=i.lon, lat=i.lat,
                        ground_width_m=i.ground_width_m, rank=_rank(i.score, k)) for k, i in sorted(images.items())]
    pairs = near_duplicates(group, params["max_hamming"], params["min_cosine"], params["max_offset_fraction"])
    return iter([(d, (images[d].shard, k, item[0])) for d, k in pairs])


def _decision(image_key: str, shard: str, reason: str, kept: str, detail: str) -> tuple[str, Any]:
    """A decision routed to the shard of the dropped image."""
    return shard, ("drop", {"image_key": image_key, "reason": reason, "duplicate_of": kept, "detail": detail})


def resolve_step(item: tuple[str, dict[str, list[Any]]]) -> Iterator[tuple[str, Any]]:
    """Final decisions about one image key: its own near drop, and the exact copies it stood for (which
    follow it to its near survivor when it was dropped too)."""
    key, joined = item
    near = joined["near"][0] if joined["near"] else None
    if near is not None:
        shard, kept, cell = near
        yield _decision(key, shard, "duplicate_near", kept, f"near copy in H3 cell {cell}")
    survivor = near[1] if near is not None else key
    for dropped, shard, sha in sorted(joined["exact"]):
        yield _decision(dropped, shard, "duplicate_exact", survivor, f"same sha256 {sha[:16]} as {key}")


class WriteDedup(ShardStep):
    """Drop every row of a dropped image; record which image it duplicates."""

    def write(self, shard: str, fp: str, extra: Any) -> dict[str, int]:
        """Rows of images without a decision are kept."""
        decisions = {d["image_key"]: d for d in extra.get("drop", [])}
        table = io.read_table(self.ctx.input_dir, shard)
        keep, rejected = [], []
        for i, row in enumerate(table.to_pylist()):
            d = decisions.get(row["image_key"])
            if d is None:
                keep.append(i)
            else:
                rejected.append(io.rejected_row(row, "dedup", d["reason"], d["detail"], d["duplicate_of"]))
        return io.write_shard(self.ctx.output_dir, shard, io.take(table, keep), rejected, fp)


def join_by_shard(tasks: beam.PCollection, decisions: beam.PCollection, stage: str) -> beam.PCollection:
    """(shard, {"task": [record], "drop": [decision, ...]}) for every shard, with or without decisions."""
    def grouped(item: tuple[str, Iterable[tuple[str, Any]]]) -> tuple[str, dict[str, list[Any]]]:
        out: dict[str, list[Any]] = {"task": [], "drop": []}
        for tag, value in item[1]:
            out[tag].append(value)
        return item[0], out

    keyed = tasks | f"{stage}:KeyTasks" >> beam.Map(lambda r: (json.loads(r)["shard"], ("task", r)))
    return ((keyed, decisions)
            | f"{stage}:Merge" >> beam.Flatten()
            | f"{stage}:ByShard" >> beam.GroupByKey()
            | f"{stage}:Collect" >> beam.Map(grouped))


def near_in_partition(item: tuple[int, Iterable[str]], part_dir: str, params: dict[str, Any]
                      ) -> Iterator[tuple[str, Any]]:
    """Near decisions for every neighbourhood of one partition."""
    groups: dict[str, list[ImageRecord]] = {}
    for image in _partition_images(item, part_dir):
        groups.setdefault(neighbourhood(image, params["h3_resolution"]), []).append(image)
    for cell in sorted(groups):
        yield from near_step((cell, groups[cell]), params)


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """identities -> exact (by sha256) -> partitions on storage -> near (per partition) -> resolve -> write."""
    clip_dir = storage.join(ctx.common["dir"], "clip")
    part_dir = storage.join(ctx.common["work_dir"], "dedup-partitions")
    storage.remove_tree(part_dir)
    partitions = max(1, -(-ctx.rows_in // PARTITION_ROWS))
    exact = (tasks
             | "dedup:Identities" >> beam.FlatMap(_identities, ctx)
             | "dedup:ShaGroups" >> beam.GroupByKey()
             | "dedup:Exact" >> beam.FlatMap(exact_step))
    dropped = exact | "dedup:DroppedKeys" >> beam.Map(lambda kv: (kv[1][0], kv[0]))
    near = (tasks
            | "dedup:Partition" >> beam.ParDo(WritePartitions(ctx, clip_dir, part_dir, partitions),
                                              beam.pvalue.AsDict(dropped))
            | "dedup:PartitionsWritten" >> beam.GroupByKey()
            | "dedup:Near" >> beam.FlatMap(near_in_partition, part_dir, ctx.params))
    decisions = ({"near": near, "exact": exact}
                 | "dedup:ByImage" >> beam.CoGroupByKey()
                 | "dedup:Resolve" >> beam.FlatMap(resolve_step))
    return join_by_shard(tasks, decisions, "dedup") | "dedup:Write" >> beam.ParDo(WriteDedup(ctx))
