"""The `dedup` stage: drop exact copies (same sha256) anywhere, then near copies within a neighbourhood.

Images are the unit (rows sharing an image by one-sample-per-sentence captions go together). Exact
copies are grouped by sha256 over the whole dataset; near copies are searched only within one H3 cell
(non-georeferenced images share one bucket) with perceptual hash, CLIP cosine and a distance test, so
uniform scenes at different places never merge. The kept copy is the best-scored (then the smallest key).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from pipeline import storage
from pipeline.curation import io
from pipeline.curation.job import ShardStep, StageContext

NO_PLACE = "no-georeference"


def _records(record: str, ctx: StageContext, clip_dir: str) -> Iterator[dict[str, Any]]:
    """One record per image of a shard: identity, place, best score, phash and embedding."""
    shard = json.loads(record)["shard"]
    rows = io.read_table(ctx.input_dir, shard, ["key", "image_key", "source", "sha256", "lon", "lat", "gsd_m",
                                                "width", "h3_cell", "clip_score"]).to_pylist()
    embeddings = {r["image_key"]: r for r in io.read_table(clip_dir, shard, sub="embeddings").to_pylist()}
    images: dict[str, dict[str, Any]] = {}
    for row in rows:
        image = images.get(row["image_key"])
        if image is None:
            emb = embeddings[row["image_key"]]
            width = row["gsd_m"] * row["width"] if row["gsd_m"] and row["width"] else None
            images[row["image_key"]] = {
                "image_key": row["image_key"], "shard": shard, "source": row["source"], "sha256": row["sha256"],
                "lon": row["lon"], "lat": row["lat"], "ground_width_m": width, "h3_cell": row["h3_cell"],
                "score": row["clip_score"], "phash": emb["phash"], "embedding": emb["embedding"]}
        else:
            image["score"] = max(image["score"], row["clip_score"])
    yield from images.values()


def _rank(image: dict[str, Any]) -> tuple[float, str]:
    return -float(image["score"]), image["image_key"]


def _drop(image: dict[str, Any], reason: str, kept: dict[str, Any], detail: str) -> tuple[str, Any]:
    """A decision routed to the shard of the dropped image."""
    return image["shard"], ("drop", {"image_key": image["image_key"], "reason": reason,
                                     "duplicate_of": kept["image_key"], "detail": detail})


def exact_step(item: tuple[str, Iterable[dict[str, Any]]]) -> dict[str, Any]:
    """The kept image of a sha256 group, carrying the copies it stands for (decided after the near step,
    so `duplicate_of` always names an image that is finally kept)."""
    from pipeline.curation.dedup import exact_duplicates

    images = {i["image_key"]: i for i in item[1]}
    drops = dict(exact_duplicates([(k, _rank(i)) for k, i in images.items()])) if len(images) > 1 else {}
    kept = next(i for k, i in sorted(images.items()) if k not in drops)
    absorbed = [{k: images[key][k] for k in ("image_key", "shard", "sha256")} for key in sorted(drops)]
    return {**kept, "absorbed": absorbed}


def neighbourhood(image: dict[str, Any], resolution: int) -> str:
    """The H3 cell (at the dedup resolution) a near-duplicate search is confined to."""
    import h3

    cell = image["h3_cell"]
    if cell is None:
        return NO_PLACE
    return cell if h3.get_resolution(cell) <= resolution else h3.cell_to_parent(cell, resolution)


def near_step(item: tuple[str, Iterable[dict[str, Any]]], params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Decisions for one neighbourhood: near copies, and the exact copies each image stands for."""
    from pipeline.curation.dedup import DedupImage, near_duplicates

    images = {i["image_key"]: i for i in item[1]}
    survivor = {k: k for k in images}
    decisions = []
    if len(images) > 1:
        group = [DedupImage(key=k, phash=i["phash"], embedding=np.frombuffer(i["embedding"], "<f2"),
                            lon=i["lon"], lat=i["lat"], ground_width_m=i["ground_width_m"], rank=_rank(i))
                 for k, i in sorted(images.items())]
        pairs = near_duplicates(group, params["max_hamming"], params["min_cosine"], params["max_offset_fraction"])
        for dropped, kept in pairs:
            survivor[dropped] = kept
            decisions.append(_drop(images[dropped], "duplicate_near", images[kept], f"near copy in {item[0]}"))
    for key, image in sorted(images.items()):
        for copy in image["absorbed"]:
            decisions.append(_drop(copy, "duplicate_exact", images[survivor[key]],
                                   f"same sha256 {copy['sha256'][:16]} as {key}"))
    return decisions


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


def build(tasks: beam.PCollection, ctx: StageContext) -> Any:
    """images -> exact (by sha256) -> near (by cell) -> decisions joined to shards -> write."""
    clip_dir = storage.join(ctx.common["dir"], "clip")
    resolution = ctx.params["h3_resolution"]
    images = tasks | "dedup:Images" >> beam.FlatMap(_records, ctx, clip_dir)
    decisions = (images
                 | "dedup:BySha" >> beam.Map(lambda i: (i["sha256"], i))
                 | "dedup:ShaGroups" >> beam.GroupByKey()
                 | "dedup:Exact" >> beam.Map(exact_step)
                 | "dedup:ByCell" >> beam.Map(lambda i: (neighbourhood(i, resolution), i))
                 | "dedup:CellGroups" >> beam.GroupByKey()
                 | "dedup:Near" >> beam.FlatMap(near_step, ctx.params))
    return join_by_shard(tasks, decisions, "dedup") | "dedup:Write" >> beam.ParDo(WriteDedup(ctx))
