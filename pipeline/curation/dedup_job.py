"""The `dedup` stage: drop exact copies (same sha256) anywhere, then near copies within a neighbourhood.

Images are the unit (rows sharing an image by one-sample-per-sentence captions go together). Exact copies
are grouped by sha256 over the whole dataset with small records; near copies are searched only within one
H3 cell (images without a location share one bucket) with perceptual hash, CLIP cosine and a distance
test, so uniform scenes at different places never merge. Only the near step moves embeddings (one compact
record per image, one shuffle). The kept copy is the best-scored (then the smallest key), and every
`duplicate_of` names an image that is finally kept.
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


def _records(record: str, ctx: StageContext, clip_dir: str) -> Iterator[ImageRecord]:
    """One record per image of a shard, its score the best of its rows."""
    shard = json.loads(record)["shard"]
    rows = io.read_table(ctx.input_dir, shard, ["image_key", "sha256", "lon", "lat", "gsd_m", "width", "h3_cell",
                                                "clip_score"]).to_pylist()
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen = best.get(row["image_key"])
        if seen is None or row["clip_score"] > seen["clip_score"]:
            best[row["image_key"]] = row
    emb = (io.read_table(clip_dir, shard, ["image_key", "phash", "embedding"], sub="embeddings").to_pydict()
           if best else {"image_key": [], "phash": [], "embedding": []})
    found = {k: (p, e) for k, p, e in zip(emb["image_key"], emb["phash"], emb["embedding"], strict=True)}
    for key, row in sorted(best.items()):
        phash, embedding = found[key]
        width = row["gsd_m"] * row["width"] if row["gsd_m"] and row["width"] else None
        yield ImageRecord(key, shard, row["sha256"], float(row["clip_score"]), row["lon"], row["lat"], width,
                          row["h3_cell"], phash, embedding)


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


def _not_dropped(image: ImageRecord, dropped: dict[str, str]) -> bool:
    return image.image_key not in dropped


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """images -> exact (small records, by sha256) -> near (by cell, exact copies left out) -> resolve -> write."""
    clip_dir = storage.join(ctx.common["dir"], "clip")
    resolution = ctx.params["h3_resolution"]
    images = tasks | "dedup:Images" >> beam.FlatMap(_records, ctx, clip_dir)
    exact = (images
             | "dedup:BySha" >> beam.Map(lambda i: (i.sha256, (i.image_key, i.shard, i.score)))
             | "dedup:ShaGroups" >> beam.GroupByKey()
             | "dedup:Exact" >> beam.FlatMap(exact_step))
    dropped = exact | "dedup:DroppedKeys" >> beam.Map(lambda kv: (kv[1][0], kv[0]))
    near = (images
            | "dedup:Survivors" >> beam.Filter(_not_dropped, beam.pvalue.AsDict(dropped))
            | "dedup:ByCell" >> beam.Map(lambda i: (neighbourhood(i, resolution), i))
            | "dedup:CellGroups" >> beam.GroupByKey()
            | "dedup:Near" >> beam.FlatMap(near_step, ctx.params))
    decisions = ({"near": near, "exact": exact}
                 | "dedup:ByImage" >> beam.CoGroupByKey()
                 | "dedup:Resolve" >> beam.FlatMap(resolve_step))
    return join_by_shard(tasks, decisions, "dedup") | "dedup:Write" >> beam.ParDo(WriteDedup(ctx))
