"""Write one published shard: its WebDataset tar and its staging metadata (the commit marker).

A task packs row ranges of curated shards (see `plan`). The images come from the harvest tars the rows
name, read once per harvest tar. The tar is written first, then the staging Parquet (rows as published,
with the task's fingerprint in its footer), so a shard whose staging file carries the expected
fingerprint is complete and an interrupted run skips it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import fsspec
import pyarrow as pa
import shapely

from pipeline import storage
from pipeline.curation import io
from pipeline.publish.params import PublishParams
from pipeline.publish.plan import assign_split, sort_key
from pipeline.schema import PUBLISHED_REJECTED_SCHEMA, PUBLISHED_SCHEMA
from pipeline.shard_writer import FINGERPRINT_KEY, WebDatasetTar, geo_metadata, row_json


@dataclass(frozen=True)
class Paths:
    """Where one published shard's files go."""

    tar: str
    staging: str
    rejected: str

    @classmethod
    def of(cls, params: PublishParams, name: str) -> Paths:
        """Tar under the published dir; staging metadata and rejected rows under the work dir."""
        return cls(storage.join(params.dir, "shards", f"{name}.tar"),
                   storage.join(params.work_dir, "staging", "metadata", f"{name}.parquet"),
                   storage.join(params.work_dir, "staging", "rejected", f"{name}.parquet"))


def publish_row(row: dict[str, Any], name: str, params: PublishParams) -> dict[str, Any]:
    """A curated row as published: its shard, level 0 for unknown GSD, its split."""
    level = row.get("level")
    return {**row, "shard": name, "level": 0 if level is None else level,
            "split": assign_split(row, params.split, params.split_h3_resolution, params.seed)}


def write_shard(params: PublishParams, name: str, ranges: list[list[Any]], fp: str) -> dict[str, Any]:
    """Build and commit one shard; returns its sample and rejected counts."""
    rows: list[dict[str, Any]] = []
    for curated_shard, start, stop in ranges:
        table = io.read_table(params.curated_dir, curated_shard).slice(start, stop - start)
        rows.extend(table.to_pylist())
    by_harvest: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        by_harvest[row["shard"]].add(row["image_key"])
    images: dict[tuple[str, str], bytes] = {}
    for harvest_shard in sorted(by_harvest):
        found = io.read_images(params.harvest_dir, harvest_shard, by_harvest[harvest_shard])
        images.update({(harvest_shard, k): v for k, v in found.items()})
    kept: list[tuple[bytes, dict[str, Any]]] = []
    rejected = []
    for row in rows:
        image = images.get((row["shard"], row["image_key"]))
        if image is None:
            rejected.append(io.rejected_row(row, "publish", "image_missing",
                                            f"{row['image_key']} is not in harvest shard {row['shard']}"))
        else:
            kept.append((image, publish_row(row, name, params)))
    kept.sort(key=lambda pair: sort_key(params.seed, pair[1]["key"]))
    paths = Paths.of(params, name)
    with storage.atomic_write(paths.tar) as local:
        tar = WebDatasetTar(local)
        try:
            for image, row in kept:
                geometry = shapely.from_wkb(row["geometry"]) if row["geometry"] is not None else None
                tar.write(row["key"], {row["image_format"] or "jpg": image, "txt": (row["caption"] or "").encode(),
                                       "json": row_json(row, geometry)})
        finally:
            tar.close()
    published = [row for _, row in kept]
    io.write_parquet(paths.rejected, pa.Table.from_pylist(rejected, schema=PUBLISHED_REJECTED_SCHEMA))
    table = pa.Table.from_pylist(published, schema=PUBLISHED_SCHEMA)
    wkb = [g for g in table.column("geometry").to_pylist() if g is not None]
    meta = {b"geo": geo_metadata(list(shapely.from_wkb(wkb))), FINGERPRINT_KEY: fp.encode()}
    io.write_parquet(paths.staging, table.replace_schema_metadata(meta))
    return {"samples": len(published), "rejected": len(rejected)}


class WriteShard(beam.DoFn):
    """Beam step: write one published shard unless it is already committed; leave a progress marker."""

    def __init__(self, params: dict[str, Any], progress_dir: str) -> None:
        self.params_json, self.progress_dir = params, progress_dir

    def setup(self) -> None:
        """Validate params once per worker."""
        self.params = PublishParams.model_validate(self.params_json)

    def process(self, element: str) -> Any:
        """`element`: a JSON task {name, ranges, fingerprint}."""
        task = json.loads(element)
        started = time.time()
        paths = Paths.of(self.params, task["name"])
        tar_fs, tar_path = storage.filesystem(paths.tar)
        if io.committed_fingerprint(paths.staging) == task["fingerprint"] and tar_fs.exists(tar_path):
            result: dict[str, Any] = {"shard": task["name"], "skipped": True}
        else:
            result = {"shard": task["name"], **write_shard(self.params, task["name"], task["ranges"],
                                                           task["fingerprint"])}
        result["seconds"] = round(time.time() - started, 4)
        state = "skipped" if result.get("skipped") else "done"
        with fsspec.open(storage.join(self.progress_dir, f"{task['name']}.{state}"), "w") as fh:
            json.dump(result, fh)
        yield result
